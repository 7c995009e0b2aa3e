"""Training loop: one pass over the data feeds one or many SAEs (a sweep); resumable; optional torchrun DDP.

Resume: the (deterministic) stream is rebuilt and the batches already consumed are skipped (stream.py), so a
killed-and-resumed run on CPU gives bit-identical weights to an uninterrupted one.

DDP: every rank reads the same global batch and keeps a disjoint slice of rows. Gradients are averaged with
one manual all_reduce of a flat buffer per SAE instead of DistributedDataParallel: our topk backward is a
custom sparse Function, unit-norm projection must see the averaged gradient, and a sweep holds several
models; a flat all_reduce is one collective per SAE and needs no wrapper. Batch-wide quantities (AuxK scale,
dead-latent counters) are reduced too, so 2 ranks match 1 process. (batchtopk selects top k*B per rank.)

It stays one file: the Trainer's setup, step, dead-latent bookkeeping, logging, checkpoint and resume all read
and write the same per-SAE slots and step counters, so they change together; optimiser and stream live apart.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .._io import atomic_torch_save, exclusive_lock
from ..distributed import average_gradients, join_process_group, local_device
from ..dtypes import canonical
from ..errors import TrainingDiverged  # noqa: F401  (re-exported: their old home)
from ..progress import ProgressBar
from ..store import massive_dims
from .base import SAE, StepOutput, build_sae, sae_class
from .config import AUTO_VARIANCE_SHARE, SAEConfig, SAEError, TrainConfig
from .optim import adam, default_lr, lr_factor
from .stream import chain, check_batch, make_stream, stack_pair

LOCK_NAME = ".train.lock"  # in the checkpoint folder, held while a run trains and saves
DEAD_TOKENS = 10_000_000  # the published rule: a latent is dead after this many tokens without firing


def default_dead_tokens(n_tokens: int, batch_size: int) -> int:
    """DEAD_TOKENS; short runs use 10% of the run (at least one batch)."""
    return int(min(DEAD_TOKENS, max(batch_size, n_tokens // 10)))


@torch.no_grad()
def total_steps(tc: TrainConfig, source: Any, *, exclude_bos: bool = True) -> int:
    """The optimiser steps a run takes: TrainConfig.steps, else n_tokens // batch_size, else a store's tokens (its
    non-BOS tokens when BOS rows are skipped) times epochs // batch_size. The trainer and its plan share it."""
    if tc.steps is not None:
        return int(tc.steps)
    if tc.n_tokens is not None:
        return max(1, int(tc.n_tokens) // tc.batch_size)
    if hasattr(source, "n_tokens"):
        n = int(source.n_tokens)
        st = getattr(source, "stats", None) if exclude_bos else None
        if isinstance(st, dict) and st.get("exclude_bos") and st.get("tokens"):
            n = int(st["tokens"])  # BOS rows are skipped by the stream: size the LR schedule to what is read
        return max(1, n * tc.epochs // tc.batch_size)
    raise SAEError("give TrainConfig.steps or n_tokens when the source is not an ActivationStore")


def geometric_median(points: torch.Tensor, max_iter: int = 200, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances (robust to outliers)."""
    pts = points.double()
    y = pts.mean(0)
    for _ in range(max_iter):
        dist = (pts - y).norm(dim=1).clamp_min(1e-12)
        w = 1.0 / dist
        y_new = (w[:, None] * pts).sum(0) / w.sum()
        if (y_new - y).norm() <= tol * max(1.0, float(y.norm())):
            y = y_new
            break
        y = y_new
    return y.to(points.dtype)


# ----------------------------------------------------------------------------- trainer
@dataclass
class _Slot:
    sae: SAE
    opt: torch.optim.Optimizer
    lr: float
    since_fired: torch.Tensor
    dead_mask: torch.Tensor | None = None
    any_dead: bool = False
    last: dict[str, float] = field(default_factory=dict)
    diverged: bool = False
    pending: tuple[StepOutput, torch.Tensor] | None = None  # last step's output and input, read when logging


class Trainer:
    """Trains a list of SAEs on one stream. Use train_sae / train_saes for the common case."""

    def __init__(self, cfgs: Sequence[SAEConfig], train_cfg: TrainConfig):
        if not cfgs:
            raise SAEError("no SAE configs given")
        d = {c.d_model for c in cfgs}
        if len(d) != 1:
            raise SAEError(f"all SAEs of a sweep must share d_model, got {sorted(d)}")
        self.cfgs = [copy.deepcopy(c) for c in cfgs]
        # paired architectures (transcoders) read [B, 2, d] batches: input rows, target rows, normalised apart
        paired = {bool(getattr(sae_class(c.arch), "paired", False)) for c in cfgs}
        if len(paired) != 1:
            raise SAEError("a sweep cannot mix transcoders (paired input -> target data) with SAEs")
        self.paired = paired.pop()
        self.target_scale = 1.0  # paired: training-time multiplier of the target rows
        self.tc = train_cfg
        self.device = torch.device(local_device(train_cfg.device))
        self.world, self.rank = join_process_group(self.device)  # started by torchrun: one rank of the group
        if train_cfg.batch_size % self.world:
            raise SAEError(f"batch_size={train_cfg.batch_size} must be divisible by the world size {self.world}")
        self.step = 0
        self.batches_consumed = 0
        self.norm_scale = 1.0
        self.norm_mean: torch.Tensor | None = None
        self.dim_scale: torch.Tensor | None = None  # per-dimension multiplier (massive dimensions), None = 1
        self.slots: list[_Slot] = []
        self.metrics_log: list[dict[str, Any]] = []

    @property
    def param_dtype(self) -> torch.dtype:
        """float32 master weights (bf16 is autocast only); float64 on request for exact comparisons."""
        return torch.float64 if canonical(self.tc.dtype) == "float64" else torch.float32

    # -- setup
    def _total_steps(self, source: Any) -> int:
        return total_steps(self.tc, source, exclude_bos=self.cfgs[0].exclude_bos)

    def _init_from_sample(self, sample: torch.Tensor) -> None:
        torch.manual_seed(self.tc.seed)
        sample = sample.to(self.device, self.param_dtype)
        target = None
        if self.paired:  # the input side takes the normalisation below; the target gets its own scale
            sample, target = sample[:, 0], sample[:, 1]
        c0 = self.cfgs[0]
        massive = self._scale_dims(sample, c0)
        centred = sample - self.norm_mean if self.norm_mean is not None else sample
        if self.dim_scale is not None:
            centred = centred * self.dim_scale
        if c0.normalize:
            self.norm_scale = float(math.sqrt(c0.d_model) / centred.norm(dim=1).mean().clamp_min(1e-12))
        xs = ys = centred * self.norm_scale
        if target is not None:
            if c0.normalize:
                self.target_scale = float(math.sqrt(c0.d_model) / target.norm(dim=1).mean().clamp_min(1e-12))
            ys = target * self.target_scale
        if self.tc.b_dec_init == "geometric_median":  # b_dec is the output's bias
            b = geometric_median(ys)
        elif self.tc.b_dec_init == "mean":
            b = ys.mean(0)
        else:  # "zero" (TrainConfig checks the name)
            b = torch.zeros(c0.d_model, device=self.device)
        n_tokens = self.total_steps * self.tc.batch_size
        for i, cfg in enumerate(self.cfgs):
            cfg.norm_scale = self.norm_scale
            cfg.norm_mean = None if self.norm_mean is None else self.norm_mean.cpu().tolist()
            cfg.dim_scale = None if self.dim_scale is None else self.dim_scale.cpu().tolist()
            cfg.massive_dims = massive
            cfg.norm_folded = False
            if self.paired:
                cfg.target_norm_scale = self.target_scale
            if cfg.dead_tokens is None:
                cfg.dead_tokens = default_dead_tokens(n_tokens, self.tc.batch_size)
            sae = build_sae(cfg, seed=self.tc.seed + i).to(self.device, self.param_dtype)
            with torch.no_grad():
                sae.b_dec.copy_(b)
            sae.init_from_data(xs if target is None else torch.stack([xs, ys], 1))
            lr = self.tc.lr if self.tc.lr is not None else default_lr(cfg)
            opt = adam(sae.parameters(), lr, self.tc.adam_betas, self.device)
            since = torch.zeros(cfg.n_features, dtype=torch.int64, device=self.device)
            self.slots.append(_Slot(sae, opt, lr, since))

    def _scale_dims(self, sample: torch.Tensor, c0: SAEConfig) -> list[int] | None:
        """Set norm_mean / dim_scale from the init sample by the config's input scaling; the massive dimensions.

        "auto" becomes "per-dim" when the massive dimensions carry over AUTO_VARIANCE_SHARE of the variance (one
        dimension then takes the MSE from all the others), else "none".
        "per-dim": every dimension is centred and scaled to the median dimension's spread; "massive": only each
        massive dimension is (the rest keep their geometry). Both are folded into the weights at the end, so the
        finished SAE reads and writes raw activations.
        """
        mean = sample.mean(0)
        if c0.mean_center:
            self.norm_mean = mean
        looked = c0.massive_ratio is not None
        massive = massive_dims(sample.square().mean(0).sqrt().cpu(), c0.massive_ratio) if looked else []
        std = sample.std(0)
        scaling = c0.input_scaling
        if scaling == "auto":
            share = float(std[massive].square().sum() / std.square().sum().clamp_min(1e-30)) if massive else 0.0
            scaling = "per-dim" if share > AUTO_VARIANCE_SHARE else "none"
        for cfg in self.cfgs:
            cfg.input_scaling = scaling  # what was applied is what the saved config says
        std = std.clamp_min(float(std.median()) * 1e-2 + 1e-12)  # a near-constant dimension is amplified 100x at most
        if scaling == "per-dim":
            self.norm_mean, self.dim_scale = mean, std.median() / std
        elif scaling == "massive" and massive:
            idx = torch.tensor(massive, device=sample.device)
            self.norm_mean = mean.clone() if self.norm_mean is not None else torch.zeros_like(mean)
            self.norm_mean[idx] = mean[idx]
            self.dim_scale = torch.ones_like(std)
            self.dim_scale[idx] = std.median() / std[idx]
        return massive if looked else None

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.paired:
            return torch.stack([self._normalise_input(x[:, 0]), x[:, 1] * self.target_scale], 1)
        return self._normalise_input(x)

    def _target(self, x: torch.Tensor) -> torch.Tensor:
        """The rows a (normalised) batch is reconstructed into: the target side of a paired batch, else itself."""
        return x[:, 1] if self.paired else x

    def _normalise_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_mean is not None:
            x = x - self.norm_mean
        if self.dim_scale is not None:
            x = x * self.dim_scale
        return x * self.norm_scale if self.norm_scale != 1.0 else x

    def _fold_scale(self) -> float | torch.Tensor:
        """The scalar scale, or the per-dimension one times it, as fold_normalization takes it."""
        if self.dim_scale is None:
            return self.norm_scale
        return self.dim_scale.cpu() * self.norm_scale

    # -- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "batches_consumed": self.batches_consumed,
            "total_steps": self.total_steps,
            "norm_scale": self.norm_scale,
            "norm_mean": self.norm_mean,
            "dim_scale": self.dim_scale,
            "target_scale": self.target_scale,
            "cfgs": [asdict(s.sae.cfg) for s in self.slots],
            "train_cfg": asdict(self.tc),
            "saes": [s.sae.state_dict() for s in self.slots],
            "opts": [s.opt.state_dict() for s in self.slots],
            "since_fired": [s.since_fired for s in self.slots],
            "dead_masks": [s.dead_mask for s in self.slots],
            "torch_rng": torch.get_rng_state(),
            "metrics_log": self.metrics_log,
            "last": [dict(s.last) for s in self.slots],  # each SAE's latest metrics: saved with it as "final"
        }

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.step, self.batches_consumed, self.total_steps = st["step"], st["batches_consumed"], st["total_steps"]
        self.norm_scale, self.norm_mean = st["norm_scale"], st["norm_mean"]
        self.dim_scale = st.get("dim_scale")  # checkpoints written before per-dimension scaling have none
        self.target_scale = st.get("target_scale", 1.0)
        self.cfgs = [SAEConfig.from_dict(c) for c in st["cfgs"]]
        self.slots = []
        for i, cfg in enumerate(self.cfgs):
            sae = build_sae(cfg, seed=None).to(self.device, self.param_dtype)
            sae.load_state_dict(st["saes"][i])
            lr = self.tc.lr if self.tc.lr is not None else default_lr(cfg)
            opt = adam(sae.parameters(), lr, self.tc.adam_betas, self.device)
            opt.load_state_dict(st["opts"][i])
            dm = None if st["dead_masks"][i] is None else st["dead_masks"][i].to(self.device)
            self.slots.append(
                _Slot(
                    sae, opt, lr, st["since_fired"][i].to(self.device), dm, bool(dm.any()) if dm is not None else False
                )
            )
        # the checkpoint was loaded onto the training device; torch keeps its RNG state on the CPU
        torch.set_rng_state(st["torch_rng"].cpu())
        self.metrics_log = st.get("metrics_log", [])
        for slot, last in zip(self.slots, st.get("last", [])):  # absent from checkpoints of earlier versions
            slot.last = dict(last)

    def save_checkpoint(self) -> None:
        if not self.tc.checkpoint_dir or self.rank != 0:
            return
        atomic_torch_save(self.state_dict(), Path(self.tc.checkpoint_dir) / "checkpoint.pt")

    def try_resume(self) -> bool:
        if not self.tc.checkpoint_dir:
            return False
        path = Path(self.tc.checkpoint_dir) / "checkpoint.pt"
        if not path.exists():
            return False
        try:
            st = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as e:
            raise SAEError(f"corrupt training checkpoint {path}: {e}") from e
        self.load_state_dict(st)
        return True

    # -- main loop
    def fit(self, source: Any, *, on_init: Callable[[list[SAE]], None] | None = None) -> list[SAE]:
        """Run (or resume) training. on_init(saes) may edit freshly initialised SAEs (not called on resume)."""
        tc = self.tc
        self._source = source  # only to name the shard of a bad row in errors
        resumed = self.try_resume()
        if not resumed:
            self.total_steps = self._total_steps(source)
        stream = make_stream(source, tc, self.cfgs[0], self.batches_consumed)
        if self.paired:
            stream = ((stack_pair(b, self.cfgs[0].d_model), m) for b, m in stream)
        if not resumed:
            first = []
            for _ in range(max(1, tc.init_batches)):
                try:
                    first.append(next(stream))
                except StopIteration:
                    break
            if not first:
                raise SAEError("the activation source produced no batches")
            for j, (xb, meta) in enumerate(first):
                self._check_batch(xb, meta, j)
            self._init_from_sample(torch.cat([b for b, _ in first]))
            if on_init is not None:
                on_init([s.sae for s in self.slots])
            stream = chain(first, stream)
        autocast = canonical(tc.dtype) == "bfloat16"
        progress = ProgressBar(
            "sae", self.total_steps, start=self.step, unit="steps", enabled=tc.progress and self.rank == 0
        )
        with progress:
            for xb, meta in stream:
                if self.step >= self.total_steps:
                    break
                self._train_step(xb, meta, autocast)
                if self.step % tc.log_every == 0 or self.step == self.total_steps:
                    self._log(progress)
                if tc.checkpoint_every and self.step % tc.checkpoint_every == 0:
                    self.save_checkpoint()
            if self.step < self.total_steps and self.step % tc.log_every and self.slots[0].pending is not None:
                self._log(progress)  # the data ran out between log steps: the SAE's final metrics are its last step
        if self.step < self.total_steps and self.rank == 0:
            self.metrics_log.append({"note": f"data ran out after {self.step} of {self.total_steps} steps"})
        if tc.checkpoint_every:
            self.save_checkpoint()
        return self.finished_saes()

    def finished_saes(self) -> list[SAE]:
        """Copies of the SAEs with free decoder norms and normalisation folded in (they act on raw activations)."""
        out = []
        for s in self.slots:
            sae = copy.deepcopy(s.sae).cpu()
            sae.fold_decoder_norm()
            sae.fold_normalization(self._fold_scale(), None if self.norm_mean is None else self.norm_mean.cpu())
            sae.train_metrics = s.last  # type: ignore[attr-defined]
            out.append(sae)
        return out

    def _check_batch(self, x: torch.Tensor, meta: Any, batch_no: int) -> None:
        d, src = self.cfgs[0].d_model, getattr(self, "_source", None)
        if not self.paired:
            check_batch(x, meta, batch_no, d, src)
            return
        if x.dim() != 3 or x.shape[1] != 2:
            raise SAEError(
                f"batch {batch_no} has shape {tuple(x.shape)}; a transcoder trains on [B, 2, {d}] batches (input and "
                "target rows, e.g. from harvest.stream_activations(..., target_site=...)) or (x, y) pairs"
            )
        check_batch(x[:, 0], meta, batch_no, d, src)
        check_batch(x[:, 1], meta, batch_no, d, src)

    def _train_step(self, xb: torch.Tensor, meta: Any, autocast: bool) -> None:
        batch_no = self.batches_consumed
        self._check_batch(xb, meta, batch_no)
        B = xb.shape[0]
        if self.world > 1:
            n = B // self.world
            xb = xb[self.rank * n : (self.rank + 1) * n]
        x = self._normalise(xb.to(self.device, self.param_dtype, non_blocking=True))
        progress = self.step / self.total_steps
        lr_f = lr_factor(self.step, self.total_steps, self.tc.warmup_frac, self.tc.decay_frac)
        for slot in self.slots:
            if slot.diverged:
                continue
            sae = slot.sae
            if slot.dead_mask is None or self.step % self.tc.dead_check_every == 0:
                slot.dead_mask = slot.since_fired >= sae.cfg.dead_tokens
                slot.any_dead = bool(slot.dead_mask.any())  # one sync per refresh, not per step
            use_aux = slot.any_dead and sae.uses_aux and sae.cfg.aux_coeff > 0
            dead = slot.dead_mask if use_aux else None
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
                aux_scale = None
                if dead is not None:
                    aux_scale = self._aux_scale(sae, self._target(x))
                out = sae.training_step(x, progress=progress, dead_mask=dead, aux_scale=aux_scale)
            loss = out.loss
            loss_g = loss.detach().clone()
            if self.world > 1:
                dist.all_reduce(loss_g)
            if not bool(torch.isfinite(loss_g)):
                slot.diverged = True
                raise TrainingDiverged(
                    f"loss became {float(loss_g)} at step {self.step} (batch {batch_no}) for SAE "
                    f"{sae.cfg.arch} k={sae.cfg.k} m={sae.cfg.n_features}; stopped, the last good "
                    f"checkpoint is kept in {self.tc.checkpoint_dir}"
                )
            slot.opt.zero_grad(set_to_none=False)
            loss.backward()
            params = [p for p in sae.parameters() if p.grad is not None]
            if self.world > 1:
                average_gradients(params)
                fired = out.fired.to(torch.uint8)
                dist.all_reduce(fired, op=dist.ReduceOp.MAX)
                fired = fired.bool()
            else:
                fired = out.fired
            sae.before_optimizer_step()
            if self.tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, self.tc.grad_clip)
            for g in slot.opt.param_groups:
                g["lr"] = slot.lr * lr_f
            slot.opt.step()
            sae.after_optimizer_step()
            slot.since_fired += B
            slot.since_fired.masked_fill_(fired, 0)
            slot.pending = (out, x)
        self.step += 1
        self.batches_consumed += 1

    def _aux_scale(self, sae: SAE, x: torch.Tensor) -> torch.Tensor:
        """Per-token variance of the (normalised) batch, global over ranks: AuxK loss is measured relative to it
        so its size does not depend on the activation scale."""
        with torch.no_grad():
            s = torch.stack([x.pow(2).sum(), x.new_tensor(float(x.shape[0]))])
            mu = x.sum(0)
            if self.world > 1:
                dist.all_reduce(s)
                dist.all_reduce(mu)
            n = s[1]
            var = (s[0] - mu.pow(2).sum() / n) / n
            return var.clamp_min(1e-12)

    def _log(self, progress: ProgressBar) -> None:
        self._record()
        s0 = self.slots[0].last
        progress.update(
            self.step, info=f"mse {s0['mse']:.4g} fvu {s0['fvu']:.3f} L0 {s0['l0']:.1f} dead {s0['dead_frac']:.2%}"
        )

    @torch.no_grad()
    def _record(self) -> None:
        """Each SAE's metrics on its last batch (slot.last) and one row of the metrics log."""
        row: dict[str, Any] = {"step": self.step, "tokens": self.step * self.tc.batch_size}
        for i, slot in enumerate(self.slots):
            out, x = slot.pending
            x = self._target(x)
            err = (x - out.recon.float()).pow(2).sum()
            var = (x - x.mean(0)).pow(2).sum()
            stats = torch.stack([err, var, out.l0 * x.shape[0], x.new_tensor(float(x.shape[0]))])
            if self.world > 1:
                dist.all_reduce(stats)
            n = float(stats[3])
            dead = (slot.since_fired >= slot.sae.cfg.dead_tokens).float().mean()
            slot.last = {
                "mse": float(stats[0]) / n / (self.target_scale if self.paired else self.norm_scale) ** 2,
                "fvu": float(stats[0] / stats[1].clamp_min(1e-12)),
                "l0": float(stats[2]) / n,
                "dead_frac": float(dead),
                "loss": float(out.loss.detach()),
                "aux": float(out.aux),
            }
            row[f"sae{i}"] = dict(slot.last)
        self.metrics_log.append(row)


# ----------------------------------------------------------------------------- entry points
def train_saes(
    cfgs: Sequence[SAEConfig],
    source: Any,
    train_cfg: TrainConfig | None = None,
    *,
    out_dirs: Sequence[str | Path] | None = None,
) -> list[SAE]:
    """Sweep: train every config on one pass over source (each batch read once, fed to all SAEs).

    source: an ActivationStore, a callable ``f(start_batch) -> iterator of [B, d] tensors`` (for on-the-fly
    harvesting; must be deterministic so resume can skip), or a re-iterable of [B, d] tensors.
    Returns SAEs acting on raw activations; saves each to out_dirs[i] if given.
    """
    tc = train_cfg or TrainConfig()
    trainer = Trainer(cfgs, tc)
    # one run at a time per checkpoint folder (the CLI's is inside --out): a second would interleave checkpoints
    lock = _checkpoint_lock(tc.checkpoint_dir) if trainer.rank == 0 else None
    try:
        saes = trainer.fit(source)
        if out_dirs is not None and trainer.rank == 0:
            from .formats import save_sae

            for sae, d in zip(saes, out_dirs):
                save_sae(
                    sae,
                    d,
                    metrics={
                        "final": getattr(sae, "train_metrics", {}),
                        "log": trainer.metrics_log,
                        "train_cfg": asdict(tc),
                    },
                )
    finally:
        if lock is not None:  # a checkpoint folder left empty (a failure before the first checkpoint) goes again
            lock.release(remove=lock.holds_only_itself())
    return saes


def _checkpoint_lock(checkpoint_dir: str | Path | None) -> exclusive_lock | None:
    """The lock of a training run's checkpoint folder (None without one): a second run of the same folder stops
    with an SAEError naming it."""
    if not checkpoint_dir:
        return None
    return exclusive_lock(Path(checkpoint_dir) / LOCK_NAME, f"SAE training checkpoints to {checkpoint_dir}", SAEError)


def train_sae(
    cfg: SAEConfig, source: Any, train_cfg: TrainConfig | None = None, *, out_dir: str | Path | None = None
) -> SAE:
    """Train one SAE (see train_saes)."""
    return train_saes([cfg], source, train_cfg, out_dirs=None if out_dir is None else [out_dir])[0]
