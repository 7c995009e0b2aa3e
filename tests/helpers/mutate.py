"""Mutation strategies and a reader harness for fuzzing every file a user can hand thoughtscope (issue #32).

A fuzz test builds a tiny valid artefact, draws a :class:`Mutation` from one of the strategies below, applies it,
calls the reader through :func:`expect_clean` and lets it check the rule every reader keeps: it either returns a
result or raises a ``ThoughtscopeError`` subclass whose message names the file; it never raises another exception
type, never hangs, and never writes.

Strategies are data-independent (positions are drawn as fractions, nodes as indices taken modulo the number of
candidates), so one strategy serves any artefact. Each mutation carries a ``kind`` (for counting what was injected)
and a readable ``detail`` (shown by hypothesis on a failure).

- bytes -> bytes: :func:`byte_mutations` (truncation, flipped bytes, empty file, invalid UTF-8, NUL bytes,
  trailing or whole-file garbage) and :func:`text_mutations` (still valid UTF-8: BOM, CRLF, control characters,
  a very long line, blank-only text)
- JSON value -> JSON value: :func:`json_mutations` (missing and extra keys, wrong types, NaN/Inf, huge numbers
  including a 5000-digit literal, deep nesting, empty containers, a wrong root, lone surrogates);
  :func:`json_bytes_mutations` lifts them to a file's bytes and adds the byte mutations; :func:`jsonl_mutations`
  mutates one line of a JSONL file or inserts a garbage line; :func:`dump_json` writes what they return
- numpy array -> ``.npy`` bytes: :func:`npy_mutations` (wrong dtype or shape, NaN/Inf and extreme values, a header
  claiming huge dimensions, Fortran order, a pickled-object dtype, header versions) and :func:`npy_bytes`
- tensors + metadata -> ``.safetensors`` bytes: :func:`safetensors_mutations` (wrong dtype or shape, NaN/Inf, huge
  dimensions, missing and extra tensors, metadata mutations, broken offsets, a huge header length, header JSON
  mutations) and :func:`safetensors_bytes`
- the harness: :func:`snapshot`, :func:`read_tree` / :func:`write_tree`, :func:`call_bounded`, :func:`expect_clean`
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import event, note
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument


@dataclass(frozen=True)
class Mutation:
    """One change to an artefact: ``kind`` names the family (counted in reports), ``detail`` the draw."""

    kind: str
    detail: str
    fn: Callable[[Any], Any] = field(compare=False, repr=False)

    def __call__(self, value: Any) -> Any:
        return self.fn(value)

    def __repr__(self) -> str:
        return f"Mutation({self.kind}: {self.detail})"

    def _repr_pretty_(self, p, cycle) -> None:  # how hypothesis prints a falsifying example
        p.text(repr(self))


def _index(frac: float, n: int) -> int:
    """A position in 0..n-1 from a fraction in [0, 1) (0 when n is 0)."""
    return min(max(n - 1, 0), int(frac * n))


_frac = st.floats(0.0, 1.0, exclude_max=True, allow_nan=False)

# --------------------------------------------------------------------------------------------------------------
# bytes -> bytes
# --------------------------------------------------------------------------------------------------------------

#: Byte sequences that are not UTF-8: a stray continuation byte, 0xff, an unfinished or overlong sequence, an
#: encoded surrogate, a 5-byte form, Latin-1 text.
INVALID_UTF8 = (
    b"\x80",
    b"\xff",
    b"\xfe\xfe",
    b"\xc3\x28",
    b"\xe2\x28\xa1",
    b"\xf0\x28\x8c\xbc",
    b"\xc0\xaf",
    b"\xed\xa0\x80",
    b"\xf8\x88\x80\x80\x80",
    "caf\xe9 na\xefve".encode("latin-1"),
)

BYTE_KINDS = ("truncate", "flip_bytes", "empty", "non_utf8", "nul_bytes", "append_garbage", "replace_garbage")


@st.composite
def _truncate(draw):
    keep = draw(_frac)
    return Mutation("truncate", f"keep {keep:.3f} of the bytes", lambda b: b[: int(len(b) * keep)])


@st.composite
def _flip_bytes(draw):
    spots = draw(st.lists(st.tuples(_frac, st.integers(1, 255)), min_size=1, max_size=4))

    def fn(b: bytes) -> bytes:
        a = bytearray(b)
        for frac, mask in spots:
            if a:
                a[_index(frac, len(a))] ^= mask
        return bytes(a)

    return Mutation("flip_bytes", f"xor at {[(round(f, 3), m) for f, m in spots]}", fn)


@st.composite
def _non_utf8(draw):
    seq = draw(st.sampled_from(INVALID_UTF8))
    where = draw(_frac)
    replace = draw(st.booleans())

    def fn(b: bytes) -> bytes:
        i = _index(where, len(b))
        return b[:i] + seq + b[i + len(seq) if replace else i :]

    return Mutation("non_utf8", f"{'replace' if replace else 'insert'} {seq!r} at {where:.3f}", fn)


@st.composite
def _nul_bytes(draw):
    where = draw(_frac)
    n = draw(st.integers(1, 8))
    return Mutation(
        "nul_bytes",
        f"{n} NUL at {where:.3f}",
        lambda b: b[: _index(where, len(b))] + b"\0" * n + b[_index(where, len(b)) :],
    )


@st.composite
def _append_garbage(draw):
    tail = draw(st.binary(min_size=1, max_size=64))
    return Mutation("append_garbage", f"append {tail!r}", lambda b: b + tail)


@st.composite
def _replace_garbage(draw):
    data = draw(st.binary(min_size=1, max_size=256))
    return Mutation("replace_garbage", f"whole file {data[:32]!r}...", lambda b: data)


_BYTE_STRATEGIES = {
    "truncate": _truncate(),
    "flip_bytes": _flip_bytes(),
    "empty": st.just(Mutation("empty", "zero bytes", lambda b: b"")),
    "non_utf8": _non_utf8(),
    "nul_bytes": _nul_bytes(),
    "append_garbage": _append_garbage(),
    "replace_garbage": _replace_garbage(),
}


def _by_kind(table: dict[str, st.SearchStrategy[Mutation]], kinds: Iterable[str]) -> st.SearchStrategy[Mutation]:
    """A kind drawn uniformly from ``kinds``, then a mutation of that kind: with few examples (the "ci" profile)
    every kind still gets its share, where a nested one_of would favour the family with the most branches."""
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in table]
    if unknown:
        raise ValueError(f"unknown mutation kinds {unknown}; known: {sorted(table)}")
    return st.sampled_from(kinds).flatmap(lambda k: table[k])


def any_of(*strategies: st.SearchStrategy[Mutation]) -> st.SearchStrategy[Mutation]:
    """Each strategy with the same weight (``st.one_of`` flattens nested one_ofs, weighting their branches)."""
    return st.sampled_from(strategies).flatmap(lambda s: s)


def byte_mutations(kinds: Iterable[str] = BYTE_KINDS) -> st.SearchStrategy[Mutation]:
    """Mutations of a file's bytes (see ``BYTE_KINDS``), each kind equally likely."""
    return _by_kind(_BYTE_STRATEGIES, kinds)


