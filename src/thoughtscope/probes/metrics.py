"""AUROC (batched over layers), its bootstrap CI, a train-chosen threshold, balanced accuracy, recall at an FPR.

AUROC is the Mann–Whitney probability that a random positive scores above a random negative (ties count
half), computed exactly from all positive×negative pairs; plain torch, so no scipy or scikit-learn at run
time (parity with scikit-learn is a test).
"""

from __future__ import annotations

import torch

from ..errors import ProbeError


def auroc(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """scores [..., N], y [N] in {0, 1} -> AUROC [...]; exact, ties count one half."""
    y = torch.as_tensor(y).bool()
    if y.all() or not y.any():
        raise ProbeError("AUROC needs both classes among the scored rows")
    s = scores.double()
    pos, neg = s[..., y], s[..., ~y]
    lead = s.shape[:-1]
    pos = pos.reshape(-1, pos.shape[-1])
    neg = neg.reshape(-1, neg.shape[-1])
    out = torch.empty(pos.shape[0], dtype=torch.float64)
    step = max(1, int(2e7 // max(1, pos.shape[1] * neg.shape[1])))
    for i in range(0, pos.shape[0], step):
        p, n = pos[i : i + step, :, None], neg[i : i + step, None, :]
        out[i : i + step] = ((p > n).double() + 0.5 * (p == n).double()).mean(dim=(1, 2))
    return out.reshape(lead)


def bootstrap_auroc(
    scores: torch.Tensor, y: torch.Tensor, n_boot: int = 200, seed: int = 0, level: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile CI of AUROC over resamples of the rows (within each class, so both classes stay present)."""
    y = torch.as_tensor(y).bool()
    g = torch.Generator().manual_seed(seed)
    pi, ni = y.nonzero().squeeze(1), (~y).nonzero().squeeze(1)
    vals = []
    for _ in range(n_boot):
        idx = torch.cat(
            [pi[torch.randint(len(pi), (len(pi),), generator=g)], ni[torch.randint(len(ni), (len(ni),), generator=g)]]
        )
        vals.append(auroc(scores[..., idx], y[idx]))
    v = torch.stack(vals, -1)
    a = (1 - level) / 2
    return torch.quantile(v, a, dim=-1), torch.quantile(v, 1 - a, dim=-1)


def best_threshold(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per row of scores [L, N]: the threshold (midpoint between sorted scores) maximising balanced accuracy."""
    y = torch.as_tensor(y).bool()
    s, order = scores.double().sort(dim=-1)
    yy = y[order]  # [L, N] labels in score order
    n1, n0 = y.sum().double(), (~y).sum().double()
    # cutting after k items (k = 0..N): predicted positive = the N-k highest
    neg_below = torch.cat([torch.zeros_like(s[..., :1]), (~yy).double().cumsum(-1)], -1)
    pos_below = torch.cat([torch.zeros_like(s[..., :1]), yy.double().cumsum(-1)], -1)
    bal = 0.5 * (neg_below / n0 + (n1 - pos_below) / n1)
    k = bal.argmax(-1)
    lo = torch.cat([s[..., :1] - 1, s], -1).gather(-1, k[..., None]).squeeze(-1)
    hi = torch.cat([s, s[..., -1:] + 1], -1).gather(-1, k[..., None]).squeeze(-1)
    return ((lo + hi) / 2).float()


def balanced_accuracy(scores: torch.Tensor, y: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    y = torch.as_tensor(y).bool()
    pred = scores > threshold[..., None]
    return 0.5 * ((pred[..., y]).double().mean(-1) + (~pred[..., ~y]).double().mean(-1))


def threshold_at_fpr(negative_scores: torch.Tensor, fpr: float) -> float:
    """The empirical (1 − fpr) quantile of scores on text without the concept: at most fpr of them lie above."""
    if not 0 < fpr < 1:
        raise ProbeError(f"false-positive rate must be in (0, 1), got {fpr}")
    if negative_scores.numel() == 0:
        raise ProbeError("no neutral scores to set a threshold on")
    return float(torch.quantile(negative_scores.double().flatten(), 1 - fpr))


def recall_at_fpr(pos_scores: torch.Tensor, neg_scores: torch.Tensor, fpr: float) -> float:
    t = threshold_at_fpr(neg_scores, fpr)
    return float((pos_scores.double() > t).double().mean())
