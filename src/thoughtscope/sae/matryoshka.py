"""matryoshka: BatchTopK whose nested dictionary prefixes each reconstruct the input (Matryoshka SAEs).

Bussmann et al. 2025 ("Learning Multi-Level Features with Matryoshka Sparse Autoencoders") and Nabeshima
(2024): the first m1 latents must reconstruct x on their own, the first m2 > m1 together too, and so on up to
the whole dictionary. General, frequent concepts then settle in the early latents and the later ones add
detail, instead of a child feature absorbing its parent's direction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import SAEError
from .base import StepOutput, ranking_pre_acts, register_sae_class
from .batchtopk import BatchTopKSAE
from .config import SAEConfig
from .kernels import RaggedDecode, RaggedEncode, SparseDecode, SparseEncode, ragged_pairs

#: the default prefixes when SAEConfig.matryoshka_prefixes is empty: these shares of the dictionary (then all of it)
DEFAULT_PREFIX_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)


def matryoshka_widths(cfg: SAEConfig) -> tuple[int, ...]:
    """The nested prefix sizes of cfg, each a feature count, the whole dictionary last.

    An empty ``cfg.matryoshka_prefixes`` means m/16, m/8, m/4, m/2 (the doubling groups of Bussmann et al.'s
    reference configuration), leaving out any that round to 0 or repeat on a tiny dictionary.
    """
    m = cfg.n_features
    given = tuple(cfg.matryoshka_prefixes)
    if not given:
        given = tuple(sorted({int(m * f) for f in DEFAULT_PREFIX_FRACTIONS if 0 < int(m * f) < m}))
    return (*given, m)


def batch_topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k * B largest cells of pre [B, m] as (values, flat indices row * m + latent), the same set as
    ``pre.reshape(-1).topk(k * B)`` but found from each row's 2k largest (on CPU a whole-batch top-k costs more
    than the encoder GEMM).

    Exact: a row whose 2k-th largest value reaches the candidates' k*B-th largest may hold more of the batch's
    top cells, so such rows join with all their cells; every other row's cells outside its own top 2k lie below
    that value, which can only rise when more candidates join, so none of them can be among the k*B largest.
    """
    B, m = pre.shape
    n, per_row = k * B, min(m, 2 * k)
    if per_row == m:
        return pre.reshape(-1).topk(n, sorted=False)
    cv, ci = pre.topk(per_row, dim=-1, sorted=False)
    rows = torch.arange(B, device=pre.device).unsqueeze(1)
    cand_vals, cand_flat = cv.reshape(-1), (rows * m + ci).reshape(-1)
    kth = cand_vals.topk(n, sorted=False).values.min()
    full = cv.min(-1).values >= kth  # rows that may have more than 2k cells among the top
    if bool(full.any()):
        fr = full.nonzero().squeeze(1)
        keep = ~full.unsqueeze(1).expand_as(cv).reshape(-1)
        cand_vals = torch.cat([cand_vals[keep], pre[fr].reshape(-1)])
        cand_flat = torch.cat([cand_flat[keep], (fr.unsqueeze(1) * m + torch.arange(m, device=pre.device)).reshape(-1)])
    vals, j = cand_vals.topk(n, sorted=False)
    return vals, cand_flat[j]