TEXT_KINDS = ("bom", "crlf", "control_chars", "long_line", "blank_only", "unicode_mix")


@st.composite
def _control_chars(draw):
    chars = draw(st.text(st.sampled_from("\x00\x01\x07\x08\x0b\x0c\x1b\x7f\u2028\u2029\x85\ufeff"), min_size=1))
    where = draw(_frac)

    def fn(b: bytes) -> bytes:
        s = b.decode("utf-8", "surrogateescape")
        i = _index(where, len(s))
        return (s[:i] + chars + s[i:]).encode("utf-8", "surrogateescape")

    return Mutation("control_chars", f"insert {chars!r} at {where:.3f}", fn)


@st.composite
def _unicode_mix(draw):
    text = draw(st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40))
    where = draw(_frac)

    def fn(b: bytes) -> bytes:
        i = _index(where, len(b))
        while i and 0x80 <= b[i] < 0xC0:  # never split a UTF-8 sequence
            i -= 1
        return b[:i] + text.encode("utf-8") + b[i:]

    return Mutation("unicode_mix", f"insert {text!r}", fn)


_TEXT_STRATEGIES = {
    "bom": st.just(Mutation("bom", "UTF-8 BOM in front", lambda b: b"\xef\xbb\xbf" + b)),
    "crlf": st.just(Mutation("crlf", "CRLF line ends", lambda b: b.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))),
    "control_chars": _control_chars(),
    "long_line": st.integers(10_000, 200_000).map(
        lambda n: Mutation("long_line", f"a {n}-character line", lambda b: b + b"\n" + b"x" * n + b"\n")
    ),
    "blank_only": st.sampled_from([b"\n", b"   \n\n\t\n", b"\r\n\r\n", "\u3000\n".encode()]).map(
        lambda w: Mutation("blank_only", f"only {w!r}", lambda b: w)
    ),
    "unicode_mix": _unicode_mix(),
}


