"""transcoder: a sparse dictionary that reads one site and writes another (a block's MLP input -> its MLP output).

Where an SAE reconstructs its own input, a transcoder predicts the MLP's output from the MLP's input through a
sparse code, so its features stand in for the MLP's computation (Dunefsky et al. 2024; the per-layer transcoders
circuit-tracer builds attribution graphs from). Layout and names follow the SAE base class, with two additions:

* ``b_in`` [d]: the input centring, ``pre = (x - b_in) W_enc + b_enc`` (an SAE uses b_dec there; a transcoder's
  b_dec is the bias of the output, which lives in another space);
* ``W_skip`` [d, d] (only with ``SAEConfig.skip_connection``): a linear path ``(x - b_in) W_skip`` added to the
  output, zero at init, so the dictionary models what a linear map of the input cannot.

Activations: "transcoder" is TopK (k largest pre-activations, ReLU after; AuxK on dead latents against the output's
residual; the sparse kernels of topk.py do the backward passes), "jumprelu-transcoder" is JumpReLU (per-latent
learned thresholds and jumprelu.py's L0 penalty, as Gemma Scope's transcoders); both keep unit decoder rows.
Trained by the normal Trainer on paired batches [B, 2, d] (row 0 the input, row 1 the target;
harvest.stream_activations(..., target_site=...)), each side normalised on its own and folded back at the end, so
the finished transcoder reads and writes raw activations.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import SAEError
from ..models import Site, SiteError
from .base import PartialEncoder, SAEOutput, StepOutput, register_sae_class
from .config import SAEConfig
from .jumprelu import JumpReLUFn, JumpReLUSAE
from .kernels import SparseDecode, SparseEncode, group_by_latent
from .topk import TopKSAE, dead_aux_pairs


def check_pairing(site: str, target_site: str) -> None:
    """A transcoder's two sites: both parse, differ, and lie in the same block (else SAEError naming them)."""
    if not site or not target_site:
        return  # trained on data whose sites are not recorded (tests, synthetic pairs)
    try:
        a, b = Site.parse(site), Site.parse(target_site)
    except SiteError as e:
        raise SAEError(f"transcoder sites {site!r} -> {target_site!r}: {e}") from None
    if a == b:
        raise SAEError(f"transcoder reads and writes the same site {a}: that is an SAE (give arch topk)")
    if a.layer != b.layer:
        raise SAEError(
            f"transcoder sites {a} -> {b} lie in different blocks ({a.layer} and {b.layer}); a per-layer transcoder "
            f"reads and writes one block, e.g. mlp_in.{a.layer} -> mlp_out.{a.layer}"
        )


def _split(x: Tensor) -> tuple[Tensor, Tensor]:
    """A normalised paired batch [B, 2, d] as (input rows, target rows)."""
    if x.dim() != 3 or x.shape[1] != 2:
        raise SAEError(f"a transcoder trains on [B, 2, d] batches (input, target), got {tuple(x.shape)}")
    return x[:, 0], x[:, 1]


