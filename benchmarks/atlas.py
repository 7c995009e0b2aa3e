"""Cost of building a feature atlas against harvesting the same tokens, on the default model.

Both contenders do equal reading work: the same context batches of the default corpus (same tokens from
the start of the corpus, same batch size and context length, same torch thread count, one process) through
the same early-exit forward pass. The harvest writes the activations to an on-disk store; the atlas build
encodes them with the SAE and keeps its per-feature statistics (top-k contexts with windows, quantile
reservoir, histograms, random-context sample, periodic checkpoints).

The contenders alternate in rounds (harvest first in even rounds, atlas first in odd ones) and every ratio
is taken within a round, so a change in machine load between rounds favours neither; reported figures are
medians over rounds:

  cost_ratio_vs_harvest      atlas streaming time / harvest time (the per-token cost: target <= 1.3)
  end_to_end_ratio           including the one-off finalisation (logit effects over the vocabulary,
                             decoder neighbours, SQLite writes), which does not grow with the token count
  cpu_ratio                  cost_ratio_vs_harvest in process CPU time (far less sensitive to other jobs)
  overhead_vs_own_forward    atlas streaming time / the forward-pass time inside that same run
  atlas_phases_s             where the atlas streaming time goes (forward, encode, update, checkpoint, setup)

The default SAE (`load_sae("default")`, shipped in src/thoughtscope/assets/default_sae) is used when it
exists; otherwise a freshly initialised topk SAE of the same shape (9216 features, k=32), which costs the same per
token.

    python benchmarks/atlas.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _device import add_device_arg, device_info, sync

from thoughtscope.atlas import AtlasConfig, build_atlas
from thoughtscope.corpus import Corpus
from thoughtscope.harvest import HarvestConfig, harvest
from thoughtscope.models import load_model
from thoughtscope.sae import SAE, SAEConfig, load_sae

PHASES = ("setup_s", "forward_s", "encode_s", "update_s", "checkpoint_s")


def get_sae(lm, site: str):
    """The shipped default SAE (load_sae("default")) when it exists; otherwise a fresh one of the same shape.
    On the model's device."""
    try:
        from thoughtscope.sae.formats import default_sae_path

        if (default_sae_path() / "cfg.json").is_file():
            return load_sae("default", device=lm.device), "default"
    except ImportError:
        pass
    cfg = SAEConfig(arch="topk", d_model=lm.d_model, n_features=9216, k=32, model=lm.name, site=site)
    return SAE.from_config(cfg, seed=0).to(lm.device), "fresh topk 9216 (default SAE not shipped yet)"


def time_harvest(lm, corpus, site, n_tokens, bs, ctx, tmp: Path) -> tuple[float, float]:
    """(wall seconds, process CPU seconds)."""
    out = tmp / f"h{time.perf_counter_ns()}"
    sync(lm.device)
    t, c = time.perf_counter(), time.process_time()
    cfg = HarvestConfig(n_tokens=n_tokens, ctx_len=ctx, contexts_per_batch=bs)
    harvest(lm, corpus, [site], out, cfg, progress=False)
    sync(lm.device)
    dt, dc = time.perf_counter() - t, time.process_time() - c
    shutil.rmtree(out, ignore_errors=True)
    return dt, dc


