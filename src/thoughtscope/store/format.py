"""The on-disk layout of an activation store: names, dtypes, errors and the checks a reader and a writer share.

The manifest is kept as the plain dict that is written to ``manifest.json``: the JSON file is the format, and
``read_manifest`` checks every field a reader relies on against the table below, so an old or foreign store
fails with a message naming the file, the field, the value and what was expected.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import read_json
from ..dtypes import STORE_DTYPES, canonical, torch_dtype
from ..errors import StoreCorruptError, StoreError, StoreMismatchError, StoreNotFoundError  # noqa: F401  (re-exported: their old home)
from ..values import fits_float as _is_float_like
from ..values import is_int as _is_int

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "thoughtscope-activation-store"
FORMAT_VERSION = 1
LOCK_NAME = ".writer.lock"
TMP_PREFIX = ".tmp."

#: activation dtype name -> the numpy dtype on disk (numpy has no bfloat16: its bits are kept as uint16)
NPY_DTYPES: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}
assert tuple(NPY_DTYPES) == STORE_DTYPES
#: metadata columns and their on-disk dtype
COLUMNS: dict[str, np.dtype] = {
    "doc_id": np.dtype("<i8"),
    "position": np.dtype("<i4"),
    "token_id": np.dtype("<i4"),
    "doc_position": np.dtype("<i4"),
}
REQUIRED_COLUMNS = ("doc_id", "position", "token_id")
OPTIONAL_COLUMNS = ("doc_position",)
SHARD_FILE_RE = re.compile(r"^shard_\d+\.[a-z_]+\.npy$")
# Keys that change between two otherwise identical runs; ignored when comparing stores.
TIMESTAMP_KEYS = ("created_at", "finished_at")
#: manifest fields every reader relies on, with their JSON type
REQUIRED_FIELDS: tuple[tuple[str, type], ...] = (
    ("model", str),
    ("site", str),
    ("dtype", str),
    ("d_model", int),
    ("shard_tokens", int),
    ("n_tokens", int),
    ("complete", bool),
    ("shards", list),
)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def dtype_name(dtype: Any) -> str:
    """Normalise 'bf16' / torch.bfloat16 / 'torch.float16' to a store dtype name (`thoughtscope.dtypes`)."""
    name = canonical(dtype)
    if name not in STORE_DTYPES:
        raise StoreError(f"dtype={dtype!r} is not supported; expected one of {sorted(STORE_DTYPES)}")
    return name


def json_normal(obj: Any) -> Any:
    """Round-trip through JSON so a fresh dict compares equal to one read from a manifest."""
    return json.loads(json.dumps(obj))


def new_manifest(
    *, model: str, site: str, dtype: str, d_model: int, shard_tokens: int, corpus: dict, extra: dict
) -> dict:
    """The manifest of an empty, unfinished store."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": model,
        "site": site,
        "dtype": dtype,
        "d_model": d_model,
        "shard_tokens": shard_tokens,
        "columns": None,
        "n_tokens": 0,
        "complete": False,
        "created_at": now(),
        "finished_at": None,
        "corpus": corpus,
        "extra": extra,
        "stats": None,
        "shards": [],
    }


def _show(value: Any, limit: int = 80) -> str:
    """A short repr for an error message (a 5000-digit int or a huge list cannot break the message)."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        return f"an integer of about {value.bit_length() * 0.30103:.0f} digits"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def plain_file_name(name: Any) -> bool:
    """A file name inside the store folder: no separator, no '..', no NUL (a manifest cannot point elsewhere)."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
    )


