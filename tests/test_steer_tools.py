"""Finding what to steer, steering vectors, calibration sweeps, the chat loop and the demo functions (tiny models)."""

import json
import math

import pytest
import torch

from thoughtscope.features import FeatureError
from thoughtscope.models import Site, capture, tiny_model
from thoughtscope.sae import SAE, SAEConfig, save_sae
from thoughtscope.steer import (
    GenerationConfig,
    Preset,
    PresetItem,
    SteerError,
    SteeringVector,
    SweepPoint,
    chat_loop,
    clamp,
    contrast_features,
    evaluate,
    feature_max_acts,
    fit_vector,
    mentions,
    pca_of_differences,
    perplexity,
    plot_sweep,
    repetition_rate,
    suggest,
    sweep,
    sweep_preset,
    top_features_at,
)
from thoughtscope.steer.vectors import last_token_acts

SITE = "resid.0"
PLANT = 7


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", d_model=64, n_layers=2)


PROMPTS = ["aZb cde", "fgh Zij", "Zklm no", "pq rsZ", "tu Zvw x", "yy Z zz"]
CONTROLS = ["abc cde", "fgh kij", "qklm no", "pq rsw", "tu vvw x", "yy y zz"]


@pytest.fixture(scope="module")
def planted(lm):
    """A relu-l1 SAE whose feature PLANT fires exactly on the token 'Z' (present only in PROMPTS)."""
    cfg = SAEConfig(arch="relu-l1", d_model=64, n_features=128, site=SITE)
    sae = SAE.from_config(cfg, seed=3)
    ids, mask = lm.tokenize(PROMPTS + CONTROLS)
    acts = capture(lm, SITE, ids, mask)[Site.parse(SITE)]
    keep = mask.bool().clone()
    keep[:, 0] = False
    z = lm.tokenizer("Z", add_special_tokens=False)["input_ids"][0]
    is_z = (ids == z) & keep
    xz, xo = acts[is_z], acts[keep & ~is_z]
    w = xz.mean(0) - xo.mean(0)
    w = w / w.norm()
    lo_z, hi_o = float((xz @ w).min()), float((xo @ w).max())
    assert lo_z > hi_o, "token 'Z' not linearly separable in this tiny model"
    with torch.no_grad():
        sae.enc[PLANT] = w
        sae.b_enc[PLANT] = -(lo_z + hi_o) / 2
        sae.b_dec.zero_()
    return sae.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- search


@pytest.mark.parametrize("score", ["z", "freq"])
def test_contrastive_search_ranks_planted_feature_first(lm, planted, score):
    res = contrast_features(lm, planted, SITE, PROMPTS, CONTROLS, score=score, top=5)
    assert res[0].feature == PLANT
    assert res[0].freq_prompts == 1.0 and res[0].freq_controls == 0.0 and res[0].mean_controls == 0.0


def test_top_features_at_token_and_max_acts(lm, planted):
    tok, feats = top_features_at(lm, planted, SITE, "ab Z cd", "Z", top=128)
    assert tok == "Z" and PLANT in [f for f, _ in feats]
    tok, feats = top_features_at(lm, planted, SITE, "ab Z cd", 0, top=128)
    assert tok == "a" and PLANT not in [f for f, _ in feats]
    with pytest.raises(FeatureError, match="out of range"):
        top_features_at(lm, planted, SITE, "ab", 5)
    with pytest.raises(FeatureError, match="no token"):
        top_features_at(lm, planted, SITE, "ab", "Q")
    m = feature_max_acts(lm, planted, SITE, PROMPTS, [PLANT])
    assert m.shape == (1,) and float(m[0]) > 0
    assert float(feature_max_acts(lm, planted, SITE, CONTROLS, [PLANT])[0]) == 0.0
    with pytest.raises(FeatureError, match="score"):
        contrast_features(lm, planted, SITE, PROMPTS, CONTROLS, score="best")
    with pytest.raises(FeatureError, match="controls"):
        contrast_features(lm, planted, SITE, PROMPTS, [])


# ----------------------------------------------------------------------------- vectors


