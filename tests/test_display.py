"""Text shown by pieces (thoughtscope.display): a character split over byte tokens is one piece, shown once, whole.

Tokenizers: the tiny models' byte tokenizer (every byte a token), a tiny trained byte-level BPE, a sentencepiece-
style tokenizer with byte fallback (`<0xE4>` tokens) built in memory, and (slow) the default model's own.
"""

from __future__ import annotations

import pytest
from helpers import tiny_bpe_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from thoughtscope.display import (
    Piece,
    lone_token_text,
    piece_index,
    piece_texts,
    piece_values,
    strongest,
    token_bytes,
    token_pieces,
    token_texts,
    window_pieces,
)
from thoughtscope.models import byte_tokenizer

CHINESE = "中文世界"
POLISH = "Zażółć gęślą jaźń, łódź"
ZWJ_FAMILY = "👩\u200d👩\u200d👧"
EMOJI = f"😀 👍🏽 {ZWJ_FAMILY} 🇵🇱 🇩🇪"
MIXED = f"hello {CHINESE} and {POLISH}: {EMOJI}! e\u0301 ok\nnext line"
TEXTS = [CHINESE, POLISH, EMOJI, ZWJ_FAMILY, MIXED, "plain ASCII only"]


def byte_fallback_tokenizer():
    """A sentencepiece-style tokenizer (▁ for spaces, byte fallback) whose vocabulary has the ASCII letters and the
    256 `<0xNN>` byte tokens only, so every non-ASCII character is spelt in byte tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,:!?\n":
        vocab.setdefault(ch, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module", params=["bytes", "bpe", "byte-fallback"])
def tok(request):
    return {"bytes": lambda: byte_tokenizer(259), "bpe": tiny_bpe_tokenizer, "byte-fallback": byte_fallback_tokenizer}[
        request.param
    ]()


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def check_pieces(pieces: list[Piece], n: int) -> None:
    """Every position in exactly one piece, in order."""
    assert [q for p in pieces for q in p.positions] == list(range(n))
    assert all(len(p) >= 1 for p in pieces)


@pytest.mark.parametrize("text", TEXTS)
def test_valid_text_shows_whole_characters_only(tok, text):
    ids = ids_of(tok, text)
    pieces = token_pieces(tok, ids)
    check_pieces(pieces, len(ids))
    assert "".join(p.text for p in pieces) == text  # each character once, nothing lost, nothing doubled
    assert not any("\ufffd" in p.text or p.text == "" for p in pieces)
    assert "·" not in "".join(p.text for p in pieces)
    assert "".join(token_texts(tok, ids)) == text


def test_split_characters_are_one_piece_over_their_tokens():
    tok = byte_tokenizer(259)
    pieces = token_pieces(tok, ids_of(tok, f"a中ł{ZWJ_FAMILY}🇵🇱e\u0301"))
    assert [(p.text, len(p)) for p in pieces] == [
        ("a", 1),
        ("中", 3),
        ("ł", 2),
        (ZWJ_FAMILY, 18),  # 3 emoji of 4 bytes and 2 joiners of 3: what a reader sees as one character
        ("🇵🇱", 8),  # a flag: two regional indicators
        ("e\u0301", 3),  # e and its combining accent
    ]
    flags = token_pieces(tok, ids_of(tok, "🇵🇱🇩🇪"))
    assert [p.text for p in flags] == ["🇵🇱", "🇩🇪"]  # pairs, not one run of four


def test_byte_fallback_tokens_are_read_as_bytes():
    tok = byte_fallback_tokenizer()
    ids = ids_of(tok, "a 中")
    assert tok.convert_ids_to_tokens(ids)[-3:] == ["<0xE4>", "<0xB8>", "<0xAD>"]
    assert token_bytes(tok, ids)[-3:] == [b"\xe4", b"\xb8", b"\xad"]
    assert [p.text for p in token_pieces(tok, ids)][-1] == "中"


def test_invalid_utf8_still_shows_the_replacement_glyph():
    tok = byte_tokenizer(259)
    zhong = ids_of(tok, "中")  # E4 B8 AD
    a, b = ids_of(tok, "a"), ids_of(tok, "b")
    cut = token_pieces(tok, zhong[:2] + a)  # a character missing its last byte, then "a"
    assert "".join(p.text for p in cut) == "\ufffda" and cut[-1].stop == 3
    inside = token_pieces(tok, a + zhong[1:] + b)  # bytes that begin no character, inside the text
    assert [p.text for p in inside] == ["a", "\ufffd", "\ufffd", "b"] and not any(p.cut for p in inside)


def test_characters_cut_at_the_edges_of_a_context_read_as_cut():
    """An atlas context is cut from a longer text: it may start or end inside a character, which it does not hold."""
    tok = byte_tokenizer(259)
    zhong, wen = ids_of(tok, "中"), ids_of(tok, "文")
    a = ids_of(tok, "a")
    start = token_pieces(tok, zhong[1:] + a + zhong)  # the first byte of 中 is in the context before
    assert [(p.text, p.cut, len(p)) for p in start] == [("…", True, 2), ("a", False, 1), ("中", False, 3)]
    after_bos = token_pieces(tok, [tok.bos_token_id, *zhong[2:], *wen])  # position 0 a BOS, as atlas contexts
    assert [p.text for p in after_bos] == ["<s>", "…", "文"]
    zwj = token_pieces(tok, [tok.bos_token_id, *ids_of(tok, "\u200d👧")])  # a context starting at a joiner
    assert [p.text for p in zwj] == ["<s>", "\u200d👧"]  # a special token joins nothing
    end = token_pieces(tok, a + wen[:2])  # 文 continues in the next context
    assert [(p.text, p.cut) for p in end] == [("a", False), ("…", True)]
    assert not any("\ufffd" in p.text for p in start + after_bos + end)


def test_values_map_to_the_whole_piece():
    tok = byte_tokenizer(259)
    ids = ids_of(tok, "x中y")
    pieces = token_pieces(tok, ids)
    acts = [0.0, 0.0, 3.5, 0.25, 1.0]  # the feature fires on the middle byte of 中
    assert piece_values(pieces, acts) == [(0.0, [0.0]), (3.5, [0.0, 3.5, 0.25]), (1.0, [1.0])]
    assert strongest(pieces[1], acts) == 2
    assert piece_index(pieces) == [0, 1, 1, 1, 2]
    assert piece_texts(pieces) == ["x", "", "", "中", "y"]


def test_window_pieces_are_cut_as_in_the_whole_text():
    tok = byte_tokenizer(259)
    ids = ids_of(tok, "ab中文cd")  # a b E4 B8 AD E6 96 87 c d
    win = window_pieces(tok, ids, 3, 6)  # positions 3..6: the middle of 中 to the middle of 文
    assert [(p.text, p.start, p.stop) for p in win] == [("中", 2, 5), ("文", 5, 8)]


def test_lone_token_shows_its_bytes_not_a_replacement_glyph():
    tok = byte_tokenizer(259)
    e4 = ids_of(tok, "中")[0]
    assert lone_token_text(tok, e4) == "\\xe4"
    assert lone_token_text(tok, ids_of(tok, "a")[0]) == "a"
    assert lone_token_text(tok, tok.bos_token_id) == "<s>"


def test_special_tokens_stay_their_own_piece():
    tok = tiny_bpe_tokenizer()
    ids = [tok.bos_token_id, *ids_of(tok, "中 x"), tok.eos_token_id]
    assert [p.text for p in token_pieces(tok, ids)][0] == "<bos>"
    assert token_pieces(tok, ids)[-1].text == "<eos>"


@settings(max_examples=60, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd"), max_size=24))
def test_any_valid_text_round_trips(text):
    tok = byte_tokenizer(259)
    ids = ids_of(tok, text)
    pieces = token_pieces(tok, ids)
    check_pieces(pieces, len(ids))
    assert "".join(p.text for p in pieces) == text and not any("\ufffd" in p.text for p in pieces)


@pytest.mark.slow
def test_default_model_tokenizer():
    """SmolLM2's byte-level BPE: whole tokens for common CJK, byte pieces for ł, emoji, the ZWJ family."""
    from thoughtscope.models import load_model

    tok = load_model("default").tokenizer
    for text in TEXTS:
        ids = ids_of(tok, text)
        pieces = token_pieces(tok, ids)
        check_pieces(pieces, len(ids))
        assert "".join(p.text for p in pieces) == text and not any("\ufffd" in p.text for p in pieces)
    before = [tok.decode([i]) for i in ids_of(tok, EMOJI)]
    assert any("\ufffd" in s for s in before)  # the case this module exists for
    assert ZWJ_FAMILY in [p.text.strip() for p in token_pieces(tok, ids_of(tok, EMOJI))]


def test_nla_token_list_links_whole_characters():
    """The NLA view's token list (server/templates/_nla_tokens.html): one link per piece, to its last token."""
    import re

    from thoughtscope.server.render import make_env

    tok = byte_tokenizer(259)
    text = "a中ł"
    ids = [tok.bos_token_id, *ids_of(tok, text)]
    html = (
        make_env().get_template("_nla_tokens.html").render(pieces=token_pieces(tok, ids), pos=3, text=text, samples="1")
    )
    links = re.findall(r'<a class="t( peak)?" href="[^"]*pos=(\d+)[^"]*" title="([^"]*)">([^<]*)</a>', html)
    assert [(q, shown) for _, q, _, shown in links] == [("1", "a"), ("4", "中"), ("6", "ł")]
    assert links[1][0] == " peak" and "one character over positions 2, 3, 4" in links[1][2]
    assert "&lt;s&gt;" in html and "·" not in html and "\ufffd" not in html
