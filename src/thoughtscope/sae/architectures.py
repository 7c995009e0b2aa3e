"""SAE architectures: relu-l1, topk, batchtopk, jumprelu over one base class.

Layout: the encoder is stored as ``enc`` [n_features, d_model] (row i = encoder direction of
feature i) because both the sparse backward (CSR matmul into rows) and ``embedding_bag`` want
contiguous per-feature rows. ``W_enc`` ([d_model, n_features], the SAELens layout) is a view.
``W_dec`` is [n_features, d_model]: row i is the decoder direction of feature i.

Every architecture encodes ``pre = (x - b_dec) @ W_enc + b_enc`` (pre-encoder bias); checkpoints
from tools that do not subtract b_dec are converted on import by folding it into b_enc.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ThoughtscopeError

ARCHITECTURES = ("relu-l1", "topk", "batchtopk", "jumprelu")
DEFAULT_DEAD_TOKENS = 10_000_000


class SAEError(ThoughtscopeError, ValueError):
    """Bad SAE configuration, file or input; the message names what was wrong."""


@dataclass
class SAEConfig:
    """Everything needed to rebuild an SAE and to know what it was trained on."""

    arch: str = "topk"
    d_model: int = 576
    n_features: int = 9216
    k: int = 32                      # topk / batchtopk: active latents per token
    l1_coeff: float = 5.0            # relu-l1: lambda of sum_i f_i * ||W_dec,i||
    l1_warmup_frac: float = 0.05     # relu-l1: lambda ramps linearly from 0 over this share of steps
    init_density: float | None = None  # relu-l1: b_enc set so each latent fires on this share of the init sample
    k_aux: int | None = None         # AuxK: dead latents used to model the residual; None = d_model // 2
    aux_coeff: float = 1.0 / 32.0    # AuxK loss coefficient (0 disables AuxK)
    dead_tokens: int | None = None   # a latent is dead after this many tokens without firing; None = rule in train.py
    threshold_beta: float = 0.999    # batchtopk: EMA factor of the inference threshold
    # jumprelu: thresholds and bandwidth are in units of the *normalised* training data (mean ||x|| = sqrt(d)),
    # where a unit-norm feature's activation is O(1); the Gemma Scope values (0.001) assume mean ||x||^2 = 1 and
    # thresholds that far below the data scale barely move in a short run (log-threshold steps are ~lr per step).
    jumprelu_bandwidth: float = 0.5
    jumprelu_init_threshold: float = 0.5
    l0_coeff: float = 1.0            # jumprelu L0 penalty coefficient
    l0_warmup_frac: float = 0.1      # jumprelu: L0 coefficient ramps linearly from 0 over this share of steps
    pre_act_coeff: float = 0.0       # jumprelu: weight of the pre-activation loss sum_i relu(t_i - pre_i)*||W_dec,i||
    l0_penalty: str = "plain"        # jumprelu: "plain" (step function, STE) or "tanh" (tanh(c * f * ||W_dec||))
    tanh_c: float = 4.0
    # provenance / data rules
    model: str = ""
    site: str = ""
    exclude_bos: bool = True         # position 0 (attention sink) excluded from training and metrics
    max_norm_ratio: float | None = None  # rows with norm > ratio * median norm dropped
    normalize: bool = True           # scale inputs so mean ||x|| = sqrt(d_model) during training
    mean_center: bool = False
    norm_scale: float = 1.0          # training-time scale (stats only once folded)
    norm_mean: list[float] | None = None
    norm_folded: bool = True         # True: weights act on raw activations
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise SAEError(f"unknown SAE architecture {self.arch!r}; expected one of {', '.join(ARCHITECTURES)}")
        if self.d_model <= 0 or self.n_features <= 0:
            raise SAEError(f"d_model and n_features must be positive, got {self.d_model}, {self.n_features}")
        if self.arch in ("topk", "batchtopk") and not (0 < self.k <= self.n_features):
            raise SAEError(f"k={self.k} must be in 1..n_features={self.n_features}")
        if self.l0_penalty not in ("plain", "tanh"):
            raise SAEError(f"l0_penalty must be 'plain' or 'tanh', got {self.l0_penalty!r}")

    @property
    def k_aux_eff(self) -> int:
        return min(self.n_features, self.k_aux if self.k_aux is not None else max(1, self.d_model // 2))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        names = {f.name for f in fields(cls)}
        unknown = {k: v for k, v in d.items() if k not in names}
        kw = {k: v for k, v in d.items() if k in names}
        if unknown:
            kw.setdefault("extra", {}).update(unknown)
        return cls(**kw)


class SAEOutput(NamedTuple):
    feature_acts: Tensor   # dense [..., n_features]
    recon: Tensor          # [..., d_model]


# ----------------------------------------------------------------------------- sparse kernels
def _group_by_latent(idx: Tensor, n_features: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pairs of a [B, k] index tensor grouped by latent: (order, rows, offsets) for one embedding_bag per latent.

    ``order`` sorts the flattened pairs by latent (int32 keys sort ~3x faster than int64 on CPU; stable keeps rows
    ascending within a latent, so sums are reproducible), ``rows`` is each sorted pair's row and ``offsets`` where
    each latent's pairs start. One grouping serves the encoder and the decoder backward of a step.
    """
    flat = idx.reshape(-1)
    order = torch.argsort(flat.to(torch.int32) if n_features < 2**31 else flat, stable=True)
    rows = torch.div(order, idx.shape[1], rounding_mode="floor")
    offsets = torch.zeros(n_features, dtype=torch.int64, device=idx.device)
    offsets[1:] = torch.bincount(flat, minlength=n_features).cumsum(0)[:-1]
    return order, rows, offsets


