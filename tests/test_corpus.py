"""Tests for thoughtscope.corpus: sources, packing, errors, default-corpus build (offline, fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import SENTENCES, tiny_bpe_tokenizer

from thoughtscope import corpus as C
from thoughtscope.corpus import (
    Context,
    Corpus,
    CorpusError,
    CorpusNotFoundError,
    default_corpus_dir,
)


@pytest.fixture(scope="module")
def tok():
    return tiny_bpe_tokenizer()


@pytest.fixture(scope="module")
def tok_no_bos(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<eos>")


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path: Path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)), "utf-8")


# ---------------------------------------------------------------- sources


def test_text_file_small_is_one_document(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first paragraph\n\n\n\nsecond paragraph\n", "utf-8")
    assert list(Corpus(p).documents()) == ["first paragraph\n\n\n\nsecond paragraph"]


def test_text_file_large_splits_on_double_blank_lines(tmp_path):
    block = ("word " * 200).strip()
    n = C.LARGE_TEXT_BYTES // len(block) + 2
    p = tmp_path / "big.md"
    p.write_text("\n\n\n".join(f"{i} {block}\nnext line\n\nsame doc" for i in range(n)), "utf-8")
    docs = list(Corpus(str(p)).documents())
    assert len(docs) == n
    assert docs[3].startswith("3 word") and docs[3].endswith("same doc")


def test_folder_recursive_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("doc z", "utf-8")
    (tmp_path / "a.md").write_text("doc a", "utf-8")
    write_jsonl(tmp_path / "b" / "c.jsonl", ["doc c1", "doc c2"])
    (tmp_path / "ignored.csv").write_text("not read", "utf-8")
    (tmp_path / ".hidden.txt").write_text("not read", "utf-8")
    c = Corpus(tmp_path)
    assert c.kind == "folder"
    assert list(c.documents()) == ["doc a", "doc c1", "doc c2", "doc z"]
    d = c.describe()
    assert [f["path"] for f in d["files"]] == ["a.md", "b/c.jsonl", "b/z.txt"]
    assert all(len(f["sha256"]) == 64 for f in d["files"]) and d["n_docs"] == 4
    json.dumps(d)


def test_jsonl_custom_field_skips_blank_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"body": "one"}\n\n{"body": "two"}\n', "utf-8")
    assert list(Corpus(p, text_field="body").documents()) == ["one", "two"]


# ---------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        Corpus(missing)
    with pytest.raises(CorpusError, match="nope.txt"):
        Corpus(str(missing))


def test_non_utf8_file_names_file_and_offset(tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes(b"caf" + b"\xe9 au lait")
    with pytest.raises(CorpusError, match=r"latin\.txt.*byte offset 3"):
        list(Corpus(p).documents())


def test_jsonl_missing_field_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n{"content": "bad"}\n', "utf-8")
    with pytest.raises(CorpusError, match=r"d\.jsonl:2.*'text'.*content"):
        list(Corpus(p).documents())


def test_jsonl_bad_json_names_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n{"text": oops}\n', "utf-8")
    with pytest.raises(CorpusError, match=r"d\.jsonl:2.*not valid JSON"):
        list(Corpus(p).documents())


def test_empty_corpus(tmp_path, tok):
    (tmp_path / "empty.txt").write_text("  \n\n", "utf-8")
    with pytest.raises(CorpusError, match="empty"):
        list(Corpus(tmp_path / "empty.txt").documents())
    d = tmp_path / "dir"
    d.mkdir()
    with pytest.raises(CorpusError, match=r"empty.*|dir"):
        next(Corpus(d).contexts(tok, 8))


def test_bad_specs(tok, tmp_path):
    with pytest.raises(CorpusError):
        Corpus("")
    with pytest.raises(CorpusError, match="hf:"):
        Corpus("hf:")
    p = tmp_path / "a.txt"
    p.write_text("a few words here", "utf-8")
    with pytest.raises(CorpusError, match="ctx_len"):
        next(Corpus(p).contexts(tok, 1))
    with pytest.raises(CorpusError, match="too small"):
        next(Corpus(p).contexts(tok, 512))


def test_hf_without_datasets_is_clear(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    c = Corpus("hf:some/dataset:cfg")
    assert c.describe()["dataset"] == "some/dataset" and c.describe()["config"] == "cfg"
    with pytest.raises(CorpusError, match="datasets"):
        next(c.documents())


# ---------------------------------------------------------------- packing


def _expected_stream(tok, docs):
    ids, dids, pos = [], [], []
    for d, text in enumerate(docs):
        t = enc(tok, text)
        ids += t + [tok.eos_token_id]
        dids += [d] * (len(t) + 1)
        pos += list(range(len(t))) + [-1]
    return ids, dids, pos


def test_packing_with_bos(tmp_path, tok):
    write_jsonl(tmp_path / "c.jsonl", SENTENCES)
    corpus = Corpus(tmp_path / "c.jsonl")
    ctx_len = 7
    rows = list(corpus.contexts(tok, ctx_len))
    ids, dids, pos = _expected_stream(tok, SENTENCES)
    assert len(rows) == len(ids) // (ctx_len - 1)
    for i, r in enumerate(rows):
        assert isinstance(r, Context)
        assert r.input_ids.shape == r.doc_ids.shape == r.doc_positions.shape == (ctx_len,)
        assert r.input_ids.dtype == torch.long
        assert r.input_ids[0] == tok.bos_token_id and r.doc_ids[0] == -1 and r.doc_positions[0] == -1
        sl = slice(i * (ctx_len - 1), (i + 1) * (ctx_len - 1))
        assert r.input_ids[1:].tolist() == ids[sl]
        assert r.doc_ids[1:].tolist() == dids[sl]
        assert r.doc_positions[1:].tolist() == pos[sl]
    # separators: EOS carries its document id and position -1
    flat_ids = torch.cat([r.input_ids[1:] for r in rows])
    flat_pos = torch.cat([r.doc_positions[1:] for r in rows])
    assert (flat_pos[flat_ids == tok.eos_token_id] == -1).all()
    # doc positions recover each document's tokens
    flat_doc = torch.cat([r.doc_ids[1:] for r in rows])
    t1 = enc(tok, SENTENCES[1])
    m = (flat_doc == 1) & (flat_pos >= 0)
    assert flat_pos[m].tolist() == list(range(len(t1)))
    assert flat_ids[m].tolist() == t1
    # deterministic
    again = list(corpus.contexts(tok, ctx_len))
    assert all(torch.equal(a.input_ids, b.input_ids) and torch.equal(a.doc_ids, b.doc_ids) for a, b in zip(rows, again))


def test_packing_without_bos_and_bos_fallback(tmp_path, tok, tok_no_bos):
    write_jsonl(tmp_path / "c.jsonl", SENTENCES)
    corpus = Corpus(tmp_path / "c.jsonl")
    ids, _, _ = _expected_stream(tok, SENTENCES)
    rows = list(corpus.contexts(tok, 5, add_bos=False))
    assert len(rows) == len(ids) // 5
    assert torch.cat([r.input_ids for r in rows]).tolist() == ids[: 5 * len(rows)]
    assert (torch.cat([r.doc_ids for r in rows]) >= 0).all()
    # tokenizer without BOS: rows start with EOS instead
    rows = list(corpus.contexts(tok_no_bos, 5))
    assert all(r.input_ids[0] == tok.eos_token_id and r.doc_ids[0] == -1 for r in rows)


def test_long_document_spans_rows_and_empty_docs_keep_ids(tmp_path, tok):
    long_doc = " ".join(SENTENCES * 10)
    write_jsonl(tmp_path / "c.jsonl", [long_doc, "!!!", SENTENCES[0]])
    rows = list(Corpus(tmp_path / "c.jsonl").contexts(tok, 16))
    n_long = len(enc(tok, long_doc))
    assert len(rows) > n_long // 15 - 1
    flat_doc = torch.cat([r.doc_ids[1:] for r in rows])
    flat_pos = torch.cat([r.doc_positions[1:] for r in rows])
    assert flat_pos[flat_doc == 0].tolist()[:n_long] == list(range(n_long))
    assert set(flat_doc.tolist()) <= {0, 1, 2}


def test_batches(tmp_path, tok):
    write_jsonl(tmp_path / "c.jsonl", SENTENCES * 4)
    corpus = Corpus(tmp_path / "c.jsonl")
    rows = list(corpus.contexts(tok, 8))
    batches = list(corpus.batches(tok, 8, 3))
    assert sum(b.input_ids.shape[0] for b in batches) == len(rows)
    assert all(b.input_ids.shape == (3, 8) for b in batches[:-1])
    assert 1 <= batches[-1].input_ids.shape[0] <= 3
    assert torch.equal(torch.cat([b.input_ids for b in batches]), torch.stack([r.input_ids for r in rows]))
    assert torch.equal(torch.cat([b.doc_positions for b in batches]), torch.stack([r.doc_positions for r in rows]))


# ---------------------------------------------------------------- default corpus location


def test_default_corpus_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("THOUGHTSCOPE_HOME", str(tmp_path / "home"))
    assert default_corpus_dir() == tmp_path / "home" / "corpus" / "default"


def test_reading_an_unbuilt_default_corpus_names_the_path_and_the_build_script(tmp_path, monkeypatch):
    """Reading never starts the Debian build: a missing default corpus is an error that says how to build it."""
    monkeypatch.setenv("THOUGHTSCOPE_HOME", str(tmp_path / "home"))
    with pytest.raises(CorpusNotFoundError) as e:
        next(Corpus("default").documents())
    assert str(tmp_path / "home" / "corpus" / "default" / "manifest.json") in str(e.value)
    assert "scripts/build_corpus.sh" in str(e.value)
    assert not (tmp_path / "home").exists()
