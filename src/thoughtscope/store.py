"""On-disk activation stores: harvest residual-stream activations once, stream them many times.

A store is a folder::

    manifest.json              # what is in the folder; the only source of truth
    shard_00000.acts.npy       # [n, d_model] activations (bfloat16 kept as uint16 bit patterns)
    shard_00000.doc_id.npy     # [n] int64
    shard_00000.position.npy   # [n] int32, index in the model context (0 = attention sink / BOS)
    shard_00000.token_id.npy   # [n] int32
    shard_00000.doc_position.npy  # [n] int32, optional
    ...

Why plain ``.npy`` files: they memory-map with numpy, so reading a shard costs no copy and
training streams from the page cache; a foreign tool can read them without this package.

Crash safety: every file is written under a ``.tmp.`` name, fsynced and renamed into place,
and only then is the manifest rewritten (also temp + rename). A shard is therefore either
listed in the manifest with all its files complete, or it is not there at all. A
``StoreWriter`` on the same folder with the same arguments cleans up leftovers and resumes
after the last committed shard.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._io import fsync_dir, sha256_file
from .errors import ThoughtscopeError

try:  # advisory lock so two writers never interleave shards in one folder
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - non-POSIX
    _fcntl = None

__all__ = [
    "ActivationStore",
    "StoreCorruptError",
    "StoreError",
    "StoreMismatchError",
    "StoreNotFoundError",
    "StoreWriter",
    "MANIFEST_NAME",
    "FORMAT_VERSION",
]

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "thoughtscope-activation-store"
FORMAT_VERSION = 1
LOCK_NAME = ".writer.lock"
TMP_PREFIX = ".tmp."

#: activation dtypes a store can hold -> (torch dtype, numpy dtype on disk)
_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float32": (torch.float32, np.dtype("<f4")),
    "float16": (torch.float16, np.dtype("<f2")),
    "bfloat16": (torch.bfloat16, np.dtype("<u2")),  # numpy has no bfloat16: keep the bits
}
#: metadata columns and their on-disk dtype
_COLUMNS: dict[str, np.dtype] = {
    "doc_id": np.dtype("<i8"),
    "position": np.dtype("<i4"),
    "token_id": np.dtype("<i4"),
    "doc_position": np.dtype("<i4"),
}
REQUIRED_COLUMNS = ("doc_id", "position", "token_id")
OPTIONAL_COLUMNS = ("doc_position",)
_SHARD_FILE_RE = re.compile(r"^shard_\d+\.[a-z_]+\.npy$")
# Above this many tokens the median norm is taken from an evenly strided sample.
_MEDIAN_SAMPLE_MAX = 1 << 22
_STATS_CHUNK = 16384
# Keys that change between two otherwise identical runs; ignored when comparing stores.
TIMESTAMP_KEYS = ("created_at", "finished_at")


class StoreError(ThoughtscopeError, ValueError):
    """Any problem with an activation store or with arguments given to it."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """The store folder or its manifest does not exist."""


class StoreCorruptError(StoreError):
    """Files on disk disagree with the manifest (missing, truncated, wrong checksum, bad JSON)."""


class StoreMismatchError(StoreError):
    """A writer was re-opened on an existing store with different arguments."""


# --------------------------------------------------------------------------- helpers


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _dtype_name(dtype: Any) -> str:
    """Normalise 'bf16' / torch.bfloat16 / 'torch.float16' to a store dtype name."""
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = str(dtype).strip().lower().removeprefix("torch.")
    name = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16",
            "bf16": "bfloat16"}.get(name, name)
    if name not in _DTYPES:
        raise StoreError(f"dtype={dtype!r} is not supported; expected one of {sorted(_DTYPES)}")
    return name


class _HashingFile:
    """File wrapper that hashes everything written, so checksums cost no second read."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()

    def write(self, b) -> int:
        self.sha.update(b)
        return self.f.write(b)


