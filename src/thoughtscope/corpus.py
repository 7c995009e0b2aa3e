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

The build itself is tooling outside the library (``scripts/default_corpus/``); reading never starts it.
The readers for each kind of source live in :mod:`thoughtscope.documents`.
``thoughtscope corpus info [SPEC]`` describes any corpus.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._io import sha256_file
from .documents import (
    FOLDER_SUFFIXES,
    LARGE_TEXT_BYTES,
    CorpusError,
    CorpusNotFoundError,
    file_documents,
    folder_files,
    hf_documents,
)
from .plans import ReadPlan

__all__ = [
    "Context",
    "Corpus",
    "CorpusError",
    "CorpusNotFoundError",
    "DEFAULT_CORPUS_VERSION",
    "FOLDER_SUFFIXES",
    "LARGE_TEXT_BYTES",
    "ReadPlan",
    "default_corpus_dir",
]

#: Documents are tokenised this many at a time (fast tokenizers batch in Rust).
TOKENIZE_BATCH_DOCS = 256
#: Bump when the default corpus recipe changes, so stale builds are noticed.
DEFAULT_CORPUS_VERSION = 1


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
            if not path.is_dir() and not path.is_file():  # a FIFO or a device would block or never end
                raise CorpusError(f"corpus path {str(path)!r} is neither a regular file nor a folder")
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
            return folder_files(self._path)
        if self.kind in ("file", "jsonl"):
            assert self._path is not None
            return [self._path]
        return []

    def _default_dir(self) -> Path:
        d = default_corpus_dir()
        if not (d / "manifest.json").is_file():
            raise CorpusNotFoundError(
                f"the default corpus is not built: {d / 'manifest.json'} does not exist; build it once with "
                "`bash scripts/build_corpus.sh` from the thoughtscope repository (setup.sh does), or give a file, "
                "a folder, a .jsonl file or hf:<dataset> instead of 'default'"
            )
        return d

    def _raw_documents(self) -> Iterator[str]:
        if self.kind == "hf":
            yield from self._hf_documents()
            return
        field_name = "text" if self.kind == "default" else self.text_field
        for f in self._files():
            yield from file_documents(f, field_name)

    def _hf_documents(self) -> Iterator[str]:
        assert self._hf is not None
        name, config = self._hf
        return hf_documents(name, config, self.split, self.text_field, self.spec)

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

    def batches(
        self,
        tokenizer: Any,
        ctx_len: int,
        contexts_per_batch: int | None = None,
        *,
        add_bos: bool = True,
        batch_size: int | None = None,
    ) -> Iterator[Context]:
        """:meth:`contexts` stacked into ``[contexts_per_batch, ctx_len]`` tensors; the last batch may be smaller.

        ``batch_size`` is the old name of ``contexts_per_batch`` (deprecated: elsewhere it counts rows per step).
        """
        if batch_size is not None:
            if contexts_per_batch is not None:
                raise CorpusError("give contexts_per_batch only (batch_size is its deprecated name)")
            warnings.warn(
                "Corpus.batches(batch_size=...) is deprecated; use contexts_per_batch=...",
                DeprecationWarning,
                stacklevel=2,
            )
            contexts_per_batch = batch_size
        n = contexts_per_batch
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise CorpusError(f"contexts_per_batch must be a positive int, got {n!r}")
        buf: list[Context] = []
        for c in self.contexts(tokenizer, ctx_len, add_bos=add_bos):
            buf.append(c)
            if len(buf) == n:
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
                manifest_sha256=sha256_file(mpath),
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
                {"path": f.relative_to(base).as_posix(), "bytes": f.stat().st_size, "sha256": sha256_file(f)}
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
    from .paths import home

    return home() / "corpus" / "default"
