"""topk: OpenAI's TopK SAE (k largest pre-activations, ReLU after; AuxK on dead latents).

With free decoder norms (the default) the k largest of pre-activation x decoder-row norm win in training, and
the norms are folded into the encoder when training ends (SAE.fold_decoder_norm), so inference ranks raw
pre-activations of an SAE with unit rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import SAE, StepOutput, TopKMixin, UnitDecoderMixin, ranking_pre_acts, register_sae_class
from .kernels import SparseDecode, SparseEncode, group_by_latent


@torch.no_grad()
def dead_aux_pairs(pre: Tensor, dead_mask: Tensor, k_aux: int) -> tuple[Tensor, Tensor]:
    """AuxK's (pre-activations, latent ids) [B, <= k_aux]: each row's largest among the dead latents. Only the dead
    columns are looked at (usually a few % of them): no [B, m] masked copy, and no top-k at all when there are at
    most k_aux dead latents (then every one of them is used)."""
    dead_idx = dead_mask.nonzero().squeeze(1)
    sub = pre.index_select(1, dead_idx)
    if dead_idx.numel() > k_aux:
        vals, j = sub.topk(k_aux, dim=-1, sorted=False)
        return vals, dead_idx[j]
    return sub, dead_idx.expand_as(sub).contiguous()


@register_sae_class
class TopKSAE(TopKMixin, UnitDecoderMixin, SAE):
    """OpenAI TopK: k largest pre-activations, ReLU after; AuxK on dead latents; unit decoder rows once trained."""

    arch = "topk"
    uses_aux = True
    sparse_native = True

    def activation(self, pre: Tensor) -> Tensor:
        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, F.relu(vals))

    def encode_sparse(self, x: Tensor, *, pre_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(values [..., k], indices [..., k]) straight from the pre-activations; the cheap form for decode via
        embedding_bag. A value is 0 where fewer than k pre-activations are positive."""
        vals, idx = self.pre_acts(x, out=pre_out).topk(self.cfg.k, dim=-1, sorted=False)
        return F.relu(vals), idx

    def training_step(self, x, *, progress, dead_mask=None, aux_scale=None):
        xc = x - self.b_dec
        with torch.no_grad():
            norms = self.free_row_norms()
            score = ranking_pre_acts(xc, self.enc, self.b_enc, norms)  # what the latents compete on
            vals_raw, idx = score.topk(self.cfg.k, dim=-1, sorted=False)
            if norms is not None:
                vals_raw = vals_raw / norms[idx]
            grouping = group_by_latent(idx, self.cfg.n_features)  # one sort serves both backward passes
        vals = F.relu(SparseEncode.apply(xc, self.enc, self.b_enc, idx, vals_raw, grouping))
        recon = SparseDecode.apply(vals, idx, self.W_dec, grouping) + self.b_dec
        err = x - recon
        loss = err.pow(2).sum(-1).mean()
        aux = torch.zeros((), device=x.device)
        if dead_mask is not None and self.cfg.aux_coeff > 0 and bool(dead_mask.any()):
            avals_raw, aidx = dead_aux_pairs(score, dead_mask, self.cfg.k_aux_eff)
            if norms is not None:
                avals_raw = avals_raw / norms[aidx]
            avals = F.relu(SparseEncode.apply(xc, self.enc, self.b_enc, aidx, avals_raw))
            aux_recon = SparseDecode.apply(avals, aidx, self.W_dec)
            # residual of the main reconstruction (detached), normalised by its total energy
            aux = (err.detach() - aux_recon).pow(2).sum(-1).mean() / aux_scale
            loss = loss + self.cfg.aux_coeff * aux
        fired = torch.zeros(self.cfg.n_features, dtype=torch.bool, device=x.device)
        fired[idx[vals > 0]] = True
        l0 = (vals > 0).sum(-1).float().mean().detach()
        return StepOutput(loss, recon, fired, l0, aux.detach())

    def saelens_config(self) -> dict:
        return {"architecture": "topk", "k": self.cfg.k, "rescale_acts_by_decoder_norm": False}
