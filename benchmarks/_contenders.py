"""The SAE contenders, each run through its own unmodified training loop on the batches it is handed.

Every contender gets the same batch sequence (an iterator whose hand-overs the :class:`~_race.Baton` times), trains
for the same number of steps at a learning rate chosen by the benchmark, and exposes :meth:`current`: its weights
as an (x -> reconstruction, fired latents, active count) function on raw rows, usable mid-run (for the
time-to-quality curve) and after the run. Settings not listed in :meth:`settings` are each tool's defaults.

* ``thoughtscope``: :class:`thoughtscope.sae.Trainer` with its defaults (inputs scaled to mean norm sqrt(d), b_dec at
  the geometric median of the first batch, AuxK after 10 % of the run without firing, LR warm-up 1 %, linear decay
  over the last 20 %).
* ``saelens``: ``SAETrainer.fit``. TopK: ``TopKTrainingSAEConfig`` defaults (no input normalisation, AuxK
  coefficient 1, dead after the default 1000-step window, constant LR); the decoder bias starts at the mean of the
  first batch (SAELens v6 starts it at 0, which measured worse). ReLU-L1: the settings of SAELens' training
  tutorial (``StandardTrainingSAEConfig``, ``expected_average_only_in`` normalisation with the scale it would
  estimate, L1 coefficient 5 warmed up over 5 % of steps, LR decay over the last 20 %).
* ``sparsify``: EleutherAI's ``Trainer.fit`` with its defaults (Signum under ScheduleFree, LR 5e-3 / sqrt(m / 2^14),
  b_dec at the first batch's mean, AuxK off). Its trainer reads a model through forward hooks, so it is handed a
  stand-in "model" whose only layer outputs the cached batch named by the input ids (:class:`_ReplayLM`); its loop,
  loss, optimiser and bookkeeping run unchanged. Its weights are read in ScheduleFree's eval mode, as it saves them.
"""

from __future__ import annotations

import copy
import math
import tempfile
from types import SimpleNamespace

import torch
from torch import nn

from thoughtscope.sae import SAEConfig, TrainConfig, Trainer
from thoughtscope.sae.train import default_lr as ours_default_lr


def _dense_fn(encode, decode, scale: float = 1.0, device="cpu"):
    """EncodeDecode for dense feature tensors; ``scale``: the contender works on x * scale (FVU is unchanged);
    ``device``: where the contender's weights are (rows go there, results come back to the CPU)."""

    def fn(x):
        f = encode(x.to(device) * scale)
        act = f > 0
        return (decode(f) / scale).cpu(), act.any(0).cpu(), int(act.sum())

    return fn


def _cpu_only(tool: str, device) -> None:
    if torch.device(device).type != "cpu":
        raise ValueError(f"the {tool} contender runs on the CPU only here, not on {device}")