def text_mutations(kinds: Iterable[str] = TEXT_KINDS) -> st.SearchStrategy[Mutation]:
    """Mutations of a UTF-8 text file that keep it valid UTF-8 (see ``TEXT_KINDS``), each kind equally likely."""
    return _by_kind(_TEXT_STRATEGIES, kinds)


# --------------------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawJSON:
    """JSON text put verbatim where this object stands when :func:`dump_json` writes the value."""

    text: str


#: A 5000-digit integer: Python's json refuses to convert it (a ValueError that is not a JSONDecodeError).
HUGE_INT_LITERAL = RawJSON("9" * 5000)
#: Nesting deep enough that a recursive parser runs out of stack.
DEEP_NESTING = RawJSON("[" * 100_000 + "]" * 100_000)


def dump_json(value: Any, **kw) -> bytes:
    """``value`` as UTF-8 JSON bytes; NaN/Infinity written as Python's json writes them, RawJSON verbatim."""
    raws: list[str] = []

    def swap(v):
        if isinstance(v, RawJSON):
            raws.append(v.text)
            return f"\0RAW{len(raws) - 1}\0"
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v

    text = json.dumps(swap(value), allow_nan=True, **kw)
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\0RAW{i}\0"), raw)
    return text.encode("utf-8")


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys / indices) to a node below the root, depth first."""
    out = []
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return out
    for k, v in items:
        out.append((*prefix, k))
        out.extend(_paths(v, (*prefix, k)))
    return out


def _get(value: Any, path: tuple) -> Any:
    for k in path:
        value = value[k]
    return value


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _pick(value: Any, pick: int, pred: Callable[[tuple, Any], bool]) -> tuple | None:
    cands = [p for p in _paths(value) if pred(p, _get(value, p))]
    return cands[pick % len(cands)] if cands else None


def _set(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    _get(value, path[:-1])[path[-1]] = new
    return value


#: One value of every JSON type (and a few shapes of each).
JSON_SAMPLES = (None, True, False, 0, -1, 3, 1.5, "", "x", "0", [], [1, 2], {}, {"a": 1})

JSON_KINDS = (
    "missing_key",
    "extra_key",
    "wrong_type",
    "nan_inf",
    "huge_number",
    "boundary_number",
    "deep_nesting",
    "empty_container",
    "wrong_root",
    "lone_surrogate",
)

_json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=20)
)


def _json_kind(kind: str, pick: int, extra: Any) -> Mutation:
    def on_copy(f):
        return lambda v: f(copy.deepcopy(v))

    if kind == "missing_key":

        def fn(v):
            p = _pick(v, pick, lambda p, x: isinstance(_get(v, p[:-1]), dict))
            if p is not None:
                del _get(v, p[:-1])[p[-1]]
            return v

        return Mutation(kind, f"drop key #{pick}", on_copy(fn))
    if kind == "extra_key":
        key, val = extra

        def fn(v):
            dicts = [()] if isinstance(v, dict) else []
            dicts += [p for p in _paths(v) if isinstance(_get(v, p), dict)]
            if dicts:
                _get(v, dicts[pick % len(dicts)])[key] = val
            return v

        return Mutation(kind, f"add {key!r}: {val!r} to dict #{pick}", on_copy(fn))
    if kind == "wrong_type":

        def fn(v):
            p = _pick(v, pick, lambda p, x: True)
            if p is None:
                return v
            old = _get(v, p)
            others = [s for s in JSON_SAMPLES if type(s) is not type(old)]
            return _set(v, p, copy.deepcopy(others[(pick // 7) % len(others)]))

        return Mutation(kind, f"retype node #{pick}", on_copy(fn))
    if kind == "nan_inf":
        bad = (math.nan, math.inf, -math.inf)[pick % 3]

        def fn(v):
            p = _pick(v, pick // 3, lambda p, x: _is_number(x)) or _pick(v, pick // 3, lambda p, x: True)
            return v if p is None else _set(v, p, bad)

        return Mutation(kind, f"{bad} at number #{pick // 3}", on_copy(fn))
    if kind == "huge_number":
        huge = (10**6, 2**31, 2**63, -(2**63), 10**30, 1e308, 10**400, HUGE_INT_LITERAL)[pick % 8]

        def fn(v):
            p = _pick(v, pick // 8, lambda p, x: _is_number(x)) or _pick(v, pick // 8, lambda p, x: True)
            return v if p is None else _set(v, p, huge)

        if huge is HUGE_INT_LITERAL:
            shown = "a 5000-digit literal"
        elif isinstance(huge, int) and abs(huge) >= 10**20:
            shown = f"an int of {len(str(abs(huge)))} digits"
        else:
            shown = repr(huge)
        return Mutation(kind, f"{shown} at number #{pick // 8}", on_copy(fn))
    if kind == "boundary_number":
        edge = (0, -1, 1, -(10**9), 0.5, -0.0)[pick % 6]

        def fn(v):
            p = _pick(v, pick // 6, lambda p, x: _is_number(x))
            return v if p is None else _set(v, p, edge)

        return Mutation(kind, f"{edge!r} at number #{pick // 6}", on_copy(fn))
    if kind == "deep_nesting":

        def fn(v):
            p = _pick(v, pick, lambda p, x: True)
            return _set(v, p or (), DEEP_NESTING)

        return Mutation(kind, f"100000-deep list at node #{pick}", on_copy(fn))
    if kind == "empty_container":

        def fn(v):
            p = _pick(v, pick, lambda p, x: isinstance(x, (dict, list)) and bool(x))
            if p is None:
                return type(v)() if isinstance(v, (dict, list)) else v
            return _set(v, p, type(_get(v, p))())

        return Mutation(kind, f"empty container #{pick}", on_copy(fn))
    if kind == "wrong_root":
        root = ([], "text", 1, None, [{}], True)[pick % 6]
        return Mutation(kind, f"root replaced by {root!r}", lambda v: copy.deepcopy(root))
    if kind == "lone_surrogate":
        raw = RawJSON(('"a\\ud800b"', '"\\udc80"', '"x\\ud83d"', '"\\ude00\\ud800"')[pick % 4])

        def fn(v):
            p = _pick(v, pick // 4, lambda p, x: isinstance(x, str)) or _pick(v, pick // 4, lambda p, x: True)
            return _set(v, p or (), raw)

        return Mutation(kind, f"string {raw.text} at node #{pick // 4}", on_copy(fn))
    raise ValueError(f"unknown JSON mutation kind {kind!r}")


_json_extra = st.tuples(st.text(min_size=1, max_size=12), st.one_of(_json_scalar, st.lists(_json_scalar, max_size=3)))
_JSON_STRATEGIES = {k: st.builds(_json_kind, st.just(k), st.integers(0, 10_000), _json_extra) for k in JSON_KINDS}


def json_mutations(kinds: Iterable[str] = JSON_KINDS) -> st.SearchStrategy[Mutation]:
    """Mutations of a parsed JSON value (returning a new value; write it with :func:`dump_json`)."""
    return _by_kind(_JSON_STRATEGIES, kinds)


def lift_json(m: Mutation, **dump_kw) -> Mutation:
    """A JSON mutation applied to a JSON file's bytes (parse, mutate, write back)."""
    return Mutation(m.kind, m.detail, lambda b: dump_json(m(json.loads(b)), **dump_kw))


