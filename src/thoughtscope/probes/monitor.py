"""Monitoring: score new text per token with a saved probe, with a threshold set on neutral text at a stated FPR.

The threshold is the empirical (1 − FPR) quantile of the probe's score over every readable token of neutral
text (the default corpus): activation distributions are not Gaussian, so no parametric fit. Position 0 and
attention sinks get no score (NaN), as they are never read anywhere else either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ProbeError
from .config import old_keyword
from .metrics import recall_at_fpr, threshold_at_fpr
from .probe import Probe
from .read import token_activations


@dataclass
class TokenScores:
    text: str
    tokens: list[str]
    scores: torch.Tensor  # [T], NaN where a token is never read (position 0, sinks)

    @property
    def max(self) -> float:
        s = self.scores[~self.scores.isnan()]
        return float(s.max()) if s.numel() else float("nan")

    @property
    def mean(self) -> float:
        s = self.scores[~self.scores.isnan()]
        return float(s.mean()) if s.numel() else float("nan")


def score_texts(
    lm,
    probe: Probe,
    texts: Sequence[str],
    *,
    texts_per_batch: int = 16,
    max_length: int = 512,
    batch_size: int | None = None,
) -> list[TokenScores]:
    """Per-token probe scores for each text (one forward pass per batch, stopping after the probe's block)."""
    probe.check(lm)
    if isinstance(texts, str):
        texts = [texts]
    per_batch = old_keyword(texts_per_batch, batch_size, old="batch_size", new="texts_per_batch", where="score_texts")
    rows = token_activations(lm, list(texts), [probe.cfg.site], texts_per_batch=per_batch, max_length=max_length)
    out = []
    for text, (ids, acts, ok) in zip(texts, rows):
        s = probe.score(acts[probe.cfg.site])
        s = torch.where(ok, s, torch.full_like(s, float("nan")))
        out.append(TokenScores(text, [lm.tokenizer.decode([int(i)]) for i in ids], s))
    return out


def neutral_texts(n_docs: int = 64, max_chars: int = 600, corpus: str = "default") -> list[str]:
    """The first documents of the project's neutral corpus, cut to a few sentences each."""
    from ..corpus import Corpus

    out = []
    for doc in Corpus(corpus).documents():
        doc = doc.strip()
        if doc:
            out.append(doc[:max_chars])
        if len(out) >= n_docs:
            break
    if not out:
        raise ProbeError(f"corpus {corpus!r} gave no documents to set a monitoring threshold on")
    return out


def calibrate(
    lm,
    probe: Probe,
    *,
    fprs: Sequence[float] = (0.01, 0.05),
    neutral: Sequence[str] | None = None,
    positives=None,
    negatives=None,
) -> dict:
    """Token thresholds at each FPR on neutral text; with positive (and negative) texts of the concept, the
    share of them whose score at the probe's read position (its last token) passes each threshold."""
    neutral = list(neutral) if neutral is not None else neutral_texts()
    ns = torch.cat([t.scores[~t.scores.isnan()] for t in score_texts(lm, probe, neutral)])
    out = {
        "n_neutral_texts": len(neutral),
        "n_neutral_tokens": int(ns.numel()),
        "thresholds": {},
        "recall": {},
        "false_alarms_on_negatives": {},
    }
    last = lambda texts: torch.tensor([_last(t) for t in score_texts(lm, probe, texts)])  # noqa: E731
    pos = last(positives) if positives else None
    neg = last(negatives) if negatives else None
    for f in fprs:
        key = f"{100 * f:g}%"
        out["thresholds"][key] = threshold_at_fpr(ns, f)
        if pos is not None:
            out["recall"][key] = recall_at_fpr(pos, ns, f)
        if neg is not None:
            out["false_alarms_on_negatives"][key] = recall_at_fpr(neg, ns, f)
    return out


def _last(ts: TokenScores) -> float:
    s = ts.scores[~ts.scores.isnan()]
    return float(s[-1]) if s.numel() else float("nan")
