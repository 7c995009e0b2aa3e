"""Scores for explanations: detection metrics, a scorer that reads only the explanation's text, and the
shuffled-explanation control that measures chance instead of assuming it.

The lexical scorer is a simulated reader with no model: it pulls the literal strings an explanation quotes
("warnings", "(") and its other content words out of the text and predicts that a held-out context
activates the feature when the context contains them. It knows nothing about the feature beyond the
explanation, and never sees the contexts the explanation was written from (see heldout.py), so it can
score any explanation, whoever wrote it: the offline explainer's, an LLM's, or a person's. Its bias,
stated: it rewards explanations that name concrete strings and cannot credit an abstract one ("legal
language") unless the abstract words occur literally in the text.

Clauses (split at ";") weigh their cues by what they say: a clause about what the feature promotes or
predicts counts a quarter (those tokens tend to follow an activation, weak evidence), one about what it
suppresses not at all; within a clause the i-th cue weighs 1 / (1 + i / 2), so earlier cues count more;
quoted strings match anywhere (case-insensitive), unquoted words match at a word start.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .. import stats
from .db import Atlas
from .heldout import ExplainConfig, FeatureTask, piece, render, shuffled_marks, true_marks
from .kinds import SCRIPTS, is_kind, strength

__all__ = [
    "LEXICAL",
    "SCRIPTS",
    "Cue",
    "LexicalScorer",
    "auroc",
    "balanced_accuracy",
    "derangement",
    "detection_items",
    "lexical_detection",
    "lexical_fuzz",
    "mean_ci",
    "parse_cues",
    "summarize",
]

LEXICAL = "lexical-v2"

# words that carry no evidence about a context: grammar, and the vocabulary of explanations themselves
_STOP = set(
    """a an the and or but of in on at to for from by with without into onto over under about as is are was
were be been being it its this that these those there their they them he she his her we our you your i me my not no
yes so than then too very can could may might will would should do does did done has have had some any each every
all most more less many much such like same other another also only just even both either neither whether when where
which while who whom whose what how why here up down out off again very mostly often usually typically
feature features fires fire firing fired activates activate activation activations active responds respond response
token tokens word words text texts phrase phrases context contexts related relating mentions mention mentioning
appear appears appearing occurrence occurrences example examples sentence sentences
specific specifically various certain particular different general generally near after before following
preceded followed typical promotes promote promoting predicts predict predicting suppresses suppress boosts outputs
says say unclear letter letters character characters inside within part parts including include includes containing
contains contain used using use kind type types form forms refers refer referring indicates indicating""".split()
)
_QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”|(?<![\w])\'([^\']+)\'(?![\w])')
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_]*(?:-[A-Za-z]+)?")


@dataclass(frozen=True)
class Cue:
    text: str  # lower-cased
    weight: float
    literal: bool  # quoted: match anywhere; else: match at a word start
    main: bool  # from a clause about where the feature fires (not what it promotes)
    kind: bool = False  # a kind of text (kinds.py: a script, a language, code): matches text of that kind


RANK_DECAY = 0.5
OUTPUT_WEIGHT = 0.25  # a clause about what the feature promotes or predicts: those tokens tend to follow it
ACTIVE_AT = 0.75  # predicted active from this share of the heaviest main cue's weight (chosen on validation)


def rank_weight(i: int) -> float:
    """The weight of the i-th cue of a clause (0-based): earlier cues count more, 1 / (1 + i * RANK_DECAY)."""
    return 1.0 / (1.0 + i * RANK_DECAY)


_CLAUSE = re.compile(r'"[^"\n]*"|“[^”\n]*”|([;\n])')


def clauses(explanation: str) -> list[str]:
    """The explanation split at ';' and newlines outside quotes (a quoted "; cd" stays one string)."""
    out, start = [], 0
    for m in _CLAUSE.finditer(explanation):
        if m.group(1):
            out.append(explanation[start : m.start()])
            start = m.end()
    return out + [explanation[start:]]


def parse_cues(explanation: str) -> list[Cue]:
    """The strings an explanation tells a reader to look for, with the weight the reader gives each."""
    cues: list[Cue] = []
    seen: set[tuple[str, bool]] = set()
    for clause in clauses(explanation or ""):
        low = clause.lower()
        if re.search(r"suppress|inhibit|never fires|does not fire", low):
            continue
        w = OUTPUT_WEIGHT if re.search(r"promot|predict|followed by|next token|boosts|outputs", low) else 1.0
        main = w == 1.0
        found: list[tuple[int, str, bool]] = []
        for m in _QUOTED.finditer(clause):
            q = next(g for g in m.groups() if g is not None).strip().lower()
            if q:
                found.append((m.start(), q, True))
        rest = _QUOTED.sub(" ", clause)
        for m in _WORD.finditer(rest):
            wd = m.group(0).lower()
            if is_kind(wd):
                found.append((m.start(), wd, False))
            elif len(wd) >= 3 and wd not in _STOP and "-" not in wd:
                found.append((len(clause) + m.start(), wd, False))  # after the quoted ones
        i = 0
        for _, text, literal in sorted(found):
            if (text, literal) in seen:
                continue
            seen.add((text, literal))
            kind = not literal and is_kind(text)
            cues.append(Cue(text, w * (1.0 if literal or kind else 0.5) * rank_weight(i), literal, main, kind))
            i += 1
    return cues


def match(cue: Cue, text_lower: str) -> float:
    """How well a (lower-cased) text matches a cue, in [0, 1]: 1 or 0 for strings, a kind's strength for kinds;
    >= 0.5 counts as a match."""
    if cue.kind:
        return strength(cue.text, text_lower)
    if cue.literal:
        return float(cue.text in text_lower)
    return float(re.search(r"(?<![a-z0-9])" + re.escape(cue.text), text_lower) is not None)


class LexicalScorer:
    """Predicts activation from an explanation's text alone (see the module docstring); deterministic, no model."""

    name = f"offline:{LEXICAL}"
    method = LEXICAL

    def predict(self, explanation: str, texts: Sequence[str]) -> tuple[list[float], list[bool]]:
        """(graded score, predicted active) per text: the summed weight of the cues times how well each matches,
        and whether that sum reaches ACTIVE_AT of the heaviest main cue's weight (that cue matching, or lesser
        ones together)."""
        cues = parse_cues(explanation)
        at = ACTIVE_AT * max([c.weight for c in cues if c.main], default=float("inf"))
        scores, active = [], []
        for t in texts:
            tl = t.lower()
            m = [(c, match(c, tl)) for c in cues]
            scores.append(float(sum(c.weight * v for c, v in m)))
            active.append(scores[-1] >= at)
        return scores, active

    def fuzz(self, explanation: str, marked: Sequence[list[str]]) -> list[float]:
        """Per example, the share of its marked tokens that a main cue names (marks right -> high)."""
        cues = [c for c in parse_cues(explanation) if c.main]
        out = []
        for toks in marked:
            toks = [t.strip().lower() for t in toks if t.strip()]
            if not toks or not cues:
                out.append(0.0)
                continue
            # a mark is named when a cue is in it, or it is a word-sized part of a cue (a bigram's half)
            out.append(sum(any(c.text in t or (len(t) >= 3 and t in c.text) for c in cues) for t in toks) / len(toks))
        return out


