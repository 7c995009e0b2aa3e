"""What a probe read and a layer sweep take: the defaults live here, and a bad value fails at construction.

Torch-free on purpose (as sae/config.py): the CLI reads its option defaults and help from these classes without
importing torch. Each field's docstring carries its unit; `thoughtscope.configdoc.field_help` gives it to the CLI.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass

from ..errors import ProbeError
from ..renamed import warn_renamed

READS = ("last", "mean", "span")  # which token of a text is read
FITTERS = ("mean", "lda", "logistic", "lat", "ccs")
DEFAULT_FITTERS = ("mean", "lda", "logistic", "lat")


def old_keyword(value, old_value, *, old: str, new: str, where: str):
    """`value`, or `old_value` when the caller used the keyword's old name (with a DeprecationWarning)."""
    if old_value is None:
        return value
    warn_renamed(old, new, where, stacklevel=4)
    return old_value


@dataclass(frozen=True)
class ReadConfig:
    """How a dataset's texts are read at a site: which token, in which template, how many per forward pass."""

    read: str = "last"
    """Which token of a text is read: last, mean (over its tokens) or span (mean over a marked span)."""
    chat: bool = False
    """True: each text becomes the user turn of the model's chat template (only its own tokens are read)."""
    texts_per_batch: int = 16
    """Texts per forward pass."""
    max_length: int = 256
    """Tokens kept per text, BOS included (a longer text is cut to this many; chat template included)."""
    sink_ratio: float = 10.0
    """Tokens with norm above this many times the median token norm are sinks, never read (multiple, > 1)."""
    add_bos: bool = True
    """As LoadedModel.tokenize; False reads texts exactly as the tokenizer alone encodes them."""
    batch_size: InitVar[int | None] = None
    """Former name of texts_per_batch (still accepted, with a warning)."""

    def __post_init__(self, batch_size: int | None) -> None:
        if batch_size is not None:
            per_batch = old_keyword(None, batch_size, old="batch_size", new="texts_per_batch", where="ReadConfig")
            object.__setattr__(self, "texts_per_batch", per_batch)
        if self.read not in READS:
            raise ProbeError(f"read position must be one of {', '.join(READS)}, got {self.read!r}")
        if self.texts_per_batch < 1 or self.max_length < 2:
            raise ProbeError(
                f"texts_per_batch must be >= 1 and max_length >= 2, got {self.texts_per_batch}, {self.max_length}"
            )
        if not self.sink_ratio > 1:
            raise ProbeError(
                f"sink_ratio must be > 1 (tokens above ratio × median norm are sinks), got {self.sink_ratio}"
            )


@dataclass(frozen=True)
class SweepConfig:
    """What a layer sweep fits and which controls it runs beside each fit."""

    fitters: tuple[str, ...] = DEFAULT_FITTERS
    """Fitters to compare, each at every site: some of mean, lda, logistic, lat, ccs."""
    test_fraction: float = 0.25
    """Share of the groups held out for testing (fraction, 0-1; the split is group-disjoint)."""
    seed: int = 0
    """Seed of the split, the fitters, the random directions, the shuffles and the bootstrap."""
    n_random: int = 200
    """Random unit directions per site for the random-direction control (count)."""
    n_shuffle: int = 10
    """Label-shuffle refits per fitter for the null (count)."""
    n_boot: int = 200
    """Bootstrap resamples for each test AUROC's 95% CI (count, at least 10)."""
    cv_folds: int = 4
    """Group-wise cross-validation folds on the training split (count, at least 2)."""
    min_selectivity: float = 0.2
    """A site is selective when task AUROC − control-task AUROC reaches this (AUROC points)."""

    def __post_init__(self) -> None:
        bad = [f for f in self.fitters if f not in FITTERS]
        if bad or not self.fitters:
            raise ProbeError(f"unknown fitter(s) {bad}: expected some of {', '.join(FITTERS)}")
        if self.n_random < 1 or self.n_shuffle < 1 or self.n_boot < 10 or self.cv_folds < 2:
            raise ProbeError("n_random, n_shuffle >= 1, n_boot >= 10 and cv_folds >= 2 are required")