class TranscoderMixin:
    """What makes an SAE architecture a transcoder: b_in, the optional skip, paired training data, the fold of two
    normalisations, the extra tensors on disk. The architecture's class (after this one) brings the activation."""

    #: the trainer feeds it [B, 2, d] batches (input rows, target rows) and normalises each side on its own
    paired = True
    #: the top-k transcoder's decoder rows stay unit (its step does not rank by row norm)
    decoder_norm_modes = ("unit",)

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        d = cfg.d_model
        self.b_in = nn.Parameter(torch.zeros(d))
        self.W_skip = nn.Parameter(torch.zeros(d, d)) if cfg.skip_connection else None

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        super().check_config(cfg)
        check_pairing(cfg.site, cfg.target_site)

    @classmethod
    def run_name(cls, cfg: SAEConfig) -> str:
        return super().run_name(cfg) + ("-skip" if cfg.skip_connection else "")

    @torch.no_grad()
    def init_weights(self, gen: torch.Generator) -> None:
        super().init_weights(gen)
        self.b_in.zero_()
        if self.W_skip is not None:
            self.W_skip.zero_()

    # -- inference
    def pre_acts(self, x: Tensor, *, out: Tensor | None = None) -> Tensor:
        if out is not None:
            return torch.addmm(self.b_enc, x - self.b_in, self.enc.t(), out=out)
        return F.linear(x - self.b_in, self.enc, self.b_enc)

    def skip(self, x: Tensor) -> Tensor | None:
        """The skip path's part of the output, (x - b_in) W_skip; None without a skip connection."""
        return None if self.W_skip is None else (x - self.b_in) @ self.W_skip

    def forward(self, x: Tensor) -> SAEOutput:
        """(latent activations, predicted target): decode(encode(x)) plus the skip path."""
        f = self.encode(x)
        y = self.decode(f)
        s = self.skip(x)
        return SAEOutput(f, y if s is None else y + s)

    @torch.no_grad()
    def partial_encoder(self, idx: Tensor) -> PartialEncoder:
        idx = torch.as_tensor(idx, dtype=torch.long).to(self.W_dec.device)
        thr = self.partial_thresholds(idx)
        return PartialEncoder(
            self.enc[idx].detach().float(),
            self.b_enc[idx].detach().float(),
            self.b_in.detach().float(),
            None if thr is None else thr.detach().float(),
        )

    # -- training
    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """The trainer's normalised [N, 2, d] init sample: the input's mean centres the encoder."""
        if x.dim() == 3:
            self.b_in.copy_(x[:, 0].mean(0))

    @torch.no_grad()
    def fold_normalization(self, scale: float | Tensor, mean: Tensor | None) -> None:
        """Trained on x' = (x - mu) s and y' = y t (t = cfg.target_norm_scale): act on raw x and y.

        x' - b_in = (x - (mu + b_in / s)) s, so enc and W_skip's rows take s, b_in becomes mu + b_in / s; every output
        term is divided by t. Thresholds compare latent activations, which do not change.
        """
        mu = torch.zeros_like(self.b_in) if mean is None else mean.to(self.b_in)
        s = scale.to(self.b_in) if isinstance(scale, Tensor) else scale
        t = float(self.cfg.target_norm_scale)
        self.enc.mul_(s)
        self.b_in.copy_(mu + self.b_in / s)
        self.W_dec.div_(t)
        self.b_dec.div_(t)
        if self.W_skip is not None:
            self.W_skip.mul_(s.unsqueeze(1) if isinstance(s, Tensor) else s).div_(t)
        self.cfg.norm_folded = True

    # -- files
    def extra_state_tensors(self) -> dict[str, Tensor]:
        out = {**super().extra_state_tensors(), "b_in": self.b_in.detach().clone()}
        if self.W_skip is not None:
            out["W_skip"] = self.W_skip.detach().clone()
        return out

    def load_extra_state_tensors(self, t: dict[str, Tensor]) -> None:
        missing = [k for k in self.extra_state_tensors() if k not in t]
        if missing:
            raise SAEError(f"transcoder weights lack {', '.join(missing)} (skip_connection={self.cfg.skip_connection})")
        super().load_extra_state_tensors(t)
        with torch.no_grad():
            self.b_in.copy_(t["b_in"])
            if self.W_skip is not None:
                self.W_skip.copy_(t["W_skip"])

    def saelens_config(self) -> dict:
        raise SAEError("a transcoder has no SAELens v6 SAE form; save it as a native folder (save_sae)")


