"""The rungs of the evaluation ladder that need no trained NLA, and the training rows they are fitted on.

token_mean and ridge_k* are fitted on training-split rows and predict on the normalised scale; raw_last16
reads the true last 16 tokens with the untrained target; the quote analysis checks what the explanations
quote against the true context. `save_baseline_rows` keeps the rows these need next to a trained NLA.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from .core import normalise
from .data import NLARows
from .metric import fve

QUOTE_RE = re.compile(r'"([^"]{2,})"')


def token_mean_predict(train_tok: torch.Tensor, train_vec: torch.Tensor, test_tok: torch.Tensor) -> torch.Tensor:
    """Mean normalised training vector of each token id; the global mean for unseen ids."""
    tv = normalise(train_vec.double())
    glob = tv.mean(0)
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    for t, v in zip(train_tok.tolist(), tv):
        sums[t] = sums.get(t, 0) + v
        counts[t] = counts.get(t, 0) + 1
    return torch.stack([sums[t] / counts[t] if t in sums else glob for t in test_tok.tolist()]).float()


def _bag(ctx: torch.Tensor, k: int, vocab: dict[int, int]) -> torch.Tensor:
    X = torch.zeros(ctx.shape[0], len(vocab) + 1, dtype=torch.float64)
    X[:, -1] = 1.0  # intercept
    for i, row in enumerate(ctx[:, -k:].tolist()):
        for t in row:
            j = vocab.get(t)
            if t >= 0 and j is not None:
                X[i, j] += 1.0
    return X


def ridge_predict(
    train_ctx: torch.Tensor,
    train_vec: torch.Tensor,
    test_ctx: torch.Tensor,
    k: int,
    *,
    val_ctx: torch.Tensor | None = None,
    val_vec: torch.Tensor | None = None,
    lambdas: Sequence[float] = (0.1, 1.0, 10.0, 100.0),
) -> tuple[torch.Tensor, float]:
    """Ridge regression from the bag of the last k context tokens to the normalised vector.

    Solved in the dual (n_train × n_train), since the bag vocabulary is larger than the training set;
    λ is picked on the validation rows when given.
    """
    vocab: dict[int, int] = {}
    for t in train_ctx[:, -k:].flatten().tolist():
        if t >= 0 and t not in vocab:
            vocab[t] = len(vocab)
    X = _bag(train_ctx, k, vocab)
    Y = normalise(train_vec.double())
    K = X @ X.T
    eye = torch.eye(K.shape[0], dtype=torch.float64)

    def fit(lam):
        alpha = torch.linalg.solve(K + lam * eye, Y)
        return X.T @ alpha  # primal weights [V+1, d]

    best = lambdas[len(lambdas) // 2]
    if val_ctx is not None and val_vec is not None and len(val_ctx):
        Xv = _bag(val_ctx, k, vocab)
        scores = {lam: fve(Xv @ fit(lam), val_vec, renormalise=False) for lam in lambdas}
        best = max(scores, key=scores.get)
    W = fit(best)
    return (_bag(test_ctx, k, vocab) @ W).float(), best


def strip_quotes(text: str) -> str:
    return QUOTE_RE.sub('""', text)


def quote_analysis(explanations: Sequence[str], contexts: Sequence[str]) -> dict:
    """How many quoted spans the explanations contain and what share occurs verbatim in the context."""
    n, hits = 0, 0
    for e, c in zip(explanations, contexts):
        for q in QUOTE_RE.findall(e):
            n += 1
            q_norm = q.replace("\\n", "\n")
            hits += q_norm in c or q_norm.strip() in c
    return {
        "n_quotes": n,
        "quotes_per_explanation": n / max(1, len(explanations)),
        "quote_verbatim_share": hits / n if n else float("nan"),
    }


BASELINE_FILE = "baseline_rows.safetensors"


def save_baseline_rows(rows: NLARows, path: str | os.PathLike) -> None:
    """Keep what the baselines need from the training and validation rows (normalised vectors in fp16)."""
    from .._io import atomic_save_tensors

    keep = (rows.split == 0) | (rows.split == 1)
    atomic_save_tensors(
        {
            "vectors": normalise(rows.vectors[keep]).half(),
            "token_id": rows.token_id[keep],
            "context_ids": rows.context_ids[keep],
            "split": rows.split[keep],
        },
        Path(path),
    )


def load_baseline_rows(path: str | os.PathLike) -> tuple[NLARows, NLARows]:
    from safetensors.torch import load_file

    t = load_file(str(path))
    n = t["vectors"].shape[0]
    rows = NLARows(
        t["vectors"].float(),
        torch.full((n,), -1),
        torch.zeros(n, dtype=torch.long),
        t["token_id"],
        t["split"],
        t["context_ids"],
        [""] * n,
        [""] * n,
        {},
    )
    return rows.subset("train"), rows.subset("val")


def raw_context_predict(nla, rows: NLARows, k: int = 16) -> torch.Tensor:
    """The target itself (truncated, identity head, no training) reading only the last k true tokens."""
    from thoughtscope.models import capture

    lm = nla.lm
    bos = lm.tokenizer.bos_token_id
    out = []
    for ctx in rows.context_ids[:, -k:].tolist():
        ids = ([bos] if bos is not None else []) + [t for t in ctx if t >= 0]
        x = torch.tensor([ids], device=lm.device)
        h = next(iter(capture(lm, nla.cfg.site, x).values()))
        out.append(h[0, -1].float().cpu())
    return torch.stack(out)
