"""The offline explainer: the strings and kinds of text where a feature fires, and what it promotes, found by a
search over cues scored as the lexical scorer reads them (no language model).

From the contexts `heldout.prepare` lets it see (the top and quantile-sampled examples, and the background
half of the random context sample, which is never held out) the explainer

1. takes as its positive windows the shown examples and windows around the feature's activations in the
   background half (a uniform sample of its ordinary activations), and as negative windows the background
   windows where the feature is silent;
2. collects candidate cues: the tokens where the feature is active (above `mark_frac` of the window's peak)
   and the bigrams that end on them ("fires on"), the other tokens of the windows ("context"), and the kinds
   of text the scorer knows (kinds.py: languages, scripts, code, digits, ...);
3. reads every window for every candidate as the lexical scorer will (substring match, or a kind's graded
   strength), and adds cues greedily, each at the weight the scorer gives the next cue of its clause, by the
   gain in the AUROC of the scorer's summed score on positives against negatives; a cue that is everywhere
   ("the", ",") only gains where the feature fires nearly only on it;
4. adds the top tokens of the feature's direct logit effect ("promotes", counted in the search as the scorer
   counts them).

It writes e.g. `fires on "warnings", "simplefilter"; with code; context "import"; promotes "(", "always"`.
It is deterministic (the same atlas and config give the same text) and needs no model, only the tokenizer.
The explainer writes for the lexical scorer's reading, and the scores on held-out contexts (never these
windows) say whether what it wrote generalises. `offline_explain.py` runs it over an atlas and scores and
stores what it writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import stats
from . import scoring
from .db import Atlas
from .heldout import (
    ExplainConfig,
    ExplainerError,
    FeatureTask,
    piece,
    random_context_halves,
    span,
    token_cache,
    true_marks,
)
from .kinds import LANGUAGES, strengths

OFFLINE = "offline-tokens-v2"


@dataclass
class OfflineOptions:
    """Limits of the written explanation and how much evidence a cue needs."""

    max_fire: int = 10  # cues in "fires on" (6 before; 10 raised held-out AUROC on the tuning atlas)
    max_context: int = 4  # cues in "context"
    max_promotes: int = 3  # tokens in "promotes"
    max_kinds: int = 3  # languages / scripts named ("in German or Polish text"), and as many kinds of
    #                               content ("with digits or code"; kinds.py)
    min_gain: float = 0.002  # smallest gain in the simulated scorer's AUROC for a cue to be kept
    max_candidates: int = 60  # cues searched (the best by TPR - FPR of "present")
    min_support: int = 2  # a string cue must occur in this many of the windows it learns from
    background_examples: int = 100  # windows around activations in the background text also learnt from (0: none)
    min_context_support: float = 0.2  # a context cue must occur in this share of those windows
    background_stride: int = 6  # background windows start every this many tokens

    def __post_init__(self) -> None:
        if min(self.max_fire, self.background_stride) < 1 or min(self.max_context, self.max_promotes) < 0:
            raise ExplainerError(
                f"OfflineOptions: max_fire and background_stride must be >= 1, max_context and "
                f"max_promotes >= 0; got {self}"
            )


# kinds of text an explanation may name (kinds.py says what each matches), as written: languages and scripts
# ("in German or Polish text") and what the text is made of ("with digits or punctuation")
LANGUAGE_WORDS = {
    "cyrillic": "Cyrillic",
    "cjk": "CJK",
    "greek": "Greek",
    "arabic": "Arabic",
    "accented": "accented",
    "non-english": "non-English",
    **{lang: lang.capitalize() for lang in LANGUAGES},
}
LAYOUT_WORDS = {
    "digits": "digits",
    "code": "code",
    "line-breaks": "line-breaks",
    "paths": "paths",
    "punctuation": "punctuation",
}
KIND_WORDS = {**LANGUAGE_WORDS, **LAYOUT_WORDS}
_KINDS = tuple(KIND_WORDS)
_KIND_COLUMN = {k: i for i, k in enumerate(_KINDS)}


def _kind_matrix(texts: list[str]) -> np.ndarray:
    """Every text's strength of every kind an explanation may name (rows: texts, columns: _KINDS)."""
    return np.array([strengths(_KINDS, t) for t in texts], dtype=np.float64).reshape(len(texts), len(_KINDS))


def _readable(s: str) -> bool:
    """Not a byte fragment of a multi-byte character, not a control character."""
    return bool(s) and "\ufffd" not in s and s.isprintable()


