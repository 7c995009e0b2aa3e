"""Ground-truth quality of an SAE: does it find the true features of synthetic activations?

`ground_truth_metrics` scores any SAE (ours or a peer's: it needs only an `encode` callable and the decoder rows)
against activations whose true features and firings are known (`thoughtscope.sae.synthetic`). The definitions
match SAELens' SynthSAEBench evaluation (`sae_lens.synthetic.evals`) so the numbers are comparable with theirs:

- ``mcc``: mean |cosine| of decoder rows and true directions over the one-to-one matching (Hungarian,
  `scipy.optimize.linear_sum_assignment`) that maximises it; min(m, n_features) pairs.
- ``uniqueness``: the number of distinct true features that are some latent's best match (largest |cosine|),
  divided by the number of latents m.
- ``precision`` / ``recall`` / ``f1``: each latent is a detector of its best-matching true feature (largest
  |cosine|, not the Hungarian match): a latent fires when its activation is != 0, the feature when its true
  activation is > 0; per-latent TP/(TP+FP), TP/(TP+FN) and their harmonic mean (0 where undefined), then the
  mean over all m latents (dead latents count as 0).
- ``explained_variance``: 1 - sum ||x - x_hat||^2 / (sum ||x||^2 - ||sum x||^2 / n) (float64 sums).
- ``shrinkage``: mean over rows with ||x|| > 1e-6 of ||x_hat|| / ||x|| (1 = no shrinkage).
- ``l0``: mean number of latents != 0 per row.
- ``dead``: share of the m latents that never fire on these rows (SAELens reports the count; this is the count
  divided by m).

``absorption`` has no SAELens counterpart; it measures feature absorption on the true hierarchy: a parent's latent
that fires for the parent but goes silent when a child fires (the child's latent has taken over the parent's
direction there). For each true parent feature P, let ell(P) be the latent whose decoder row has the largest
|cosine| with P. Split the rows where P fires into contexts: "alone" (no direct child of P fires) and, for each
child c, "with c" (c fires too). In each context k with at least `min_support` rows, r_k is the share of its rows on
which ell(P) fires; r_ref(P) is the largest r_k (P's latent in its best context, "alone" included). A context's
deficit is what r_k falls short of r_ref by more than sampling noise, d_k = max(0, r_ref - r_k - ABSORPTION_NOISE_Z
* sqrt(r_ref * (1 - r_ref) / n_k)) over its n_k rows. Then, summing over the parents and over their "with c"
contexts,

    absorption = sum n_k * d_k / sum n_k * r_ref(P)

in [0, 1]: the share of the parents' with-child firings on which their latent is off beyond its miss rate in its
best context (and beyond chance: a latent that fires at random, whatever the context, scores near 0). 0 when each
parent latent fires as readily with any child as alone (a perfect SAE); 1 when every parent latent that fires alone
is silent whenever a child fires; 0.75 for a latent that fires only with one of four equally frequent children.
Taking the best context, not only "alone", as the reference keeps the parents that (as in SynthSAEBench's deep
levels) nearly always fire with exactly one child; weighting by r_ref keeps parents the SAE never learned (r_ref
near 0) from adding noise. NaN when `parent` is None or no parent has a supported with-child context.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from ..errors import SAEError

METRIC_KEYS = (
    "f1",
    "precision",
    "recall",
    "mcc",
    "uniqueness",
    "absorption",
    "explained_variance",
    "l0",
    "dead",
    "shrinkage",
)
ABSORPTION_NOISE_Z = 2.0  # a context's shortfall counts only beyond this many standard errors of its rate
MIN_INPUT_NORM = 1e-6  # rows with ||x|| at or below this are left out of the shrinkage mean (as SAELens does)


def abs_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|cosine| of every row of a [m, d] with every row of b [n, d]: [m, n] float32 (zero rows give 0)."""
    return (F.normalize(a.float(), dim=1, eps=1e-8) @ F.normalize(b.float(), dim=1, eps=1e-8).T).abs().clamp(max=1.0)


