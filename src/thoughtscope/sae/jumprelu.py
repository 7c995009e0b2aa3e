"""jumprelu: Gemma Scope's JumpReLU SAE (learned per-feature thresholds trained by straight-through estimators)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import SAE, StepOutput, UnitDecoderMixin, register_sae_class
from .config import SAEConfig


class JumpReLUFn(torch.autograd.Function):
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


class StepFn(torch.autograd.Function):
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


@register_sae_class
class JumpReLUSAE(UnitDecoderMixin, SAE):
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

    @classmethod
    def run_name(cls, cfg: SAEConfig) -> str:
        return super().run_name(cfg) + f"-l0_{cfg.l0_coeff:g}"

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def activation(self, pre: Tensor) -> Tensor:
        t = self.threshold
        return pre * (pre > t)

    def partial_thresholds(self, idx: Tensor) -> Tensor | None:
        return self.threshold[idx].detach().float()

    def training_step(self, x, *, progress, dead_mask=None, aux_scale=None):
        cfg = self.cfg
        pre = self.pre_acts(x)
        t = self.threshold
        eps = cfg.jumprelu_bandwidth
        f = JumpReLUFn.apply(pre, t, eps)
        recon = f @ self.W_dec + self.b_dec
        mse = (recon - x).pow(2).sum(-1).mean()
        loss = self.sparsity_loss(mse, pre, f, t, progress)
        active = f > 0
        return StepOutput(
            loss, recon, active.any(0), active.sum(-1).float().mean().detach(), torch.zeros((), device=x.device)
        )

    def sparsity_loss(self, mse: Tensor, pre: Tensor, f: Tensor, t: Tensor, progress: float) -> Tensor:
        """mse plus the warmed-up L0 penalty and the optional pre-activation loss (what every JumpReLU step adds);
        t is the step's threshold tensor (the one the activation used)."""
        cfg, eps = self.cfg, self.cfg.jumprelu_bandwidth
        dec_norm = self.W_dec.norm(dim=1)
        if cfg.l0_penalty == "plain":
            l0_term = StepFn.apply(pre, t, eps).sum(-1).mean()
        else:
            l0_term = torch.tanh(cfg.tanh_c * f.abs() * dec_norm).sum(-1).mean()
        warm = min(1.0, progress / cfg.l0_warmup_frac) if cfg.l0_warmup_frac > 0 else 1.0
        loss = mse + (cfg.l0_coeff * warm) * l0_term
        if cfg.pre_act_coeff > 0:
            loss = loss + cfg.pre_act_coeff * (F.relu(t.detach() - pre) * dec_norm).sum(-1).mean()
        return loss

    def extra_state_tensors(self):
        return {"threshold": self.threshold.detach().clone()}

    def load_extra_state_tensors(self, t):
        if "threshold" in t:
            with torch.no_grad():
                self.log_threshold.copy_(t["threshold"].clamp_min(1e-30).log())

    def saelens_config(self) -> dict:
        return {"architecture": "jumprelu"}

    def saelens_tensors(self) -> dict[str, Tensor]:
        return {"threshold": self.threshold.detach()}