@register_sae_class
class TopKTranscoder(TranscoderMixin, TopKSAE):
    """TopK transcoder: x (at cfg.site) -> y (at cfg.target_site) through k active latents, optional linear skip."""

    arch = "transcoder"

    def training_step(self, x, *, progress, dead_mask=None, aux_scale=None):
        """x: [B, 2, d] normalised (input rows, target rows); loss = ||y - y_hat||^2 per row (+ AuxK)."""
        xin, y = _split(x)
        xc = xin - self.b_in
        with torch.no_grad():
            pre = F.linear(xc, self.enc, self.b_enc)
            vals_raw, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
            grouping = group_by_latent(idx, self.cfg.n_features)
        vals = F.relu(SparseEncode.apply(xc, self.enc, self.b_enc, idx, vals_raw, grouping))
        recon = SparseDecode.apply(vals, idx, self.W_dec, grouping) + self.b_dec
        if self.W_skip is not None:
            recon = recon + xc @ self.W_skip
        err = y - recon
        loss = err.pow(2).sum(-1).mean()
        aux = torch.zeros((), device=x.device)
        if dead_mask is not None and self.cfg.aux_coeff > 0 and bool(dead_mask.any()):
            avals_raw, aidx = dead_aux_pairs(pre, dead_mask, self.cfg.k_aux_eff)
            avals = F.relu(SparseEncode.apply(xc, self.enc, self.b_enc, aidx, avals_raw))
            aux = (err.detach() - SparseDecode.apply(avals, aidx, self.W_dec)).pow(2).sum(-1).mean() / aux_scale
            loss = loss + self.cfg.aux_coeff * aux
        fired = torch.zeros(self.cfg.n_features, dtype=torch.bool, device=x.device)
        fired[idx[vals > 0]] = True
        l0 = (vals > 0).sum(-1).float().mean().detach()
        return StepOutput(loss, recon, fired, l0, aux.detach())


@register_sae_class
class JumpReLUTranscoder(TranscoderMixin, JumpReLUSAE):
    """JumpReLU transcoder (Gemma Scope's transcoders): learned per-latent thresholds, L0 penalty, optional skip."""

    arch = "jumprelu-transcoder"

    def training_step(self, x, *, progress, dead_mask=None, aux_scale=None):
        """x: [B, 2, d] normalised (input rows, target rows); loss = ||y - y_hat||^2 per row + JumpReLU's penalties."""
        xin, y = _split(x)
        pre = self.pre_acts(xin)
        t = self.threshold
        f = JumpReLUFn.apply(pre, t, self.cfg.jumprelu_bandwidth)
        recon = f @ self.W_dec + self.b_dec
        s = self.skip(xin)
        if s is not None:
            recon = recon + s
        loss = self.sparsity_loss((recon - y).pow(2).sum(-1).mean(), pre, f, t, progress)
        active = f > 0
        return StepOutput(loss, recon, active.any(0), active.sum(-1).float().mean().detach(), torch.zeros_like(loss))


# ----------------------------------------------------------------------------- paired data from stores
class PairedStores:
    """A transcoder's training source from two stores of one harvest: ``harvest(lm, corpus, [site, target_site],
    out)`` writes one store per site, row for row from the same forward passes. Read with the same seed they shuffle
    alike; each batch is [B, 2, d] (input rows, target rows), and its token ids, documents and positions are compared
    so a misaligned pair stops with an SAEError. The stores' norm filter (max_norm_ratio) would drop different rows
    on each side, so it is not applied; position 0 is (exclude_bos). The Trainer reads it like a store."""

    def __init__(self, inp: Any, target: Any):
        from ..store import ActivationStore

        self.inp = inp if hasattr(inp, "batches") else ActivationStore.open(inp)
        self.target = target if hasattr(target, "batches") else ActivationStore.open(target)
        a, b = self.inp, self.target
        shards = [[sh["n_tokens"] for sh in st.manifest["shards"]] for st in (a, b)]
        if a.d_model != b.d_model or shards[0] != shards[1] or a.model != b.model:
            raise SAEError(
                f"stores {a.path} ({a.model}, {a.site}, d_model {a.d_model}, {a.n_tokens} rows) and {b.path} "
                f"({b.model}, {b.site}, d_model {b.d_model}, {b.n_tokens} rows) are not two sites of one harvest"
            )
        check_pairing(str(a.site), str(b.site))
        self.path, self.d_model, self.n_tokens, self.model = a.path, a.d_model, a.n_tokens, a.model
        self.site, self.target_site = str(a.site), str(b.site)

    @property
    def stats(self) -> dict:
        return self.inp.stats

    def batches(self, batch_size: int, *, max_norm_ratio: float | None = None, with_meta: bool = False, **kw: Any):
        """Batches [B, 2, d] (and the input store's meta with ``with_meta``); other options as the stores'."""
        a = self.inp.batches(batch_size, max_norm_ratio=None, with_meta=True, **kw)
        b = self.target.batches(batch_size, max_norm_ratio=None, with_meta=True, **kw)
        for i, ((xa, ma), (xb, mb)) in enumerate(zip(a, b, strict=True)):
            same = [torch.equal(ma[c], mb[c]) for c in ("doc_id", "position", "token_id") if c in ma and c in mb]
            if xa.shape != xb.shape or not same or not all(same):
                raise SAEError(f"batch {i} of {self.path} and {self.target.path} holds different tokens on each side")
            pair = torch.stack([xa, xb], 1)
            yield (pair, ma) if with_meta else pair


