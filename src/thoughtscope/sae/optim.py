"""The optimiser side of SAE training: Adam, each architecture's default learning rate, the LR schedule."""

from __future__ import annotations

import torch

from .config import SAEConfig
from .registry import sae_class


def default_lr(cfg: SAEConfig) -> float:
    """The architecture's own default (SAE.default_lr), used when TrainConfig.lr is None."""
    return sae_class(cfg.arch).default_lr(cfg)


def adam(params, lr: float, betas: tuple[float, float], device: torch.device) -> torch.optim.Optimizer:
    """Adam, fused where torch has a fused kernel: on CPU the default per-tensor loop costs several times more
    per step for an SAE's millions of parameters (memory-bound passes the fused kernel does in one)."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=fused or None)


def lr_factor(step: int, n_steps: int, warmup_frac: float, decay_frac: float) -> float:
    """Multiplier of the base LR at step: linear warm-up over warmup_frac of the run, linear decay to 0 over
    its last decay_frac, constant between."""
    warm = max(1, int(warmup_frac * n_steps))
    if step < warm:
        return (step + 1) / warm
    decay_start = int(n_steps * (1 - decay_frac))
    if step >= decay_start and decay_frac > 0:
        return max(0.0, (n_steps - step) / max(1, n_steps - decay_start))
    return 1.0
