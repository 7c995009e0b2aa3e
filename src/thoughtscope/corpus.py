"""Text corpora and their packing into fixed-length model contexts.

A :class:`Corpus` turns a *spec* (the offline default corpus, a text file, a
folder, a JSONL file or a Hugging Face dataset) into a deterministic stream of
documents, and packs those documents into rows of exactly ``ctx_len`` tokens
that remember which document and which in-document position every token came
from. That bookkeeping is what lets later stages (activation stores, feature
dashboards) show a token *in its context*.

The default corpus is assembled once, offline, from Debian documentation and
fortune packages plus the Python documentation (see ``docs/corpus.md``), and
falls back to the docstrings of the Python standard library when none of those
packages is installed, so a fresh machine always has something to read.

Command line::

    python -m thoughtscope.corpus build [--dest DIR] [--seed N]
    python -m thoughtscope.corpus info [SPEC]
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import torch

from .errors import ThoughtscopeError

__all__ = [
    "Context",
    "Corpus",
    "CorpusError",
    "CorpusNotFoundError",
    "build_default_corpus",
    "default_corpus_dir",
]

#: Plain-text files bigger than this are split on runs of >= 2 blank lines;
#: smaller ones are one document each (a note, a README, an essay).
LARGE_TEXT_BYTES = 64 * 1024
#: Documents are tokenised this many at a time (fast tokenizers batch in Rust).
TOKENIZE_BATCH_DOCS = 256
#: Suffixes picked up when the spec is a folder.
FOLDER_SUFFIXES = (".txt", ".md", ".jsonl")
#: Bump when the default corpus recipe changes, so stale builds are noticed.
DEFAULT_CORPUS_VERSION = 1

_BIG_SPLIT = re.compile(r"\n[ \t\r\f\v]*\n[ \t\r\f\v]*\n\s*")  # >= 2 blank lines


class CorpusError(ThoughtscopeError, ValueError):
    """A corpus spec or file that cannot be read as documents."""


class CorpusNotFoundError(CorpusError, FileNotFoundError):
    """The path named by a corpus spec does not exist."""


# --------------------------------------------------------------------------
# Contexts
# --------------------------------------------------------------------------


@dataclass
class Context:
    """One fixed-length row fed to the model (or a stacked batch of rows).

    ``doc_ids`` holds the global index (in :meth:`Corpus.documents` order) of
    the document each token belongs to, -1 for an inserted BOS; the EOS that
    separates documents carries the id of the document it ends.
    ``doc_positions`` is the token's index inside its document, -1 for BOS and
    separators. From :meth:`Corpus.batches` every tensor is ``[B, ctx_len]``.
    """

    input_ids: torch.Tensor
    doc_ids: torch.Tensor
    doc_positions: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[-1])


def _special_ids(tokenizer: Any, add_bos: bool) -> tuple[int, int | None]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise CorpusError(
            f"tokenizer {type(tokenizer).__name__} has no eos_token_id; packing needs an EOS token "
            "to separate documents"
        )
    bos: int | None = None
    if add_bos:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            bos = eos
    return int(eos), (None if bos is None else int(bos))


def _encode_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text without special tokens (batched where possible)."""
    if not callable(tokenizer) and hasattr(tokenizer, "encode_batch"):  # a raw tokenizers.Tokenizer
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    try:
        out = tokenizer(
            texts,
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )
    except TypeError:  # tokenizers that do not take every keyword
        out = tokenizer(texts, add_special_tokens=False)
    ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    return [list(map(int, x)) for x in ids]


