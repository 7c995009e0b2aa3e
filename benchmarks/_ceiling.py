"""How far a trainer is from the machine's limit: measured matmul FLOP/s and the FLOP count of one training step.

The ceiling is the fp32 GEMM rate of this machine at the shape that dominates an SAE step (the dense encoder,
[batch, d] x [d, m]), measured in the race itself: the GEMM alone takes turns with the contenders on the same
batches (sae_train.py), so load from other processes on a shared machine falls on it as on them.
``ceiling_fraction`` = FLOP/s a trainer achieves (FLOP per token written out below x its tokens/s) / that GEMM rate:
1.0 would mean every step costs no more than its arithmetic at GEMM speed.
"""

from __future__ import annotations


def topk_flops_per_token(d: int, m: int, k: int, batch: int) -> dict:
    """FLOP per token of one TopK training step with a sparse decoder and sparse encoder backward.

    Multiply-adds count 2. Top-k selection is comparisons, not FLOP: listed apart and left out of the total.
    Per-step work on the parameters (optimiser, unit-norm projection) is divided by the batch size.
    """
    params = 2 * m * d + m + d
    parts = {
        "encoder_gemm": 2 * d * m,  # pre = (x - b_dec) W_enc^T + b_enc, dense
        "sparse_decoder": 2 * k * d,  # x_hat = sum of k decoder rows
        "loss": 3 * d,  # residual, square, sum
        "backward_decoder": 2 * (2 * k * d),  # d/d(values) (k dot products) + d/d(W_dec) (k row updates)
        "backward_encoder": 2 * (2 * k * d) + k,  # d/dx (k rows) + d/d(W_enc) (k row updates) + d/d(b_enc)
        "optimizer_per_token": (10 * params + 6 * m * d) / batch,  # Adam (~10/param) + decoder projection (~6/param)
    }
    return {"parts": parts, "total": sum(parts.values()), "topk_comparisons_not_counted": m}


def relu_flops_per_token(d: int, m: int, l0: float, batch: int) -> dict:
    """FLOP per token of a ReLU-L1 step whose backward runs on the ``l0`` active pairs only (dense forward)."""
    params = 2 * m * d + m + d
    parts = {
        "encoder_gemm": 2 * d * m,
        "sparse_decoder": 2 * l0 * d,
        "l1_and_loss": 3 * d + 2 * l0,
        "backward": 4 * (2 * l0 * d),
        "optimizer_per_token": (10 * params + 2 * m * d) / batch,
    }
    return {"parts": parts, "total": sum(parts.values())}
