"""The default-corpus build (scripts/default_corpus/): text extraction, the stdlib fallback, and how the library reads
what it writes."""

from __future__ import annotations

import json

import pytest
from helpers import tiny_bpe_tokenizer
from typer.testing import CliRunner

from scripts.default_corpus import build as B
from scripts.default_corpus import extract as X
from scripts.default_corpus import sources as S
from thoughtscope._io import sha256_file
from thoughtscope.corpus import Corpus, default_corpus_dir


@pytest.fixture(scope="module")
def tok():
    return tiny_bpe_tokenizer()


# ---------------------------------------------------------------- html / chunking helpers


def test_html_to_text_drops_navigation_keeps_code():
    html = (
        "<html><head><title>T</title><style>x{}</style></head><body>"
        '<div class="related" role="navigation"><a href="#">prev</a></div>'
        "<h1>Title<a class='headerlink'>\u00b6</a></h1><p>Some   <b>bold</b>\n text.</p>"
        "<ul><li><p>item one</p></li><li>item two</li></ul>"
        "<pre>def f():\n    return 1</pre><script>alert(1)</script></body></html>"
    )
    text = X.html_to_text(html)
    assert "prev" not in text and "alert" not in text and "\u00b6" not in text and "x{}" not in text
    assert "Some bold text." in text
    assert "- item one" in text and "- item two" in text
    assert "def f():\n    return 1" in text


def test_chunk_text_limits_and_drops_index_runs():
    para = "A sentence of prose that goes on for a while. " * 10
    entries = "\n\n".join(f"entry {i}" for i in range(20))
    chunks = X.chunk_text("\n\n".join([para] * 20 + [entries, para]), max_chars=1500)
    assert all(len(c) <= 1500 for c in chunks)
    assert not any("entry 3" in c for c in chunks)
    assert sum(c.count("A sentence") for c in chunks) == 21 * 10


def test_fortune_split():
    assert X.split_fortunes("one cookie here\n%\nsecond cookie, two\nlines\n%\n") == [
        "one cookie here",
        "second cookie, two\nlines",
    ]


# ---------------------------------------------------------------- default corpus


@pytest.fixture
def fallback_env(tmp_path, monkeypatch):
    """No Debian packages (empty sysroot), a small stdlib-docstring budget, a private home."""
    monkeypatch.setattr(S, "_SYSROOT", tmp_path / "sysroot")
    monkeypatch.setattr(S, "_STDLIB_CAP_BYTES", 150_000)
    monkeypatch.setenv("THOUGHTSCOPE_HOME", str(tmp_path / "home"))
    return tmp_path


def test_build_default_corpus_fallback(fallback_env, tok):
    dest = B.build_default_corpus(fallback_env / "out", quiet=True)
    m = json.loads((dest / "manifest.json").read_text("utf-8"))
    assert m["fallback"] is True
    assert [s["name"] for s in m["sources"]] == ["python-docstrings"]
    assert m["n_docs"] == sum(s["n_docs"] for s in m["shards"]) > 10
    assert m["bytes"] >= 100_000 and "en" in m["languages"]
    for s in m["shards"]:
        assert sha256_file(dest / s["file"]) == s["sha256"]
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]  # temp dir renamed away
    docs = [json.loads(line) for line in (dest / m["shards"][0]["file"]).read_text("utf-8").splitlines()]
    assert all(d["text"].strip() and d["source"] == "python-docstrings" for d in docs)

    # rebuilding replaces atomically and is deterministic
    first = (dest / m["shards"][0]["file"]).read_bytes()
    B.build_default_corpus(fallback_env / "out", quiet=True)
    assert (dest / m["shards"][0]["file"]).read_bytes() == first


def test_the_library_reads_the_built_default_corpus(fallback_env, tok):
    B.build_default_corpus(default_corpus_dir(), quiet=True)
    c = Corpus("default")
    first = next(c.documents())
    assert isinstance(first, str) and first
    d = c.describe()
    assert d["kind"] == "default" and d["n_docs"] > 10 and len(d["manifest_sha256"]) == 64
    row = next(c.contexts(tok, 32))
    assert row.input_ids.shape == (32,) and row.input_ids[0] == tok.bos_token_id


def test_cli_build(fallback_env):
    import typer

    app = typer.Typer()
    app.command()(B.main)
    r = CliRunner().invoke(app, ["--dest", str(fallback_env / "cli"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert (fallback_env / "cli" / "manifest.json").is_file()