def _batched(it: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for x in it:
        batch.append(x)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------


def _read_utf8(path: Path) -> str:
    """Strict UTF-8 read: silently replacing bytes would corrupt the text we study."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = data[e.start : e.start + 4].hex(" ")
        raise CorpusError(
            f"{path}: not valid UTF-8 at byte offset {e.start} (bytes {bad}); "
            "re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None
    return text.removeprefix("\ufeff")


def _text_file_docs(path: Path) -> Iterator[str]:
    text = _read_utf8(path)
    if len(text.encode("utf-8")) > LARGE_TEXT_BYTES:
        parts: Iterable[str] = _BIG_SPLIT.split(text)
    else:
        parts = [text]
    for p in parts:
        p = p.strip()
        if p:
            yield p


def _jsonl_docs(path: Path, text_field: str) -> Iterator[str]:
    text = _read_utf8(path)
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}:{lineno}: line is not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise CorpusError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        if text_field not in rec:
            keys = ", ".join(sorted(map(str, rec))[:10]) or "none"
            raise CorpusError(
                f"{path}:{lineno}: missing text field {text_field!r} (fields present: {keys}); "
                "pass text_field=... to Corpus"
            )
        value = rec[text_field]
        if not isinstance(value, str):
            raise CorpusError(f"{path}:{lineno}: field {text_field!r} must be a string, got {type(value).__name__}")
        if value.strip():
            yield value


def _file_docs(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix.lower() == ".jsonl":
        yield from _jsonl_docs(path, text_field)
    else:
        yield from _text_file_docs(path)


def _folder_files(folder: Path) -> list[Path]:
    """Matching files under ``folder``, sorted by relative path; hidden entries skipped."""
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES:
            out.append(p)
    return sorted(out, key=lambda p: p.relative_to(folder).as_posix())


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------


class Corpus:
    """A deterministic stream of documents, packable into model contexts.

    ``spec`` is one of:

    * ``"default"``: the offline default corpus in :func:`default_corpus_dir`
      (built on first use if missing);
    * a ``.txt``/``.md`` file: one document, or, when larger than
      ``LARGE_TEXT_BYTES`` (64 KiB), one document per block separated by runs
      of two or more blank lines;
    * a ``.jsonl`` file: one document per line, read from ``text_field``;
    * a folder: every ``*.txt``, ``*.md`` and ``*.jsonl`` below it, in sorted
      relative-path order (hidden files and folders skipped);
    * ``"hf:<dataset>[:<config>]"``: a Hugging Face dataset streamed with the
      ``datasets`` library (optional dependency, needs the hub).

    Files must be UTF-8; errors name the file (and line or byte offset).
    """

    def __init__(self, spec: str | os.PathLike = "default", *, text_field: str = "text", split: str = "train"):
        self.text_field = text_field
        self.split = split
        self._n_docs: int | None = None
        self._hf: tuple[str, str | None] | None = None
        self._path: Path | None = None
        spec_str = os.fspath(spec) if isinstance(spec, os.PathLike) else spec
        if not isinstance(spec_str, str) or not spec_str.strip():
            raise CorpusError(f"corpus spec must be a non-empty string or path, got {spec!r}")
        self.spec = spec_str
        if spec_str == "default":
            self.kind = "default"
        elif spec_str.startswith("hf:"):
            rest = spec_str[3:]
            name, _, config = rest.partition(":")
            if not name:
                raise CorpusError(f"corpus spec {spec_str!r}: expected 'hf:<dataset>[:<config>]'")
            self.kind = "hf"
            self._hf = (name, config or None)
        else:
            path = Path(spec_str).expanduser()
            if not path.exists():
                raise CorpusNotFoundError(
                    f"corpus path {str(path)!r} does not exist (expected 'default', a .txt/.md/.jsonl "
                    "file, a folder, or 'hf:<dataset>[:<config>]')"
                )
            self._path = path
            if path.is_dir():
                self.kind = "folder"
            elif path.suffix.lower() == ".jsonl":
                self.kind = "jsonl"
            else:
                self.kind = "file"

    def __repr__(self) -> str:
        return f"Corpus({self.spec!r})"

    # ---- documents -------------------------------------------------------

    def _files(self) -> list[Path]:
        if self.kind == "default":
            d = self._default_dir()
            manifest = json.loads((d / "manifest.json").read_text("utf-8"))
            return [d / s["file"] for s in manifest["shards"]]
        if self.kind == "folder":
            assert self._path is not None
            return _folder_files(self._path)
        if self.kind in ("file", "jsonl"):
            assert self._path is not None
            return [self._path]
        return []

    def _default_dir(self) -> Path:
        d = default_corpus_dir()
        if not (d / "manifest.json").is_file():
            print(f"thoughtscope: default corpus not found in {d}; building it (one-off)...", file=sys.stderr)
            build_default_corpus(d)
        return d

    def _raw_documents(self) -> Iterator[str]:
        if self.kind == "hf":
            yield from self._hf_documents()
            return
        field_name = "text" if self.kind == "default" else self.text_field
        for f in self._files():
            yield from _file_docs(f, field_name)

    def _hf_documents(self) -> Iterator[str]:
        assert self._hf is not None
        name, config = self._hf
        try:
            import datasets
        except ImportError:
            raise CorpusError(
                f"corpus spec {self.spec!r} needs the optional 'datasets' package: pip install datasets"
            ) from None
        try:
            ds = datasets.load_dataset(name, config, split=self.split, streaming=True)
        except Exception as e:  # network, auth or unknown dataset
            raise CorpusError(
                f"could not open Hugging Face dataset {name!r} (config {config!r}, split {self.split!r}): "
                f"{type(e).__name__}: {e}. Check the name and that the hub is reachable."
            ) from e
        for i, rec in enumerate(ds):
            if self.text_field not in rec:
                raise CorpusError(
                    f"dataset {name!r} record {i}: missing text field {self.text_field!r} "
                    f"(fields: {', '.join(sorted(rec))}); pass text_field=..."
                )
            value = rec[self.text_field]
            if isinstance(value, str) and value.strip():
                yield value

    def documents(self) -> Iterator[str]:
        """Yield documents in a fixed order; raises if the corpus has none."""
        n = 0
        for doc in self._raw_documents():
            n += 1
            yield doc
        if n == 0:
            raise CorpusError(f"corpus {self.spec!r} is empty: it contains no non-blank documents")
        self._n_docs = n

    # ---- packing ---------------------------------------------------------

    def contexts(self, tokenizer: Any, ctx_len: int, *, add_bos: bool = True) -> Iterator[Context]:
        """Pack documents into rows of exactly ``ctx_len`` tokens, deterministically.

        Each document is tokenised without special tokens and followed by the
        tokenizer's EOS as a separator; the stream is cut into rows, so long
        documents continue across rows. With ``add_bos`` every row starts with
        the tokenizer's BOS (or its EOS when it has no BOS, as many models use
        one token for both) followed by ``ctx_len - 1`` packed tokens. A final
        partial row is dropped so every row has the same length.
        """
        if not isinstance(ctx_len, int) or ctx_len < (2 if add_bos else 1):
            raise CorpusError(f"ctx_len must be an int >= {2 if add_bos else 1}, got {ctx_len!r}")
        eos, bos = _special_ids(tokenizer, add_bos)
        body = ctx_len - 1 if add_bos else ctx_len
        ids: list[int] = []
        dids: list[int] = []
        poss: list[int] = []
        doc_index = 0
        n_rows = 0
        n_tokens = 0
        prefix_ids = [bos] if add_bos else []
        prefix_meta = [-1] if add_bos else []

        def emit(start: int) -> Context:
            end = start + body
            return Context(
                input_ids=torch.tensor(prefix_ids + ids[start:end], dtype=torch.long),
                doc_ids=torch.tensor(prefix_meta + dids[start:end], dtype=torch.long),
                doc_positions=torch.tensor(prefix_meta + poss[start:end], dtype=torch.long),
            )

        for batch in _batched(self.documents(), TOKENIZE_BATCH_DOCS):
            for toks in _encode_batch(tokenizer, batch):
                if toks:
                    n = len(toks)
                    ids.extend(toks)
                    ids.append(eos)
                    dids.extend([doc_index] * (n + 1))
                    poss.extend(range(n))
                    poss.append(-1)
                    n_tokens += n
                doc_index += 1
            start = 0
            while len(ids) - start >= body:
                yield emit(start)
                start += body
                n_rows += 1
            if start:
                del ids[:start], dids[:start], poss[:start]
        if n_tokens == 0:
            raise CorpusError(f"corpus {self.spec!r} is empty: its {doc_index} documents produce no tokens")
        if n_rows == 0:
            raise CorpusError(
                f"corpus {self.spec!r} is too small: {len(ids)} tokens (with separators) cannot fill one "
                f"context of {body} tokens (ctx_len={ctx_len}, add_bos={add_bos})"
            )

    def batches(self, tokenizer: Any, ctx_len: int, batch_size: int, *, add_bos: bool = True) -> Iterator[Context]:
        """:meth:`contexts` stacked into ``[B, ctx_len]`` tensors; the last batch may be smaller."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise CorpusError(f"batch_size must be a positive int, got {batch_size!r}")
        buf: list[Context] = []
        for c in self.contexts(tokenizer, ctx_len, add_bos=add_bos):
            buf.append(c)
            if len(buf) == batch_size:
                yield _stack(buf)
                buf = []
        if buf:
            yield _stack(buf)

    # ---- description -----------------------------------------------------

    def describe(self) -> dict:
        """JSON-able identity of this corpus, recorded in store manifests."""
        out: dict[str, Any] = {"spec": self.spec, "kind": self.kind}
        if self.kind == "hf":
            assert self._hf is not None
            out.update(dataset=self._hf[0], config=self._hf[1], split=self.split, text_field=self.text_field)
        elif self.kind == "default":
            d = self._default_dir()
            mpath = d / "manifest.json"
            m = json.loads(mpath.read_text("utf-8"))
            out.update(
                path=str(d),
                manifest_sha256=_sha256_file(mpath),
                version=m.get("version"),
                n_docs=m.get("n_docs"),
                bytes=m.get("bytes"),
                sources=[s["name"] for s in m.get("sources", [])],
            )
            return out
        else:
            assert self._path is not None
            out["path"] = str(self._path.resolve())
            if self.kind != "file":
                out["text_field"] = self.text_field
            base = self._path if self.kind == "folder" else self._path.parent
            out["files"] = [
                {"path": f.relative_to(base).as_posix(), "bytes": f.stat().st_size, "sha256": _sha256_file(f)}
                for f in self._files()
            ]
        if self._n_docs is not None:
            out["n_docs"] = self._n_docs
        return out


