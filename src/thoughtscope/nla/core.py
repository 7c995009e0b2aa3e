"""Shared pieces of a Natural Language Autoencoder: its config, the √d normalisation, the loss, errors.

An NLA is two copies of a frozen target model: the *verbalizer* (AV) reads one activation vector
(injected in place of a marker token's embedding) and writes an explanation; the *reconstructor*
(AR) reads only that explanation and predicts the vector back. Everything both halves must agree on
lives in :class:`NLAConfig`, which is saved next to the weights as ``nla_config.json``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from .._io import atomic_write_text
from ..errors import NLAError  # noqa: F401  (re-exported: their old home)

CONFIG_NAME = "nla_config.json"


@dataclass
class NLAConfig:
    """Everything the AV and AR must agree on; saved as nla_config.json beside the weights."""

    model: str = "default"  # target model spec (thoughtscope.models.load_model)
    site: str = "resid.20"  # output of block K (= hidden_states[K+1]); K ≈ 2/3 of depth
    d_model: int = 576
    n_layers: int = 30
    # --- verbalizer (AV)
    marker: str = "<empty_output>"  # one token whose input embedding is replaced by the vector
    marker_id: int = 16
    injection_scale: float = 0.0  # vectors are rescaled to this L2 norm before injection
    system_prompt: str = "Describe the vector."
    av_template: str = "<concept>{marker}</concept>"  # user turn; must contain {marker} exactly once
    response_prefix: str = "<explanation>"  # forced start of the answer (part of the prompt)
    response_suffix: str = "</explanation>"  # the answer is complete only when this appears
    max_new_tokens: int = 48
    # --- reconstructor (AR)
    ar_prefix: str = "Summary: "
    ar_suffix: str = ""  # empty: the AR reads the explanation's own last token (see docs)
    max_explanation_tokens: int = 64  # longer explanations are an error for the AR
    # --- data statistics, measured by `nla data`
    mean_norm: float = 0.0
    mu_sq: float = 0.0  # ‖μ‖² of the unit-normalised vectors; Var = 1 − mu_sq
    warm_start: dict = field(default_factory=dict)  # which explanations the warm start used
    # --- adapters
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list = field(default_factory=lambda: ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    extra: dict = field(default_factory=dict)

    @property
    def layer(self) -> int:
        from thoughtscope.models import Site

        return Site.parse(self.site).layer

    def check(self) -> NLAConfig:
        if self.av_template.count("{marker}") != 1:
            raise NLAError(f"av_template must contain '{{marker}}' exactly once, got {self.av_template!r}")
        if self.layer >= self.n_layers:
            raise NLAError(
                f"site {self.site} is beyond the model: it has {self.n_layers} blocks (layers 0..{self.n_layers - 1})"
            )
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> NLAConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        if unknown:
            cfg.extra = {**cfg.extra, "unknown_keys": unknown}
        return cfg

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / CONFIG_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> NLAConfig:
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise NLAError(f"{path} not found: an NLA folder holds {CONFIG_NAME} plus adapter weights")
        return cls.from_dict(json.loads(path.read_text()))


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
