"""Small attribution graphs built by hand (edges named by node kind) and random acyclic ones, for the influence,
pruning and graph-file tests."""

from __future__ import annotations

import torch

from thoughtscope.causal.graph import AttributionGraph


def hand_graph(
    n_layers: int,
    n_pos: int,
    features: list[tuple[int, int, int]],
    edges: dict[tuple[tuple, tuple], float],
    logit_probs: list[float] = (1.0,),
    logit_tokens: list[int] | None = None,
) -> AttributionGraph:
    """A graph whose nodes are `features` (layer, pos, index), then errors, tokens and logits; `edges` maps
    (target, source) to a direct effect, each node named ("f", i), ("e", layer, pos), ("t", pos) or ("l", k)."""
    n_logits = len(logit_probs)
    g = AttributionGraph(
        prompt=" ".join(f"w{p}" for p in range(n_pos)),
        input_tokens=torch.arange(10, 10 + n_pos),
        token_strs=[f"w{p}" for p in range(n_pos)],
        logit_tokens=torch.tensor(logit_tokens or list(range(100, 100 + n_logits))),
        logit_probabilities=torch.tensor(logit_probs, dtype=torch.float32),
        active_features=torch.tensor(features, dtype=torch.long).reshape(-1, 3),
        activation_values=torch.linspace(1.0, 2.0, len(features)),
        selected_features=torch.arange(len(features)),
        adjacency=torch.zeros(0, 0),
        n_layers=n_layers,
        model="tiny-model",
    )
    g.adjacency = torch.zeros(g.n_nodes, g.n_nodes)
    for (target, source), weight in edges.items():
        g.adjacency[node(g, target), node(g, source)] = weight
    g.check()
    return g


def node(g: AttributionGraph, name: tuple) -> int:
    kind, *where = name
    if kind == "f":
        return where[0]
    if kind == "e":
        return g.error_node(*where)
    if kind == "t":
        return g.token_node(*where)
    return g.logit_node(*where)


def random_graph(seed: int, n_layers: int = 3, n_pos: int = 4, n_features: int = 12, n_logits: int = 3):
    """A random acyclic graph shaped like a real one: a feature at layer l reads tokens, errors and features of
    earlier layers at its position or before; logits read everything; signed weights, about half the edges zero."""
    gen = torch.Generator().manual_seed(seed)
    layers = torch.randint(0, n_layers, (n_features,), generator=gen)
    positions = torch.randint(0, n_pos, (n_features,), generator=gen)
    feats = torch.randint(0, 50, (n_features,), generator=gen)
    features = list(zip(layers.tolist(), positions.tolist(), feats.tolist(), strict=True))
    probs = torch.rand(n_logits, generator=gen)
    probs = (probs / probs.sum() * 0.9).tolist()
    g = hand_graph(n_layers, n_pos, features, {}, logit_probs=probs)
    a = g.adjacency
    for i, (layer, pos, _) in enumerate(features):
        for j, (l2, p2, _) in enumerate(features):
            if l2 < layer and p2 <= pos:
                a[i, j] = torch.randn((), generator=gen)
        for l2 in range(layer):
            for p2 in range(pos + 1):
                a[i, g.error_node(l2, p2)] = torch.randn((), generator=gen)
        for p2 in range(pos + 1):
            a[i, g.token_node(p2)] = torch.randn((), generator=gen)
    a[g.logit_start :, : g.logit_start] = torch.randn(n_logits, g.logit_start, generator=gen)
    a *= torch.rand(a.shape, generator=gen) < 0.5
    g.check()
    return g