def _stack(rows: list[Context]) -> Context:
    return Context(
        input_ids=torch.stack([r.input_ids for r in rows]),
        doc_ids=torch.stack([r.doc_ids for r in rows]),
        doc_positions=torch.stack([r.doc_positions for r in rows]),
    )


# --------------------------------------------------------------------------
# Default corpus: location
# --------------------------------------------------------------------------


def default_corpus_dir() -> Path:
    """Where the default corpus lives: ``$THOUGHTSCOPE_HOME`` or ``~/.cache/thoughtscope``, + ``corpus/default``."""
    home = os.environ.get("THOUGHTSCOPE_HOME")
    root = Path(home).expanduser() if home else Path.home() / ".cache" / "thoughtscope"
    return root / "corpus" / "default"


# --------------------------------------------------------------------------
# Default corpus: text extraction helpers
# --------------------------------------------------------------------------

#: Root under which Debian files are looked up (tests point this elsewhere).
_SYSROOT = Path("/")

_SKIP_TAGS = {"script", "style", "head", "nav", "noscript", "svg", "button", "form"}
_SKIP_CLASSES = {
    "sphinxsidebar",
    "related",
    "footer",
    "navheader",
    "navfooter",
    "toc",
    "headerlink",
    "version_switcher_placeholder",
    "language_switcher_placeholder",
    "breadcrumbs",
    "mobile-nav",
    "mobile-nav-toggle",
    "copyright",
    "legalnotice",
    "index",
    "indexdiv",
    "header",
    "nav-panel",
    "contents-heading",
    "shortcontents",
    "docnav",
}
_BLOCK_TAGS = {
    "p",
    "div",
    "section",
    "article",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "li",
    "ul",
    "ol",
    "dl",
    "dt",
    "dd",
    "tr",
    "table",
    "blockquote",
    "pre",
    "title",
    "figure",
    "figcaption",
    "caption",
    "hr",
    "br",
    "tbody",
    "thead",
}
_VOID_TAGS = {"br", "hr", "img", "meta", "link", "input", "wbr", "area", "base", "col", "source"}


