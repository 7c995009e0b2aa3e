"""How much each node and edge of an attribution graph matters to its logits, pruning, and the graph's two scores.

The definitions are circuit-tracer's (graph.py: normalize_matrix, compute_influence, prune_graph,
compute_graph_scores), so a graph pruned here shows the same nodes as one pruned there. Influence flows backwards
from the logit nodes, weighted by the logits' probabilities, along the row-normalised absolute adjacency
``|A[target, source]| / sum_source |A[target, source]|``: a node's influence is the sum over all paths to the logits
of the products of those fractions, ``w @ (Â + Â² + ...)``, which ends because the graph has no cycles.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import CausalError
from .graph import AttributionGraph

#: the longest path (in edges) the influence series follows before it calls the graph cyclic, as circuit-tracer
MAX_PATH_LENGTH = 1000


def normalize_matrix(adjacency: Tensor) -> Tensor:
    """|A| with each row divided by its sum: the share of a target's direct input that each source gives it (a row
    with no inputs stays zero)."""
    a = adjacency.abs()
    return a / a.sum(dim=1, keepdim=True).clamp(min=1e-10)


def _propagate(normalized: Tensor, logit_weights: Tensor, max_iter: int = MAX_PATH_LENGTH) -> Tensor:
    """``w @ Â + w @ Â² + ...``, one matrix-vector product per path length, until no path is longer."""
    current = logit_weights @ normalized
    total = current.clone()
    steps = 0
    while current.any():
        if steps >= max_iter:
            raise CausalError(
                f"graph influence did not vanish after paths of {max_iter} edges: the adjacency has a cycle, "
                "expected a graph whose edges only point from earlier nodes to later ones"
            )
        current = current @ normalized
        total += current
        steps += 1
    return total


def node_influence(adjacency: Tensor, logit_weights: Tensor) -> Tensor:
    """Each node's total influence on the logits: ``w @ (Â + Â² + ...)`` with Â the normalised |adjacency| and w the
    logit probabilities placed on the logit nodes (zero elsewhere). Logit nodes themselves get zero."""
    adjacency = adjacency.float()
    return _propagate(normalize_matrix(adjacency), logit_weights.to(adjacency))


def edge_influence(adjacency: Tensor, logit_weights: Tensor) -> Tensor:
    """Each edge's influence on the logits, [target, source]: the edge's normalised weight times its target's
    influence plus the target's own logit weight (so edges into logits count too)."""
    adjacency = adjacency.float()
    normalized = normalize_matrix(adjacency)
    weights = logit_weights.to(adjacency)
    reach = _propagate(normalized, weights) + weights
    return normalized * reach[:, None]


def find_threshold(scores: Tensor, threshold: float) -> Tensor:
    """The smallest score among the highest scores that together reach `threshold` of the total (all scores at
    1.0)."""
    ordered = torch.sort(scores.flatten(), descending=True).values
    cumulative = torch.cumsum(ordered, dim=0) / ordered.sum()
    index = int(torch.searchsorted(cumulative, threshold).item())
    return ordered[min(index, len(ordered) - 1)]


class PruneResult(NamedTuple):
    node_mask: Tensor  # [n_nodes] bool: the nodes kept
    edge_mask: Tensor  # [n_nodes, n_nodes] bool, [target, source]: the edges kept
    cumulative_scores: Tensor  # [n_nodes]: share of all influence held by the nodes at least as influential


def logit_weights(graph: AttributionGraph) -> Tensor:
    """The logit probabilities on the logit nodes and zero elsewhere: what influence is measured against."""
    if graph.n_logits < 1:
        raise CausalError("the graph has no logit nodes, expected at least one target token to measure influence on")
    if not bool(torch.isfinite(graph.adjacency).all()):
        raise CausalError("the graph's adjacency has NaN or infinite weights, expected finite direct effects")
    w = torch.zeros(graph.n_nodes, device=graph.adjacency.device)
    w[graph.logit_start :] = graph.logit_probabilities.to(w)
    return w


