"""The write side of an activation store: append rows, cut shards, commit them crash-safely, finish with stats.

Crash safety: every file is written under a ``.tmp.`` name, fsynced and renamed into place, and only then is
the manifest rewritten (also temp + rename). A shard is therefore either listed in the manifest with all its
files complete, or it is not there at all. A ``StoreWriter`` on the same folder with the same arguments cleans
up leftovers and resumes after the last committed shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_write, fsync_dir
from .format import (
    COLUMNS,
    LOCK_NAME,
    MANIFEST_NAME,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    SHARD_FILE_RE,
    TMP_PREFIX,
    StoreError,
    StoreMismatchError,
    check_npy,
    dtype_name,
    json_normal,
    new_manifest,
    now,
    read_manifest,
    shard_files,
    to_store_numpy,
)
from .reader import ActivationStore, compute_stats

try:  # advisory lock so two writers never interleave shards in one folder
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - non-POSIX
    _fcntl = None


class _HashingFile:
    """File wrapper that hashes everything written, so checksums cost no second read."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()

    def write(self, b) -> int:
        self.sha.update(b)
        return self.f.write(b)


def _write_npy(path: Path, arr: np.ndarray) -> str:
    """Write ``arr`` to ``path`` durably (temp file, fsync, rename); returns its sha256."""
    sha = []

    def write(f) -> None:
        hf = _HashingFile(f)
        np.lib.format.write_array(hf, np.ascontiguousarray(arr), allow_pickle=False)
        sha.append(hf.sha.hexdigest())

    atomic_write(path, write, durable=True, tmp_prefix=TMP_PREFIX)
    return sha[0]


def _write_manifest(path: Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=2) + "\n"
    atomic_write(path / MANIFEST_NAME, lambda f: f.write(text.encode("utf-8")), durable=True, tmp_prefix=TMP_PREFIX)


