"""SAE and training configuration: the defaults live here, and a bad value fails at construction.

Torch-free on purpose: the CLI reads its option defaults from these classes without importing torch.
Units: ``batch_size`` is rows (tokens) per optimiser step, ``n_tokens`` the token budget of a run.
"""

from __future__ import annotations

import warnings
from dataclasses import InitVar, asdict, dataclass, field, fields
from typing import Any

from ..dtypes import TRAIN_DTYPES, canonical
from ..errors import SAEError  # noqa: F401  (re-exported: their old home)
from ..values import is_finite as _is_number
from .registry import sae_class


def _bad(owner: str, name: str, value: Any, expected: str) -> SAEError:
    return SAEError(f"{owner}.{name}={value!r}: expected {expected}")


def _check(owner: str, obj: Any, rules: dict[str, tuple[Any, str]]) -> None:
    """Each rule is (predicate, what was expected); the first failing field raises SAEError naming it."""
    for name, (ok, expected) in rules.items():
        value = getattr(obj, name)
        try:
            good = bool(ok(value))
        except TypeError:
            good = False
        if not good:
            raise _bad(owner, name, value, expected)


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _nonneg_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _frac(v: Any) -> bool:
    return _is_number(v) and 0 <= v <= 1


def _nonneg(v: Any) -> bool:
    return _is_number(v) and v >= 0


def _pos(v: Any) -> bool:
    return _is_number(v) and v > 0


INPUT_SCALINGS = ("auto", "none", "massive", "per-dim")
AUTO_VARIANCE_SHARE = 0.25  # "auto" standardises every dimension when the massive ones carry more of the variance