def _sum_by_latent(grouping: tuple[Tensor, Tensor, Tensor], rows_src: Tensor, weights: Tensor) -> Tensor:
    """out[j] = sum over pairs (b, j) of weights[b, pair] * rows_src[b]: the weight gradient of a sparse layer."""
    order, rows, offsets = grouping
    return F.embedding_bag(rows, rows_src, offsets=offsets, per_sample_weights=weights.reshape(-1)[order],
                           mode="sum")


def _gather_dot(idx: Tensor, g: Tensor, W: Tensor) -> Tensor:
    """out[b, j] = <g[b], W[idx[b, j]]> without materialising W[idx] (sampled matmul)."""
    B, k = idx.shape
    if g.device.type == "cpu":
        crow = torch.arange(0, B * k + 1, k, device=idx.device)
        pattern = torch.sparse_csr_tensor(crow, idx.reshape(-1), torch.zeros(B * k, dtype=g.dtype, device=g.device),
                                          (B, W.shape[0]), check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, g, W.t(), beta=0.0).values().view(B, k)
    return torch.bmm(W[idx], g.unsqueeze(-1)).squeeze(-1)


class SparseDecode(torch.autograd.Function):
    """recon = sum_j vals[b,j] * W[idx[b,j]]; forward by embedding_bag, backward by sparse kernels.

    The W gradient is one embedding_bag over the pairs grouped by latent (``grouping`` from _group_by_latent,
    shared with SparseEncode; computed here when None), the value gradient a sampled matmul; both cost follows
    the B * k pairs instead of B * n_features.
    """

    @staticmethod
    def forward(ctx, vals: Tensor, idx: Tensor, W: Tensor, grouping=None) -> Tensor:
        ctx.save_for_backward(vals, idx, W)
        ctx.grouping = grouping
        return F.embedding_bag(idx, W, per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx, g: Tensor):
        vals, idx, W = ctx.saved_tensors
        g = g.contiguous()
        g_vals = _gather_dot(idx, g, W) if ctx.needs_input_grad[0] else None
        g_W = None
        if ctx.needs_input_grad[2]:
            grouping = ctx.grouping if ctx.grouping is not None else _group_by_latent(idx, W.shape[0])
            g_W = _sum_by_latent(grouping, g, vals)
        return g_vals, None, g_W, None


