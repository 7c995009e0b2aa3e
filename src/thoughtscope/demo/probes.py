"""The probe demo: sweep the shipped comparisons set over the default model's layers and save the plot."""

from __future__ import annotations

import time
from pathlib import Path

from ..probes.config import ReadConfig, SweepConfig
from ..probes.generators import comparisons
from ..probes.report import print_sweep
from ..probes.sweep import plot, save_json, sweep

QUICK_SITES = [f"resid.{i}" for i in range(0, 30, 3)] + ["resid.29"]


def probe_demo(lm, out: str | Path, console=None, *, quick: bool = True, cache=None) -> dict:
    """Quick: 160 statements, 11 sites, mean-difference and LDA; full: 600 statements, all 30 blocks, 4 fitters."""
    out = Path(out)
    t0 = time.perf_counter()
    ds = comparisons(n=160 if quick else 600)
    sites = QUICK_SITES if quick else [f"resid.{i}" for i in range(lm.n_layers)]
    sites = [s for s in sites if int(s.split(".")[1]) < lm.n_layers]
    cfg = SweepConfig(
        fitters=("mean", "lda") if quick else ("mean", "lda", "logistic", "lat"),
        n_random=100 if quick else 200,
        n_shuffle=5 if quick else 10,
    )
    res = sweep(lm, ds, sites, ReadConfig(), cfg, cache=cache, progress=console is not None)
    save_json(res, out / "probe_sweep.json")
    plot(res, out / "probe_sweep.png")
    res["seconds"] = time.perf_counter() - t0
    if console is not None:
        print_sweep(res, console)
        console.print(
            f"plot → {out / 'probe_sweep.png'}; every number in {out / 'probe_sweep.json'} "
            f"({res['seconds']:.0f} s). Controls: random directions, label shuffle, a control task with "
            f"random labels per first number (selectivity = task − control), the embedding layer."
        )
    return res
