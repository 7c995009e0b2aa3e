"""The SQL side of an atlas build: the finished running statistics become `atlas.sqlite`, atomically.

The database is written under a partial name with no journal and renamed into place only once complete and
synced, so a crash leaves either no atlas or a whole one.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import AtlasError
from ..models import Site
from . import schema as adb
from .geometry import logit_effects, nearest_features, norm_scale
from .stats import RunningFeatureStats

if TYPE_CHECKING:
    from ..plans import AtlasConfig

FEATURE_COLUMNS = ["id", "n_active", "density", "max_act", "mean_act", "hist", "logits_pos", "logits_neg", "neighbours"]
EXAMPLE_COLUMNS = ["feature", "kind", "rank", "bin", "ctx", "pos", "act", "window"]
EXAMPLE_KINDS = ("quantile", "top")  # stored names of kind 0 and 1; 'quantile' < 'top' in primary-key order


def write_db(
    lm,
    sae,
    stats: RunningFeatureStats,
    cfg: AtlasConfig,
    out: Path,
    ident: dict,
    site: Site,
    sae_path: str | None,
    corpus,
    random_stride: int,
    progress: bool,
) -> Path:
    """Write the database in a few bulk statements: every per-feature array is turned into Python values
    with one .tolist() and the rows go in primary-key order, so the cost is SQLite's, not the loop's."""
    contexts = torch.cat(stats.contexts) if stats.contexts else torch.zeros(0, cfg.ctx_len, dtype=torch.int32)
    feature_rows = _feature_rows(lm, sae, stats, cfg)
    ex_cols = _example_columns(stats, cfg)
    random_ctx = list(range(0, contexts.shape[0], random_stride))
    referenced = np.unique(np.concatenate([ex_cols[4], np.asarray(random_ctx, dtype=np.int64)]))
    meta = _meta(lm, sae, stats, cfg, ident, site, sae_path, corpus, int(contexts.shape[0]), random_ctx)
    final = adb.db_path(out)
    tmp = final.with_name("atlas.partial.sqlite")
    _remove_with_journals(tmp)
    try:
        con = _create(tmp)
        try:
            with con:
                adb.insert_many(con, "features", FEATURE_COLUMNS, feature_rows)
                adb.insert_many(con, "examples", EXAMPLE_COLUMNS, _example_rows(ex_cols))
                _insert_random_acts(con, stats)
                ctx_np = contexts.numpy()
                rows = ((c, ctx_np[c].tobytes()) for c in referenced.tolist())
                adb.insert_many(con, "contexts", ["id", "tokens"], rows)
                adb.write_meta(con, meta)
        finally:
            con.close()
        _move_into_place(tmp, final)
    except BaseException as e:
        _remove_with_journals(tmp)  # a half-written database only takes space (on a full disk, all of it)
        if isinstance(e, (sqlite3.Error, OSError)):
            raise _write_failed(final, tmp, e) from e
        raise
    return final


def _create(tmp: Path) -> sqlite3.Connection:
    """The partial database with the atlas's tables. It is thrown away on any failure and renamed into place only
    once complete, so it needs no journal; it is synced to disk before the rename. (Made here rather than by
    `schema.connect`, which reads any SQLite error as a damaged file: here it can only be a failed write.)"""
    tmp.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(str(tmp), check_same_thread=False)
    try:
        con.execute("PRAGMA journal_mode=OFF")
        con.execute("PRAGMA synchronous=OFF")
        con.executescript(adb.SCHEMA)
        adb._ensure_fts(con)
    except BaseException:
        con.close()
        raise
    return con


def _write_failed(final: Path, tmp: Path, e: BaseException) -> AtlasError:
    """A database SQLite (or the OS) could not write: say which file, why, and that nothing finished was lost."""
    reason = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else str(e)
    if isinstance(e, sqlite3.Error) and getattr(e, "sqlite_errorname", "").startswith(("SQLITE_FULL", "SQLITE_IOERR")):
        reason += ": the disk is full, the file-size limit was reached, or the disk failed"
    kept = "the atlas already there was left as it was" if final.is_file() else "no atlas was written there"
    return AtlasError(
        f"could not write the atlas {final} (building {tmp.name}): {reason}; {kept}, and the build's checkpoint "
        "is kept; free some space and run the same command again"
    )


def _meta(lm, sae, stats, cfg, ident, site, sae_path, corpus, n_contexts: int, random_ctx: list[int]) -> dict:
    """The `meta` table: what was built from what, and what a reader needs to interpret the rows."""
    alive = int((stats.t["count"] > 0).sum())
    return {
        "schema_version": adb.SCHEMA_VERSION,
        "complete": True,
        "created": time.time(),
        "model": lm.name,
        "model_source": lm.source,
        "site": str(site),
        "sae_path": sae_path,
        "sae_config": sae.cfg.to_dict(),
        "sae_fingerprint": ident["sae_fingerprint"],
        "corpus": corpus.describe() if hasattr(corpus, "describe") else str(corpus),
        "config": asdict(cfg),
        "exclude_bos": ident["exclude_bos"],
        "n_features": stats.m,
        "n_tokens": stats.tokens,
        "n_contexts": n_contexts,
        "ctx_len": cfg.ctx_len,
        "window_left": cfg.window_left,
        "window_right": cfg.window_right,
        "hist_edges": cfg.hist_edges().tolist(),
        "random_contexts": random_ctx,
        "n_alive": alive,
        "n_dead": stats.m - alive,
        "logit_unit": LOGIT_UNIT,
        "logit_typical": [float(f"{v:.4g}") for v in typical_logit_change(lm, sae.W_dec).tolist()],
    }


#: what a logit effect divided by the feature's `logit_typical` is measured in (shown beside relative values)
LOGIT_UNIT = "x typical: multiples of the median |logit change| a random direction with the feature's norm makes"


@torch.no_grad()
def typical_logit_change(lm, W_dec: torch.Tensor, n_directions: int = 16, seed: int = 0) -> torch.Tensor:
    """Per feature [n_features]: the median over the vocabulary of the |direct logit change| that a random direction
    with the norm of the feature's decoder row makes (read through the final norm's scale, as `logit_effects`). A
    logit effect divided by it is in multiples of a typical token's change: scale-free, so ±1,000 on a model with a
    large residual scale (Gemma 3) reads like ±10 on one with a small one. Seeded, so two builds agree."""
    gen = torch.Generator().manual_seed(seed)
    R = torch.randn(n_directions, lm.d_model, generator=gen)
    R = R / R.norm(dim=1, keepdim=True)
    g = norm_scale(lm.final_norm)
    if g is not None:
        R = R * g.cpu()
    per_unit = float((R @ lm.unembed.weight.detach().float().cpu().T).abs().median())
    return W_dec.detach().float().cpu().norm(dim=1) * per_unit


def _feature_rows(lm, sae, stats: RunningFeatureStats, cfg: AtlasConfig) -> list[tuple]:
    """One `features` row per feature, in id order: counts, density, max, mean, histogram, logits, neighbours."""
    t = stats.t
    count = t["count"]
    density = count.double() / max(1, stats.tokens)
    mean = t["sum"] / count.clamp_min(1)
    pos_i, pos_v, neg_i, neg_v = logit_effects(lm, sae.W_dec, cfg.n_logits)
    nb_i, nb_v = nearest_features(sae.W_dec, cfg.n_neighbours)
    hist = t["hist"].numpy().astype(np.int32)
    return list(
        zip(
            range(stats.m),
            count.tolist(),
            density.tolist(),
            t["max"].tolist(),
            mean.tolist(),
            [h.tobytes() for h in hist],
            _pairs_json(pos_i, pos_v),
            _pairs_json(neg_i, neg_v),
            _pairs_json(nb_i, nb_v),
        )
    )


def _pairs_json(idx: torch.Tensor, val: torch.Tensor) -> list[str]:
    """Per row, [[id, value], ...] as JSON, values rounded to 5 decimals."""
    return [
        json.dumps([[a, round(v, 5)] for a, v in zip(ri, rv)]) for ri, rv in zip(idx.tolist(), val.float().tolist())
    ]


def _example_columns(stats: RunningFeatureStats, cfg: AtlasConfig) -> list[np.ndarray]:
    """The `examples` table as columns (feature, kind, rank, bin, ctx, pos, act, window) in primary-key order:
    the top buffer sorted by activation, the reservoir cut into rank-quantile bins, weakest first."""
    t, T = stats.t, cfg.ctx_len
    # top examples: the buffer is unsorted; sort by activation, ties by location (deterministic)
    tv, tl = t["top_val"].numpy(), t["top_loc"].numpy()
    valid = np.isfinite(tv) & (tl >= 0)
    top = _ranked(np.lexsort((tl, -np.where(valid, tv, -np.inf)), axis=1), valid.sum(1))
    # reservoir: sorted by activation (ties by location), cut into rank-quantile bins, weakest first
    rk, rv, rl = t["res_key"].numpy(), t["res_val"].numpy(), t["res_loc"].numpy()
    rvalid = np.isfinite(rk) & (rl >= 0)
    n_res = rvalid.sum(1)
    res = _ranked(np.lexsort((rl, np.where(rvalid, rv, np.inf)), axis=1), n_res)

    def example_cols(sel, kind: int, vals, locs, wins, bins):
        f, r, slot = sel
        ctx, pos = np.divmod(locs[f, slot], T)
        return [f, np.full(len(f), kind), r, bins, ctx, pos, vals[f, slot].astype(np.float64), wins[f, slot]]

    f_q, r_q, _ = res
    qbins = np.minimum(cfg.n_bins - 1, r_q * cfg.n_bins // np.maximum(n_res[f_q], 1))
    cols = [
        np.concatenate(c)
        for c in zip(
            example_cols(res, 0, rv, rl, t["res_win"].numpy(), qbins),
            example_cols(top, 1, tv, tl, t["top_win"].numpy(), np.full(len(top[0]), -1)),
        )
    ]
    # primary-key order (feature, kind, rank), 'quantile' < 'top': SQLite then only appends
    o = np.lexsort((cols[2], cols[1], cols[0]))
    return [c[o] for c in cols]


def _example_rows(cols: list[np.ndarray]):
    """The rows of `_example_columns` as Python values, the kind by name and the window as float16 bytes."""
    ex_f, ex_kind, ex_rank, ex_bin, ex_ctx, ex_pos, ex_act, ex_win = cols
    return zip(
        ex_f.tolist(),
        [EXAMPLE_KINDS[k] for k in ex_kind.tolist()],
        ex_rank.tolist(),
        ex_bin.tolist(),
        ex_ctx.tolist(),
        ex_pos.tolist(),
        ex_act.tolist(),
        [w.tobytes() for w in ex_win],
    )


def _insert_random_acts(con: sqlite3.Connection, stats: RunningFeatureStats) -> None:
    """Every non-zero activation of the fixed random context sample."""
    if not stats.rand_sparse:
        return
    # grouped by feature (stable, so each feature's rows keep their order): the index only appends
    rs, rvals = torch.cat(stats.rand_sparse), torch.cat(stats.rand_vals)
    o = torch.argsort(rs[:, 2], stable=True)
    rs, rvals = rs[o], rvals[o]
    adb.insert_many(
        con,
        "random_acts",
        ["ctx", "pos", "feature", "act"],
        zip(rs[:, 0].tolist(), rs[:, 1].tolist(), rs[:, 2].tolist(), rvals.tolist()),
    )


def _remove_with_journals(path: Path) -> None:
    for p in (path, Path(str(path) + "-wal"), Path(str(path) + "-shm")):
        p.unlink(missing_ok=True)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Leave the finished file in rollback-journal mode with nothing pending, on disk, then rename it atomically."""
    c2 = sqlite3.connect(str(tmp))
    c2.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c2.execute("PRAGMA journal_mode=DELETE")
    c2.close()
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    for p in (Path(str(final) + "-wal"), Path(str(final) + "-shm")):
        p.unlink(missing_ok=True)
    os.replace(tmp, final)  # sqlite wrote this file itself (not through a file object _io could hand it): renamed whole


def _ranked(order: np.ndarray, n_valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(feature, rank, buffer slot) of the first n_valid[f] entries of each row of a per-row sort order."""
    rank = np.arange(order.shape[1])[None, :]
    f, r = np.nonzero(rank < n_valid[:, None])
    return f, r, order[f, r]