def _write_npy_atomic(path: Path, arr: np.ndarray) -> str:
    """Write ``arr`` to ``path`` via temp file + fsync + rename; returns its sha256."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        hf = _HashingFile(f)
        np.lib.format.write_array(hf, np.ascontiguousarray(arr), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return hf.sha.hexdigest()


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _json_normal(obj: Any) -> Any:
    """Round-trip through JSON so a fresh dict compares equal to one read from a manifest."""
    return json.loads(json.dumps(obj))


def _read_manifest(path: Path) -> dict:
    """Read and sanity-check ``path/manifest.json``; errors name the file and what was expected."""
    if not path.exists():
        raise StoreNotFoundError(f"activation store folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise StoreError(f"{str(path)!r} is not a folder; expected an activation store folder")
    mpath = path / MANIFEST_NAME
    if not mpath.is_file():
        raise StoreNotFoundError(
            f"{str(mpath)!r} not found: expected an activation store folder with a {MANIFEST_NAME} "
            "written by StoreWriter (is this the right path, or was the harvest never started?)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreCorruptError(f"manifest {str(mpath)!r} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict):
        raise StoreCorruptError(f"manifest {str(mpath)!r} must hold a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT_NAME:
        raise StoreCorruptError(
            f"manifest {str(mpath)!r} has format={manifest.get('format')!r}; expected {FORMAT_NAME!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreCorruptError(
            f"manifest {str(mpath)!r} has format_version={manifest.get('format_version')!r}; "
            f"this thoughtscope reads version {FORMAT_VERSION}")
    for key, typ in (("model", str), ("site", str), ("dtype", str), ("d_model", int),
                     ("shard_tokens", int), ("n_tokens", int), ("complete", bool), ("shards", list)):
        if not isinstance(manifest.get(key), typ):
            raise StoreCorruptError(
                f"manifest {str(mpath)!r}: field {key!r} is missing or not a {typ.__name__} "
                f"(got {manifest.get(key)!r})")
    if manifest["dtype"] not in _DTYPES:
        raise StoreCorruptError(
            f"manifest {str(mpath)!r}: dtype {manifest['dtype']!r} is not one of {sorted(_DTYPES)}")
    cols = manifest.get("columns")
    if cols is not None and (not isinstance(cols, list) or any(c not in _COLUMNS for c in cols)
                             or any(c not in cols for c in REQUIRED_COLUMNS)):
        raise StoreCorruptError(f"manifest {str(mpath)!r}: bad columns {cols!r}")
    total = 0
    for i, sh in enumerate(manifest["shards"]):
        if (not isinstance(sh, dict) or not isinstance(sh.get("n_tokens"), int) or sh["n_tokens"] <= 0
                or not isinstance(sh.get("files"), dict) or not isinstance(sh.get("sha256"), dict)
                or "acts" not in sh["files"]):
            raise StoreCorruptError(f"manifest {str(mpath)!r}: shard entry {i} is malformed: {sh!r}")
        if cols is None or set(sh["files"]) != {"acts", *cols}:
            raise StoreCorruptError(
                f"manifest {str(mpath)!r}: shard {i} files {sorted(sh['files'])} do not match "
                f"columns {cols!r} plus 'acts'")
        total += sh["n_tokens"]
    if total != manifest["n_tokens"]:
        raise StoreCorruptError(
            f"manifest {str(mpath)!r}: n_tokens={manifest['n_tokens']} but shards hold {total} tokens")
    return manifest


def _check_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Check a shard file's header and byte size against what the manifest implies."""
    if not path.is_file():
        raise StoreCorruptError(f"shard file {str(path)!r} is listed in the manifest but missing")
    actual = path.stat().st_size
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                fshape, fortran, fdtype = np.lib.format.read_array_header_1_0(f)
            else:
                fshape, fortran, fdtype = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
    except (ValueError, OSError, EOFError) as e:
        raise StoreCorruptError(
            f"shard file {str(path)!r} has an unreadable .npy header ({e}); file is {actual} bytes") from e
    if tuple(fshape) != tuple(shape) or np.dtype(fdtype) != dtype or fortran:
        raise StoreCorruptError(
            f"shard file {str(path)!r} holds shape {tuple(fshape)} dtype {np.dtype(fdtype)}; the manifest "
            f"implies shape {tuple(shape)} dtype {dtype}")
    expected = offset + math.prod(shape) * dtype.itemsize
    if actual != expected:
        raise StoreCorruptError(
            f"shard file {str(path)!r} is {actual} bytes; expected {expected} bytes for shape "
            f"{tuple(shape)} {dtype} ({'truncated' if actual < expected else 'trailing data'})")


def _to_store_numpy(acts: torch.Tensor, dtype_name: str) -> np.ndarray:
    tdtype, _ = _DTYPES[dtype_name]
    t = acts.detach().to("cpu", tdtype, copy=True).contiguous()  # never alias the caller's tensor
    if dtype_name == "bfloat16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _col_torch_dtype(col: str) -> torch.dtype:
    return {"<i8": torch.int64, "<i4": torch.int32}[_COLUMNS[col].str]


def _from_store_numpy(arr: np.ndarray, dtype_name: str) -> torch.Tensor:
    if dtype_name == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


