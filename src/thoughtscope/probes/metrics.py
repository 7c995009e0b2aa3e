"""AUROC (batched over layers), its bootstrap CI, a train-chosen threshold, balanced accuracy, recall at an FPR.

AUROC is the Mann–Whitney probability that a random positive scores above a random negative (ties count
half), computed exactly from all positive×negative pairs; plain torch, so no scipy or scikit-learn at run
time (parity with scikit-learn is a test).
"""

from __future__ import annotations

import torch

from .. import stats
from ..errors import ProbeError, StatisticsError


def auroc(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """scores [..., N], y [N] in {0, 1} -> AUROC [...]; exact, ties count one half (`thoughtscope.stats`)."""
    try:
        return stats.auroc(scores, y)
    except StatisticsError as e:
        raise ProbeError(str(e)) from None


def bootstrap_auroc(
    scores: torch.Tensor, y: torch.Tensor, n_boot: int = 200, seed: int = 0, level: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile CI of AUROC over resamples of the rows (within each class, so both classes stay present)."""
    y = torch.as_tensor(y).bool()
    values = stats.bootstrap(lambda idx: auroc(scores[..., idx], y[idx]), len(y), strata=~y, n_boot=n_boot, seed=seed)
    return stats.percentile_ci(values, level)


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
    """Balanced accuracy of `scores > threshold` (one threshold per leading row)."""
    return stats.balanced_accuracy(scores > threshold[..., None], y)


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
