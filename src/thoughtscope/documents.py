"""Where a corpus's documents come from: text, Markdown and JSONL files, folders of them, Hugging Face datasets.

Each reader yields non-blank documents as strings in a fixed order; :class:`thoughtscope.corpus.Corpus`
chooses the reader from its spec and packs what it yields into model contexts. Files must be UTF-8; errors
name the file (and line or byte offset).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import CorpusError, CorpusNotFoundError, PromptFileError  # noqa: F401  (re-exported: their old home)

#: Plain-text files bigger than this are split on runs of >= 2 blank lines;
#: smaller ones are one document each (a note, a README, an essay).
LARGE_TEXT_BYTES = 64 * 1024
#: Suffixes picked up when the spec is a folder.
FOLDER_SUFFIXES = (".txt", ".md", ".jsonl")

_BIG_SPLIT = re.compile(r"\n[ \t\r\f\v]*\n[ \t\r\f\v]*\n\s*")  # >= 2 blank lines
# A lone UTF-16 surrogate: JSON can spell one ("\ud800"), but it is no character and no tokenizer can encode it.
_SURROGATE = re.compile("[\ud800-\udfff]")


def read_utf8(path: Path, error: type[Exception] = CorpusError) -> str:
    """Strict UTF-8 read: silently replacing bytes would corrupt the text we study. Raises `error` naming the file."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read the file ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = data[e.start : e.start + 4].hex(" ")
        raise error(
            f"{path}: not valid UTF-8 at byte offset {e.start} (bytes {bad}); "
            "re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None
    return text.removeprefix("\ufeff")


def parse_json(text: str):
    """``json.loads`` whose every failure is a ValueError: bad JSON (a JSONDecodeError), a number too long to
    convert, or nesting too deep for the parser (a RecursionError otherwise)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def check_text(value: str, where: str, error: type[Exception]) -> str:
    """``value`` unchanged, or `error` at `where` when it holds a lone surrogate (from a JSON "\\udXXX" escape)."""
    m = _SURROGATE.search(value)
    if m:
        raise error(
            f"{where}: text holds the lone surrogate \\u{ord(m.group()):04x} at character {m.start()}, which is not "
            "a character (write the text as UTF-8, or escape a whole surrogate pair)"
        )
    return value


def read_prompts(path: str | Path, text_field: str = "text") -> list[str]:
    """The one prompt-file reader (steering, contrast search, calibration, the CLI): a .json list of strings or of
    objects with a `text_field`, a .jsonl file of such objects (or strings), or any other file as one prompt per
    non-empty line. Raises PromptFileError naming the file (and line) and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file not found: {path}")
    raw = read_utf8(path, PromptFileError)

    def one(item, where: str) -> str:
        if isinstance(item, str):
            return check_text(item, where, PromptFileError)
        if isinstance(item, dict) and isinstance(item.get(text_field), str):
            return check_text(item[text_field], where, PromptFileError)
        raise PromptFileError(f"{where}: expected a string or an object with a {text_field!r} string field")

    if path.suffix == ".json":
        try:
            data = parse_json(raw)
        except ValueError as e:
            raise PromptFileError(f"{path}: not valid JSON ({e}); expected a list of prompts") from None
        if not isinstance(data, list):
            raise PromptFileError(f"{path}: expected a JSON list of prompts, got a {type(data).__name__}")
        prompts = [one(x, f"{path}, item {i}") for i, x in enumerate(data)]
    elif path.suffix == ".jsonl":
        prompts = []
        for i, line in enumerate(raw.split("\n")):  # not splitlines(): U+2028 and friends may sit inside a string
            if line.strip():
                try:
                    item = parse_json(line)
                except ValueError as e:
                    raise PromptFileError(f"{path}, line {i + 1}: not valid JSON ({e})") from None
                prompts.append(one(item, f"{path}, line {i + 1}"))
    else:
        prompts = [line.strip() for line in raw.splitlines() if line.strip()]
    if not prompts:
        raise PromptFileError(f"{path}: no prompt in the file")
    return prompts


def text_file_documents(path: Path) -> Iterator[str]:
    text = read_utf8(path)
    if len(text.encode("utf-8")) > LARGE_TEXT_BYTES:
        parts: Iterable[str] = _BIG_SPLIT.split(text)
    else:
        parts = [text]
    for p in parts:
        p = p.strip()
        if p:
            yield p


def jsonl_objects(text: str, error: type[Exception], where: Callable[[int], str]) -> Iterator[tuple[int, dict]]:
    """The JSON objects of a JSONL text with their 1-based line numbers, blank lines skipped. A line that is not
    JSON, or not an object, raises `error` at `where(line)`, so each caller names its rows in its own terms."""
    for lineno, line in enumerate(text.split("\n"), start=1):  # JSONL lines end at "\n" only (U+2028 may be text)
        if not line.strip():
            continue
        try:
            rec = parse_json(line)
        except ValueError as e:
            raise error(f"{where(lineno)}: not valid JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(rec, dict):
            raise error(f"{where(lineno)}: expected a JSON object, got {type(rec).__name__}")
        yield lineno, rec


def jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    for lineno, rec in jsonl_objects(read_utf8(path), CorpusError, lambda n: f"{path}:{n}"):
        if text_field not in rec:
            keys = ", ".join(sorted(map(str, rec))[:10]) or "none"
            raise CorpusError(
                f"{path}:{lineno}: missing text field {text_field!r} (fields present: {keys}); "
                "pass text_field=... to Corpus"
            )
        value = rec[text_field]
        if not isinstance(value, str):
            raise CorpusError(f"{path}:{lineno}: field {text_field!r} must be a string, got {type(value).__name__}")
        check_text(value, f"{path}:{lineno}: field {text_field!r}", CorpusError)
        if value.strip():
            yield value


def file_documents(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix.lower() == ".jsonl":
        yield from jsonl_documents(path, text_field)
    else:
        yield from text_file_documents(path)


def folder_files(folder: Path) -> list[Path]:
    """Matching files under ``folder``, sorted by relative path; hidden entries skipped."""
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES:
            out.append(p)
    return sorted(out, key=lambda p: p.relative_to(folder).as_posix())


def hf_documents(name: str, config: str | None, split: str, text_field: str, spec: str) -> Iterator[str]:
    """Non-blank ``text_field`` values of a Hugging Face dataset, streamed with ``datasets`` (optional)."""
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"corpus spec {spec!r} needs the optional 'datasets' package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # network, auth or unknown dataset
        raise CorpusError(
            f"could not open Hugging Face dataset {name!r} (config {config!r}, split {split!r}): "
            f"{type(e).__name__}: {e}. Check the name and that the hub is reachable."
        ) from e
    for i, rec in enumerate(ds):
        if text_field not in rec:
            raise CorpusError(
                f"dataset {name!r} record {i}: missing text field {text_field!r} "
                f"(fields: {', '.join(sorted(rec))}); pass text_field=..."
            )
        value = rec[text_field]
        if isinstance(value, str) and value.strip():
            yield value
