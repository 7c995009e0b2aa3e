"""The read side of an activation store: memory-mapped shards, ordered slices, shuffled batches and norm stats.

Why plain ``.npy`` files: they memory-map with numpy, so reading a shard costs no copy and training streams
from the page cache; a foreign tool can read them without this package.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .._io import sha256_file
from ..dtypes import torch_dtype
from .format import (
    MANIFEST_NAME,
    REQUIRED_COLUMNS,
    StoreCorruptError,
    StoreError,
    check_npy,
    col_torch_dtype,
    from_store_numpy,
    read_manifest,
    shard_files,
)
from .shuffle import ShuffleBuffer

# Above this many tokens the median norm is taken from an evenly strided sample.
_MEDIAN_SAMPLE_MAX = 1 << 22
_STATS_CHUNK = 16384
# Rows read from a shard at a time while streaming (the unit the shuffled read order permutes).
_READ_CHUNK = 65536


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
        self.dtype: torch.dtype = torch_dtype(self.dtype_name)
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
        manifest = read_manifest(path)
        store = cls(path, manifest)
        store.verify(checksums=verify_checksums)
        return store

    # -- validation

    def _shard_files(self, i: int):
        return shard_files(self.path, self.manifest, i)

    def verify(self, checksums: bool = True) -> None:
        """Check every shard file's header and size; with ``checksums`` also its sha256 (reads all data)."""
        for i in range(self.n_shards):
            for _col, fpath, shape, dt, digest in self._shard_files(i):
                check_npy(fpath, shape, dt)
                if checksums:
                    actual = sha256_file(fpath)
                    if actual != digest:
                        raise StoreCorruptError(
                            f"checksum mismatch for shard file {str(fpath)!r}: manifest says sha256 "
                            f"{digest}, file has {actual}"
                        )

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
            except Exception as e:  # OSError, ValueError, or whatever numpy's header parse raised
                raise StoreCorruptError(f"cannot read shard file {str(fpath)!r}: {e}") from e
            if col == "acts":
                acts = from_store_numpy(arr, self.dtype_name)
            else:
                meta[col] = torch.from_numpy(arr)
        return acts, meta

    def iter_shards(self) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """Shards in store order, memory-mapped."""
        for i in range(self.n_shards):
            yield self.shard(i)

    def tokens(
        self, start: int = 0, stop: int | None = None, *, dtype: torch.dtype | None = None, with_meta: bool = False
    ):
        """Rows ``start:stop`` in store order, copied out of the shards (for evaluation)."""
        stop = self.n_tokens if stop is None else stop
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= self.n_tokens):
            raise StoreError(
                f"tokens(start={start!r}, stop={stop!r}) must satisfy 0 <= start <= stop <= {self.n_tokens}"
            )
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
        meta_out = {c: (torch.cat(v) if v else torch.empty(0, dtype=col_torch_dtype(c))) for c, v in mparts.items()}
        return out, meta_out

    # -- statistics

    @property
    def stats(self) -> dict:
        """Manifest stats; computed on the fly (not saved) for an unfinished store."""
        if self._stats is None:
            self._stats = compute_stats(self)
        return self._stats

    @property
    def median_norm(self) -> float | None:
        return self.stats.get("median_l2_norm")  # a manifest's stats may lack it: then there is none

    # -- streaming

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        buffer_tokens: int = 262144,
        epochs: int = 1,
        drop_last: bool = False,
        dtype: torch.dtype = torch.float32,
        exclude_bos: bool = True,
        max_norm_ratio: float | None = None,
        with_meta: bool = False,
    ):
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
                raise StoreError(f"max_norm_ratio needs a median norm but store {str(self.path)!r} has no finite rows")
            threshold = float(max_norm_ratio) * median
        return self._batches(
            int(batch_size),
            shuffle,
            int(seed),
            int(buffer_tokens),
            int(epochs),
            drop_last,
            dtype,
            exclude_bos,
            threshold,
            with_meta,
        )

    def _chunks(
        self, gen: torch.Generator | None, chunk_rows: int, exclude_bos: bool, threshold: float | None, with_meta: bool
    ):
        """Yield filtered (acts, meta) pieces in (optionally permuted) shard/chunk order."""
        order = torch.randperm(self.n_shards, generator=gen).tolist() if gen is not None else range(self.n_shards)
        for i in order:
            acts, meta = self.shard(i)
            n = acts.shape[0]
            starts = list(range(0, n, chunk_rows))
            if gen is not None:
                starts = [starts[j] for j in torch.randperm(len(starts), generator=gen).tolist()]
            for s in starts:
                a = acts[s : s + chunk_rows]
                keep = None
                if exclude_bos:
                    keep = meta["position"][s : s + chunk_rows] != 0
                if threshold is not None:
                    norms = torch.linalg.vector_norm(a.float(), dim=1)
                    # rows with NaN/Inf are kept whatever their norm: downstream checks must see them
                    ok = ~(norms > threshold) | ~torch.isfinite(norms)
                    keep = ok if keep is None else keep & ok
                if keep is not None:
                    idx = keep.nonzero().squeeze(1)
                    a = a[idx]
                    m = {c: meta[c][s : s + chunk_rows][idx] for c in self.columns} if with_meta else None
                else:
                    m = {c: meta[c][s : s + chunk_rows] for c in self.columns} if with_meta else None
                if a.shape[0]:
                    yield a, m

    def _batches(self, bs, shuffle, seed, buffer_tokens, epochs, drop_last, dtype, exclude_bos, threshold, with_meta):
        def out(a, m):
            a = a.to(dtype) if a.dtype != dtype else a.clone()
            return (a, m) if with_meta else a

        if not shuffle:
            for _ in range(epochs):
                pa: list[torch.Tensor] = []
                pm: list[dict] = []
                n = 0
                for a, m in self._chunks(None, _READ_CHUNK, exclude_bos, threshold, with_meta):
                    pa.append(a)
                    pm.append(m)
                    n += a.shape[0]
                    if n >= bs:
                        cat = torch.cat(pa)
                        mcat = {c: torch.cat([x[c] for x in pm]) for c in self.columns} if with_meta else None
                        s = 0
                        while n - s >= bs:
                            meta = {c: v[s : s + bs].clone() for c, v in mcat.items()} if with_meta else None
                            yield out(cat[s : s + bs], meta)
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
        cols = {c: col_torch_dtype(c) for c in self.columns} if with_meta else None
        buf = ShuffleBuffer(buffer_tokens, bs, self.d_model, self.dtype, gen, cols)
        chunk_rows = max(1, min(buf.capacity, _READ_CHUNK))
        for _ in range(epochs):
            for a, m in self._chunks(gen, chunk_rows, exclude_bos, threshold, with_meta):
                for batch, mb in buf.add(a, m):
                    yield out(batch, mb if with_meta else None)
            for batch, mb in buf.drain(drop_last):
                yield out(batch, mb if with_meta else None)

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
            "massive_dims": stats.get("massive_dims"),
            "corpus": self.corpus,
        }

    def massive_summary(self) -> str | None:
        """One line naming the massive dimensions (see `massive_dims`) with their RMS over the median's, or None."""
        stats = self.manifest.get("stats") or {}
        dims, rms = stats.get("massive_dims"), stats.get("rms")
        if not dims or not isinstance(rms, list) or len(rms) != self.d_model:
            return None
        med = float(np.median(rms)) or 1e-30
        shown = ", ".join(f"{i} ({rms[i] / med:.0f}x)" for i in dims[:8])
        return (
            f"massive dimensions (RMS over {MASSIVE_RATIO:g}x the median dimension's): {shown}; where they carry "
            f"over a quarter of the variance, SAE training standardises every dimension (input_scaling auto), and "
            f"FVU over all dimensions mostly measures them"
        )

    def __repr__(self) -> str:
        mib = self.size_bytes() / 2**20
        state = "complete" if self.complete else "INCOMPLETE"
        return (
            f"ActivationStore({str(self.path)!r}: {self.n_tokens:,} tokens in {self.n_shards} shards, "
            f"{self.model} {self.site}, d_model={self.d_model}, {self.dtype_name}, {mib:.1f} MiB, {state})"
        )


