"""Build a feature atlas in one streaming pass: model (early exit) -> SAE encode -> running statistics.

Memory is bounded by the number of features, never by the number of tokens (apart from the context
token ids, 4 bytes a token). Per feature we keep:

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

Position 0 (the attention sink) is excluded when the SAE says so (`cfg.exclude_bos`, the default).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sqlite3
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models import LoadedModel, Site, capture
from ..progress import ProgressBar
from . import db as adb
from .db import AtlasError

CKPT_NAME = "build.ckpt"
WIN_DTYPE = torch.float16  # activation windows: the precision the database stores them in


@dataclass
class AtlasConfig:
    """How much to read and how much to keep per feature."""

    n_tokens: int = 1_000_000
    ctx_len: int = 128
    batch_size: int = 16
    top_k: int = 20                 # top activating contexts per feature
    n_bins: int = 10                # rank-quantile bins of the reservoir sample
    per_bin: int = 5                # contexts per bin
    window_left: int = 16           # activations stored before the peak token
    window_right: int = 8           # ... and after it
    hist_lo: float = 1e-4           # histogram: log10-spaced bins from hist_lo to hist_hi (clamped at both ends)
    hist_hi: float = 1e4
    hist_per_decade: int = 8
    n_random_contexts: int = 256    # fixed sample of contexts whose sparse activations are all kept
    n_logits: int = 10
    n_neighbours: int = 10
    exclude_bos: bool | None = None  # None: follow the SAE config
    add_bos: bool = True
    seed: int = 0
    checkpoint_every: int = 20      # batches between checkpoints
    skip_tokens: int = 0            # start this far into the corpus (e.g. past the text the SAE was trained on),
                                    # as HarvestConfig.skip_tokens: a whole number of batches

    def validate(self) -> None:
        for name in ("n_tokens", "ctx_len", "batch_size", "top_k", "n_bins", "per_bin", "hist_per_decade",
                     "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise AtlasError(f"atlas option {name} must be positive, got {getattr(self, name)}")
        if self.ctx_len < 2:
            raise AtlasError(f"--ctx-len must be at least 2, got {self.ctx_len}")
        if self.skip_tokens < 0 or self.skip_tokens % self.batch_tokens:
            raise AtlasError(f"--skip-tokens must be a non-negative multiple of batch_size × ctx_len = "
                             f"{self.batch_tokens}, got {self.skip_tokens}")
        if not 0 < self.hist_lo < self.hist_hi:
            raise AtlasError(f"histogram range must satisfy 0 < lo < hi, got {self.hist_lo}, {self.hist_hi}")

    @property
    def batch_tokens(self) -> int:
        return self.ctx_len * self.batch_size

    @property
    def reservoir(self) -> int:
        return self.n_bins * self.per_bin

    @property
    def window(self) -> int:
        return self.window_left + 1 + self.window_right

    def hist_edges(self) -> np.ndarray:
        lo, hi = math.log10(self.hist_lo), math.log10(self.hist_hi)
        n = int(round((hi - lo) * self.hist_per_decade))
        return np.logspace(lo, hi, n + 1)


# --------------------------------------------------------------------------- validation


def _norm_name(s: str) -> str:
    return str(s).rstrip("/").split("/")[-1].lower().removesuffix(".gguf")


def check_sae_matches(lm: LoadedModel, sae, site: Site | str | None = None) -> Site:
    """The SAE must have been trained on this model at this site; returns the site to read."""
    cfg = sae.cfg
    if cfg.d_model != lm.d_model:
        raise AtlasError(f"the SAE expects d_model={cfg.d_model} but {lm.name} has d_model={lm.d_model}: "
                         f"it was trained on another model")
    sae_site = Site.parse(cfg.site) if cfg.site else None
    site = Site.parse(site) if site is not None else sae_site
    if site is None:
        raise AtlasError("the SAE config names no site (cfg.site is empty); pass --site explicitly")
    if sae_site is not None and site != sae_site:
        raise AtlasError(f"the SAE was trained at site {sae_site} but the atlas was asked to read {site}; "
                         f"use --site {sae_site} or the SAE trained for {site}")
    lm.check_site(site)
    if cfg.model:
        names = {_norm_name(lm.name), _norm_name(lm.source.get("spec", ""))}
        if _norm_name(cfg.model) not in names and not (cfg.model == "default" and "default" in names):
            raise AtlasError(f"the SAE was trained on model {cfg.model!r} but the atlas was asked to use {lm.name!r}; "
                             f"load {cfg.model!r} (--model) or use an SAE trained on {lm.name}")
    return site


def sae_fingerprint(sae) -> str:
    h = hashlib.sha256()
    for t in (sae.W_dec, sae.enc, sae.b_enc, sae.b_dec):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps(sae.cfg.to_dict(), sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


# --------------------------------------------------------------------------- running statistics


class FeatureStats:
    """The per-feature running state; every update is a fixed number of tensor ops per batch.

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
        self.tokens = 0          # tokens counted (position 0 excluded when configured)
        self.batches = 0         # batches consumed
        self.contexts: list[torch.Tensor] = []   # int32 [B, T] per batch
        self.rand_sparse: list[torch.Tensor] = []  # int64 [n, 3] (ctx, pos, feature) + float32 values
        self.rand_vals: list[torch.Tensor] = []

    # --- one batch
    def update(self, f: torch.Tensor | None, ids: torch.Tensor, ctx0: int, batch_index: int, *,
               rows: torch.Tensor, feats: torch.Tensor, vals: torch.Tensor, random_stride: int) -> None:
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
        cand = cand[torch.argsort((feats[cand] << 31) | (2 ** 31 - 1 - bits), stable=True)]
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

    def _windows_sparse(self, span: int, skey: torch.Tensor, svals: torch.Tensor, rows: torch.Tensor,
                        feats: torch.Tensor, T: int) -> torch.Tensor:
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
            "tensors": self.t, "tokens": self.tokens, "batches": self.batches,
            "contexts": torch.cat(self.contexts) if self.contexts else torch.zeros(0, self.cfg.ctx_len, dtype=torch.int32),
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