@register_sae_class
class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka BatchTopK: every nested prefix of the dictionary is trained to reconstruct x on its own.

    Inference is BatchTopK's (global threshold learned in training; SAELens reads it as jumprelu): the prefixes
    only shape training. Choices, and why:

    * Loss = the MEAN of the prefix losses (SAELens sums them; Bussmann et al.'s reference code averages). The
      mean keeps the loss, and so the gradient norm the trainer clips at ``grad_clip``, on the scale of a single
      reconstruction, so the learning-rate default and clip tuned for batchtopk carry over whatever the number
      of prefixes; under Adam the two differ only through that clip.
    * AuxK on the dead latents models the residual of the FULL reconstruction, as batchtopk does (SAELens'
      default, ``use_matryoshka_aux_loss=False``): a revived latent should explain what the whole dictionary
      misses, and one aux term keeps the cost of a step that of batchtopk.
    * The batch top-k selection is made once over the whole dictionary (not per prefix), so L0 and the learned
      threshold mean what they mean for batchtopk and an early prefix is read at inference exactly as trained:
      its latents with the rest switched off.
    * The step runs on the selected (row, latent) pairs with the ragged kernels, one decode per group, so its
      cost is one sparse encode + decode however many prefixes there are.
    """

    arch = "matryoshka"

    @property
    def widths(self) -> tuple[int, ...]:
        return matryoshka_widths(self.cfg)

    @torch.no_grad()
    def _update_threshold(self, kept: Tensor) -> None:
        """EMA of the smallest kept activation (the batchtopk rule), from the kept positive values."""
        if kept.numel():
            t, beta, low = self.threshold, self.cfg.threshold_beta, kept.min()
            self.threshold.copy_(torch.where(t < 0, low, beta * t + (1 - beta) * low))

    def prefix_reconstructions(self, vals: Tensor, rows: Tensor, cols: Tensor, n_rows: int) -> list[Tensor]:
        """Reconstruction by each prefix (b_dec + its latents' decoder rows), from row-major active pairs."""
        recon, out, lo = self.b_dec.expand(n_rows, -1), [], 0
        for hi in self.widths:
            sel = ((cols >= lo) & (cols < hi)).nonzero().squeeze(1)
            r, c = rows[sel], cols[sel]
            crow, order, rows_by_col, ccol = ragged_pairs(r, c, n_rows, self.cfg.n_features)
            recon = recon + RaggedDecode.apply(vals[sel], r, c, crow, self.W_dec, order, rows_by_col, ccol)
            out.append(recon)
            lo = hi
        return out

    def _aux_loss(
        self, xc: Tensor, score: Tensor, norms: Tensor | None, err: Tensor, dead_mask: Tensor, aux_scale: Tensor
    ) -> Tensor:
        """AuxK: the k_aux dead latents of each row ranked highest by ``score`` (pre, or pre x free decoder norm
        ``norms``) model the residual err (normalised)."""
        with torch.no_grad():
            dead_idx = dead_mask.nonzero().squeeze(1)
            sub = score.index_select(1, dead_idx)
            k_aux = min(self.cfg.k_aux_eff, dead_idx.numel())
            ranked, j = sub.topk(k_aux, dim=-1, sorted=False)
            aidx = dead_idx[j]
            avals_raw = ranked if norms is None else ranked / norms[aidx]
        avals = F.relu(SparseEncode.apply(xc, self.enc, self.b_enc, aidx, avals_raw))
        aux_recon = SparseDecode.apply(avals, aidx, self.W_dec)
        return (err.detach() - aux_recon).pow(2).sum(-1).mean() / aux_scale

    def training_step(self, x, *, progress, dead_mask=None, aux_scale=None):
        if x.dim() != 2:
            raise SAEError(f"matryoshka training takes a [batch, d_model] batch, got shape {tuple(x.shape)}")
        B, m = x.shape[0], self.cfg.n_features
        xc = x - self.b_dec
        with torch.no_grad():
            norms = self.free_row_norms()
            score = ranking_pre_acts(xc, self.enc, self.b_enc, norms)  # what the latents compete on
            top, flat = batch_topk(score, self.cfg.k)
            flat = flat[top > 0].sort().values  # row-major pairs: rows ascend, latents ascend within a row
            rows, cols = torch.div(flat, m, rounding_mode="floor"), flat % m
            kept = score.reshape(-1)[flat]
            self._update_threshold(kept)
            vals_raw = kept if norms is None else kept / norms[cols]
            crow, order, rows_by_col, ccol = ragged_pairs(rows, cols, B, m)
        vals = RaggedEncode.apply(xc, self.enc, self.b_enc, rows, cols, crow, order, rows_by_col, ccol, vals_raw)
        recons = self.prefix_reconstructions(vals, rows, cols, B)
        losses = torch.stack([(x - r).pow(2).sum(-1).mean() for r in recons])
        loss = losses.mean()
        recon = recons[-1]
        aux = torch.zeros((), device=x.device)
        if dead_mask is not None and self.cfg.aux_coeff > 0 and bool(dead_mask.any()):
            aux = self._aux_loss(xc, score, norms, x - recon, dead_mask, aux_scale)
            loss = loss + self.cfg.aux_coeff * aux
        fired = torch.zeros(m, dtype=torch.bool, device=x.device)
        fired[cols] = True
        l0 = torch.tensor(rows.numel() / B, device=x.device)
        return StepOutput(loss, recon, fired, l0, aux.detach())
