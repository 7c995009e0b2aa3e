"""Which SAE features pushed this token? Each feature's activation × the gradient of the metric with respect to it,
at every position, plus the SAE's error term, checked by ablating the top features in the real model.

The SAE is spliced in at its site so the forward pass is unchanged: h = decode(f) + (h − decode(f)), with f and the
error as separate nodes. The attribution of feature i at position t is f_t,i · ∂metric/∂f_t,i, a first-order
estimate of what removing it there would cost; the error term's is e_t · ∂metric/∂h_t. `attribute` also measures,
for the top features (summed over positions), the metric with the feature ablated at every position in the model
itself, and reports the Spearman correlation between estimate and measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..display import token_texts
from ..errors import CausalError
from ..models import LoadedModel
from ..sites import Site
from ..stats import spearman
from .patching import PatchPair, _last_logits, _metric_fn
from .residuals import ResidualCache, readout, sae_codes, splice_sae


@dataclass
class FeatureAttribution:
    tokens: list[str]
    metric: float
    site: str
    per_position: list[list[tuple[int, float]]]  # per position: (feature, attribution), strongest first
    error: list[float]  # per position: the SAE error term's attribution
    total: dict[int, float]  # feature -> attribution summed over positions
    ablation: dict[int, float] = field(default_factory=dict)  # feature -> metric change when it is ablated
    spearman: float | None = None

    def to_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "metric": self.metric,
            "site": self.site,
            "per_position": self.per_position,
            "error": self.error,
            "top": sorted(self.total.items(), key=lambda kv: -abs(kv[1]))[:50],
            "ablation": self.ablation,
            "attribution_vs_ablation_spearman": self.spearman,
        }


def _spliced(lm: LoadedModel, sae, site: Site, ids: torch.Tensor, metric, *, ablate: torch.Tensor | None = None):
    """(metric, f, grad f, error, grad h) with the SAE spliced in; `ablate` [R, n] zeroes features per row instead."""
    keep: dict[str, torch.Tensor] = {}

    def hook(_m, _a, output):
        h = output[0] if isinstance(output, tuple) else output
        if ablate is not None:
            new = h - ((sae_codes(sae, h) * ablate[:, None, :]) @ sae.W_dec).to(h.dtype)
        else:
            new, keep["f"], keep["err"] = splice_sae(sae, h)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = lm.layers[site.layer].register_forward_hook(hook)
    try:
        if ablate is not None:
            with torch.inference_mode():
                return metric(_last_logits(lm, ids.expand(len(ablate), -1))).float().cpu()
        with torch.enable_grad():
            m = metric(_last_logits(lm, ids)).sum()
            gf, ge = torch.autograd.grad(m, [keep["f"], keep["err"]])
    finally:
        handle.remove()
    return float(m.detach()), keep["f"].detach()[0], gf[0], keep["err"].detach()[0], ge[0]


def _from_cache(lm: LoadedModel, cache: ResidualCache, ids: torch.Tensor, pos: int, metric):
    """`_spliced`'s first-order answer from the cache's reading of the whole text: one backward pass from the
    metric at `pos` (the features after `pos` get no gradient: the model is causal)."""
    sp = cache.spliced(lm, ids)
    with torch.enable_grad():
        m = metric(readout(lm, sp.top[:, pos])).sum()
        gf, ge = torch.autograd.grad(m, [sp.f, sp.err], retain_graph=True)
    n = pos + 1
    return float(m.detach()), sp.f.detach()[0, :n], gf[0, :n], sp.err.detach()[0, :n], ge[0, :n]


def attribute(
    lm: LoadedModel,
    sae,
    text: str,
    target: str | int,
    against: str | None = None,
    *,
    per_position: int = 5,
    check: int = 50,
    pos: int | None = None,
    cache: ResidualCache | None = None,
) -> FeatureAttribution:
    """Feature attribution for the next token after `text` (after its position `pos` when given: the text is
    read up to there), the top `check` features checked by ablation (0: not checked, the cheap view). With a
    `cache` holding this SAE (the analyzer's), the first-order part is one backward pass through its reading."""
    site = lm.check_site(sae.cfg.site)
    ids, _ = lm.tokenize([text])
    whole = ids
    if pos is not None:
        if not 0 <= pos < ids.shape[1]:
            raise CausalError(f"position {pos} is out of range: the text has positions 0..{ids.shape[1] - 1}")
        ids = ids[:, : pos + 1]
    metric = _metric_fn(lm, PatchPair(text, text, target, against))
    for p in sae.parameters():
        p.requires_grad_(False)
    if cache is not None and cache.sae is sae and site.stream == "resid":
        m, f, gf, err, gerr = _from_cache(lm, cache, whole, ids.shape[1] - 1, metric)
    else:
        m, f, gf, err, gerr = _spliced(lm, sae, site, ids, metric)
    attr = (f * gf).cpu()  # [T, n]
    rows = []
    for t in range(attr.shape[0]):
        v, i = attr[t].abs().topk(min(per_position, attr.shape[1]))
        rows.append([(int(a), float(attr[t, a])) for a, b in zip(i, v) if b > 0])
    total_t = attr.sum(0)
    nz = total_t.nonzero().flatten()
    total = {int(i): float(total_t[i]) for i in nz}
    res = FeatureAttribution(
        token_texts(lm.tokenizer, ids[0].tolist()),
        m,
        str(site),
        rows,
        (err * gerr).sum(-1).cpu().tolist(),
        total,
    )
    top = sorted(total, key=lambda k: -abs(total[k]))[:check]
    if len(top) >= 3:
        mask = torch.zeros(len(top), sae.W_dec.shape[0], device=sae.W_dec.device)
        mask[torch.arange(len(top)), torch.tensor(top)] = 1.0
        ablated = _spliced(lm, sae, site, ids, metric, ablate=mask)
        res.ablation = {k: m - float(a) for k, a in zip(top, ablated)}
        res.spearman = spearman([total[k] for k in top], [res.ablation[k] for k in top])
    return res
