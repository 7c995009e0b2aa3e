"""benchmarks/graph.py: its pieces on a tiny random model and tiny transcoders, and its --quick run (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import graph as bench  # benchmarks/ is on the test path (pyproject)
import pytest
import torch
from helpers.transcoder_sets import random_transcoder_set, their_forward
from safetensors.torch import load_file

from thoughtscope.causal.attribution_graph import GraphConfig, build
from thoughtscope.causal.influence import graph_scores
from thoughtscope.corpus import Corpus
from thoughtscope.errors import CausalError
from thoughtscope.models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

D, L = 32, 3
PROMPTS = ["a red kite flew past small hills", "the old mill turned all day", "seven blue jays sang at dawn"]


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", d_model=D, n_layers=L, vocab=256)


@pytest.fixture(scope="module")
def tcs():
    ts = random_transcoder_set(L, D, 64, arch="transcoder")
    with torch.no_grad():
        for tc in ts:
            tc.W_dec.mul_(0.02)  # writes the size of the tiny model's MLP outputs
    return list(ts)


def test_the_prompts_file_holds_20_held_out_prompts_no_test_uses():
    timing, prompts = bench.load_prompts()
    assert len(prompts) >= 20 and len(set(prompts)) == len(prompts) and len(timing.split()) >= 32
    tests = "".join(p.read_text() for p in Path(__file__).parent.rglob("*.py") if p.name != Path(__file__).name)
    assert not [p for p in prompts if p in tests]


def test_a_damaged_prompts_file_is_named(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"timing": "x", "prompts": [1, 2]}))
    with pytest.raises(CausalError, match="p.json"):
        bench.load_prompts(bad)


def test_spread_layers_and_the_32_token_cut(lm):
    assert bench.spread_layers(30, 4) == [7, 14, 21, 29]
    assert bench.spread_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(CausalError):
        bench.spread_layers(3, 4)
    text = bench.cut_to_tokens(lm, "one two three four five six seven eight nine ten", 20)  # one byte a token
    assert lm.tokenize(text)[0].shape[1] <= 20 < lm.tokenize(text + " eleven")[0].shape[1]


def test_peak_rss_sees_memory_taken_inside():
    with bench.PeakRSS() as mem:
        before = bench.PeakRSS.now()
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        x += 1
    assert mem.peak >= before + 48 * 2**20 and mem.mb > 0


@pytest.mark.parametrize("arch", ["transcoder", "jumprelu-transcoder"])
def test_export_gives_circuit_tracer_our_outputs(tmp_path, arch):
    """b_in folded into b_enc (and through the skip into b_dec): their forward on the exported tensors equals ours
    (their TopK keeps negatives among the k, so the export names its own TopK with ReLU after, as ours)."""
    ts = list(random_transcoder_set(2, D, 64, arch=arch))
    folder = bench.export_for_circuit_tracer(ts, tmp_path / "set")
    meta = json.loads((folder / "export.json").read_text())
    assert meta["n_layers"] == 2 and meta["activation"] == ("topk" if arch == "transcoder" else "jumprelu")
    x = torch.randn(50, D, generator=torch.Generator().manual_seed(3))
    for i, tc in enumerate(ts):
        t = load_file(str(folder / f"layer_{i}.safetensors"))
        with torch.no_grad():
            ours = tc(x).recon
            if arch == "transcoder":
                pre = x @ t["W_enc"].T + t["b_enc"]
                vals, idx = pre.topk(meta["k"], dim=-1)
                acts = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
                theirs = acts @ t["W_dec"] + t["b_dec"] + x @ t["W_skip"].T
            else:
                theirs = their_forward(t, x)
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_align_matches_nodes_by_feature_and_leaves_out_position_0_sources(lm, tcs):
    g = build(lm, tcs, PROMPTS[0], cfg=GraphConfig(max_feature_nodes=20))
    n_sel = g.n_selected
    perm = torch.randperm(n_sel, generator=torch.Generator().manual_seed(0))
    order = torch.cat([perm, torch.arange(n_sel, g.n_nodes)])
    adj = g.adjacency[order][:, order].clone()  # their node order differs; entries are the same
    for layer in range(g.n_layers):
        adj[:, g.error_node(layer, 0)] = 0  # circuit-tracer zeroes position 0's errors
    adj[:, g.token_node(0)] *= 0.5  # and leaves the BOS's MLP outputs out of its token node
    theirs = {
        "input_tokens": g.input_tokens,
        "logit_tokens": g.logit_tokens,
        "active_features": g.active_features,
        "selected_features": g.selected_features[perm],
        "adjacency": adj,
    }
    full = {**theirs, "adjacency": g.adjacency[order][:, order], "logit_probabilities": g.logit_probabilities,
            "active_features": g.active_features, "activation_values": g.activation_values}  # fmt: skip
    assert bench.their_scores(g, full) == pytest.approx(dict(zip(("replacement", "completeness"), graph_scores(g))))
    got = bench.align(g, theirs)
    assert got["common_feature_nodes"] == n_sel and got["adjacency_max_rel_diff"] < 1e-6
    assert got["adjacency_max_rel_diff_all"] > 0
    adj[-1, n_sel + g.n_pos + 1] += 0.5 * float(g.adjacency.abs().max())  # one changed edge: seen
    assert bench.align(g, {**theirs, "adjacency": adj})["adjacency_max_rel_diff"] == pytest.approx(0.5, rel=1e-4)
    with pytest.raises(CausalError, match="target tokens"):
        bench.align(g, {**theirs, "logit_tokens": g.logit_tokens + 1})


def test_circuit_tracer_missing_environment_is_a_reason(lm, tcs, tmp_path):
    g = build(lm, tcs, PROMPTS[0], cfg=GraphConfig(max_feature_nodes=8))
    got = bench.circuit_tracer(lm, tcs, g, GraphConfig(), python=str(tmp_path / "nope" / "python"), log=lambda m: 0)
    assert set(got) == {"circuit_tracer"} and "nope" in got["circuit_tracer"]


def test_multi_site_speedup_on_a_tiny_model(lm, tmp_path):
    (tmp_path / "docs.txt").write_text("\n\n".join(f"Line {i}: a grey heron waded past {i} reeds." for i in range(80)))
    got = bench.multi_site_speedup(lm, Corpus(str(tmp_path / "docs.txt")), [0, 2], n_tokens=600, n_features=64, k=4,
                                   batch_size=100, ctx_len=16, repeats=2, log=lambda m: 0)  # fmt: skip
    assert got["multi_site_n"] == 2 and len(got["single_site_seconds_each"]) == 2 and len(got["trained"]) == 2
    assert got["multi_site_repeats"] == 2
    assert got["multi_site_speedup"] == pytest.approx(got["single_site_seconds"] / got["multi_site_seconds"])
    assert got["multi_site_forward_bound"] == pytest.approx(4 / 3) and got["multi_site_goal"] == pytest.approx(1.4)


def test_graph_figures_on_a_tiny_model(lm, tcs):
    fig, g = bench.graph_figures(lm, tcs, PROMPTS[0], PROMPTS, GraphConfig(max_feature_nodes=24), log=lambda m: 0)
    assert fig["graph_seconds"] > 0 and fig["peak_rss_mb"] > 0 and fig["graph_tokens"] == g.n_pos
    assert 0 <= fig["completeness_score"] <= 1
    assert fig["replacement_score"] is None or 0 <= fig["replacement_score"] <= 1
    assert len(fig["graph_prompts"]) == 3 and fig["intervention"]["n_prompts"] == 3
    assert {"top_minus_random_free", "direct_pearson", "direct_spearman"} <= set(fig["intervention"])


@pytest.mark.slow
def test_quick_run_writes_every_key(tmp_path):
    out = tmp_path / "g.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    keys = ("multi_site_speedup", "single_site_seconds", "multi_site_seconds", "graph_seconds", "peak_rss_mb")
    keys += ("replacement_score", "completeness_score", "intervention", "circuit_tracer", "transcoders")
    assert not [k for k in keys if k not in d]
    assert d["graph_tokens"] == 32 and d["multi_site_n"] == 4
    if d["circuit_tracer"] == "ran":
        assert d["circuit_tracer_time_ratio"] > 0 and d["adjacency_max_rel_diff"] < 1e-3