# --------------------------------------------------------------------------- writer


class StoreWriter:
    """Append-only writer; shards are cut at exactly ``shard_tokens`` tokens.

    Re-creating a writer on a folder holding an unfinished store with the same arguments
    resumes it: ``tokens_done`` tells the caller how many tokens to skip. One writer per
    folder at a time (enforced with an advisory lock where the OS has one).
    """

    def __init__(self, path, *, model: str, site: str, d_model: int, dtype: str = "float32",
                 shard_tokens: int = 65536, corpus: dict | None = None, extra: dict | None = None,
                 overwrite: bool = False):
        self.path = Path(path)
        if not isinstance(d_model, int) or isinstance(d_model, bool) or d_model <= 0:
            raise StoreError(f"d_model must be a positive int, got {d_model!r}")
        if not isinstance(shard_tokens, int) or isinstance(shard_tokens, bool) or shard_tokens <= 0:
            raise StoreError(f"shard_tokens must be a positive int, got {shard_tokens!r}")
        self.model = str(model)
        self.site = str(site)
        self.d_model = d_model
        self.dtype_name = _dtype_name(dtype)
        self.shard_tokens = shard_tokens
        try:
            self.corpus = _json_normal(corpus or {})
            self.extra = _json_normal(extra or {})
        except (TypeError, ValueError) as e:
            raise StoreError(f"corpus and extra must be JSON-serialisable dicts: {e}") from e
        self._pending_acts: list[np.ndarray] = []
        self._pending_meta: list[dict[str, np.ndarray]] = []
        self._n_pending = 0
        self._closed = False
        self._lock_fd = None

        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{str(self.path)!r} is a file; expected a folder for the activation store")
        self.path.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            self._open_or_create(overwrite)
        except BaseException:
            self._release_lock()
            raise

    # -- setup

    def _acquire_lock(self) -> None:
        if _fcntl is None:  # pragma: no cover
            return
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise StoreError(
                f"another StoreWriter is writing to {str(self.path)!r} (lock {LOCK_NAME} is held); "
                "finish or stop it first") from e
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def _fresh_manifest(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "site": self.site,
            "dtype": self.dtype_name,
            "d_model": self.d_model,
            "shard_tokens": self.shard_tokens,
            "columns": None,
            "n_tokens": 0,
            "complete": False,
            "created_at": _now(),
            "finished_at": None,
            "corpus": self.corpus,
            "extra": self.extra,
            "stats": None,
            "shards": [],
        }

    def _open_or_create(self, overwrite: bool) -> None:
        mpath = self.path / MANIFEST_NAME
        if mpath.exists():
            manifest = _read_manifest(self.path)
            if overwrite:
                self._wipe(manifest)
                manifest = None
            elif manifest["complete"]:
                raise StoreError(
                    f"{str(mpath)!r} describes a finished store ({manifest['n_tokens']} tokens); "
                    "pass overwrite=True to StoreWriter to replace it, or read it with ActivationStore.open")
            else:
                self._check_same(manifest, mpath)
        else:
            stray = [p.name for p in self.path.iterdir()
                     if p.name != LOCK_NAME and not p.name.startswith(TMP_PREFIX)
                     and not _SHARD_FILE_RE.match(p.name)]
            if stray:
                raise StoreError(
                    f"folder {str(self.path)!r} is not empty and has no {MANIFEST_NAME} "
                    f"(found e.g. {sorted(stray)[:3]}); refusing to write a store into it")
            manifest = None
        if manifest is None:
            manifest = self._fresh_manifest()
            self._cleanup(set())
            _write_json_atomic(mpath, manifest)
        else:
            listed = {f for sh in manifest["shards"] for f in sh["files"].values()}
            self._cleanup(listed)
            for sh in manifest["shards"]:  # a resumed store must be intact before appending to it
                for col, fname in sh["files"].items():
                    shape = (sh["n_tokens"], self.d_model) if col == "acts" else (sh["n_tokens"],)
                    dt = _DTYPES[self.dtype_name][1] if col == "acts" else _COLUMNS[col]
                    _check_npy(self.path / fname, shape, dt)
        self.manifest = manifest
        self.columns: list[str] | None = manifest["columns"]

    def _check_same(self, manifest: dict, mpath: Path) -> None:
        mine = {"model": self.model, "site": self.site, "d_model": self.d_model,
                "dtype": self.dtype_name, "shard_tokens": self.shard_tokens, "corpus": self.corpus}
        for key, value in mine.items():
            if manifest.get(key) != value:
                raise StoreMismatchError(
                    f"cannot resume {str(mpath)!r}: field {key!r} is {manifest.get(key)!r} in the manifest "
                    f"but {value!r} was given; use the original arguments, another folder, or overwrite=True")
        old_extra = manifest.get("extra") or {}
        for key in old_extra.keys() & self.extra.keys():
            if old_extra[key] != self.extra[key]:
                raise StoreMismatchError(
                    f"cannot resume {str(mpath)!r}: extra[{key!r}] is {old_extra[key]!r} in the manifest "
                    f"but {self.extra[key]!r} was given")
        manifest["extra"] = {**old_extra, **self.extra}
        self.extra = manifest["extra"]

    def _cleanup(self, keep: set[str]) -> None:
        """Delete temp files and shard files a killed writer renamed but never committed."""
        for p in self.path.iterdir():
            if p.name.startswith(TMP_PREFIX) or (_SHARD_FILE_RE.match(p.name) and p.name not in keep):
                p.unlink(missing_ok=True)

    def _wipe(self, manifest: dict) -> None:
        (self.path / MANIFEST_NAME).unlink()  # first, so a crash mid-wipe never leaves a lying manifest
        fsync_dir(self.path)
        self._cleanup(set())

    # -- public

    @property
    def tokens_done(self) -> int:
        """Tokens in committed shards: what a resumed harvest should skip."""
        return self.manifest["n_tokens"]

    @property
    def tokens_buffered(self) -> int:
        """Tokens added but not yet on disk (lost if the process dies now)."""
        return self._n_pending

    def add(self, acts, meta: dict) -> None:
        """Queue ``acts`` [N, d_model] with per-token ``meta`` columns; commits full shards."""
        if self._closed:
            raise StoreError(f"StoreWriter for {str(self.path)!r} is closed; create a new one to resume")
        if isinstance(acts, np.ndarray):
            acts = torch.from_numpy(acts)
        if not isinstance(acts, torch.Tensor):
            raise StoreError(f"acts must be a torch.Tensor or numpy array, got {type(acts).__name__}")
        if not (acts.is_floating_point()):
            raise StoreError(f"acts must be floating point, got dtype {acts.dtype}")
        if acts.ndim != 2 or acts.shape[1] != self.d_model:
            hint = " (flatten [B, T, d] with acts.reshape(-1, d) first)" if acts.ndim == 3 else ""
            raise StoreError(
                f"acts must have shape [N, d_model={self.d_model}], got {tuple(acts.shape)}{hint}")
        n = acts.shape[0]
        if not isinstance(meta, dict):
            raise StoreError(f"meta must be a dict of columns, got {type(meta).__name__}")
        missing = [c for c in REQUIRED_COLUMNS if c not in meta]
        unknown = [c for c in meta if c not in _COLUMNS]
        if missing or unknown:
            raise StoreError(
                f"meta columns: missing {missing}, unknown {unknown}; expected {list(REQUIRED_COLUMNS)} "
                f"plus optional {list(OPTIONAL_COLUMNS)}")
        cols = [c for c in _COLUMNS if c in meta]
        if self.columns is None:
            self.columns = cols
        elif cols != self.columns:
            raise StoreError(
                f"meta columns {cols} differ from the columns of this store {self.columns} "
                f"(manifest {str(self.path / MANIFEST_NAME)!r})")
        converted: dict[str, np.ndarray] = {}
        for c in cols:
            v = meta[c]
            if isinstance(v, torch.Tensor):
                v = v.detach().cpu().numpy()
            v = np.asarray(v)
            if v.ndim != 1 or v.shape[0] != n:
                raise StoreError(f"meta[{c!r}] must have shape [{n}] to match acts, got {tuple(v.shape)}")
            if not (np.issubdtype(v.dtype, np.integer) and v.dtype != np.bool_):
                raise StoreError(f"meta[{c!r}] must hold integers, got dtype {v.dtype}")
            dt = _COLUMNS[c]
            if n and (v.min() < np.iinfo(dt).min or v.max() > np.iinfo(dt).max):
                raise StoreError(f"meta[{c!r}] has values outside the {dt} range")
            converted[c] = v.astype(dt, copy=True)
        if n == 0:
            return
        shards = self.manifest["shards"]
        if shards and shards[-1]["n_tokens"] != self.shard_tokens:
            raise StoreError(
                f"store {str(self.path)!r} already holds its final (short) shard: a previous finish() was "
                "interrupted after writing it; call finish() without adding more tokens")
        self._pending_acts.append(_to_store_numpy(acts, self.dtype_name))
        self._pending_meta.append(converted)
        self._n_pending += n
        if self._n_pending >= self.shard_tokens:
            acts_all = np.concatenate(self._pending_acts)
            meta_all = {c: np.concatenate([m[c] for m in self._pending_meta]) for c in cols}
            start = 0
            while self._n_pending - start >= self.shard_tokens:
                stop = start + self.shard_tokens
                self._commit(acts_all[start:stop], {c: v[start:stop] for c, v in meta_all.items()})
                start = stop
            self._pending_acts = [acts_all[start:].copy()] if start < len(acts_all) else []
            self._pending_meta = [{c: v[start:].copy() for c, v in meta_all.items()}] if self._pending_acts else []
            self._n_pending = len(acts_all) - start

    def _commit(self, acts: np.ndarray, meta: dict[str, np.ndarray]) -> None:
        i = len(self.manifest["shards"])
        files = {"acts": f"shard_{i:05d}.acts.npy", **{c: f"shard_{i:05d}.{c}.npy" for c in meta}}
        sha = {"acts": _write_npy_atomic(self.path / files["acts"], acts)}
        for c, v in meta.items():
            sha[c] = _write_npy_atomic(self.path / files[c], v)
        fsync_dir(self.path)
        self.manifest["columns"] = list(self.columns)
        self.manifest["shards"].append({"n_tokens": int(acts.shape[0]), "files": files, "sha256": sha})
        self.manifest["n_tokens"] += int(acts.shape[0])
        _write_json_atomic(self.path / MANIFEST_NAME, self.manifest)

    def finish(self, *, extra: dict | None = None) -> ActivationStore:
        """Write the remainder as a last (smaller) shard, compute stats, mark complete."""
        if self._closed:
            raise StoreError(f"StoreWriter for {str(self.path)!r} is closed")
        if self._n_pending:
            acts_all = np.concatenate(self._pending_acts)
            meta_all = {c: np.concatenate([m[c] for m in self._pending_meta]) for c in self.columns}
            self._commit(acts_all, meta_all)
            self._pending_acts, self._pending_meta, self._n_pending = [], [], 0
        if extra:
            self.manifest["extra"].update(_json_normal(extra))
        if self.manifest["columns"] is None:
            self.manifest["columns"] = list(self.columns or [*REQUIRED_COLUMNS])
        self.manifest["stats"] = _compute_stats(ActivationStore(self.path, self.manifest))
        self.manifest["complete"] = True
        self.manifest["finished_at"] = _now()
        _write_json_atomic(self.path / MANIFEST_NAME, self.manifest)
        self.close()
        return ActivationStore.open(self.path)

    def close(self) -> None:
        """Stop writing without finishing (buffered tokens are dropped); the store stays resumable."""
        self._closed = True
        self._pending_acts, self._pending_meta, self._n_pending = [], [], 0
        self._release_lock()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self._release_lock()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"StoreWriter({str(self.path)!r}, model={self.model!r}, site={self.site!r}, "
                f"dtype={self.dtype_name}, tokens_done={self.tokens_done}, buffered={self._n_pending})")