class SparseEncode(torch.autograd.Function):
    """Gradient of pre = x @ E.T + b taken only at the selected (row, latent) pairs.

    Forward returns the selected pre-activations vals[b, j] = pre[b, idx[b, j]] (already computed by the
    dense GEMM + top-k outside); backward avoids the two dense [B, m] x [m, d] GEMMs autograd would do.
    """

    @staticmethod
    def forward(ctx, x: Tensor, E: Tensor, b: Tensor, idx: Tensor, vals: Tensor, grouping=None) -> Tensor:
        ctx.save_for_backward(x, E, idx)
        ctx.m = E.shape[0]
        ctx.grouping = grouping
        return vals

    @staticmethod
    def backward(ctx, g: Tensor):
        x, E, idx = ctx.saved_tensors
        g = g.contiguous()
        g_x = F.embedding_bag(idx, E, per_sample_weights=g, mode="sum") if ctx.needs_input_grad[0] else None
        g_E = None
        if ctx.needs_input_grad[1]:
            grouping = ctx.grouping if ctx.grouping is not None else _group_by_latent(idx, ctx.m)
            g_E = _sum_by_latent(grouping, x.contiguous(), g)
        g_b = None
        if ctx.needs_input_grad[2]:
            g_b = torch.zeros(ctx.m, dtype=g.dtype, device=g.device).index_add_(0, idx.reshape(-1), g.reshape(-1))
        return g_x, g_E, g_b, None, None, None


class RaggedDecode(torch.autograd.Function):
    """recon[b] = sum over the active pairs of row b of vals * W[col]: a variable number of latents per row.

    Pairs come row-major (as from ``nonzero``) with row offsets ``crow``; ``order`` sorts them by latent,
    ``rows_by_col`` / ``ccol`` are the rows in that order and the per-latent offsets. Forward is one
    embedding_bag; backward a sampled matmul for the values and, for W, an embedding_bag over the gradient
    rows grouped by latent (on 2 CPU cores 8-20x faster than the same sum as a CSR matmul), so cost follows
    the number of active pairs instead of B * n_features.
    """

    @staticmethod
    def forward(ctx, vals: Tensor, rows: Tensor, cols: Tensor, crow: Tensor, W: Tensor, order: Tensor,
                rows_by_col: Tensor, ccol: Tensor) -> Tensor:
        ctx.save_for_backward(vals, rows, cols, crow, W, order, rows_by_col, ccol)
        return F.embedding_bag(cols, W, offsets=crow[:-1], per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx, g: Tensor):
        vals, rows, cols, crow, W, order, rows_by_col, ccol = ctx.saved_tensors
        g = g.contiguous()
        g_vals = g_W = None
        if ctx.needs_input_grad[0]:
            if g.device.type == "cpu":
                pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros_like(vals), (g.shape[0], W.shape[0]),
                                                  check_invariants=False)
                g_vals = torch.sparse.sampled_addmm(pattern, g, W.t(), beta=0.0).values()
            else:
                g_vals = (g[rows] * W[cols]).sum(-1)
        if ctx.needs_input_grad[4]:
            g_W = F.embedding_bag(rows_by_col, g, offsets=ccol[:-1], per_sample_weights=vals[order], mode="sum")
        return g_vals, None, None, None, g_W, None, None, None