def test_fit_vector_mean_is_caa_and_pca_has_right_sign(lm, tmp_path):
    pairs = [("I love it " + t, "I hate it " + t) for t in ("a", "bb", "ccc", "dd d")]
    v = fit_vector(lm, SITE, pairs, method="mean")
    h = last_token_acts(lm, SITE, [x for p in pairs for x in p])
    torch.testing.assert_close(v.vector, (h[0::2] - h[1::2]).mean(0))
    assert v.site == SITE and v.n_pairs == 4 and v.typical_norm > 0
    p = fit_vector(lm, SITE, pairs, method="pca")
    assert abs(float(p.vector.norm()) - 1) < 1e-5
    assert ((h[0::2] @ p.vector) > (h[1::2] @ p.vector)).float().mean() >= 0.5
    path = v.save(tmp_path / "v.safetensors")
    w = SteeringVector.load(path)
    assert torch.equal(w.vector, v.vector) and w.site == SITE and w.method == "mean"
    assert w.typical_norm == v.typical_norm
    with pytest.raises(SteerError, match="method"):
        fit_vector(lm, SITE, pairs, method="svm")
    with pytest.raises(SteerError, match="at least 2"):
        fit_vector(lm, SITE, pairs[:1], method="pca")
    with pytest.raises(SteerError, match="not found"):
        SteeringVector.load(tmp_path / "nope.safetensors")


def test_pca_of_differences_recovers_planted_direction():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(32, generator=g)
    d /= d.norm()
    a = torch.linspace(1, 5, 40)[:, None]
    diffs = a * d + 0.01 * torch.randn(40, 32, generator=g)
    v = pca_of_differences(diffs)
    assert abs(float(v @ d)) > 0.99


# ----------------------------------------------------------------------------- calibration


def test_metrics():
    assert mentions("The Golden Gate is red", ["golden gate"]) and not mentions("bridges", ["bridge"])
    assert mentions("a Bridge.", ["bridge"])
    assert repetition_rate([1, 2, 3, 4, 5]) == 0.0
    assert repetition_rate([1, 2, 3, 1, 2, 3]) == pytest.approx(1 / 4)
    pts = [SweepPoint(0, 0.1, 10, 0), SweepPoint(2, 0.5, 15, 0), SweepPoint(4, 0.9, 30, 0), SweepPoint(3, 0.5, 12, 0)]
    assert suggest(pts, 10.0, 2.0) == 2
    assert suggest(pts, 10.0, 0.5) is None


def test_perplexity_matches_manual(lm):
    p, a = [1, 40, 50], [60, 70, 80]
    ppl, n = perplexity(lm, [p], [a])
    with torch.no_grad():
        lg = lm.model(torch.tensor([p + a])).logits[0].float()
    nll = torch.nn.functional.cross_entropy(lg[2:5], torch.tensor(a))
    assert n == 3 and ppl == pytest.approx(math.exp(float(nll)), rel=1e-4)


def test_sweep_on_tiny_model_with_plot_and_preset_range(lm, planted, tmp_path):
    cfg = GenerationConfig(max_new_tokens=6, temperature=0.0)
    prompts = ["hello", "what is up", "tell me"]
    res = sweep(
        lm,
        lambda s: [clamp(planted, PLANT, s)],
        [0.0, 50.0],
        keywords=["zz", "Z"],
        prompts=prompts,
        config=cfg,
        ppl_bound=1e9,
        progress=False,
    )
    assert [p.strength for p in res.points] == [0.0, 50.0]
    assert res.points[0].concept_rate == res.baseline.concept_rate
    assert res.points[0].perplexity == pytest.approx(res.baseline.perplexity)
    assert res.concept_method == "keywords" and res.suggested in (0.0, 50.0)
    png = plot_sweep(res, tmp_path / "sweep.png")
    if png is not None:
        assert png.stat().st_size > 1000
    json.dumps(res.to_dict())
    save_sae(planted, tmp_path / "sae")
    preset = Preset("p", [PresetItem("feature", "clamp", SITE, 1.0, feature=PLANT, sae="sae")])
    preset.save(tmp_path / "p.json")
    res2, calibrated = sweep_preset(
        lm, Preset.load(tmp_path / "p.json"), [0.0, 10.0], keywords=["zz"], prompts=prompts, config=cfg, progress=False
    )
    assert calibrated.items[0].range == [0.0, 10.0] and calibrated.items[0].suggested == res2.suggested
    with pytest.raises(SteerError, match="keyword"):
        sweep(lm, lambda s: [], [1.0], prompts=prompts)
    with pytest.raises(SteerError, match="finite"):
        sweep(lm, lambda s: [], [float("nan")], keywords=["a"], prompts=prompts)
    with pytest.raises(SteerError, match="out of range"):
        sweep(lm, lambda s: [clamp(planted, 999, s)], [1.0], keywords=["a"], prompts=prompts)
    judged = evaluate(lm, [], prompts=prompts, judge=lambda t: True, config=cfg, loop_limit=1.0)
    assert judged.concept_rate == 1.0
    default = evaluate(lm, [], prompts=prompts, judge=lambda t: True, config=cfg)  # loops never count
    assert default.concept_rate == pytest.approx(1.0 - default.looping)


# ----------------------------------------------------------------------------- chat


