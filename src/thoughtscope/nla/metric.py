"""The NLA's score: FVE (fraction of variance explained) and its bootstrap confidence intervals.

FVE (fraction of variance explained), as published: rescale every vector to norm √d, then

    FVE = 1 − MSE(p̂, ĝ) / Var,   MSE = mean over rows and coordinates of (p̂ − ĝ)²,
    Var = mean over rows and coordinates of (ĝ − μ)² = 1 − ‖μ̄‖²,

where μ is the mean of the normalised gold vectors *of the evaluated set* (not re-normalised) and μ̄ = μ/√d
is the mean unit direction. Predicting μ gives FVE = 0 exactly; a perfect reconstruction gives 1.
Confidence intervals are percentile bootstraps over *documents* (rows of one document are correlated),
recomputing μ and Var inside every resample.
"""

from __future__ import annotations

import torch

from .. import stats
from .core import normalise


def fve_parts(
    pred: torch.Tensor, gold: torch.Tensor, *, renormalise: bool = True, mu: torch.Tensor | None = None
) -> dict:
    """FVE, MSE and Var (definitions in this module's docstring) for one set.

    renormalise=True rescales the prediction to √d too (right for the AR, whose output norm is not
    trained); baselines that already predict on the normalised scale pass False, which lets them shrink
    towards μ (the MSE-optimal thing to do) — so "predict μ" scores exactly 0. mu: use this mean (on the
    normalised scale, e.g. a larger set's) instead of the mean of `gold`.
    """
    g = normalise(gold.double())
    p = normalise(pred.double()) if renormalise else pred.double()
    mu = g.mean(0) if mu is None else mu.double()
    var = float((g - mu).pow(2).mean())
    mse = float((p - g).pow(2).mean())
    return {
        "fve": 1 - mse / var if var > 0 else float("nan"),
        "mse": mse,
        "var": var,
        "mu_sq_unit": float(mu.pow(2).sum() / g.shape[-1]),
    }


def fve(pred: torch.Tensor, gold: torch.Tensor, *, renormalise: bool = True, mu: torch.Tensor | None = None) -> float:
    return fve_parts(pred, gold, renormalise=renormalise, mu=mu)["fve"]


def bootstrap_ci(
    pred: torch.Tensor,
    gold: torch.Tensor,
    groups: torch.Tensor | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    renormalise: bool = True,
    minus: torch.Tensor | None = None,
) -> tuple[float, float]:
    """Percentile CI of FVE, resampling groups (documents) with replacement; μ and Var recomputed each time.

    With `minus` (another prediction, on the same scale as `pred`), the CI of FVE(pred) − FVE(minus) on the
    same resampled documents: a paired comparison, much tighter than comparing two separate CIs because
    both predictions see the same hard and easy documents.
    """
    g = normalise(gold.double())
    p = normalise(pred.double()) if renormalise else pred.double()
    err = (p - g).pow(2).mean(-1)  # per-row MSE
    if minus is not None:
        q = normalise(minus.double()) if renormalise else minus.double()
        err_ref = (q - g).pow(2).mean(-1)

    def resampled(idx: torch.Tensor) -> float | None:
        gg = g[idx]
        var = float((gg - gg.mean(0)).pow(2).mean())
        if var <= 0:
            return None
        if minus is None:
            return 1 - float(err[idx].mean()) / var
        return float(err_ref[idx].mean() - err[idx].mean()) / var

    vals = stats.bootstrap(resampled, g.shape[0], groups=groups, n_boot=n_boot, seed=seed).float()
    lo, hi = stats.percentile_ci(vals, 1 - alpha)
    return float(lo), float(hi)
