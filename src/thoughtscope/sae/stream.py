"""The batches a trainer reads: from a store, a callable or an iterable, resumable by skipping; bad rows named.

Data position is "batches consumed": a resumed run rebuilds the (deterministic) stream and skips that many
batches, so a killed-and-resumed run on CPU gives bit-identical weights to an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from .config import SAEConfig, SAEError, TrainConfig


def make_stream(source: Any, tc: TrainConfig, cfg0: SAEConfig, skip: int) -> Iterator[tuple[torch.Tensor, Any]]:
    """Yield (batch, meta-or-None) from an ActivationStore, a callable(start_batch) or a re-iterable."""
    if hasattr(source, "batches") and hasattr(source, "d_model"):
        if source.d_model != cfg0.d_model:
            raise SAEError(
                f"store {getattr(source, 'path', '')} has d_model={source.d_model} "
                f"but the SAE expects d_model={cfg0.d_model}"
            )
        it = source.batches(
            tc.batch_size,
            shuffle=True,
            seed=tc.shuffle_seed,
            epochs=tc.epochs,
            drop_last=True,
            exclude_bos=cfg0.exclude_bos,
            max_norm_ratio=cfg0.max_norm_ratio,
            with_meta=True,
        )
        it = ((b[0], b[1]) if isinstance(b, tuple) else (b, None) for b in it)
        return islice(it, skip, None)
    if callable(source):
        return ((b, None) for b in source(skip))
    return ((b, None) for b in islice(iter(source), skip, None))


def stack_pair(b: Any, d_model: int) -> torch.Tensor:
    """A paired batch as one [B, 2, d] tensor (input rows, target rows): given so, or as an (x, y) pair of [B, d]
    tensors of the same shape; else SAEError saying what differs."""
    if isinstance(b, torch.Tensor):
        return b
    if not (isinstance(b, (tuple, list)) and len(b) == 2 and all(isinstance(t, torch.Tensor) for t in b)):
        raise SAEError(
            f"a transcoder's batch must be a [B, 2, {d_model}] tensor or an (x, y) pair, got {type(b).__name__}"
        )
    x, y = b
    if x.shape != y.shape:
        raise SAEError(
            f"input rows {tuple(x.shape)} and target rows {tuple(y.shape)} differ in shape: a transcoder maps each "
            f"token's {d_model}-wide input to its {d_model}-wide target"
        )
    return torch.stack([x, y], 1)


def chain(first: list, rest: Iterator) -> Iterator:
    yield from first
    yield from rest


def check_batch(x: torch.Tensor, meta: Any, batch_no: int, d_model: int, source: Any = None) -> None:
    """A [B, d_model] batch of finite values, else SAEError naming the batch (and the store row when known)."""
    if x.dim() != 2 or x.shape[1] != d_model:
        raise SAEError(f"batch {batch_no} has shape {tuple(x.shape)}; expected [B, {d_model}]")
    if not bool(torch.isfinite(x).all()):
        raise SAEError(_describe_bad_row(batch_no, x, meta, source))


def _describe_bad_row(batch_no: int, x: torch.Tensor, meta: Any, source: Any = None) -> str:
    bad = (~torch.isfinite(x)).any(-1).nonzero().flatten()
    msg = f"batch {batch_no} contains NaN/Inf in {len(bad)} row(s) (first row {int(bad[0])} of the batch)"
    if isinstance(meta, dict) and len(bad):
        r = int(bad[0])
        info = {k: int(v[r]) for k, v in meta.items() if isinstance(v, torch.Tensor) and v.dim() == 1 and len(v) > r}
        if info:
            msg += "; source row " + ", ".join(f"{k}={v}" for k, v in info.items())
            msg += _locate_in_store(source, info)
    return msg


def _locate_in_store(store: Any, info: dict[str, int]) -> str:
    """' in shard i (row j, file ...)' for a shuffled row of an ActivationStore, found by its meta (error path only:
    shuffled batches do not carry shard positions, so the shards' meta columns are scanned)."""
    if not (hasattr(store, "shard") and hasattr(store, "n_shards")) or not {"doc_id", "position"} <= info.keys():
        return ""
    for i in range(store.n_shards):
        acts, meta = store.shard(i)
        hit = (meta["doc_id"] == info["doc_id"]) & (meta["position"] == info["position"])
        if "token_id" in info and "token_id" in meta:
            hit &= meta["token_id"] == info["token_id"]
        for j in hit.nonzero().flatten().tolist():
            if not bool(torch.isfinite(acts[j].float()).all()):
                fname = store.manifest["shards"][i]["files"]["acts"] if hasattr(store, "manifest") else "?"
                return f" in shard {i} (row {j} of {Path(getattr(store, 'path', '.')) / fname})"
    return ""
