"""What a feature does, read from the SAE's decoder alone: its direct logit effects and its nearest features."""

from __future__ import annotations

import math

import torch

from ..models import LoadedModel


def norm_scale(final_norm) -> torch.Tensor | None:
    """The per-dimension scale the final norm applies (Gemma-style norms scale by 1 + weight)."""
    if final_norm is None:
        return None
    w = getattr(final_norm, "weight", None)
    if w is None:
        return None
    w = w.detach().float()
    if "gemma" in type(final_norm).__name__.lower():
        w = 1.0 + w
    return w


@torch.no_grad()
def logit_effects(lm: LoadedModel, W_dec: torch.Tensor, k: int = 10, chunk: int = 512):
    """Top-k positive and negative direct logit effects of each decoder row (through the norm's scale)."""
    U = lm.unembed.weight.detach().float().cpu()  # [V, d]
    g = norm_scale(lm.final_norm)
    W = W_dec.detach().float().cpu()
    if g is not None:
        W = W * g.cpu()
    pos_v, pos_i, neg_v, neg_i = [], [], [], []
    k = min(k, U.shape[0])
    for s in range(0, W.shape[0], chunk):
        L = W[s:s + chunk] @ U.T
        v, i = L.topk(k, dim=1)
        pos_v.append(v), pos_i.append(i)
        v, i = L.topk(k, dim=1, largest=False)
        neg_v.append(v), neg_i.append(i)
    return torch.cat(pos_i), torch.cat(pos_v), torch.cat(neg_i), torch.cat(neg_v)


@torch.no_grad()
def nearest_features(W_dec: torch.Tensor, k: int = 10, chunk: int = 1024):
    """k nearest other features by decoder cosine similarity (chunked so memory stays chunk × n_features)."""
    W = W_dec.detach().float().cpu()
    Wn = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    m = Wn.shape[0]
    k = min(k, m - 1)
    idx, val = [], []
    for s in range(0, m, chunk):
        S = Wn[s:s + chunk] @ Wn.T
        r = torch.arange(S.shape[0])
        S[r, r + s] = -math.inf
        v, i = S.topk(k, dim=1)
        idx.append(i), val.append(v)
    return torch.cat(idx), torch.cat(val)
