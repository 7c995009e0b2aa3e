"""What a feature does, read from the SAE's decoder alone: its direct logit effects (from `thoughtscope.features`,
the one place that reads decoder rows through the unembedding) and its nearest features."""

from __future__ import annotations

import math

import torch

from ..features import logit_effects, norm_scale

__all__ = ["logit_effects", "nearest_features", "norm_scale"]


@torch.no_grad()
def nearest_features(W_dec: torch.Tensor, k: int = 10, chunk: int = 1024):
    """k nearest other features by decoder cosine similarity (chunked so memory stays chunk × n_features)."""
    W = W_dec.detach().float().cpu()
    Wn = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    m = Wn.shape[0]
    k = min(k, m - 1)
    idx, val = [], []
    for s in range(0, m, chunk):
        S = Wn[s : s + chunk] @ Wn.T
        r = torch.arange(S.shape[0], device=S.device)
        S[r, r + s] = -math.inf
        v, i = S.topk(k, dim=1)
        idx.append(i), val.append(v)
    return torch.cat(idx), torch.cat(val)
