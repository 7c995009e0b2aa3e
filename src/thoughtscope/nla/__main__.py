"""`python -m thoughtscope.nla data|train|explain|eval|recipe` — the NLA workflow without the main CLI.

`recipe` reproduces the shipped default NLA end to end (data → ar-sft → av-sft → rl → ar-refit → eval →
export),
with the exact sizes and time budgets used for the shipped artefact (see docs/nla.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# The recipe that produced src/thoughtscope/assets/default_nla (2 shared CPU cores; one thread, two for ar-refit).
DEFAULT_RECIPE = {
    "data": {"n_rows": 1600, "positions_per_doc": 4, "max_position": 72},
    "stages": [
        {"stage": "ar-sft", "steps": 150, "batch_size": 8, "lr": 1e-3, "eval_every": 25, "checkpoint_every": 10,
         "time_budget_s": 720},
        {"stage": "av-sft", "steps": 400, "batch_size": 4, "lr": 1e-3, "warmup": 10, "eval_every": 50,
         "checkpoint_every": 10, "val_rows": 32, "time_budget_s": 3000},
        {"stage": "rl", "steps": 80, "batch_size": 4, "group_size": 4, "lr": 1e-4, "ar_lr": 1e-4, "warmup": 2,
         "eval_every": 0, "checkpoint_every": 2, "val_rows": 16, "time_budget_s": 2700},
        {"stage": "ar-refit", "steps": 240, "batch_size": 16, "lr": 1e-4, "warmup": 5, "eval_every": 80,
         "checkpoint_every": 20, "val_rows": 168},
    ],
}


def _print(rec: dict) -> None:
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}), flush=True)


def _init_distributed() -> bool:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPUs."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def main(argv: list[str] | None = None) -> int:
    import torch

    from . import (TrainConfig, build_dataset, evaluate_nla, explain_text, format_table, load_nla,
                   train_stage)
    from .train import STAGES, world

    ap = argparse.ArgumentParser(prog="python -m thoughtscope.nla", description=__doc__)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="harvest rows + warm-start explanations")
    d.add_argument("--model", default="default")
    d.add_argument("--out", required=True)
    d.add_argument("--corpus", default="default")
    d.add_argument("--site", default=None)
    d.add_argument("--n-rows", type=int, default=1600)
    d.add_argument("--positions-per-doc", type=int, default=4)
    d.add_argument("--max-position", type=int, default=72)
    d.add_argument("--warm-start", choices=["offline", "llm"], default="offline")
    d.add_argument("--llm-endpoint", default=None)
    d.add_argument("--llm-model", default=None)
    t = sub.add_parser("train", help="one stage: ar-sft | av-sft | rl | ar-refit (resumable)")
    t.add_argument("--nla", required=True)
    t.add_argument("--data", required=True)
    t.add_argument("--stage", required=True, choices=list(STAGES))
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--time-budget-s", type=float, default=None)
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: this rank's GPU if any, else cpu)")
    e = sub.add_parser("explain", help="explain tokens of a text")
    e.add_argument("--nla", default="default")
    e.add_argument("--text", required=True)
    e.add_argument("--position", type=int, action="append", default=None)
    e.add_argument("--samples", type=int, default=1)
    v = sub.add_parser("eval", help="held-out FVE + baseline ladder")
    v.add_argument("--nla", "--model", dest="nla", default="default",
                   help="'default' (the shipped NLA for the default model) or an NLA folder")
    v.add_argument("--data", default=None)
    size = v.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="48 held-out rows, a few minutes on 2 cores (default)")
    size.add_argument("--full", action="store_true", help="the whole test split instead of the quick 48 rows")
    size.add_argument("--n-test", type=int, default=None,
                      help="this many held-out rows (narrower confidence intervals, longer run)")
    v.add_argument("--compare", action="append", default=[], metavar="NAME=FOLDER",
                   help="another NLA folder evaluated on the same held-out vectors as an extra rung")
    v.add_argument("--json", default=None)
    r = sub.add_parser("recipe", help="reproduce the shipped default NLA end to end")
    r.add_argument("--work", required=True, help="folder for data, checkpoints and the eval json")
    r.add_argument("--export", default=None, help="copy the final adapters here (e.g. the assets folder)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.cmd == "data":
        print(build_dataset(args.model, args.out, corpus=args.corpus, site=args.site, n_rows=args.n_rows,
                            positions_per_doc=args.positions_per_doc, max_position=args.max_position,
                            warm_start=args.warm_start, llm_endpoint=args.llm_endpoint, llm_model=args.llm_model))
    elif args.cmd == "train":
        base = next((s for s in DEFAULT_RECIPE["stages"] if s["stage"] == args.stage), {"stage": args.stage})
        over = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "time_budget_s")
                if getattr(args, k) is not None}
        distributed = _init_distributed()
        try:
            r_ = train_stage(args.nla, args.data, TrainConfig(**{**base, **over}), log=_print, device=args.device)
            if world()[0] == 0:
                print(f"stage {args.stage}: step {r_['step']}, done={r_['done']}")
        finally:
            if distributed:
                import torch.distributed as dist

                dist.destroy_process_group()
    elif args.cmd == "explain":
        nla = load_nla(args.nla)
        for row in explain_text(nla, args.text, args.position or [-1], samples=args.samples):
            print(f"[{row['position']}] {row['token']!r}  FVE {row['fve']:+.2f}  {row['explanation']}")
    elif args.cmd == "eval":
        compare = {}
        for item in args.compare:
            name, sep, folder = item.partition("=")
            if not sep or not name or not folder:
                ap.error(f"--compare takes NAME=FOLDER, got {item!r}")
            compare[name] = folder
        res = evaluate_nla(args.nla, args.data, quick=not (args.full or args.n_test), n_test=args.n_test,
                           json_path=args.json, compare=compare)
        print(format_table(res))
    elif args.cmd == "recipe":
        work = Path(args.work)
        data = work / "data"
        if not (data / "meta.json").is_file():
            build_dataset("default", data, **DEFAULT_RECIPE["data"])
        for st in DEFAULT_RECIPE["stages"]:
            t0 = time.time()
            r_ = train_stage(work / "nla", data, TrainConfig(**st), log=_print, progress=False)
            print(f"== {st['stage']} step {r_['step']} done={r_['done']} {time.time() - t0:.0f}s", flush=True)
        res = evaluate_nla(str(work / "nla"), data, quick=False, json_path=work / "eval.json")
        print(format_table(res))
        if args.export:
            export(work / "nla", Path(args.export), data)
    return 0


def export(src: Path, dest: Path, data: Path | None = None) -> None:
    """Copy the shippable files of an NLA folder (config + adapters, no optimiser state) and the baseline rows."""
    import shutil

    from .data import NLARows
    from .evaluate import BASELINE_FILE, save_baseline_rows

    dest.mkdir(parents=True, exist_ok=True)
    for name in ("nla_config.json", "av.safetensors", "ar.safetensors", "warm_av.safetensors", "warm_ar.safetensors",
                 "rl_ar.safetensors"):
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
    if data is not None:
        save_baseline_rows(NLARows.load(data), dest / BASELINE_FILE)


if __name__ == "__main__":
    sys.exit(main())
