"""Synthetic activations with known true features, for measuring whether an SAE finds them.

The design follows SynthSAEBench (SAELens' `sae_lens.synthetic`, arXiv 2602.14687): many more features than
dimensions, Zipfian firing probabilities, a forest of feature hierarchies (a child fires only when its parent
fires; the children of a parent may be mutually exclusive), low-rank correlations between firings (a Gaussian
copula), noisy firing magnitudes, an optional bias, and unit feature directions that are pushed towards a tight
frame (near-orthogonal, never orthogonal: 4,096 directions in 256 dimensions cannot be).

One row is ``x = acts @ features + bias`` where ``acts`` [n_features] holds the magnitude of every firing feature
and 0 elsewhere: |N(magnitude_mean_i, magnitude_std_i)| (folded, so a firing feature is never 0 and "fires" means
acts > 0; SynthSAEBench clips at 0 instead, which at means 4-5 and spreads near 0.5 almost never matters), for
a child times its parent's magnitude over the parent's mean when ``scale_children_by_parent``.
Features are numbered by frequency rank: feature 0 is the most frequent, and the hierarchy takes the first
indices in breadth-first order (roots, then their children, ...), so a parent always has a lower index (and a
higher firing probability) than its children. The children of one parent are consecutive.

Determinism: the model (directions, probabilities, hierarchy, correlations, magnitudes) is drawn from
``cfg.seed`` by one ``torch.Generator``; ``sample(n, seed=s)`` draws rows from a generator seeded by
(cfg.seed, s) in fixed chunks of ``CHUNK_ROWS`` rows, so the same config and seed give the same bytes on CPU
whatever the memory or thread count. The global RNG is never touched.

Frequencies: ``probabilities`` follow the Zipf law p_i = c (i + 1)^-a exactly for the free features (roots and
the features outside the trees), which are drawn in every row. A child is drawn only where its parent fired,
with probability p_child / p_parent (raised for its exclusive siblings' competition), capped at 1: where the
children of a parent would need more firings than the parent has (deep levels, whose ranks sit close to their
parents'), they fire less than p_i, as in SynthSAEBench-16k; the parent then nearly always fires with one child.

Calibration: ``target_l0`` is what the samples show. Hierarchy gating and mutual exclusion remove firings that
the Zipf probabilities alone would give; the construction compensates each child's probability for its parent
(and its exclusive siblings), then rescales the whole Zipf curve until the mean L0 of ``CALIBRATION_ROWS``
calibration rows is within ``CALIBRATION_REL_TOL`` of the target. ``sample(n)`` with n >= 10,000 shows a mean L0
within ``L0_TOLERANCE`` (relative) of ``target_l0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import SAEError
from ..values import is_finite

CHUNK_ROWS = 8192  # rows drawn per chunk: fixes the random stream, so bytes never depend on n's split or memory
CALIBRATION_ROWS = 8192  # rows sampled at each calibration step of the Zipf scale (one chunk)
CALIBRATION_REL_TOL = 0.003  # calibration stops when its L0 is this close (relative) to target_l0
CALIBRATION_STEPS = 16  # at most this many rescalings before giving up with an SAEError
L0_TOLERANCE = 0.03  # documented promise: mean L0 of sample(n >= 10_000) within 3% of target_l0
MIN_CORRELATION_DIAG = 0.01  # the copula's own (uncorrelated) variance share never drops below this


@dataclass(frozen=True)
class SyntheticConfig:
    """Everything that defines a synthetic model; the defaults are SynthSAEBench-16k's shape at CPU size."""

    n_features: int = 4096
    """Number of true features (rows of `features`); a count."""
    d_model: int = 256
    """Width of one activation vector x; dimensions."""
    target_l0: float = 30.0
    """Mean number of true features firing per row, as the samples show it (calibrated at construction to within
    L0_TOLERANCE, relative); features per row."""
    zipf_exponent: float = 0.5
    """Exponent a of the firing probabilities p_i = c * (i + 1) ** -a over the frequency rank i (c calibrated);
    unitless."""
    max_prob: float = 0.4
    """Cap on any one feature's firing probability; probability per row."""
    hierarchy_roots: int = 32
    """Number of hierarchy trees (0: no hierarchy); a count of root features."""
    hierarchy_branching: int = 4
    """Children of every non-leaf feature in a tree; a count."""
    hierarchy_depth: int = 3
    """Levels of children below each root (1: roots with leaf children); levels."""
    mutually_exclusive: float = 1.0
    """Share of the parents whose children are mutually exclusive (at most one fires per row); a fraction 0-1."""
    correlation_rank: int = 25
    """Rank of the low-rank correlation between firings (0: independent firings); latent factors."""
    correlation_scale: float = 0.1
    """Standard deviation of each entry of the correlation factor (0: independent firings); unitless, in units of
    the copula's unit-variance Gaussian."""
    magnitude_mean_frequent: float = 5.0
    """Mean firing magnitude of the most frequent feature (linear in rank to magnitude_mean_rare); activation
    units (the coefficient of a unit direction)."""
    magnitude_mean_rare: float = 4.0
    """Mean firing magnitude of the rarest feature; activation units."""
    magnitude_std: float = 0.5
    """Mean over features of the standard deviation of a feature's firing magnitude; activation units."""
    magnitude_std_spread: float = 0.5
    """Spread of the per-feature standard deviations, each |N(magnitude_std, magnitude_std_spread)|; activation
    units."""
    bias_norm: float = 0.5
    """Norm of a random bias vector added to every row (0: none); activation units."""
    scale_children_by_parent: bool = True
    """Whether a child's magnitude is multiplied by its parent's magnitude over the parent's mean magnitude (as in
    SynthSAEBench-16k), so a strong parent makes strong children; a flag (True/False)."""
    orthogonalize_steps: int = 50
    """Gradient steps pushing the directions towards a tight frame (lower pairwise overlaps); steps."""
    orthogonalize_lr: float = 0.05
    """Step size of that push, relative to d_model / n_features; unitless."""
    seed: int = 0
    """Seed of the model itself (directions, probabilities, hierarchy, correlations, magnitudes); an integer."""

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> SAEError:
            return SAEError(f"SyntheticConfig.{name}={getattr(self, name)!r}: expected {expected}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("n_features", "d_model", "hierarchy_branching", "hierarchy_depth"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "a positive integer")
        for name in ("hierarchy_roots", "correlation_rank", "orthogonalize_steps", "seed"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "a non-negative integer")
        if not isinstance(self.scale_children_by_parent, bool):
            raise bad("scale_children_by_parent", "True or False")
        floats = ("correlation_scale", "magnitude_std", "magnitude_std_spread", "bias_norm", "orthogonalize_lr")
        for name in floats:
            if not is_finite(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "a finite number >= 0")
        for name in ("magnitude_mean_frequent", "magnitude_mean_rare", "zipf_exponent"):
            if not is_finite(getattr(self, name)) or getattr(self, name) <= 0:
                raise bad(name, "a finite number > 0")
        if not is_finite(self.max_prob) or not 0 < self.max_prob <= 1:
            raise bad("max_prob", "a probability in (0, 1]")
        if not is_finite(self.mutually_exclusive) or not 0 <= self.mutually_exclusive <= 1:
            raise bad("mutually_exclusive", "a fraction in [0, 1]")
        if not is_finite(self.target_l0) or not 0 < self.target_l0 <= 0.25 * self.n_features * self.max_prob:
            raise bad(
                "target_l0",
                f"a number in (0, {0.25 * self.n_features * self.max_prob:g}] (a quarter of "
                "n_features * max_prob, so calibration can reach it)",
            )
        if self.n_hierarchy_features > self.n_features:
            raise bad(
                "hierarchy_roots",
                f"trees that fit in n_features={self.n_features}: {self.hierarchy_roots} roots with branching "
                f"{self.hierarchy_branching} and depth {self.hierarchy_depth} need {self.n_hierarchy_features}",
            )

    @property
    def n_hierarchy_features(self) -> int:
        """Features inside the trees (the first indices); the rest fire on their own."""
        b, depth = self.hierarchy_branching, self.hierarchy_depth
        return self.hierarchy_roots * sum(b**level for level in range(depth + 1)) if self.hierarchy_roots else 0


def _mix(*parts: int) -> int:
    """One 63-bit seed from several integers (SplitMix64-style), so (cfg.seed, seed) pairs never collide simply."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def _tight_frame_push(w: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """Gradient descent on sum_{i != j} (w_i . w_j)^2 with rows kept unit, through the d x d Gram matrix.

    Runs on one thread: w.T @ w sums over all n rows, and a multi-threaded sum splits them differently for
    another thread count, which would change the directions' bytes."""
    n, d = w.shape
    step = lr * d / n
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            grad = w @ (w.T @ w) - w * w.pow(2).sum(1, keepdim=True)
            w = F.normalize(w - step * grad, dim=1)
    finally:
        torch.set_num_threads(threads)
    return w


class SyntheticActivations:
    """A synthetic model built from a `SyntheticConfig`: its true `features`, `parent` and sampler.

    Attributes: ``features`` [n_features, d_model] unit rows (the true directions); ``parent`` [n_features] long,
    -1 for a root or a feature outside the trees; ``exclusive`` [n_features] bool, True where that feature's
    children are mutually exclusive; ``bias`` [d_model]; ``probabilities`` [n_features] the calibrated Zipf
    probabilities p_i (each feature's intended marginal firing rate); ``magnitude_mean``/``magnitude_std``
    [n_features]; ``correlation_factor`` [n_features, correlation_rank] float64 (None without correlations):
    the copula's Gaussian z = eps @ factor.T + eta * sqrt(1 - |factor_i|^2) has correlation factor @ factor.T off
    the diagonal, and feature i's draw fires where z_i exceeds its threshold; ``zipf_scale`` the calibrated c and
    ``calibrated_l0`` the mean L0 the calibration rows showed.
    """

    def __init__(self, cfg: SyntheticConfig | None = None) -> None:
        self.cfg = cfg = cfg if cfg is not None else SyntheticConfig()
        n, d = cfg.n_features, cfg.d_model
        gen = torch.Generator().manual_seed(_mix(cfg.seed, 1))
        w = F.normalize(torch.randn(n, d, generator=gen), dim=1)
        self.features = _tight_frame_push(w, cfg.orthogonalize_steps, cfg.orthogonalize_lr).contiguous()
        b = torch.randn(d, generator=gen, dtype=torch.float64)
        self.bias = (F.normalize(b, dim=0) * cfg.bias_norm).float()
        rank = torch.arange(n, dtype=torch.float64)
        frac = rank / max(n - 1, 1)
        mean = cfg.magnitude_mean_frequent + (cfg.magnitude_mean_rare - cfg.magnitude_mean_frequent) * frac
        self.magnitude_mean = mean.float()
        spread = torch.randn(n, generator=gen, dtype=torch.float64) * cfg.magnitude_std_spread
        self.magnitude_std = (cfg.magnitude_std + spread).abs().float()
        self._build_hierarchy(gen)
        self._build_correlation(gen)
        self._calibrate()

    # ------------------------------------------------------------------ construction
    def _build_hierarchy(self, gen: torch.Generator) -> None:
        """Breadth-first trees over the first indices: level L holds roots * branching**L consecutive features."""
        cfg = self.cfg
        n, b = cfg.n_features, cfg.hierarchy_branching
        self.parent = torch.full((n,), -1, dtype=torch.long)
        self.exclusive = torch.zeros(n, dtype=torch.bool)
        self._first_child = torch.full((n,), -1, dtype=torch.long)
        self._depth = cfg.hierarchy_depth if cfg.hierarchy_roots else 0
        self._level = torch.zeros(n, dtype=torch.long)  # 0 for roots and free features, L for level-L children
        start, size = 0, cfg.hierarchy_roots
        for level in range(1, self._depth + 1):
            child_start = start + size
            kids = torch.arange(child_start, child_start + size * b)
            self.parent[kids] = start + (kids - child_start) // b
            self._level[kids] = level
            self._first_child[start : start + size] = torch.arange(child_start, child_start + size * b, b)
            start, size = child_start, size * b
        parents = (self._first_child >= 0).nonzero().squeeze(1)
        n_me = round(cfg.mutually_exclusive * parents.numel())
        chosen = parents[torch.randperm(parents.numel(), generator=gen)[:n_me]]
        self.exclusive[chosen] = True
        # features drawn in every row: roots and the features outside the trees (children are drawn only where
        # their parent fired)
        self._free = (self.parent < 0).nonzero().squeeze(1)
        self._roots_end = cfg.hierarchy_roots

    def _build_correlation(self, gen: torch.Generator) -> None:
        """Low-rank Gaussian copula: z = eps @ factor.T + eta * sqrt(diag), diag = 1 - |factor_i|^2 (unit variance)."""
        cfg = self.cfg
        self.correlation_factor: torch.Tensor | None = None
        self._diag_sqrt = torch.ones(cfg.n_features, dtype=torch.float64)
        if cfg.correlation_rank == 0 or cfg.correlation_scale == 0:
            return
        factor = torch.randn(cfg.n_features, cfg.correlation_rank, generator=gen, dtype=torch.float64)
        factor = factor * cfg.correlation_scale
        sq = factor.pow(2).sum(1, keepdim=True)
        cap = 1 - MIN_CORRELATION_DIAG
        factor = torch.where(sq > cap, factor * (cap / sq).sqrt(), factor)
        self.correlation_factor = factor
        self._diag_sqrt = (1 - factor.pow(2).sum(1)).sqrt()

    def _sampling_probs(self, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The Zipf marginals p and each feature's draw probability q: p itself for a free feature; for a child,
        p divided by its parent's p (it is drawn only where the parent fired), raised for the competition among
        exclusive siblings, capped at 1."""
        cfg = self.cfg
        rank = torch.arange(1, cfg.n_features + 1, dtype=torch.float64)
        p = (scale * rank.pow(-cfg.zipf_exponent)).clamp(max=cfg.max_prob)
        q = p.clone()
        kids = (self.parent >= 0).nonzero().squeeze(1)
        if kids.numel():
            par = self.parent[kids]
            cond = p[kids] / p[par]
            sib_sum = torch.zeros_like(p).index_add_(0, par, cond)
            q[kids] = torch.where(self.exclusive[par], cond * (1 + sib_sum[par] - cond), cond)
        return p, q.clamp(max=1.0)

    def _set_probs(self, scale: float) -> None:
        self.probabilities, q = self._sampling_probs(scale)
        self._q = q.float()
        # fire iff eta > (t - eps @ factor.T) / sqrt(diag), t = Phi^-1(1 - q): the scaled terms, precomputed
        t_scaled = math.sqrt(2) * torch.erfinv(1 - 2 * q) / self._diag_sqrt
        self._t_scaled = t_scaled.float()
        self._free_q = self._q[self._free]
        self._free_t = self._t_scaled[self._free]
        if self.correlation_factor is not None:
            self._factor_scaled = (self.correlation_factor / self._diag_sqrt[:, None]).float().contiguous()
            self._free_factor_t = self._factor_scaled[self._free].T.contiguous()

    def _calibration_l0(self, scale: float) -> float:
        """Mean L0 of the calibration rows at this Zipf scale (the same random numbers at every scale)."""
        self._set_probs(scale)
        gen = torch.Generator().manual_seed(_mix(self.cfg.seed, 2))
        fired = 0
        for lo in range(0, CALIBRATION_ROWS, CHUNK_ROWS):
            fired += self._draw(min(CHUNK_ROWS, CALIBRATION_ROWS - lo), gen)[0].numel()
        return fired / CALIBRATION_ROWS

    def _calibrate(self) -> None:
        """Secant steps on log(L0) against log(scale) of the Zipf curve until the calibration rows show
        target_l0 (within CALIBRATION_REL_TOL); the closest scale wins if the steps run out within 3x that."""
        target = self.cfg.target_l0
        ranks = torch.arange(1, self.cfg.n_features + 1, dtype=torch.float64).pow(-self.cfg.zipf_exponent)
        scale, slope = target / float(ranks.sum()), 1.0
        tried: list[tuple[float, float, float]] = []
        last_scale = last_measured = 0.0
        for _ in range(CALIBRATION_STEPS):
            measured = self._calibration_l0(scale)
            tried.append((abs(measured - target), scale, measured))
            if abs(measured - target) <= CALIBRATION_REL_TOL * target or measured <= 0:
                break
            if len(tried) > 1 and scale != last_scale and measured != last_measured:
                slope = math.log(measured / last_measured) / math.log(scale / last_scale)
                slope = min(max(slope, 0.05), 2.0)
            last_scale, last_measured = scale, measured
            scale *= (target / measured) ** (1 / slope)
        err, best, measured = min(tried)
        if err > 3 * CALIBRATION_REL_TOL * target:
            raise SAEError(
                f"SyntheticConfig.target_l0={target}: calibration came no closer than L0 {target - err:.2f} or "
                f"{target + err:.2f}; expected a target the Zipf curve can give (lower target_l0, or raise "
                "max_prob / n_features)"
            )
        if best != scale:
            self._set_probs(best)
        self.calibrated_l0 = measured
        self.zipf_scale = best

    # ------------------------------------------------------------------ sampling
    def _draw(self, rows: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The firings of `rows` rows as (row, feature) pairs, row-major: every free feature drawn through the
        copula, then level by level each firing parent's children (their own copula draws given the same
        latent factors), mutual exclusion keeping one random winner among fired exclusive siblings."""
        n, b = self.cfg.n_features, self.cfg.hierarchy_branching
        eps = None
        if self.correlation_factor is None:
            fire = torch.rand(rows, self._free.numel(), generator=gen) < self._free_q
        else:
            eps = torch.randn(rows, self.cfg.correlation_rank, generator=gen)
            threshold = torch.addmm(self._free_t, eps, self._free_factor_t, beta=1, alpha=-1)
            fire = torch.randn(rows, self._free.numel(), generator=gen) > threshold
        r, j = fire.nonzero(as_tuple=True)
        f = self._free[j]
        rows_out, feats_out = [r], [f]
        is_root = f < self._roots_end
        pr, pf = r[is_root], f[is_root]
        for _ in range(self._depth):
            kid = self._first_child[pf].unsqueeze(1) + torch.arange(b)
            if eps is None:
                fired = torch.rand(kid.shape, generator=gen) < self._q[kid]
            else:
                pull = torch.einsum("kbr,kr->kb", self._factor_scaled[kid], eps[pr])
                fired = torch.randn(kid.shape, generator=gen) > self._t_scaled[kid] - pull
            clash = ((fired.sum(1) > 1) & self.exclusive[pf]).nonzero().squeeze(1)
            if clash.numel():
                score = torch.rand(clash.numel(), b, generator=gen).masked_fill(~fired[clash], -1.0)
                keep = torch.zeros(clash.numel(), b, dtype=torch.bool)
                keep[torch.arange(clash.numel()), score.argmax(1)] = True
                fired[clash] = keep
            pr, pf = pr.unsqueeze(1).expand_as(kid)[fired], kid[fired]
            rows_out.append(pr)
            feats_out.append(pf)
        r, f = torch.cat(rows_out), torch.cat(feats_out)
        order = torch.argsort(r * n + f)
        return r[order], f[order]

    def _chunk(self, rows: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One chunk as x [rows, d] and its firings (row, feature, magnitude), row-major."""
        r, f = self._draw(rows, gen)
        noise = torch.randn(f.numel(), generator=gen)
        vals = (self.magnitude_mean[f] + self.magnitude_std[f] * noise).abs()
        if self.cfg.scale_children_by_parent:
            self._scale_children(r, f, vals)
        counts = torch.bincount(r, minlength=rows)
        offsets = torch.cumsum(counts, 0) - counts
        x = F.embedding_bag(f, self.features, offsets, mode="sum", per_sample_weights=vals) + self.bias
        return x, r, f, vals

    def _scale_children(self, r: torch.Tensor, f: torch.Tensor, vals: torch.Tensor) -> None:
        """Level by level (so a grandchild sees its parent's scaled magnitude), multiply each child's magnitude by
        its parent's magnitude over the parent's mean; the parent's entry is found by its row-major key."""
        n = self.cfg.n_features
        keys = r * n + f  # sorted: the firings are row-major
        level = self._level[f]
        for depth in range(1, self._depth + 1):
            kid = (level == depth).nonzero().squeeze(1)
            if kid.numel() == 0:
                continue
            par = self.parent[f[kid]]
            at = torch.searchsorted(keys, r[kid] * n + par)
            vals[kid] *= vals[at] / self.magnitude_mean[par]

    def _check_n(self, n: Any, seed: Any) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise SAEError(f"sample n={n!r}: expected a positive number of rows")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise SAEError(f"sample seed={seed!r}: expected an integer")

    @torch.no_grad()
    def sample(self, n: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n rows: (x [n, d_model] float32, acts [n, n_features] float32 dense, 0 where a feature does not fire).

        Same config and seed give the same bytes; x equals `sample_x(n, seed=seed)`.
        """
        self._check_n(n, seed)
        gen = torch.Generator().manual_seed(_mix(self.cfg.seed, 3, seed))
        x = torch.empty(n, self.cfg.d_model)
        acts = torch.zeros(n, self.cfg.n_features)
        for lo in range(0, n, CHUNK_ROWS):
            xc, r, f, vals = self._chunk(min(CHUNK_ROWS, n - lo), gen)
            x[lo : lo + xc.shape[0]] = xc
            acts[lo + r, f] = vals
        return x, acts

    @torch.no_grad()
    def sample_x(self, n: int, *, seed: int) -> torch.Tensor:
        """The x of `sample(n, seed=seed)` without building the dense acts (for training streams of many rows)."""
        self._check_n(n, seed)
        gen = torch.Generator().manual_seed(_mix(self.cfg.seed, 3, seed))
        x = torch.empty(n, self.cfg.d_model)
        for lo in range(0, n, CHUNK_ROWS):
            xc = self._chunk(min(CHUNK_ROWS, n - lo), gen)[0]
            x[lo : lo + xc.shape[0]] = xc
        return x

    def summary(self) -> dict[str, Any]:
        """The model's shape and realised statistics, for a benchmark's record (plain numbers)."""
        return {
            "n_features": self.cfg.n_features,
            "d_model": self.cfg.d_model,
            "target_l0": self.cfg.target_l0,
            "calibrated_l0": self.calibrated_l0,
            "zipf_scale": self.zipf_scale,
            "children": int((self.parent >= 0).sum()),
            "exclusive_parents": int(self.exclusive.sum()),
            "mean_max_overlap": self.mean_max_overlap(),
        }

    def mean_max_overlap(self, chunk: int = 1024) -> float:
        """Mean over features of the largest |cosine| with any other feature (SynthSAEBench's superposition
        measure rho_mm)."""
        best = []
        for lo in range(0, self.cfg.n_features, chunk):
            c = (self.features[lo : lo + chunk] @ self.features.T).abs()
            c[torch.arange(c.shape[0]), torch.arange(lo, lo + c.shape[0])] = 0
            best.append(c.max(1).values)
        return float(torch.cat(best).mean())