def compute_stats(store: ActivationStore) -> dict:
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
    dim_sq = torch.zeros(d, dtype=torch.float64)
    samples: list[np.ndarray] = []
    offset = 0
    for acts, meta in store.iter_shards():
        for s in range(0, acts.shape[0], _STATS_CHUNK):
            x = acts[s : s + _STATS_CHUNK].float()
            pos = meta["position"][s : s + _STATS_CHUNK]
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
            dim_sq += xk.double().square().sum(dim=0)
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
        "rms": (dim_sq / count).sqrt().tolist() if count else None,
        "massive_dims": massive_dims((dim_sq / count).sqrt()) if count else None,
    }


MASSIVE_RATIO = 20.0


def massive_dims(rms: torch.Tensor, ratio: float = MASSIVE_RATIO) -> list[int]:
    """Dimensions whose RMS exceeds `ratio` times the median dimension's RMS, largest first.

    Some models (Gemma 3: one dimension ~100x the rest at middle layers) carry most of the residual stream's
    variance in a few dimensions; an MSE-trained SAE then spends its capacity on them, FVU looks fine, and the
    model breaks when the reconstruction is spliced in. The SAE trainer and the store summary share this rule.
    """
    rms = torch.as_tensor(rms, dtype=torch.float64).flatten()
    if rms.numel() == 0:
        return []
    big = torch.nonzero(rms > ratio * rms.median().clamp_min(1e-30)).flatten()
    return [int(i) for i in big[rms[big].argsort(descending=True)]]