# --------------------------------------------------------------------------- metrics


def balanced_accuracy(labels: Sequence[int], probs: Sequence[float], threshold: float = 0.5) -> float | None:
    """Balanced accuracy of `probs >= threshold` (None with one class only)."""
    y = np.asarray(labels, dtype=bool)
    if y.all() or (~y).all():
        return None
    return float(stats.balanced_accuracy(np.asarray(probs, dtype=np.float64) >= threshold, y))


def auroc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """AUROC of the scores against the labels (`thoughtscope.stats`), None with one class only."""
    y = np.asarray(labels, dtype=bool)
    if y.all() or (~y).all():
        return None
    return float(stats.auroc(np.asarray(scores, dtype=np.float64), y))


mean_ci = stats.mean_ci


# --------------------------------------------------------------------------- scoring a feature


def detection_items(task: FeatureTask, tokenizer, cfg: ExplainConfig) -> tuple[list[str], list[int]]:
    """The held-out windows as the scorer reads them, and their labels (1 = the feature fires there)."""
    texts = [render(e, tokenizer, cfg) for e in task.pos] + [render(e, tokenizer, cfg) for e in task.neg]
    return texts, [1] * len(task.pos) + [0] * len(task.neg)


def lexical_detection(
    explanation: str, texts: Sequence[str], labels: Sequence[int], scorer: LexicalScorer | None = None
) -> dict:
    """Detection: AUROC of the graded score, balanced accuracy of the scorer's predicted-active rule."""
    scores, active = (scorer or LexicalScorer()).predict(explanation, texts)
    return {
        "labels": list(labels),
        "probs": scores,
        "bacc": balanced_accuracy(labels, [float(a) for a in active]),
        "auroc": auroc(labels, scores),
    }


def lexical_fuzz(
    task: FeatureTask, explanation: str, tokenizer, cfg: ExplainConfig, scorer: LexicalScorer | None = None
) -> dict:
    """Fuzzing on the held-out activating windows: true marks on every other example, random ones on the rest."""

    scorer = scorer or LexicalScorer()
    rng = random.Random(cfg.seed * 104729 + task.feature)
    labels, marked = [], []
    for i, e in enumerate(task.pos):
        right = i % 2 == 0
        marks = true_marks(e, cfg) if right else shuffled_marks(e, cfg, rng)
        marked.append([piece(tokenizer, e.tokens[p]) for p in sorted(marks)])
        labels.append(int(right))
    probs = scorer.fuzz(explanation, marked)
    return {"labels": labels, "probs": probs, "bacc": balanced_accuracy(labels, probs), "auroc": auroc(labels, probs)}


def derangement(items: Sequence[int], seed: int) -> dict[int, int]:
    """item -> another item, a seeded permutation with no fixed point (each feature gets someone else's
    explanation); {} for fewer than two items."""
    items = list(items)
    if len(items) < 2:
        return {}
    rng = random.Random(seed)
    perm = items[:]
    rng.shuffle(perm)
    # rotate the shuffled order by one: a cycle through all items, never a fixed point
    return {perm[i]: perm[(i + 1) % len(perm)] for i in range(len(perm))}


def summarize(at: Atlas, features, *, method: str | None = None, seconds: float | None = None) -> dict:
    """Counts and mean scores (with bootstrap CIs over features) of the given features' stored explanations."""
    rows = at.scores(features)
    failed = [f for f in features if (at.explanation(f) or {}).get("status") == "failed"]
    out: dict = {"method": method, "requested": len(list(features)), "ok": len(rows), "failed": len(failed)}
    for key in (
        "detection_auroc",
        "detection_bacc",
        "fuzz_auroc",
        "fuzz_bacc",
        "shuffled_detection_auroc",
        "shuffled_detection_bacc",
    ):
        ci = mean_ci([r.get(key) for r in rows])
        short = key.replace("shuffled_detection_", "shuffled_")
        out[f"{short}_mean"] = ci["mean"]
        out[f"{short}_ci"] = ci["ci"]
    if seconds is not None:
        out["seconds"] = round(seconds, 2)
    return out
