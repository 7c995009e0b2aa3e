"""Concept erasure: LEACE (EleutherAI's concept-erasure, fitted in float64) applied at a site during the forward pass.

`EraseEdit` is a `VectorEdit`, so it goes into the same `steering(lm, [...])` block as any other intervention
and leaves the model untouched when the block exits. Position 0 and attention sinks (norm above `max_norm`)
are never edited: LEACE is affine, and moving a 24,000-norm sink by the concept's mean would be meaningless.

LEACE's guarantee, stated exactly: on the data it was fitted on, the class means become equal, so no linear
classifier beats a constant predictor under a convex loss. It says nothing about held-out rows, nonlinear
probes or later layers; `erase_check` therefore measures a freshly trained probe on held-out rows, and the
language-model loss change against erasing a random subspace of the same rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ProbeError
from ..steer.interventions import StepContext, VectorEdit
from .config import old_keyword


@dataclass
class EraseEdit(VectorEdit):
    """x ← x − ((x − mean) · right) · left, at every readable token of the site."""

    left: Tensor | None = None  # [d, k]
    right: Tensor | None = None  # [k, d]
    mean: Tensor | None = None  # [d]
    max_norm: float | None = None

    def __post_init__(self) -> None:
        if self.left is None or self.right is None:
            raise ProbeError("EraseEdit needs the eraser's left [d, k] and right [k, d] factors")
        self.op = "project_out"  # validated by VectorEdit; apply below does the erasure instead
        super().__post_init__()
        self.left, self.right = self.left.float(), self.right.float()
        self.mean = torch.zeros(self.left.shape[0]) if self.mean is None else self.mean.float()

    def to(self, device) -> EraseEdit:
        super().to(device)
        self.left, self.right, self.mean = self.left.to(device), self.right.to(device), self.mean.to(device)
        return self

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    def apply(self, h: Tensor, ctx: StepContext) -> Tensor:
        mask = ctx.mask(self.positions, h.shape[1], h.device)
        if mask is False:
            return h
        x = h.float()
        new = x - ((x - self.mean) @ self.right.T) @ self.left.T
        keep = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        if ctx.offset == 0:
            keep[:, 0] = False  # position 0: the attention sink, never edited
        if self.max_norm is not None:
            keep &= x.norm(dim=-1) <= self.max_norm
        if mask is not True:
            keep &= mask[..., 0]
        return torch.where(keep[..., None], new.to(h.dtype), h)


def fit_eraser(X: Tensor, y: Tensor, site: str, *, sink_ratio: float = 10.0, method: str = "leace") -> EraseEdit:
    """LEACE (or "orth") eraser for a binary concept from rows X [N, d], fitted in float64."""
    from concept_erasure import LeaceFitter

    y = torch.as_tensor(y)
    if X.dim() != 2 or X.shape[0] != y.shape[0]:
        raise ProbeError(f"fit_eraser needs X [N, d] and N labels, got {tuple(X.shape)} and {tuple(y.shape)}")
    if set(y.tolist()) != {0, 1}:
        raise ProbeError("fit_eraser needs both classes 0 and 1")
    fitter = LeaceFitter(X.shape[1], 1, method=method, dtype=torch.float64)
    fitter.update(X.double(), y.double()[:, None])
    e = fitter.eraser
    left, right = e.proj_left, e.proj_right
    mean = e.bias if e.bias is not None else torch.zeros(X.shape[1], dtype=torch.float64)
    max_norm = sink_ratio * float(X.float().norm(dim=1).median())
    return EraseEdit(
        left[:, 0].float(),
        site,
        left=left,
        right=right,
        mean=mean,
        max_norm=max_norm,
        label=f"LEACE rank {left.shape[1]}",
    )


def random_eraser(
    d: int, rank: int, site: str, mean: Tensor, seed: int = 0, max_norm: float | None = None
) -> EraseEdit:
    """Orthogonal projection removing a random subspace of the given rank (around the same mean): the control."""
    g = torch.Generator().manual_seed(seed + 271828)
    Q = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))[0]
    return EraseEdit(
        Q[:, 0].float(), site, left=Q, right=Q.T, mean=mean, max_norm=max_norm, label=f"random rank {rank}"
    )


@torch.no_grad()
def lm_loss(
    lm,
    interventions=(),
    *,
    n_contexts: int = 16,
    ctx_len: int = 128,
    contexts_per_batch: int = 8,
    corpus: str = "default",
    texts=None,
    batch_size: int | None = None,
) -> float:
    """Mean next-token cross-entropy on the first contexts of a corpus (or on texts), interventions active;
    `contexts_per_batch` contexts per forward pass (`batch_size` is its old name, deprecated)."""
    from ..corpus import Corpus
    from ..steer.interventions import steering

    per_batch = old_keyword(contexts_per_batch, batch_size, old="batch_size", new="contexts_per_batch", where="lm_loss")
    total, count, seen = 0.0, 0, 0
    if texts is not None:
        batches = [
            lm.tokenize(list(texts[i : i + per_batch]), max_length=ctx_len) for i in range(0, len(texts), per_batch)
        ]
    else:
        batches = (
            (c.input_ids, torch.ones_like(c.input_ids))
            for c in Corpus(corpus).batches(lm.tokenizer, ctx_len, per_batch)
        )
    with steering(lm, list(interventions)):
        for ids, mask in batches:
            ids, mask = ids.to(lm.device)[: n_contexts - seen], mask.to(lm.device)[: n_contexts - seen]
            logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
            )
            m = mask[:, 1:].reshape(-1).float()
            total += float((nll * m).sum())
            count += int(m.sum())
            seen += ids.shape[0]
            if seen >= n_contexts:
                break
    return total / max(count, 1)


def erase_check(
    lm,
    ds,
    site: str,
    read=None,
    *,
    seed: int = 0,
    fitters=("mean", "logistic"),
    n_contexts: int = 16,
    cache=None,
    loss_texts=None,
    reread: bool = True,
) -> dict:
    """Fit LEACE on the training split, re-read every row with the erasure active, train fresh probes, and report
    held-out AUROC before/after (and after a random erasure of the same rank), plus the LM-loss change.

    reread=False applies the eraser to the cached rows instead of a second forward pass: at the site where it
    acts the two are identical (the edit hook runs before the read; tested), which saves two passes on a CPU."""
    from ..steer.interventions import steering
    from .datasets import group_folds, group_split
    from .fitters import fit
    from .metrics import auroc
    from .read import ReadConfig, read_activations, site_names

    read = read or ReadConfig()
    (name,) = site_names(lm, [site])
    if name == "embed":
        raise ProbeError("erasure is applied at a block's output (resid.L), not at the embeddings")
    split = group_split(ds, 0.25, seed)
    tr, te = torch.tensor(split.train), torch.tensor(split.test)
    y = ds.y
    X = read_activations(lm, ds, [name], read, cache=cache)[name]
    eraser = fit_eraser(X[tr], y[tr], name)
    control = random_eraser(lm.d_model, eraser.rank, name, eraser.mean, seed, eraser.max_norm)
    pos = {r: k for k, r in enumerate(split.train)}
    folds = [([pos[i] for i in a], [pos[i] for i in b]) for a, b in group_folds(ds.groups, split.train, 4, seed)]

    def held_out(Xs):
        out = {}
        for m in fitters:
            W, b, _ = fit(m, Xs[tr][None], y[tr], seed=seed, **({"folds": folds} if m == "logistic" else {}))
            out[m] = float(auroc(Xs[te] @ W[0] + b[0], y[te]))
        return out

    result = {
        "site": name,
        "dataset": ds.name,
        "rank": eraser.rank,
        "n_train": len(tr),
        "n_test": len(te),
        "before": held_out(X),
    }
    from ..steer.interventions import StepContext

    for tag, iv in (("after_leace", eraser), ("after_random", control)):
        if reread:
            with steering(lm, [iv]):
                Xe = read_activations(lm, ds, [name], read, cache=False)[name]
        else:
            # the eraser goes where the rows go (steering would move it there too); rows are never position 0
            Xe = iv.to(lm.device).apply(X[None].to(lm.device), StepContext(offset=1))[0].cpu()
        result[tag] = held_out(Xe)
    result["reread"] = reread
    kw = {"n_contexts": n_contexts, "texts": loss_texts}
    base = lm_loss(lm, **kw)
    result["lm_loss"] = {
        "none": base,
        "leace": lm_loss(lm, [eraser], **kw),
        "random": lm_loss(lm, [control], **kw),
        "n_contexts": n_contexts,
        "corpus": "default" if loss_texts is None else "given texts",
    }
    result["lm_loss"]["delta_leace"] = result["lm_loss"]["leace"] - base
    result["lm_loss"]["delta_random"] = result["lm_loss"]["random"] - base
    result["max_auroc_after_leace"] = max(result["after_leace"].values())
    result["passes"] = result["max_auroc_after_leace"] <= 0.55  # the bar, for every fresh probe
    return result
