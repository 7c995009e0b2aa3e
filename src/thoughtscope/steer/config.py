"""Steering's configs and their checks, torch-free: the CLI reads its defaults and help from them.

`GenerationConfig` (how an answer is sampled) and `FindConfig` (the budget of a concept search); both are still
importable from their old homes (`steer.generate`, `steer.find`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import SteerError

# share of an answer's token 3-grams that may repeat an earlier one before it counts as a loop; unsteered answers
# of the default model: median 0, 95th percentile 0.08 (192 answers of the steer find eval)
LOOP_REPETITION = 0.25


def _check_finite(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SteerError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise SteerError(f"{name} must be a finite number, got {value!r}")
    return v


DECODERS = ("auto", "lean", "transformers")
DECODE_WEIGHTS = ("exact", "int8", "bf16")  # the lean decoder's `PRECISIONS` (thoughtscope.decoding), named torch-free
SEARCH_WEIGHTS = ("auto", *DECODE_WEIGHTS)  # FindConfig.weights: "auto" picks bf16 where it is fast
DECODER_ENV = "THOUGHTSCOPE_DECODER"


def _default_decoder() -> str:
    """$THOUGHTSCOPE_DECODER sets the default of a whole process (the benchmark times both paths this way)."""
    return os.environ.get(DECODER_ENV, "auto")


@dataclass
class GenerationConfig:
    """Sampling settings; temperature 0 means greedy. chat=None uses the chat template when there is one."""

    max_new_tokens: int = 64
    """Tokens generated per answer (tokens)."""
    temperature: float = 0.7
    """Sampling temperature (logits divided by it; 0: greedy)."""
    top_p: float = 0.9
    """Nucleus sampling: draw from the most likely tokens that hold this share of the probability (0-1]."""
    seed: int = 0
    """Seed of the sampler (a torch.Generator): the same seed gives the same draws, steered or not."""
    chat: bool | None = None
    """Read prompts through the tokenizer's chat template: True, False, or None for whenever it has one."""
    system: str | None = None
    """System prompt put before the user's message by the chat template (text; None: none)."""
    stop_at_eos: bool = True
    """End an answer at the end-of-sequence token (False: always write max_new_tokens tokens)."""
    decoder: str = field(default_factory=_default_decoder)
    """How tokens are computed: "lean" (thoughtscope's decode loop over a preallocated cache; Llama-family
    models, the same tokens as transformers), "transformers" (the model's own forward), or "auto" (lean where the
    model and the active hooks allow it; the default unless $THOUGHTSCOPE_DECODER names another)."""
    weights: str = "exact"
    """Weights the lean decoder multiplies with: "exact" (the model's own), "int8" (CPU; one scale per row,
    about 1.6x faster at batch 1) or "bf16" (bfloat16 products, about 1.7x faster for a batch of answers on a
    CPU with bf16 units, or on a GPU). The low-precision ones do not give the same tokens: their perplexity cost
    is in the README."""

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise SteerError(
                f"decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r} (from ${DECODER_ENV} "
                "when not given)"
            )
        if self.weights not in DECODE_WEIGHTS:
            raise SteerError(f"weights must be one of {', '.join(DECODE_WEIGHTS)}, got {self.weights!r}")
        if self.weights != "exact" and self.decoder == "transformers":
            raise SteerError(f"weights={self.weights!r} needs the lean decoder (decoder='lean' or 'auto')")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SteerError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        self.temperature = _check_finite("temperature", self.temperature)
        self.top_p = _check_finite("top_p", self.top_p)
        if self.temperature < 0:
            raise SteerError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SteerError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class FindConfig:
    """Budget knobs. Screening: `n_screen` questions, `screen_tokens` new tokens, the handle's coarse grid.
    Calibration: every question, `max_new_tokens`, a fine grid around the best screening strength."""

    n_features: int = 4
    """Feature candidates per ranking (input contrast, output effect): features; 0 for none."""
    caa_sites: Sequence[str] | None = None
    """Sites of the CAA vector candidates (site names); unset (None): the SAE's site and the layers at 1/3 and 2/3
    of the depth; empty: none."""
    logit_sites: Sequence[str] | None = None
    """Sites where the concept tokens' logit direction is a candidate (site names); unset (None): the layer at 5/6
    of the depth; empty: none."""
    n_screen: int = 6
    """Neutral questions every candidate is screened on (questions)."""
    screen_tokens: int = 24
    """New tokens per answer while screening (tokens)."""
    n_calibrate: int = 2
    """Candidates that get the full calibration on every question (handles)."""
    max_new_tokens: int = 64
    """New tokens per answer in calibration and confirmation (tokens): the length `steer generate` writes, since
    a mention costs perplexity once per answer."""
    ppl_bound: float = 2.0
    """Allowed perplexity of steered answers (× the unsteered perplexity)."""
    ppl_margin: float = 0.95
    """The winner's perplexity ratio on the search seed must be within ppl_bound × this (0-1]: the search's figure
    is the best of many draws, so fresh seeds read higher (a winner at 1.94x on the search seed measured 2.10x on
    two fresh seeds); when no point passes with the margin the plain bound is used, and the result says so."""
    feature_grid: Sequence[float] = (1.0, 2.0, 4.0, 8.0)
    """Screening strengths of a feature candidate (× the feature's max stored with the SAE)."""
    vector_grid: Sequence[float] = (0.08, 0.12, 0.17, 0.24)
    """Screening strengths of a vector candidate (× the site's median residual norm)."""
    fine_steps: Sequence[float] = (0.8, 1.0, 1.2, 1.4)
    """Calibration strengths around a candidate's best screening strength (× that strength)."""
    pair_grid: Sequence[float] = (0.5, 0.65, 0.8, 1.0)
    """Screening strengths of the CAA + logit pair (× each part's best screening strength); () for no pair."""
    extend_steps: int = 3
    """Calibration points added above the fine grid while there is room under the bound (points)."""
    extend_factor: float = 1.15
    """Strength of each added point over the one before it (×, > 1)."""
    refine_steps: int = 2
    """Points placed between the last strength within the bound and the first one past it (points)."""
    confirm_seeds: int = 2
    """Fresh seeds the winner is re-measured on; its reported figures come from them (seeds; 0: none)."""
    positions: str = "all"
    """Where the candidates steer: "all", "prompt" or "generated" tokens."""
    loop_repetition: float = LOOP_REPETITION
    """Share of an answer's token 3-grams that may repeat an earlier one (0-1); an answer past it loops and never
    counts as mentioning the concept (1.0: count loops too)."""
    temperature: float = 0.7
    """Sampling temperature of every answer (0: greedy)."""
    top_p: float = 0.9
    """Nucleus sampling mass of every answer (0-1]."""
    seed: int = 0
    """Seed of the search's answers; the confirmation uses the next `confirm_seeds` seeds."""
    answers_per_question: int = 2
    """Answers sampled per question at every calibration point and for its unsteered and prompt-only references
    (answers): the speed of bf16 products spent on the statistics that choose the winner (the confirmation on fresh
    seeds keeps one answer per question per seed)."""
    weights: str = "auto"
    """Weights of the search's answers (screening and calibration): "auto" (bfloat16 products where the lean
    decoder runs the model and the device multiplies bf16 natively, else the model's own), "exact", "bf16" or
    "int8". The confirmation on fresh seeds, whose figures are reported, always uses the model's own weights."""

    def __post_init__(self) -> None:
        if self.weights not in SEARCH_WEIGHTS:
            raise SteerError(f"FindConfig.weights must be one of {', '.join(SEARCH_WEIGHTS)}, got {self.weights!r}")
        for name in (
            "answers_per_question",
            "n_features",
            "n_screen",
            "screen_tokens",
            "n_calibrate",
            "max_new_tokens",
            "extend_steps",
            "refine_steps",
            "confirm_seeds",
        ):
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, int)
                or v < (0 if name in ("n_features", "extend_steps", "refine_steps", "confirm_seeds") else 1)
            ):
                raise SteerError(f"FindConfig.{name} must be a positive integer, got {v!r}")
        if not (isinstance(self.extend_factor, (int, float)) and math.isfinite(self.extend_factor)) or not (
            self.extend_factor > 1
        ):
            raise SteerError(f"FindConfig.extend_factor must be a finite number > 1, got {self.extend_factor!r}")
        if not 0 < self.ppl_margin <= 1:
            raise SteerError(f"FindConfig.ppl_margin must be in (0, 1], got {self.ppl_margin}")
        if not self.ppl_bound > 1:
            raise SteerError(
                f"FindConfig.ppl_bound must be > 1 (a multiple of the unsteered perplexity), got {self.ppl_bound}"
            )
        for name in ("feature_grid", "vector_grid", "fine_steps", "pair_grid"):
            g = list(getattr(self, name))
            if (not g and name != "pair_grid") or not all(
                isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in g
            ):
                raise SteerError(f"FindConfig.{name} must be positive finite numbers, got {g!r}")

    def generation(self, tokens: int, seed: int | None = None, weights: str = "exact") -> GenerationConfig:
        """Sampling settings of one stage's answers; `weights` as resolved for this model (never "auto")."""
        return GenerationConfig(
            max_new_tokens=tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed if seed is None else seed,
            weights=weights,
        )
