"""How an attribution graph is computed, torch-free, so the CLI reads its defaults and help without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GraphConfig:
    """How a graph is computed: its size caps and the targets chosen by default."""

    max_tokens: int = 64
    """The longest prompt accepted (tokens, BOS included)."""
    max_logits: int = 10
    """At most this many target tokens when none are named."""
    logit_probability: float = 0.95
    """Default targets: the most likely next tokens until their probabilities sum to this (a probability)."""
    first_token_mlp: bool = False
    """Count position 0's MLP outputs in the first token's node (every row then adds up to its target's value);
    False leaves them out of the graph, as circuit-tracer does, so the scores compare with its."""
    max_feature_nodes: int = 2048
    """Features whose input edges are computed (nodes of the graph), chosen by influence on the targets."""
    targets_per_batch: int = 128
    """Targets per batched backward pass (memory grows with it: batch × positions × width floats per block)."""
