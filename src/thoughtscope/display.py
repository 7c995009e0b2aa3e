"""Token ids as the pieces of text a person reads: every character shown once, whole.

Byte-level tokenizers (GPT-2's, SmolLM2's) and sentencepiece byte fallback (`<0xE4>` tokens) split a character
such as 中, ł or an emoji over several tokens; decoding each token alone gives "\\ufffd" for each part. The one
rule here: consecutive tokens whose bytes end inside a character are one *piece*, decoded whole, that records
the token positions it covers. Tokens whose bytes the tokenizer does not expose (added and special tokens, a
sentencepiece word piece) decode alone; when such a token alone is still not valid UTF-8 it is joined with the
tokens after it until their decode ends on a whole character. Bytes that never complete a character inside the
text (invalid UTF-8) still show the replacement glyph "\\ufffd": that is what the text holds; the bytes of a
character cut off where the ids begin or end (an atlas context cut from a longer text) read "…".
A piece also never ends inside what a reader sees as one character: a mark, a variation selector, a skin tone or
a zero-width joiner (the joins of an emoji family 👩‍👩‍👧) stays with the character before it, and a flag's two
regional indicators stay together.

A value per token (an activation) maps to its piece: the piece shows its strongest token's value and keeps the
value of every token it spans (`piece_values`), so a highlight on any of its tokens shows on the whole character.

    from thoughtscope.display import token_pieces
    for p in token_pieces(tokenizer, ids):
        print(p.text, list(p.positions))
"""

from __future__ import annotations

import codecs
import functools
import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece byte fallback
CUT = "…"  # what the bytes of a character cut off at the edge of the ids read
MAX_UNKNOWN_JOIN = 8  # tokens joined at most when their bytes are unknown (4 bytes a character, spare for merges)


@dataclass(frozen=True)
class Piece:
    """A run of tokens shown as one piece of text: positions `start` .. `stop - 1` of the ids it was cut from."""

    text: str
    start: int
    stop: int
    cut: bool = False  # holds bytes of a character cut off at the edge of the ids (it reads CUT)

    @property
    def positions(self) -> range:
        return range(self.start, self.stop)

    def __len__(self) -> int:
        return self.stop - self.start


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet read back: the printable stand-in character of each byte -> the byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {ch: b for b, ch in bytes_to_unicode().items()}


def _has_byte_level(state) -> bool:
    if isinstance(state, dict):
        return state.get("type") == "ByteLevel" or any(_has_byte_level(v) for v in state.values())
    if isinstance(state, list):
        return any(_has_byte_level(v) for v in state)
    return False


def is_byte_level(tokenizer) -> bool:
    """Whether the tokenizer's vocabulary spells bytes in GPT-2's byte-level alphabet (fast: its decoder is or
    contains ByteLevel; slow: it carries a `byte_decoder`)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        dec = backend.decoder
        return dec is not None and _has_byte_level(json.loads(dec.__getstate__()))
    return hasattr(tokenizer, "byte_decoder")


def token_bytes(tokenizer, ids: Sequence[int]) -> list[bytes | None]:
    """The raw bytes each token stands for, None where the tokenizer does not expose them (added and special
    tokens, sentencepiece word pieces): those are read by decoding the token alone."""
    ids = [int(t) for t in ids]
    names = tokenizer.convert_ids_to_tokens(ids)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    table = _byte_decoder() if is_byte_level(tokenizer) else None
    out: list[bytes | None] = []
    for i, name in zip(ids, names):
        m = BYTE_TOKEN.fullmatch(name) if isinstance(name, str) else None
        if m:
            out.append(bytes([int(m.group(1), 16)]))
        elif table is not None and i not in added and isinstance(name, str) and name and all(c in table for c in name):
            out.append(bytes(table[c] for c in name))
        else:
            out.append(None)
    return out


ZWJ = "\u200d"
REGIONAL = range(0x1F1E6, 0x1F200)  # regional indicator symbols: two make a flag


def _extends(ch: str) -> bool:
    """Whether `ch` belongs to the character before it (a combining mark, variation selector, skin tone, tag, ZWJ)."""
    o = ord(ch)
    return (
        ch == ZWJ
        or 0xFE00 <= o <= 0xFE0F
        or 0x1F3FB <= o <= 0x1F3FF
        or 0xE0020 <= o <= 0xE007F
        or unicodedata.category(ch) in ("Mn", "Mc", "Me")
    )


def _joined(before: str, after: str) -> bool:
    """Whether a cut between two pieces' texts would fall inside one character as a reader sees it."""
    if not before or not after or before[-1] == "\ufffd":
        return False  # nothing joins bytes that never made a character (a text cut mid-character)
    if _extends(after[0]) or before[-1] == ZWJ:
        return True
    if ord(after[0]) in REGIONAL and ord(before[-1]) in REGIONAL:
        run = len(before) - len(before.rstrip("".join(map(chr, REGIONAL))))
        return run % 2 == 1  # an unpaired indicator before the cut: its pair comes after it
    return False