def _unit(tok, tokens: list[int], p: int, lo: int, hi: int) -> str:
    """The readable string at position p (lower-cased, stripped): the token, or the token with its neighbours
    when it is a byte fragment of a character split over several tokens; '' when none reads."""
    cache = token_cache(tok)
    key = ("unit", tokens[p])
    s = cache.get(key)
    if s is not None:  # a token that reads on its own reads the same at any position
        return s
    s = piece(tok, tokens[p]).strip()
    if _readable(s) or not s:
        s = cache[key] = s.lower()
        return s
    for a, b in ((p - 1, p + 1), (p, p + 2), (p - 1, p + 2), (p - 2, p + 1), (p, p + 3)):
        if a >= lo and b <= hi + 1:
            s = _decode(tok, tuple(int(t) for t in tokens[a:b]))
            if _readable(s):
                return s.lower()
    return ""


def _decode(tok, ids: tuple[int, ...]) -> str:
    """A few tokens as text (stripped), cached: fragments of the same characters recur across features."""
    cache = token_cache(tok)
    s = cache.get(ids)
    if s is None:
        s = cache[ids] = tok.decode(list(ids)).replace("\n", "⏎").strip()
    return s


def _bigram(tok, a: int, b: int) -> str:
    """Two tokens as text (lower-cased, stripped); decoded together only when one is a byte fragment."""
    pa, pb = piece(tok, a), piece(tok, b)
    if "\ufffd" in pa or "\ufffd" in pb:
        return _decode(tok, (int(a), int(b))).lower()
    return (pa + pb).strip().lower()


def _quote(s: str) -> str | None:
    if '"' not in s:
        return f'"{s}"'
    if "“" not in s and "”" not in s:
        return f"“{s}”"
    return None