def json_bytes_mutations(
    json_kinds: Iterable[str] = JSON_KINDS, byte_kinds: Iterable[str] = BYTE_KINDS, **dump_kw
) -> st.SearchStrategy[Mutation]:
    """Mutations of a JSON file's bytes: structural ones (parsed and written back) and raw byte ones, every kind of
    both families equally likely."""
    table = {k: v.map(lambda m: lift_json(m, **dump_kw)) for k, v in _JSON_STRATEGIES.items()}
    table.update(_BYTE_STRATEGIES)
    return _by_kind(table, (*json_kinds, *byte_kinds))


#: Lines that are not one JSON object: text, unfinished JSON, Python literals, a bare value, a list.
GARBAGE_LINES = (b"not json", b"{", b'{"text": "a"', b"[1, 2", b"{'text': 'single quotes'}", b"NaN", b"[]", b'"text"')


def _jsonl_line(m: Mutation, pick: int) -> Mutation:
    def fn(b: bytes) -> bytes:
        lines = b.split(b"\n")
        full = [i for i, line in enumerate(lines) if line.strip()]
        if not full:
            return b
        i = full[pick % len(full)]
        try:
            obj = json.loads(lines[i])
        except ValueError:
            return b
        lines[i] = dump_json(m(obj))
        return b"\n".join(lines)

    return Mutation(f"line_{m.kind}", f"line #{pick}: {m.detail}", fn)


