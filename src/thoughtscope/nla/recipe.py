"""The recipe that produced the shipped default NLA, and how to run it end to end or one stage at a time.

`thoughtscope nla recipe` reproduces src/thoughtscope/assets/default_nla (data → ar-sft → av-sft → rl → ar-refit →
ar-refit-warm → eval → export) with the exact sizes and time budgets used for the shipped artefact (see
docs/nla.md). The stage settings here are also the defaults of `thoughtscope nla train --stage ...`, so the two
cannot drift apart.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

# Measured on 2 shared CPU cores; one thread, two for ar-refit.
_AR_REFIT = {
    "stage": "ar-refit",
    "steps": 240,
    "batch_size": 16,
    "lr": 1e-4,
    "warmup": 5,
    "eval_every": 80,
    "checkpoint_every": 20,
    "val_rows": 168,
}
DEFAULT_RECIPE = {
    "data": {"n_rows": 1600, "positions_per_doc": 4, "max_position": 72},
    "stages": [
        {
            "stage": "ar-sft",
            "steps": 150,
            "batch_size": 8,
            "lr": 1e-3,
            "eval_every": 25,
            "checkpoint_every": 10,
            "time_budget_s": 720,
        },
        {
            "stage": "av-sft",
            "steps": 400,
            "batch_size": 4,
            "lr": 1e-3,
            "warmup": 10,
            "eval_every": 50,
            "checkpoint_every": 10,
            "val_rows": 32,
            "time_budget_s": 3000,
        },
        {
            "stage": "rl",
            "steps": 80,
            "batch_size": 4,
            "group_size": 4,
            "lr": 1e-4,
            "ar_lr": 1e-4,
            "warmup": 2,
            "eval_every": 0,
            "checkpoint_every": 2,
            "val_rows": 16,
            "time_budget_s": 2700,
        },
        _AR_REFIT,
        # the control: the same refit for the warm start (warm AV's explanations, from the warm AR)
        {**_AR_REFIT, "stage": "ar-refit-warm"},
    ],
}


def stage_settings(stage: str, **overrides) -> dict:
    """The recipe's settings for one stage with the given (non-None) values on top."""
    base = next((s for s in DEFAULT_RECIPE["stages"] if s["stage"] == stage), {"stage": stage})
    return {**base, **{k: v for k, v in overrides.items() if v is not None}}


def print_record(rec: dict) -> None:
    """One JSON line per training record, floats rounded, flushed (readable in logs and by tools)."""
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}), flush=True)


def run_recipe(
    work: str | os.PathLike, export_to: str | os.PathLike | None = None, log: Callable[[dict], None] = print_record
) -> dict:
    """Every stage of DEFAULT_RECIPE in `work` (resumable: finished stages return at once), then the full eval."""
    from .data import build_dataset
    from .evaluate import evaluate_nla
    from .train import TrainConfig, train_stage

    work = Path(work)
    data = work / "data"
    if not (data / "meta.json").is_file():
        build_dataset("default", data, **DEFAULT_RECIPE["data"])
    for st in DEFAULT_RECIPE["stages"]:
        t0 = time.time()
        r = train_stage(work / "nla", data, TrainConfig(**st), log=log, progress=False)
        print(f"== {st['stage']} step {r['step']} done={r['done']} {time.time() - t0:.0f}s", flush=True)
    res = evaluate_nla(str(work / "nla"), data, quick=False, json_path=work / "eval.json")
    if export_to:
        export(work / "nla", Path(export_to), data)
    return res


def export(src: Path, dest: Path, data: Path | None = None) -> None:
    """Copy the shippable files of an NLA folder (config + adapters, no optimiser state) and the baseline rows."""
    from .data import NLARows
    from .evaluate import BASELINE_FILE, save_baseline_rows

    dest.mkdir(parents=True, exist_ok=True)
    for name in (
        "nla_config.json",
        "av.safetensors",
        "ar.safetensors",
        "warm_av.safetensors",
        "warm_ar.safetensors",
        "rl_ar.safetensors",
        "warm_refit_ar.safetensors",
    ):
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
    if data is not None:
        save_baseline_rows(NLARows.load(data), dest / BASELINE_FILE)