@dataclass
class SAEConfig:
    """Everything needed to rebuild an SAE and to know what it was trained on."""

    arch: str = "topk"
    """Architecture name: relu-l1, topk, batchtopk, jumprelu, matryoshka, transcoder (TopK) or jumprelu-transcoder
    (or a registered one)."""
    d_model: int = 576
    """Width of the activations it reads (numbers per token)."""
    n_features: int = 9216
    """Dictionary size (latents)."""
    k: int = 32
    """Topk / batchtopk: active latents per token (count)."""
    l1_coeff: float = 5.0
    """Relu-l1: sparsity coefficient lambda of sum_i f_i * ||W_dec,i|| (unitless weight on the loss)."""
    l1_warmup_frac: float = 0.05
    """Relu-l1: lambda ramps linearly from 0 over this share of steps (fraction of the run, 0-1)."""
    init_density: float | None = None
    """Relu-l1: b_enc set so each latent fires on this share of the init sample (fraction of tokens, 0-1);
    None keeps b_enc at 0."""
    k_aux: int | None = None
    """AuxK: dead latents used to model the residual (count); None = d_model // 2."""
    aux_coeff: float = 1.0 / 32.0
    """AuxK loss coefficient (unitless weight on the loss; 0 disables AuxK)."""
    dead_tokens: int | None = None
    """A latent is dead after this many tokens without firing; None = the rule in train.default_dead_tokens."""
    threshold_beta: float = 0.99
    """Batchtopk / matryoshka: EMA factor of the inference threshold (per step, 0-1). 0.99 (SAELens' threshold
    rate 0.01) follows the batch top-k cutoff within a few hundred steps; 0.999 still lagged it at the end of the
    default recipe's 1,016 steps (threshold 1.42 against a cutoff of 0.96: L0 12.9 at inference for k = 32)."""
    decoder_norm: str | None = None
    """Topk / batchtopk / matryoshka: "unit" holds every decoder row at norm 1 in training (gradient projected off
    the row, row renormalised after each step); "free" lets the row norms train and picks the active latents by
    pre-activation x row norm (SAELens' rescale_acts_by_decoder_norm). Training folds free norms into the encoder
    when it ends, so a trained SAE has unit rows either way. None = the architecture's default (free for the top-k
    family, unit elsewhere), saved as the choice made. Measured with free against unit: ground-truth F1 at L0 25
    0.599 / 0.613 / 0.710 against 0.597 / 0.608 / 0.696 for TopK / BatchTopK / Matryoshka (benchmarks/sae_quality.py,
    full size); on SmolLM2 resid.15 a TopK SAE's test FVU 0.243 against 0.248 and spliced loss 4.427 against 4.429
    (benchmarks/sae_choices.py)."""
    matryoshka_prefixes: tuple[int, ...] = ()
    """Matryoshka: sizes of the nested dictionary prefixes that must each reconstruct the input (feature counts,
    strictly increasing, each below n_features, which is always the last prefix); () = n_features / 16, / 8, / 4
    and / 2."""
    # jumprelu: thresholds and bandwidth are in units of the *normalised* training data (mean ||x|| = sqrt(d)),
    # where a unit-norm feature's activation is O(1); the Gemma Scope values (0.001) assume mean ||x||^2 = 1 and
    # thresholds that far below the data scale barely move in a short run (log-threshold steps are ~lr per step).
    jumprelu_bandwidth: float = 0.5
    """Jumprelu: width of the straight-through kernel around each threshold (normalised activation units)."""
    jumprelu_init_threshold: float = 0.5
    """Jumprelu: every threshold's starting value (normalised activation units)."""
    l0_coeff: float = 1.0
    """Jumprelu: L0 penalty coefficient (unitless weight on the loss)."""
    l0_warmup_frac: float = 0.1
    """Jumprelu: L0 coefficient ramps linearly from 0 over this share of steps (fraction of the run, 0-1)."""
    pre_act_coeff: float = 0.0
    """Jumprelu: weight of the pre-activation loss sum_i relu(t_i - pre_i)*||W_dec,i|| (unitless; 0 = off)."""
    l0_penalty: str = "plain"
    """Jumprelu: "plain" (step function, STE) or "tanh" (tanh(c * f * ||W_dec||))."""
    tanh_c: float = 4.0
    """Jumprelu with l0_penalty="tanh": the sharpness c of tanh(c * f * ||W_dec||) (unitless)."""
    # transcoders (arch "transcoder" or "jumprelu-transcoder"): read `site`, reconstruct `target_site`
    target_site: str = ""
    """Transcoder: the site it writes, e.g. mlp_out.5, while `site` is the one it reads ("" = its own input)."""
    skip_connection: bool = False
    """Transcoder: add a linear skip path (x - b_in) W_skip ([d_model, d_model], zero at init) to the output."""
    target_norm_scale: float = 1.0
    """Transcoder: training-time multiplier of the target (mean ||y|| = sqrt(d_model)); a record once folded."""
    # provenance / data rules
    model: str = ""
    """Name of the model whose activations it was trained on ("" = unknown)."""
    model_source: dict[str, Any] | None = None
    """How to load that model again (models.LoadedModel.source: spec, resolved file or folder, its content hash,
    registered name); None = unknown (an imported SAE, or one written before this field existed)."""
    site: str = ""
    """Site it reads, e.g. resid.15 ("" = unknown)."""
    exclude_bos: bool = True
    """True: position 0 (attention sink) excluded from training and metrics."""
    # rows with norm > ratio * median norm are dropped (attention sinks beyond position 0); 10 is the rule the
    # shipped SAE and the benchmarks use. Imported SAEs carry None: their training rule is unknown.
    max_norm_ratio: float | None = 10.0
    """Rows with norm above this many times the median norm are dropped (multiple of the median); None keeps all."""
    massive_ratio: float | None = 20.0
    """A dimension whose RMS exceeds this many times the median dimension's RMS is massive (multiple of the
    median; Gemma 3 has dimensions ~100x the rest); None = none looked for."""
    input_scaling: str = "auto"
    """Per-dimension input scaling during training: "auto" (resolved in training, and saved as the choice made:
    "per-dim" when the massive dimensions carry over a quarter of the variance, else "none"); "per-dim" (every
    dimension centred and scaled to the median dimension's spread, so each counts alike in the loss); "massive"
    (only the massive dimensions scaled so); "none". Measured (benchmarks/second_model.py, 8x k 32, 6 epochs of
    262k tokens): Gemma 3 270M resid.9, where dimension 163 carries 62 % of the variance, recovers more of the loss
    with per-dim; SmolLM2 resid.15, whose massive dimensions are near-constant offsets (2 % of the variance), recovers
    more with none (0.960 against 0.925)."""
    massive_dims: list[int] | None = None
    """The massive dimensions found in the training sample (indices); None = not looked for."""
    dim_scale: list[float] | None = None
    """Training-time per-dimension input multiplier (d_model numbers); None = 1 everywhere. A record once folded."""
    normalize: bool = True
    """True: scale inputs so mean ||x|| = sqrt(d_model) during training."""
    mean_center: bool = False
    """True: subtract the init sample's mean activation before scaling, during training."""
    norm_scale: float = 1.0
    """Training-time input scale (multiplier; kept as a record once folded into the weights)."""
    norm_mean: list[float] | None = None
    """Training-time mean subtracted from inputs (d_model numbers, activation units); None = not centred."""
    norm_folded: bool = True
    """True: the weights act on raw activations (normalisation folded in)."""
    dtype: str = "float32"
    """Dtype name of the weights in memory."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys a newer or foreign writer stored that this version does not know (kept as they were)."""

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str):
            raise _bad("SAEConfig", "arch", self.arch, "an architecture name")
        cls = sae_class(self.arch)
        if self.decoder_norm is None:
            self.decoder_norm = cls.decoder_norm_modes[0]
        if isinstance(self.matryoshka_prefixes, list):  # read back from JSON
            self.matryoshka_prefixes = tuple(self.matryoshka_prefixes)
        _check(
            "SAEConfig",
            self,
            {
                "d_model": (_pos_int, "a positive integer"),
                "n_features": (_pos_int, "a positive integer"),
                "k": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
                "l1_coeff": (_nonneg, "a number >= 0"),
                "l1_warmup_frac": (_frac, "a share in [0, 1]"),
                "init_density": (lambda v: v is None or _frac(v), "None or a share in [0, 1]"),
                "k_aux": (lambda v: v is None or _pos_int(v), "None or a positive integer"),
                "aux_coeff": (_nonneg, "a number >= 0"),
                "dead_tokens": (lambda v: v is None or _pos_int(v), "None or a positive number of tokens"),
                "threshold_beta": (_frac, "an EMA factor in [0, 1]"),
                "decoder_norm": (
                    lambda v: v in cls.decoder_norm_modes,
                    f"one of {', '.join(cls.decoder_norm_modes)} for arch {self.arch!r}, or None for its default",
                ),
                "matryoshka_prefixes": (
                    lambda v: (
                        isinstance(v, tuple)
                        and all(_pos_int(p) and p < self.n_features for p in v)
                        and all(a < b for a, b in zip(v, v[1:]))
                    ),
                    f"strictly increasing feature counts, each in 1..{self.n_features - 1} (below n_features, "
                    "the last prefix); () = the default",
                ),
                "jumprelu_bandwidth": (_pos, "a number > 0"),
                "jumprelu_init_threshold": (_pos, "a number > 0"),
                "l0_coeff": (_nonneg, "a number >= 0"),
                "l0_warmup_frac": (_frac, "a share in [0, 1]"),
                "pre_act_coeff": (_nonneg, "a number >= 0"),
                "l0_penalty": (lambda v: v in ("plain", "tanh"), "'plain' or 'tanh'"),
                "tanh_c": (_pos, "a number > 0"),
                "max_norm_ratio": (lambda v: v is None or _pos(v), "None or a number > 0"),
                "norm_scale": (_pos, "a number > 0"),
                "massive_ratio": (lambda v: v is None or _pos(v), "None or a number > 0"),
                "input_scaling": (lambda v: v in INPUT_SCALINGS, "one of " + ", ".join(INPUT_SCALINGS)),
                "massive_dims": (
                    lambda v: v is None or all(_nonneg_int(i) and i < self.d_model for i in v),
                    f"None or dimension indices below d_model={self.d_model}",
                ),
                "dim_scale": (
                    lambda v: v is None or len(v) == self.d_model and all(_pos(x) for x in v),
                    f"None or {self.d_model} numbers > 0 (d_model)",
                ),
                "norm_mean": (
                    lambda v: v is None or len(v) == self.d_model and all(_is_number(x) for x in v),
                    f"None or {self.d_model} numbers (d_model)",
                ),
                "target_site": (lambda v: isinstance(v, str), "a site name (a string)"),
                "skip_connection": (lambda v: isinstance(v, bool), "true or false"),
                "target_norm_scale": (_pos, "a number > 0"),
                "model": (lambda v: isinstance(v, str), "a model name (a string)"),
                "model_source": (lambda v: v is None or isinstance(v, dict), "None or a dict (how to load the model)"),
                "site": (lambda v: isinstance(v, str), "a site name (a string)"),
                "dtype": (lambda v: isinstance(v, str), "a dtype name (a string)"),
                "exclude_bos": (lambda v: isinstance(v, bool), "true or false"),
                "normalize": (lambda v: isinstance(v, bool), "true or false"),
                "mean_center": (lambda v: isinstance(v, bool), "true or false"),
                "norm_folded": (lambda v: isinstance(v, bool), "true or false"),
                "extra": (lambda v: isinstance(v, dict), "a dict"),
            },
        )
        cls.check_config(self)

    @property
    def k_aux_eff(self) -> int:
        return min(self.n_features, self.k_aux if self.k_aux is not None else max(1, self.d_model // 2))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        """Unknown keys (a newer or foreign writer) are kept, with their values, in ``extra``."""
        names = {f.name for f in fields(cls)}
        unknown = {k: v for k, v in d.items() if k not in names}
        kw = {k: v for k, v in d.items() if k in names}
        if "input_scaling" not in d:  # written before massive dimensions were looked for: none were
            kw.update(input_scaling="none", massive_ratio=None)
        if "decoder_norm" not in d:  # written before decoder norms could train free: they were held at 1
            kw["decoder_norm"] = "unit"
        if unknown:
            kw["extra"] = {**kw.get("extra", {}), **unknown}
        return cls(**kw)


B_DEC_INITS = ("geometric_median", "mean", "zero")


@dataclass
class TrainConfig:
    """How to train (one schedule for every SAE of a sweep); what to train is SAEConfig."""

    batch_size: int = 4096
    """Rows (tokens) per optimiser step."""
    n_tokens: int | None = None
    """Token budget (tokens; or give steps); for a store, default = all its tokens (times epochs)."""
    steps: int | None = None
    """Optimiser steps to run; None = from n_tokens (or the store) and batch_size."""
    lr: float | None = None
    """Adam learning rate; None: the architecture's default_lr (per SAE, scaled with the dictionary size)."""
    warmup_frac: float = 0.01
    """Linear LR warm-up over this share of steps (fraction of the run, 0-1)."""
    decay_frac: float = 0.2
    """Linear LR decay to 0 over this last share of steps (fraction of the run, 0-1)."""
    grad_clip: float = 1.0
    """Gradient-norm clip (L2 norm; 0 = no clipping)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's two moment decay factors (per step, 0-1)."""
    seed: int = 0
    """Seed of the weight init (SAE i of a sweep uses seed + i) and of torch's RNG."""
    dtype: str = "float32"
    """Training precision: "float32", "bfloat16" (autocast) or "float64" (exact, e.g. DDP tests)."""
    device: str = "cpu"
    """Torch device to train on (cpu, cuda, cuda:1, ...)."""
    b_dec_init: str = "geometric_median"
    """Initial decoder bias: "geometric_median", "mean" or "zero" of the init sample."""
    init_batches: int = 1
    """Batches (of batch_size rows) read for normalisation stats and b_dec init."""
    checkpoint_dir: str | None = None
    """Folder for the resumable checkpoint (checkpoint.pt); None = no checkpoints, no resume."""
    # Steps between resumable checkpoints (0: none). A checkpoint (weights + two Adam moments: 128 MB at the
    # default width) costs about a tenth of a CPU step of the same SAE but many GPU steps, so the interval is
    # set for GPU runs; a killed CPU run repeats at most these 500 steps.
    checkpoint_every: int = 500
    """Optimiser steps between resumable checkpoints (0: none)."""
    log_every: int = 50
    """Optimiser steps between metric log entries."""
    dead_check_every: int = 10
    """Optimiser steps between refreshes of the dead-latent mask."""
    progress: bool = True
    """True: show a progress bar."""
    shuffle_seed: int = 0
    """Seed of the order rows are read from a store (shuffle buffer)."""
    epochs: int = 1
    """Passes over a store."""
    total_tokens: InitVar[int | None] = None
    """Former name of n_tokens (still accepted, with a warning)."""

    def __post_init__(self, total_tokens: int | None) -> None:
        if total_tokens is not None:
            warnings.warn(
                "TrainConfig(total_tokens=...) is now TrainConfig(n_tokens=...)", DeprecationWarning, stacklevel=3
            )
            if self.n_tokens is None:
                self.n_tokens = total_tokens
        _check(
            "TrainConfig",
            self,
            {
                "batch_size": (_pos_int, "a positive number of rows per step"),
                "n_tokens": (lambda v: v is None or _pos_int(v), "None or a positive number of tokens"),
                "steps": (lambda v: v is None or _pos_int(v), "None or a positive number of steps"),
                "lr": (lambda v: v is None or _pos(v), "None or a learning rate > 0"),
                "warmup_frac": (_frac, "a share in [0, 1]"),
                "decay_frac": (_frac, "a share in [0, 1]"),
                "grad_clip": (_nonneg, "a number >= 0 (0: no clipping)"),
                "adam_betas": (lambda v: len(v) == 2 and all(_frac(b) for b in v), "two numbers in [0, 1]"),
                "dtype": (lambda v: canonical(v) in TRAIN_DTYPES, "one of " + ", ".join(TRAIN_DTYPES)),
                "b_dec_init": (lambda v: v in B_DEC_INITS, "one of " + ", ".join(B_DEC_INITS)),
                "init_batches": (_pos_int, "a positive number of batches"),
                "checkpoint_every": (_nonneg_int, "a number of steps >= 0 (0: no checkpoints)"),
                "log_every": (_pos_int, "a positive number of steps"),
                "dead_check_every": (_pos_int, "a positive number of steps"),
                "epochs": (_pos_int, "a positive number of passes"),
            },
        )