class Ours:
    name = "thoughtscope"

    def __init__(
        self,
        arch: str,
        d: int,
        m: int,
        *,
        k: int = 32,
        l1: float = 5.0,
        batch_size: int,
        n_steps: int,
        device: str = "cpu",
    ):
        self.cfg = SAEConfig(arch=arch, d_model=d, n_features=m, k=k, l1_coeff=l1)
        self.batch_size, self.n_steps, self.device = batch_size, n_steps, device
        self.trainer: Trainer | None = None
        self.final = None

    def default_lr(self) -> float:
        return ours_default_lr(self.cfg)

    def settings(self) -> dict:
        common = (
            "TrainConfig / SAEConfig defaults (Adam, warm-up 1% and linear decay over the last 20% of steps, "
            "inputs scaled to mean norm sqrt(d), b_dec at the geometric median of the first batch, "
        )
        arch = (
            f"AuxK on latents silent for 10% of the run, decoder norms {self.cfg.decoder_norm})"
            if self.cfg.arch == "topk"
            else "L1 weighted by decoder norms, lambda warm-up 5% of steps)"
        )
        return {
            "tool": "thoughtscope",
            "config": common + arch,
            **({"k": self.cfg.k} if self.cfg.arch == "topk" else {"l1_coeff": self.cfg.l1_coeff}),
        }

    def fit(self, feed, lr: float) -> None:
        tc = TrainConfig(
            batch_size=self.batch_size,
            steps=self.n_steps,
            lr=lr,
            progress=False,
            checkpoint_every=0,
            device=self.device,
        )
        self.trainer = Trainer([self.cfg], tc)
        self.final = self.trainer.fit(feed)[0].to(self.device)  # the trainer hands it back on the CPU

    @torch.no_grad()
    def current(self):
        if self.final is not None:
            return _dense_fn(self.final.encode, self.final.decode, device=self.device)
        tr = self.trainer
        sae = tr.slots[0].sae
        if sae.cfg.decoder_norm == "free":  # mid-run: read it as it will be saved, norms folded into the encoder
            sae = copy.deepcopy(sae)
            sae.fold_decoder_norm()
        mean = tr.norm_mean

        def fn(x):
            x = x.to(tr.device)
            xn = (x - mean if mean is not None else x) * tr.norm_scale
            f = sae.encode(xn)
            act = f > 0
            recon = sae.decode(f) / tr.norm_scale + (mean if mean is not None else 0)
            return recon.cpu(), act.any(0).cpu(), int(act.sum())

        return fn


class SAELens:
    name = "saelens"

    def __init__(
        self,
        arch: str,
        d: int,
        m: int,
        *,
        k: int = 32,
        l1: float = 5.0,
        batch_size: int,
        n_steps: int,
        first_batch: torch.Tensor,
        mean_norm: float,
        device: str = "cpu",
    ):
        _cpu_only("sae-lens", device)
        self.arch, self.d, self.m, self.k, self.l1 = arch, d, m, k, l1
        self.batch_size, self.n_steps = batch_size, n_steps
        self.b_dec0 = first_batch.mean(0)
        self.scale = math.sqrt(d) / mean_norm if arch == "relu-l1" else None
        self.sae = None
        self.trainer = None
        self.done = False

    def default_lr(self) -> float:
        if self.arch == "relu-l1":
            return 5e-5  # the training tutorial's value (SAETrainerConfig's bare default is 3e-4)
        from sae_lens.config import SAETrainerConfig

        return SAETrainerConfig.lr

    def settings(self) -> dict:
        import sae_lens

        s = {"tool": "sae-lens", "version": sae_lens.__version__}
        if self.arch == "topk":
            s.update(
                k=self.k,
                config="TopKTrainingSAEConfig defaults (normalize_activations none, aux coefficient "
                "1, dead_feature_window 1000 steps, constant LR)",
                b_dec_init="mean of the first batch",
            )
        else:
            s.update(
                l1_coefficient=self.l1,
                config="training tutorial: StandardTrainingSAEConfig, "
                "normalize_activations expected_average_only_in, l1 warm-up 5% of steps, LR decay last 20%",
                b_dec_init="mean of the first batch",
            )
        return s

    def fit(self, feed, lr: float) -> None:
        from sae_lens.config import SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer

        n, B = self.n_steps, self.batch_size
        if self.arch == "topk":
            from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

            sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=self.d, d_sae=self.m, k=self.k))
            tcfg = SAETrainerConfig(total_training_samples=B * n, train_batch_size_samples=B, lr=lr, lr_end=lr / 10)
        else:
            from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig

            sae = StandardTrainingSAE(
                StandardTrainingSAEConfig(
                    d_in=self.d,
                    d_sae=self.m,
                    l1_coefficient=self.l1,
                    l1_warm_up_steps=max(1, n // 20),
                    normalize_activations="expected_average_only_in",
                )
            )
            tcfg = SAETrainerConfig(
                total_training_samples=B * n,
                train_batch_size_samples=B,
                lr=lr,
                lr_end=lr / 10,
                lr_decay_steps=max(1, n // 5),
            )
        with torch.no_grad():
            sae.b_dec.copy_(self.b_dec0 * (self.scale or 1.0))
        self.sae = sae
        self.trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=feed)
        if self.scale is not None:  # what its 1000-batch estimate gives, without reading 1000 batches first
            self.trainer.activation_scaler.scaling_factor = self.scale
        self.trainer.fit()
        self.done = True

    @torch.no_grad()
    def current(self):
        # before fit's end the weights act on x * scale; fit folds the scale into them when it finishes
        return _dense_fn(self.sae.encode, self.sae.decode, self.scale if (self.scale and not self.done) else 1.0)


class _Replay(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.d = d
        self.source = None

    def forward(self, input_ids):
        if int(input_ids.reshape(-1)[0]) < 0:  # the trainer's width probe (dummy inputs)
            return torch.zeros(1, input_ids.shape[-1], self.d)
        return next(self.source).unsqueeze(0)


class _ReplayLM(nn.Module):
    """Stands in for the language model in sparsify's trainer: its one layer outputs the next cached batch."""

    def __init__(self, d: int):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=1)
        self.layers = nn.ModuleList([_Replay(d)])
        self.dummy_inputs = {"input_ids": torch.full((1, 2), -1)}

    @property
    def base_model(self):
        return self

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, input_ids, **_):
        return self.layers[0](input_ids)


