"""The configs of the passes that read a corpus through a model: harvesting a store and building an atlas.

Both read the same way, so both extend one :class:`ReadPlan` (token budget, context length, contexts per forward
pass, BOS, where to start): the same plan reads the same tokens in the same batches, which is what lets an atlas
skip exactly the text an SAE was trained on. Units: ``n_tokens`` is a token budget, ``contexts_per_batch``
counts contexts per forward pass (``batch_size`` is kept for rows per optimiser step, in SAE training).

Torch-free on purpose: the CLI reads its option defaults from these classes without importing torch. A bad
value fails at construction with an error naming the class, field, value and what was expected; each config
raises its own area's error (all defined in `errors.py`, so nothing here reaches up to the areas).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .dtypes import STORE_DTYPES
from .errors import AtlasError, CorpusError, HarvestError
from .values import is_int as _is_int

__all__ = ["AtlasConfig", "HarvestConfig", "ReadPlan"]


@dataclass
class ReadPlan:
    """Which text a pass over a corpus reads and how it is cut into forward passes."""

    n_tokens: int = 200_000
    """Token budget: tokens read, BOS included."""
    ctx_len: int = 128
    """Tokens per context, BOS included."""
    contexts_per_batch: int = 16
    """Contexts per forward pass."""
    add_bos: bool = True
    """Start every context with the tokenizer's BOS token."""
    skip_tokens: int = 0
    """Tokens to skip at the start of the corpus (whole forward passes), e.g. past a training store."""

    def __post_init__(self) -> None:
        self.validate()

    def error_class(self) -> type[Exception]:
        return CorpusError

    def _fail(self, name: str, expected: str) -> Exception:
        return self.error_class()(f"{type(self).__name__}.{name} must be {expected}, got {getattr(self, name)!r}")

    def validate(self) -> None:
        """Check every field (run on construction, and again by the consumers in case a field was changed)."""
        for name in ("n_tokens", "contexts_per_batch"):
            if not _is_int(getattr(self, name)) or getattr(self, name) <= 0:
                raise self._fail(name, "a positive int")
        if not _is_int(self.ctx_len) or self.ctx_len < 2:
            raise self._fail("ctx_len", "an int >= 2")
        if not isinstance(self.add_bos, bool):
            raise self._fail("add_bos", "True or False")
        if not _is_int(self.skip_tokens) or self.skip_tokens < 0 or self.skip_tokens % self.batch_tokens:
            raise self._fail(
                "skip_tokens", f"a non-negative multiple of contexts_per_batch × ctx_len = {self.batch_tokens}"
            )

    @property
    def batch_tokens(self) -> int:
        """Tokens in one full forward pass."""
        return self.ctx_len * self.contexts_per_batch

    def check_context(self, model_name: str, max_context: int) -> None:
        """The model must take contexts of ``ctx_len`` tokens."""
        if self.ctx_len > max_context:
            raise self.error_class()(
                f"{type(self).__name__}.ctx_len={self.ctx_len} exceeds {model_name}'s context "
                f"window of {max_context} tokens"
            )

    def batches(self, corpus: Any, tokenizer: Any, *, start: int = 0) -> Iterator[tuple[int, Any]]:
        """(index, batch) pairs of this plan from a Corpus, the index counted from the first batch after
        ``skip_tokens``. ``start`` skips that many more batches (a resumed pass); they are still tokenised, as
        packing is sequential. The token budget is the caller's to apply: only it knows what it kept."""
        first = self.skip_tokens // self.batch_tokens + start
        for b, batch in enumerate(
            corpus.batches(tokenizer, self.ctx_len, self.contexts_per_batch, add_bos=self.add_bos)
        ):
            if b >= first:
                yield b - first + start, batch


@dataclass
class HarvestConfig(ReadPlan):
    """What to harvest (the read plan) and how the stores hold it."""

    dtype: str = "float32"
    """Stored dtype: float32, float16 or bfloat16."""
    shard_tokens: int | None = None
    """Tokens per shard; None: ~32k tokens, rounded to whole forward passes."""

    def error_class(self) -> type[Exception]:
        return HarvestError

    def validate(self) -> None:
        super().validate()
        if self.dtype not in STORE_DTYPES:
            raise self._fail("dtype", f"one of {', '.join(STORE_DTYPES)}")
        if self.shard_tokens is not None and (
            not _is_int(self.shard_tokens) or self.shard_tokens <= 0 or self.shard_tokens % self.batch_tokens
        ):
            # shards hold whole forward passes, so that a resumed harvest replays the same forward batches
            raise self._fail(
                "shard_tokens", f"None or a positive multiple of contexts_per_batch × ctx_len = {self.batch_tokens}"
            )

    def resolved_shard_tokens(self) -> int:
        if self.shard_tokens is None:
            return max(1, 32768 // self.batch_tokens) * self.batch_tokens
        return self.shard_tokens


@dataclass
class AtlasConfig(ReadPlan):
    """What an atlas build reads (the read plan, with a larger default budget) and what it keeps per feature."""

    n_tokens: int = 1_000_000
    """Token budget of the build (tokens read, BOS included)."""
    top_k: int = 20
    """Top-activating contexts kept per feature."""
    n_bins: int = 10
    """Rank-quantile bins of the reservoir sample."""
    per_bin: int = 5
    """Contexts kept per quantile bin."""
    window_left: int = 16
    """Activations stored before the peak token."""
    window_right: int = 8
    """Activations stored after the peak token."""
    hist_lo: float = 1e-4
    """Lower end of the activation histogram (activation units; log10-spaced bins up to hist_hi, clamped)."""
    hist_hi: float = 1e4
    """Upper end of the activation histogram (activation units)."""
    hist_per_decade: int = 8
    """Histogram bins per factor of ten."""
    n_random_contexts: int = 256
    """Contexts (a fixed sample) whose sparse activations are all kept."""
    n_logits: int = 10
    """Tokens listed per feature on each side of its logit effects."""
    n_neighbours: int = 10
    """Nearest features (decoder cosine) listed per feature."""
    exclude_bos: bool | None = None
    """Leave position 0 (the attention sink) out of the statistics; None follows the SAE's own rule."""
    seed: int = 0
    """Seed of the reservoir samples and the random contexts."""
    checkpoint_every: int = 20
    """Batches between checkpoints."""

    def error_class(self) -> type[Exception]:
        return AtlasError

    def validate(self) -> None:
        super().validate()
        for name in ("top_k", "n_bins", "per_bin", "hist_per_decade", "checkpoint_every"):
            if not _is_int(getattr(self, name)) or getattr(self, name) <= 0:
                raise self._fail(name, "a positive int")
        for name in ("window_left", "window_right", "n_random_contexts", "n_logits", "n_neighbours"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise self._fail(name, "an int >= 0")
        if not 0 < self.hist_lo < self.hist_hi:
            raise self._fail("hist_lo", f"in (0, hist_hi={self.hist_hi!r})")
        if self.exclude_bos not in (None, True, False):
            raise self._fail("exclude_bos", "None (follow the SAE), True or False")

    @property
    def reservoir(self) -> int:
        return self.n_bins * self.per_bin

    @property
    def window(self) -> int:
        return self.window_left + 1 + self.window_right

    def hist_edges(self):
        """The histogram's bin edges (a numpy array), log-spaced from hist_lo to hist_hi."""
        import numpy as np

        lo, hi = math.log10(self.hist_lo), math.log10(self.hist_hi)
        n = int(round((hi - lo) * self.hist_per_decade))
        return np.logspace(lo, hi, n + 1)