# --------------------------------------------------------------------------- stats


def _compute_stats(store: ActivationStore) -> dict:
    """Norm statistics over non-BOS, finite rows (position 0 is an outlier sink, excluded from training).

    ``median_l2_norm`` is exact up to 4M eligible tokens, above that it is the median of an evenly
    strided sample of ``norm_sample_tokens`` rows.
    """
    d = store.d_model
    n = store.n_tokens
    stride = max(1, math.ceil(n / _MEDIAN_SAMPLE_MAX))
    has_non_bos = False
    for _, meta in store.iter_shards():
        if bool((meta["position"] != 0).any()):
            has_non_bos = True
            break
    count = 0
    nonfinite = 0
    norm_sum = 0.0
    norm_max = 0.0
    dim_sum = torch.zeros(d, dtype=torch.float64)
    samples: list[np.ndarray] = []
    offset = 0
    for acts, meta in store.iter_shards():
        for s in range(0, acts.shape[0], _STATS_CHUNK):
            x = acts[s:s + _STATS_CHUNK].float()
            pos = meta["position"][s:s + _STATS_CHUNK]
            finite = torch.isfinite(x).all(dim=1)
            keep = finite & (pos != 0) if has_non_bos else finite
            nonfinite += int((~finite).sum())
            xk = x[keep]
            norms = torch.linalg.vector_norm(xk, dim=1)
            count += xk.shape[0]
            norm_sum += float(norms.double().sum())
            if norms.numel():
                norm_max = max(norm_max, float(norms.max()))
            dim_sum += xk.sum(dim=0, dtype=torch.float64)
            gidx = torch.arange(offset + s, offset + s + x.shape[0])[keep]
            samples.append(norms[gidx % stride == 0].numpy())
        offset += acts.shape[0]
    sample = np.concatenate(samples) if samples else np.zeros(0, np.float32)
    return {
        "tokens": count,
        "exclude_bos": has_non_bos,
        "nonfinite_tokens": nonfinite,
        "mean_l2_norm": norm_sum / count if count else None,
        "median_l2_norm": float(np.median(sample)) if sample.size else None,
        "norm_sample_tokens": int(sample.size),
        "max_l2_norm": norm_max if count else None,
        "mean": (dim_sum / count).tolist() if count else None,
    }