def matched_mcc(cos: torch.Tensor) -> float:
    """Mean of the |cosines| on the one-to-one matching of rows to columns that maximises their sum."""
    sim = cos.double().cpu().numpy()
    rows, cols = linear_sum_assignment(1.0 - sim)
    return float(np.mean(sim[rows, cols]))


def parent_from_tree(roots: Sequence[Any], n_features: int) -> torch.Tensor:
    """The `parent` tensor [n_features] (-1 for roots and features outside every tree) of a forest of nodes with
    `.feature_index` (int or None) and `.children`, as SAELens' `HierarchyNode` has: a node without a feature
    (an organising node) passes its own parent on to its children, as SAELens' gating does."""
    parent = torch.full((n_features,), -1, dtype=torch.long)
    stack = [(node, -1) for node in roots]
    while stack:
        node, above = stack.pop()
        index = node.feature_index
        if index is not None:
            if not 0 <= index < n_features:
                raise SAEError(f"parent_from_tree: feature_index {index}: expected 0 <= index < {n_features}")
            parent[index] = above
        stack.extend((child, above if index is None else index) for child in node.children)
    return parent


def _check(W_dec: torch.Tensor, x: torch.Tensor, acts: torch.Tensor, features: torch.Tensor, parent) -> None:
    if x.ndim != 2 or features.ndim != 2 or W_dec.ndim != 2 or acts.ndim != 2:
        raise SAEError(
            f"ground_truth_metrics: x {tuple(x.shape)}, acts {tuple(acts.shape)}, features {tuple(features.shape)}"
            f" and W_dec {tuple(W_dec.shape)}: expected 2-d tensors [n, d], [n, n_features], [n_features, d], [m, d]"
        )
    n, d = x.shape
    if features.shape[1] != d or W_dec.shape[1] != d:
        raise SAEError(
            f"ground_truth_metrics: x has d={d}, features d={features.shape[1]}, W_dec d={W_dec.shape[1]}: "
            "expected one width"
        )
    if acts.shape != (n, features.shape[0]):
        raise SAEError(
            f"ground_truth_metrics: acts {tuple(acts.shape)}: expected [{n}, {features.shape[0]}] (rows of x, "
            "true features)"
        )
    if n == 0:
        raise SAEError("ground_truth_metrics: x has no rows; expected at least one")
    if parent is not None and tuple(parent.shape) != (features.shape[0],):
        raise SAEError(
            f"ground_truth_metrics: parent {tuple(parent.shape)}: expected [{features.shape[0]}] (-1 for roots)"
        )