def _whole_characters(pieces: list[Piece], alone: set[int]) -> list[Piece]:
    """Pieces joined where a cut would split a character as a reader sees it; the pieces that start at a position
    in `alone` (special tokens: a BOS, a chat marker) join nothing."""
    out: list[Piece] = []
    for p in pieces:
        if out and out[-1].start not in alone and p.start not in alone and _joined(out[-1].text, p.text):
            out[-1] = Piece(out[-1].text + p.text, out[-1].start, p.stop, out[-1].cut or p.cut)
        else:
            out.append(p)
    return out


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _unknown_run(tokenizer, ids: list[int], raw: list[bytes | None], i: int, alone: str) -> tuple[str, int]:
    """A token with unknown bytes whose decode alone ends mid-character: joined with the unknown tokens after it
    until their decode ends on a whole character (at most MAX_UNKNOWN_JOIN); (text, stop)."""
    for j in range(i + 2, min(len(ids), i + MAX_UNKNOWN_JOIN) + 1):
        if raw[j - 1] is not None:
            break
        s = _decode(tokenizer, ids[i:j])
        if not s.endswith("\ufffd"):
            return s, j
    return alone, i + 1


def _alone(tokenizer, ids: list[int], raw: list[bytes | None]) -> dict[int, str]:
    """Each token with unknown bytes decoded alone."""
    unknown = [i for i, b in enumerate(raw) if b is None]
    texts = tokenizer.batch_decode(
        [[ids[i]] for i in unknown], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    return dict(zip(unknown, texts))


def _continuation_only(b: bytes) -> bool:
    return bool(b) and all(0x80 <= x <= 0xBF for x in b)


def token_pieces(tokenizer, ids: Sequence[int]) -> list[Piece]:
    """The pieces of text the tokens `ids` show, in order; every position is in exactly one piece, and the pieces'
    texts joined give the text the ids decode to (special tokens as their names).

    Ids cut from a longer text (an atlas context) may start or end inside a character: the bytes of that
    character they hold are one piece that reads CUT ("…", `cut` set), since the character is not in them;
    bytes that are invalid inside the text read "\ufffd".
    """
    ids = [int(t) for t in ids]
    raw = token_bytes(tokenizer, ids)
    alone = _alone(tokenizer, ids, raw)
    pieces: list[Piece] = []
    utf8 = codecs.getincrementaldecoder("utf-8")("replace")
    start, parts, i, edge = 0, [], 0, True  # edge: at the start of the text (or right after a special token)
    while i < len(ids):
        b = raw[i]
        if b is not None and edge and i == start and _continuation_only(b):
            while i < len(ids) and raw[i] is not None and _continuation_only(raw[i]):
                i += 1  # the last bytes of a character that began before these ids
            pieces.append(Piece(CUT, start, i, cut=True))
            start, edge = i, False
            continue
        if b is not None:
            parts.append(utf8.decode(b))
            i += 1
            if not utf8.getstate()[0]:  # the bytes so far end on a whole character
                pieces.append(Piece("".join(parts), start, i))
                start, parts, edge = i, [], False
            continue
        if i > start:  # bytes left waiting for the rest of a character that never came
            parts.append(utf8.decode(b"", final=True))
            pieces.append(Piece("".join(parts), start, i))
            utf8.reset()
        text, stop = alone[i], i + 1
        if text.endswith("\ufffd"):
            text, stop = _unknown_run(tokenizer, ids, raw, i, text)
        pieces.append(Piece(text, i, stop))
        start, parts, i, edge = stop, [], stop, True
    if start < len(ids):  # the ids end inside a character: its first bytes
        utf8.decode(b"", final=True)
        pieces.append(Piece("".join(parts) + CUT, start, len(ids), cut=True))
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    return _whole_characters(pieces, {i for i, t in enumerate(ids) if t in special})


def window_pieces(tokenizer, tokens: Sequence[int], first: int, last: int, margin: int = 32) -> list[Piece]:
    """The pieces that cover positions `first`..`last` of `tokens` (a window of a longer context), with positions
    counted in `tokens`; decoded from `margin` tokens either side (an emoji family is 25 bytes), so a character at
    an edge is cut as in the whole text, and shown whole even where it reaches past the window."""
    lo, hi = max(0, first - margin), min(len(tokens), last + 1 + margin)
    return [
        Piece(p.text, p.start + lo, p.stop + lo, p.cut)
        for p in token_pieces(tokenizer, tokens[lo:hi])
        if p.stop + lo > first and p.start + lo <= last
    ]


def lone_token_text(tokenizer, tid: int) -> str:
    """One token shown alone (a logit list, a vocabulary entry): its text, and where it holds only part of a
    character, the bytes it holds written out ("\\xe4\\xb8"), never a bare replacement glyph."""
    raw = token_bytes(tokenizer, [int(tid)])[0]
    if raw is None:
        return _decode(tokenizer, [int(tid)])
    return raw.decode("utf-8", "backslashreplace")


def piece_texts(pieces: Sequence[Piece]) -> list[str]:
    """The text each token adds, so that concatenating them gives the pieces' text: the last token of each piece
    carries the piece's text, the tokens before it in the piece carry ""."""
    out = [""] * (pieces[-1].stop if pieces else 0)
    for p in pieces:
        out[p.stop - 1] = p.text
    return out


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """`piece_texts` of the ids' pieces: one text per token, joined they give the decoded text."""
    return piece_texts(token_pieces(tokenizer, ids))


def piece_index(pieces: Sequence[Piece]) -> list[int]:
    """For every token position, the index of the piece that covers it."""
    out: list[int] = []
    for k, p in enumerate(pieces):
        out.extend([k] * len(p))
    return out


def strongest(p: Piece, values: Sequence[float]) -> int:
    """The position of the piece's token with the largest value (the first of equals)."""
    return max(p.positions, key=lambda i: (values[i], -i))


def piece_values(pieces: Sequence[Piece], values: Sequence[float]) -> list[tuple[float, list[float]]]:
    """Per piece: its strongest token's value (what the piece is coloured by) and each token's value."""
    return [(max(values[i] for i in p.positions), [float(values[i]) for i in p.positions]) for p in pieces]


def piece_of_position(tokenizer, ids: Sequence[int], pos: int) -> Piece:
    """The piece that covers token position `pos` (negative counts from the end)."""
    pieces = token_pieces(tokenizer, ids)
    n = len(ids)
    if not -n <= pos < n:
        raise IndexError(f"position {pos} is outside the {n} tokens")
    return pieces[piece_index(pieces)[pos % n]]
