"""The SAE contenders of the ground-truth benchmark (sae_quality.py), each through its own unmodified training loop.

Every contender trains on the batch sequence it is handed (the same one for all), at a learning rate and a sparsity
setting chosen by the benchmark, and hands back a :class:`Fitted`: an ``encode`` from raw rows to dense latent
activations, the matching ``decode`` and its decoder rows ``W_dec`` [m, d] in raw-activation units, which is all
the ground-truth metrics need. Settings not named in :meth:`settings` are each tool's defaults.

Sparsity knob: ``k`` for the top-k family (TopK, BatchTopK, Matryoshka BatchTopK; BatchTopK keeps k per row on
average), the L1 coefficient for ReLU-L1 and the L0 coefficient for JumpReLU (searched by the benchmark to reach
each target L0).

* ``thoughtscope-*``: :class:`thoughtscope.sae.Trainer` with its defaults (inputs scaled to mean norm sqrt(d),
  b_dec at the geometric median of the first batch, LR warm-up 1 % and linear decay over the last 20 %, AuxK for the
  top-k family). The trained SAE has its normalisation folded into the weights, so it reads raw rows.
* ``saelens-*``: ``SAETrainer.fit`` with the trainer settings of SAELens' own synthetic-data helper
  (``sae_lens.synthetic.training.train_toy_sae``: constant LR, Adam (0.9, 0.999), dead-feature window 1000 steps,
  no input normalisation) and each architecture's training-config defaults; SynthSAEBench's documented LR 3e-4 is its
  default. Matryoshka BatchTopK gets the same nested widths as ours. After training, every SAELens SAE is saved with
  ``save_inference_model`` and read back with ``SAE.load_from_disk``: the inference form SAELens ships (BatchTopK
  and Matryoshka become JumpReLU with the learned global threshold), which is what a user of it would evaluate.
* ``sparsify-topk``: EleutherAI's trainer, through the stand-in model of ``_contenders.Sparsify`` (its loop, loss,
  optimiser and bookkeeping unchanged), weights read in ScheduleFree's eval mode as it saves them.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from _contenders import Sparsify
from _settings import split

from thoughtscope.sae import SAEConfig, TrainConfig, Trainer
from thoughtscope.sae.train import default_lr as ours_default_lr


@dataclass
class Fitted:
    """A trained contender as the metrics see it: raw rows in, dense latents out; decoder rows in raw units."""

    encode: Callable[[torch.Tensor], torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]
    W_dec: torch.Tensor


def matryoshka_widths(m: int) -> list[int]:
    """Nested prefix sizes shared by ours and SAELens: m/32, m/8, m/2 (SynthSAEBench's 128, 512, 2048 of 4096)."""
    return sorted({max(1, m // 32), max(2, m // 8), max(3, m // 2)})


class _Base:
    tool = ""
    arch = ""
    knob = "k"  # the sparsity setting the benchmark varies: "k", "l1" or "l0"

    def __init__(self, d: int, m: int, *, batch_size: int, n_steps: int, seed: int = 0):
        self.d, self.m, self.batch_size, self.n_steps, self.seed = d, m, batch_size, n_steps, seed

    @property
    def name(self) -> str:
        return f"{self.tool}-{self.arch}"

    def default_knob(self) -> float:
        raise NotImplementedError

    def default_lr(self) -> float:
        raise NotImplementedError

    def settings(self) -> dict:
        raise NotImplementedError

    def fit(self, batches: Iterable[torch.Tensor], lr: float, knob: float) -> Fitted:
        raise NotImplementedError


class Ours(_Base):
    tool = "thoughtscope"

    def __init__(self, arch: str, d: int, m: int, *, changed: dict | None = None, **kw):
        super().__init__(d, m, **kw)
        self.arch = arch
        self.knob = {"relu-l1": "l1", "jumprelu": "l0"}.get(arch, "k")
        self.changed = dict(changed or {})  # settings away from the defaults (sae_quality --ours-setting)
        self.sae_changed, self.train_changed = split(self.changed)

    def config(self, knob: float) -> SAEConfig:
        kw: dict = {"arch": self.arch, "d_model": self.d, "n_features": self.m}
        if self.knob == "l1":
            kw["l1_coeff"] = float(knob)
        elif self.knob == "l0":
            kw["l0_coeff"] = float(knob)
        else:
            kw["k"] = int(round(knob))
        if self.arch == "matryoshka":
            kw["matryoshka_prefixes"] = tuple(w for w in matryoshka_widths(self.m) if w < self.m)
        return SAEConfig(**kw, **self.sae_changed)

    def default_knob(self) -> float:
        return {"l1": SAEConfig.l1_coeff, "l0": SAEConfig.l0_coeff}.get(self.knob, 25)

    def default_lr(self) -> float:
        return ours_default_lr(self.config(self.default_knob()))

    def settings(self) -> dict:
        s = {
            "tool": "thoughtscope",
            "config": "TrainConfig / SAEConfig defaults (Adam, warm-up 1% and linear decay over the last 20% of "
            "steps, inputs scaled to mean norm sqrt(d), b_dec at the geometric median of the first batch)",
        }
        s["decoder_norm"] = self.config(self.default_knob()).decoder_norm
        if self.arch == "matryoshka":
            s["matryoshka_prefixes"] = list(self.config(25).matryoshka_prefixes)
        if self.changed:
            s["changed_from_defaults"] = dict(self.changed)
        return s

    def fit(self, batches, lr, knob) -> Fitted:
        tc = TrainConfig(
            batch_size=self.batch_size,
            steps=self.n_steps,
            lr=lr,
            progress=False,
            checkpoint_every=0,
            seed=self.seed,
            **self.train_changed,
        )
        sae = Trainer([self.config(knob)], tc).fit(iter(batches))[0]
        sae.eval()
        return Fitted(encode=sae.encode, decode=sae.decode, W_dec=sae.W_dec.detach())


_SAELENS_ARCH = {
    "standard": ("standard_sae", "StandardTrainingSAE", "l1"),
    "topk": ("topk_sae", "TopKTrainingSAE", "k"),
    "batchtopk": ("batchtopk_sae", "BatchTopKTrainingSAE", "k"),
    "jumprelu": ("jumprelu_sae", "JumpReLUTrainingSAE", "l0"),
    "matryoshka_batchtopk": ("matryoshka_batchtopk_sae", "MatryoshkaBatchTopKTrainingSAE", "k"),
}


class SAELens(_Base):
    tool = "saelens"

    def __init__(self, arch: str, d: int, m: int, **kw):
        super().__init__(d, m, **kw)
        self.arch = arch
        self.knob = _SAELENS_ARCH[arch][2]

    def _classes(self):
        import importlib

        mod_name, cls_name, _ = _SAELENS_ARCH[self.arch]
        mod = importlib.import_module(f"sae_lens.saes.{mod_name}")
        return getattr(mod, cls_name), getattr(mod, cls_name + "Config")

    def default_knob(self) -> float:
        _, cfg_cls = self._classes()
        if self.knob == "l1":
            return cfg_cls.l1_coefficient
        if self.knob == "l0":
            return cfg_cls.l0_coefficient
        return 25

    def default_lr(self) -> float:
        return 3e-4  # SAETrainerConfig's default, and SynthSAEBench's documented LR for every architecture

    def settings(self) -> dict:
        import sae_lens

        s = {
            "tool": "sae-lens",
            "version": sae_lens.__version__,
            "config": "trainer settings of sae_lens.synthetic.training.train_toy_sae (constant LR, Adam 0.9/0.999, "
            "dead_feature_window 1000, no input normalisation), architecture config defaults; evaluated in "
            "its saved inference form",
        }
        if self.arch == "matryoshka_batchtopk":
            s["matryoshka_widths"] = matryoshka_widths(self.m) + [self.m]
        return s

    def fit(self, batches, lr, knob) -> Fitted:
        from sae_lens import SAE
        from sae_lens.config import LoggingConfig, SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer

        sae_cls, cfg_cls = self._classes()
        kw: dict = {"d_in": self.d, "d_sae": self.m}
        if self.knob == "l1":
            kw["l1_coefficient"] = float(knob)
        elif self.knob == "l0":
            kw["l0_coefficient"] = float(knob)
        else:
            kw["k"] = float(knob) if "batchtopk" in self.arch else int(round(knob))
        if self.arch == "matryoshka_batchtopk":
            kw["matryoshka_widths"] = matryoshka_widths(self.m) + [self.m]
        torch.manual_seed(self.seed)
        sae = sae_cls(cfg_cls(**kw))
        tcfg = SAETrainerConfig(
            n_checkpoints=0,
            checkpoint_path=None,
            save_final_checkpoint=False,
            total_training_samples=self.batch_size * self.n_steps,
            train_batch_size_samples=self.batch_size,
            lr=lr,
            lr_end=lr,
            lr_scheduler_name="constant",
            adam_beta1=0.9,
            adam_beta2=0.999,
            dead_feature_window=1000,
            feature_sampling_window=2000,
            logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            SAETrainer(cfg=tcfg, sae=sae, data_provider=iter(batches)).fit()
            with tempfile.TemporaryDirectory(prefix="bench-saelens-") as tmp:
                sae.save_inference_model(tmp)
                inf = SAE.load_from_disk(tmp)
        inf.eval()
        return Fitted(encode=inf.encode, decode=inf.decode, W_dec=inf.W_dec.detach())


class SparsifyTopK(_Base):
    tool = "sparsify"
    arch = "topk"

    def default_knob(self) -> float:
        return 25

    def default_lr(self) -> float:
        return 5e-3 / math.sqrt(self.m / 2**14)  # its TrainConfig rule

    def settings(self) -> dict:
        s = Sparsify("topk", self.d, self.m, k=25, batch_size=self.batch_size, n_steps=self.n_steps).settings()
        return {k: v for k, v in s.items() if k != "k"}

    def fit(self, batches, lr, knob) -> Fitted:
        run = Sparsify("topk", self.d, self.m, k=int(round(knob)), batch_size=self.batch_size, n_steps=self.n_steps)
        torch.manual_seed(self.seed)
        run.fit(iter(batches), lr)
        sae = next(iter(run.trainer.saes.values()))
        opts = [o for o in run.trainer.optimizers if hasattr(o, "eval")]
        for o in opts:  # ScheduleFree's eval weights, as sparsify saves them
            o.eval()
        m = self.m

        @torch.no_grad()
        def encode(x):
            acts, idx, _ = sae.encode(x)
            return torch.zeros(x.shape[0], m, dtype=acts.dtype).scatter_(1, idx, acts.relu())

        @torch.no_grad()
        def decode(f):
            return f @ sae.W_dec + sae.b_dec

        return Fitted(encode=encode, decode=decode, W_dec=sae.W_dec.detach().clone())


OURS_ARCHS = ("relu-l1", "topk", "batchtopk", "jumprelu", "matryoshka")
SAELENS_ARCHS = ("standard", "topk", "batchtopk", "jumprelu", "matryoshka_batchtopk")


def all_contenders(
    d: int, m: int, *, batch_size: int, n_steps: int, seed: int = 0, ours_changed: dict | None = None
) -> tuple[list[_Base], dict]:
    """Every contender that can run here, and why the others cannot (missing package or architecture);
    ``ours_changed``: settings our contenders train with instead of the defaults."""
    import importlib

    from thoughtscope.sae.registry import BUILTIN

    kw = {"batch_size": batch_size, "n_steps": n_steps, "seed": seed}
    out: list[_Base] = []
    skipped: dict[str, str] = {}
    for arch in OURS_ARCHS:
        if arch not in BUILTIN:
            skipped[f"thoughtscope-{arch}"] = "architecture not built into this checkout"
            continue
        importlib.import_module(f"thoughtscope.sae.{BUILTIN[arch]}")  # registers it (only this one)
        out.append(Ours(arch, d, m, changed=ours_changed, **kw))
    for tool, mod, make in (
        ("saelens", "sae_lens", lambda: [SAELens(a, d, m, **kw) for a in SAELENS_ARCHS]),
        ("sparsify", "sparsify", lambda: [SparsifyTopK(d, m, **kw)]),
    ):
        try:
            __import__(mod)
        except ImportError as e:
            skipped[tool] = f"not installed ({e}); pip install -e '.[bench]' and eai-sparsify"
            continue
        out += make()
    return out, skipped