class _HTMLText(HTMLParser):
    """HTML -> readable plain text: drops navigation, keeps paragraphs and code blocks."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip_tag: str | None = None
        self.skip_depth = 0
        self.pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.skip_tag is not None:
            if tag == self.skip_tag and tag not in _VOID_TAGS:
                self.skip_depth += 1
            return
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        if (
            tag in _SKIP_TAGS
            or classes & _SKIP_CLASSES
            or a.get("id") in ("banner", "site_footer")
            or a.get("role") in ("navigation", "search")
            or a.get("aria-label") == "source link"
        ):
            if tag not in _VOID_TAGS:
                self.skip_tag, self.skip_depth = tag, 1
            return
        if tag == "pre":
            self.pre += 1
        if tag in _BLOCK_TAGS and not (self.out and self.out[-1] == "- "):  # "- " + <p> stays one line
            self.out.append("\n\n" if tag not in ("br", "li", "tr", "dt", "dd") else "\n")
        if tag == "li":
            self.out.append("- ")
        if tag in ("td", "th"):
            self.out.append(" ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.skip_tag is None and tag in ("br", "hr"):
            self.out.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth -= 1
                if self.skip_depth == 0:
                    self.skip_tag = None
            return
        if tag == "pre" and self.pre:
            self.pre -= 1
        if tag in _BLOCK_TAGS:
            self.out.append("\n\n" if tag not in ("li", "tr", "dt", "dd") else "\n")

    def handle_data(self, data: str) -> None:
        if self.skip_tag is not None:
            return
        if self.pre:
            self.out.append(data)
            return
        data = re.sub(r"\s+", " ", data)
        if not self.out or self.out[-1].endswith("\n") or self.out[-1].endswith("- "):
            data = data.lstrip()
        if data:
            self.out.append(data)

    def text(self) -> str:
        raw = "".join(self.out).replace("\u00b6", "")
        text = "\n".join(ln.rstrip() for ln in raw.split("\n"))
        text = re.sub(r"\n{3,}", "\n\n", text)
        return text.strip()


def _html_to_text(html: str) -> str:
    p = _HTMLText()
    p.feed(html)
    p.close()
    return p.text()


def _read_maybe_gz(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # a few old Debian texts are Latin-1; our own builder may be lenient
        return data.decode("latin-1")


def _drop_index_runs(paras: list[str], run: int = 8) -> list[str]:
    """Remove tables of contents / word lists: runs of >= ``run`` paragraphs that are one short line."""

    def short(p: str) -> bool:
        p = p.strip()
        return "\n" not in p and len(p) < 40 and not p.endswith((".", "!", "?", ":"))

    out: list[str] = []
    i = 0
    while i < len(paras):
        j = i
        while j < len(paras) and short(paras[j]):
            j += 1
        if j - i >= run:
            i = j
            continue
        out.extend(paras[i : max(j, i + 1)])
        i = max(j, i + 1)
    return out


def _chunk_text(text: str, max_chars: int = 4000, min_chars: int = 40) -> list[str]:
    """Split a long text into documents at paragraph boundaries (each <= ~max_chars).

    Short documents make the shuffled default corpus diverse within a few
    thousand tokens; paragraphs keep each chunk readable on its own.
    """
    text = text.replace("\r\n", "\n").strip()
    if not text:
        return []
    paras = _drop_index_runs([p for p in re.split(r"\n[ \t]*\n(?:[ \t]*\n)*", text) if p.strip()])
    pieces: list[str] = []
    for p in paras:
        if len(p) <= max_chars:
            pieces.append(p)
            continue
        lines, cur = p.split("\n"), ""
        for ln in lines:
            while len(ln) > max_chars:
                cut = ln.rfind(" ", 0, max_chars)
                cut = cut if cut > max_chars // 2 else max_chars
                if cur:
                    pieces.append(cur)
                    cur = ""
                pieces.append(ln[:cut])
                ln = ln[cut:].lstrip()
            if cur and len(cur) + 1 + len(ln) > max_chars:
                pieces.append(cur)
                cur = ln
            else:
                cur = f"{cur}\n{ln}" if cur else ln
        if cur:
            pieces.append(cur)
    chunks, cur = [], ""
    for p in pieces:
        if cur and len(cur) + 2 + len(p) > max_chars:
            chunks.append(cur)
            cur = p
        else:
            cur = f"{cur}\n\n{p}" if cur else p
    if cur:
        chunks.append(cur)
    return [c for c in (c.strip() for c in chunks) if len(c) >= min_chars]


def _fortunes(text: str) -> list[str]:
    """Split a fortune(6) data file into its cookies (separated by lines of ``%``)."""
    out = []
    for cookie in re.split(r"^%%?\s*$", text.replace("\r\n", "\n"), flags=re.MULTILINE):
        cookie = cookie.strip("\n").rstrip()
        if len(cookie.strip()) >= 10:
            out.append(cookie)
    return out


# --------------------------------------------------------------------------
# Default corpus: sources
# --------------------------------------------------------------------------


@dataclass
class _Source:
    name: str
    lang: str
    license: str
    description: str
    collect: Callable[[], list[tuple[str, str]]]  # -> [(origin, text)] already split into documents
    cap_bytes: int
    packages: list[str] = field(default_factory=list)


def _dpkg_files(pkg: str) -> list[Path] | None:
    """Files installed by a Debian package (None when it is not installed)."""
    lst = _SYSROOT / "var/lib/dpkg/info" / f"{pkg}.list"
    if not lst.is_file():
        arch = sorted((_SYSROOT / "var/lib/dpkg/info").glob(f"{pkg}:*.list"))
        if not arch:
            return None
        lst = arch[0]
    out = []
    for line in lst.read_text("utf-8", errors="replace").splitlines():
        p = _SYSROOT / line.lstrip("/")
        if line and p.is_file() and not p.is_symlink():
            out.append(p)
    return out


def _dpkg_versions(pkgs: Iterable[str]) -> dict[str, str]:
    status = _SYSROOT / "var/lib/dpkg/status"
    want = set(pkgs)
    found: dict[str, str] = {}
    if not status.is_file():
        return found
    for block in status.read_text("utf-8", errors="replace").split("\n\n"):
        m = re.search(r"^Package: (\S+)$", block, re.MULTILINE)
        if m and m.group(1) in want and "install ok installed" in block:
            v = re.search(r"^Version: (\S+)$", block, re.MULTILINE)
            if v:
                found[m.group(1)] = v.group(1)
    return found


#: fortune packages -> language of the files they install (debian-hints is per subfolder)
_FORTUNE_PACKAGES = {
    "fortunes": "en",
    "fortunes-min": "en",
    "fortunes-bofh-excuses": "en",
    "fortunes-debian-hints": "en",
    "fortunes-de": "de",
    "fortunes-es": "es",
    "fortunes-it": "it",
    "fortunes-ru": "ru",
    "fortunes-pl": "pl",
    "fortunes-cs": "cs",
    "fortunes-br": "pt",
    "fortunes-bg": "bg",
    "fortunes-eo": "eo",
    "fortunes-ga": "ga",
    "fortunes-zh": "zh",
    "fortunes-fr": "fr",
}
_FORTUNE_SKIP = {"ascii-art", "asciiart", "banner"}
_HINT_LANGS = {"zh_CN": "zh", "zh_TW": "zh", "sk": "sk"}


def _fortune_files() -> dict[str, list[tuple[str, Path]]]:
    """lang -> [(package, file)] for installed fortune data (offensive sections excluded)."""
    by_lang: dict[str, list[tuple[str, Path]]] = {}
    seen: set[Path] = set()
    for pkg, lang in _FORTUNE_PACKAGES.items():
        files = _dpkg_files(pkg)
        if not files:
            continue
        for f in sorted(files):
            rel = f.as_posix()
            if "/games/fortunes/" not in rel or f.suffix in (".dat", ".u8", ".gz"):
                continue
            parts = rel.split("/games/fortunes/", 1)[1].split("/")
            if "off" in parts or f.name in _FORTUNE_SKIP or f.resolve() in seen:
                continue
            if parts[0] == "cz":  # duplicate of cs/ in fortunes-cs
                continue
            seen.add(f.resolve())
            file_lang = lang
            if pkg == "fortunes-debian-hints" and len(parts) > 1:
                file_lang = _HINT_LANGS.get(parts[0], parts[0])
            by_lang.setdefault(file_lang, []).append((pkg, f))
    return by_lang


def _collect_fortunes(files: list[tuple[str, Path]]) -> list[tuple[str, str]]:
    out = []
    for _pkg, f in files:
        for cookie in _fortunes(_read_maybe_gz(f)):
            out.append((f.name, cookie))
    return out


def _collect_html(paths: Iterable[Path], max_chars: int = 4000) -> list[tuple[str, str]]:
    out = []
    for p in paths:
        text = _html_to_text(_read_maybe_gz(p))
        out.extend((p.name, c) for c in _chunk_text(text, max_chars))
    return out


def _collect_text(paths: Iterable[Path]) -> list[tuple[str, str]]:
    out = []
    for p in paths:
        out.extend((p.name, c) for c in _chunk_text(_read_maybe_gz(p)))
    return out


def _python_doc_dir() -> Path | None:
    cands = sorted((_SYSROOT / "usr/share/doc").glob("python3*/html/library"))
    cands = [c.parent for c in cands if (c.parent / "index.html").is_file()]
    if not cands:
        return None

    def ver(p: Path) -> tuple[int, ...]:
        m = re.search(r"python3\.?(\d*)", p.parent.name)
        return (int(m.group(1)) if m and m.group(1) else 0,)

    return max(cands, key=ver)


_PYDOC_SKIP = re.compile(r"^(genindex|search|py-modindex|contents|download|copyright|license|bugs)|changelog")


def _python_html_files() -> list[Path]:
    root = _python_doc_dir()
    if root is None:
        return []
    out = []
    for p in sorted(root.rglob("*.html")):
        rel = p.relative_to(root)
        if rel.parts[0].startswith("_") or _PYDOC_SKIP.search(p.name):
            continue
        out.append(p)
    return out


#: stdlib parts that are tests, tools or platform glue rather than documented API
_STDLIB_SKIP = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "turtledemo",
    "__pycache__",
    "ensurepip",
    "config-3",
    "pydoc_data",
    "encodings",
}


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if any(part in _STDLIB_SKIP or part.startswith(("config-", "test_")) for part in rel.parts):
            continue
        out.append(p)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _docstring_doc(path: Path) -> str:
    """A module's docstrings as one text: module, then each public class / function with its signature."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return ""
    mod = path.stem if path.stem != "__init__" else path.parent.name
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"Module {mod}\n\n{doc}")

    def visit(nodes: list[ast.stmt], prefix: str) -> None:
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if node.name.startswith("_") and node.name != "__init__":
                    continue
                d = ast.get_docstring(node)
                if isinstance(node, ast.ClassDef):
                    if d:
                        parts.append(f"class {prefix}{node.name}\n\n{d}")
                    visit(node.body, f"{prefix}{node.name}.")
                elif d:
                    sig = ast.unparse(node.args)
                    parts.append(f"{prefix}{node.name}({sig})\n\n{d}")

    visit(tree.body, f"{mod}.")
    return "\n\n".join(parts)


