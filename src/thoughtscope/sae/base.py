"""The SAE base class and the registry mapping an architecture name to its class.

Layout: the encoder is stored as ``enc`` [n_features, d_model] (row i = encoder direction of
feature i) because both the sparse backward (CSR matmul into rows) and ``embedding_bag`` want
contiguous per-feature rows. ``W_enc`` ([d_model, n_features], the SAELens layout) is a view.
``W_dec`` is [n_features, d_model]: row i is the decoder direction of feature i.

Every architecture encodes ``pre = (x - b_dec) @ W_enc + b_enc`` (pre-encoder bias); checkpoints
from tools that do not subtract b_dec are converted on import by folding it into b_enc.

Whatever differs between architectures (activation, training step, hyperparameters, learning-rate
default, thresholds) is a method or class attribute of its class, so callers never test ``cfg.arch``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import SAEError
from .config import SAEConfig
from .registry import SAE_CLASSES, architectures, register_sae_class, sae_class  # noqa: F401  (their old home)


def check_k(cfg: SAEConfig) -> None:
    """Top-k architectures: k must be in 1..n_features."""
    if isinstance(cfg.k, bool) or not isinstance(cfg.k, int) or not 0 < cfg.k <= cfg.n_features:
        raise SAEError(f"SAEConfig.k={cfg.k!r} must be in 1..n_features={cfg.n_features} for arch {cfg.arch!r}")


@torch.no_grad()
def ranking_pre_acts(xc: Tensor, enc: Tensor, b_enc: Tensor, norms: Tensor | None) -> Tensor:
    """Pre-activations [B, m] of centred rows, or with free decoder norms pre x norm, from one GEMM on encoder rows
    scaled by their norms (an [m, d] product instead of a pass over the [B, m] result)."""
    if norms is None:
        return F.linear(xc, enc, b_enc)
    return F.linear(xc, enc * norms.unsqueeze(1), b_enc * norms)


class SAEOutput(NamedTuple):
    feature_acts: Tensor  # dense [..., n_features]
    recon: Tensor  # [..., d_model]


class StepOutput(NamedTuple):
    loss: Tensor
    recon: Tensor
    fired: Tensor  # bool [n_features]: fired anywhere in this batch
    l0: Tensor  # mean active latents per token (detached)
    aux: Tensor  # aux loss (detached) or 0


class PartialEncoder:
    """Activations of a few selected features from their own encoder rows: one [.., d] x [d, n] product.

    Rows, biases and thresholds are gathered once (float32), so a generation step does not encode the whole
    dictionary. ``threshold`` None means ReLU(pre), else pre * [pre > threshold] (see SAE.partial_encoder).
    """

    def __init__(self, enc: Tensor, b_enc: Tensor, b_dec: Tensor, threshold: Tensor | None):
        self.enc, self.b_enc, self.b_dec, self.threshold = enc, b_enc, b_dec, threshold

    def __call__(self, x: Tensor) -> Tensor:
        pre = F.linear(x.float() - self.b_dec, self.enc, self.b_enc)
        if self.threshold is not None:
            return pre * (pre > self.threshold)
        return F.relu(pre)


class SAE(nn.Module):
    """Base class. encode(x) -> f, decode(f) -> x_hat, forward(x) -> SAEOutput(f, x_hat)."""

    arch = ""
    #: the trainer feeds dead latents to an AuxK loss for this architecture
    uses_aux = False
    #: encode_sparse picks its pairs from the pre-activations without a dense code, so a caller streaming
    #: equal batches gains from reusing one pre-activation buffer (``pre_out``)
    sparse_native = False
    #: the values cfg.decoder_norm may take for this architecture, its default first
    decoder_norm_modes: tuple[str, ...] = ("unit",)

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        self.feature_stats = None  # sae.stats.FeatureStats, attached by load_sae when the folder has them
        self.source_dir = None  # the folder it was loaded from
        self.source_spec = None  # its name when loaded by one (saelens:<release>/<sae_id>; pretrained.finish)
        m, d = cfg.n_features, cfg.d_model
        self.enc = nn.Parameter(torch.zeros(m, d))
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.W_dec = nn.Parameter(torch.zeros(m, d))
        self.b_dec = nn.Parameter(torch.zeros(d))

    # -- per-architecture class hooks
    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        """Raise SAEError for a config this architecture cannot use (called by SAEConfig.__post_init__)."""

    @classmethod
    def default_lr(cls, cfg: SAEConfig) -> float:
        """Adam learning rate when TrainConfig.lr is None: 2e-4 scaled by 1/sqrt(n_features / 2^14)."""
        return 2e-4 / math.sqrt(cfg.n_features / 2**14)

    @classmethod
    def run_name(cls, cfg: SAEConfig) -> str:
        """Folder name of this config in a sweep: architecture, expansion and its own hyperparameters."""
        return f"{cfg.arch}-x{cfg.n_features // cfg.d_model}"

    # -- construction and files
    @staticmethod
    def from_config(cfg: SAEConfig, *, seed: int | None = 0) -> SAE:
        sae = sae_class(cfg.arch)(cfg)
        if seed is not None:
            sae.init_weights(torch.Generator().manual_seed(seed))
        return sae

    def save(self, path: str | Path, **kw) -> Path:
        """Write a native SAE folder (see formats.save_sae for the options)."""
        from .formats import save_sae

        return save_sae(self, path, **kw)

    @classmethod
    def load(cls, path: str | Path, **kw) -> SAE:
        """Open any SAE folder we understand (see formats.load_sae); the class follows the folder's arch."""
        from .formats import load_sae

        return load_sae(path, **kw)

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
    def pre_acts(self, x: Tensor, *, out: Tensor | None = None) -> Tensor:
        """(x - b_dec) W_enc + b_enc; ``out`` (2-D x only, no autograd) receives it without a fresh allocation."""
        if out is not None:
            return torch.addmm(self.b_enc, x - self.b_dec, self.enc.t(), out=out)  # the kernel F.linear uses
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

    def encode_sparse(self, x: Tensor, *, pre_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The active features of x [..., d] as (values [..., n], indices [..., n]).

        n is the largest number of active features of any row; a row with fewer is padded with value 0
        (index 0). Within a row the indices ascend. Top-k architectures override this with their k pairs.
        """
        self._check_input(x)
        f = self.activation(self.pre_acts(x, out=pre_out))
        flat = f.reshape(-1, f.shape[-1])
        rows, cols = (flat > 0).nonzero(as_tuple=True)
        counts = torch.bincount(rows, minlength=flat.shape[0])
        n = int(counts.max()) if rows.numel() else 0
        start = torch.zeros_like(counts)
        start[1:] = counts.cumsum(0)[:-1]
        slot = torch.arange(rows.numel(), device=f.device) - start[rows]
        vals = flat.new_zeros(flat.shape[0], n)
        idx = torch.zeros(flat.shape[0], n, dtype=torch.int64, device=f.device)
        vals[rows, slot] = flat[rows, cols]
        idx[rows, slot] = cols
        return vals.view(*f.shape[:-1], n), idx.view(*f.shape[:-1], n)

    def partial_thresholds(self, idx: Tensor) -> Tensor | None:
        """Per-feature thresholds of the features idx for partial_encoder; None means ReLU(pre)."""
        return None

    @torch.no_grad()
    def partial_encoder(self, idx: Tensor) -> PartialEncoder:
        """Activations of the features idx from their own encoder rows (no full encode).

        The rule is the architecture's own activation without its competition between features: ReLU(pre),
        or pre * [pre > threshold] where the architecture has thresholds. For top-k this equals encode()
        wherever the feature is among the k largest, and elsewhere also counts its sub-threshold part
        (docs/steering.md: a clamp then sets the feature's whole contribution).
        """
        idx = torch.as_tensor(idx, dtype=torch.long).to(self.W_dec.device)
        thr = self.partial_thresholds(idx)
        return PartialEncoder(
            self.enc[idx].detach().float(),
            self.b_enc[idx].detach().float(),
            self.b_dec.detach().float(),
            None if thr is None else thr.detach().float(),
        )

    def _check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.cfg.d_model:
            raise SAEError(f"input has last dimension {x.shape[-1]} but the SAE expects d_model={self.cfg.d_model}")

    # -- training hooks (per architecture)
    def training_step(
        self, x: Tensor, *, progress: float, dead_mask: Tensor | None, aux_scale: Tensor | None
    ) -> StepOutput:
        raise NotImplementedError

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Hook between backward and optimizer.step (unit-norm architectures project gradients here)."""

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Hook after optimizer.step (unit-norm architectures renormalise here)."""

    def free_row_norms(self) -> Tensor | None:
        """Decoder row norms (detached) while they train free (cfg.decoder_norm "free"), else None.

        A top-k architecture then ranks latents by pre-activation x row norm, the size of each latent's
        contribution to the reconstruction, so a row that grows cannot win the competition by that alone.
        """
        if self.cfg.decoder_norm != "free":
            return None
        return torch.linalg.vector_norm(self.W_dec.detach(), dim=1).clamp_min(1e-12)

    @torch.no_grad()
    def fold_decoder_norm(self) -> None:
        """Move free decoder row norms into the encoder: enc_i, b_enc_i times n_i, W_dec_i over n_i.

        Every reconstruction is unchanged and pre-activations become pre x n, the quantity training ranked
        (and learned thresholds on), so encode() after folding selects as training did. Called on the
        training-space SAE before fold_normalization (which scales the rows); a no-op for unit rows.
        """
        n = self.free_row_norms()
        if n is None:
            return
        self.enc.mul_(n.unsqueeze(1))
        self.b_enc.mul_(n)
        self.W_dec.div_(n.unsqueeze(1))

    # -- normalisation folding
    @torch.no_grad()
    def fold_normalization(self, scale: float | Tensor, mean: Tensor | None) -> None:
        """Make an SAE trained on (x - mean) * scale act on raw x with the same feature activations.

        pre = ((x-mu)s - b) W + c = (x - (mu + b/s)) (sW) + c;  x_hat_raw = (W_dec/s) f + mu + b/s, with s a
        number or one multiplier per dimension (diag(s) W). Thresholds compare feature activations, which do
        not change, so no architecture adds to this.
        """
        mu = torch.zeros_like(self.b_dec) if mean is None else mean.to(self.b_dec)
        s = scale.to(self.b_dec) if isinstance(scale, Tensor) else scale
        self.enc.mul_(s)
        self.W_dec.div_(s)
        self.b_dec.copy_(mu + self.b_dec / s)
        self.cfg.norm_folded = True

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """Hook called once by the trainer with the normalised init sample, after b_dec is set."""

    def extra_state_tensors(self) -> dict[str, Tensor]:
        """Inference tensors beyond the four weights (threshold) in the SAELens naming."""
        return {}

    def load_extra_state_tensors(self, t: dict[str, Tensor]) -> None:
        pass

    def saelens_config(self) -> dict:
        """The SAELens v6 cfg.json keys that depend on the architecture ("architecture" first)."""
        return {"architecture": "standard"}

    def saelens_tensors(self) -> dict[str, Tensor]:
        """Tensors SAELens needs beyond W_enc, W_dec, b_enc, b_dec (thresholds)."""
        return {}


class TopKMixin:
    """Architectures with a k (topk, batchtopk): k is checked against n_features and named in the run name;
    their decoder norms may train free (SAE.free_row_norms)."""

    decoder_norm_modes = ("free", "unit")

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        check_k(cfg)

    @classmethod
    def run_name(cls, cfg: SAEConfig) -> str:
        name = super().run_name(cfg) + f"-k{cfg.k}"
        return name if cfg.decoder_norm == cls.decoder_norm_modes[0] else f"{name}-{cfg.decoder_norm}dec"


class UnitDecoderMixin:
    """Unit-norm decoder rows: gradients projected off the rows before the step, rows renormalised after
    (unless cfg.decoder_norm is "free")."""

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        g = self.W_dec.grad
        if g is not None and self.cfg.decoder_norm == "unit":
            w = self.W_dec
            # row-wise dot products without [m, d] temporaries (these passes are memory-bound)
            coef = torch.linalg.vecdot(g, w) / torch.linalg.vecdot(w, w).clamp_min(1e-12)
            g.sub_(coef.unsqueeze(1) * w)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.cfg.decoder_norm != "unit":
            return
        self.W_dec.div_(torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True).clamp_min(1e-12))


def build_sae(cfg: SAEConfig, *, seed: int | None = 0) -> SAE:
    """Create an SAE for cfg (weights randomly initialised with seed, or zeros if seed is None)."""
    return SAE.from_config(cfg, seed=seed)
