"""Activation patching is exact where it must be (the last block at the last position restores the clean run;
positions before the prompts differ change nothing), attribution patching is the true first-order estimate, and bad
input says what is wrong."""

from __future__ import annotations

import pytest
import torch

from thoughtscope.causal import PatchPair, activation_patching, attribution_patching, load_pairs, patch
from thoughtscope.causal.patching import _encode_pair, _metric_fn, _patched_metrics, _run_capturing
from thoughtscope.errors import CausalError
from thoughtscope.models import tiny_model

# the byte tokenizer: one token per character, so the prompts below align and targets are single characters
PAIR = PatchPair("ab cd ef", "ab cx ef", "q", "z")


@pytest.fixture(scope="module", params=["llama", "gpt2", "neox"])
def lm(request):
    return tiny_model(request.param, n_layers=3, seed=11)


def test_last_block_last_position_restores_the_clean_run_and_early_positions_do_nothing(lm):
    r = activation_patching(lm, PAIR)
    T = len(r.tokens)
    assert r.patched["resid"].shape == (lm.n_layers, T)
    assert r.patched["resid"][-1, -1] == pytest.approx(1.0, abs=1e-4)  # the final residual is the clean one
    first = r.tokens.index("x")
    for s in ("resid", "attn", "mlp"):
        assert r.patched[s][:, :first].abs().max() == 0  # the model is causal: identical activations there
    assert r.patched["resid"][:, first:].abs().max() > 0.01


def test_attribution_patching_is_the_first_order_effect(lm):
    """ε-interpolated real patches: (metric(corrupt + ε·(clean − corrupt)) − metric(corrupt)) / ε → AtP's cell."""
    atp = attribution_patching(lm, PAIR)
    clean, corrupt = _encode_pair(lm, PAIR)
    metric = _metric_fn(lm, PAIR)
    _, clean_acts = _run_capturing(lm, clean, ["resid", "mlp"], grad=False)
    _, corrupt_acts = _run_capturing(lm, corrupt, ["resid", "mlp"], grad=False)
    eps = 1e-3
    denom = atp.clean_metric - atp.corrupt_metric
    for stream, layer in (("resid", 0), ("mlp", 1), ("resid", lm.n_layers - 1)):
        c, r = clean_acts[(stream, layer)][0], corrupt_acts[(stream, layer)][0]
        positions = torch.arange(len(atp.tokens))
        moved = _patched_metrics(lm, stream, layer, corrupt, r + eps * (c - r), positions, metric)
        finite = (moved - atp.corrupt_metric) / eps / denom
        torch.testing.assert_close(atp.attributed[stream][layer], finite, atol=2e-2, rtol=5e-2)


def test_patch_reports_both_maps_their_agreement_and_times(lm):
    r = patch(lm, PAIR, ["resid"])
    d = r.to_dict()
    assert set(d) >= {"tokens", "clean_metric", "corrupt_metric", "resid", "atp_spearman", "atp_speedup", "seconds"}
    assert -1 <= d["atp_spearman"] <= 1 and d["atp_speedup"] > 0
    assert len(d["resid"]["activation_patching"]) == lm.n_layers
    assert r.top_cells("resid", 3)[0][:2] in {(layer, p) for layer in range(lm.n_layers) for p in range(len(r.tokens))}


def test_bad_input_says_what_is_wrong(lm):
    with pytest.raises(CausalError, match=r"same number of tokens.*clean 9 .*corrupted 10"):
        activation_patching(lm, PatchPair("ab cd ef", "ab cdd ef", "q"))
    with pytest.raises(CausalError, match=r"target 'qq' is 2 tokens \['q', 'q'\], not one"):
        activation_patching(lm, PatchPair("ab cd ef", "ab cx ef", "qq"))
    with pytest.raises(CausalError, match="give the same metric"):
        activation_patching(lm, PatchPair("ab cd ef", "ab cd ef", "q", "z"))
    with pytest.raises(CausalError, match="stream must be one of resid, attn, mlp"):
        activation_patching(lm, PAIR, ["heads"])


def test_shipped_pairs_have_held_out_splits():
    for fam in ("indirect_object", "factual_recall", "arithmetic"):
        assert len(load_pairs(fam)) >= 20 and len(load_pairs(fam, "heldout")) >= 5
    assert not {(p.clean, p.corrupt) for p in load_pairs(split="heldout")} & {
        (p.clean, p.corrupt) for p in load_pairs(split="tuning")
    }
    with pytest.raises(CausalError, match="no prompt-pair family 'ioi': there are arithmetic"):
        load_pairs("ioi")


@pytest.mark.slow
def test_default_model_pairs_align_and_attribution_agrees_on_indirect_object():
    from thoughtscope.models import load_model

    lm = load_model("default")
    for p in load_pairs():
        a, b = _encode_pair(lm, p)
        assert a.shape == b.shape
    r = patch(lm, load_pairs("indirect_object", "heldout")[0], ["resid"])
    assert r.spearman("resid") > 0.8
    assert r.seconds["activation"] / r.seconds["attribution"] > 5
