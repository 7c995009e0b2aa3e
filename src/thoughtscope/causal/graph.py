"""An attribution graph: which transcoder features, errors and tokens carried a prompt's computation to its next
token, as direct effects in the replacement model with attention patterns and norm scales frozen.

The node order follows circuit-tracer's Graph, so a graph converts to its files without remapping:
``[selected features | error nodes (layer-major: layer * n_pos + pos) | token embeddings (by position) | logits]``.
``adjacency[target, source]`` is the direct effect of the source node on the target node (a feature's
pre-activation, an error's or logit's value); rows of tokens and errors are zero (they have no inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

#: the version of the graph files this code writes; a file from a newer version is refused
GRAPH_VERSION = 1


@dataclass
class AttributionGraph:
    """A computed graph and what it was computed from (the model's name and the transcoder set's folder)."""

    prompt: str
    input_tokens: Tensor  # [n_pos] long: the prompt's token ids (BOS included where the model adds one)
    token_strs: list[str]  # [n_pos]: each position's text as a person reads it
    logit_tokens: Tensor  # [n_logits] long: the target tokens
    logit_probabilities: Tensor  # [n_logits]: each target's probability at the last position
    active_features: Tensor  # [n_active, 3] long: (layer, position, feature index) of every active feature
    activation_values: Tensor  # [n_active]: each active feature's activation
    selected_features: Tensor  # [n_selected] long: rows of active_features that are nodes (their edges computed)
    adjacency: Tensor  # [n_nodes, n_nodes] float32, adjacency[target, source]
    n_layers: int
    model: str  # the model's name (circuit-tracer's "scan")
    transcoders: str = ""  # where the transcoder set came from
    config: dict = field(default_factory=dict)  # how it was computed (targets, caps, thresholds, seconds)
    version: int = GRAPH_VERSION

    @property
    def n_pos(self) -> int:
        return int(self.input_tokens.numel())

    @property
    def n_selected(self) -> int:
        return int(self.selected_features.numel())

    @property
    def n_logits(self) -> int:
        return int(self.logit_tokens.numel())

    @property
    def n_nodes(self) -> int:
        return self.n_selected + self.n_layers * self.n_pos + self.n_pos + self.n_logits

    # node index ranges, in the order of the adjacency matrix
    @property
    def error_start(self) -> int:
        return self.n_selected

    @property
    def token_start(self) -> int:
        return self.n_selected + self.n_layers * self.n_pos

    @property
    def logit_start(self) -> int:
        return self.token_start + self.n_pos

    def error_node(self, layer: int, pos: int) -> int:
        return self.error_start + layer * self.n_pos + pos

    def token_node(self, pos: int) -> int:
        return self.token_start + pos

    def logit_node(self, i: int) -> int:
        return self.logit_start + i

    def feature_node(self, layer: int, pos: int, feature: int) -> int | None:
        """The node of a selected feature, None when it is not a node."""
        sel = self.active_features[self.selected_features]
        hit = ((sel[:, 0] == layer) & (sel[:, 1] == pos) & (sel[:, 2] == feature)).nonzero().flatten()
        return int(hit[0]) if len(hit) else None

    def check(self) -> None:
        """Shapes agree with each other (a graph read from a file goes through this)."""
        from ..errors import CausalError

        n = self.n_nodes
        if tuple(self.adjacency.shape) != (n, n):
            raise CausalError(f"graph adjacency is {tuple(self.adjacency.shape)}, expected ({n}, {n}) for its nodes")
        if self.active_features.dim() != 2 or self.active_features.shape[1] != 3:
            raise CausalError(
                f"active_features must be [n, 3] (layer, position, feature), got {tuple(self.active_features.shape)}"
            )
        if len(self.activation_values) != len(self.active_features):
            raise CausalError("activation_values and active_features differ in length")
        if len(self.token_strs) != self.n_pos:
            raise CausalError(f"token_strs has {len(self.token_strs)} entries for {self.n_pos} positions")
        if self.n_selected and int(self.selected_features.max()) >= len(self.active_features):
            raise CausalError("selected_features points past active_features")
        if len(self.logit_probabilities) != self.n_logits:
            raise CausalError("logit_probabilities and logit_tokens differ in length")

    def to(self, dtype: torch.dtype) -> AttributionGraph:
        self.adjacency = self.adjacency.to(dtype)
        return self
