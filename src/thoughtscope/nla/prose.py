"""Does an explanation read as prose sentences about content, or as a field template?

The rule (deterministic, no model): a text is prose when all four hold

1. no field label: no capitalised word directly followed by ``:`` (``Topic:``, ``Next:``, ``Context:``,
   ``Token:``);
2. at least one sentence of ≥ 4 words ending in ``.``, ``!`` or ``?`` (sentences are the runs of text up to
   and including such a mark);
3. at least 70 % of the whitespace-separated words are purely alphabetic once leading and trailing
   punctuation is stripped (letters of any script, with apostrophes or hyphens inside: ``it's``, ``well-known``);
   numbers, quoted symbols and token fragments count against;
4. no word repeated back to back, ignoring case and punctuation (``carr, carr`` fails).

`prose_share` is the share of a list of explanations that pass. `nla eval` reports it for the NLA's
explanations (`prose_share`) and for the warm-start text written from the true context (`oracle_prose_share`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

__all__ = ["MIN_ALPHA_SHARE", "MIN_SENTENCE_WORDS", "is_prose", "prose_failures", "prose_share"]

MIN_SENTENCE_WORDS = 4
MIN_ALPHA_SHARE = 0.7

_LABEL = re.compile(r"(?<![\w'-])[A-Z][\w'-]*:")
_SENTENCE = re.compile(r"[^.!?]+[.!?]")
_WORD = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*")
_EDGE = "\"'“”‘’`«»()[]{}<>.,;:!?…*_/\\|—–-"


def _bare(word: str) -> str:
    return word.strip(_EDGE)


def prose_failures(text: str) -> list[str]:
    """The rules (module docstring) `text` breaks, by name; empty when it reads as prose."""
    words = text.split()
    if not words:
        return ["empty"]
    out = []
    if _LABEL.search(text):
        out.append("field label")
    if not any(len(s.split()) >= MIN_SENTENCE_WORDS for s in _SENTENCE.findall(text)):
        out.append(f"no sentence of {MIN_SENTENCE_WORDS}+ words")
    bare = [_bare(w) for w in words]
    if sum(bool(_WORD.fullmatch(b)) for b in bare) < MIN_ALPHA_SHARE * len(words):
        out.append(f"under {MIN_ALPHA_SHARE:.0%} alphabetic words")
    low = [b.lower() for b in bare if b]
    if any(a == b for a, b in zip(low, low[1:])):
        out.append("word repeated back to back")
    return out


def is_prose(text: str) -> bool:
    """True when `text` breaks none of the rules in the module docstring."""
    return not prose_failures(text)


def prose_share(explanations: Sequence[str]) -> float:
    """Share of `explanations` that read as prose (NaN for an empty list)."""
    if not explanations:
        return math.nan
    return sum(is_prose(e) for e in explanations) / len(explanations)