class StoreWriter:
    """Append-only writer; shards are cut at exactly ``shard_tokens`` tokens.

    Re-creating a writer on a folder holding an unfinished store with the same arguments
    resumes it: ``tokens_done`` tells the caller how many tokens to skip. One writer per
    folder at a time (enforced with an advisory lock where the OS has one).
    """

    def __init__(
        self,
        path,
        *,
        model: str,
        site: str,
        d_model: int,
        dtype: str = "float32",
        shard_tokens: int = 65536,
        corpus: dict | None = None,
        extra: dict | None = None,
        overwrite: bool = False,
    ):
        self.path = Path(path)
        if not isinstance(d_model, int) or isinstance(d_model, bool) or d_model <= 0:
            raise StoreError(f"d_model must be a positive int, got {d_model!r}")
        if not isinstance(shard_tokens, int) or isinstance(shard_tokens, bool) or shard_tokens <= 0:
            raise StoreError(f"shard_tokens must be a positive int, got {shard_tokens!r}")
        self.model = str(model)
        self.site = str(site)
        self.d_model = d_model
        self.dtype_name = dtype_name(dtype)
        self.shard_tokens = shard_tokens
        try:
            self.corpus = json_normal(corpus or {})
            self.extra = json_normal(extra or {})
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
                f"another StoreWriter is writing to {str(self.path)!r} (the lock {self.path / LOCK_NAME} is held); "
                "finish or stop it first, or write somewhere else"
            ) from e
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def _open_or_create(self, overwrite: bool) -> None:
        mpath = self.path / MANIFEST_NAME
        if mpath.exists():
            manifest = read_manifest(self.path)
            if overwrite:
                self._wipe()
                manifest = None
            elif manifest["complete"]:
                raise StoreError(
                    f"{str(mpath)!r} describes a finished store ({manifest['n_tokens']} tokens); "
                    "pass overwrite=True to StoreWriter to replace it, or read it with ActivationStore.open"
                )
            else:
                self._check_same(manifest, mpath)
        else:
            stray = [
                p.name
                for p in self.path.iterdir()
                if p.name != LOCK_NAME and not p.name.startswith(TMP_PREFIX) and not SHARD_FILE_RE.match(p.name)
            ]
            if stray:
                raise StoreError(
                    f"folder {str(self.path)!r} is not empty and has no {MANIFEST_NAME} "
                    f"(found e.g. {sorted(stray)[:3]}); refusing to write a store into it"
                )
            manifest = None
        if manifest is None:
            manifest = new_manifest(
                model=self.model,
                site=self.site,
                dtype=self.dtype_name,
                d_model=self.d_model,
                shard_tokens=self.shard_tokens,
                corpus=self.corpus,
                extra=self.extra,
            )
            self._cleanup(set())
            _write_manifest(self.path, manifest)
        else:
            listed = {f for sh in manifest["shards"] for f in sh["files"].values()}
            self._cleanup(listed)
            for i in range(len(manifest["shards"])):  # a resumed store must be intact before appending to it
                for _, fpath, shape, dt, _ in shard_files(self.path, manifest, i):
                    check_npy(fpath, shape, dt)
        self.manifest = manifest
        self.columns: list[str] | None = manifest["columns"]

    def _check_same(self, manifest: dict, mpath: Path) -> None:
        mine = {
            "model": self.model,
            "site": self.site,
            "d_model": self.d_model,
            "dtype": self.dtype_name,
            "shard_tokens": self.shard_tokens,
            "corpus": self.corpus,
        }
        for key, value in mine.items():
            if manifest.get(key) != value:
                raise StoreMismatchError(
                    f"cannot resume {str(mpath)!r}: field {key!r} is {manifest.get(key)!r} in the manifest "
                    f"but {value!r} was given; use the original arguments, another folder, or overwrite=True"
                )
        old_extra = manifest.get("extra") or {}
        for key in old_extra.keys() & self.extra.keys():
            if old_extra[key] != self.extra[key]:
                raise StoreMismatchError(
                    f"cannot resume {str(mpath)!r}: extra[{key!r}] is {old_extra[key]!r} in the manifest "
                    f"but {self.extra[key]!r} was given"
                )
        manifest["extra"] = {**old_extra, **self.extra}
        self.extra = manifest["extra"]

    def _cleanup(self, keep: set[str]) -> None:
        """Delete temp files and shard files a killed writer renamed but never committed."""
        for p in self.path.iterdir():
            if p.name.startswith(TMP_PREFIX) or (SHARD_FILE_RE.match(p.name) and p.name not in keep):
                p.unlink(missing_ok=True)

    def _wipe(self) -> None:
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
            raise StoreError(f"acts must have shape [N, d_model={self.d_model}], got {tuple(acts.shape)}{hint}")
        n = acts.shape[0]
        if not isinstance(meta, dict):
            raise StoreError(f"meta must be a dict of columns, got {type(meta).__name__}")
        missing = [c for c in REQUIRED_COLUMNS if c not in meta]
        unknown = [c for c in meta if c not in COLUMNS]
        if missing or unknown:
            raise StoreError(
                f"meta columns: missing {missing}, unknown {unknown}; expected {list(REQUIRED_COLUMNS)} "
                f"plus optional {list(OPTIONAL_COLUMNS)}"
            )
        cols = [c for c in COLUMNS if c in meta]
        if self.columns is None:
            self.columns = cols
        elif cols != self.columns:
            raise StoreError(
                f"meta columns {cols} differ from the columns of this store {self.columns} "
                f"(manifest {str(self.path / MANIFEST_NAME)!r})"
            )
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
            dt = COLUMNS[c]
            if n and (v.min() < np.iinfo(dt).min or v.max() > np.iinfo(dt).max):
                raise StoreError(f"meta[{c!r}] has values outside the {dt} range")
            converted[c] = v.astype(dt, copy=True)
        if n == 0:
            return
        shards = self.manifest["shards"]
        if shards and shards[-1]["n_tokens"] != self.shard_tokens:
            raise StoreError(
                f"store {str(self.path)!r} already holds its final (short) shard: a previous finish() was "
                "interrupted after writing it; call finish() without adding more tokens"
            )
        self._pending_acts.append(to_store_numpy(acts, self.dtype_name))
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
        """Write one shard's files, then the manifest that lists it. The manifest in memory changes only once the one
        on disk does, so a failed commit (a full disk) leaves the writer describing what is really there; the
        shard's files already written are removed again (they would only take space until the next open)."""
        i = len(self.manifest["shards"])
        files = {"acts": f"shard_{i:05d}.acts.npy", **{c: f"shard_{i:05d}.{c}.npy" for c in meta}}
        try:
            sha = {"acts": _write_npy(self.path / files["acts"], acts)}
            for c, v in meta.items():
                sha[c] = _write_npy(self.path / files[c], v)
            shard = {"n_tokens": int(acts.shape[0]), "files": files, "sha256": sha}
            manifest = {
                **self.manifest,
                "columns": list(self.columns),
                "shards": [*self.manifest["shards"], shard],
                "n_tokens": self.manifest["n_tokens"] + int(acts.shape[0]),
            }
            _write_manifest(self.path, manifest)
        except Exception:
            for name in files.values():
                with contextlib.suppress(OSError):
                    (self.path / name).unlink(missing_ok=True)
            raise
        self.manifest = manifest

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
            self.manifest["extra"].update(json_normal(extra))
        if self.manifest["columns"] is None:
            self.manifest["columns"] = list(self.columns or [*REQUIRED_COLUMNS])
        self.manifest["stats"] = compute_stats(ActivationStore(self.path, self.manifest))
        self.manifest["complete"] = True
        self.manifest["finished_at"] = now()
        _write_manifest(self.path, self.manifest)
        self.close()
        return ActivationStore.open(self.path)

    def discard(self) -> None:
        """Remove a store this writer holds no committed shard of (its manifest, temp files, lock file, and the folder
        when that leaves it empty): what a job that created the store and then failed leaves behind, nothing."""
        if self.manifest["shards"]:
            raise StoreError(f"{str(self.path)!r} holds committed shards; close() the writer to keep them resumable")
        (self.path / MANIFEST_NAME).unlink(missing_ok=True)
        self._cleanup(set())
        if self._lock_fd is not None:  # removed while still held, so no other writer can take the old lock file
            (self.path / LOCK_NAME).unlink(missing_ok=True)
        self.close()
        with contextlib.suppress(OSError):
            self.path.rmdir()  # only if nothing else is in it

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
        with contextlib.suppress(Exception):
            self._release_lock()

    def __repr__(self) -> str:
        return (
            f"StoreWriter({str(self.path)!r}, model={self.model!r}, site={self.site!r}, "
            f"dtype={self.dtype_name}, tokens_done={self.tokens_done}, buffered={self._n_pending})"
        )
