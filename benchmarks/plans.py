"""The plan before a long run against the run itself, on the default model (SmolLM2): harvest and SAE training.

For each job two fresh processes run one after the other: one loads the model and makes the plan
(`thoughtscope.estimates`: a few seconds of the real job, extrapolated), the other loads the model and runs the
whole job. The second reports its peak RSS (VmHWM, model load included, as the plan's is), the wall time of the
job after the model is loaded (the plan's time covers the same span) and the bytes it wrote. The ratio
estimated / measured is printed for each; the acceptance bar is within 2× on memory and time. Disk compares what
the run leaves (the SAE's resumable checkpoint is scratch, gone when the SAE is saved).

    python benchmarks/plans.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SITE = "resid.15"
GRID = dict(arch=["topk"], k=[32], expansion=[16], l1_coeff=[5.0], l0_coeff=[1.0])


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _child(job: str, mode: str, store: str, sae: str, tokens: int, sae_epochs: int) -> dict:
    """One process's work: `plan` or `run` the job; what it measured."""
    from thoughtscope.corpus import Corpus
    from thoughtscope.estimates import harvest_estimate, peak_rss, sae_estimate
    from thoughtscope.harvest import harvest
    from thoughtscope.models import load_model
    from thoughtscope.plans import HarvestConfig
    from thoughtscope.sae.config import TrainConfig
    from thoughtscope.sae.run import train_grid

    hcfg = HarvestConfig(n_tokens=tokens)
    tc = TrainConfig(epochs=sae_epochs, progress=False)
    if job == "harvest":
        lm = load_model("default")
        t = time.perf_counter()
        if mode == "plan":
            return harvest_estimate(lm, Corpus("default"), [SITE], hcfg).to_dict()
        harvest(lm, Corpus("default"), [SITE], store, hcfg, progress=False)
        return {"seconds": time.perf_counter() - t, "peak_rss": peak_rss(), "disk": _bytes(Path(store))}
    if mode == "plan":
        return sae_estimate(store=store, grid=GRID, train_cfg=tc).to_dict()
    t = time.perf_counter()
    train_grid(sae, store=store, grid=GRID, train_cfg=tc)
    return {"seconds": time.perf_counter() - t, "peak_rss": peak_rss(), "disk": _bytes(Path(sae))}


def _spawn(*args) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise SystemExit(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(job: str, store: Path, sae: Path, tokens: int, sae_epochs: int) -> dict:
    plan = _spawn(job, "plan", store, sae, tokens, sae_epochs)
    run = _spawn(job, "run", store, sae, tokens, sae_epochs)
    row = {
        "job": job,
        "estimated_memory": plan["memory_bytes"],
        "measured_peak_rss": run["peak_rss"],
        "memory_ratio": plan["memory_bytes"] / run["peak_rss"],
        "estimated_seconds": plan["seconds"],
        "measured_seconds": run["seconds"],
        "time_ratio": plan["seconds"] / run["seconds"],
        "estimated_disk": plan["disk_bytes"],
        "measured_disk": run["disk"],
        "disk_ratio": plan["disk_bytes"] / max(1, run["disk"]),
        "timing": plan["timing"],
    }
    row["within_2x"] = all(0.5 <= row[k] <= 2.0 for k in ("memory_ratio", "time_ratio"))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="16k harvested tokens, an SAE trained on them for 3 epochs (~3 min)"
    )
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        job, mode, store, sae, tokens, sae_epochs = args.child
        print(json.dumps(_child(job, mode, store, sae, int(tokens), int(sae_epochs))))
        return
    tokens = 16_384 if args.quick else 131_072
    sae_epochs = 3 if args.quick else 2
    tmp = Path(tempfile.mkdtemp(prefix="thoughtscope-plans-"))
    try:
        rows = [compare(job, tmp / "store", tmp / "sae", tokens, sae_epochs) for job in ("harvest", "sae train")]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for r in rows:
        print(
            f"{r['job']:>10}: memory {r['estimated_memory'] / 2**20:.0f} MB est. / {r['measured_peak_rss'] / 2**20:.0f}"
            f" MB peak RSS = {r['memory_ratio']:.2f}×; time {r['estimated_seconds']:.1f} s / "
            f"{r['measured_seconds']:.1f} s = {r['time_ratio']:.2f}×; disk {r['disk_ratio']:.3f}×; "
            f"{'within 2×' if r['within_2x'] else 'OUTSIDE 2×'}"
        )
    result = {
        "model": "default",
        "site": SITE,
        "harvest_tokens": tokens,
        "sae_epochs": sae_epochs,
        "sae": {k: v[0] for k, v in GRID.items() if k in ("arch", "k", "expansion")},
        "rows": rows,
        "all_within_2x": all(r["within_2x"] for r in rows),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
