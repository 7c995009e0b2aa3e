"""Causal check: does pushing along the probe direction change what the model says, more than a random push?

Following Marks & Tegmark: add α class gaps of the probe's unit direction at its site (every position after
0) while the model reads "<statement> This statement is", and measure P(" true") − P(" false") at the next
token (or any two label words). The same sweep with random directions of equal norm is the control.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ProbeError
from ..steer.interventions import VectorEdit, steering
from .probe import Probe


def _word_id(lm, word: str) -> int:
    ids = lm.tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ProbeError(f"label word {word!r} gives no token for {lm.name}")
    return int(ids[0])


@torch.no_grad()
def _p_gap(lm, texts: list[str], yes: int, no: int, ivs: list, texts_per_batch: int = 16) -> torch.Tensor:
    out = []
    with steering(lm, ivs):
        for i in range(0, len(texts), texts_per_batch):
            ids, mask = lm.tokenize(texts[i : i + texts_per_batch])
            logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            last = logits[torch.arange(ids.shape[0]), mask.sum(1) - 1].softmax(-1)
            out.append((last[:, yes] - last[:, no]).cpu())
    return torch.cat(out)


def causal_check(
    lm,
    probe: Probe,
    texts: Sequence[str],
    *,
    strengths: Sequence[float] = (-2, -1, 0, 1, 2),
    suffix: str = " This statement is",
    words: tuple[str, str] = (" true", " false"),
    n_random: int = 3,
    seed: int = 0,
) -> dict:
    """Mean change of P(words[0]) − P(words[1]) against α = 0, for the probe's vector and random ones."""
    probe.check(lm)
    texts = [t + suffix for t in texts]
    if not texts:
        raise ProbeError("causal_check needs at least one text")
    yes, no = _word_id(lm, words[0]), _word_id(lm, words[1])
    vec = probe.to_vector().vector
    g = torch.Generator().manual_seed(seed + 31337)
    randoms = [torch.randn(vec.shape[0], generator=g) for _ in range(n_random)]
    randoms = [r / r.norm() * vec.norm() for r in randoms]
    site = probe.cfg.site

    def edit(v, a):
        return [VectorEdit(v, site, "add", float(a), label="causal")] if a else []

    base = _p_gap(lm, texts, yes, no, [])
    rows = []
    for a in strengths:
        d_probe = float((_p_gap(lm, texts, yes, no, edit(vec, a)) - base).mean()) if a else 0.0
        d_rand = [float((_p_gap(lm, texts, yes, no, edit(r, a)) - base).mean()) if a else 0.0 for r in randoms]
        rows.append(
            {
                "strength": a,
                "probe": d_probe,
                "random_mean": sum(d_rand) / len(d_rand),
                "random_max_abs": max(abs(x) for x in d_rand),
            }
        )
    return {
        "site": site,
        "unit": "class gap",
        "class_gap": probe.cfg.class_gap,
        "words": list(words),
        "suffix": suffix,
        "n_texts": len(texts),
        "baseline_gap": float(base.mean()),
        "sweep": rows,
    }