#: docstring source cap; tests lower it to keep the fallback build fast
_STDLIB_CAP_BYTES = 3_000_000


def _collect_stdlib() -> list[tuple[str, str]]:
    files = _stdlib_files()
    random.Random(1234).shuffle(files)  # a cap then samples modules evenly
    out, total = [], 0
    for f in files:
        for c in _chunk_text(_docstring_doc(f)):
            out.append((f.name, c))
            total += len(c.encode("utf-8"))
        if total >= _STDLIB_CAP_BYTES:
            break
    return out


def _pkg_paths(pkg: str, pattern: str) -> list[Path]:
    files = _dpkg_files(pkg) or []
    rx = re.compile(pattern)
    return sorted(p for p in files if rx.search(p.as_posix()))


_HANDBOOK_LANGS = {
    "en-US": "en",
    "de-DE": "de",
    "fr-FR": "fr",
    "es-ES": "es",
    "it-IT": "it",
    "pt-BR": "pt",
    "ru-RU": "ru",
    "ja-JP": "ja",
    "zh-CN": "zh",
    "pl-PL": "pl",
    "nl-NL": "nl",
}
_REFERENCE_LANGS = {"en": "en", "de": "de", "fr": "fr", "es": "es", "it": "it", "pt": "pt", "ja": "ja"}

