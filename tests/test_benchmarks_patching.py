"""benchmarks/patching.py in its tiny form: held-out pairs cut to the byte tokenizer, both patching maps and their
agreement per stream, and TransformerLens booted offline on the same weights, its logits and its patched maps equal
to ours (so its time is for the same sweep)."""

from __future__ import annotations

import json

import pytest
from patching import FAMILIES, main, select_pairs, tiny_form

from thoughtscope.causal import PatchPair
from thoughtscope.models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_form_keeps_only_pairs_that_align_one_character_per_token():
    got = tiny_form(PatchPair("When Mary and Paul", "When Paul and Mary", " Mary", " Paul"))
    assert (got.target, got.against) == ("y", "l") and got.clean == "When Mary and Paul"
    assert tiny_form(PatchPair("The capital of Peru", "The capital of Japan", " Lima", " Tokyo")) is None
    assert tiny_form(PatchPair("1 + 5 = ", "1 + 8 = ", "6", "6")) is None  # the metric would be 0 everywhere
    pairs = select_pairs(tiny_model("llama", n_layers=1), 1, tiny=True, fewest_cells=True)
    assert len(pairs) <= len(FAMILIES) and all(len(p.clean) == len(p.corrupt) for _, p in pairs)


def test_quick_tiny_run_writes_every_figure_and_both_tl_models_agree_with_ours(tmp_path):
    out = tmp_path / "patching.json"
    argv = ["--tiny", "--quick", "--pairs", "2", "--families", "arithmetic", "--json", str(out)]
    fig = main([*argv, "--tl-paths", "bridge,hooked_transformer", "--tl-streams", "resid,attn,mlp"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(fig))
    assert fig["threads"] == 1 and fig["split"] == "heldout" and fig["pairs"] == len(fig["per_pair"]) == 2
    for key in ("atp_spearman", "atp_spearman_attn", "atp_spearman_mlp", "atp_spearman_differing_cells"):
        assert -1 <= fig[key] <= 1 and fig[f"{key}_ci"][0] <= fig[key] <= fig[f"{key}_ci"][1], key
    assert set(fig["per_family"]) == {"arithmetic"} and fig["per_family"]["arithmetic"]["pairs"] == 2
    assert fig["atp_speedup"] == pytest.approx(fig["activation_seconds"] / fig["attribution_seconds"])
    # TransformerLens ran offline on the same weights (as a bridge and as a HookedTransformer), and patched the
    # same cells to the same values as ours; the ratio is taken against its faster model
    assert fig.get("peer_note") is None, fig.get("peer_note")
    paths = fig["transformer_lens_paths"]
    assert set(paths) == set(fig["transformer_lens_logit_check"]) == {"bridge", "hooked_transformer"}
    for name, path in paths.items():
        assert fig["transformer_lens_logit_check"][name]["max_abs_logit_diff"] < 1e-4
        assert path["max_abs_diff_vs_ours"] < 1e-3 and path["seconds"] > 0
    best = fig["transformer_lens_path"]
    assert paths[best]["seconds"] == min(p["seconds"] for p in paths.values())
    assert fig["transformer_lens_streams"] == ["resid", "attn", "mlp"]
    assert fig["ours_peer_sweep_seconds"] == fig["activation_seconds"]  # the same sweep: ours is timed once
    assert fig["transformer_lens_ratio"] == pytest.approx(paths[best]["seconds"] / fig["activation_seconds"])
    for row in fig["per_pair"]:
        assert row["cells_patched_per_stream"] == 4 * (row["tokens"] - row["first_differing_position"]) > 0
        assert row["clean_metric"] != row["corrupt_metric"] and len(row["top_resid_cells"]) == 5


def test_quick_default_times_the_peer_on_the_residual_stream_against_ours_on_the_same_sweep():
    fig = main(["--tiny", "--quick", "--families", "arithmetic"])
    assert fig["transformer_lens_streams"] == ["resid"] and set(fig["transformer_lens_paths"]) == {"bridge"}
    (row,) = fig["per_pair"]
    assert row["ours_peer_sweep_seconds"] > 0 and row["tl_bridge_max_abs_diff_vs_ours"] < 1e-3
    assert fig["transformer_lens_ratio"] == pytest.approx(row["tl_bridge_seconds"] / row["ours_peer_sweep_seconds"])