# --------------------------------------------------------------------------- reader


class ActivationStore:
    """Read side of a store: memory-mapped shards, ordered slices and shuffled batches."""

    def __init__(self, path, manifest: dict):
        """Use :meth:`open`; this constructor trusts ``manifest`` without checking files."""
        self.path = Path(path)
        self.manifest = manifest
        self.model: str = manifest["model"]
        self.site: str = manifest["site"]
        self.d_model: int = manifest["d_model"]
        self.dtype_name: str = manifest["dtype"]
        self.dtype: torch.dtype = _DTYPES[self.dtype_name][0]
        self.n_tokens: int = manifest["n_tokens"]
        self.shard_tokens: int = manifest["shard_tokens"]
        self.complete: bool = manifest["complete"]
        self.columns: list[str] = list(manifest.get("columns") or REQUIRED_COLUMNS)
        self.corpus: dict = manifest.get("corpus") or {}
        self.extra: dict = manifest.get("extra") or {}
        self._offsets = np.cumsum([0] + [sh["n_tokens"] for sh in manifest["shards"]])
        self._stats: dict | None = manifest.get("stats")

    @classmethod
    def open(cls, path, *, verify_checksums: bool = False) -> ActivationStore:
        """Open and validate a store: manifest fields, every shard file's presence, header and size."""
        path = Path(path)
        manifest = _read_manifest(path)
        store = cls(path, manifest)
        store.verify(checksums=verify_checksums)
        return store

    # -- validation

    def _shard_files(self, i: int):
        sh = self.manifest["shards"][i]
        for col, fname in sh["files"].items():
            shape = (sh["n_tokens"], self.d_model) if col == "acts" else (sh["n_tokens"],)
            dt = _DTYPES[self.dtype_name][1] if col == "acts" else _COLUMNS[col]
            yield col, self.path / fname, shape, dt, sh["sha256"].get(col)

    def verify(self, checksums: bool = True) -> None:
        """Check every shard file's header and size; with ``checksums`` also its sha256 (reads all data)."""
        for i in range(self.n_shards):
            for col, fpath, shape, dt, digest in self._shard_files(i):
                _check_npy(fpath, shape, dt)
                if checksums:
                    actual = sha256_file(fpath)
                    if actual != digest:
                        raise StoreCorruptError(
                            f"checksum mismatch for shard file {str(fpath)!r}: manifest says sha256 "
                            f"{digest}, file has {actual}")

    # -- basic access

    def __len__(self) -> int:
        return self.n_tokens

    @property
    def n_shards(self) -> int:
        return len(self.manifest["shards"])

    def shard(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Memory-mapped shard ``i``: acts [n, d] in the store dtype and its meta columns.

        Mapped copy-on-write: writing to these tensors never touches the files.
        """
        if not isinstance(i, (int, np.integer)) or not -self.n_shards <= i < self.n_shards:
            raise StoreError(f"shard index {i!r} out of range for a store with {self.n_shards} shards")
        i = int(i) % self.n_shards
        acts = None
        meta: dict[str, torch.Tensor] = {}
        for col, fpath, _, _, _ in self._shard_files(i):
            try:
                arr = np.load(fpath, mmap_mode="c", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise StoreCorruptError(f"cannot read shard file {str(fpath)!r}: {e}") from e
            if col == "acts":
                acts = _from_store_numpy(arr, self.dtype_name)
            else:
                meta[col] = torch.from_numpy(arr)
        return acts, meta

    def iter_shards(self) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """Shards in store order, memory-mapped."""
        for i in range(self.n_shards):
            yield self.shard(i)

    def tokens(self, start: int = 0, stop: int | None = None, *, dtype: torch.dtype | None = None,
               with_meta: bool = False):
        """Rows ``start:stop`` in store order, copied out of the shards (for evaluation)."""
        stop = self.n_tokens if stop is None else stop
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= self.n_tokens):
            raise StoreError(
                f"tokens(start={start!r}, stop={stop!r}) must satisfy 0 <= start <= stop <= {self.n_tokens}")
        parts: list[torch.Tensor] = []
        mparts: dict[str, list[torch.Tensor]] = {c: [] for c in self.columns}
        first = int(np.searchsorted(self._offsets, start, side="right")) - 1
        for i in range(max(first, 0), self.n_shards):
            lo, hi = int(self._offsets[i]), int(self._offsets[i + 1])
            if lo >= stop:
                break
            a, b = max(start, lo) - lo, min(stop, hi) - lo
            if b <= a:
                continue
            acts, meta = self.shard(i)
            parts.append(acts[a:b].clone())
            for c in self.columns:
                mparts[c].append(meta[c][a:b].clone())
        out = torch.cat(parts) if parts else torch.empty(0, self.d_model, dtype=self.dtype)
        if dtype is not None:
            out = out.to(dtype)
        if not with_meta:
            return out
        meta_out = {c: (torch.cat(v) if v else torch.empty(0, dtype=_col_torch_dtype(c))) for c, v in mparts.items()}
        return out, meta_out

    # -- statistics

    @property
    def stats(self) -> dict:
        """Manifest stats; computed on the fly (not saved) for an unfinished store."""
        if self._stats is None:
            self._stats = _compute_stats(self)
        return self._stats

    @property
    def median_norm(self) -> float | None:
        return self.stats["median_l2_norm"]

    # -- streaming

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, buffer_tokens: int = 262144,
                epochs: int = 1, drop_last: bool = False, dtype: torch.dtype = torch.float32,
                exclude_bos: bool = True, max_norm_ratio: float | None = None, with_meta: bool = False):
        """Stream batches of rows; every kept row appears exactly once per epoch.

        Shuffling: shard order and the order of read chunks inside each shard are permuted, then
        rows pass through a shuffle buffer of ``buffer_tokens`` rows from which each batch is drawn
        at random. Memory is bounded by the buffer, not by the store. Rows with NaN/Inf are kept
        (never silently dropped) so downstream checks see them.
        """
        def _posint(name, v):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise StoreError(f"{name} must be a positive int, got {v!r}")
        _posint("batch_size", batch_size)
        _posint("buffer_tokens", buffer_tokens)
        _posint("epochs", epochs)
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise StoreError(f"seed must be an int, got {seed!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise StoreError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        threshold = None
        if max_norm_ratio is not None:
            if not isinstance(max_norm_ratio, (int, float)) or not math.isfinite(max_norm_ratio) or max_norm_ratio <= 0:
                raise StoreError(f"max_norm_ratio must be a positive finite number or None, got {max_norm_ratio!r}")
            median = self.median_norm
            if median is None:
                raise StoreError(
                    f"max_norm_ratio needs a median norm but store {str(self.path)!r} has no finite rows")
            threshold = float(max_norm_ratio) * median
        return self._batches(int(batch_size), shuffle, int(seed), int(buffer_tokens), int(epochs), drop_last,
                             dtype, exclude_bos, threshold, with_meta)

    def _chunks(self, gen: torch.Generator | None, chunk_rows: int, exclude_bos: bool,
                threshold: float | None, with_meta: bool):
        """Yield filtered (acts, meta) pieces in (optionally permuted) shard/chunk order."""
        order = torch.randperm(self.n_shards, generator=gen).tolist() if gen is not None else range(self.n_shards)
        for i in order:
            acts, meta = self.shard(i)
            n = acts.shape[0]
            starts = list(range(0, n, chunk_rows))
            if gen is not None:
                starts = [starts[j] for j in torch.randperm(len(starts), generator=gen).tolist()]
            for s in starts:
                a = acts[s:s + chunk_rows]
                keep = None
                if exclude_bos:
                    keep = meta["position"][s:s + chunk_rows] != 0
                if threshold is not None:
                    norms = torch.linalg.vector_norm(a.float(), dim=1)
                    # rows with NaN/Inf are kept whatever their norm: downstream checks must see them
                    ok = ~(norms > threshold) | ~torch.isfinite(norms)
                    keep = ok if keep is None else keep & ok
                if keep is not None:
                    idx = keep.nonzero().squeeze(1)
                    a = a[idx]
                    m = {c: meta[c][s:s + chunk_rows][idx] for c in self.columns} if with_meta else None
                else:
                    m = {c: meta[c][s:s + chunk_rows] for c in self.columns} if with_meta else None
                if a.shape[0]:
                    yield a, m

    def _batches(self, bs, shuffle, seed, buffer_tokens, epochs, drop_last, dtype, exclude_bos, threshold,
                 with_meta):
        def out(a, m):
            a = a.to(dtype) if a.dtype != dtype else a.clone()
            return (a, m) if with_meta else a

        if not shuffle:
            for _ in range(epochs):
                pa: list[torch.Tensor] = []
                pm: list[dict] = []
                n = 0
                for a, m in self._chunks(None, 65536, exclude_bos, threshold, with_meta):
                    pa.append(a)
                    pm.append(m)
                    n += a.shape[0]
                    if n >= bs:
                        cat = torch.cat(pa)
                        mcat = {c: torch.cat([x[c] for x in pm]) for c in self.columns} if with_meta else None
                        s = 0
                        while n - s >= bs:
                            yield out(cat[s:s + bs], {c: v[s:s + bs].clone() for c, v in mcat.items()} if with_meta else None)
                            s += bs
                        pa = [cat[s:].clone()]
                        pm = [{c: v[s:].clone() for c, v in mcat.items()}] if with_meta else [None]
                        n -= s
                if n and not drop_last:
                    cat = torch.cat(pa)
                    mcat = {c: torch.cat([x[c] for x in pm]) for c in self.columns} if with_meta else None
                    yield out(cat, mcat)
            return

        gen = torch.Generator().manual_seed(seed)
        cap = max(buffer_tokens, bs)
        chunk_rows = max(1, min(cap, 65536))
        for _ in range(epochs):
            buf = torch.empty(cap, self.d_model, dtype=self.dtype)
            mbuf = {c: torch.empty(cap, dtype=_col_torch_dtype(c)) for c in self.columns} if with_meta else {}
            n = 0
            for a, m in self._chunks(gen, chunk_rows, exclude_bos, threshold, with_meta):
                s = 0
                k = a.shape[0]
                while s < k:
                    take = min(cap - n, k - s)
                    if take:
                        buf[n:n + take] = a[s:s + take]
                        for c in mbuf:
                            mbuf[c][n:n + take] = m[c][s:s + take]
                        n += take
                        s += take
                    if n == cap:
                        # draw a random batch, then close the holes with rows from the tail
                        idx = torch.randperm(n, generator=gen)[:bs]
                        batch = buf[idx]
                        mb = {c: v[idx] for c, v in mbuf.items()}
                        tail_start = n - bs
                        chosen = torch.zeros(n, dtype=torch.bool)
                        chosen[idx] = True
                        holes = idx[idx < tail_start]
                        movers = torch.arange(tail_start, n)[~chosen[tail_start:]]
                        buf[holes] = buf[movers]
                        for c in mbuf:
                            mbuf[c][holes] = mbuf[c][movers]
                        n = tail_start
                        yield out(batch, mb if with_meta else None)
            perm = torch.randperm(n, generator=gen)
            for s in range(0, n, bs):
                if drop_last and s + bs > n:
                    break
                idx = perm[s:s + bs]
                yield out(buf[idx], {c: v[idx] for c, v in mbuf.items()} if with_meta else None)

    # -- summary

    def size_bytes(self) -> int:
        """Bytes on disk of the manifest and every listed shard file."""
        total = (self.path / MANIFEST_NAME).stat().st_size
        for sh in self.manifest["shards"]:
            for fname in sh["files"].values():
                p = self.path / fname
                total += p.stat().st_size if p.exists() else 0
        return total

    def describe(self) -> dict:
        """JSON-able summary for the CLI."""
        stats = self.manifest.get("stats") or {}
        return {
            "path": str(self.path),
            "model": self.model,
            "site": self.site,
            "dtype": self.dtype_name,
            "d_model": self.d_model,
            "n_tokens": self.n_tokens,
            "n_shards": self.n_shards,
            "shard_tokens": self.shard_tokens,
            "columns": self.columns,
            "complete": self.complete,
            "size_bytes": self.size_bytes(),
            "mean_l2_norm": stats.get("mean_l2_norm"),
            "median_l2_norm": stats.get("median_l2_norm"),
            "nonfinite_tokens": stats.get("nonfinite_tokens"),
            "corpus": self.corpus,
        }

    def __repr__(self) -> str:
        mib = self.size_bytes() / 2**20
        state = "complete" if self.complete else "INCOMPLETE"
        return (f"ActivationStore({str(self.path)!r}: {self.n_tokens:,} tokens in {self.n_shards} shards, "
                f"{self.model} {self.site}, d_model={self.d_model}, {self.dtype_name}, {mib:.1f} MiB, {state})")