# --------------------------------------------------------------------------- encoding


def encode_sparse(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The non-zero activations of x [N, d] as (rows, feature ids, values), row-major.

    A topk SAE never materialises its [N, n_features] code: k (value, index) pairs per row come straight
    from the encoder; other architectures encode densely and keep the non-zeros.
    """
    if hasattr(sae, "encode_sparse") and getattr(sae.cfg, "arch", "") == "topk":
        v, idx = sae.encode_sparse(x)
        return _triples(v, idx)
    f = sae.encode(x)
    rows, feats = (f > 0).nonzero(as_tuple=True)
    return rows, feats, f[rows, feats]


def _triples(v: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mask = v > 0
    rows = torch.arange(v.shape[0], device=v.device)[:, None].expand_as(idx)[mask]
    return rows, idx[mask], v[mask]


class SparseEncoder:
    """encode_sparse for a stream of equal-sized batches.

    For the plain topk SAE on CPU the pre-activations go into one reused [N, n_features] buffer
    (`addmm(..., out=)`: the same kernel F.linear calls, bit-identical): a fresh 75 MB tensor per batch
    (default SAE, 2048 tokens) costs page faults and zeroing, about a quarter of the encode time.
    Any other SAE goes through `encode_sparse`.
    """

    def __init__(self, sae):
        from ..sae.architectures import SAE as _Base
        from ..sae.architectures import TopKSAE

        self.sae = sae
        cls = type(sae)
        self.fast = (getattr(sae.cfg, "arch", "") == "topk" and getattr(cls, "encode_sparse", None) is TopKSAE.encode_sparse
                     and cls.pre_acts is _Base.pre_acts and sae.W_dec.device.type == "cpu")
        self.buf: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sae = self.sae
        if not self.fast or x.device.type != "cpu" or x.dtype != sae.enc.dtype:
            return encode_sparse(sae, x)
        shape = (x.shape[0], sae.cfg.n_features)
        if self.buf is None or self.buf.shape != shape:
            self.buf = torch.empty(shape, dtype=x.dtype)
        torch.addmm(sae.b_enc, x - sae.b_dec, sae.enc.t(), out=self.buf)
        v, idx = self.buf.topk(sae.cfg.k, dim=-1, sorted=False)
        return _triples(torch.relu(v), idx)


# --------------------------------------------------------------------------- logit effects and neighbours


def norm_scale(final_norm) -> torch.Tensor | None:
    """The per-dimension scale the final norm applies (Gemma-style norms scale by 1 + weight)."""
    if final_norm is None:
        return None
    w = getattr(final_norm, "weight", None)
    if w is None:
        return None
    w = w.detach().float()
    if "gemma" in type(final_norm).__name__.lower():
        w = 1.0 + w
    return w


@torch.no_grad()
def logit_effects(lm: LoadedModel, W_dec: torch.Tensor, k: int = 10, chunk: int = 512):
    """Top-k positive and negative direct logit effects of each decoder row (through the norm's scale)."""
    U = lm.unembed.weight.detach().float().cpu()  # [V, d]
    g = norm_scale(lm.final_norm)
    W = W_dec.detach().float().cpu()
    if g is not None:
        W = W * g.cpu()
    pos_v, pos_i, neg_v, neg_i = [], [], [], []
    k = min(k, U.shape[0])
    for s in range(0, W.shape[0], chunk):
        L = W[s:s + chunk] @ U.T
        v, i = L.topk(k, dim=1)
        pos_v.append(v), pos_i.append(i)
        v, i = L.topk(k, dim=1, largest=False)
        neg_v.append(v), neg_i.append(i)
    return torch.cat(pos_i), torch.cat(pos_v), torch.cat(neg_i), torch.cat(neg_v)


@torch.no_grad()
def nearest_features(W_dec: torch.Tensor, k: int = 10, chunk: int = 1024):
    """k nearest other features by decoder cosine similarity (chunked so memory stays chunk × n_features)."""
    W = W_dec.detach().float().cpu()
    Wn = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    m = Wn.shape[0]
    k = min(k, m - 1)
    idx, val = [], []
    for s in range(0, m, chunk):
        S = Wn[s:s + chunk] @ Wn.T
        r = torch.arange(S.shape[0])
        S[r, r + s] = -math.inf
        v, i = S.topk(k, dim=1)
        idx.append(i), val.append(v)
    return torch.cat(idx), torch.cat(val)


# --------------------------------------------------------------------------- the build


@contextlib.contextmanager
def _single_thread():
    """The bookkeeping is many small memory-bound ops: on a shared CPU one thread runs them 5-20x faster than a
    contended OpenMP pool (measured on 2 busy cores), while the forward pass and the encoder GEMM keep all threads."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def build_atlas(lm: LoadedModel, sae, corpus, out: str | os.PathLike, config: AtlasConfig | None = None, *,
                site: Site | str | None = None, sae_path: str | None = None, progress: bool = True,
                stop_after_batches: int | None = None, timings: dict | None = None) -> Path:
    """Stream `config.n_tokens` tokens of `corpus` through the model and the SAE and write `out/atlas.sqlite`.

    Resumable: a checkpoint (`out/build.ckpt`) of the running statistics is written atomically every
    `checkpoint_every` batches; rerunning with the same arguments continues from it and produces the same
    atlas as an uninterrupted run. `stop_after_batches` interrupts on purpose (tests, time-boxed runs) and
    returns the checkpoint path instead of the database. `timings`, if given, receives the seconds spent
    streaming (`stream_s`; `stream_cpu_s` in process CPU time; split into `setup_s`, `forward_s`, `encode_s`, `update_s`, `checkpoint_s`) and
    writing the database (`finalize_s`: logit effects, neighbours, SQLite).
    """
    t_start, c_start = time.perf_counter(), time.process_time()
    cfg = config or AtlasConfig()
    cfg.validate()
    site = check_sae_matches(lm, sae, site)
    if cfg.ctx_len > lm.max_context:
        raise AtlasError(f"--ctx-len {cfg.ctx_len} exceeds {lm.name}'s context window of {lm.max_context} tokens")
    exclude_bos = sae.cfg.exclude_bos if cfg.exclude_bos is None else cfg.exclude_bos
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sae = sae.to(lm.device).eval()
    m = sae.cfg.n_features
    T = cfg.ctx_len
    n_contexts = math.ceil(cfg.n_tokens / T)
    random_stride = max(1, n_contexts // max(1, cfg.n_random_contexts))
    ident = {"model": lm.name, "site": str(site), "sae_fingerprint": sae_fingerprint(sae),
             "corpus": getattr(corpus, "spec", str(corpus)), "config": asdict(cfg), "exclude_bos": exclude_bos}

    stats = FeatureStats(m, cfg)
    encoder = SparseEncoder(sae)
    ckpt = out / CKPT_NAME
    if ckpt.is_file():
        try:
            saved = torch.load(ckpt, weights_only=False)
        except Exception as e:  # a torn or foreign file: say so rather than silently restarting
            raise AtlasError(f"{ckpt} cannot be read ({type(e).__name__}: {e}); delete it to start the build over") from e
        if saved.get("ident") != ident:
            diff = [k for k in ident if saved.get("ident", {}).get(k) != ident[k]]
            raise AtlasError(f"{ckpt} belongs to a different build (differs in: {', '.join(diff)}); use another "
                             f"--out or delete the checkpoint")
        stats.load_state_dict(saved["stats"])

    phase = dict.fromkeys(("setup_s", "forward_s", "encode_s", "update_s", "checkpoint_s"), 0.0)
    phase["setup_s"] = time.perf_counter() - t_start

    def checkpoint() -> None:
        t0 = time.perf_counter()
        _atomic_save({"ident": ident, "stats": stats.state_dict()}, ckpt)
        stats.contexts = [torch.cat(stats.contexts)] if stats.contexts else []
        phase["checkpoint_s"] += time.perf_counter() - t0

    bar = ProgressBar(f"atlas {site} × {m} features", n_contexts * T, start=stats.batches * cfg.batch_size * T,
                      unit="tok", enabled=progress)
    ctx_done = sum(c.shape[0] for c in stats.contexts)
    stopped = False
    try:
        it = corpus.batches(lm.tokenizer, T, cfg.batch_size, add_bos=cfg.add_bos)
        skip_batches = cfg.skip_tokens // cfg.batch_tokens
        for b, batch in enumerate(it, start=-skip_batches):  # b counts from the first batch read (0)
            if b < 0:
                continue
            if ctx_done >= n_contexts:
                break
            if b < stats.batches:
                continue
            if stop_after_batches is not None and b >= stop_after_batches:
                stopped = True
                break
            ids = batch.input_ids[: n_contexts - ctx_done]
            Bn = ids.shape[0]
            t0 = time.perf_counter()
            acts = capture(lm, [site], ids.to(lm.device), early_exit=True)[site]
            t1 = time.perf_counter()
            x = acts.reshape(Bn * T, -1).to(sae.W_dec.dtype)
            rows, feats, vals = encoder(x)
            rows, feats, vals = rows.cpu(), feats.cpu(), vals.float().cpu()
            if exclude_bos:
                keep = rows % T != 0
                rows, feats, vals = rows[keep], feats[keep], vals[keep]
            t2 = time.perf_counter()
            with _single_thread():
                stats.update(None, ids, ctx_done, b, rows=rows, feats=feats, vals=vals, random_stride=random_stride)
            phase["forward_s"] += t1 - t0
            phase["encode_s"] += t2 - t1
            phase["update_s"] += time.perf_counter() - t2
            stats.tokens += Bn * (T - 1 if exclude_bos else T)
            ctx_done += Bn
            bar.update(ctx_done * T)
            if stats.batches % cfg.checkpoint_every == 0:
                checkpoint()
    finally:
        bar.close()
    checkpoint()
    if timings is not None:
        timings["stream_s"] = time.perf_counter() - t_start
        timings["stream_cpu_s"] = time.process_time() - c_start
        timings.update(phase)
    if stopped:
        return ckpt
    if ctx_done < n_contexts:
        bar.note(f"the corpus ran out after {ctx_done * T} tokens (asked for {cfg.n_tokens})")
    t_fin = time.perf_counter()
    path = _write_db(lm, sae, stats, cfg, out, ident, site, sae_path, corpus, random_stride, progress)
    ckpt.unlink(missing_ok=True)
    if timings is not None:
        timings["finalize_s"] = time.perf_counter() - t_fin
    return path


def _write_db(lm, sae, stats: FeatureStats, cfg: AtlasConfig, out: Path, ident: dict, site: Site,
              sae_path: str | None, corpus, random_stride: int, progress: bool) -> Path:
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
        return [json.dumps([[a, round(v, 5)] for a, v in zip(ri, rv)])
                for ri, rv in zip(idx.tolist(), val.float().tolist())]

    hist = t["hist"].numpy().astype(np.int32)
    feature_rows = list(zip(range(m), count.tolist(), density.tolist(), t["max"].tolist(), mean.tolist(),
                            [h.tobytes() for h in hist], pairs_json(pos_i, pos_v), pairs_json(neg_i, neg_v),
                            pairs_json(nb_i, nb_v)))

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
    cols = [np.concatenate(c) for c in zip(
        example_cols(res, 0, rv, rl, t["res_win"].numpy(), qbins),
        example_cols(top, 1, tv, tl, t["top_win"].numpy(), np.full(len(top[0]), -1)))]
    # primary-key order (feature, kind, rank), 'quantile' < 'top': SQLite then only appends
    o = np.lexsort((cols[2], cols[1], cols[0]))
    ex_f, ex_kind, ex_rank, ex_bin, ex_ctx, ex_pos, ex_act, ex_win = (c[o] for c in cols)
    kinds = ("quantile", "top")
    ex_rows = zip(ex_f.tolist(), [kinds[k] for k in ex_kind.tolist()], ex_rank.tolist(), ex_bin.tolist(),
                  ex_ctx.tolist(), ex_pos.tolist(), ex_act.tolist(), [w.tobytes() for w in ex_win])
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
            adb.insert_many(con, "features", ["id", "n_active", "density", "max_act", "mean_act", "hist", "logits_pos",
                                              "logits_neg", "neighbours"], feature_rows)
            adb.insert_many(con, "examples", ["feature", "kind", "rank", "bin", "ctx", "pos", "act", "window"],
                            ex_rows)
            if stats.rand_sparse:
                # grouped by feature (stable, so each feature's rows keep their order): the index only appends
                rs, rvals = torch.cat(stats.rand_sparse), torch.cat(stats.rand_vals)
                o = torch.argsort(rs[:, 2], stable=True)
                rs, rvals = rs[o], rvals[o]
                adb.insert_many(con, "random_acts", ["ctx", "pos", "feature", "act"],
                                zip(rs[:, 0].tolist(), rs[:, 1].tolist(), rs[:, 2].tolist(), rvals.tolist()))
            ctx_np = contexts.numpy()
            adb.insert_many(con, "contexts", ["id", "tokens"], ((c, ctx_np[c].tobytes()) for c in referenced.tolist()))
            alive = int((count > 0).sum())
            adb.write_meta(con, {
                "schema_version": adb.SCHEMA_VERSION, "complete": True, "created": time.time(),
                "model": lm.name, "model_source": lm.source, "site": str(site), "sae_path": sae_path,
                "sae_config": sae.cfg.to_dict(), "sae_fingerprint": ident["sae_fingerprint"],
                "corpus": corpus.describe() if hasattr(corpus, "describe") else str(corpus),
                "config": asdict(cfg), "exclude_bos": ident["exclude_bos"], "n_features": m,
                "n_tokens": stats.tokens, "n_contexts": int(contexts.shape[0]), "ctx_len": T,
                "window_left": cfg.window_left, "window_right": cfg.window_right,
                "hist_edges": cfg.hist_edges().tolist(), "random_contexts": random_ctx,
                "n_alive": alive, "n_dead": m - alive,
            })
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


def atlas_config_from(**kw) -> AtlasConfig:
    """AtlasConfig from CLI keyword arguments, ignoring the ones left as None."""
    names = {f.name for f in fields(AtlasConfig)}
    return AtlasConfig(**{k: v for k, v in kw.items() if k in names and v is not None})