def _check_threshold(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise CausalError(f"{name} must be between 0.0 and 1.0 (a share of total influence), got {value}")


def _drop_dead_ends(node_mask: Tensor, edge_mask: Tensor, n_features: int, n_inner: int) -> None:
    """Remove features and errors with no kept outgoing edge and features with no kept incoming edge, then the
    edges of removed nodes, until nothing changes (each removal can strand another). In place, in circuit-tracer's
    order: when the first pass removes nothing, edges touching nodes the node threshold dropped stay in the mask."""

    def strand() -> None:
        node_mask[:n_inner] &= edge_mask[:, :n_inner].any(0)
        node_mask[:n_features] &= edge_mask[:n_features].any(1)

    before = node_mask.clone()
    strand()
    while not torch.equal(before, node_mask):
        before.copy_(node_mask)
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        strand()


def prune(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
    """Keep the most influential nodes holding `node_threshold` of all node influence (tokens and logits always),
    then the edges among them holding `edge_threshold` of all edge influence, then drop features and errors left
    without an outgoing edge and features left without an incoming one. circuit-tracer's prune_graph."""
    _check_threshold("node_threshold", node_threshold)
    _check_threshold("edge_threshold", edge_threshold)
    weights = logit_weights(graph)
    adjacency = graph.adjacency.float()
    influence = node_influence(adjacency, weights)
    node_mask = influence >= find_threshold(influence, node_threshold)
    node_mask[graph.token_start :] = True

    kept = adjacency.clone()
    kept[~node_mask] = 0
    kept[:, ~node_mask] = 0
    edge_scores = edge_influence(kept, weights)
    edge_mask = edge_scores >= find_threshold(edge_scores, edge_threshold)
    _drop_dead_ends(node_mask, edge_mask, graph.n_selected, graph.token_start)

    ordered, order = torch.sort(influence, descending=True)
    cumulative = torch.zeros_like(influence)
    cumulative[order] = torch.cumsum(ordered, dim=0) / ordered.sum()
    return PruneResult(node_mask, edge_mask, cumulative)


def graph_scores(graph: AttributionGraph) -> tuple[float, float]:
    """(replacement, completeness), circuit-tracer's compute_graph_scores on the whole graph.

    replacement: of the influence that tokens and errors (the graph's sources) have on the logits, the share
    tokens have, i.e. reaching the logits through features only. completeness: over every node, weighted by its
    influence plus its logit weight, the share of its direct input that does not come from error nodes.
    replacement is NaN when neither tokens nor errors reach the logits (as in circuit-tracer).
    """
    weights = logit_weights(graph)
    normalized = normalize_matrix(graph.adjacency.float())
    influence = _propagate(normalized, weights)
    errors = slice(graph.error_start, graph.token_start)
    token_influence = influence[graph.token_start : graph.logit_start].sum()
    error_influence = influence[errors].sum()
    replacement = token_influence / (token_influence + error_influence)

    non_error = 1 - normalized[:, errors].sum(dim=-1)
    output_influence = influence + weights
    completeness = (non_error * output_influence).sum() / output_influence.sum()
    return float(replacement), float(completeness)


def top_paths(
    graph: AttributionGraph, n: int = 5, target: int = 0, *, through_errors: bool = False
) -> list[tuple[float, list[int]]]:
    """The n strongest paths into logit `target` from a token (or, with `through_errors`, also from an error node):
    the product of row-normalised |edge| weights along the path, found by a beam of width n backwards from the
    logit (a beam search: the strongest found, not always the strongest there are). Paths are listed source first."""
    A = normalize_matrix(graph.adjacency.float())
    beam = max(4 * n, 20)  # wider than n: many partial paths end at errors, which are not listed
    start = graph.logit_node(target)
    beams: list[tuple[float, list[int]]] = [(1.0, [start])]
    done: list[tuple[float, list[int]]] = []
    for _ in range(graph.n_layers + 2):
        grown = []
        for score, path in beams:
            row = A[path[-1]]
            vals, idx = row.topk(min(beam, int((row > 0).sum())))
            for v, j in zip(vals.tolist(), idx.tolist()):
                if j < graph.error_start:
                    grown.append((score * v, path + [j]))
                elif j >= graph.token_start or through_errors:
                    done.append((score * v, path + [j]))
        beams = sorted(grown, key=lambda b: -b[0])[:beam]
        if not beams:
            break
    return [(s, p[::-1]) for s, p in sorted(done, key=lambda b: -b[0])[:n]]
