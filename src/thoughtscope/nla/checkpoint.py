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
from ..values import is_finite as _finite
from .bundle import (
    AR_FILE,
    AV_FILE,
    NLA,
    WARM_AR_FILE,
    WARM_AV_FILE,
    WARM_REFIT_AR_FILE,
    check_adapter_state,
    save_weights,
)
from .config import RL_STAGES, NLATrainConfig
from .core import NLAError

__all__ = ["RL_STAGES", "load_state", "save_state", "state_path"]


def state_path(nla_dir: Path, stage: str) -> Path:
    return nla_dir / "train_state" / f"{stage}.pt"


def load_state(nla_dir: Path, cfg: NLATrainConfig, nla: NLA, opt, ar_opt) -> tuple[int, list[dict]]:
    """Restore a stage's weights and optimiser(s) from its state file; (step, history), or (0, []) on a fresh start.

    Everything is checked before the run goes on from it (a weights-only load: tensors, numbers and containers,
    never code); a state that is damaged or was written for another stage setting is an NLAError naming the file.
    """
    sp = state_path(nla_dir, cfg.stage)
    if not sp.is_file():
        return 0, []
    again = "delete it to start the stage over"
    try:
        st = torch.load(sp, weights_only=True, map_location=nla.ar.device)
    except Exception as e:  # noqa: BLE001 - a damaged pickle or zip raises many types
        raise NLAError(f"{sp}: not a readable training state ({type(e).__name__}: {e}); {again}") from None
    if not isinstance(st, dict):
        raise NLAError(f"{sp}: expected a training state (a dict), got {type(st).__name__}; {again}")
    step, history, conf = st.get("step"), st.get("history"), st.get("config")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise NLAError(f"{sp}: 'step' is {step!r}, expected a step count; {again}")
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise NLAError(f"{sp}: 'history' is not a list of records; {again}")
    if not isinstance(conf, dict) or not isinstance(st.get("opt"), dict):
        raise NLAError(f"{sp}: the state lacks its config or optimiser state; {again}")
    if conf.get("seed") != cfg.seed or conf.get("batch_size") != cfg.batch_size:
        raise NLAError(f"{sp} was written with a different seed/batch size; delete it to start over")
    weights = {
        label: check_adapter_state(module, st[key], sp, label)
        for key, module, label in (("av", nla.av, "AV"), ("ar", nla.ar, "AR"))
        if key in st
    }
    _load_optimiser(opt, st["opt"], sp, "optimiser")
    if ar_opt is not None and "ar_opt" in st:
        _load_optimiser(ar_opt, st["ar_opt"], sp, "AR optimiser")
    if "AV" in weights:
        nla.av.load_adapter_state(weights["AV"])
    if "AR" in weights:
        nla.ar.load_adapter_state(weights["AR"])
    return step, history


def _same_kind(a, b) -> bool:
    """b can stand where a stood in an optimiser's settings: a finite number for a number, a flag for a flag,
    numbers of the same count for a tuple (betas)."""
    num = _finite
    if a is None or isinstance(a, bool):
        return b is None or isinstance(b, bool)
    if num(a):
        return num(b)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_same_kind(x, y) for x, y in zip(a, b))
    return type(a) is type(b)


def _load_optimiser(opt, state, sp: Path, label: str) -> None:
    """opt.load_state_dict(state), then every per-parameter tensor checked against its parameter (torch checks
    the groups but not the moments' shapes, which would fail at the next step instead)."""
    before = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    try:
        opt.load_state_dict(state)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError, AttributeError) as e:
        raise NLAError(f"{sp}: the {label} state does not fit this stage ({type(e).__name__}: {e})") from None
    for old, group in zip(before, opt.param_groups):
        for k, v in group.items():
            if k != "params" and k in old and not _same_kind(old[k], v):
                raise NLAError(f"{sp}: the {label} setting {k!r} is {v!r:.60}, expected a value like {old[k]!r}")
        # the ranges AdamW's constructor insists on (loading a state dict does not check them)
        betas = group.get("betas", ())
        if any(group.get(k, 0) < 0 for k in ("lr", "eps", "weight_decay")) or not all(0 <= b < 1 for b in betas):
            raise NLAError(
                f"{sp}: the {label} settings are out of range (lr {group.get('lr')!r}, betas {betas!r}, "
                f"eps {group.get('eps')!r}, weight_decay {group.get('weight_decay')!r})"
            )
    states = [opt.state[p] for g in opt.param_groups for p in g["params"] if p in opt.state]
    if not all(isinstance(st, dict) for st in states):
        raise NLAError(f"{sp}: the {label} state of a parameter is not a record of its moments")
    states = [st for st in states if st]
    keys = set().union(*(st.keys() for st in states)) if states else set()
    for st in states:  # the moments every parameter's state holds (one damaged record would fail at the next step)
        if set(st) != keys:
            raise NLAError(
                f"{sp}: the {label} state of one parameter has {sorted(map(str, st))}, others {sorted(keys)}"
            )
    for group in opt.param_groups:
        for p in group["params"]:
            for k, t in opt.state.get(p, {}).items():
                # AdamW: a step count (a number or a one-number tensor) and moments shaped like the parameter
                scalar = k == "step"
                if scalar and _finite(t) and t >= 0:
                    continue
                if not isinstance(t, torch.Tensor):
                    raise NLAError(f"{sp}: the {label} state {k!r} is {t!r:.60}, expected a tensor")
                want = () if scalar else tuple(p.shape)
                if tuple(t.shape) != want:
                    raise NLAError(f"{sp}: the {label} state {k!r} has shape {tuple(t.shape)}, expected {want}")
                if (
                    not (t.is_floating_point() or scalar and t.dtype == torch.int64)
                    or not bool(torch.isfinite(t.float()).all())
                    or scalar
                    and float(t) < 0
                ):
                    raise NLAError(f"{sp}: the {label} state {k!r} is not finite numbers (NaN, Inf or wrong type)")


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
    """Publish the stage's weights and history, then write its state file, the step's commit (rank 0 only: the
    caller checks; the caller writes the curves before)."""
    st = {"step": step, "history": history, "config": asdict(cfg), "opt": opt.state_dict(), "done": done}
    if cfg.stage in ("av-sft", *RL_STAGES):
        st["av"] = {k: v.detach().clone() for k, v in nla.av.adapter_state().items()}
    if cfg.stage in ("ar-sft", *RL_STAGES, "ar-refit", "ar-refit-warm"):
        st["ar"] = {k: v.detach().clone() for k, v in nla.ar.adapter_state().items()}
    if ar_opt is not None:
        st["ar_opt"] = ar_opt.state_dict()
    # publish the weights (later stages and `nla eval` read them) and the history first, the state file last: the
    # state file is what says a step is committed, so a run killed in between redoes the step and publishes again
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
    atomic_torch_save(st, state_path(nla_dir, cfg.stage))
