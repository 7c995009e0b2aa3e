"""The sparse autograd kernels (sae/kernels.py) against dense autograd: forward and backward.

gradcheck in float64 on small shapes checks each backward against finite differences; a float32 run at the
default SAE's width (d=576, m=9216) checks the same kernels against the dense ops they replace. Every case
runs on CPU and, when one is present, on CUDA (the kernels have separate CUDA branches).
"""

from __future__ import annotations

import pytest
import torch

from thoughtscope.sae.kernels import (
    RaggedDecode,
    RaggedEncode,
    SparseDecode,
    SparseEncode,
    gather_dot,
    group_by_latent,
    ragged_pairs,
    sum_by_latent,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# pytest resets warning filters per test, so the kernels' own filter of torch's CSR "beta" notice is repeated here
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:Sparse CSR tensor support")]


def _topk_pairs(B: int, m: int, k: int, g: torch.Generator, device: str) -> torch.Tensor:
    """[B, k] distinct latents per row, as a top-k gives."""
    return torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(B)]).to(device)


def _ragged_pairs(B: int, m: int, density: float, g: torch.Generator, device: str):
    """Row-major (rows, cols) of a random sparse pattern with an empty row and a latent with no pair."""
    mask = torch.rand(B, m, generator=g) < density
    mask[1] = False  # a row without active latents
    mask[:, 0] = False  # a latent that fires nowhere
    mask[0, 1] = mask[2, 1] = True
    rows, cols = mask.nonzero(as_tuple=True)
    return rows.to(device), cols.to(device)


def _dense(B: int, m: int, idx_or_rows, vals, cols=None) -> torch.Tensor:
    """The dense code the sparse pairs stand for (differentiable in vals)."""
    f = torch.zeros(B, m, dtype=vals.dtype, device=vals.device)
    if cols is None:
        return f.scatter(1, idx_or_rows, vals)
    return f.index_put((idx_or_rows, cols), vals)


# ----------------------------------------------------------------------------- helpers
@pytest.mark.parametrize("device", DEVICES)
def test_grouping_helpers_match_dense_sums(device):
    g = torch.Generator().manual_seed(0)
    B, m, d, k = 9, 13, 5, 4
    idx = _topk_pairs(B, m, k, g, device)
    w = torch.randn(B, k, generator=g, dtype=torch.float64).to(device)
    src = torch.randn(B, d, generator=g, dtype=torch.float64).to(device)
    ref = _dense(B, m, idx, w).T @ src  # out[j] = sum_b f[b, j] * src[b]
    torch.testing.assert_close(sum_by_latent(group_by_latent(idx, m), src, w), ref)
    W = torch.randn(m, d, generator=g, dtype=torch.float64).to(device)
    torch.testing.assert_close(gather_dot(idx, src, W), (W[idx] * src[:, None, :]).sum(-1))

    rows, cols = _ragged_pairs(B, m, 0.3, g, device)
    crow, order, rows_by_col, ccol = ragged_pairs(rows, cols, B, m)
    assert torch.equal(crow, torch.cat([crow.new_zeros(1), torch.bincount(rows, minlength=B).cumsum(0)]))
    assert torch.equal(ccol, torch.cat([ccol.new_zeros(1), torch.bincount(cols, minlength=m).cumsum(0)]))
    assert torch.equal(cols[order], cols.sort(stable=True).values) and torch.equal(rows_by_col, rows[order])
    for j in range(m):  # rows ascend within each latent (stable sort: reproducible sums)
        seg = rows_by_col[ccol[j] : ccol[j + 1]]
        assert torch.equal(seg, seg.sort().values)


# ----------------------------------------------------------------------------- float64 gradcheck
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pregrouped", [False, True])
def test_sparse_decode_gradcheck(device, pregrouped):
    g = torch.Generator().manual_seed(1)
    B, m, d, k = 6, 11, 4, 3
    idx = _topk_pairs(B, m, k, g, device)
    vals = torch.randn(B, k, generator=g, dtype=torch.float64).to(device).requires_grad_()
    W = torch.randn(m, d, generator=g, dtype=torch.float64).to(device).requires_grad_()
    grouping = group_by_latent(idx, m) if pregrouped else None
    torch.testing.assert_close(SparseDecode.apply(vals, idx, W, grouping), _dense(B, m, idx, vals) @ W)
    assert torch.autograd.gradcheck(lambda v, w: SparseDecode.apply(v, idx, w, grouping), (vals, W))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pregrouped", [False, True])
def test_sparse_encode_gradcheck(device, pregrouped):
    g = torch.Generator().manual_seed(2)
    B, m, d, k = 6, 11, 4, 3
    idx = _topk_pairs(B, m, k, g, device)
    x, E, b = (
        torch.randn(*s, generator=g, dtype=torch.float64).to(device).requires_grad_() for s in ((B, d), (m, d), (m,))
    )
    grouping = group_by_latent(idx, m) if pregrouped else None

    def fn(x, E, b):  # as in training: the values come from a dense no-grad GEMM, the gradient from the kernel
        vals = (x @ E.T + b).gather(1, idx).detach()
        return SparseEncode.apply(x, E, b, idx, vals, grouping)

    torch.testing.assert_close(fn(x, E, b), (x @ E.T + b).gather(1, idx))
    assert torch.autograd.gradcheck(fn, (x, E, b))


