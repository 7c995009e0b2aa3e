"""The statistics every area reports with: AUROC, balanced accuracy, bootstrap and Wilson intervals, isotonic fits.

One copy on the ground floor, so a probe's AUROC, an explanation's detection score and a steering search's
concept rate are computed by the same rules. Plain torch (no scipy or scikit-learn at run time; parity with
scikit-learn is a test).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .errors import StatisticsError


def auroc_split(pos, neg) -> torch.Tensor:
    """AUROC from the positives' scores [..., P] and the negatives' [..., Q]: the Mann–Whitney probability that a
    random positive scores above a random negative, ties counting one half; exact, by ranking (O(n log n))."""
    p = torch.as_tensor(pos).double()
    n = torch.as_tensor(neg).double()
    if p.shape[-1] == 0 or n.shape[-1] == 0:
        raise StatisticsError("AUROC needs both classes among the scored rows")
    srt = n.sort(dim=-1).values.contiguous()
    if p.shape[:-1] != srt.shape[:-1]:
        raise StatisticsError(
            f"positives {tuple(p.shape)} and negatives {tuple(srt.shape)} differ before the last axis"
        )
    p = p.contiguous()
    below = torch.searchsorted(srt, p, right=False).double()
    upto = torch.searchsorted(srt, p, right=True).double()
    return (below + 0.5 * (upto - below)).sum(-1) / (p.shape[-1] * srt.shape[-1])


def auroc(scores, labels) -> torch.Tensor:
    """scores [..., N] (batched over leading dimensions, e.g. layers), labels [N] in {0, 1} -> AUROC [...]."""
    y = torch.as_tensor(labels).bool()
    s = torch.as_tensor(scores).double()
    if y.all() or not y.any():
        raise StatisticsError("AUROC needs both classes among the scored rows")
    return auroc_split(s[..., y], s[..., ~y])


def balanced_accuracy(predicted, labels) -> torch.Tensor:
    """Mean of the true-positive and true-negative rates of boolean predictions [..., N] against labels [N]."""
    y = torch.as_tensor(labels).bool()
    pred = torch.as_tensor(predicted).bool()
    if y.all() or not y.any():
        raise StatisticsError("balanced accuracy needs both classes among the labels")
    return 0.5 * (pred[..., y].double().mean(-1) + (~pred[..., ~y]).double().mean(-1))


def bootstrap(
    statistic: Callable[[torch.Tensor], float | torch.Tensor | None],
    n: int,
    *,
    groups=None,
    strata=None,
    n_boot: int = 1000,
    seed: int = 0,
) -> torch.Tensor:
    """The statistic over `n_boot` resamples of n rows: statistic(row indices) for each resample.

    groups [n]: rows of one group (a document) are drawn together, because they are correlated. strata [n]:
    each stratum (a class) is resampled on its own with its own size, so every class stays present. A
    resample where the statistic returns None is dropped (e.g. zero variance). Seeded, so a figure re-runs.
    """
    groups = torch.arange(n) if groups is None else torch.as_tensor(groups)
    strata = torch.zeros(n, dtype=torch.long) if strata is None else torch.as_tensor(strata).long()
    if groups.shape[0] != n or strata.shape[0] != n:
        raise StatisticsError(f"groups and strata need one entry per row ({n}); got {len(groups)} and {len(strata)}")
    members_by_stratum = []
    for s in torch.unique(strata, sorted=True).tolist():
        rows = torch.nonzero(strata == s).flatten()
        uniq, inv = torch.unique(groups[rows], return_inverse=True)
        members_by_stratum.append([rows[inv == i] for i in range(len(uniq))])
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(n_boot):
        idx = []
        for members in members_by_stratum:
            pick = torch.randint(len(members), (len(members),), generator=gen)
            idx.extend(members[i] for i in pick.tolist())
        v = statistic(torch.cat(idx))
        if v is not None:
            values.append(torch.as_tensor(v, dtype=torch.float64))
    if not values:
        raise StatisticsError("no resample gave a value (every resample was degenerate)")
    return torch.stack(values, -1)


def percentile_ci(values: torch.Tensor, level: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """The percentile interval of bootstrap values [..., B] at `level` (linear interpolation)."""
    if not 0 < level < 1:
        raise StatisticsError(f"confidence level must be in (0, 1), got {level}")
    a = (1 - level) / 2
    v = torch.as_tensor(values).double()
    return torch.quantile(v, a, dim=-1), torch.quantile(v, 1 - a, dim=-1)


def mean_ci(values: Sequence[float | None], *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of the values that are not None, with a percentile bootstrap interval over the items."""
    v = torch.tensor([x for x in values if x is not None], dtype=torch.float64)
    if len(v) == 0:
        return {"mean": None, "ci": None, "n": 0}
    lo, hi = percentile_ci(bootstrap(lambda idx: v[idx].mean(), len(v), n_boot=n_boot, seed=seed), level)
    return {"mean": float(v.mean()), "ci": [float(lo), float(hi)], "n": int(len(v))}


def wilson(hits: int, n: int, z: float = 1.96) -> list[float]:
    """95 % Wilson interval of a rate of `hits` in `n` (sound at 0 and at n, unlike the normal one)."""
    if n <= 0:
        return [0.0, 1.0]
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def isotonic(values: Sequence[float], weights: Sequence[float]) -> list[float]:
    """Weighted least-squares fit that never decreases (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for v, w in zip(values, weights):
        blocks.append([float(v), float(w), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, c2 = blocks.pop()
            m1, w1, c1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    return [m for m, _, c in blocks for _ in range(c)]


def ranks(values) -> torch.Tensor:
    """Ranks 1..n of a 1-D sequence, ties given their average rank (as Spearman's correlation needs)."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    order = torch.argsort(v, stable=True)
    r = torch.empty_like(v)
    r[order] = torch.arange(1, len(v) + 1, dtype=torch.float64)
    uniq, inv = torch.unique(v, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, r)
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
    return (sums / counts)[inv]


def pearson(a, b) -> float:
    """Pearson's correlation; nan when either side is constant."""
    x, y = torch.as_tensor(a, dtype=torch.float64).flatten(), torch.as_tensor(b, dtype=torch.float64).flatten()
    if len(x) != len(y):
        raise ValueError(f"pearson: {len(x)} values against {len(y)}")
    x, y = x - x.mean(), y - y.mean()
    den = float(x.norm() * y.norm())
    return max(-1.0, min(1.0, float(x @ y) / den)) if den > 0 else float("nan")


def spearman(a, b) -> float:
    """Spearman's rank correlation (Pearson's on average ranks); nan when either side is constant."""
    ra, rb = ranks(a), ranks(b)
    if len(ra) != len(rb):
        raise ValueError(f"spearman: {len(ra)} values against {len(rb)}")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return max(-1.0, min(1.0, float((ra @ rb) / den))) if den > 0 else float("nan")
