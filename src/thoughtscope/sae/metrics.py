"""SAE quality metrics: reconstruction (MSE, FVU, L0, dead fraction) and spliced language-model loss."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from .base import SAE
from .config import SAEError


@torch.no_grad()
def evaluate_sae(sae: SAE, batches: Iterable[torch.Tensor], *, max_batches: int | None = None) -> dict[str, Any]:
    """Reconstruction metrics over raw-activation batches [B, d] (or [B, T, d]).

    FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 with the mean over the whole eval set (computed in one
    pass from running sums). dead_frac = share of features that never fired on the eval set.
    """
    d = sae.cfg.d_model
    dev = sae.device
    sse = 0.0
    n = 0
    s1 = torch.zeros(d, dtype=torch.float64, device=dev)
    s2 = torch.zeros((), dtype=torch.float64, device=dev)
    l0 = 0.0
    fired = torch.zeros(sae.cfg.n_features, dtype=torch.bool, device=dev)
    for i, x in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        if isinstance(x, (tuple, list)):
            x = x[0]
        x = x.reshape(-1, x.shape[-1]).to(dev, torch.float32)
        if x.shape[-1] != d:
            raise SAEError(f"eval batch {i} has d={x.shape[-1]} but the SAE expects d_model={d}")
        if not bool(torch.isfinite(x).all()):
            raise SAEError(f"eval batch {i} contains NaN/Inf")
        f, xh = sae(x)
        sse += float((x - xh).double().pow(2).sum())
        s1 += x.double().sum(0)
        s2 += x.double().pow(2).sum()
        act = f > 0
        l0 += float(act.sum())
        fired |= act.any(0)
        n += x.shape[0]
    if n == 0:
        raise SAEError("evaluate_sae got no batches")
    total_var = float(s2 - s1.pow(2).sum() / n)
    return {
        "n_tokens": n,
        "mse": sse / (n * d),
        "mse_per_token": sse / n,
        "fvu": sse / max(total_var, 1e-30),
        "explained_variance": 1 - sse / max(total_var, 1e-30),
        "l0": l0 / n,
        "dead_frac": float((~fired).float().mean()),
        "n_dead": int((~fired).sum()),
    }


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss and token count (positions with mask==0 in the target are skipped)."""
    lp = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    w = torch.ones_like(lp) if mask is None else mask[:, 1:].reshape(-1).to(lp)
    return (lp * w).sum(), w.sum()


@torch.no_grad()
def spliced_lm_loss(
    lm: Any,
    sae: SAE,
    site: Any,
    token_batches: Iterable[torch.Tensor],
    *,
    mean_act: torch.Tensor | None = None,
    exclude_first: bool = True,
    max_batches: int | None = None,
) -> dict[str, float]:
    """LM loss with the SAE reconstruction spliced in at site vs clean, zero- and mean-ablated.

    loss_recovered = (L_zero - L_sae) / (L_zero - L_clean); kl_sae = mean KL(clean || spliced) of the next-token
    distributions. Position 0 (the attention sink, norm ~100x the rest) always keeps its original activation in
    every variant (exclude_first=True): the SAE is not trained on it and replacing it would dominate the result.
    mean_act: the mean activation for mean ablation (default: mean over non-first positions of each batch).
    token_batches: LongTensor [B, T] or (input_ids, attention_mask) pairs.
    """
    from thoughtscope.models import edit  # late import: models is a heavier module

    dev = sae.device
    tot = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "mean": 0.0}
    kl_sum = {"sae": 0.0, "zero": 0.0, "mean": 0.0}
    n_tok = 0.0
    for i, batch in enumerate(token_batches):
        if max_batches is not None and i >= max_batches:
            break
        ids, mask = batch if isinstance(batch, (tuple, list)) else (batch, None)
        ids = ids.to(lm.device)
        mask = None if mask is None else mask.to(lm.device)
        kw = {} if mask is None else {"attention_mask": mask}
        clean_logits = lm.model(ids, **kw).logits.float()
        loss, n = _lm_loss(clean_logits, ids, mask)
        tot["clean"] += float(loss)
        n_tok += float(n)
        clean_lp = clean_logits[:, :-1].log_softmax(-1)

        def make(kind: str):
            def fn(acts: torch.Tensor) -> torch.Tensor:
                a = acts.float()
                if kind == "sae":
                    new = sae(a.to(dev))[1].to(a)
                elif kind == "zero":
                    new = torch.zeros_like(a)
                else:
                    mu = mean_act.to(a) if mean_act is not None else a[:, 1:].reshape(-1, a.shape[-1]).mean(0)
                    new = mu.expand_as(a).clone()
                if exclude_first:
                    new[:, 0] = a[:, 0]
                return new.to(acts.dtype)

            return fn

        for kind in ("sae", "zero", "mean"):
            with edit(lm, site, make(kind)):
                logits = lm.model(ids, **kw).logits.float()
            loss, _ = _lm_loss(logits, ids, mask)
            tot[kind] += float(loss)
            lp = logits[:, :-1].log_softmax(-1)
            kl = (clean_lp.exp() * (clean_lp - lp)).sum(-1)
            w = torch.ones_like(kl) if mask is None else mask[:, 1:].to(kl)
            kl_sum[kind] += float((kl * w).sum())
    if n_tok == 0:
        raise SAEError("spliced_lm_loss got no token batches")
    L = {k: v / n_tok for k, v in tot.items()}
    denom = L["zero"] - L["clean"]
    denom_mean = L["mean"] - L["clean"]
    return {
        "loss_clean": L["clean"],
        "loss_sae": L["sae"],
        "loss_zero_ablated": L["zero"],
        "loss_mean_ablated": L["mean"],
        "loss_recovered": (L["zero"] - L["sae"]) / denom if abs(denom) > 1e-12 else float("nan"),
        "loss_recovered_vs_mean": (L["mean"] - L["sae"]) / denom_mean if abs(denom_mean) > 1e-12 else float("nan"),
        "kl_sae": kl_sum["sae"] / n_tok,
        "kl_zero": kl_sum["zero"] / n_tok,
        "kl_mean": kl_sum["mean"] / n_tok,
        "n_tokens": n_tok,
        "first_position_excluded": exclude_first,
    }