MB = 1_000_000


def _sources() -> list[_Source]:
    """The recipe of the default corpus (order only matters for de-duplication)."""
    srcs: list[_Source] = []
    pydoc_files = _python_html_files()
    if pydoc_files:
        srcs.append(
            _Source(
                "python-docs",
                "en",
                "PSF-2.0 (Python documentation)",
                "Python library reference, tutorial and HOWTOs (HTML converted to text)",
                lambda: _collect_html(pydoc_files),
                4 * MB,
                ["python3.11-doc"],
            )
        )
    else:
        srcs.append(
            _Source(
                "python-docstrings",
                "en",
                "PSF-2.0 (Python standard library)",
                "docstrings of the Python standard library modules (parsed with ast, nothing imported)",
                _collect_stdlib,
                _STDLIB_CAP_BYTES,
                [],
            )
        )
    fortune_langs = _fortune_files()
    for lang in sorted(fortune_langs, key=lambda x: (x != "en", x)):
        files = fortune_langs[lang]
        pkgs = sorted({p for p, _ in files})
        srcs.append(
            _Source(
                f"fortunes-{lang}",
                lang,
                "free (BSD / GPL-2+ / public domain; see each package's copyright)",
                f"fortune(6) cookies in language {lang!r}: quotations, jokes, proverbs, poems",
                lambda files=files: _collect_fortunes(files),
                3 * MB if lang == "en" else 400_000,
                pkgs,
            )
        )
    jargon = _pkg_paths("jargon-text", r"jargon\.txt(\.gz)?$")
    if jargon:
        srcs.append(
            _Source(
                "jargon-file",
                "en",
                "public domain",
                "The Jargon File (hacker slang lexicon)",
                lambda: _collect_text(jargon),
                1 * MB,
                ["jargon-text"],
            )
        )
    gnu = _pkg_paths("gnu-standards", r"\.text(\.gz)?$")
    if gnu:
        srcs.append(
            _Source(
                "gnu-standards",
                "en",
                "GFDL-1.3+ (no invariant sections)",
                "GNU Coding Standards and Information for GNU Maintainers",
                lambda: _collect_text(gnu),
                1 * MB,
                ["gnu-standards"],
            )
        )
    bash = _pkg_paths("bash-doc", r"/bashref\.html$")
    if bash:
        srcs.append(
            _Source(
                "bash-manual",
                "en",
                "GFDL-1.3+ (bash manual)",
                "GNU Bash Reference Manual",
                lambda: _collect_html(bash),
                1 * MB,
                ["bash-doc"],
            )
        )
    debdoc = _pkg_paths("doc-debian", r"/usr/share/doc/debian/[^/]*(\.txt(\.gz)?|manifesto\.gz)$")
    debdoc = [p for p in debdoc if not re.search(r"\.\d\.\d\.txt|\.1\.\d\.txt", p.name)]  # old versions
    faq = _pkg_paths("debian-faq", r"/FAQ/[^/]*\.en\.html$")
    if debdoc or faq:
        srcs.append(
            _Source(
                "debian-docs",
                "en",
                "GPL-2+ / DFSG-free (see package copyright)",
                "Debian FAQ, Social Contract, Constitution, bug-reporting guides",
                lambda: _collect_text(debdoc) + _collect_html(faq),
                1 * MB,
                [p for p, fs in (("doc-debian", debdoc), ("debian-faq", faq)) if fs],
            )
        )
    for code, lang in _REFERENCE_LANGS.items():
        files = _pkg_paths(f"debian-reference-{code}", rf"/debian-reference/[^/]*\.{code}\.html$")
        if files:
            srcs.append(
                _Source(
                    f"debian-reference-{lang}",
                    lang,
                    "GPL-2+",
                    f"Debian Reference (system administration), {lang}",
                    lambda files=files: _collect_html(files),
                    1 * MB if lang == "en" else 500_000,
                    [f"debian-reference-{code}"],
                )
            )
    for code, lang in _HANDBOOK_LANGS.items():
        files = _pkg_paths("debian-handbook", rf"/debian-handbook/html/{code}/[^/]*\.html$")
        if files:
            srcs.append(
                _Source(
                    f"debian-handbook-{lang}",
                    lang,
                    "GPL-2+ or CC-BY-SA-3.0",
                    f"The Debian Administrator's Handbook, {lang}",
                    lambda files=files: _collect_html(files),
                    2 * MB if lang == "en" else 350_000,
                    ["debian-handbook"],
                )
            )
    return srcs


