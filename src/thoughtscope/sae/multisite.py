"""Many dictionaries from one forward pass: one trainer per site, all fed by the same stream of [B, S, ...] batches.

A transcoder for every block (or SAEs at several residual sites) needs the same tokens at every site; reading them
in one pass makes the forward pass a shared cost, so the time grows with the dictionaries, not with passes. Each
site keeps its own Trainer (its own normalisation scales, optimiser, dead-latent counters and learning-rate
schedule), so a site trained here ends bit-identical to that site trained alone on the same batches
(tests/test_multisite.py). One progress bar, one checkpoint holding every site's state; a killed run resumes.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_torch_save
from ..dtypes import canonical
from ..progress import ProgressBar
from .base import SAE
from .config import SAEConfig, SAEError, TrainConfig
from .stream import chain, make_stream
from .train import Trainer, _checkpoint_lock

CHECKPOINT_NAME = "checkpoint.pt"


class MultiSiteTrainer:
    """Trains one dictionary per site (cfgs[i] reads slot i of every batch) on one stream."""

    def __init__(self, cfgs: Sequence[SAEConfig], train_cfg: TrainConfig):
        if not cfgs:
            raise SAEError("no dictionary configs given")
        sites = [(c.site, c.target_site) for c in cfgs]
        if all(s for s, _ in sites) and len(set(sites)) != len(sites):
            raise SAEError(f"two dictionaries of a multi-site run read the same site: {sites}")
        self.tc = train_cfg
        # each site's trainer: no checkpoints or bar of its own (this one writes one checkpoint and one bar)
        sub = dataclasses.replace(train_cfg, checkpoint_dir=None, progress=False)
        self.trainers = [Trainer([c], sub) for c in cfgs]
        if self.trainers[0].world > 1:
            raise SAEError("multi-site training runs in one process; train sites on separate ranks with torchrun")
        self.step = 0
        self.batches_consumed = 0
        self.total_steps = 0

    # -- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "batches_consumed": self.batches_consumed,
            "total_steps": self.total_steps,
            "trainers": [t.state_dict() for t in self.trainers],
        }

    def load_state_dict(self, st: dict[str, Any]) -> None:
        if len(st["trainers"]) != len(self.trainers):
            raise SAEError(
                f"the checkpoint holds {len(st['trainers'])} sites, this run has {len(self.trainers)}: "
                "resume with the same sites, or start in a new folder"
            )
        self.step, self.batches_consumed, self.total_steps = st["step"], st["batches_consumed"], st["total_steps"]
        for t, s in zip(self.trainers, st["trainers"]):
            t.load_state_dict(s)

    def _checkpoint_path(self) -> Path | None:
        return Path(self.tc.checkpoint_dir) / CHECKPOINT_NAME if self.tc.checkpoint_dir else None

    def save_checkpoint(self) -> None:
        path = self._checkpoint_path()
        if path is not None:
            atomic_torch_save(self.state_dict(), path)

    def try_resume(self) -> bool:
        path = self._checkpoint_path()
        if path is None or not path.exists():
            return False
        try:
            st = torch.load(path, map_location=self.trainers[0].device, weights_only=False)
        except Exception as e:
            raise SAEError(f"corrupt training checkpoint {path}: {e}") from e
        self.load_state_dict(st)
        return True

    # -- main loop
    def fit(self, source: Any) -> list[SAE]:
        """Run (or resume) training on `source` (as Trainer.fit takes it; every batch [B, S, ...], S = sites)."""
        tc = self.tc
        resumed = self.try_resume()
        if not resumed:
            self.total_steps = self.trainers[0]._total_steps(source)
        stream = make_stream(source, tc, self.trainers[0].cfgs[0], self.batches_consumed)
        if not resumed:
            first = [b for _, b in zip(range(max(1, tc.init_batches)), stream)]
            if not first:
                raise SAEError("the activation source produced no batches")
            sample = torch.cat([self._check(b) for b, _ in first])
            for i, t in enumerate(self.trainers):
                t.total_steps = self.total_steps
                t._init_from_sample(sample[:, i])
            stream = chain(first, stream)
        autocast = canonical(tc.dtype) == "bfloat16"
        with ProgressBar("dictionaries", self.total_steps, start=self.step, unit="steps", enabled=tc.progress) as bar:
            for xb, meta in stream:
                if self.step >= self.total_steps:
                    break
                xb = self._check(xb)
                for i, t in enumerate(self.trainers):
                    t._train_step(xb[:, i], meta, autocast)
                self.step += 1
                self.batches_consumed += 1
                if self.step % tc.log_every == 0 or self.step == self.total_steps:
                    self._log(bar)
                if tc.checkpoint_every and self.step % tc.checkpoint_every == 0:
                    self.save_checkpoint()
        if tc.checkpoint_every:
            self.save_checkpoint()
        return [t.finished_saes()[0] for t in self.trainers]

    def _check(self, xb: torch.Tensor) -> torch.Tensor:
        want = 3 + bool(self.trainers[0].paired)
        if not isinstance(xb, torch.Tensor) or xb.dim() != want or xb.shape[1] != len(self.trainers):
            got = tuple(xb.shape) if isinstance(xb, torch.Tensor) else type(xb).__name__
            raise SAEError(
                f"a multi-site batch is [B, {len(self.trainers)} sites, {'2, ' if want == 4 else ''}d], got {got} "
                "(harvest.stream_activations with a list of sites gives it)"
            )
        return xb

    def _log(self, bar: ProgressBar) -> None:
        for t in self.trainers:
            t._record()
        last = [t.slots[0].last for t in self.trainers]
        fvu = sum(m["fvu"] for m in last) / len(last)
        worst = max(range(len(last)), key=lambda i: last[i]["fvu"])
        l0 = sum(m["l0"] for m in last) / len(last)
        bar.update(self.step, info=f"mean fvu {fvu:.3f} (worst {worst}: {last[worst]['fvu']:.3f}) mean L0 {l0:.1f}")


def train_multisite(
    cfgs: Sequence[SAEConfig],
    source: Any,
    train_cfg: TrainConfig | None = None,
    *,
    out_dirs: Sequence[str | Path] | None = None,
) -> list[SAE]:
    """Train cfgs[i] on slot i of every batch of `source`, all from one pass; save each to out_dirs[i] if given.
    Resumable from train_cfg.checkpoint_dir (one run per folder)."""
    tc = copy.deepcopy(train_cfg or TrainConfig())
    trainer = MultiSiteTrainer(cfgs, tc)
    lock = _checkpoint_lock(tc.checkpoint_dir)
    try:
        saes = trainer.fit(source)
        if out_dirs is not None:
            from .formats import save_sae

            for sae, t, d in zip(saes, trainer.trainers, out_dirs):
                metrics = {
                    "final": getattr(sae, "train_metrics", {}),
                    "log": t.metrics_log,
                    "train_cfg": dataclasses.asdict(tc),
                }
                save_sae(sae, d, metrics=metrics)
    finally:
        if lock is not None:
            lock.release(remove=lock.holds_only_itself())
    return saes