class RaggedEncode(torch.autograd.Function):
    """Gradient of pre = x @ E.T + b taken only at the active pairs (see RaggedDecode for the index tensors)."""

    @staticmethod
    def forward(ctx, x: Tensor, E: Tensor, b: Tensor, rows: Tensor, cols: Tensor, crow: Tensor, order: Tensor,
                rows_by_col: Tensor, ccol: Tensor, vals: Tensor) -> Tensor:
        ctx.save_for_backward(x, E, cols, crow, order, rows_by_col, ccol)
        return vals

    @staticmethod
    def backward(ctx, g: Tensor):
        x, E, cols, crow, order, rows_by_col, ccol = ctx.saved_tensors
        g = g.contiguous()
        m = E.shape[0]
        g_x = g_E = g_b = None
        if ctx.needs_input_grad[0]:
            g_x = F.embedding_bag(cols, E, offsets=crow[:-1], per_sample_weights=g, mode="sum")
        if ctx.needs_input_grad[1]:
            g_E = F.embedding_bag(rows_by_col, x.contiguous(), offsets=ccol[:-1], per_sample_weights=g[order],
                                  mode="sum")
        if ctx.needs_input_grad[2]:
            g_b = torch.zeros(m, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        return g_x, g_E, g_b, None, None, None, None, None, None, None


class _JumpReLU(torch.autograd.Function):
    """z * H(z - t) with a rectangle-kernel straight-through gradient for the threshold t."""

    @staticmethod
    def forward(ctx, z: Tensor, t: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, t)
        ctx.eps = eps
        return z * (z > t)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, t = ctx.saved_tensors
        eps = ctx.eps
        kern = ((z - t).abs() < eps / 2).to(g.dtype) / eps
        g_t = -(t * kern * g).reshape(-1, t.shape[-1]).sum(0)
        return g * (z > t), g_t, None


class _Step(torch.autograd.Function):
    """H(z - t) with a straight-through gradient for t only (for the L0 penalty)."""

    @staticmethod
    def forward(ctx, z: Tensor, t: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, t)
        ctx.eps = eps
        return (z > t).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, t = ctx.saved_tensors
        kern = ((z - t).abs() < ctx.eps / 2).to(g.dtype) / ctx.eps
        return None, -(kern * g).reshape(-1, t.shape[-1]).sum(0), None


# ----------------------------------------------------------------------------- helpers
@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 200, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances (robust to outliers)."""
    pts = points.double()
    y = pts.mean(0)
    for _ in range(max_iter):
        dist = (pts - y).norm(dim=1).clamp_min(1e-12)
        w = 1.0 / dist
        y_new = (w[:, None] * pts).sum(0) / w.sum()
        if (y_new - y).norm() <= tol * max(1.0, float(y.norm())):
            y = y_new
            break
        y = y_new
    return y.to(points.dtype)


class StepOutput(NamedTuple):
    loss: Tensor
    recon: Tensor
    fired: Tensor        # bool [n_features]: fired anywhere in this batch
    l0: Tensor           # mean active latents per token (detached)
    aux: Tensor          # aux loss (detached) or 0


# ----------------------------------------------------------------------------- base
class SAE(nn.Module):
    """Base class. encode(x) -> f, decode(f) -> x_hat, forward(x) -> SAEOutput(f, x_hat)."""

    arch = ""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        m, d = cfg.n_features, cfg.d_model
        self.enc = nn.Parameter(torch.zeros(m, d))
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.W_dec = nn.Parameter(torch.zeros(m, d))
        self.b_dec = nn.Parameter(torch.zeros(d))

    # -- construction
    @staticmethod
    def from_config(cfg: SAEConfig, *, seed: int | None = 0) -> SAE:
        cls = SAE_CLASSES[cfg.arch]
        sae = cls(cfg)
        if seed is not None:
            sae.init_weights(torch.Generator().manual_seed(seed))
        return sae

    @torch.no_grad()
    def init_weights(self, gen: torch.Generator) -> None:
        """Random unit decoder rows and W_enc = W_dec^T (tied init)."""
        w = torch.randn(self.W_dec.shape, generator=gen)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        self.enc.copy_(w)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @property
    def W_enc(self) -> Tensor:
        return self.enc.t()

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    # -- inference
    def pre_acts(self, x: Tensor) -> Tensor:
        return F.linear(x - self.b_dec, self.enc, self.b_enc)

    def activation(self, pre: Tensor) -> Tensor:
        return F.relu(pre)

    def encode(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return self.activation(self.pre_acts(x))

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> SAEOutput:
        f = self.encode(x)
        return SAEOutput(f, self.decode(f))

    def _check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.cfg.d_model:
            raise SAEError(f"input has last dimension {x.shape[-1]} but the SAE expects d_model={self.cfg.d_model}")

    # -- training hooks (per architecture)
    def training_step(self, x: Tensor, *, progress: float, dead_mask: Tensor | None, aux_scale: Tensor | None) -> StepOutput:
        raise NotImplementedError

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Hook between backward and optimizer.step (unit-norm architectures project gradients here)."""

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Hook after optimizer.step (unit-norm architectures renormalise here)."""

    # -- normalisation folding
    @torch.no_grad()
    def fold_normalization(self, scale: float, mean: Tensor | None) -> None:
        """Make an SAE trained on (x - mean) * scale act on raw x with the same feature activations.

        pre = ((x-mu)s - b) W + c = (x - (mu + b/s)) (sW) + c;  x_hat_raw = (W_dec/s) f + mu + b/s.
        """
        mu = torch.zeros_like(self.b_dec) if mean is None else mean.to(self.b_dec)
        self.enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.copy_(mu + self.b_dec / scale)
        self.cfg.norm_folded = True

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """Hook called once by the trainer with the normalised init sample, after b_dec is set."""

    def extra_state_tensors(self) -> dict[str, Tensor]:
        """Inference tensors beyond the four weights (threshold) in the SAELens naming."""
        return {}

    def load_extra_state_tensors(self, t: dict[str, Tensor]) -> None:
        pass


class ReluL1SAE(SAE):
    """Anthropic April-2024: ReLU, unconstrained decoder norms, L1 weighted by decoder norms."""

    arch = "relu-l1"

    @torch.no_grad()
    def init_weights(self, gen: torch.Generator) -> None:
        super().init_weights(gen)
        self.W_dec.mul_(0.1)
        self.enc.copy_(self.W_dec)

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """Start sparse: b_enc_i = -(the (1 - p) quantile of latent i's pre-activation on the init sample).

        With b_enc = 0 and a tied random init about half the latents fire on every token, and L1 needs many
        steps to push that down; starting at density p each latent still fires on p of the tokens (none dead)
        while the step already runs on the active pairs only.
        """
        p = self.cfg.init_density
        if p is None or p <= 0 or p >= 1:
            return
        pre = F.linear(x - self.b_dec, self.enc)  # [N, m]
        n = pre.shape[0]
        kth = max(1, min(n, int(round(n * (1 - p)))))
        self.b_enc.copy_(-pre.kthvalue(kth, dim=0).values)

    # Below this share of active (token, latent) pairs the step runs on the active pairs only (RaggedEncode /
    # RaggedDecode): on 2 CPU cores (B=4096, d=576, m=9216) the sparse kernels cost about what the dense GEMMs do
    # at ~10% density, and L0 of a trained relu-l1 SAE is well under 1%.
    sparse_density = 0.04
    _last_density: float | None = None  # share of active pairs in the previous training step

    def training_step(self, x, *, progress, dead_mask=None, aux_scale=None):
        warm = min(1.0, progress / self.cfg.l1_warmup_frac) if self.cfg.l1_warmup_frac > 0 else 1.0
        lam = self.cfg.l1_coeff * warm
        m = self.cfg.n_features
        # b_dec enters through the bias (x - b) E^T + c = x E^T + (c - E b): x needs no gradient, which saves the
        # [B, m] x [m, d] GEMM autograd would spend on d(loss)/d(x - b_dec) only to sum it over the batch.
        pre = F.linear(x, self.enc, self.b_enc - self.enc @ self.b_dec)
        n_cells = pre.numel()
        n_tok = max(1, n_cells // m)
        limit = self.sparse_density * n_cells
        rows = None
        with torch.no_grad():
            active = pre.detach() > 0
            if x.dim() == 2 and self._last_density is not None and self._last_density <= self.sparse_density:
                # last step was sparse: go straight to the pairs (their count is L0; no separate count pass)
                rows, cols = active.nonzero(as_tuple=True)
                n_active = rows.numel()
                if n_active > limit:
                    rows = None
            else:
                n_active = int(active.sum())  # one host read per step; it picks the path and gives L0
                if x.dim() == 2 and n_active <= limit:
                    rows, cols = active.nonzero(as_tuple=True)
        self._last_density = n_active / max(1, n_cells)
        if rows is not None:
            B = x.shape[0]
            with torch.no_grad():
                crow = torch.zeros(B + 1, dtype=torch.int64, device=x.device)
                crow[1:] = torch.bincount(rows, minlength=B).cumsum(0)
                # int32 keys sort ~1.5x faster than int64 on CPU; stable keeps rows ascending within a latent
                order = torch.argsort(cols.to(torch.int32) if m < 2**31 else cols, stable=True)
                rows_by_col = rows[order]
                ccol = torch.zeros(m + 1, dtype=torch.int64, device=x.device)
                ccol[1:] = torch.bincount(cols, minlength=m).cumsum(0)
                vals_raw = pre.detach()[rows, cols]
            del pre, active
            xc = x - self.b_dec
            vals = RaggedEncode.apply(xc, self.enc, self.b_enc, rows, cols, crow, order, rows_by_col, ccol, vals_raw)
            recon = RaggedDecode.apply(vals, rows, cols, crow, self.W_dec, order, rows_by_col, ccol) + self.b_dec
            sparsity = (vals * self.W_dec.norm(dim=1)[cols]).sum() / B
            fired = torch.zeros(m, dtype=torch.bool, device=x.device)
            fired[cols] = True
        else:
            f = F.relu(pre)
            recon = f @ self.W_dec + self.b_dec
            sparsity = (f * self.W_dec.norm(dim=1)).sum(-1).mean()
            fired = active.reshape(-1, m).any(0)
        mse = (recon - x).pow(2).sum(-1).mean()
        loss = mse + lam * sparsity
        return StepOutput(loss, recon, fired, torch.tensor(n_active / n_tok, device=x.device),
                          torch.zeros((), device=x.device))


class _UnitDecoderMixin:
    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        g = self.W_dec.grad
        if g is not None:
            w = self.W_dec
            # row-wise dot products without [m, d] temporaries (these passes are memory-bound)
            coef = torch.linalg.vecdot(g, w) / torch.linalg.vecdot(w, w).clamp_min(1e-12)
            g.sub_(coef.unsqueeze(1) * w)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.W_dec.div_(torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True).clamp_min(1e-12))


class TopKSAE(_UnitDecoderMixin, SAE):
    """OpenAI TopK: k largest pre-activations, ReLU after; AuxK on dead latents; unit decoder rows."""

    arch = "topk"

    def activation(self, pre: Tensor) -> Tensor:
        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, F.relu(vals))

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(values [B,k], indices [B,k]); the cheap form for decode via embedding_bag."""
        vals, idx = self.pre_acts(x).topk(self.cfg.k, dim=-1, sorted=False)
        return F.relu(vals), idx

    def training_step(self, x, *, progress, dead_mask=None, aux_scale=None):
        xc = x - self.b_dec
        with torch.no_grad():
            pre = F.linear(xc, self.enc, self.b_enc)
            vals_raw, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
            grouping = _group_by_latent(idx, self.cfg.n_features)  # one sort serves both backward passes
        vals = F.relu(SparseEncode.apply(xc, self.enc, self.b_enc, idx, vals_raw, grouping))
        recon = SparseDecode.apply(vals, idx, self.W_dec, grouping) + self.b_dec
        err = x - recon
        loss = err.pow(2).sum(-1).mean()
        aux = torch.zeros((), device=x.device)
        if dead_mask is not None and self.cfg.aux_coeff > 0 and bool(dead_mask.any()):
            with torch.no_grad():
                # only the dead columns are looked at (usually a few % of them): no [B, m] masked copy, and no
                # top-k at all when there are at most k_aux dead latents (then every one of them is used)
                dead_idx = dead_mask.nonzero().squeeze(1)
                sub = pre.index_select(1, dead_idx)
                if dead_idx.numel() > self.cfg.k_aux_eff:
                    avals_raw, j = sub.topk(self.cfg.k_aux_eff, dim=-1, sorted=False)
                    aidx = dead_idx[j]
                else:
                    avals_raw, aidx = sub, dead_idx.expand_as(sub).contiguous()
            avals = F.relu(SparseEncode.apply(xc, self.enc, self.b_enc, aidx, avals_raw))
            aux_recon = SparseDecode.apply(avals, aidx, self.W_dec)
            # residual of the main reconstruction (detached), normalised by its total energy
            aux = (err.detach() - aux_recon).pow(2).sum(-1).mean() / aux_scale
            loss = loss + self.cfg.aux_coeff * aux
        fired = torch.zeros(self.cfg.n_features, dtype=torch.bool, device=x.device)
        fired[idx[vals > 0]] = True
        l0 = (vals > 0).sum(-1).float().mean().detach()
        return StepOutput(loss, recon, fired, l0, aux.detach())


class BatchTopKSAE(_UnitDecoderMixin, SAE):
    """BatchTopK: top k*B activations over the whole batch in training; a learned global threshold at inference."""

    arch = "batchtopk"

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.tensor(-1.0))

    def activation(self, pre: Tensor) -> Tensor:
        if float(self.threshold) < 0:  # never trained: fall back to per-row top-k
            vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, idx, F.relu(vals))
        return pre * (pre > self.threshold)

    def training_step(self, x, *, progress, dead_mask=None, aux_scale=None):
        pre = self.pre_acts(x)
        acts = F.relu(pre)
        flat = acts.reshape(-1)
        vals, idx = flat.topk(self.cfg.k * x.shape[0], sorted=False)
        f = torch.zeros_like(flat).scatter(0, idx, vals).view_as(acts)
        recon = f @ self.W_dec + self.b_dec
        err = x - recon
        loss = err.pow(2).sum(-1).mean()
        with torch.no_grad():
            pos = vals > 0
            min_kept = torch.where(pos, vals, torch.full_like(vals, float("inf"))).min()
            if torch.isfinite(min_kept):
                t = self.threshold
                self.threshold.copy_(torch.where(t < 0, min_kept, self.cfg.threshold_beta * t + (1 - self.cfg.threshold_beta) * min_kept))
        aux = torch.zeros((), device=x.device)
        if dead_mask is not None and self.cfg.aux_coeff > 0:
            avals, aidx = pre.masked_fill(~dead_mask, float("-inf")).topk(self.cfg.k_aux_eff, dim=-1, sorted=False)
            keep = torch.isfinite(avals)
            avals = F.relu(torch.where(keep, avals, torch.zeros_like(avals)))
            aux_recon = F.embedding_bag(aidx, self.W_dec, per_sample_weights=avals, mode="sum")
            aux = (err.detach() - aux_recon).pow(2).sum(-1).mean() / aux_scale
            loss = loss + self.cfg.aux_coeff * aux
        active = f > 0
        return StepOutput(loss, recon, active.any(0), active.sum(-1).float().mean().detach(), aux.detach())

    def extra_state_tensors(self):
        return {"threshold": self.threshold.detach().clone()}


