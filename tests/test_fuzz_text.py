"""Fuzzing the text readers (issue #32): corpus files (text, Markdown, JSONL, a folder of them) read and packed by
`Corpus`, and prompt files read by `documents.read_prompts`. A tiny valid file, one mutation, then the reader. The
rule: a valid result, or a `ThoughtscopeError` naming the file; never another exception, never a hang, never a
write."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from helpers import SENTENCES, tiny_bpe_tokenizer
from helpers.mutate import (
    Mutation,
    any_of,
    byte_mutations,
    dump_json,
    expect_clean,
    json_bytes_mutations,
    jsonl_mutations,
    text_mutations,
    write_tree,
)
from hypothesis import given
from hypothesis import strategies as st

from thoughtscope.corpus import Corpus
from thoughtscope.documents import read_prompts

CTX = 8

TEXT = (
    "# Notes on foxes\n\n"
    + "\n".join(SENTENCES[:3])
    + "\n\n\n\nA second part, after two blank lines.\n"
    + "\n".join(SENTENCES[3:])
    + "\n"
).encode()
JSONL = "".join(json.dumps({"text": s, "id": i, "source": "fuzz"}) + "\n" for i, s in enumerate(SENTENCES)).encode()
PROMPTS = {
    "prompts.json": dump_json([SENTENCES[0], {"text": SENTENCES[1], "label": 1}, SENTENCES[2]]),
    "prompts.jsonl": b"".join(dump_json({"text": s, "label": i % 2}) + b"\n" for i, s in enumerate(SENTENCES)),
    "prompts.txt": ("\n".join(SENTENCES) + "\n").encode(),
}


@pytest.fixture(scope="module")
def tok():
    return tiny_bpe_tokenizer()


def no_surrogates(s: str) -> None:
    s.encode("utf-8")  # raises on a lone surrogate: text the model could not tokenize


def read_corpus(spec: Path, tok) -> list[str]:
    """Read the documents and pack them; check that what comes back is usable text and full rows."""
    c = Corpus(spec)
    docs = list(c.documents())
    assert docs and all(isinstance(d, str) and d.strip() for d in docs)
    for d in docs:
        no_surrogates(d)
    rows = list(c.contexts(tok, CTX))
    assert rows and all(tuple(r.input_ids.shape) == (CTX,) for r in rows)
    batches = list(c.batches(tok, CTX, 2))
    assert sum(b.input_ids.shape[0] for b in batches) == len(rows)
    json.dumps(c.describe())
    return docs


def check_corpus(name: str, data: bytes, mutation: Mutation, tok) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(mutation(data))
        expect_clean(lambda: read_corpus(path, tok), names=[str(path)], folder=tmp, mutation=mutation)


text_file_mutations = any_of(byte_mutations(), text_mutations())


@given(st.sampled_from(["notes.txt", "notes.md"]), text_file_mutations)
def test_text_corpus(tok, name, mutation):
    check_corpus(name, TEXT, mutation, tok)


@given(any_of(jsonl_mutations(), text_mutations()))
def test_jsonl_corpus(tok, mutation):
    check_corpus("docs.jsonl", JSONL, mutation, tok)


FOLDER = {"a.txt": TEXT, "sub/b.md": TEXT, "sub/c.jsonl": JSONL, ".hidden/x.txt": b"\xff", "notes.rst": b"\xff"}


@given(st.sampled_from(["a.txt", "sub/b.md", "sub/c.jsonl"]), any_of(byte_mutations(), jsonl_mutations()))
def test_folder_corpus(tok, name, mutation):
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tree(Path(tmp) / "corpus", {**FOLDER, name: mutation(FOLDER[name])})
        expect_clean(
            lambda: read_corpus(folder, tok),
            names=[str(folder / name), str(folder)],
            folder=tmp,
            mutation=mutation,
        )


def read_prompt_file(path: Path) -> list[str]:
    prompts = read_prompts(path)
    assert isinstance(prompts, list) and prompts
    for p in prompts:
        assert isinstance(p, str)
        no_surrogates(p)
    return prompts


def check_prompts(name: str, mutation: Mutation) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(mutation(PROMPTS[name]))
        expect_clean(lambda: read_prompt_file(path), names=[str(path)], folder=tmp, mutation=mutation)


@given(json_bytes_mutations())
def test_json_prompt_file(mutation):
    check_prompts("prompts.json", mutation)


@given(any_of(jsonl_mutations(), text_mutations()))
def test_jsonl_prompt_file(mutation):
    check_prompts("prompts.jsonl", mutation)


@given(text_file_mutations)
def test_text_prompt_file(mutation):
    check_prompts("prompts.txt", mutation)


def test_templates_are_valid(tok, tmp_path):
    """The unmutated files read cleanly (so a rejected mutation was rejected for itself)."""
    for name, data in (("notes.txt", TEXT), ("notes.md", TEXT), ("docs.jsonl", JSONL)):
        (tmp_path / name).write_bytes(data)
        assert read_corpus(tmp_path / name, tok)
    folder = write_tree(tmp_path / "corpus", FOLDER)
    assert len(read_corpus(folder, tok)) == 2 + len(SENTENCES)
    for name, data in PROMPTS.items():
        (tmp_path / name).write_bytes(data)
        assert len(read_prompt_file(tmp_path / name)) in (3, len(SENTENCES))
