"""batchtopk: top k*B activations over the whole batch in training, a learned global threshold at inference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import SAE, StepOutput, TopKMixin, UnitDecoderMixin, register_sae_class
from .config import SAEConfig


@register_sae_class
class BatchTopKSAE(TopKMixin, UnitDecoderMixin, SAE):
    """BatchTopK: top k*B activations over the whole batch in training; a learned global threshold at inference."""

    arch = "batchtopk"
    uses_aux = True

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.tensor(-1.0))

    @property
    def trained(self) -> bool:
        """False until training has set the threshold (-1); inference then falls back to per-row top-k."""
        return float(self.threshold) >= 0

    def activation(self, pre: Tensor) -> Tensor:
        if not self.trained:
            vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, idx, F.relu(vals))
        return pre * (pre > self.threshold)

    def partial_thresholds(self, idx: Tensor) -> Tensor | None:
        return self.threshold.detach().float().expand(len(idx)) if self.trained else None

    def training_step(self, x, *, progress, dead_mask=None, aux_scale=None):
        pre = self.pre_acts(x)
        acts = F.relu(pre)
        flat = acts.reshape(-1)
        norms = self.free_row_norms()
        with torch.no_grad():
            scaled = None if norms is None else pre * norms  # free norms: latents compete on pre x norm
            score = acts if scaled is None else F.relu(scaled)
            kept, idx = score.reshape(-1).topk(self.cfg.k * x.shape[0], sorted=False)
            pos = kept > 0
            min_kept = torch.where(pos, kept, torch.full_like(kept, float("inf"))).min()
            if torch.isfinite(min_kept):
                t, beta = self.threshold, self.cfg.threshold_beta
                self.threshold.copy_(torch.where(t < 0, min_kept, beta * t + (1 - beta) * min_kept))
        f = torch.zeros_like(flat).scatter(0, idx, flat[idx]).view_as(acts)
        recon = f @ self.W_dec + self.b_dec
        err = x - recon
        loss = err.pow(2).sum(-1).mean()
        aux = torch.zeros((), device=x.device)
        if dead_mask is not None and self.cfg.aux_coeff > 0:
            with torch.no_grad():
                rank = pre if scaled is None else scaled
                ranked, aidx = rank.masked_fill(~dead_mask, float("-inf")).topk(
                    self.cfg.k_aux_eff, dim=-1, sorted=False
                )
            keep = torch.isfinite(ranked)
            avals = F.relu(torch.where(keep, pre.gather(-1, aidx), torch.zeros_like(ranked)))
            aux_recon = F.embedding_bag(aidx, self.W_dec, per_sample_weights=avals, mode="sum")
            aux = (err.detach() - aux_recon).pow(2).sum(-1).mean() / aux_scale
            loss = loss + self.cfg.aux_coeff * aux
        active = f > 0
        return StepOutput(loss, recon, active.any(0), active.sum(-1).float().mean().detach(), aux.detach())

    def extra_state_tensors(self):
        return {"threshold": self.threshold.detach().clone()}

    def load_extra_state_tensors(self, t):
        if "threshold" in t:
            with torch.no_grad():
                self.threshold.copy_(t["threshold"].reshape(()))

    def saelens_config(self) -> dict:
        """SAELens has no batchtopk inference class: written as jumprelu with the global threshold per feature."""
        return {"architecture": "jumprelu"}

    def saelens_tensors(self) -> dict[str, Tensor]:
        return {"threshold": self.threshold.detach().clamp_min(0).expand(self.cfg.n_features).clone()}
