"""Attribution graphs (causal.attribution_graph): direct effects in the replacement model add up to each target's
value, selection by influence, bad input; the intervention check (causal.graph_check) on tiny models."""

from __future__ import annotations

import pytest
import torch

from thoughtscope.causal import attribution_graph as ag
from thoughtscope.causal.graph_check import FeatureEdit, edited, last_logits, prompt_check, summarise
from thoughtscope.causal.influence import graph_scores
from thoughtscope.errors import CausalError
from thoughtscope.models import tiny_model
from thoughtscope.sae import SAEConfig, build_sae
from thoughtscope.sites import Site, capture

pytestmark = pytest.mark.usefixtures("one_thread")

D, L = 32, 3
PROMPT = "a red kite flew past small hills"


def _set(lm, *, seed=0, zero_bias=True):
    out = []
    for i in range(len(lm.layers)):
        cfg = SAEConfig(arch="transcoder", d_model=D, n_features=64, k=6, site=f"mlp_in.{i}",
                        target_site=f"mlp_out.{i}", skip_connection=True)  # fmt: skip
        tc = build_sae(cfg, seed=seed + i)
        with torch.no_grad():
            tc.W_skip.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed + 10 + i))
            tc.W_dec.mul_(0.02)  # writes the size of the tiny model's MLP outputs, as a trained transcoder's are
            if zero_bias:
                tc.b_dec.zero_()
                tc.b_in.zero_()
        out.append(tc.eval())
    return out


@pytest.fixture(scope="module", params=["llama", "gemma", "qwen2"])
def model(request):
    lm = tiny_model(request.param, d_model=D, n_layers=L, vocab=256)
    return lm, _set(lm)


