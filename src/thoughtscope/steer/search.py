"""Finding what to steer: contrastive feature search, top features at a token, feature maxima.

Contrastive search follows the way the Golden Gate feature was found: features that fire on prompts
about a concept and not on control prompts. Each prompt is summarised per feature by its maximum
activation over its tokens (position 0, the attention sink, and padding excluded), because a concept
feature fires on a few tokens and a token-level mean would dilute it. Scores (the output says which):

- "z" (default): (mean over prompts − mean over controls) / (pooled std + ε), where pooled std is
  sqrt((var_prompts + var_controls) / 2) of the per-prompt maxima and ε = 1% of the median per-prompt
  maximum of all features that fire, so a feature that is constant on both sets does not divide by 0;
- "freq": share of prompts where the feature fires minus share of controls where it fires
  (ties broken by the mean difference).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..models import LoadedModel, Site, capture
from .interventions import SteerError

SCORES = {
    "z": "(mean max-activation on prompts - mean on controls) / (pooled std + eps), per-prompt maxima",
    "freq": "fraction of prompts where the feature fires - fraction of controls where it fires",
}


@dataclass
class FeatureScore:
    feature: int
    score: float
    mean_prompts: float
    mean_controls: float
    freq_prompts: float
    freq_controls: float


@torch.no_grad()
def token_features(lm: LoadedModel, sae, site: str | Site, texts: Sequence[str], *, batch_size: int = 8):
    """Per text: (feature activations [T, n_features] for the kept tokens, token ids [T]); BOS/sink and pads dropped."""
    site = lm.check_site(site)
    if isinstance(texts, str) or not texts:
        raise SteerError("texts must be a non-empty list of strings")
    out = []
    dev = sae.W_dec.device
    for i in range(0, len(texts), batch_size):
        chunk = list(texts[i:i + batch_size])
        ids, mask = lm.tokenize(chunk)
        acts = capture(lm, site, ids, mask)[site]
        for b in range(len(chunk)):
            keep = mask[b].bool().clone()
            keep[0] = False  # position 0: BOS / attention sink, excluded as in SAE training
            x = acts[b][keep].to(dev, sae.W_dec.dtype)
            out.append((sae.encode(x).float().cpu(), ids[b][keep].cpu()))
    return out


def _per_text_max(lm, sae, site, texts, batch_size):
    feats = token_features(lm, sae, site, texts, batch_size=batch_size)
    n = int(sae.W_dec.shape[0])
    return torch.stack([f.max(0).values if len(f) else torch.zeros(n) for f, _ in feats])  # [N, n_features]


def contrast_features(lm: LoadedModel, sae, site: str | Site, prompts: Sequence[str], controls: Sequence[str], *,
                      score: str = "z", top: int = 20, batch_size: int = 8) -> list[FeatureScore]:
    """Features most active on `prompts` and least on `controls`, best first (see module doc for scores)."""
    if score not in SCORES:
        raise SteerError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    for name, s in (("prompts", prompts), ("controls", controls)):
        if isinstance(s, str) or len(s) == 0:
            raise SteerError(f"{name} must be a non-empty list of strings")
    a = _per_text_max(lm, sae, site, prompts, batch_size)
    c = _per_text_max(lm, sae, site, controls, batch_size)
    ma, mc = a.mean(0), c.mean(0)
    fa, fc = (a > 0).float().mean(0), (c > 0).float().mean(0)
    if score == "z":
        va = a.var(0, unbiased=False)
        vc = c.var(0, unbiased=False)
        fired = torch.cat([a, c])[torch.cat([a, c]) > 0]
        eps = 0.01 * float(fired.median()) if fired.numel() else 1e-6
        s = (ma - mc) / (((va + vc) / 2).sqrt() + max(eps, 1e-12))
    else:
        span = float((ma - mc).abs().max()) or 1.0
        s = (fa - fc) + 1e-3 * (ma - mc) / span
    order = s.argsort(descending=True)[:top]
    return [FeatureScore(int(i), float(s[i]), float(ma[i]), float(mc[i]), float(fa[i]), float(fc[i])) for i in order]


def top_features_at(lm: LoadedModel, sae, site: str | Site, text: str, token: int | str = -1, *,
                    top: int = 10) -> tuple[str, list[tuple[int, float]]]:
    """The strongest features at one token of a text.

    token: an index into the text's tokens (negative counts from the end; BOS not counted) or a string,
    meaning the last token whose text contains it. Returns (the token's text, [(feature, activation)]).
    """
    site = lm.check_site(site)
    ids, _ = lm.tokenize([text], add_bos=False)
    ids = ids[0]
    pieces = [lm.tokenizer.decode([int(t)]) for t in ids]
    if isinstance(token, str):
        hits = [i for i, p in enumerate(pieces) if token.strip() and token.strip() in p]
        if not hits:
            raise SteerError(f"no token of the text contains {token!r}; tokens are {pieces}")
        idx = hits[-1]
    else:
        if not -len(pieces) <= token < len(pieces):
            raise SteerError(f"token index {token} is out of range for a text of {len(pieces)} tokens")
        idx = token % len(pieces)
    full, mask = lm.tokenize([text])
    shift = full.shape[1] - len(pieces)  # 1 when a BOS was prepended
    acts = capture(lm, site, full, mask)[site][0, idx + shift]
    with torch.no_grad():
        f = sae.encode(acts.to(sae.W_dec.device, sae.W_dec.dtype)).float().cpu()
    vals, fi = f.topk(min(top, f.numel()))
    return pieces[idx], [(int(i), float(v)) for i, v in zip(fi, vals) if v > 0]


def feature_max_acts(lm: LoadedModel, sae, site: str | Site, texts: Sequence[str], features: Sequence[int] | None = None,
                     *, batch_size: int = 8) -> torch.Tensor:
    """Observed maximum activation of each feature over the texts' tokens (sink excluded): the "× max" unit."""
    m = _per_text_max(lm, sae, site, texts, batch_size).max(0).values
    return m if features is None else m[torch.as_tensor(list(features), dtype=torch.long)]
