"""The NLA's settings, torch-free: `NLAConfig` (what the AV and the AR must agree on, saved as nla_config.json),
`DataConfig` (how rows are harvested), `NLATrainConfig` (one training stage) and the stage names.

The lowest module of the package: the state file (`checkpoint.py`), the curves (`curves.py`), the GRPO step
(`grpo.py`) and the stage loop (`train.py`) all read the stages from here, and the command line reads each
option's help from the fields' docstrings without loading torch.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import InitVar, asdict, dataclass, field, fields
from pathlib import Path

from .._io import read_json
from ..errors import NLAError
from ..values import is_finite as _num
from ..values import is_int as _int

CONFIG_NAME = "nla_config.json"
STAGES = ("ar-sft", "av-sft", "rl", "rl-continue", "ar-refit", "ar-refit-warm")
RL_STAGES = ("rl", "rl-continue")  # GRPO stages: they train and publish both the AV and the AR


@dataclass
class NLAConfig:
    """Everything the AV and AR must agree on; saved as nla_config.json beside the weights."""

    model: str = "default"
    """Target model spec, as `thoughtscope.models.load_model` reads it ('default', a hub id, a folder)."""
    site: str = "resid.20"
    """Site read, `resid.K`: the output of block K (= hidden_states[K+1]); K ≈ 2/3 of the depth."""
    d_model: int = 576
    """Width of the site's vectors (the target's hidden size), in dimensions."""
    n_layers: int = 30
    """Blocks in the target model (a count)."""
    # --- verbalizer (AV)
    marker: str = "<empty_output>"
    """One token whose input embedding is replaced by the vector."""
    marker_id: int = 16
    """The marker's token id in the target's vocabulary."""
    injection_scale: float = 0.0
    """L2 norm the vectors are rescaled to before injection (activation units; a round number above mean_norm)."""
    system_prompt: str = "Describe the vector."
    """System turn of the AV's chat prompt (text)."""
    av_template: str = "<concept>{marker}</concept>"
    """User turn of the AV's prompt (text); must contain {marker} exactly once."""
    response_prefix: str = "<explanation>"
    """Forced start of the answer (text, part of the prompt)."""
    response_suffix: str = "</explanation>"
    """Closing text: the answer is complete only when this appears."""
    max_new_tokens: int = 48
    """Most tokens the AV generates for one explanation."""
    # --- reconstructor (AR)
    ar_prefix: str = "Summary: "
    """Text the AR reads before the explanation."""
    ar_suffix: str = ""
    """Text the AR reads after the explanation; empty: the AR reads the explanation's own last token (see docs)."""
    max_explanation_tokens: int = 64
    """Most explanation tokens the AR reads; a longer explanation is an error (or truncated where asked)."""
    # --- data statistics, measured by `nla data`
    mean_norm: float = 0.0
    """Mean L2 norm of the training vectors (activation units), measured by `nla data`."""
    mu_sq: float = 0.0
    """‖μ‖² of the unit-normalised training vectors (unitless, 0..1); their variance is 1 − mu_sq."""
    warm_start: dict = field(default_factory=dict)
    """Which explanations the warm start used (kind and recipe, from the dataset's meta.json)."""
    # --- adapters
    lora_rank: int = 8
    """Rank of each LoRA adapter (dimensions)."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator: the adapter's update is multiplied by lora_alpha / lora_rank (unitless)."""
    lora_targets: list = field(default_factory=lambda: ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    """Module names (in each block) that get a LoRA adapter."""
    extra: dict = field(default_factory=dict)
    """Free-form record: the data recipe (`data_config`), training notes, unknown keys of an older config."""

    @property
    def layer(self) -> int:
        from thoughtscope.models import Site

        return Site.parse(self.site).layer

    def check(self) -> NLAConfig:
        """Raise NLAError for a value the AV and AR cannot use (a wrong type, an impossible size, a template
        that does not hold the marker once); returns self."""
        for name, ok, expected in _RULES:
            value = getattr(self, name)
            if not ok(value):
                shown = repr(value)
                raise NLAError(f"NLAConfig.{name}={shown[:80]}: expected {expected}")
        if self.lora_rank > self.d_model:
            raise NLAError(f"NLAConfig.lora_rank={self.lora_rank}: expected at most d_model={self.d_model}")
        if "init_seed" in self.extra and not _int(self.extra["init_seed"]):
            raise NLAError(f"NLAConfig.extra['init_seed']={self.extra['init_seed']!r}: expected an integer")
        if self.av_template.count("{marker}") != 1:
            raise NLAError(f"av_template must contain '{{marker}}' exactly once, got {self.av_template!r}")
        try:
            self.av_template.format(marker=self.marker)
        except (KeyError, IndexError, ValueError) as e:
            raise NLAError(f"av_template {self.av_template!r} is not a template of {{marker}} alone ({e})") from None
        from ..sites import Site  # imports torch: only when a config is checked

        try:
            layer = Site.parse(self.site).layer
        except ValueError as e:  # SiteError
            raise NLAError(f"NLAConfig.site={self.site!r}: {e}") from None
        if layer >= self.n_layers:
            raise NLAError(
                f"site {self.site} is beyond the model: it has {self.n_layers} blocks (layers 0..{self.n_layers - 1})"
            )
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> NLAConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        if unknown:
            cfg.extra = {**cfg.extra, "unknown_keys": unknown}
        return cfg

    def save(self, folder: str | os.PathLike) -> Path:
        from .._io import atomic_write_text  # torch is imported there: only when a config is written

        path = Path(folder) / CONFIG_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> NLAConfig:
        """Read and check ``nla_config.json``; any fault is an NLAError naming the file."""
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise NLAError(f"{path} not found: an NLA folder holds {CONFIG_NAME} plus adapter weights")
        raw = read_json(path, NLAError)
        try:
            return cls.from_dict(raw).check()
        except (NLAError, TypeError) as e:  # TypeError: 'extra' is not an object but unknown keys must go there
            raise NLAError(f"{path}: {e}") from None


#: NLAConfig field -> (is it acceptable, what was expected)
_RULES = (
    ("model", lambda v: isinstance(v, str), "a model spec (text)"),
    ("site", lambda v: isinstance(v, str), "a site such as resid.20"),
    ("d_model", lambda v: _int(v) and v > 0, "a positive integer"),
    ("n_layers", lambda v: _int(v) and v > 0, "a positive integer"),
    ("marker", lambda v: isinstance(v, str) and v != "", "one token's text"),
    ("marker_id", lambda v: _int(v) and v >= 0, "a token id (an integer >= 0)"),
    ("injection_scale", lambda v: _num(v) and v >= 0, "a finite number >= 0"),
    ("system_prompt", lambda v: isinstance(v, str), "text"),
    ("av_template", lambda v: isinstance(v, str), "text holding {marker} once"),
    ("response_prefix", lambda v: isinstance(v, str), "text"),
    ("response_suffix", lambda v: isinstance(v, str), "text"),
    ("max_new_tokens", lambda v: _int(v) and v > 0, "a positive number of tokens"),
    ("ar_prefix", lambda v: isinstance(v, str), "text"),
    ("ar_suffix", lambda v: isinstance(v, str), "text"),
    ("max_explanation_tokens", lambda v: _int(v) and v > 0, "a positive number of tokens"),
    ("mean_norm", lambda v: _num(v) and v >= 0, "a finite number >= 0"),
    ("mu_sq", lambda v: _num(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("warm_start", lambda v: isinstance(v, dict), "an object"),
    ("lora_rank", lambda v: _int(v) and v > 0, "a positive integer"),
    ("lora_alpha", lambda v: _num(v) and v > 0, "a finite number > 0"),
    (
        "lora_targets",
        lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(x, str) and x for x in v),
        "a non-empty list of module names",
    ),
    ("extra", lambda v: isinstance(v, dict), "an object"),
)


@dataclass
class DataConfig:
    """How rows are harvested; saved in meta.json so the dataset can be rebuilt exactly."""

    corpus: str = "default"
    """Corpus the rows are read from ('default', or any spec `thoughtscope.corpus.Corpus` opens)."""
    site: str | None = None
    """Site read, `resid.K` (None: two-thirds of the depth, (2·L)//3)."""
    n_rows: int = 4000
    """Rows (vectors) to harvest."""
    positions_per_doc: int = 3
    """Token positions read per document (rows per document, at most)."""
    min_position: int = 50
    """First document token index a row may be read at (50 in the published recipe)."""
    max_position: int = 96
    """Tokens a document is cut to (rows come from token indices below it), to bound CPU cost."""
    split: tuple = (0.8, 0.1, 0.1)
    """Train / val / test fractions, by document."""
    seed: int = 42
    """Seed of the document split and of the positions drawn in each document."""
    contexts_per_batch: int = 8
    """Contexts (documents, cut after their last row's token) per forward pass."""
    warm_start: str = "offline"
    """Warm-start writer: "offline" (field layout), "prose" (the same facts as sentences) or "llm"."""
    llm_endpoint: str | None = None
    """OpenAI-compatible base URL for warm_start="llm", e.g. http://localhost:8000/v1."""
    llm_model: str | None = None
    """Model name at llm_endpoint (warm_start="llm")."""
    llm_api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding llm_endpoint's API key."""
    max_explanation_tokens: int = 40
    """Most tokens of an offline warm-start explanation (it is shortened to fit)."""
    ascii_only: bool = True
    """Keep documents that are mostly ASCII (the default corpus is multilingual)."""
    only_split: int | None = None
    """Harvest only documents of this split (0 train, 1 val, 2 test; None: every split)."""
    batch_docs: InitVar[int | None] = None
    """Deprecated name of contexts_per_batch (saved data configs of older datasets and NLAs carry it)."""

    def __post_init__(self, batch_docs: int | None) -> None:
        if batch_docs is not None:
            warnings.warn("DataConfig(batch_docs=) is deprecated: use contexts_per_batch", DeprecationWarning, 2)
            self.contexts_per_batch = batch_docs
        if not (_int(self.min_position) and _int(self.max_position) and 0 <= self.min_position < self.max_position):
            raise NLAError(
                f"DataConfig: min_position={self.min_position!r} must be >= 0 and below max_position="
                f"{self.max_position!r} (rows are read at token indices min_position..max_position-1)"
            )


@dataclass
class NLATrainConfig:
    """One training stage; the defaults are sized for the 135M default model on 2 CPU cores."""

    stage: str = "ar-sft"
    """Which stage runs: ar-sft | av-sft | rl | rl-continue | ar-refit | ar-refit-warm."""
    steps: int = 200
    """Optimiser steps of the stage (the length of its learning-rate schedule)."""
    batch_size: int = 8
    """Rows per optimiser step (vectors, for the rl stages), over all ranks together."""
    lr: float = 5e-4
    """Peak learning rate of the trained half (AdamW; linear warm-up, then cosine decay to 10%)."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay (per unit of learning rate, unitless)."""
    warmup: int = 10
    """Optimiser steps of linear learning-rate warm-up."""
    seed: int = 0
    """Seed of the batch order (and of the rl stages' sampling, per step)."""
    eval_every: int = 50
    """Validate every this many optimiser steps and at the last one (0: never)."""
    checkpoint_every: int = 25
    """Write the resumable state every this many optimiser steps (and at the last one)."""
    val_rows: int = 64
    """Validation rows read (the first N of the val split)."""
    time_budget_s: float | None = None
    """Stop (with a checkpoint) after this many seconds of wall time; resumable. None: no limit."""
    train_rows: int | None = None
    """Draw only from the first N training rows (None: all of them)."""
    # --- rl
    group_size: int = 4
    """GRPO samples per vector, G (4 on CPU, 8 on GPU)."""
    temperature: float = 1.0
    """Sampling temperature of the AV's rollouts (unitless)."""
    kl_coef: float = 0.01
    """Weight of the per-token k3 KL estimate to the warm-start AV in the loss (unitless)."""
    clip: float = 0.2
    """Clip range of the policy ratio: it is held within 1 ± clip (unitless)."""
    ar_lr: float = 5e-5
    """Learning rate of the AR, which keeps training on the rollout pairs (rl stages)."""
    malformed_reward: float = -2.0
    """Reward of a malformed, truncated, empty or over-long answer (rewards are −2(1 − cos): −2 is orthogonal)."""
    max_new_tokens: int | None = None
    """Most tokens one rollout generates (None: the NLA's own max_new_tokens)."""

    def check(self) -> NLATrainConfig:
        if self.stage not in STAGES:
            raise NLAError(f"unknown stage {self.stage!r}: expected one of {', '.join(STAGES)}")
        if self.steps < 1 or self.batch_size < 1 or self.group_size < 2 and self.stage in RL_STAGES:
            raise NLAError("steps and batch_size must be ≥ 1, and group_size ≥ 2 for rl")
        if self.train_rows is not None and self.train_rows < 1:
            raise NLAError(f"train_rows must be ≥ 1 (or None for every training row), got {self.train_rows}")
        return self