@pytest.mark.parametrize("device", DEVICES)
def test_ragged_decode_gradcheck(device):
    g = torch.Generator().manual_seed(3)
    B, m, d = 7, 10, 4
    rows, cols = _ragged_pairs(B, m, 0.3, g, device)
    crow, order, rows_by_col, ccol = ragged_pairs(rows, cols, B, m)
    vals = torch.randn(rows.numel(), generator=g, dtype=torch.float64).to(device).requires_grad_()
    W = torch.randn(m, d, generator=g, dtype=torch.float64).to(device).requires_grad_()

    def fn(v, w):
        return RaggedDecode.apply(v, rows, cols, crow, w, order, rows_by_col, ccol)

    torch.testing.assert_close(fn(vals, W), _dense(B, m, rows, vals, cols) @ W)
    assert torch.autograd.gradcheck(fn, (vals, W))


@pytest.mark.parametrize("device", DEVICES)
def test_ragged_encode_gradcheck(device):
    g = torch.Generator().manual_seed(4)
    B, m, d = 7, 10, 4
    rows, cols = _ragged_pairs(B, m, 0.3, g, device)
    crow, order, rows_by_col, ccol = ragged_pairs(rows, cols, B, m)
    x, E, b = (
        torch.randn(*s, generator=g, dtype=torch.float64).to(device).requires_grad_() for s in ((B, d), (m, d), (m,))
    )

    def fn(x, E, b):
        vals = (x @ E.T + b)[rows, cols].detach()
        return RaggedEncode.apply(x, E, b, rows, cols, crow, order, rows_by_col, ccol, vals)

    torch.testing.assert_close(fn(x, E, b), (x @ E.T + b)[rows, cols])
    assert torch.autograd.gradcheck(fn, (x, E, b))


# ----------------------------------------------------------------------------- float32 at the default SAE's width
def _grads(out: torch.Tensor, upstream: torch.Tensor, inputs) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs, upstream))


@pytest.mark.parametrize("device", DEVICES)
def test_topk_step_kernels_match_dense_autograd_at_width(device):
    """Encoder + decoder of a top-k step (shared grouping) against the same step in dense autograd."""
    g = torch.Generator().manual_seed(5)
    B, m, d, k = 64, 9216, 576, 32
    x = torch.randn(B, d, generator=g).to(device).requires_grad_()
    E = (torch.randn(m, d, generator=g) / d**0.5).to(device).requires_grad_()
    b = (0.1 * torch.randn(m, generator=g)).to(device).requires_grad_()
    W = (torch.randn(m, d, generator=g) / d**0.5).to(device).requires_grad_()
    up = torch.randn(B, d, generator=g).to(device)
    with torch.no_grad():
        vals_raw, idx = (x @ E.T + b).topk(k, dim=-1, sorted=False)
        grouping = group_by_latent(idx, m)
    vals = SparseEncode.apply(x, E, b, idx, vals_raw, grouping)
    recon = SparseDecode.apply(vals, idx, W, grouping)
    ref = _dense(B, m, idx, (x @ E.T + b).gather(1, idx)) @ W
    torch.testing.assert_close(recon, ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(_grads(recon, up, (x, E, b, W)), _grads(ref, up, (x, E, b, W))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_ragged_step_kernels_match_dense_autograd_at_width(device):
    """Encoder + decoder of a sparse ReLU step (~1% density) against dense autograd."""
    g = torch.Generator().manual_seed(6)
    B, m, d = 64, 9216, 576
    x = torch.randn(B, d, generator=g).to(device).requires_grad_()
    E = (torch.randn(m, d, generator=g) / d**0.5).to(device).requires_grad_()
    b = (torch.full((m,), -2.3) + 0.1 * torch.randn(m, generator=g)).to(device).requires_grad_()
    W = (torch.randn(m, d, generator=g) / d**0.5).to(device).requires_grad_()
    up = torch.randn(B, d, generator=g).to(device)
    with torch.no_grad():
        pre = x @ E.T + b
        rows, cols = (pre > 0).nonzero(as_tuple=True)
        crow, order, rows_by_col, ccol = ragged_pairs(rows, cols, B, m)
    assert 0.001 < rows.numel() / (B * m) < 0.05
    vals = RaggedEncode.apply(x, E, b, rows, cols, crow, order, rows_by_col, ccol, pre[rows, cols])
    recon = RaggedDecode.apply(vals, rows, cols, crow, W, order, rows_by_col, ccol)
    ref = torch.relu(x @ E.T + b) @ W
    torch.testing.assert_close(recon, ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(_grads(recon, up, (x, E, b, W)), _grads(ref, up, (x, E, b, W))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