class _Absorption:
    """Counts, per true parent, its latent's firing in each context (alone; with each child), from the sparse
    lists of true firings and latent firings (never a dense [rows, parents] pass)."""

    def __init__(self, parent: torch.Tensor | None, latent_of_feature: torch.Tensor) -> None:
        self.active = parent is not None and bool((parent >= 0).any())
        if not self.active:
            return
        self.parent = parent.long().cpu()
        n = self.parent.numel()
        self.kids = (self.parent >= 0).nonzero().squeeze(1)
        self.parents = torch.unique(self.parent[self.kids])
        self.slot = torch.full((n,), -1, dtype=torch.long)  # a parent's own slot
        self.slot[self.parents] = torch.arange(self.parents.numel())
        self.kid_slot = torch.full((n,), -1, dtype=torch.long)  # a child's index among the children
        self.kid_slot[self.kids] = torch.arange(self.kids.numel())
        self.latent_of_feature = latent_of_feature
        self.alone = torch.zeros(2, self.parents.numel(), dtype=torch.long)  # rows alone; its latent on there
        self.with_kid = torch.zeros(2, self.kids.numel(), dtype=torch.long)  # rows with that child; latent on

    def add(self, rows: torch.Tensor, feats: torch.Tensor, gt_on: torch.Tensor, on: torch.Tensor) -> None:
        """rows/feats: the true firings of one chunk; gt_on/on: its true and latent firing masks."""
        if not self.active:
            return
        p = self.parents.numel()
        kid = self.kid_slot[feats] >= 0
        k_rows, k_feats = rows[kid], feats[kid]
        k_par = self.parent[k_feats]
        fires = gt_on[k_rows, k_par]  # the parent fires too (always, in data that respects the hierarchy)
        k_rows, k_feats, k_par = k_rows[fires], k_feats[fires], k_par[fires]
        lat = on[k_rows, self.latent_of_feature[k_par]]
        idx = self.kid_slot[k_feats]
        self.with_kid[0] += torch.bincount(idx, minlength=self.kids.numel())
        self.with_kid[1] += torch.bincount(idx[lat], minlength=self.kids.numel())
        has_child = torch.zeros(gt_on.shape[0] * p, dtype=torch.bool)
        has_child[k_rows * p + self.slot[k_par]] = True
        own = self.slot[feats] >= 0
        pr, ps = rows[own], self.slot[feats[own]]
        alone = ~has_child[pr * p + ps]
        lat = on[pr, self.latent_of_feature[self.parents[ps]]]
        self.alone[0] += torch.bincount(ps[alone], minlength=p)
        self.alone[1] += torch.bincount(ps[alone & lat], minlength=p)

    def compute(self, min_support: int) -> float:
        if not self.active:
            return math.nan
        kid_ok = self.with_kid[0] >= min_support
        r_kid = self.with_kid[1].double() / self.with_kid[0].clamp(min=1)
        r_alone = self.alone[1].double() / self.alone[0].clamp(min=1)
        r_ref = torch.where(self.alone[0] >= min_support, r_alone, torch.zeros_like(r_alone))
        kid_parent_slot = self.slot[self.parent[self.kids]]
        r_ref = r_ref.scatter_reduce(0, kid_parent_slot[kid_ok], r_kid[kid_ok], reduce="amax")
        ref = r_ref[kid_parent_slot][kid_ok]
        n_kid = self.with_kid[0][kid_ok].double()
        noise = ABSORPTION_NOISE_Z * (ref * (1 - ref) / n_kid).sqrt()
        deficit = (ref - r_kid[kid_ok] - noise).clamp(min=0)
        den = float((n_kid * ref).sum())
        return float((n_kid * deficit).sum() / den) if den > 0 else math.nan


def _prf(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> tuple[float, float, float]:
    """Mean over latents of precision, recall and F1 (each 0 where its denominator is 0)."""
    tp, fp, fn = tp.double(), fp.double(), fn.double()
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-300), torch.zeros_like(tp))
    return float(precision.mean()), float(recall.mean()), float(f1.mean())


def _add_reconstruction(sums: torch.Tensor, sum_x: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor) -> None:
    """Accumulate sum ||x||^2, sum ||x - x_hat||^2, the shrinkage ratios of rows with ||x|| > MIN_INPUT_NORM and
    their count (float64), and sum x."""
    sum_x += x.sum(0)
    norms = x.norm(dim=1)
    keep = norms > MIN_INPUT_NORM
    sums += torch.stack(
        [
            x.pow(2).sum(),
            (x - x_hat).pow(2).sum(),
            (x_hat.norm(dim=1)[keep] / norms[keep]).sum(),
            keep.sum().double(),
        ]
    )


