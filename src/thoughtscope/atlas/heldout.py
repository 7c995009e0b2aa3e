"""Which contexts an explanation may be written from, and which it is judged on.

An explanation is only worth its score on contexts it has not seen, so every feature's stored contexts are
split by *context id* (not by example: one context can hold several examples of a feature):

* shown (the explainer reads these): the top `n_top` examples and `n_quantile` examples spread over the
  rank-quantile bins, plus, as a picture of ordinary text, the "background" half of the atlas's fixed random
  context sample (even positions of `meta["random_contexts"]`);
* held out (the scorer is judged on these): activating windows from the remaining top and quantile examples
  whose context the explainer never saw, and silent windows (the feature is zero on every shown token) from
  the other half of the random sample (odd positions).

Why not a second pass over unseen text: the atlas already keeps 20 top and 50 quantile-sampled contexts per
feature (10 + 20 shown, the rest held out) and the random sample records every activation of every feature,
so a held-out set exists for every feature without reading the corpus again or rebuilding older atlases.
The quantile examples are a uniform sample of the feature's activations, so held-out positives are mostly
ordinary-strength activations, not only the strongest ones.
"""

from __future__ import annotations

import random
import weakref
from dataclasses import InitVar, dataclass, field

import numpy as np

from ..errors import ExplainerError  # noqa: F401  (re-exported: their old home)
from ..renamed import warn_renamed
from .db import Atlas, Example

_PIECES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_cache(tokenizer) -> dict:
    """A dict that lives as long as the tokenizer, for decoded text keyed by token ids."""
    try:
        return _PIECES.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no cache
        return {}


def piece(tokenizer, tid: int) -> str:
    """One token as text (newlines as ⏎), cached per tokenizer: decoding ids one by one is the slow part."""
    cache = token_cache(tokenizer)
    s = cache.get(tid)
    if s is None:
        s = tokenizer.decode([int(tid)]).replace("\n", "⏎")
        cache[tid] = s
    return s


