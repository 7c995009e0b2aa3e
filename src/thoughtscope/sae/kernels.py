"""Sparse autograd kernels: the training steps' encoder and decoder at the active (row, latent) pairs only.

A top-k or sparse ReLU code touches B * k of the B * n_features cells, so the backward passes that dense
autograd would run as [B, m] x [m, d] GEMMs are done here as gathers and per-latent sums instead.

* ``SparseEncode`` / ``SparseDecode``: a fixed number k of pairs per row ([B, k] index tensors; top-k).
* ``RaggedEncode`` / ``RaggedDecode``: a variable number of pairs per row (row-major pairs with CSR offsets).
* ``group_by_latent`` / ``sum_by_latent``: pairs grouped by latent, so a weight gradient is one embedding_bag;
  one grouping serves the encoder and the decoder backward of a step.

Each kernel is checked against dense autograd (forward and backward) in tests/test_sae_kernels.py.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

# The CSR tensors below are only index patterns for sampled_addmm (checked against dense autograd in the tests);
# torch's "beta" notice about them would otherwise be printed by every training run.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)


def group_by_latent(idx: Tensor, n_features: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pairs of a [B, k] index tensor grouped by latent: (order, rows, offsets) for one embedding_bag per latent.

    ``order`` sorts the flattened pairs by latent (int32 keys sort faster than int64 on CPU; stable keeps rows
    ascending within a latent, so sums are reproducible), ``rows`` is each sorted pair's row and ``offsets`` where
    each latent's pairs start.
    """
    flat = idx.reshape(-1)
    order = torch.argsort(flat.to(torch.int32) if n_features < 2**31 else flat, stable=True)
    rows = torch.div(order, idx.shape[1], rounding_mode="floor")
    offsets = torch.zeros(n_features, dtype=torch.int64, device=idx.device)
    offsets[1:] = torch.bincount(flat, minlength=n_features).cumsum(0)[:-1]
    return order, rows, offsets


def sum_by_latent(grouping: tuple[Tensor, Tensor, Tensor], rows_src: Tensor, weights: Tensor) -> Tensor:
    """out[j] = sum over pairs (b, j) of weights[b, pair] * rows_src[b]: the weight gradient of a sparse layer."""
    order, rows, offsets = grouping
    return F.embedding_bag(rows, rows_src, offsets=offsets, per_sample_weights=weights.reshape(-1)[order], mode="sum")


def gather_dot(idx: Tensor, g: Tensor, W: Tensor) -> Tensor:
    """out[b, j] = <g[b], W[idx[b, j]]> without materialising W[idx] (sampled matmul)."""
    B, k = idx.shape
    if g.device.type == "cpu":
        crow = torch.arange(0, B * k + 1, k, device=idx.device)
        pattern = torch.sparse_csr_tensor(
            crow,
            idx.reshape(-1),
            torch.zeros(B * k, dtype=g.dtype, device=g.device),
            (B, W.shape[0]),
            check_invariants=False,
        )
        return torch.sparse.sampled_addmm(pattern, g, W.t(), beta=0.0).values().view(B, k)
    return torch.bmm(W[idx], g.unsqueeze(-1)).squeeze(-1)


class SparseDecode(torch.autograd.Function):
    """recon = sum_j vals[b,j] * W[idx[b,j]]; forward by embedding_bag, backward by sparse kernels.

    The W gradient is one embedding_bag over the pairs grouped by latent (``grouping`` from group_by_latent,
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
        g_vals = gather_dot(idx, g, W) if ctx.needs_input_grad[0] else None
        g_W = None
        if ctx.needs_input_grad[2]:
            grouping = ctx.grouping if ctx.grouping is not None else group_by_latent(idx, W.shape[0])
            g_W = sum_by_latent(grouping, g, vals)
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
            grouping = ctx.grouping if ctx.grouping is not None else group_by_latent(idx, ctx.m)
            g_E = sum_by_latent(grouping, x.contiguous(), g)
        g_b = None
        if ctx.needs_input_grad[2]:
            g_b = torch.zeros(ctx.m, dtype=g.dtype, device=g.device).index_add_(0, idx.reshape(-1), g.reshape(-1))
        return g_x, g_E, g_b, None, None, None


def ragged_pairs(rows: Tensor, cols: Tensor, n_rows: int, n_features: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Index tensors of the Ragged kernels for row-major pairs (rows, cols): (crow, order, rows_by_col, ccol).

    ``crow`` are the row offsets, ``order`` sorts the pairs by latent (stable: rows ascend within a latent),
    ``rows_by_col`` / ``ccol`` the rows in that order and the per-latent offsets.
    """
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    order = torch.argsort(cols.to(torch.int32) if n_features < 2**31 else cols, stable=True)
    rows_by_col = rows[order]
    ccol = torch.zeros(n_features + 1, dtype=torch.int64, device=rows.device)
    ccol[1:] = torch.bincount(cols, minlength=n_features).cumsum(0)
    return crow, order, rows_by_col, ccol


class RaggedDecode(torch.autograd.Function):
    """recon[b] = sum over the active pairs of row b of vals * W[col]: a variable number of latents per row.

    Pairs come row-major (as from ``nonzero``) with the index tensors of ``ragged_pairs``. Forward is one
    embedding_bag; backward a sampled matmul for the values and, for W, an embedding_bag over the gradient
    rows grouped by latent (on CPU much faster than the same sum as a CSR matmul), so cost follows the number
    of active pairs instead of B * n_features.
    """

    @staticmethod
    def forward(
        ctx,
        vals: Tensor,
        rows: Tensor,
        cols: Tensor,
        crow: Tensor,
        W: Tensor,
        order: Tensor,
        rows_by_col: Tensor,
        ccol: Tensor,
    ) -> Tensor:
        ctx.save_for_backward(vals, rows, cols, crow, W, order, rows_by_col, ccol)
        return F.embedding_bag(cols, W, offsets=crow[:-1], per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx, g: Tensor):
        vals, rows, cols, crow, W, order, rows_by_col, ccol = ctx.saved_tensors
        g = g.contiguous()
        g_vals = g_W = None
        if ctx.needs_input_grad[0]:
            if g.device.type == "cpu":
                pattern = torch.sparse_csr_tensor(
                    crow, cols, torch.zeros_like(vals), (g.shape[0], W.shape[0]), check_invariants=False
                )
                g_vals = torch.sparse.sampled_addmm(pattern, g, W.t(), beta=0.0).values()
            else:
                g_vals = (g[rows] * W[cols]).sum(-1)
        if ctx.needs_input_grad[4]:
            g_W = F.embedding_bag(rows_by_col, g, offsets=ccol[:-1], per_sample_weights=vals[order], mode="sum")
        return g_vals, None, None, None, g_W, None, None, None


class RaggedEncode(torch.autograd.Function):
    """Gradient of pre = x @ E.T + b taken only at the active pairs (see RaggedDecode for the index tensors)."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        E: Tensor,
        b: Tensor,
        rows: Tensor,
        cols: Tensor,
        crow: Tensor,
        order: Tensor,
        rows_by_col: Tensor,
        ccol: Tensor,
        vals: Tensor,
    ) -> Tensor:
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
            g_E = F.embedding_bag(
                rows_by_col, x.contiguous(), offsets=ccol[:-1], per_sample_weights=g[order], mode="sum"
            )
        if ctx.needs_input_grad[2]:
            g_b = torch.zeros(m, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        return g_x, g_E, g_b, None, None, None, None, None, None, None