# --------------------------------------------------------------------------
# Default corpus: build
# --------------------------------------------------------------------------

SHARD_BYTES = 4 * MB


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def build_default_corpus(dest: Path | str | None = None, *, seed: int = 0, quiet: bool = False) -> Path:
    """Assemble the offline default corpus into ``dest`` (default: :func:`default_corpus_dir`).

    Reads whatever supported Debian packages are installed (``scripts/build_corpus.sh``
    installs them) plus the Python docs, or the stdlib docstrings when those are
    missing. Each source is cut into short documents, capped (a seeded sample
    when over its byte budget), de-duplicated, then all documents are shuffled
    with ``seed`` so any prefix of the corpus mixes every source. Written as
    JSONL shards plus ``manifest.json`` into a temporary folder that is renamed
    into place, so readers never see a half-built corpus.
    """
    dest = Path(dest).expanduser() if dest is not None else default_corpus_dir()
    t0 = time.time()
    rng = random.Random(seed)
    records: list[tuple[str, str, str]] = []  # (text, source, lang)
    seen: set[bytes] = set()
    source_meta = []
    for src in _sources():
        try:
            docs = src.collect()
        except OSError as e:
            _log(f"  skipping source {src.name}: {e}", quiet)
            continue
        order = list(range(len(docs)))
        random.Random(f"{seed}:{src.name}").shuffle(order)
        kept: list[str] = []
        nbytes = 0
        for i in order:
            text = docs[i][1]
            key = hashlib.sha1(re.sub(r"\s+", " ", text).strip().encode("utf-8")).digest()
            if key in seen:
                continue
            b = len(text.encode("utf-8"))
            if nbytes + b > src.cap_bytes and kept:
                break  # a seeded random sample that fills the byte budget
            seen.add(key)
            kept.append(text)
            nbytes += b
        if not kept:
            _log(f"  source {src.name}: no documents, skipped", quiet)
            continue
        records.extend((t, src.name, src.lang) for t in kept)
        source_meta.append(
            {
                "name": src.name,
                "lang": src.lang,
                "license": src.license,
                "description": src.description,
                "packages": src.packages,
                "n_docs": len(kept),
                "bytes": nbytes,
                "available_docs": len(docs),
            }
        )
        _log(f"  {src.name:<24} {len(kept):>7} docs {nbytes / MB:7.2f} MB", quiet)
    if not records:
        raise CorpusError("default corpus: no source produced any document (not even the Python stdlib)")
    rng.shuffle(records)

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        groups: list[list[str]] = [[]]
        size = 0
        for text, src_name, lang in records:
            if size >= SHARD_BYTES:
                groups.append([])
                size = 0
            line = json.dumps({"text": text, "source": src_name, "lang": lang}, ensure_ascii=False) + "\n"
            groups[-1].append(line)
            size += len(line.encode("utf-8"))
        shards = []
        first = 0
        for idx, lines in enumerate(groups):
            name = f"shard-{idx:05d}.jsonl"
            with open(tmp / name, "w", encoding="utf-8", newline="\n") as fh:
                fh.writelines(lines)
            shards.append(
                {
                    "file": name,
                    "n_docs": len(lines),
                    "first_doc": first,
                    "bytes": (tmp / name).stat().st_size,
                    "sha256": _sha256_file(tmp / name),
                }
            )
            first += len(lines)
        langs: dict[str, dict[str, int]] = {}
        for s in source_meta:
            e = langs.setdefault(s["lang"], {"n_docs": 0, "bytes": 0})
            e["n_docs"] += s["n_docs"]
            e["bytes"] += s["bytes"]
        all_pkgs = sorted({p for s in source_meta for p in s["packages"]})
        manifest = {
            "format": "thoughtscope-corpus",
            "version": DEFAULT_CORPUS_VERSION,
            "seed": seed,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "fallback": not any(s["packages"] for s in source_meta),
            "python": sys.version.split()[0],
            "n_docs": len(records),
            "bytes": sum(s["bytes"] for s in source_meta),
            "languages": dict(sorted(langs.items(), key=lambda kv: -kv[1]["bytes"])),
            "sources": source_meta,
            "debian_packages": _dpkg_versions(all_pkgs),
            "shards": shards,
        }
        tmp_manifest = tmp / "manifest.json.tmp"
        tmp_manifest.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", "utf-8")
        os.replace(tmp_manifest, tmp / "manifest.json")
        old = None
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{os.getpid()}-{int(time.time())}"
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(
        f"default corpus: {manifest['n_docs']} documents, {manifest['bytes'] / MB:.1f} MB, "
        f"{len(langs)} languages, {len(shards)} shards -> {dest} ({time.time() - t0:.0f} s)",
        quiet,
    )
    return dest


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m thoughtscope.corpus", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="assemble the offline default corpus")
    b.add_argument("--dest", type=Path, default=None, help=f"output folder (default: {default_corpus_dir()})")
    b.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    i = sub.add_parser("info", help="print a corpus description as JSON")
    i.add_argument("spec", nargs="?", default="default")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            build_default_corpus(args.dest, seed=args.seed)
        else:
            print(json.dumps(Corpus(args.spec).describe(), indent=2, ensure_ascii=False))
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