class OfflineExplainer:
    """Writes a token / n-gram explanation per feature against one atlas's background text (built once)."""

    name = f"offline:{OFFLINE}"
    method = OFFLINE

    def __init__(self, atlas: Atlas, tokenizer, cfg: ExplainConfig, options: OfflineOptions | None = None):
        self.atlas, self.tokenizer, self.cfg = atlas, tokenizer, cfg
        self.opt = options or OfflineOptions()
        width = cfg.show_left + cfg.show_right + 1
        self.bg_text: list[str] = []
        bg_ctx, bg_lo, bg_hi = [], [], []
        background, _ = random_context_halves(atlas)
        self.bg_tokens: dict[int, list[int]] = {}
        for ctx in background:
            toks = self.bg_tokens[ctx] = atlas.context(ctx)
            for lo in range(1, max(2, len(toks) - width + 1), self.opt.background_stride):
                hi = min(len(toks) - 1, lo + width - 1)
                self.bg_text.append(tokenizer.decode(toks[lo : hi + 1]).replace("\n", "⏎").lower())
                bg_ctx.append(ctx), bg_lo.append(lo), bg_hi.append(hi)
        self.bg_ctx, self.bg_lo, self.bg_hi = np.asarray(bg_ctx), np.asarray(bg_lo), np.asarray(bg_hi)
        self._bg_cache: dict[str, np.ndarray] = {}
        self._bg_kinds: np.ndarray | None = None
        self._bg_joined = "\x00".join(self.bg_text)
        self._bg_starts = np.cumsum([0] + [len(t) + 1 for t in self.bg_text[:-1]])

    def _bg_has(self, cue: str) -> np.ndarray:
        """Which background windows contain the string (cached). Literal cues are found with str.find over all
        windows joined by NUL, jumping to the next window after each hit: a few hits cost a few calls, not
        one membership test per window (this was most of the explainer's time)."""
        m = self._bg_cache.get(cue)
        if m is None:
            m = np.zeros(len(self.bg_text), dtype=bool)
            i = self._bg_joined.find(cue)
            while i != -1:
                w = int(np.searchsorted(self._bg_starts, i, side="right")) - 1
                m[w] = True
                nxt = self._bg_starts[w + 1] if w + 1 < len(self._bg_starts) else len(self._bg_joined)
                i = self._bg_joined.find(cue, int(nxt))
            if len(self._bg_cache) > 50_000:  # bounded: a whole atlas meets a few hundred thousand strings
                self._bg_cache.clear()
            self._bg_cache[cue] = m
        return m

    def _bg_strength(self, kind: str) -> np.ndarray:
        """Each background window's strength of a kind of text (kinds.py), all kinds read once per atlas."""
        if self._bg_kinds is None:
            self._bg_kinds = _kind_matrix(self.bg_text)
        return self._bg_kinds[:, _KIND_COLUMN[kind]]

    def _background_examples(self, feature: int, limit: int) -> list[tuple]:
        """Windows around the feature's activations in the background half of the random context sample (text the
        explainer reads anyway, never held out): a uniform sample of its ordinary activations, like the quantile
        examples. One window per activation not already inside a window taken around a stronger one."""
        out = []
        left, right = self.cfg.show_left, self.cfg.show_right
        for ctx, acts in sorted(self.atlas.random_activations(feature).items()):
            toks = self.bg_tokens.get(ctx)
            if toks is None:
                continue
            acts = {p: a for p, a in acts.items() if a > 0 and 1 <= p < len(toks)}
            taken: list[tuple[int, int]] = []
            for p, a in sorted(acts.items(), key=lambda pa: (-pa[1], pa[0])):
                if any(lo <= p <= hi for lo, hi in taken):
                    continue
                lo, hi = max(1, p - left), min(len(toks) - 1, p + right)
                taken.append((lo, hi))
                marks = {q for q, b in acts.items() if lo <= q <= hi and b > self.cfg.mark_frac * a} | {p}
                out.append((toks, lo, hi, marks, p))
                if len(out) >= limit:
                    return out
        return out

    def _silent(self, feature: int) -> np.ndarray:
        """Background windows where the feature is zero everywhere."""
        ok = np.ones(len(self.bg_text), dtype=bool)
        for ctx, acts in self.atlas.random_activations(feature).items():
            rows = np.nonzero(self.bg_ctx == ctx)[0]
            for p, a in acts.items():
                if a > 0:
                    ok[rows[(self.bg_lo[rows] <= p) & (p <= self.bg_hi[rows])]] = False
        return ok

    def explain(self, task: FeatureTask) -> str:
        """One explanation from the task's shown examples (never its held-out ones)."""
        if not task.shown:
            raise ExplainerError(f"feature {task.feature} never fired in the atlas corpus: nothing to explain")
        wins = self._learning_windows(task)
        tok = self.tokenizer
        # as the scorer reads a window (heldout.render): the span decoded in one piece
        texts = [
            tok.decode([int(t) for t in toks[lo : hi + 1]]).replace("\n", "⏎").lower() for toks, lo, hi, _, _ in wins
        ]
        fire, context, peaks = _unit_counts(tok, wins)
        cands = self._candidates(fire, context, len(wins))
        promotes = self._promotes(task)
        reading = _Reading(self, texts, self._silent(task.feature))
        picked = self._search(cands, reading, promotes)
        if not picked["fire"] and peaks:  # nothing beats ordinary text: say where it peaks, the score will tell
            picked["fire"] = [max(sorted(peaks), key=peaks.get)]
        return _phrase(picked, promotes)

    def _learning_windows(self, task: FeatureTask) -> list[tuple]:
        """(tokens, first, last shown position, marked positions, peak) of every window the explainer learns from:
        the shown examples, and the feature's activations in the background half of the random sample."""
        wins = []
        for e in task.shown:
            lo, hi = span(e, self.cfg)
            wins.append((e.tokens, lo, hi, true_marks(e, self.cfg) or {e.pos}, e.pos))
        if self.opt.background_examples:
            wins += self._background_examples(task.feature, self.opt.background_examples)
        return wins

    def _candidates(self, fire: dict[str, int], context: dict[str, int], n: int) -> list[tuple[str, str]]:
        """(cue, clause) pairs worth trying: every kind of text, and the strings with enough support."""
        opt = self.opt
        need = min(opt.min_support, max(1, n // 2))
        cands = [(c, "language") for c in LANGUAGE_WORDS] + [(c, "layout") for c in LAYOUT_WORDS]
        cands += [(c, "fire") for c, k in fire.items() if k >= need and _quote(c)]
        cands += [
            (c, "context")
            for c, k in context.items()
            if k >= max(need, opt.min_context_support * n) and c not in fire and _quote(c)
        ]
        return cands

    def _promotes(self, task: FeatureTask) -> list[str]:
        """The first readable, quotable, distinct tokens of the feature's direct logit effect."""
        promotes: list[str] = []
        for tid, _ in task.logits_pos:
            s = piece(self.tokenizer, tid).strip()
            if (
                _readable(s)
                and _quote(s)
                and s.lower() not in [p.lower() for p in promotes]
                and len(promotes) < self.opt.max_promotes
            ):
                promotes.append(s)
        return promotes

    def _search(self, cands: list[tuple[str, str]], reading: _Reading, promotes: list[str]) -> dict[str, list[str]]:
        """Greedy: add the cue that most raises the simulated scorer's AUROC, at the weight the scorer gives the
        next cue of its clause, until no cue gains more than `min_gain`."""
        opt = self.opt
        # the scorer's reading of what is always written (the promoted tokens weigh a quarter, as it reads them)
        sp, sn = np.zeros(reading.n), np.zeros(reading.n_silent)
        for i, c in enumerate(promotes):
            vp, vn = reading.vectors(c.lower(), "promotes")
            w = scoring.OUTPUT_WEIGHT * scoring.rank_weight(i)
            sp, sn = sp + w * vp, sn + w * vn
        vec = {ck: reading.vectors(*ck) for ck in cands}
        if len(sn):  # only the most promising cues (by TPR - FPR of "present") go into the search
            j = {ck: float((v[0] >= 0.5).mean() - (v[1] >= 0.5).mean()) for ck, v in vec.items()}
            cands = sorted((ck for ck in cands if j[ck] > 0), key=lambda ck: (-j[ck], len(ck[0]), ck[0]))
            cands = cands[: opt.max_candidates]
        picked: dict[str, list[str]] = {"fire": [], "context": [], "language": [], "layout": []}
        limit = {"fire": opt.max_fire, "context": opt.max_context, "language": opt.max_kinds, "layout": opt.max_kinds}
        current = _auroc_of(sp, sn) if len(sn) else 0.0
        while len(sn):  # no silent background text (a feature active everywhere): nothing to compare against
            best, best_key = None, None
            for c, kind in cands:
                if len(picked[kind]) >= limit[kind] or c in picked[kind]:
                    continue
                w = scoring.rank_weight(len(picked[kind]))  # the weight the scorer gives the next cue of that clause
                vp, vn = vec[c, kind]
                gain = _auroc_of(sp + w * vp, sn + w * vn) - current
                # equal evidence: the shorter (more general) string, then the alphabetically first (deterministic)
                key = (round(gain, 9), -len(c), tuple(-ord(ch) for ch in c))
                if gain > opt.min_gain and (best_key is None or key > best_key):
                    best, best_key = (c, kind), key
            if best is None:
                break
            c, kind = best
            w = scoring.rank_weight(len(picked[kind]))
            picked[kind].append(c)
            sp, sn = sp + w * vec[c, kind][0], sn + w * vec[c, kind][1]
            current = _auroc_of(sp, sn)
        return picked


class _Reading:
    """How the lexical scorer reads one feature's windows: each learning window and each silent background
    window's match of a cue."""

    def __init__(self, explainer: OfflineExplainer, texts: list[str], silent: np.ndarray):
        self.explainer, self.texts, self.silent = explainer, texts, silent
        self.kinds = _kind_matrix(texts)
        self.n, self.n_silent = len(texts), int(silent.sum())

    def vectors(self, c: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """How well each shown window and each silent background window matches the cue (the scorer's reading)."""
        if kind in ("language", "layout"):
            return self.kinds[:, _KIND_COLUMN[c]], self.explainer._bg_strength(c)[self.silent]
        return (
            np.fromiter((c in t for t in self.texts), dtype=bool, count=self.n).astype(np.float64),
            self.explainer._bg_has(c).astype(np.float64)[self.silent],
        )


def _unit_counts(tok, wins: list[tuple]) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """In how many windows each string is marked ("fires on": a marked token, or a bigram ending on one), is
    only unmarked ("context"), and is the peak."""
    fire: dict[str, int] = {}
    context: dict[str, int] = {}
    peaks: dict[str, int] = {}
    for toks, lo, hi, marks, pos in wins:
        f_here, c_here = set(), set()
        for p in range(lo, hi + 1):
            u = _unit(tok, toks, p, lo, hi)
            if not u:
                continue
            if p in marks:
                f_here.add(u)
                if p - 1 >= lo:
                    b = _bigram(tok, toks[p - 1], toks[p])
                    if b != u and _readable(b):
                        f_here.add(b)
            else:
                c_here.add(u)
        for u in f_here:
            fire[u] = fire.get(u, 0) + 1
        for u in c_here - f_here:
            context[u] = context.get(u, 0) + 1
        pk = _unit(tok, toks, pos, lo, hi)
        if pk:
            peaks[pk] = peaks.get(pk, 0) + 1
    return fire, context, peaks


def _phrase(picked: dict[str, list[str]], promotes: list[str]) -> str:
    """The explanation as written: 'fires on ...; in ... text; with ...; context ...; promotes ...'."""
    parts = []
    if picked["fire"]:
        parts.append("fires on " + ", ".join(_quote(c) for c in picked["fire"]))
    if picked["language"]:
        parts.append("in " + " or ".join(KIND_WORDS[k] for k in picked["language"]) + " text")
    if picked["layout"]:
        parts.append("with " + " or ".join(KIND_WORDS[k] for k in picked["layout"]))
    if picked["context"]:
        parts.append("context " + ", ".join(_quote(c) for c in picked["context"]))
    if promotes:
        parts.append("promotes " + ", ".join(_quote(c) for c in promotes))
    return "; ".join(parts) if parts else "fires on unclear tokens"


def _auroc_of(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUROC of the cue's strengths on marked (positive) against unmarked (negative) positions."""
    return float(stats.auroc_split(pos, neg))
