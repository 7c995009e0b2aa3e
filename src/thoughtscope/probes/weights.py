"""Weights read through the unembedding: what each block's MLP output and attention OV circuits can write.

The left singular vectors of a block's output matrix (MLP down-projection; each head's OV = W_O·W_V) are the
directions it writes into the residual stream, ordered by singular value. Each is read as top tokens through
the final norm and the unembedding (both signs: an SVD's sign is arbitrary) and compared with a probe's
direction by cosine. Near-tied singular values (ratio < 1.02) make their individual vectors arbitrary inside
the tied span; they are flagged. Quantised checkpoints (the default model is Q4_1) make small singular
values noisy, so only the top few are reported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ProbeError


def _module(block, names: Sequence[str]):
    for path in names:
        mod = block
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if mod is not None:
            return mod
    return None


def _low_rank_svd(A: torch.Tensor, B: torch.Tensor):
    """SVD of A @ B (A [d, r], B [r, d]) through QR factors: no d×d decomposition needed."""
    Qa, Ra = torch.linalg.qr(A)
    Qb, Rb = torch.linalg.qr(B.T)
    U, S, Vh = torch.linalg.svd(Ra @ Rb.T)
    return Qa @ U, S, (Qb @ Vh.T).T


def read_direction(lm, u: torch.Tensor, k: int = 8) -> list[str]:
    """Top tokens of a residual direction read through the final norm's gain and the unembedding."""
    W = lm.unembed.weight.detach().float()
    gain = getattr(lm.final_norm, "weight", None)
    v = u.float() * (gain.detach().float() if gain is not None and gain.shape == u.shape else 1.0)
    return [lm.tokenizer.decode([int(i)]) for i in (W @ v).topk(k).indices]


def block_directions(lm, layer: int, top: int = 4) -> dict:
    """{"mlp": (U [d, top], S [top]), "head{h}": ...} for one block."""
    block = lm.layers[layer]
    cfg = lm.model.config
    out = {}
    down = _module(block, ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc2"))
    if down is not None and hasattr(down, "weight"):
        W = down.weight.detach().float()
        W = W if W.shape[0] == lm.d_model else W.T  # GPT-2's Conv1D stores [in, out]
        U, S, _ = torch.linalg.svd(W, full_matrices=False)
        out["mlp"] = (U[:, :top], S[:top], S)
    v, o = _module(block, ("self_attn.v_proj",)), _module(block, ("self_attn.o_proj",))
    if v is not None and o is not None:
        n_heads = int(cfg.num_attention_heads)
        n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
        hd = int(getattr(cfg, "head_dim", None) or lm.d_model // n_heads)
        Wv, Wo = v.weight.detach().float(), o.weight.detach().float()
        for h in range(n_heads):
            kv = h // (n_heads // n_kv)
            U, S, _ = _low_rank_svd(Wo[:, h * hd : (h + 1) * hd], Wv[kv * hd : (kv + 1) * hd])
            out[f"head{h}"] = (U[:, :top], S[:top], S)
    if not out:
        raise ProbeError(
            f"block {layer} of {lm.name} has no recognised MLP output (mlp.down_proj) or attention "
            f"value/output projections (self_attn.v_proj / o_proj)"
        )
    return out


def weight_atlas(
    lm,
    layers: Sequence[int] | None = None,
    *,
    top: int = 3,
    k_tokens: int = 6,
    probe_direction: torch.Tensor | None = None,
) -> list[dict]:
    """Per block and component: top singular values, their directions' top tokens (+/−), cosine with a probe."""
    layers = range(lm.n_layers) if layers is None else layers
    d = None
    if probe_direction is not None:
        d = probe_direction.float() / probe_direction.float().norm()
    rows = []
    with torch.no_grad():
        for layer in layers:
            lm.check_site(f"resid.{layer}")
            for comp, (U, S, S_all) in block_directions(lm, layer, top).items():
                for i in range(U.shape[1]):
                    nxt = float(S_all[i + 1]) if i + 1 < len(S_all) else 0.0
                    row = {
                        "layer": layer,
                        "component": comp,
                        "rank": i,
                        "singular_value": float(S[i]),
                        "near_tie": bool(nxt > 0 and float(S[i]) / nxt < 1.02),
                        "tokens_plus": read_direction(lm, U[:, i], k_tokens),
                        "tokens_minus": read_direction(lm, -U[:, i], k_tokens),
                    }
                    if d is not None:
                        row["cosine_with_probe"] = float(U[:, i] @ d)
                    rows.append(row)
    return rows


def probe_alignment(
    lm, probe_direction: torch.Tensor, layers: Sequence[int] | None = None, top: int = 16
) -> list[dict]:
    """How much of a probe direction lies in each component's top-`top` write span (norm share, 0..1), largest first."""
    d = probe_direction.float() / probe_direction.float().norm()
    layers = range(lm.n_layers) if layers is None else layers
    rows = []
    with torch.no_grad():
        for layer in layers:
            for comp, (U, _, _) in block_directions(lm, layer, top).items():
                c = U.T @ d
                rows.append(
                    {
                        "layer": layer,
                        "component": comp,
                        "share": float(c.norm()),
                        "max_abs_cosine": float(c.abs().max()),
                        "best_rank": int(c.abs().argmax()),
                    }
                )
    return sorted(rows, key=lambda r: -r["share"])