class JumpReLUSAE(_UnitDecoderMixin, SAE):
    """Gemma Scope JumpReLU: per-feature learned thresholds via straight-through estimators + L0 penalty.

    Training follows Gemma Scope (unit-norm decoder rows, so thresholds are activation sizes along a unit
    direction; L0 coefficient warmed up linearly from 0) plus Anthropic's January 2025 pre-activation loss
    (optional, ``pre_act_coeff``): it pulls the pre-activations of features below their threshold upwards,
    because a JumpReLU feature that never fires gets no reconstruction gradient and would stay dead.
    """

    arch = "jumprelu"

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(torch.full((cfg.n_features,), math.log(cfg.jumprelu_init_threshold)))

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def activation(self, pre: Tensor) -> Tensor:
        t = self.threshold
        return pre * (pre > t)

    def training_step(self, x, *, progress, dead_mask=None, aux_scale=None):
        cfg = self.cfg
        pre = self.pre_acts(x)
        t = self.threshold
        eps = cfg.jumprelu_bandwidth
        f = _JumpReLU.apply(pre, t, eps)
        recon = f @ self.W_dec + self.b_dec
        mse = (recon - x).pow(2).sum(-1).mean()
        dec_norm = self.W_dec.norm(dim=1)
        if cfg.l0_penalty == "plain":
            l0_term = _Step.apply(pre, t, eps).sum(-1).mean()
        else:
            l0_term = torch.tanh(cfg.tanh_c * f.abs() * dec_norm).sum(-1).mean()
        warm = min(1.0, progress / cfg.l0_warmup_frac) if cfg.l0_warmup_frac > 0 else 1.0
        loss = mse + (cfg.l0_coeff * warm) * l0_term
        if cfg.pre_act_coeff > 0:
            loss = loss + cfg.pre_act_coeff * (F.relu(t.detach() - pre) * dec_norm).sum(-1).mean()
        active = f > 0
        return StepOutput(loss, recon, active.any(0), active.sum(-1).float().mean().detach(), torch.zeros(()))

    @torch.no_grad()
    def fold_normalization(self, scale, mean):
        super().fold_normalization(scale, mean)  # feature activations and thus thresholds are unchanged

    def extra_state_tensors(self):
        return {"threshold": self.threshold.detach().clone()}

    def load_extra_state_tensors(self, t):
        if "threshold" in t:
            with torch.no_grad():
                self.log_threshold.copy_(t["threshold"].clamp_min(1e-30).log())


SAE_CLASSES: dict[str, type[SAE]] = {c.arch: c for c in (ReluL1SAE, TopKSAE, BatchTopKSAE, JumpReLUSAE)}


def build_sae(cfg: SAEConfig, *, seed: int | None = 0) -> SAE:
    """Create an SAE for cfg (weights randomly initialised with seed, or zeros if seed is None)."""
    return SAE.from_config(cfg, seed=seed)
