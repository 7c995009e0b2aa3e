"""Assemble the offline default corpus that `Corpus("default")` reads.

Run by `scripts/build_corpus.sh` (which first installs the Debian text packages) as

    python -m scripts.default_corpus.build [--dest DIR] [--seed N]

from the repository root. This is build-time tooling, not part of the library: reading a corpus never starts it.
See docs/corpus.md for the sources, licences and sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import typer

from thoughtscope._io import sha256_file
from thoughtscope.corpus import DEFAULT_CORPUS_VERSION, CorpusError, default_corpus_dir

from .sources import MB, all_sources, dpkg_versions

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
    for src in all_sources():
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
                    "sha256": sha256_file(tmp / name),
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
            "debian_packages": dpkg_versions(all_pkgs),
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


_DEFAULT_DEST = default_corpus_dir()


def main(
    dest: Path | None = typer.Option(None, help=f"output folder (default: {_DEFAULT_DEST})"),
    seed: int = typer.Option(0, help="shuffle seed"),
    quiet: bool = typer.Option(False, help="no per-source lines"),
) -> None:
    """Assemble the offline default corpus from whatever supported packages are installed."""
    try:
        build_default_corpus(dest, seed=seed, quiet=quiet)
    except CorpusError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


if __name__ == "__main__":
    typer.run(main)
