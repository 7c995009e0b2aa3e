"""Sparse autoencoders: architectures, training (sweeps, resume, DDP), metrics and file formats."""
from .architectures import (
    ARCHITECTURES,
    SAE,
    BatchTopKSAE,
    JumpReLUSAE,
    ReluL1SAE,
    SAEConfig,
    SAEError,
    SAEOutput,
    TopKSAE,
    build_sae,
    geometric_median,
)
from .formats import export_saelens, load_dictionary_learning, load_sae, load_saelens, load_sparsify, save_sae
from .metrics import evaluate_sae, spliced_lm_loss
from .train import TrainConfig, Trainer, TrainingDiverged, default_dead_tokens, train_sae, train_saes


def _save(self, path, **kw):
    return save_sae(self, path, **kw)


def _load(cls, path, **kw):
    return load_sae(path, **kw)


SAE.save = _save  # type: ignore[attr-defined]
SAE.load = classmethod(_load)  # type: ignore[attr-defined]

__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "SAEError", "SAEOutput", "ReluL1SAE", "TopKSAE", "BatchTopKSAE",
           "JumpReLUSAE", "build_sae", "geometric_median", "save_sae", "load_sae", "export_saelens", "load_saelens",
           "load_sparsify", "load_dictionary_learning", "evaluate_sae", "spliced_lm_loss", "Trainer", "TrainConfig",
           "TrainingDiverged", "train_sae", "train_saes", "default_dead_tokens"]
