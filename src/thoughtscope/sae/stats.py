"""Per-feature statistics stored beside an SAE's weights: the one reference for "× max".

A slider value like "2× max" is only meaningful if every call means the same max. The max over a
handful of search texts can be half the max over a corpus, so the reference is measured once, over a
corpus, with the SAE's own exclusion rule, and saved in the SAE folder as ``feature_stats.safetensors``
(``max_act`` and ``frequency`` per feature; metadata ``source`` says what it was measured on). Loading an
SAE attaches it as ``sae.feature_stats``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .._io import atomic_save_tensors
from ..errors import SAEError

STATS_FILE = "feature_stats.safetensors"


@dataclass
class FeatureStats:
    max_act: torch.Tensor  # [n_features] largest activation seen
    frequency: torch.Tensor  # [n_features] share of tokens where the feature fires
    source: str  # what it was measured on, in words
    n_tokens: int

    def describe(self, feature: int) -> str:
        return (
            f"feature {feature}: max {float(self.max_act[feature]):.4g} over {self.n_tokens:,} tokens of "
            f"{self.source} (fires on {100 * float(self.frequency[feature]):.3g} % of them)"
        )


def save_feature_stats(stats: FeatureStats, sae_dir: str | Path) -> Path:
    meta = {"source": stats.source, "n_tokens": str(int(stats.n_tokens))}
    return atomic_save_tensors(
        {"max_act": stats.max_act.float().cpu(), "frequency": stats.frequency.float().cpu()},
        Path(sae_dir) / STATS_FILE,
        metadata=meta,
    )


def read_feature_stats(sae_dir: str | Path, n_features: int) -> FeatureStats | None:
    """The folder's stored statistics, or None when it has none; a file that does not fit is an error."""
    path = Path(sae_dir) / STATS_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError, OverflowError) as e:
        raise SAEError(f"{path}: not a readable feature-statistics file ({e})") from None
    for key in ("max_act", "frequency"):
        if key not in t or tuple(t[key].shape) != (n_features,):
            got = tuple(t[key].shape) if key in t else "missing"
            raise SAEError(
                f"{path}: expected '{key}' of shape ({n_features},), got {got}; "
                f"re-measure with 'thoughtscope features stats'"
            )
        if not t[key].is_floating_point() or not bool(torch.isfinite(t[key].float()).all()):
            raise SAEError(
                f"{path}: '{key}' is not finite floating-point numbers; re-measure with 'thoughtscope features stats'"
            )
    try:
        n = int(meta.get("n_tokens", "0"))
    except ValueError:
        n = 0
    return FeatureStats(t["max_act"].float(), t["frequency"].float(), meta.get("source", "unknown"), n)


def stats_to_json(stats: FeatureStats) -> str:
    return json.dumps({"source": stats.source, "n_tokens": stats.n_tokens})
