"""relu-l1: Anthropic's April-2024 SAE (ReLU, unconstrained decoder norms, L1 weighted by decoder norms)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import SAE, StepOutput, register_sae_class
from .config import SAEConfig
from .kernels import RaggedDecode, RaggedEncode, ragged_pairs


@register_sae_class
class ReluL1SAE(SAE):
    """Anthropic April-2024: ReLU, unconstrained decoder norms, L1 weighted by decoder norms."""

    arch = "relu-l1"

    # Below this share of active (token, latent) pairs the step runs on the active pairs only (RaggedEncode /
    # RaggedDecode): on CPU the sparse kernels cost about what the dense GEMMs do at ~10% density
    # (benchmarks/sae_train.py), and L0 of a trained relu-l1 SAE is well under 1%.
    sparse_density = 0.04
    _last_density: float | None = None  # share of active pairs in the previous training step

    @classmethod
    def default_lr(cls, cfg: SAEConfig) -> float:
        """The April-2024 update's 5e-5 (its decoder norms are free, so no width scaling)."""
        return 5e-5

    @classmethod
    def run_name(cls, cfg: SAEConfig) -> str:
        return super().run_name(cfg) + f"-l1_{cfg.l1_coeff:g}"

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
                crow, order, rows_by_col, ccol = ragged_pairs(rows, cols, B, m)
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
        return StepOutput(
            loss, recon, fired, torch.tensor(n_active / n_tok, device=x.device), torch.zeros((), device=x.device)
        )
