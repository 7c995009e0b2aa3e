"""Sparse autoencoders: architectures, training (sweeps, resume, DDP), metrics and file formats.

Names load on first use (PEP 562), so ``thoughtscope.sae.config`` (what the CLI reads its defaults from) does
not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "ARCHITECTURES": "architectures",
    "SAE": "base",
    "SAEOutput": "base",
    "build_sae": "base",
    "register_sae_class": "registry",
    "sae_class": "registry",
    "SAEConfig": "config",
    "SAEError": "config",
    "TrainConfig": "config",
    "ReluL1SAE": "relu_l1",
    "TopKSAE": "topk",
    "BatchTopKSAE": "batchtopk",
    "MatryoshkaSAE": "matryoshka",
    "JumpReLUSAE": "jumprelu",
    "save_sae": "formats",
    "load_sae": "formats",
    "export_saelens": "formats",
    "load_saelens": "formats",
    "load_sparsify": "formats",
    "load_dictionary_learning": "formats",
    "evaluate_sae": "metrics",
    "spliced_lm_loss": "metrics",
    "spliced_losses": "metrics",
    "Trainer": "train",
    "TrainingDiverged": "train",
    "train_sae": "train",
    "train_saes": "train",
    "default_dead_tokens": "train",
    "geometric_median": "train",
}

__all__ = [
    "ARCHITECTURES",
    "BatchTopKSAE",
    "JumpReLUSAE",
    "MatryoshkaSAE",
    "ReluL1SAE",
    "SAE",
    "SAEConfig",
    "SAEError",
    "SAEOutput",
    "TopKSAE",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "build_sae",
    "default_dead_tokens",
    "evaluate_sae",
    "export_saelens",
    "geometric_median",
    "load_dictionary_learning",
    "load_sae",
    "load_saelens",
    "load_sparsify",
    "register_sae_class",
    "sae_class",
    "save_sae",
    "spliced_lm_loss",
    "spliced_losses",
    "train_sae",
    "train_saes",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


if TYPE_CHECKING:
    from .architectures import ARCHITECTURES
    from .base import SAE, SAEOutput, build_sae
    from .batchtopk import BatchTopKSAE
    from .config import SAEConfig, SAEError, TrainConfig
    from .formats import export_saelens, load_dictionary_learning, load_sae, load_saelens, load_sparsify, save_sae
    from .jumprelu import JumpReLUSAE
    from .metrics import evaluate_sae, spliced_lm_loss, spliced_losses
    from .registry import register_sae_class, sae_class
    from .relu_l1 import ReluL1SAE
    from .topk import TopKSAE
    from .train import Trainer, TrainingDiverged, default_dead_tokens, geometric_median, train_sae, train_saes