# ----------------------------------------------------------------------------- metrics
@torch.no_grad()
def evaluate_transcoder(tc: TranscoderMixin, pairs: Iterable[Any], *, max_batches: int | None = None) -> dict:
    """FVU of the target, MSE, L0 and the share of dead latents over paired batches ([B, 2, d] or (x, y) tuples).

    fvu = sum ||y - y_hat||^2 / sum ||y - mean(y)||^2 over every row (the trainer's definition); dead_frac = share of
    latents that fired on no row.
    """
    err = var = l0 = 0.0
    n = 0
    s1 = s2 = None
    fired = torch.zeros(tc.cfg.n_features, dtype=torch.bool)
    dev = tc.device
    for i, b in enumerate(pairs):
        if max_batches is not None and i >= max_batches:
            break
        x, y = (b[:, 0], b[:, 1]) if isinstance(b, Tensor) else b
        x, y = x.to(dev, torch.float32).reshape(-1, x.shape[-1]), y.to(dev, torch.float32).reshape(-1, y.shape[-1])
        f, y_hat = tc(x)
        err += float((y - y_hat).pow(2).sum())
        s1 = y.sum(0) if s1 is None else s1 + y.sum(0)
        s2 = y.pow(2).sum() if s2 is None else s2 + y.pow(2).sum()
        active = f > 0
        l0 += float(active.sum())
        fired |= active.any(0).cpu()
        n += x.shape[0]
    if n == 0:
        raise SAEError("evaluate_transcoder got no rows")
    var = float(s2 - s1.pow(2).sum() / n)
    return {
        "fvu": err / max(var, 1e-30),
        "mse": err / n,
        "l0": l0 / n,
        "dead_frac": float((~fired).float().mean()),
        "n_tokens": n,
    }


def spliced_transcoder_loss(lm: Any, tc: TranscoderMixin, token_batches: Iterable, **kw: Any) -> dict[str, Any]:
    """LM loss with the block's MLP output replaced by the transcoder's prediction from the MLP's input, beside the
    clean model and the MLP output zero- and mean-ablated (options of sae.metrics.spliced_losses). The keys are
    spliced_lm_loss's, so every reader of an SAE's figures reads these: loss_sae is the loss with the transcoder in
    place of the MLP, loss_recovered = (L_zero - L_transcoder) / (L_zero - L_clean). The sites are its own."""
    from ..models import edit
    from .metrics import spliced_losses, spliced_record

    if not tc.cfg.site or not tc.cfg.target_site:
        raise SAEError("the transcoder does not record its sites (cfg.site, cfg.target_site); cannot splice it")
    seen: dict[str, Tensor] = {}

    def read_input(x: Tensor) -> None:
        seen["x"] = x

    def predict(_: Tensor) -> Tensor:
        return tc(seen["x"].to(tc.device, torch.float32))[1]

    with edit(lm, tc.cfg.site, read_input):
        r = spliced_losses(lm, tc.cfg.target_site, token_batches, {"transcoder": predict}, **kw)
    return {**spliced_record(r, "transcoder"), "site": tc.cfg.target_site}
