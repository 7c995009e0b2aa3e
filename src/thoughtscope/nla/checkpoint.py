"""Resuming an NLA training stage: the state file ``<nla>/train_state/<stage>.pt`` and the weights each stage publishes.

The state holds the step, the history, the stage's config, the optimiser state(s) and the trainable weights; it
is written atomically, so an interrupted stage resumes from its last checkpoint on the same trajectory. Saving
also publishes the weights later stages and `nla eval` read (`ar.safetensors`, `av.safetensors` and, when a
supervised stage finishes or stops on its time budget, its warm-start copy; `ar-refit-warm` publishes only
`warm_refit_ar.safetensors`).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from .._io import atomic_torch_save, atomic_write_text
from .bundle import AR_FILE, AV_FILE, NLA, WARM_AR_FILE, WARM_AV_FILE, WARM_REFIT_AR_FILE, save_weights
from .config import RL_STAGES, NLATrainConfig
from .core import NLAError

__all__ = ["RL_STAGES", "load_state", "save_state", "state_path"]


def state_path(nla_dir: Path, stage: str) -> Path:
    return nla_dir / "train_state" / f"{stage}.pt"


def load_state(nla_dir: Path, cfg: NLATrainConfig, nla: NLA, opt, ar_opt) -> tuple[int, list[dict]]:
    """Restore a stage's weights and optimiser(s) from its state file; (step, history), or (0, []) on a fresh start."""
    sp = state_path(nla_dir, cfg.stage)
    if not sp.is_file():
        return 0, []
    st = torch.load(sp, weights_only=False, map_location=nla.ar.device)
    if st["config"]["seed"] != cfg.seed or st["config"]["batch_size"] != cfg.batch_size:
        raise NLAError(f"{sp} was written with a different seed/batch size; delete it to start over")
    if "av" in st:
        nla.av.load_adapter_state(st["av"])
    if "ar" in st:
        nla.ar.load_adapter_state(st["ar"])
    opt.load_state_dict(st["opt"])
    if ar_opt is not None and "ar_opt" in st:
        ar_opt.load_state_dict(st["ar_opt"])
    return st["step"], st["history"]


def save_state(
    nla_dir: Path,
    cfg: NLATrainConfig,
    nla: NLA,
    opt,
    ar_opt,
    step: int,
    history: list[dict],
    *,
    done: bool,
    stopped: bool = False,
) -> None:
    """Write the stage's state file and history, and publish its weights (rank 0 only: the caller checks)."""
    st = {"step": step, "history": history, "config": asdict(cfg), "opt": opt.state_dict(), "done": done}
    if cfg.stage in ("av-sft", *RL_STAGES):
        st["av"] = {k: v.detach().clone() for k, v in nla.av.adapter_state().items()}
    if cfg.stage in ("ar-sft", *RL_STAGES, "ar-refit", "ar-refit-warm"):
        st["ar"] = {k: v.detach().clone() for k, v in nla.ar.adapter_state().items()}
    if ar_opt is not None:
        st["ar_opt"] = ar_opt.state_dict()
    atomic_torch_save(st, state_path(nla_dir, cfg.stage))
    # publish the weights so later stages and `nla eval` can use them
    if cfg.stage == "ar-sft":
        save_weights(nla.ar.adapter_state(), nla_dir / AR_FILE)
        if done or stopped:  # a budget-stopped stage still hands its weights to the next stage
            save_weights(nla.ar.adapter_state(), nla_dir / WARM_AR_FILE)
    elif cfg.stage == "av-sft":
        save_weights(nla.av.adapter_state(), nla_dir / AV_FILE)
        if done or stopped:
            save_weights(nla.av.adapter_state(), nla_dir / WARM_AV_FILE)
    elif cfg.stage == "ar-refit":
        save_weights(nla.ar.adapter_state(), nla_dir / AR_FILE)
    elif cfg.stage == "ar-refit-warm":  # the control: av/ar and the warm weights stay as they are
        save_weights(nla.ar.adapter_state(), nla_dir / WARM_REFIT_AR_FILE)
    else:  # rl, rl-continue
        save_weights(nla.av.adapter_state(), nla_dir / AV_FILE)
        save_weights(nla.ar.adapter_state(), nla_dir / AR_FILE)
    atomic_write_text(nla_dir / "train_state" / f"{cfg.stage}.history.json", json.dumps(history, indent=1))