@dataclass
class ExplainConfig:
    """How many examples the explainer sees and the scorer is judged on (shared by every explainer and scorer)."""

    n_top: int = 10
    """Top examples shown to the explainer (examples)."""
    n_quantile: int = 20
    """Rank-quantile examples shown to the explainer, spread over the bins (examples)."""
    n_score_pos: int = 20
    """Held-out activating windows scored for detection and fuzzing (windows)."""
    n_score_neg: int = 20
    """Held-out silent windows scored for detection (windows)."""
    per_prompt: int = 10
    """Examples per LLM scorer request (examples)."""
    show_left: int = 12
    """Tokens shown before an example's peak token (tokens)."""
    show_right: int = 4
    """Tokens shown after an example's peak token (tokens)."""
    mark_frac: float = 0.3
    """A token is marked when its activation is above this fraction of the example's peak (fraction, 0 to 1)."""
    explain_max_new_tokens: int = 60
    """Tokens the explainer may generate for one explanation (tokens)."""
    score_max_new_tokens: int = 120
    """Tokens an LLM scorer may generate for one request's answer (tokens)."""
    fuzz: bool = True
    """Also score fuzzing (true against shuffled marks), not only detection."""
    concurrency: int = 4
    """Requests in flight at once, for clients that allow it (requests)."""
    seed: int = 0
    """Seed of the feature sample, the held-out split and the shuffled control."""
    explain_max_tokens: InitVar[int | None] = None
    """Deprecated name of explain_max_new_tokens (tokens)."""
    score_max_tokens: InitVar[int | None] = None
    """Deprecated name of score_max_new_tokens (tokens)."""

    def __post_init__(self, explain_max_tokens: int | None, score_max_tokens: int | None) -> None:
        for old, value in (("explain_max_tokens", explain_max_tokens), ("score_max_tokens", score_max_tokens)):
            if value is not None:
                new = old.replace("max_tokens", "max_new_tokens")
                warn_renamed(old, new, "ExplainConfig", stacklevel=4)
                setattr(self, new, value)
        for name in ("n_top", "n_score_pos", "n_score_neg", "per_prompt", "show_left", "show_right", "concurrency"):
            if getattr(self, name) < (0 if name in ("show_left", "show_right") else 1):
                raise ExplainerError(f"ExplainConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_quantile < 0:
            raise ExplainerError(f"ExplainConfig.n_quantile must be >= 0, got {self.n_quantile}")
        if not 0.0 <= self.mark_frac < 1.0:
            raise ExplainerError(f"ExplainConfig.mark_frac must be in [0, 1), got {self.mark_frac}")


def span(ex: Example, cfg: ExplainConfig) -> tuple[int, int]:
    """First and last context position shown for an example (position 0, the attention sink, never)."""
    lo = max(1, ex.pos - cfg.show_left, ex.start)
    hi = min(len(ex.tokens) - 1, ex.pos + cfg.show_right, ex.start + len(ex.window) - 1)
    return lo, hi


def render(ex: Example, tokenizer, cfg: ExplainConfig, *, marks: set[int] | None = None) -> str:
    """The shown span of an example as text; positions in `marks` are wrapped in << >>.

    Unmarked, the span is decoded in one piece, so a character split over several byte-level tokens reads
    as itself rather than as replacement characters."""
    lo, hi = span(ex, cfg)
    if not marks:
        return tokenizer.decode([int(t) for t in ex.tokens[lo : hi + 1]]).replace("\n", "⏎")
    out = []
    for p in range(lo, hi + 1):
        s = piece(tokenizer, ex.tokens[p])
        out.append(f"<<{s}>>" if marks and p in marks else s)
    return "".join(out)


def true_marks(ex: Example, cfg: ExplainConfig) -> set[int]:
    """Shown positions where the feature is above `mark_frac` of the example's peak."""
    peak = float(ex.window.max()) if len(ex.window) else 0.0
    if peak <= 0:
        return set()
    lo, hi = span(ex, cfg)
    return {p for p, _t, a in ex.token_acts() if a > cfg.mark_frac * peak and lo <= p <= hi}


def shuffled_marks(ex: Example, cfg: ExplainConfig, rng: random.Random) -> set[int]:
    """As many marks as the true ones, on shown positions where they are not."""
    right = true_marks(ex, cfg)
    lo, hi = span(ex, cfg)
    pool = [p for p in range(lo, hi + 1) if p not in right]
    return set(rng.sample(pool, min(len(pool), max(1, len(right)))))


def random_context_halves(atlas: Atlas) -> tuple[list[int], list[int]]:
    """(background, scoring) halves of the atlas's fixed random context sample: even and odd positions."""
    rc = [int(c) for c in atlas.meta.get("random_contexts", [])]
    return rc[0::2], rc[1::2]


@dataclass
class FeatureTask:
    """One feature's examples, split: `shown` for the explainer, `pos` / `neg` held out for the scorer."""

    feature: int
    max_act: float
    shown: list[Example]
    pos: list[Example]
    neg: list[Example]
    logits_pos: list[tuple[int, float]] = field(default_factory=list)

    def shown_contexts(self) -> set[int]:
        return {e.ctx for e in self.shown}

    def heldout_contexts(self) -> set[int]:
        return {e.ctx for e in self.pos + self.neg}


def _silent_windows(
    atlas: Atlas,
    feature: int,
    contexts: list[int],
    extents: list[tuple[int, int]],
    n: int,
    rng: random.Random,
    active: dict[int, dict[int, float]],
) -> list[Example]:
    """Up to n windows from `contexts`, one per context, where the feature is zero on every shown token.

    Window i borrows the (left, right) extent of held-out positive i (cycled), so both classes show texts of
    the same lengths and a scorer cannot tell them apart by length alone."""
    order = list(contexts)
    rng.shuffle(order)
    out: list[Example] = []
    for ctx in order:
        if len(out) >= n:
            break
        tokens = atlas.context(ctx)
        left, right = extents[len(out) % len(extents)]
        lo_p, hi_p = 1 + left, len(tokens) - 1 - right
        if hi_p < lo_p:
            continue
        fired = active.get(ctx, {})
        for _ in range(8):
            pos = rng.randint(lo_p, hi_p)
            if not any(pos - left <= p <= pos + right and a > 0 for p, a in fired.items()):
                # the window covers exactly the borrowed extent, so `span` shows what was checked to be silent
                out.append(
                    Example(
                        feature=feature,
                        kind="negative",
                        rank=len(out),
                        bin=-1,
                        ctx=ctx,
                        pos=pos,
                        act=0.0,
                        tokens=tokens,
                        window=np.zeros(left + 1 + right, dtype=np.float32),
                        start=pos - left,
                    )
                )
                break
    return out


def prepare(atlas: Atlas, feature: int, cfg: ExplainConfig) -> FeatureTask:
    """Split a feature's stored examples into those the explainer sees and held-out ones for scoring.

    Held-out contexts never overlap the shown ones (tested): positives whose context was shown are dropped,
    negatives come from the half of the random sample the explainer does not use as background.
    """
    f = atlas.feature(feature)
    rng = random.Random(cfg.seed * 7919 + feature)
    top = atlas.examples(feature, "top")
    quant = atlas.examples(feature, "quantile")
    bins: dict[int, list[Example]] = {}
    for e in quant:
        bins.setdefault(e.bin, []).append(e)
    for b in bins.values():
        rng.shuffle(b)
    order = sorted(bins)
    shown_q: list[Example] = []
    i = 0
    while len(shown_q) < cfg.n_quantile and any(bins.values()):
        b = order[i % len(order)]
        if bins[b]:
            shown_q.append(bins[b].pop(0))
        i += 1
    shown = top[: cfg.n_top] + shown_q
    background, scoring_half = random_context_halves(atlas)
    seen = {e.ctx for e in shown} | set(background)  # the explainer reads the background half as ordinary text
    held_q = [e for b in order for e in bins[b] if e.ctx not in seen]
    held_top = [e for e in top[cfg.n_top :] if e.ctx not in seen]
    rng.shuffle(held_q)
    rng.shuffle(held_top)
    n_q = min(len(held_q), max(cfg.n_score_pos - len(held_top), (cfg.n_score_pos + 1) // 2))
    pos, where = [], set()
    for e in held_q[:n_q] + held_top + held_q[n_q:]:  # quantile first (typical strength), then top, then the rest
        if len(pos) < cfg.n_score_pos and (e.ctx, e.pos) not in where:
            pos.append(e)
            where.add((e.ctx, e.pos))
    extents = [(e.pos - span(e, cfg)[0], span(e, cfg)[1] - e.pos) for e in pos] or [(cfg.show_left, cfg.show_right)]
    active = atlas.random_activations(feature)
    neg = _silent_windows(
        atlas, feature, [c for c in scoring_half if c not in seen], extents, cfg.n_score_neg, rng, active
    )
    return FeatureTask(feature=feature, max_act=f.max_act, shown=shown, pos=pos, neg=neg, logits_pos=f.logits_pos)