class _StepIds(torch.utils.data.Dataset):
    def __init__(self, n_steps: int, batch_size: int):
        self.n, self.B = n_steps, batch_size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"input_ids": torch.full((self.B,), i, dtype=torch.long)}


class Sparsify:
    name = "sparsify"

    def __init__(
        self, arch: str, d: int, m: int, *, k: int = 32, batch_size: int, n_steps: int, device: str = "cpu", **_
    ):
        _cpu_only("sparsify", device)
        if arch != "topk":
            raise ValueError("sparsify trains TopK SAEs only")
        self.d, self.m, self.k = d, m, k
        self.batch_size, self.n_steps = batch_size, n_steps
        self.trainer = None
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-sparsify-")

    def default_lr(self) -> float:
        return 5e-3 / math.sqrt(self.m / 2**14)

    def settings(self) -> dict:
        import sparsify

        return {
            "tool": "eai-sparsify",
            "version": sparsify.__version__,
            "k": self.k,
            "config": "TrainConfig defaults: optimizer signum (ScheduleFree wrapper), loss fvu, auxk_alpha 0, "
            "b_dec at the first batch's mean, unit-norm decoder",
            "decoder": "eager embedding_bag (Triton is GPU-only)",
        }

    def fit(self, feed, lr: float) -> None:
        from sparsify import SparseCoderConfig
        from sparsify import TrainConfig as SpTrainConfig
        from sparsify import Trainer as SpTrainer

        model = _ReplayLM(self.d)
        model.layers[0].source = iter(feed)
        cfg = SpTrainConfig(
            SparseCoderConfig(num_latents=self.m, k=self.k),
            batch_size=1,
            lr=lr,
            log_to_wandb=False,
            save_dir=self._tmp.name,
            save_every=10**9,
        )
        self.trainer = SpTrainer(cfg, _StepIds(self.n_steps, self.batch_size), model)
        self.trainer.fit()

    @torch.no_grad()
    def current(self):
        sae = next(iter(self.trainer.saes.values()))
        opts = [o for o in self.trainer.optimizers if hasattr(o, "eval")]

        def fn(x):
            for o in opts:
                o.eval()
            try:
                acts, idx, _ = sae.encode(x)
                recon = sae.decode(acts, idx)
                fired = torch.zeros(self.m, dtype=torch.bool)
                fired[idx[acts > 0]] = True
                return recon, fired, int((acts > 0).sum())
            finally:
                for o in opts:
                    o.train()

        return fn


CONTENDERS = {"thoughtscope": Ours, "saelens": SAELens, "sparsify": Sparsify}