def time_atlas(lm, sae, corpus, n_tokens, bs, ctx, tmp: Path, stop_after_batches: int | None = None) -> dict:
    out = tmp / f"a{time.perf_counter_ns()}"
    tm: dict = {}
    sync(lm.device)
    t = time.perf_counter()
    c = time.process_time()
    cfg = AtlasConfig(n_tokens=n_tokens, ctx_len=ctx, contexts_per_batch=bs)
    build_atlas(lm, sae, corpus, out, cfg, progress=False, timings=tm, stop_after_batches=stop_after_batches)
    sync(lm.device)
    tm["total_s"] = time.perf_counter() - t
    tm["total_cpu_s"] = time.process_time() - c
    shutil.rmtree(out, ignore_errors=True)
    return tm


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small run (a few minutes on 2 busy cores)")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--site", default="resid.15")
    p.add_argument("--batches", type=int, default=None, help="forward batches per contender (default 6 quick, 32 full)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; ratios are medians over rounds")
    add_device_arg(p)
    args = p.parse_args(argv)
    n_batches = args.batches or (6 if args.quick else 32)
    torch.manual_seed(0)
    lm = load_model("default", device=args.device)
    sae, sae_kind = get_sae(lm, args.site)
    corpus = Corpus("default")
    bs, ctx = args.batch_size, args.ctx_len
    n_tokens = n_batches * bs * ctx
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="ts-bench-atlas-"))
    rounds: list[dict] = []
    try:
        # warm-up of both contenders (corpus reader, model and SAE pages, allocator); the atlas one stops after
        # its first batch so it skips the finalisation
        time_harvest(lm, corpus, args.site, bs * ctx, bs, ctx, tmp)
        time_atlas(lm, sae, corpus, 2 * bs * ctx, bs, ctx, tmp, stop_after_batches=1)
        for i in range(args.rounds):
            r: dict = {"order": "harvest,atlas" if i % 2 == 0 else "atlas,harvest"}
            for who in r["order"].split(","):
                if who == "harvest":
                    r["harvest_s"], r["harvest_cpu_s"] = time_harvest(lm, corpus, args.site, n_tokens, bs, ctx, tmp)
                else:
                    r["atlas"] = time_atlas(lm, sae, corpus, n_tokens, bs, ctx, tmp)
            r["ratio"] = r["atlas"]["stream_s"] / r["harvest_s"]
            r["end_to_end_ratio"] = r["atlas"]["total_s"] / r["harvest_s"]
            r["cpu_ratio"] = r["atlas"]["stream_cpu_s"] / r["harvest_cpu_s"]
            r["end_to_end_cpu_ratio"] = r["atlas"]["total_cpu_s"] / r["harvest_cpu_s"]
            r["overhead_vs_own_forward"] = r["atlas"]["stream_s"] / r["atlas"]["forward_s"]
            rounds.append(r)
            print(
                f"round {i + 1}/{args.rounds} ({r['order']}): harvest {r['harvest_s']:.1f} s, atlas stream "
                f"{r['atlas']['stream_s']:.1f} s -> {r['ratio']:.3f}",
                flush=True,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = statistics.median
    h = med(r["harvest_s"] for r in rounds)
    a = med(r["atlas"]["stream_s"] for r in rounds)
    res = {
        "n_tokens": n_tokens,
        "batch_size": bs,
        "ctx_len": ctx,
        "sae": sae_kind,
        "n_features": sae.cfg.n_features,
        "site": args.site,
        "threads": torch.get_num_threads(),
        **device_info(args.device),
        "quick": args.quick,
        "rounds": args.rounds,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cost_ratio_vs_harvest": med(r["ratio"] for r in rounds),
        "end_to_end_ratio": med(r["end_to_end_ratio"] for r in rounds),
        # robustness checks: process CPU time is far less sensitive to other jobs than wall time, and the
        # atlas's own forward time is measured inside the same run as its bookkeeping
        "cpu_ratio": med(r["cpu_ratio"] for r in rounds),
        "end_to_end_cpu_ratio": med(r["end_to_end_cpu_ratio"] for r in rounds),
        "overhead_vs_own_forward": med(r["overhead_vs_own_forward"] for r in rounds),
        "harvest_s": h,
        "atlas_stream_s": a,
        "finalize_s": med(r["atlas"]["finalize_s"] for r in rounds),
        "harvest_tok_s": n_tokens / h,
        "atlas_tok_s": n_tokens / a,
        "atlas_phases_s": {k: med(r["atlas"][k] for r in rounds) for k in PHASES},
        "per_round": rounds,
    }
    ph = res["atlas_phases_s"]
    print(f"{n_tokens:,} tokens, SAE: {sae_kind}, {res['threads']} threads, median of {args.rounds} alternating rounds")
    print(f"harvest        {h:8.1f} s  ({res['harvest_tok_s']:,.0f} tok/s)")
    print(
        f"atlas stream   {a:8.1f} s  ({res['atlas_tok_s']:,.0f} tok/s): forward {ph['forward_s']:.1f}, encode "
        f"{ph['encode_s']:.1f}, update {ph['update_s']:.1f}, checkpoint {ph['checkpoint_s']:.1f}, "
        f"setup {ph['setup_s']:.1f}"
    )
    print(f"atlas finalize {res['finalize_s']:8.1f} s  (one-off: logit effects, neighbours, SQLite)")
    print(
        f"cost_ratio_vs_harvest {res['cost_ratio_vs_harvest']:.3f}  (target <= 1.3); end to end "
        f"{res['end_to_end_ratio']:.2f} (CPU time {res['end_to_end_cpu_ratio']:.2f}); per round "
        + ", ".join(f"{r['ratio']:.3f}" for r in rounds)
    )
    print(
        f"in process CPU time {res['cpu_ratio']:.3f}; atlas stream / its own forward time "
        f"{res['overhead_vs_own_forward']:.3f}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
    sys.exit(0)
