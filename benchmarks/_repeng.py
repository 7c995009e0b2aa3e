"""repeng as a peer: its own `read_representations` (pca_diff), timed, on the same model, layer and pairs as ours."""

from __future__ import annotations

import time

import torch


def repeng_direction(lm, layer: int, pairs) -> tuple[torch.Tensor, float]:
    """repeng's direction for `pairs` (positive, negative) at hidden layer `layer`, and the seconds it took."""
    import numpy as np

    if not hasattr(np, "float_"):
        np.float_ = np.float64  # repeng 0.4 annotates with np.float_, removed in numpy 2
    from repeng.extract import DatasetEntry, read_representations

    tok = lm.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ds = [DatasetEntry(positive=p, negative=n) for p, n in pairs]
    t = time.perf_counter()
    dirs = read_representations(lm.model, tok, ds, hidden_layers=[layer], batch_size=16, method="pca_diff")
    return torch.tensor(dirs[layer]).float(), time.perf_counter() - t