def test_direct_effects_add_up_to_every_target(model):
    lm, tcs = model
    g = ag.build(
        lm, tcs, PROMPT, cfg=ag.GraphConfig(max_feature_nodes=10_000, targets_per_batch=16, first_token_mlp=True)
    )
    assert g.n_selected == len(g.active_features) > 0 and (g.active_features[:, 1] > 0).all()  # none at position 0
    ids = g.input_tokens[None]
    logits = lm.model(ids).logits[0, -1].detach()
    with torch.no_grad():
        for i, t in enumerate(g.logit_tokens.tolist()):  # a logit minus the mean logit = the sum of its direct effects
            row = g.adjacency[g.logit_node(i)]
            torch.testing.assert_close(row.sum(), logits[t] - logits.mean(), atol=2e-4, rtol=1e-3)
        reads = capture(lm, [Site(i, "mlp_in") for i in range(L)], ids)
        for node in range(g.n_selected):  # a feature's pre-activation minus its bias (b_in = 0 here)
            layer, pos, feat = g.active_features[g.selected_features[node]].tolist()
            pre = reads[Site(layer, "mlp_in")][0, pos] @ tcs[layer].enc[feat]
            torch.testing.assert_close(g.adjacency[node].sum(), pre, atol=5e-4, rtol=1e-3)
    # edges only run up the layers, and errors and tokens have no inputs
    lay = g.active_features[g.selected_features, 0]
    feat_block = g.adjacency[: g.n_selected, : g.n_selected]
    assert not bool((feat_block != 0)[lay[:, None] <= lay[None, :]].any())
    assert not bool(g.adjacency[g.error_start : g.logit_start].any())
    # position 0 depends on the first token alone: its MLP outputs are part of that token's node, not errors
    assert not bool(g.adjacency[:, [g.error_node(i, 0) for i in range(L)]].any())
    # circuit-tracer's rule (the default) leaves them out: the first token's edges are its embedding's alone
    ct = ag.build(lm, tcs, PROMPT, cfg=ag.GraphConfig(max_feature_nodes=10_000, targets_per_batch=16))
    where = {int(a): i for i, a in enumerate(ct.selected_features)}  # the same features, selected in another order
    perm = torch.tensor([where[int(a)] for a in g.selected_features] + list(range(ct.n_selected, ct.n_nodes)))
    a, b = ct.adjacency[perm][:, perm], g.adjacency
    torch.testing.assert_close(a[:, : g.token_start], b[:, : g.token_start], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(a[:, g.token_node(0)], b[:, g.token_node(0)])
    torch.testing.assert_close(a[:, g.token_node(1) :], b[:, g.token_node(1) :], atol=1e-4, rtol=1e-4)
    rep, comp = graph_scores(g)
    assert 0 < rep <= 1 and 0 < comp <= 1


def test_targets_default_named_and_refused(model):
    lm, tcs = model
    g = ag.build(lm, tcs, PROMPT, cfg=ag.GraphConfig(max_feature_nodes=8, max_logits=3, logit_probability=0.999))
    assert g.n_logits == 3 and bool((g.logit_probabilities[:-1] >= g.logit_probabilities[1:]).all())
    named = ag.build(lm, tcs, PROMPT, targets=[7, 11], cfg=ag.GraphConfig(max_feature_nodes=8))
    assert named.logit_tokens.tolist() == [7, 11]
    with pytest.raises(CausalError, match="outside the vocabulary"):
        ag.build(lm, tcs, PROMPT, targets=[100_000])
    with pytest.raises(CausalError, match="graphs take at most 4"):
        ag.build(lm, tcs, PROMPT, cfg=ag.GraphConfig(max_tokens=4))
    with pytest.raises(CausalError, match="2 transcoders for a model with 3 blocks"):
        ag.build(lm, tcs[:2], PROMPT)


def test_a_capped_graph_keeps_the_most_influential_features_and_the_same_edges(model):
    lm, tcs = model
    full = ag.build(lm, tcs, PROMPT, cfg=ag.GraphConfig(max_feature_nodes=10_000, targets_per_batch=64))
    capped = ag.build(lm, tcs, PROMPT, cfg=ag.GraphConfig(max_feature_nodes=12, targets_per_batch=6))
    assert capped.n_selected == 12
    # the first batch: the features with the largest direct effect on the logits (weighted by probability)
    w = full.logit_probabilities / full.logit_probabilities.sum()
    direct = (w[:, None] * full.adjacency[full.logit_start :, : full.n_selected].abs()
              / full.adjacency[full.logit_start :].abs().sum(1, keepdim=True)).sum(0)  # fmt: skip
    best = set(full.selected_features[direct.topk(6).indices].tolist())
    assert set(capped.selected_features[:6].tolist()) == best
    # edges do not depend on which features are nodes
    for node, row in enumerate(capped.selected_features.tolist()):
        fnode = full.selected_features.tolist().index(row)
        for src, srow in enumerate(capped.selected_features.tolist()):
            assert capped.adjacency[node, src] == pytest.approx(
                float(full.adjacency[fnode, full.selected_features.tolist().index(srow)]), abs=1e-5
            )


def test_edits_in_the_real_model(model):
    lm, tcs = model
    ids = lm.tokenize(PROMPT)[0]
    clean = last_logits(lm, ids)
    # setting a feature to the value it already has changes nothing; ablating an active one does
    f = tcs[1].encode(capture(lm, ["mlp_in.1"], ids)[Site(1, "mlp_in")][0, -1])
    feat = int(f.argmax())
    same = last_logits(lm, ids, tcs, [FeatureEdit(1, feat, float(f[feat]), ids.shape[1] - 1)])
    torch.testing.assert_close(same, clean, atol=1e-5, rtol=1e-5)
    gone = last_logits(lm, ids, tcs, [FeatureEdit(1, feat, 0.0, ids.shape[1] - 1)])
    assert (gone - clean).abs().max() > 1e-4
    with pytest.raises(CausalError, match="feature 9999 of block 1"), edited(lm, tcs, [FeatureEdit(1, 9999)]):
        pass


def test_intervention_check_runs_and_direct_effects_agree(model):
    lm, tcs = model
    rows = []
    for i, prompt in enumerate([PROMPT, "the old boat sailed into a quiet bay", "seven cats sat on warm stones"]):
        g = ag.build(lm, tcs, prompt, cfg=ag.GraphConfig(max_feature_nodes=64))
        rows.append(prompt_check(lm, tcs, g, k=3, seed=i, n_direct=20))
    s = summarise(rows)
    assert s["n_prompts"] == 3 and s["direct_n"] == 60
    for mode in ("free", "frozen"):  # top-k minus random-k drops, with their interval (the real test is slow)
        ci = s[f"top_minus_random_{mode}"]
        assert ci["n"] == 3 and ci["ci"][0] <= ci["mean"] <= ci["ci"][1]
    # in the graph's own linear model (patterns and norm scales frozen too) an ablation moves the logit by its edge
    for r in rows:
        torch.testing.assert_close(torch.tensor(r["direct_measured_linear"]), torch.tensor(r["direct_predicted"]),
                                   atol=1e-4, rtol=1e-3)  # fmt: skip
