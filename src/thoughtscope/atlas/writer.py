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

from ..models import Site
from . import schema as adb
from .geometry import logit_effects, nearest_features
from .stats import FeatureStats

if TYPE_CHECKING:
    from .build import AtlasConfig


def write_db(
    lm,
    sae,
    stats: FeatureStats,
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
    t = stats.t
    m = stats.m
    T = cfg.ctx_len
    contexts = torch.cat(stats.contexts) if stats.contexts else torch.zeros(0, T, dtype=torch.int32)
    count = t["count"]
    density = count.double() / max(1, stats.tokens)
    mean = t["sum"] / count.clamp_min(1)
    pos_i, pos_v, neg_i, neg_v = logit_effects(lm, sae.W_dec, cfg.n_logits)
    nb_i, nb_v = nearest_features(sae.W_dec, cfg.n_neighbours)

    def pairs_json(idx: torch.Tensor, val: torch.Tensor) -> list[str]:
        return [
            json.dumps([[a, round(v, 5)] for a, v in zip(ri, rv)]) for ri, rv in zip(idx.tolist(), val.float().tolist())
        ]

    hist = t["hist"].numpy().astype(np.int32)
    feature_rows = list(
        zip(
            range(m),
            count.tolist(),
            density.tolist(),
            t["max"].tolist(),
            mean.tolist(),
            [h.tobytes() for h in hist],
            pairs_json(pos_i, pos_v),
            pairs_json(neg_i, neg_v),
            pairs_json(nb_i, nb_v),
        )
    )

    # top examples: the buffer is unsorted; sort by activation, ties by location (deterministic)
    tv, tl = t["top_val"].numpy(), t["top_loc"].numpy()
    valid = np.isfinite(tv) & (tl >= 0)
    order = np.lexsort((tl, -np.where(valid, tv, -np.inf)), axis=1)
    n_top = valid.sum(1)
    top = _ranked(order, n_top)
    # reservoir: sorted by activation (ties by location), cut into rank-quantile bins, weakest first
    rk, rv, rl = t["res_key"].numpy(), t["res_val"].numpy(), t["res_loc"].numpy()
    rvalid = np.isfinite(rk) & (rl >= 0)
    order = np.lexsort((rl, np.where(rvalid, rv, np.inf)), axis=1)
    n_res = rvalid.sum(1)
    res = _ranked(order, n_res)

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
    ex_f, ex_kind, ex_rank, ex_bin, ex_ctx, ex_pos, ex_act, ex_win = (c[o] for c in cols)
    kinds = ("quantile", "top")
    ex_rows = zip(
        ex_f.tolist(),
        [kinds[k] for k in ex_kind.tolist()],
        ex_rank.tolist(),
        ex_bin.tolist(),
        ex_ctx.tolist(),
        ex_pos.tolist(),
        ex_act.tolist(),
        [w.tobytes() for w in ex_win],
    )
    random_ctx = list(range(0, contexts.shape[0], random_stride))
    referenced = np.unique(np.concatenate([ex_ctx, np.asarray(random_ctx, dtype=np.int64)]))

    final = adb.db_path(out)
    tmp = final.with_name("atlas.partial.sqlite")
    for p in (tmp, Path(str(tmp) + "-wal"), Path(str(tmp) + "-shm")):
        p.unlink(missing_ok=True)
    con = adb.connect(tmp, create=True)
    try:
        # the partial file is thrown away on any failure and renamed into place only once complete, so it
        # needs no journal; it is synced to disk before the rename
        con.execute("PRAGMA journal_mode=OFF")
        con.execute("PRAGMA synchronous=OFF")
        with con:
            adb.insert_many(
                con,
                "features",
                ["id", "n_active", "density", "max_act", "mean_act", "hist", "logits_pos", "logits_neg", "neighbours"],
                feature_rows,
            )
            adb.insert_many(con, "examples", ["feature", "kind", "rank", "bin", "ctx", "pos", "act", "window"], ex_rows)
            if stats.rand_sparse:
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
            ctx_np = contexts.numpy()
            adb.insert_many(con, "contexts", ["id", "tokens"], ((c, ctx_np[c].tobytes()) for c in referenced.tolist()))
            alive = int((count > 0).sum())
            adb.write_meta(
                con,
                {
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
                    "n_features": m,
                    "n_tokens": stats.tokens,
                    "n_contexts": int(contexts.shape[0]),
                    "ctx_len": T,
                    "window_left": cfg.window_left,
                    "window_right": cfg.window_right,
                    "hist_edges": cfg.hist_edges().tolist(),
                    "random_contexts": random_ctx,
                    "n_alive": alive,
                    "n_dead": m - alive,
                },
            )
    finally:
        con.close()
    # leave the file in rollback-journal mode with nothing pending, on disk, before the atomic rename
    c2 = sqlite3.connect(str(tmp))
    c2.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c2.execute("PRAGMA journal_mode=DELETE")
    c2.close()
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    for p in (Path(str(final) + "-wal"), Path(str(final) + "-shm")):
        p.unlink(missing_ok=True)
    os.replace(tmp, final)
    return final


def _ranked(order: np.ndarray, n_valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(feature, rank, buffer slot) of the first n_valid[f] entries of each row of a per-row sort order."""
    rank = np.arange(order.shape[1])[None, :]
    f, r = np.nonzero(rank < n_valid[:, None])
    return f, r, order[f, r]
