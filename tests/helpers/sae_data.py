"""Synthetic SAE training data with known ground truth: rows are sparse nonnegative combinations of known unit
directions, so a trained SAE's decoder can be scored against them (test_sae, test_sae_train, test_sae_recovery)."""

from __future__ import annotations

import torch

import thoughtscope.sae as S

D_MODEL, N_TRUE = 32, 64


def true_dirs(seed: int = 12345) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(N_TRUE, D_MODEL, generator=g)
    return d / d.norm(dim=1, keepdim=True)


def make_batches(n: int, B: int = 256, seed: int = 1, active: float = 3.0, offset: float = 0.0) -> list[torch.Tensor]:
    """Each row = sparse nonnegative combination of true directions (+ a constant offset)."""
    D = true_dirs()
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = (torch.rand(B, N_TRUE, generator=g) < active / N_TRUE).float()
        coef = (0.5 + torch.rand(B, N_TRUE, generator=g)) * mask
        out.append(coef @ D + offset)
    return out


def recovery(sae: S.SAE) -> float:
    W = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    return float((true_dirs() @ W.detach().T).max(1).values.mean())


FAST = {"progress": False, "checkpoint_every": 0, "log_every": 50}