def _garbage_line(pick: int) -> Mutation:
    line = GARBAGE_LINES[pick % len(GARBAGE_LINES)]

    def fn(b: bytes) -> bytes:
        lines = b.split(b"\n")
        i = (pick // len(GARBAGE_LINES)) % (len(lines) + 1)
        return b"\n".join(lines[:i] + [line] + lines[i:])

    return Mutation("garbage_line", f"insert line {line!r}", fn)


def jsonl_mutations(
    json_kinds: Iterable[str] = JSON_KINDS, byte_kinds: Iterable[str] = BYTE_KINDS
) -> st.SearchStrategy[Mutation]:
    """Mutations of a JSONL file's bytes: a JSON mutation of one line's value, a garbage line, or a byte one, every
    kind equally likely."""
    picks = st.integers(0, 10_000)
    table = {f"line_{k}": st.builds(_jsonl_line, v, picks) for k, v in _JSON_STRATEGIES.items()}
    table["garbage_line"] = st.builds(_garbage_line, picks)
    table.update(_BYTE_STRATEGIES)
    return _by_kind(table, (*(f"line_{k}" for k in json_kinds), "garbage_line", *byte_kinds))


# --------------------------------------------------------------------------------------------------------------
# numpy .npy
# --------------------------------------------------------------------------------------------------------------


def npy_bytes(
    arr: np.ndarray,
    *,
    shape: tuple | None = None,
    descr: str | None = None,
    fortran: bool = False,
    version: tuple[int, int] = (1, 0),
) -> bytes:
    """A .npy file of ``arr``'s bytes whose header may claim another ``shape``, ``descr`` or ``fortran`` order."""
    arr = np.ascontiguousarray(arr)
    header = {
        "descr": descr if descr is not None else np.lib.format.dtype_to_descr(arr.dtype),
        "fortran_order": fortran,
        "shape": tuple(arr.shape if shape is None else shape),
    }
    text = repr(header)
    len_size = 2 if version == (1, 0) else 4
    pad = -(6 + 2 + len_size + len(text) + 1) % 64
    text = text + " " * pad + "\n"
    enc = text.encode("latin-1" if version != (3, 0) else "utf-8")
    head = b"\x93NUMPY" + bytes(version) + struct.pack("<H" if len_size == 2 else "<I", len(enc)) + enc
    return head + arr.tobytes()


NPY_KINDS = ("wrong_dtype", "wrong_shape", "nan_inf", "huge_dims", "fortran_order", "pickle", "header_version")
_NPY_DTYPES = ("<f2", "<f4", "<f8", ">f4", "<i4", "<i8", "<u2", "|u1", "|b1", "<c8")


def _npy_kind(kind: str, pick: int) -> Mutation:
    if kind == "wrong_dtype":

        def fn(a):
            others = [d for d in _NPY_DTYPES if np.dtype(d) != a.dtype]
            with np.errstate(all="ignore"):
                return npy_bytes(a.astype(others[pick % len(others)]))

        return Mutation(kind, f"dtype choice #{pick}", fn)
    if kind == "wrong_shape":

        def fn(a):
            flat = a.reshape(-1)
            n0 = a.shape[0] if a.ndim else 1
            shapes = [
                flat,
                flat[: max(0, flat.size - 1)],
                a.reshape(1, *a.shape),
                a[: max(0, n0 - 1)],
                np.concatenate([a, a[:1]]) if a.ndim else flat,
                a.T.copy() if a.ndim > 1 else a.reshape(-1, 1),
                a[:0],
                np.zeros(()),
            ]
            return npy_bytes(shapes[pick % len(shapes)])

        return Mutation(kind, f"shape choice #{pick}", fn)
    if kind == "nan_inf":

        def fn(a):
            b = a.copy()
            if b.size:
                flat = b.reshape(-1)
                if np.issubdtype(b.dtype, np.floating):
                    flat[pick % flat.size] = (np.nan, np.inf, -np.inf)[pick % 3]
                elif np.issubdtype(b.dtype, np.integer):
                    info = np.iinfo(b.dtype)
                    # for uint16 (bfloat16 bits) 0xffff is a NaN, 0x7fc0 the canonical one
                    third = 0x7FC0 if b.dtype == np.uint16 else -1 if info.min < 0 else info.max // 2 + 1
                    flat[pick % flat.size] = (info.min, info.max, third)[pick % 3]
                else:  # bit patterns (bfloat16 kept as uint16): 0x7fc0 is NaN, 0x7f80 +Inf
                    flat.view(np.uint8)[pick % flat.nbytes] = 0xFF
            return npy_bytes(b)

        return Mutation(kind, f"non-finite or extreme value #{pick}", fn)
    if kind == "huge_dims":

        def fn(a):
            big = (2**40, 2**31, 10**12, 2**62)[pick % 4]
            shape = (big, *a.shape[1:]) if pick % 2 or a.ndim < 2 else (*a.shape[:-1], big)
            return npy_bytes(a, shape=shape)

        return Mutation(kind, f"header claims a huge dimension #{pick}", fn)
    if kind == "fortran_order":
        return Mutation(kind, "fortran_order True", lambda a: npy_bytes(a, fortran=True))
    if kind == "pickle":
        return Mutation(kind, "object dtype (needs pickle)", lambda a: npy_bytes(a, descr="|O"))
    if kind == "header_version":
        version = ((2, 0), (3, 0), (9, 9))[pick % 3]
        return Mutation(kind, f"header version {version}", lambda a: npy_bytes(a, version=version))
    raise ValueError(f"unknown .npy mutation kind {kind!r}")


def npy_mutations(kinds: Iterable[str] = NPY_KINDS) -> st.SearchStrategy[Mutation]:
    """Mutations of an array, each returning the bytes of the .npy file to write in its place."""
    return st.builds(_npy_kind, st.sampled_from(tuple(kinds)), st.integers(0, 10_000))  # kinds drawn uniformly


# --------------------------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------------------------

#: numpy dtype -> safetensors dtype name (bfloat16 is written from uint16 bit patterns: pass ``bf16={name}``)
_ST_DTYPES = {
    "<f8": "F64",
    "<f4": "F32",
    "<f2": "F16",
    "<i8": "I64",
    "<i4": "I32",
    "<i2": "I16",
    "|i1": "I8",
    "|u1": "U8",
    "|b1": "BOOL",
    "<u2": "U16",
}


def safetensors_bytes(
    tensors: dict[str, np.ndarray],
    metadata: dict[str, str] | None = None,
    *,
    bf16: Iterable[str] = (),
    header_edit: Callable[[dict], Any] | None = None,
) -> bytes:
    """A .safetensors file written byte by byte (so headers can lie): ``bf16`` names uint16 arrays to label BF16;
    ``header_edit`` may change the header dict (or return a replacement) before it is written."""
    bf16 = set(bf16)
    header: dict[str, Any] = {}
    blobs = []
    offset = 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        data = arr.tobytes()
        dt = "BF16" if name in bf16 else _ST_DTYPES[arr.dtype.str]
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    if header_edit is not None:
        edited = header_edit(header)
        header = header if edited is None else edited
    text = dump_json(header, separators=(",", ":"))
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


@dataclass
class TensorFile:
    """What a safetensors artefact holds, before it is written: tensors, string metadata, which are bfloat16."""

    tensors: dict[str, np.ndarray]
    metadata: dict[str, str] | None = None
    bf16: tuple[str, ...] = ()

    def to_bytes(self, header_edit: Callable[[dict], Any] | None = None) -> bytes:
        return safetensors_bytes(self.tensors, self.metadata, bf16=self.bf16, header_edit=header_edit)


SAFETENSORS_KINDS = (
    "wrong_dtype",
    "wrong_shape",
    "nan_inf",
    "huge_dims",
    "missing_tensor",
    "extra_tensor",
    "metadata",
    "bad_offsets",
    "huge_header_length",
    "header_json",
)

#: Metadata values a reader may try to parse: not a number, non-finite, negative, huge, empty, bad JSON.
METADATA_VALUES = ("", "abc", "nan", "inf", "-1", "1e999", "9" * 5000, "{", "[1, 2]", "null", "0", "\x00", "\u2603")


def _st_kind(kind: str, pick: int, json_m: Mutation) -> Mutation:
    def with_tensor(f):
        def fn(tf: TensorFile) -> bytes:
            if not tf.tensors:
                return tf.to_bytes()
            names = sorted(tf.tensors)
            name = names[pick % len(names)]
            tensors = dict(tf.tensors)
            tensors[name] = f(tensors[name])
            return TensorFile(
                tensors, tf.metadata, tuple(b for b in tf.bf16 if b != name or tensors[name].dtype == np.uint16)
            ).to_bytes()

        return fn

    if kind == "wrong_dtype":
        choices = ("<f8", "<f2", "<i8", "<i4", "|u1", "|b1", "<f4")

        def conv(a):
            target = next(d for d in choices[pick % len(choices) :] + choices if np.dtype(d) != a.dtype)
            with np.errstate(all="ignore"):
                return a.astype(target)

        return Mutation(kind, f"dtype choice #{pick}", with_tensor(conv))
    if kind == "wrong_shape":

        def reshape(a):
            flat = a.reshape(-1)
            shapes = [
                flat,
                flat[:-1],
                a.reshape(1, *a.shape),
                np.concatenate([flat, flat[:1]]),
                flat[:0],
                a.reshape(-1, 1),
            ]
            return shapes[pick % len(shapes)]

        return Mutation(kind, f"shape choice #{pick}", with_tensor(reshape))
    if kind == "nan_inf":

        def poison(a):
            b = a.copy()
            if b.size and np.issubdtype(b.dtype, np.floating):
                b.reshape(-1)[pick % b.size] = (np.nan, np.inf, -np.inf)[pick % 3]
            elif b.size and b.dtype == np.uint16:  # bfloat16 bits: NaN
                b.reshape(-1)[pick % b.size] = 0x7FC0
            return b

        return Mutation(kind, f"non-finite value #{pick}", with_tensor(poison))
    if kind == "huge_dims":
        big = (2**40, 2**31, 10**12, 2**63 - 1)[pick % 4]

        def edit(h):
            names = sorted(k for k in h if k != "__metadata__")
            if names:
                h[names[pick % len(names)]]["shape"] = [big] + h[names[pick % len(names)]]["shape"][1:]

        return Mutation(kind, f"a shape claims {big}", lambda tf: tf.to_bytes(edit))
    if kind == "missing_tensor":

        def fn(tf):
            names = sorted(tf.tensors)
            drop = names[pick % len(names)] if names else None
            return TensorFile({k: v for k, v in tf.tensors.items() if k != drop}, tf.metadata, tf.bf16).to_bytes()

        return Mutation(kind, f"drop tensor #{pick}", fn)
    if kind == "extra_tensor":
        extra = np.arange(pick % 5 + 1, dtype=np.float32)
        return Mutation(
            kind,
            f"add tensor 'extra_{pick}'",
            lambda tf: TensorFile({**tf.tensors, f"extra_{pick}": extra}, tf.metadata, tf.bf16).to_bytes(),
        )
    if kind == "metadata":
        value = METADATA_VALUES[pick % len(METADATA_VALUES)]

        def fn(tf):
            meta = dict(tf.metadata or {})
            keys = sorted(meta)
            action = (pick // len(METADATA_VALUES)) % 3
            if action == 0 and keys:
                meta[keys[pick % len(keys)]] = value
            elif action == 1 and keys:
                del meta[keys[pick % len(keys)]]
            else:
                meta[f"extra_{pick}"] = value
            return TensorFile(tf.tensors, meta, tf.bf16).to_bytes()

        return Mutation(kind, f"metadata change #{pick} ({value[:10]!r})", fn)
    if kind == "bad_offsets":

        def edit(h):
            names = sorted(k for k in h if k != "__metadata__")
            if names:
                ent = h[names[pick % len(names)]]
                b, e = ent["data_offsets"]
                ent["data_offsets"] = [(b, e + 4), (b + 1, e), (e, b), (0, 2**62), (-1, e)][pick % 5]

        return Mutation(kind, f"data_offsets change #{pick}", lambda tf: tf.to_bytes(edit))
    if kind == "huge_header_length":
        n = (2**40, 2**63, 10**8, 7)[pick % 4]
        return Mutation(
            kind, f"header length field says {n}", lambda tf: struct.pack("<Q", n % 2**64) + tf.to_bytes()[8:]
        )
    if kind == "header_json":
        return Mutation(f"header_{json_m.kind}", json_m.detail, lambda tf: tf.to_bytes(json_m))
    raise ValueError(f"unknown safetensors mutation kind {kind!r}")


def safetensors_mutations(kinds: Iterable[str] = SAFETENSORS_KINDS) -> st.SearchStrategy[Mutation]:
    """Mutations of a :class:`TensorFile`, each returning the bytes of the .safetensors file to write."""
    return st.builds(_st_kind, st.sampled_from(tuple(kinds)), st.integers(0, 10_000), json_mutations())


# --------------------------------------------------------------------------------------------------------------
# the harness
# --------------------------------------------------------------------------------------------------------------


def snapshot(folder: str | os.PathLike) -> dict[str, tuple]:
    """Every entry under ``folder``: relative path -> (size, sha256, mtime_ns) for files, ("dir",) for folders."""
    root = Path(folder)
    out: dict[str, tuple] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_dir() and not p.is_symlink():
            out[rel] = ("dir",)
        else:
            st_ = p.lstat()
            data = p.read_bytes() if p.is_file() else b""
            out[rel] = (st_.st_size, hashlib.sha256(data).hexdigest(), st_.st_mtime_ns)
    return out


def read_tree(folder: str | os.PathLike) -> dict[str, bytes]:
    """The files under ``folder`` as relative path -> bytes (to build a valid artefact once and copy it cheaply)."""
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_tree(folder: str | os.PathLike, files: dict[str, bytes]) -> Path:
    """Write relative path -> bytes under ``folder`` (created as needed); returns the folder."""
    root = Path(folder)
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def _event(text: str) -> None:
    """A hypothesis event inside a property test; nothing in a plain test."""
    with contextlib.suppress(InvalidArgument):
        event(text)


def _note(text: str) -> None:
    """A hypothesis note (printed with a falsifying example) inside a property test; nothing in a plain test."""
    with contextlib.suppress(InvalidArgument):
        note(text)


class ReaderHung(AssertionError):
    """The reader ran past its time bound."""


def call_bounded(fn: Callable[[], Any], timeout: float = 10.0) -> tuple[bool, Any]:
    """Run ``fn`` in a daemon thread: (True, result) or (False, the exception it raised); ReaderHung past
    ``timeout`` seconds (the thread cannot be stopped, but the test fails at once instead of hanging)."""
    box: dict[str, Any] = {}

    def run():
        try:
            box["ok"] = fn()
        except BaseException as e:  # noqa: BLE001  (the harness judges every exception)
            box["err"] = e

    t = threading.Thread(target=run, daemon=True, name="fuzz-reader")
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise ReaderHung(f"reader still running after {timeout} s")
    return ("ok" in box, box.get("ok", box.get("err")))


def expect_clean(
    fn: Callable[[], Any],
    *,
    names: Iterable[str],
    folder: str | os.PathLike | None = None,
    error: type[BaseException] | None = None,
    timeout: float = 10.0,
    mutation: Mutation | None = None,
) -> tuple[bool, Any]:
    """Call a reader and check the rule: it returns, or raises ``error`` (default ``ThoughtscopeError``) whose
    message contains one of ``names`` (the file's path or name); never another exception, never past ``timeout``,
    never a change under ``folder``. Returns (True, result) or (False, exception); records the mutation's kind
    as a hypothesis event (``--hypothesis-show-statistics`` counts them)."""
    if error is None:
        from thoughtscope.errors import ThoughtscopeError as error
    if mutation is not None:
        _event(f"mutation: {mutation.kind}")
        _note(f"{mutation!r}")
    before = snapshot(folder) if folder is not None else None
    ok, value = call_bounded(fn, timeout)
    if before is not None:
        after = snapshot(folder)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        assert not changed, f"reading wrote to {folder}: {changed} changed"
    if ok:
        _event("outcome: accepted")
        return ok, value
    if not isinstance(value, error):
        raise AssertionError(f"expected {error.__name__} or success, got {type(value).__name__}: {value}") from value
    names = [str(n) for n in names]
    msg = str(value)
    assert any(n in msg for n in names), f"error message names none of {names}: {msg!r}"
    _event(f"outcome: {type(value).__name__}")
    return ok, value


def expect_unmutated(fn: Callable[[], Any], folder: Path, seconds: float = 30) -> Any:
    """A valid artefact: the reader returns within `seconds` and writes nothing (`expect_clean` records hypothesis
    events, so it runs inside @given tests only; this runs anywhere)."""
    before = snapshot(folder)
    ok, value = call_bounded(fn, seconds)
    assert ok, value
    assert snapshot(folder) == before
    return value