def test_chat_loop_commands(lm, planted, tmp_path):
    save_sae(planted, tmp_path / "sae")
    Preset("boost", [PresetItem("feature", "clamp", SITE, 3.0, feature=PLANT, sae="sae", max_act=2.0)]).save(
        tmp_path / "boost.json"
    )
    lines = iter(
        [
            "/show",
            "/set 7 8.0",
            "/set 999 1",
            "/set 7 nan",
            "/set 7 2x",
            "/show",
            "hello",
            f"/preset {tmp_path / 'boost.json'}",
            "/set 7 2x",
            "/show",
            "hi again",
            "/off",
            "/show",
            "/preset missing_preset_name",
            "/bogus",
            "/quit",
            "never read",
        ]
    )
    out = []
    streamed = []
    s = chat_loop(
        lm,
        sae=planted,
        config=GenerationConfig(max_new_tokens=4),
        input_fn=lambda _: next(lines),
        output_fn=out.append,
        stream_fn=streamed.append,
    )
    text = "\n".join(out)
    assert "no steering" in out[1]
    assert "feature 7 clamped to 8" in text
    assert "error: feature index 999 is out of range" in text
    assert "error: " in text and "finite" in text
    assert "max activation of feature 7 unknown" in text
    assert "preset 'boost' loaded" in text and "feature 7 clamped to 4" in text
    assert "steering off" in text and "'missing_preset_name' not found" in text and "unknown command '/bogus'" in text
    assert [m["role"] for m in s.history] == ["user", "assistant", "user", "assistant"]
    assert "".join(streamed) == s.history[1]["content"] + s.history[3]["content"]
    assert s.sliders == {} and s.preset is None


# ----------------------------------------------------------------------------- demos


def test_demo_functions_run_on_tiny_model(lm, planted):
    from thoughtscope.demo.steer import Concept, concept_demo, suppression_demo

    c = Concept("zed", ["zz", "z"], PROMPTS, CONTROLS, evoke=["say Z", "Z Z"])
    cfg = GenerationConfig(max_new_tokens=4, temperature=0.0)
    out = concept_demo(
        lm, planted, SITE, c, multiples=(0, 20), candidates=1, config=cfg, prompts=["hi", "yo"], progress=False
    )
    assert out["candidates"][0]["feature"] == PLANT and "passed" in out
    json.dumps(out)
    gen = concept_demo(
        lm,
        planted,
        SITE,
        c,
        multiples=(20,),
        candidates=1,
        config=cfg,
        prompts=["hi"],
        progress=False,
        positions="generated",
    )
    assert gen["positions"] == "generated" and out["positions"] == "all"
    sup = suppression_demo(lm, planted, SITE, c, PLANT, 1.0, config=cfg)
    assert set(sup) >= {"before", "clamp", "project_out"}


# ----------------------------------------------------------------------------- CLI entry points


def test_cli_entry_points(lm, planted, tmp_path):
    from thoughtscope.steer import features_contrast, print_comparisons, read_pairs, steer_with_preset, vector_fit

    (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
    (tmp_path / "c.json").write_text(json.dumps(CONTROLS))
    assert features_contrast(lm, planted, SITE, tmp_path / "p.txt", tmp_path / "c.json", top=3)[0].feature == PLANT
    (tmp_path / "pairs.jsonl").write_text(
        "\n".join(json.dumps({"positive": f"yes {i}", "negative": f"no {i}"}) for i in range(3))
    )
    v = vector_fit(lm, SITE, tmp_path / "pairs.jsonl", tmp_path / "v.safetensors", method="pca")
    assert (tmp_path / "v.safetensors").is_file() and v.n_pairs == 3
    (tmp_path / "bad.tsv").write_text("only one column\n")
    with pytest.raises(SteerError, match="bad.tsv, line 1"):
        read_pairs(tmp_path / "bad.tsv")
    Preset("v", [PresetItem("vector", "add", SITE, 1.0, vector="v.safetensors", unit="norm")]).save(tmp_path / "v.json")
    comps = steer_with_preset(lm, tmp_path / "v.json", ["hi"], GenerationConfig(max_new_tokens=3))
    assert len(comps) == 1
    print_comparisons(comps)


def test_shipped_golden_gate_preset_and_default_steering_agree():
    from thoughtscope.demo.steer import load_default_steering

    d = load_default_steering()
    from pathlib import Path

    item = Preset.load(Path(__file__).resolve().parent.parent / "examples" / "presets" / "golden_gate.json").items[0]
    assert (item.feature, item.strength, item.max_act, item.positions) == (
        d["feature"],
        d["strength"],
        d["max_act"],
        d.get("positions", "all"),
    )
