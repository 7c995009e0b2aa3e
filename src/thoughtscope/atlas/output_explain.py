"""The output-side explanation: what a feature makes the model say, in whole words ("says "ocean", "sea"").

A feature's direct logit effects (its decoder direction read through the unembedding, stored in the atlas as
`features.logits_pos`) are mostly sub-word tokens (" miscon", "asgow", "'):"). This module turns them into
words a person reads:

* a token that is a byte fragment of a character, or has no letters, is dropped;
* a token that starts a word (a leading space, or a capital) is kept when the atlas's corpus uses it as a
  whole word, and otherwise read as the corpus's most frequent word it begins (" Neander" -> "neanderthal"),
  when there is one: the model writing " Neander" is about to write that word;
* a token that continues a word ("asgow", "ultural") is kept only when the corpus often uses it alone;
* case and space variants merge (" Ocean", "ocean", " ocean" are one word, at its strongest token's rank).

The corpus vocabulary (`WordBook`) is a list of the words in the atlas's stored contexts with their counts: it
says which strings are words, never which contexts a feature fires on. The text is scored like the input
side (the lexical scorer on the same held-out windows, `offline_explain.py`), and by its own method, whether
adding the feature raises those words' probability (`output_score.py`).
"""

from __future__ import annotations

import bisect
import re

from .db import Atlas
from .heldout import piece

OUTPUT = "logit-words-v1"
_WORDS = re.compile(r"[^\W\d_]{2,}")


class WordBook:
    """The whole words of an atlas's corpus with their counts, and the most frequent word a prefix begins."""

    def __init__(self, counts: dict[str, int]):
        self.counts = counts
        self.sorted = sorted(counts)

    @classmethod
    def from_atlas(cls, atlas: Atlas, tokenizer, limit: int | None = None) -> WordBook:
        """Count the words (letters only, two or more, lower-cased) of the atlas's stored contexts."""
        with atlas._reading("the contexts"):
            ids = [r[0] for r in atlas.con.execute("SELECT id FROM contexts ORDER BY id").fetchall()]
        counts: dict[str, int] = {}
        for ctx in ids[:limit]:
            for w in _WORDS.findall(tokenizer.decode(atlas.context(ctx)).lower()):
                counts[w] = counts.get(w, 0) + 1
        return cls(counts)

    def count(self, word: str) -> int:
        return self.counts.get(word, 0)

    def completion(self, prefix: str, min_count: int = 2) -> str | None:
        """The most frequent longer word that starts with prefix (ties: the shorter, then alphabetical)."""
        i = bisect.bisect_right(self.sorted, prefix)
        best = None
        while i < len(self.sorted) and self.sorted[i].startswith(prefix):
            w = self.sorted[i]
            c = self.counts[w]
            if c >= min_count and (best is None or (c, -len(w)) > (self.counts[best], -len(best))):
                best = w
            i += 1
        return best


def token_word(tokenizer, tid: int, book: WordBook, *, min_alone: int = 3) -> str | None:
    """The whole word a promoted token stands for (lower-cased), or None (a fragment, a symbol, a byte)."""
    raw = piece(tokenizer, tid)
    if "\ufffd" in raw or not raw.replace("⏎", "").strip():
        return None
    core = raw.strip()
    if not core.isalpha() or not core.isprintable():
        return None
    low = core.lower()
    starts = raw[:1].isspace() or core[:1].isupper()
    if starts:
        if book.count(low) and len(low) >= 2:
            return low
        return book.completion(low) if len(low) >= 3 else None
    return low if len(low) >= 3 and book.count(low) >= min_alone else None


def says_words(tokenizer, logits_pos: list[tuple[int, float]], book: WordBook, max_words: int = 5) -> list[str]:
    """The first max_words distinct whole words of the feature's promoted tokens, strongest first."""
    out: list[str] = []
    for tid, value in logits_pos:
        if value <= 0:
            break
        w = token_word(tokenizer, int(tid), book)
        if w and w not in out:
            out.append(w)
            if len(out) >= max_words:
                break
    return out


def says_text(words: list[str]) -> str:
    """The explanation as written: 'says "ocean", "sea", "waves"' ('' when no word reads)."""
    return ("says " + ", ".join(f'"{w}"' for w in words)) if words else ""
