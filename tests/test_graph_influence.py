"""Influence, pruning and the graph scores on graphs small enough to work out by hand, and against circuit-tracer's
own functions on random graphs where circuit-tracer is importable."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.attribution_graphs import hand_graph, node, random_graph

from thoughtscope.causal.influence import (
    edge_influence,
    find_threshold,
    graph_scores,
    logit_weights,
    node_influence,
    normalize_matrix,
    prune,
)
from thoughtscope.errors import CausalError

torch.set_num_threads(1)


def test_normalize_matrix_takes_each_rows_absolute_shares_and_leaves_empty_rows_zero():
    a = torch.tensor([[0.0, 0.0, 0.0], [1.0, -3.0, 0.0], [0.0, 2.0, 2.0]])
    n = normalize_matrix(a)
    assert torch.allclose(n, torch.tensor([[0.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.0, 0.5, 0.5]]))


def chain():
    """token 0 -> feature -> logit: the whole computation goes through one feature."""
    return hand_graph(1, 1, [(0, 0, 7)], {(("f", 0), ("t", 0)): 2.0, (("l", 0), ("f", 0)): 3.0})


def test_a_chain_through_a_feature_has_influence_one_everywhere_and_perfect_scores():
    g = chain()
    inf = node_influence(g.adjacency, logit_weights(g))
    assert inf.tolist() == [1.0, 0.0, 1.0, 0.0]  # feature, error, token, logit
    assert graph_scores(g) == (1.0, 1.0)


def half_error(sign: float = 1.0):
    """The logit reads a feature (fed by the token) and an error node equally."""
    return hand_graph(
        1,
        1,
        [(0, 0, 7)],
        {(("f", 0), ("t", 0)): 1.0, (("l", 0), ("f", 0)): 1.0, (("l", 0), ("e", 0, 0)): sign * 1.0},
    )


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_an_error_carrying_half_the_logit_gives_the_scores_derived_on_paper(sign):
    g = half_error(sign)
    inf = node_influence(g.adjacency, logit_weights(g))
    assert torch.allclose(inf, torch.tensor([0.5, 0.5, 0.5, 0.0]))
    replacement, completeness = graph_scores(g)
    # replacement: token 0.5 / (token 0.5 + error 0.5); completeness: only the logit row (weight 1) has an error
    # share (0.5), every other row none: (0.5 + 0.5 + 0.5 + 1 * 0.5) / (0.5 + 0.5 + 0.5 + 1)
    assert replacement == pytest.approx(0.5)
    assert completeness == pytest.approx(0.8)


def test_logit_probabilities_weight_influence_and_two_step_paths_multiply():
    # two logits (p = 0.6, 0.2); logit 0 reads f0 and f1 1:3, logit 1 reads f1 only; f1 reads f0 and the token 1:1
    g = hand_graph(
        2,
        1,
        [(0, 0, 1), (1, 0, 2)],
        {
            (("l", 0), ("f", 0)): 1.0,
            (("l", 0), ("f", 1)): 3.0,
            (("l", 1), ("f", 1)): 5.0,
            (("f", 1), ("f", 0)): 2.0,
            (("f", 1), ("t", 0)): -2.0,
            (("f", 0), ("t", 0)): 1.0,
        },
        logit_probs=[0.6, 0.2],
    )
    inf = node_influence(g.adjacency, logit_weights(g))
    f1 = 0.6 * 0.75 + 0.2 * 1.0
    f0 = 0.6 * 0.25 + f1 * 0.5
    token = f1 * 0.5 + f0 * 1.0
    assert inf[node(g, ("f", 1))].item() == pytest.approx(f1)
    assert inf[node(g, ("f", 0))].item() == pytest.approx(f0)
    assert inf[node(g, ("t", 0))].item() == pytest.approx(token)
    edges = edge_influence(g.adjacency, logit_weights(g))
    # an edge's score: its share of the target's input times the target's influence plus its logit weight
    assert edges[node(g, ("f", 1)), node(g, ("f", 0))].item() == pytest.approx(0.5 * f1)
    assert edges[node(g, ("l", 0)), node(g, ("f", 1))].item() == pytest.approx(0.75 * 0.6)


def two_paths(weak: float = 1.0):
    """logit <- a (weight 9) <- token 1, logit <- b (weight `weak`) <- token 0."""
    return hand_graph(
        1,
        2,
        [(0, 1, 3), (0, 0, 4)],
        {
            (("f", 0), ("t", 1)): 1.0,
            (("l", 0), ("f", 0)): 9.0,
            (("f", 1), ("t", 0)): 1.0,
            (("l", 0), ("f", 1)): weak,
        },
    )


def test_pruning_keeps_the_strong_path_and_drops_the_weak_one():
    g = two_paths()
    kept = prune(g)
    a, b = node(g, ("f", 0)), node(g, ("f", 1))
    assert kept.node_mask[a] and not kept.node_mask[b]
    assert not kept.node_mask[g.error_start : g.token_start].any()  # errors with no influence go
    assert kept.node_mask[g.token_start :].all()  # tokens and logits always stay
    assert kept.edge_mask[g.logit_node(0), a] and kept.edge_mask[a, g.token_node(1)]
    assert not kept.edge_mask[g.logit_node(0), b] and not kept.edge_mask[b, g.token_node(0)]
    # cumulative shares of the total 2.0: a and token 1 hold 0.9 each (tied, in either order), b and token 0 0.1
    shares = kept.cumulative_scores
    assert sorted([shares[a].item(), shares[g.token_node(1)].item()]) == pytest.approx([0.45, 0.9])
    assert sorted([shares[b].item(), shares[g.token_node(0)].item()]) == pytest.approx([0.95, 1.0])


def test_with_an_equal_second_path_both_survive():
    g = two_paths(weak=9.0)
    kept = prune(g)
    assert kept.node_mask[: g.n_selected].all()


def test_thresholds_of_one_keep_every_node_and_edge():
    g = random_graph(0)
    kept = prune(g, node_threshold=1.0, edge_threshold=1.0)
    assert kept.node_mask.all()
    assert kept.edge_mask[g.adjacency != 0].all()


def test_a_feature_left_without_inputs_is_dropped_with_its_edges():
    # c writes the logit strongly but reads nothing: influential, yet a dead end once edges are pruned
    g = hand_graph(
        1,
        1,
        [(0, 0, 1), (0, 0, 2)],
        {(("f", 0), ("t", 0)): 1.0, (("l", 0), ("f", 0)): 1.0, (("l", 0), ("f", 1)): 2.0},
    )
    kept = prune(g, node_threshold=1.0, edge_threshold=0.98)
    assert kept.node_mask[0] and not kept.node_mask[1]
    assert not kept.edge_mask[:, 1].any()


def test_an_error_node_with_influence_is_kept_without_inputs():
    g = half_error()
    kept = prune(g)
    assert kept.node_mask[g.error_node(0, 0)]


def test_find_threshold_keeps_the_smallest_score_needed_to_reach_the_share():
    s = torch.tensor([1.0, 5.0, 4.0])
    assert find_threshold(s, 0.5).item() == 5.0
    assert find_threshold(s, 0.51).item() == 4.0
    assert find_threshold(s, 1.0).item() == 1.0


def test_bad_input_is_refused_with_a_clear_error():
    g = chain()
    with pytest.raises(CausalError, match="node_threshold"):
        prune(g, node_threshold=1.5)
    with pytest.raises(CausalError, match="edge_threshold"):
        prune(g, edge_threshold=-0.1)
    cyclic = chain()
    cyclic.adjacency[0] = 0.0
    cyclic.adjacency[0, 0] = 1.0  # the feature's only input is itself
    with pytest.raises(CausalError, match="cycle"):
        graph_scores(cyclic)
    bad = chain()
    bad.adjacency[0, 2] = math.nan
    with pytest.raises(CausalError, match="NaN"):
        prune(bad)


def test_influence_on_random_graphs_matches_the_closed_form_series():
    """w @ ((I - Â)^-1 - I): the power series summed in closed form."""
    for seed in range(3):
        g = random_graph(seed)
        w = logit_weights(g)
        a = normalize_matrix(g.adjacency).double()
        closed = w.double() @ (torch.linalg.inv(torch.eye(g.n_nodes, dtype=torch.float64) - a) - torch.eye(g.n_nodes))
        assert torch.allclose(node_influence(g.adjacency, w).double(), closed, atol=1e-5)
        r, c = graph_scores(g)
        assert 0.0 <= r <= 1.0 and 0.0 <= c <= 1.0


@pytest.mark.slow
def test_matches_circuit_tracers_own_functions_on_random_graphs():
    """Run where circuit-tracer imports (e.g. /work/venv-ct/bin/python -m pytest -m slow this file)."""
    ct = pytest.importorskip("circuit_tracer.graph")
    from circuit_tracer.attribution.targets import LogitTarget
    from circuit_tracer.utils.tl_nnsight_mapping import UnifiedConfig

    for seed in range(5):
        g = random_graph(seed, n_layers=3, n_pos=5, n_features=25)
        cfg = UnifiedConfig(g.n_layers, 8, 2, 4, 16, 1000, "tok", "tiny", "Tiny")
        theirs = ct.Graph(
            g.prompt, g.input_tokens, g.active_features, g.adjacency, cfg, g.selected_features,
            g.activation_values, [LogitTarget(str(int(t)), int(t)) for t in g.logit_tokens], g.logit_probabilities,
            scan="tiny",
        )  # fmt: skip
        for node_t, edge_t in [(0.8, 0.98), (0.5, 0.9), (0.95, 0.6), (1.0, 1.0)]:
            ours, ref = prune(g, node_t, edge_t), ct.prune_graph(theirs, node_t, edge_t)
            assert torch.equal(ours.node_mask, ref.node_mask)
            assert torch.equal(ours.edge_mask, ref.edge_mask)
            assert torch.allclose(ours.cumulative_scores, ref.cumulative_scores)
        assert graph_scores(g) == pytest.approx(ct.compute_graph_scores(theirs), abs=1e-6)


def test_total_effects_follow_the_chain_through_activations():
    from thoughtscope.causal.graph_check import top_features, total_effects

    # token -> f0 (block 0) -> f1 (block 1) -> logit, and f0 -> logit directly; f2 pushes the logit down
    g = hand_graph(
        3, 2, [(0, 1, 5), (1, 1, 6), (2, 1, 7)],
        {(("f", 1), ("f", 0)): 2.0, (("l", 0), ("f", 1)): 3.0, (("l", 0), ("f", 0)): 0.5,
         (("l", 0), ("f", 2)): -4.0, (("f", 0), ("t", 1)): 1.0},
    )  # fmt: skip
    a = g.activation_values  # 1.0, 1.5, 2.0
    t = total_effects(g)
    # removing f0 removes its direct 0.5 and, through f1's pre-activation (2.0 of f1's 1.5), 2.0 / 1.5 of f1's 3.0
    assert t[0].item() == pytest.approx(0.5 + 2.0 / float(a[1]) * 3.0)
    assert t[1].item() == pytest.approx(3.0) and t[2].item() == pytest.approx(-4.0)
    assert top_features(g, 2) == [0, 1]  # the inhibitory f2 is not among the features that push the target up
    assert top_features(g, 1, direct=True) == [1]


def test_pearson_beside_spearman():
    from thoughtscope.stats import pearson, spearman

    a = [1.0, 2.0, 3.0, 4.0]
    assert pearson(a, [2.0, 4.0, 6.0, 8.0]) == pytest.approx(1.0)
    assert pearson(a, [4.0, 3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert pearson(a, [1.0, 8.0, 27.0, 64.0]) < spearman(a, [1.0, 8.0, 27.0, 64.0]) == pytest.approx(1.0)
    assert math.isnan(pearson(a, [1.0, 1.0, 1.0, 1.0]))
