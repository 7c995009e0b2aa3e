"""The search benchmark's rule (benchmarks/search.py): which words count as the word, which contexts count, and
that one occurrence of the word never counts for two of a feature's held-out top contexts."""

from __future__ import annotations

import search as bench
import torch

from thoughtscope.models import byte_tokenizer


def test_word_pattern_takes_inflections_as_whole_words_only():
    p = bench.word_pattern("file")
    assert all(p.search(t) for t in ("a file", "two files", "Filed it", "FILE", "filing?"))
    assert not any(p.search(t) for t in ("profile", "filesystem", "fil e"))
    assert bench.word_pattern("city").search("three cities")
    assert bench.word_pattern("source code").search("the Source  codes here")
    assert not bench.word_pattern("source code").search("source of code")


def test_read_words_splits_tuning_and_held_out(tmp_path):
    f = tmp_path / "w.txt"
    f.write_text("# a comment\n# tune\nfile   # 10\n\n# held-out\nocean\nice cream # phrase\n")
    assert bench.read_words(f) == [("file", "tune"), ("ocean", "held-out"), ("ice cream", "held-out")]
    f.write_text("sun\nmoon\n")
    assert bench.read_words(f) == [("sun", "held-out"), ("moon", "held-out")]


def test_one_occurrence_counts_once_and_windows_are_peak_minus_5_to_plus_1():
    tok = byte_tokenizer(256)
    text = "\x00" + "a cat sat on the mat and far away the dog ran home now"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    toks = torch.tensor([ids])
    cat = text.index("cat")
    dog = text.index("dog")
    # feature 0 peaks on 't', 'a' and 'c' of the one "cat" (overlapping windows), then far away on "home"
    peaks = [cat + 2, cat + 1, cat, text.index("home") + 3]
    top_v = torch.tensor([[4.0], [3.0], [2.0], [1.0]])
    top_i = torch.tensor([[p] for p in peaks])
    assert bench.contexts_with_word(tok, toks, top_v, top_i, 0, bench.word_pattern("cat")) == 1
    # a peak 7 tokens after the word's end no longer sees it; 1 token before its start does
    far = torch.tensor([[cat + 2 + 7]]), torch.tensor([[cat - 1]])
    assert bench.contexts_with_word(tok, toks, torch.tensor([[1.0]]), far[0], 0, bench.word_pattern("cat")) == 0
    assert bench.contexts_with_word(tok, toks, torch.tensor([[1.0]]), far[1], 0, bench.word_pattern("cat")) == 0
    assert (
        bench.contexts_with_word(
            tok, toks, torch.tensor([[1.0]]), torch.tensor([[dog + 3]]), 0, bench.word_pattern("dog")
        )
        == 1
    )
