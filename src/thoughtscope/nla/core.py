"""Shared pieces of a Natural Language Autoencoder: the √d normalisation, the loss, the site rule; the config
(`config.py`) and the error class (`errors.py`) re-exported from their homes.

An NLA is two copies of a frozen target model: the *verbalizer* (AV) reads one activation vector
(injected in place of a marker token's embedding) and writes an explanation; the *reconstructor*
(AR) reads only that explanation and predicts the vector back. Everything both halves must agree on
lives in :class:`NLAConfig`, which is saved next to the weights as ``nla_config.json``.
"""

from __future__ import annotations

import math

import torch

from ..errors import NLAError
from .config import CONFIG_NAME, NLAConfig

__all__ = [
    "CONFIG_NAME",
    "NLAConfig",
    "NLAError",
    "check_vectors",
    "default_site",
    "nla_loss",
    "normalise",
    "round_scale",
]


def default_site(n_layers: int) -> str:
    """Two-thirds of the depth, as in the published recipe: (2·L)//3 (20 for a 30-block model)."""
    return f"resid.{(2 * n_layers) // 3}"


def round_scale(mean_norm: float) -> float:
    """A round number just above the mean norm: the published rule for injection_scale."""
    if mean_norm <= 0:
        raise NLAError(f"mean activation norm must be positive, got {mean_norm}")
    step = 10 ** math.floor(math.log10(mean_norm))
    for mult in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if mult * step > mean_norm:
            return float(mult * step)
    return float(10 * step)


def check_vectors(v: torch.Tensor, d_model: int, what: str = "vector") -> torch.Tensor:
    """Accept [d] or [N, d]; anything else (or a different d) is an error naming both sizes."""
    if not isinstance(v, torch.Tensor):
        v = torch.as_tensor(v)
    if v.dim() == 1:
        v = v[None]
    if v.dim() != 2 or v.shape[-1] != d_model:
        raise NLAError(
            f"{what} has shape {tuple(v.shape)}; expected [{d_model}] or [N, {d_model}] (the target model's d_model)"
        )
    if not torch.isfinite(v).all():
        raise NLAError(f"{what} contains NaN or infinite values")
    return v.float()


def normalise(v: torch.Tensor) -> torch.Tensor:
    """Rescale each vector to norm √d, the scale at which the NLA loss and FVE are measured."""
    d = v.shape[-1]
    return v * (math.sqrt(d) / v.norm(dim=-1, keepdim=True).clamp_min(1e-8))


def nla_loss(pred: torch.Tensor, gold: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """MSE per element between both vectors rescaled to √d; equals 2(1 − cos) exactly."""
    per_row = (normalise(pred) - normalise(gold)).pow(2).mean(-1)
    return per_row.mean() if reduction == "mean" else per_row
