"""The running per-feature statistics of an atlas build; every update is a fixed number of tensor ops per batch.

Per feature we keep:

* count, sum, max and a histogram over fixed log-spaced bins (so no pass is needed to find the range);
* the top-k activations with their location and the activation window around them;
* a uniform reservoir sample of its non-zero activations, also with windows.

Both the top-k and the reservoir are [n_features, k] buffers merged with each batch by one
`torch.topk` over the concatenation of the buffer and the batch's per-feature candidates (found with
a segmented sort, no Python loop over features). The reservoir uses random keys: keeping the k largest
of i.i.d. uniform keys is a uniform sample without replacement, and merging "largest keys" is the
same operation as merging "largest activations". At the end the reservoir is sorted by activation
and cut into rank-quantile bins (10 × 5 by default): that is how weak activations get shown too.
We chose this over equal-width bins of a running maximum because those bins move as the maximum
grows, which would bias every sample taken before the maximum settled; and over a second pass,
which would double the cost. Keys come from a generator seeded by (seed, batch index), so a resumed
build draws exactly the keys an uninterrupted one would.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from ..plans import AtlasConfig

WIN_DTYPE = torch.float16  # activation windows: the precision the database stores them in


class RunningFeatureStats:
    """An atlas build's per-feature running state; every update is a fixed number of tensor ops per batch.
    (Not the maxima stored with an SAE: that is `sae.stats.FeatureStats`.)

    The update works on the batch's non-zero (row, feature, value) triples only: a topk SAE has k of them
    per token, so nothing of size tokens × n_features is ever built. Windows are read from the same
    triples, sorted by (feature, row), with two binary searches per entering candidate.
    """

    def __init__(self, n_features: int, cfg: AtlasConfig):
        m, K, R, W = n_features, cfg.top_k, cfg.reservoir, cfg.window
        self.cfg = cfg
        self.m = m
        self.edges_log = torch.tensor(np.log10(cfg.hist_edges()), dtype=torch.float32)
        self.n_hist = len(self.edges_log) - 1
        self.t: dict[str, torch.Tensor] = {
            "count": torch.zeros(m, dtype=torch.int64),
            "sum": torch.zeros(m, dtype=torch.float64),
            "max": torch.zeros(m, dtype=torch.float32),
            "hist": torch.zeros(m, self.n_hist, dtype=torch.int64),
            "top_val": torch.full((m, K), -math.inf),
            "top_loc": torch.full((m, K), -1, dtype=torch.int64),
            # windows are stored in the database as float16, so they are kept as float16 from the start:
            # same bytes in the end, half the memory and checkpoint size
            "top_win": torch.zeros(m, K, W, dtype=WIN_DTYPE),
            "res_key": torch.full((m, R), -math.inf),
            "res_val": torch.zeros(m, R),
            "res_loc": torch.full((m, R), -1, dtype=torch.int64),
            "res_win": torch.zeros(m, R, W, dtype=WIN_DTYPE),
        }
        self.tokens = 0  # tokens counted (position 0 excluded when configured)
        self.batches = 0  # batches consumed
        self.contexts: list[torch.Tensor] = []  # int32 [B, T] per batch
        self.rand_sparse: list[torch.Tensor] = []  # int64 [n, 3] (ctx, pos, feature) + float32 values
        self.rand_vals: list[torch.Tensor] = []

    # --- one batch
    def update(
        self,
        f: torch.Tensor | None,
        ids: torch.Tensor,
        ctx0: int,
        batch_index: int,
        *,
        rows: torch.Tensor,
        feats: torch.Tensor,
        vals: torch.Tensor,
        random_stride: int,
    ) -> None:
        """(rows, feats, vals): the batch's non-zero activations (row = index in the flattened [B*T] batch,
        position 0 already dropped if excluded). `f`, the same activations as a dense [B*T, m] matrix, is
        optional: windows are then gathered from it instead of from the triples (a slower reference path)."""
        cfg, t, m = self.cfg, self.t, self.m
        B, T = ids.shape
        # counts, sums, max, histogram
        t["count"] += torch.bincount(feats, minlength=m)
        t["sum"].index_add_(0, feats, vals.double())
        t["max"].scatter_reduce_(0, feats, vals, "amax")
        b = torch.bucketize(torch.log10(vals.clamp_min(1e-30)), self.edges_log[1:-1])
        t["hist"].view(-1).index_add_(0, feats * self.n_hist + b, torch.ones_like(feats))
        loc = ctx0 * T + rows
        if f is not None:

            def windows(src: torch.Tensor) -> torch.Tensor:
                return self._windows_dense(f, rows[src], feats[src], T)
        else:
            lookup: list = []

            def windows(src: torch.Tensor) -> torch.Tensor:
                if not lookup:  # built once per batch, only when some candidate enters a buffer
                    span = B * T
                    skey, o = torch.sort(feats * span + rows)
                    lookup.extend([span, skey, vals[o]])
                return self._windows_sparse(*lookup, rows[src], feats[src], T)

        # top-k by activation, reservoir by random key
        self._merge("top", windows, feats, vals, vals, loc, cfg.top_k)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + batch_index)
        keys = torch.rand(vals.shape[0], generator=g)
        self._merge("res", windows, feats, keys, vals, loc, cfg.reservoir)
        # fixed random context sample: keep all of its non-zeros
        ctx = ctx0 + torch.div(rows, T, rounding_mode="floor")
        sel = (ctx % random_stride) == 0
        if bool(sel.any()):
            self.rand_sparse.append(torch.stack([ctx[sel], rows[sel] % T, feats[sel]], 1))
            self.rand_vals.append(vals[sel].clone())
        self.contexts.append(ids.to(torch.int32).cpu())
        self.batches += 1

    def _merge(self, name: str, windows, feats, score, vals, loc, K: int) -> None:
        t = self.t
        key_name = "top_val" if name == "top" else "res_key"
        buf_score = t[key_name]
        # only candidates above their feature's current minimum can enter; once the buffers fill up that
        # is a small share of the batch, so the sort below runs on few elements
        cand = (score > buf_score.min(1).values[feats]).nonzero().squeeze(1)
        if cand.numel() == 0:
            return
        # group by feature, best score first inside a group: one stable sort on an exact integer key (the bits of
        # a non-negative float32 order like the float), ties keep batch order
        bits = (score[cand].float().clamp_min(0) + 0.0).view(torch.int32).long()
        cand = cand[torch.argsort((feats[cand] << 31) | (2**31 - 1 - bits), stable=True)]
        fs = feats[cand]
        feat_u, inv, cnt = torch.unique_consecutive(fs, return_inverse=True, return_counts=True)
        rank = torch.arange(fs.numel()) - (torch.cumsum(cnt, 0) - cnt)[inv]
        keep = rank < K
        order, inv, rank = cand[keep], inv[keep], rank[keep]
        n = feat_u.numel()
        c_score = torch.full((n, K), -math.inf)
        c_score[inv, rank] = score[order]
        c_idx = torch.full((n, K), -1, dtype=torch.int64)
        c_idx[inv, rank] = torch.arange(order.numel())
        # The buffer is kept unsorted: the K best of (buffer ∪ candidates) are chosen by one topk, and each
        # entering candidate takes the slot of an evicted entry, so only entering windows are ever written.
        _, j = torch.cat([buf_score[feat_u], c_score], 1).topk(K, dim=1)
        chosen = torch.zeros(n, 2 * K, dtype=torch.bool).scatter_(1, j, True)
        # a row frees exactly as many buffer slots as it admits candidates, so the p-th freed slot and the p-th
        # entering candidate of the row-major listings below belong together
        slot = (~chosen[:, :K]).nonzero()[:, 1]
        r, cj = chosen[:, K:].nonzero(as_tuple=True)
        cand = c_idx[r, cj]
        ok = cand >= 0  # padding candidates (-inf) can only displace empty slots; skip them
        r, slot, cj, cand = r[ok], slot[ok], cj[ok], cand[ok]
        fu = feat_u[r]
        src = order[cand]
        names = {"top": ("top_val", "top_loc", "top_win"), "res": ("res_key", "res_loc", "res_win")}[name]
        t[names[0]][fu, slot] = c_score[r, cj]
        t[names[1]][fu, slot] = loc[src]
        t[names[2]][fu, slot] = windows(src).to(WIN_DTYPE)
        if name == "res":
            t["res_val"][fu, slot] = vals[src]

    def _window_offsets(self, rows: torch.Tensor, T: int):
        cfg = self.cfg
        pos = rows % T
        return rows - pos, (pos - cfg.window_left).clamp_min(0), (pos + cfg.window_right).clamp_max(T - 1)

    def _windows_sparse(
        self, span: int, skey: torch.Tensor, svals: torch.Tensor, rows: torch.Tensor, feats: torch.Tensor, T: int
    ) -> torch.Tensor:
        """Activation windows of (row, feature) pairs from the batch's triples sorted by key feature*span + row:
        a window is one key range, found by two binary searches; the few triples inside are scattered."""
        cfg = self.cfg
        n = rows.numel()
        start, lo_p, hi_p = self._window_offsets(rows, T)
        base = feats * span + start
        lo = torch.searchsorted(skey, base + lo_p)
        hi = torch.searchsorted(skey, base + hi_p, right=True)
        cnt = hi - lo
        w = torch.zeros(n, cfg.window)
        total = int(cnt.sum())
        if total:
            owner = torch.repeat_interleave(torch.arange(n), cnt)
            idx = torch.arange(total) - torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt) + lo[owner]
            col = skey[idx] - feats[owner] * span - rows[owner] + cfg.window_left
            w[owner, col] = svals[idx]
        return w

    def _windows_dense(self, f: torch.Tensor, rows: torch.Tensor, feats: torch.Tensor, T: int) -> torch.Tensor:
        cfg = self.cfg
        offs = torch.arange(-cfg.window_left, cfg.window_right + 1)
        pos = (rows % T)[:, None] + offs[None, :]
        valid = (pos >= 0) & (pos < T)
        base = (rows - rows % T)[:, None]
        idx = base + pos.clamp(0, T - 1)
        w = f.reshape(-1).take(idx * f.shape[1] + feats[:, None])  # flat gather: far cheaper than 2-D indexing
        return torch.where(valid, w, torch.zeros_like(w))

    # --- persistence
    def state_dict(self) -> dict[str, Any]:
        return {
            "tensors": self.t,
            "tokens": self.tokens,
            "batches": self.batches,
            "contexts": (
                torch.cat(self.contexts) if self.contexts else torch.zeros(0, self.cfg.ctx_len, dtype=torch.int32)
            ),
            "rand_sparse": torch.cat(self.rand_sparse) if self.rand_sparse else torch.zeros(0, 3, dtype=torch.int64),
            "rand_vals": torch.cat(self.rand_vals) if self.rand_vals else torch.zeros(0),
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.t = s["tensors"]
        for k in ("top_win", "res_win"):  # checkpoints from before windows were kept as float16
            self.t[k] = self.t[k].to(WIN_DTYPE)
        self.tokens, self.batches = int(s["tokens"]), int(s["batches"])
        self.contexts = [s["contexts"]] if len(s["contexts"]) else []
        self.rand_sparse = [s["rand_sparse"]] if len(s["rand_sparse"]) else []
        self.rand_vals = [s["rand_vals"]] if len(s["rand_vals"]) else []
