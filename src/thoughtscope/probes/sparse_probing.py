"""k-sparse probing of an SAE's latents against the raw residual stream, as SAEBench's sparse-probing eval defines it.

For each labelled dataset every text is read once at the SAE's site; a text becomes one vector by the mean over its
readable tokens (position 0 and attention-sink tokens left out, the rule `probes.read` uses) of either the SAE's
latents (each token encoded, then averaged) or the raw residual. On the training split the k coordinates with the
largest absolute difference of class means are kept, an L2 logistic regression (scikit-learn's objective with
C = 1, no standardising: `fitters.logistic_raw`) is fitted on those k, and the held-out split is scored by AUROC
(and accuracy at the probe's own threshold, SAEBench's figure). The same is done on the residual's coordinates
(the baseline a dictionary should beat at small k) and with every residual coordinate (the ceiling).

Differences from SAEBench, on purpose: the datasets are the built-in probe sets (cities, translations, sentiment:
true/false statements and sentiment, split so that no group straddles train and test) instead of its six
classification sets; the held-out figure is AUROC first (accuracy is reported beside it); the full-residual probe is
the same L2 logistic regression, not its separately trained GPU probe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import ProbeError
from ..stats import auroc
from .datasets import ProbeSet, group_split
from .fitters import logistic_raw
from .read import token_activations

DATASETS = ("cities", "translations", "sentiment")  # the built-in sets whose tables ship in assets/probe_data
KS = (1, 2, 5, 20)


def top_k_mean_diff(X: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k columns of X [N, d] whose class means (y in {0, 1}) differ most in absolute value, largest
    first (ties broken by the lower index, so the choice is deterministic)."""
    y = torch.as_tensor(y).bool()
    diff = (X[y].double().mean(0) - X[~y].double().mean(0)).abs()
    order = torch.sort(-diff, stable=True).indices
    return order[: min(k, X.shape[1])]


def probe_auroc(
    X_train: torch.Tensor, y_train: torch.Tensor, X_test: torch.Tensor, y_test: torch.Tensor, *, C: float = 1.0
) -> dict[str, float]:
    """L2 logistic regression (C·Σ log-loss + ½‖w‖², no standardising) fitted on the training rows, scored on the
    test rows: {"auroc", "accuracy"} (accuracy at the probe's own threshold, score > 0)."""
    W, b = logistic_raw(X_train, y_train, C)
    s = (X_test.double() @ W[0].double()) + b[0].double()
    y = torch.as_tensor(y_test).long()
    return {"auroc": float(auroc(s, y)), "accuracy": float(((s > 0).long() == y).double().mean())}


def k_sparse_scores(
    X_train: torch.Tensor,
    y_train: torch.Tensor,
    X_test: torch.Tensor,
    y_test: torch.Tensor,
    ks: Sequence[int] = KS,
    *,
    C: float = 1.0,
) -> dict[int, dict[str, float]]:
    """For each k: the k columns with the largest class-mean difference on the training rows, a logistic probe on
    them, its held-out AUROC and accuracy (`probe_auroc`); plus the chosen columns under "features"."""
    y_train = torch.as_tensor(y_train).long()
    out: dict[int, dict] = {}
    for k in ks:
        idx = top_k_mean_diff(X_train, y_train, int(k))
        r = probe_auroc(X_train[:, idx], y_train, X_test[:, idx], y_test, C=C)
        out[int(k)] = {**r, "features": idx.tolist()}
    return out


@torch.no_grad()
def mean_pooled(
    lm, sae, texts: Sequence[str], *, texts_per_batch: int = 16, site: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per text, the mean over its readable tokens of the residual at the SAE's site [N, d] and of the SAE's latents
    (each token encoded, then averaged) [N, m], float32 on the CPU."""
    name = str(lm.check_site(site or sae.cfg.site or ""))
    dev, dt = sae.W_dec.device, sae.W_dec.dtype
    resid, latents = [], []
    for i, (_ids, acts, ok) in enumerate(token_activations(lm, texts, [name], texts_per_batch=texts_per_batch)):
        x = acts[name][ok]
        if x.shape[0] == 0:
            raise ProbeError(f"text {i} ({texts[i][:60]!r}) has no readable token at {name} (all sink or position 0)")
        resid.append(x.mean(0))
        latents.append(sae.encode(x.to(dev, dt)).float().mean(0).cpu())
    return torch.stack(resid).float(), torch.stack(latents).float()


def dataset_scores(
    resid: torch.Tensor,
    latents: torch.Tensor,
    ds: ProbeSet,
    *,
    ks: Sequence[int] = KS,
    seed: int = 0,
    test_fraction: float = 0.25,
    C: float = 1.0,
) -> dict:
    """Sparse probing of one dataset from its mean-pooled vectors: SAE latents and residual coordinates at each k,
    the full-residual ceiling, and the split's sizes."""
    split = group_split(ds, test_fraction=test_fraction, seed=seed)
    y = ds.y
    tr, te = torch.tensor(split.train), torch.tensor(split.test)
    sae = k_sparse_scores(latents[tr], y[tr], latents[te], y[te], ks, C=C)
    res = k_sparse_scores(resid[tr], y[tr], resid[te], y[te], ks, C=C)
    full = probe_auroc(resid[tr], y[tr], resid[te], y[te], C=C)
    return {
        "sae": {str(k): v for k, v in sae.items()},
        "residual": {str(k): v for k, v in res.items()},
        "residual_full": full,
        "n_train": len(split.train),
        "n_test": len(split.test),
    }


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values))


def sparse_probing(
    lm,
    sae,
    *,
    datasets: Sequence[str] | Sequence[ProbeSet] = DATASETS,
    ks: Sequence[int] = KS,
    seed: int = 0,
    test_fraction: float = 0.25,
    C: float = 1.0,
    texts_per_batch: int = 16,
    load: Callable[[str], ProbeSet] | None = None,
) -> dict:
    """k-sparse probing on the SAE's latents and on the raw residual, for each dataset (a built-in name or a
    ProbeSet). Returns per dataset `dataset_scores`, and the means over datasets:

    - auc_by_k / residual_auc_by_k: {k: held-out AUROC} on the k SAE latents / k residual coordinates;
    - auc / residual_auc: their mean over the ks (the headline sparse-probing AUROC);
    - accuracy_by_k / residual_accuracy_by_k: the same as accuracy (SAEBench's reported figure);
    - residual_full_auc: the probe on every residual coordinate (the ceiling).
    """
    from .generators import builtin

    load = load or builtin
    per: dict[str, dict] = {}
    for d in datasets:
        ds = load(d) if isinstance(d, str) else d
        resid, latents = mean_pooled(lm, sae, ds.texts, texts_per_batch=texts_per_batch)
        per[ds.name] = dataset_scores(resid, latents, ds, ks=ks, seed=seed, test_fraction=test_fraction, C=C)
    keys = [str(int(k)) for k in ks]
    out: dict = {"datasets": per, "ks": [int(k) for k in ks]}
    for side, prefix in (("sae", ""), ("residual", "residual_")):
        for metric in ("auc", "accuracy"):
            field = "auroc" if metric == "auc" else "accuracy"
            by_k = {k: _mean(r[side][k][field] for r in per.values()) for k in keys}
            out[f"{prefix}{metric}_by_k"] = by_k
            out[f"{prefix}{metric}"] = _mean(by_k.values())
    out["residual_full_auc"] = _mean(r["residual_full"]["auroc"] for r in per.values())
    out["residual_full_accuracy"] = _mean(r["residual_full"]["accuracy"] for r in per.values())
    return out