def read_manifest(path: Path) -> dict:
    """Read and sanity-check ``path/manifest.json``; errors name the file and what was expected."""
    if not path.exists():
        raise StoreNotFoundError(f"activation store folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise StoreError(f"{str(path)!r} is not a folder; expected an activation store folder")
    mpath = path / MANIFEST_NAME
    if not mpath.is_file():
        raise StoreNotFoundError(
            f"{str(mpath)!r} not found: expected an activation store folder with a {MANIFEST_NAME} "
            "written by StoreWriter (is this the right path, or was the harvest never started?)"
        )
    manifest = read_json(mpath, StoreCorruptError)
    if manifest.get("format") != FORMAT_NAME:
        raise StoreCorruptError(
            f"manifest {str(mpath)!r} has format={_show(manifest.get('format'))}; expected {FORMAT_NAME!r}"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreCorruptError(
            f"manifest {str(mpath)!r} has format_version={_show(manifest.get('format_version'))}; "
            f"this thoughtscope reads version {FORMAT_VERSION}"
        )
    for key, typ in REQUIRED_FIELDS:
        value = manifest.get(key)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise StoreCorruptError(
                f"manifest {str(mpath)!r}: field {key!r} is missing or not a {typ.__name__} (got {_show(value)})"
            )
    for key, low in (("d_model", 1), ("shard_tokens", 1), ("n_tokens", 0)):
        if manifest[key] < low:
            raise StoreCorruptError(
                f"manifest {str(mpath)!r}: field {key!r} must be >= {low}, got {_show(manifest[key])}"
            )
    if manifest["dtype"] not in STORE_DTYPES:
        raise StoreCorruptError(
            f"manifest {str(mpath)!r}: dtype {_show(manifest['dtype'])} is not one of {sorted(STORE_DTYPES)}"
        )
    for key in ("corpus", "extra"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            raise StoreCorruptError(
                f"manifest {str(mpath)!r}: field {key!r} must be a JSON object, got {_show(manifest[key])}"
            )
    source = (manifest.get("extra") or {}).get("model_source")
    if source is not None and not isinstance(source, dict):
        raise StoreCorruptError(
            f"manifest {str(mpath)!r}: extra['model_source'] must be a JSON object (how the model was loaded: spec, "
            f"path, sha256), got {_show(source)}"
        )
    _check_stats(manifest.get("stats"), mpath)
    cols = manifest.get("columns")
    if cols is not None and (
        not isinstance(cols, list)
        or not all(isinstance(c, str) for c in cols)
        or any(c not in COLUMNS for c in cols)
        or any(c not in cols for c in REQUIRED_COLUMNS)
        or len(set(cols)) != len(cols)
    ):
        raise StoreCorruptError(
            f"manifest {str(mpath)!r}: bad columns {_show(cols)}; expected the names {list(REQUIRED_COLUMNS)}, "
            f"optionally {list(OPTIONAL_COLUMNS)}, each once"
        )
    total = 0
    for i, sh in enumerate(manifest["shards"]):
        if (
            not isinstance(sh, dict)
            or not _is_int(sh.get("n_tokens"))
            or sh["n_tokens"] <= 0
            or not isinstance(sh.get("files"), dict)
            or not isinstance(sh.get("sha256"), dict)
            or "acts" not in sh["files"]
        ):
            raise StoreCorruptError(f"manifest {str(mpath)!r}: shard entry {i} is malformed: {_show(sh)}")
        if cols is None or set(sh["files"]) != {"acts", *cols}:
            raise StoreCorruptError(
                f"manifest {str(mpath)!r}: shard {i} files {sorted(sh['files'])} do not match "
                f"columns {cols!r} plus 'acts'"
            )
        bad = [f for f in sh["files"].values() if not plain_file_name(f)]
        if bad:
            raise StoreCorruptError(
                f"manifest {str(mpath)!r}: shard {i} names {_show(bad[0])}; expected the name of a file "
                "inside the store folder"
            )
        total += sh["n_tokens"]
    if total != manifest["n_tokens"]:
        raise StoreCorruptError(
            f"manifest {str(mpath)!r}: n_tokens={manifest['n_tokens']} but shards hold {total} tokens"
        )
    return manifest


def model_source(manifest: dict) -> dict | str:
    """How to load the store's model again: the `LoadedModel.source` the harvest recorded in extra['model_source']
    (spec, registered name, resolved path, content hash), or for a store written before it was recorded, the
    model's name. What `models.load_recorded` takes."""
    return (manifest.get("extra") or {}).get("model_source") or manifest["model"]


#: norm statistics a reader uses, each a number or null
_STATS_NUMBERS = ("mean_l2_norm", "median_l2_norm", "max_l2_norm", "tokens", "nonfinite_tokens", "norm_sample_tokens")


def _check_stats(stats: Any, mpath: Path) -> None:
    if stats is None:
        return
    if not isinstance(stats, dict):
        raise StoreCorruptError(f"manifest {str(mpath)!r}: stats must be a JSON object or null, got {_show(stats)}")
    for key in _STATS_NUMBERS:
        v = stats.get(key)
        if v is not None and not (_is_float_like(v) and v >= 0):  # NaN fails too; +Inf is a float32 overflow
            raise StoreCorruptError(
                f"manifest {str(mpath)!r}: stats[{key!r}] must be a number >= 0 or null, got {_show(v)}"
            )
    mean = stats.get("mean")  # its length is not checked here: a d_model that disagrees is reported by the shards
    if mean is not None and (not isinstance(mean, list) or not all(map(_is_float_like, mean))):
        raise StoreCorruptError(
            f"manifest {str(mpath)!r}: stats['mean'] must be a list of numbers or null, got {_show(mean)}"
        )


def shard_files(folder: Path, manifest: dict, i: int):
    """(column, path, shape, on-disk dtype, sha256) of every file of shard ``i``."""
    sh = manifest["shards"][i]
    d = manifest["d_model"]
    for col, fname in sh["files"].items():
        shape = (sh["n_tokens"], d) if col == "acts" else (sh["n_tokens"],)
        dt = NPY_DTYPES[manifest["dtype"]] if col == "acts" else COLUMNS[col]
        yield col, folder / fname, shape, dt, sh["sha256"].get(col)


def check_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Check a shard file's header and byte size against what the manifest implies."""
    if not path.is_file():
        raise StoreCorruptError(f"shard file {str(path)!r} is listed in the manifest but missing")
    actual = path.stat().st_size
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0), (3, 0)):
                raise ValueError(f"unknown .npy format version {version}")
            if version == (1, 0):
                fshape, fortran, fdtype = np.lib.format.read_array_header_1_0(f)
            else:
                fshape, fortran, fdtype = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
    except Exception as e:  # numpy's header parse raises ValueError, but also tokenize.TokenError, RecursionError
        raise StoreCorruptError(
            f"shard file {str(path)!r} has an unreadable .npy header ({_show(str(e), 200)}); file is {actual} bytes"
        ) from e
    if tuple(fshape) != tuple(shape) or np.dtype(fdtype) != dtype or fortran:
        raise StoreCorruptError(
            f"shard file {str(path)!r} holds shape {tuple(fshape)} dtype {np.dtype(fdtype)}; the manifest "
            f"implies shape {tuple(shape)} dtype {dtype}"
        )
    expected = offset + math.prod(shape) * dtype.itemsize
    if actual != expected:
        raise StoreCorruptError(
            f"shard file {str(path)!r} is {actual} bytes; expected {expected} bytes for shape "
            f"{tuple(shape)} {dtype} ({'truncated' if actual < expected else 'trailing data'})"
        )


def to_store_numpy(acts: torch.Tensor, name: str) -> np.ndarray:
    """A CPU copy of ``acts`` in the store dtype, as the numpy array written to disk."""
    t = acts.detach().to("cpu", torch_dtype(name), copy=True).contiguous()  # never alias the caller's tensor
    if name == "bfloat16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def from_store_numpy(arr: np.ndarray, name: str) -> torch.Tensor:
    """The tensor view of an on-disk array (no copy)."""
    if name == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def col_torch_dtype(col: str) -> torch.dtype:
    return {"<i8": torch.int64, "<i4": torch.int32}[COLUMNS[col].str]