@torch.no_grad()
def ground_truth_metrics(
    encode: Callable[[torch.Tensor], torch.Tensor],
    W_dec: torch.Tensor,
    x: torch.Tensor,
    acts: torch.Tensor,
    features: torch.Tensor,
    parent: torch.Tensor | None = None,
    *,
    b_dec: torch.Tensor | None = None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    chunk_rows: int = 4096,
    min_support: int = 5,
) -> dict[str, float]:
    """Score an SAE against known true features (definitions in the module docstring).

    encode(x_chunk) -> dense latent activations [rows, m] (a latent fires where != 0); W_dec [m, d] decoder rows;
    x [n, d] the inputs; acts [n, n_features] their true feature activations (> 0 where firing); features
    [n_features, d] the true directions; parent [n_features] (-1 for roots) for absorption. The reconstruction is
    decode(z) when `decode` is given (an SAE whose decoder scales or shifts, e.g. with input normalisation),
    else z @ W_dec + b_dec (b_dec 0 when None). encode gets each chunk of x on x's device and decode gets
    encode's output as it came; the counting runs on CPU. Rows are processed `chunk_rows` at a time, so n x m latents
    never sit in memory at once. Returns floats under exactly the keys of METRIC_KEYS.
    """
    _check(W_dec, x, acts, features, parent)
    W = W_dec.detach().float().cpu()
    cos = abs_cosines(W, features.detach().cpu())
    best_feature = cos.argmax(1)
    mcc = matched_mcc(cos)
    uniqueness = best_feature.unique().numel() / W.shape[0]
    absorption = _Absorption(parent, cos.argmax(0))
    del cos
    m, n_true = W.shape[0], features.shape[0]
    tp, n_on = torch.zeros(m, dtype=torch.long), torch.zeros(m, dtype=torch.long)
    true_count = torch.zeros(n_true, dtype=torch.long)
    bias = torch.zeros(W.shape[1]) if b_dec is None else b_dec.detach().float().cpu()
    sums = torch.zeros(4, dtype=torch.float64)  # sum ||x||^2, sum ||x - x_hat||^2, sum of shrinkage ratios, rows
    sum_x = torch.zeros(x.shape[1], dtype=torch.float64)
    for lo in range(0, x.shape[0], chunk_rows):
        xc = x[lo : lo + chunk_rows].float()
        z_raw = encode(xc).detach()
        z = z_raw.float().cpu()
        if z.shape != (xc.shape[0], m):
            raise SAEError(f"ground_truth_metrics: encode gave {tuple(z.shape)}; expected [{xc.shape[0]}, {m}]")
        gt_on = acts[lo : lo + chunk_rows].cpu() > 0
        g_rows, g_feats = gt_on.nonzero(as_tuple=True)
        true_count += torch.bincount(g_feats, minlength=n_true)
        on = z != 0
        z_rows, z_lat = on.nonzero(as_tuple=True)
        n_on += torch.bincount(z_lat, minlength=m)
        tp += torch.bincount(z_lat[gt_on[z_rows, best_feature[z_lat]]], minlength=m)
        absorption.add(g_rows, g_feats, gt_on, on)
        if decode is not None:
            x_hat = decode(z_raw).detach().float().cpu()
        else:  # z is sparse: sum the decoder rows of the firing latents only
            offsets = torch.cumsum(torch.bincount(z_rows, minlength=z.shape[0]), 0)
            offsets = torch.cat([offsets.new_zeros(1), offsets[:-1]])
            x_hat = F.embedding_bag(z_lat, W, offsets, mode="sum", per_sample_weights=z[z_rows, z_lat]) + bias
        _add_reconstruction(sums, sum_x, xc.cpu().double(), x_hat.double())
    n = x.shape[0]
    total_var = float(sums[0]) / n - float((sum_x / n).pow(2).sum())
    mse = float(sums[1]) / n
    explained = (1.0 if mse < 1e-10 else 0.0) if total_var < 1e-10 else 1.0 - mse / total_var
    precision, recall, f1 = _prf(tp, n_on - tp, true_count[best_feature] - tp)
    return {
        "f1": f1,
        "precision": precision,
        "recall": recall,
        "mcc": mcc,
        "uniqueness": uniqueness,
        "absorption": absorption.compute(min_support),
        "explained_variance": explained,
        "l0": float(n_on.sum()) / n,
        "dead": float((n_on == 0).float().mean()),
        "shrinkage": float(sums[2] / sums[3]) if sums[3] > 0 else 0.0,
    }
