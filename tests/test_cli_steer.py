"""The steering commands end to end on a tiny model: steer with a preset, vector fit, features contrast/at, sweep."""

import json

import pytest
import torch
from typer.testing import CliRunner

from thoughtscope.cli import app
from thoughtscope.features import top_features_at
from thoughtscope.models import load_model, tiny_model
from thoughtscope.sae import SAEConfig, build_sae, load_sae, save_sae
from thoughtscope.steer import GenerationConfig, SteeringVector
from thoughtscope.steer.run import features_contrast, steer_with_preset

runner = CliRunner()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("steer-cli")
    lm = tiny_model("llama", n_layers=2, d_model=32)
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    sae = build_sae(SAEConfig(arch="relu-l1", d_model=32, n_features=64, model=str(root / "model"), site="resid.1"))
    save_sae(sae, root / "sae")
    (root / "pairs.jsonl").write_text(
        "\n".join(json.dumps({"positive": f"good {i}", "negative": f"bad {i}"}) for i in range(6))
    )
    (root / "prompts.txt").write_text("zzz one\nzzz two\nzzz three\n")
    (root / "controls.txt").write_text("aaa one\naaa two\naaa three\n")
    preset = {
        "format": "thoughtscope-preset-1",
        "name": "t",
        "interventions": [
            {"type": "vector", "op": "add", "site": "resid.1", "vector": "v.safetensors", "value": 4.0, "label": "v"}
        ],
    }
    (root / "preset.json").write_text(json.dumps(preset))
    return root


def _printable(text: str) -> str:
    """What a terminal table cell shows of a generated text: its printable characters, stripped."""
    return "".join(ch for ch in text if ch.isprintable()).strip()


def _ok(args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def test_vector_fit_then_steer_with_preset(root):
    _ok(
        [
            "vector",
            "fit",
            root / "pairs.jsonl",
            "--out",
            root / "v.safetensors",
            "--site",
            "resid.1",
            "--model",
            root / "model",
            "--texts-per-batch",
            3,
        ]
    )
    assert (root / "v.safetensors").is_file()
    fitted = SteeringVector.load(root / "v.safetensors").vector
    # --batch-size, its old name, still works (hidden, with a warning) and means the same: texts per pass
    args = ["vector", "fit", root / "pairs.jsonl", "--out", root / "old.safetensors", "--site", "resid.1"]
    r = _ok([*args, "--model", root / "model", "--batch-size", 3])
    assert "--batch-size is deprecated" in r.output and "use --texts-per-batch" in r.output
    assert torch.equal(SteeringVector.load(root / "old.safetensors").vector, fitted)
    r = _ok(
        [
            "steer",
            "--preset",
            root / "preset.json",
            "-p",
            "hello",
            "--model",
            root / "model",
            "--max-new-tokens",
            4,
            "--temperature",
            0,
        ]
    )
    # the table's row shows the library's own unsteered and steered answers for the same settings
    lm = load_model(str(root / "model"))
    want = steer_with_preset(lm, root / "preset.json", ["hello"], GenerationConfig(max_new_tokens=4, temperature=0))[0]
    assert want.unsteered != want.steered
    rows = [line for line in r.output.splitlines() if line.startswith("│")]
    cells = [_printable(c) for c in rows[0].strip("│").split("│")]
    assert cells == [_printable(want.unsteered), _printable(want.steered)]
    # transformers' own forward gives the same table as the default (lean) decoder
    again = _ok([*("steer", "--preset", root / "preset.json", "-p", "hello", "--model", root / "model"),
                 *("--max-new-tokens", 4, "--temperature", 0, "--decoder", "transformers")])  # fmt: skip
    assert [line for line in again.output.splitlines() if line.startswith("│")] == rows


def test_features_contrast_and_at(root):
    r = _ok(
        [
            "features",
            "contrast",
            "--prompts",
            root / "prompts.txt",
            "--controls",
            root / "controls.txt",
            "--sae",
            root / "sae",
            "--model",
            root / "model",
            "--top",
            5,
        ]
    )
    lm, sae = load_model(str(root / "model")), load_sae(root / "sae")
    want = features_contrast(lm, sae, "resid.1", root / "prompts.txt", root / "controls.txt", top=5)
    shown = [line.split("│")[1].strip() for line in r.output.splitlines() if line.startswith("│")]
    assert shown == [str(s.feature) for s in want]  # the same features, in the same order
    r = _ok(["features", "at", "zzz one", "--sae", root / "sae", "--model", root / "model", "--top", 3])
    token, top = top_features_at(lm, sae, "resid.1", "zzz one", -1, top=3)
    assert r.output.splitlines()[0] == f"token {token!r}:"
    rows = [line.split() for line in r.output.splitlines()[1:] if line.strip()]
    assert [(int(f), float(v)) for f, v in rows] == [(f, pytest.approx(v, abs=1e-3)) for f, v in top]


def test_steer_sweep_writes_files(root):
    _ok(
        [
            "steer",
            "sweep",
            "--preset",
            root / "preset.json",
            "--strengths",
            "0,8",
            "--keywords",
            "zzz",
            "--out",
            root / "sw",
            "--model",
            root / "model",
            "--max-new-tokens",
            3,
        ]
    )
    res = json.loads((root / "sw.json").read_text())
    assert len(res["points"]) == 2
    assert (root / "sw.preset.json").is_file()


def test_steer_errors(root):
    r = runner.invoke(app, ["steer", "--model", str(root / "model")])
    assert r.exit_code == 2 and "--preset" in r.output
    bad = root / "bad.json"
    bad.write_text("{not json")
    r = runner.invoke(app, ["steer", "--preset", str(bad), "-p", "x", "--model", str(root / "model")])
    assert r.exit_code == 2 and "not valid JSON" in r.output
    args = ["steer", "--preset", str(root / "preset.json"), "-p", "x", "--model", str(root / "model")]
    r = runner.invoke(app, [*args, "--decoder", "fast"])
    assert r.exit_code == 2 and "decoder must be one of auto, lean, transformers" in r.output
    r = runner.invoke(app, [*args, "--weights", "int8", "--decoder", "transformers"])
    assert r.exit_code == 2 and "needs the lean decoder" in r.output


def test_features_max_prints_the_reference_and_its_source(root, tmp_path):
    import shutil

    import torch

    from thoughtscope.sae.stats import FeatureStats, save_feature_stats

    shutil.copytree(root / "sae", tmp_path / "sae")
    r = runner.invoke(app, ["features", "max", "3", "--sae", str(tmp_path / "sae")])
    assert r.exit_code == 2 and "features stats" in r.output  # none stored yet: says how to get one
    save_feature_stats(
        FeatureStats(torch.arange(64).float() / 8, torch.full((64,), 0.1), "a test corpus", 999), tmp_path / "sae"
    )
    out = _ok(["features", "max", "3,40", "--sae", tmp_path / "sae"]).output
    assert "feature 3: max 0.375" in out and "feature 40: max 5" in out and "999 tokens of a test corpus" in out
    r = runner.invoke(app, ["features", "max", "64", "--sae", str(tmp_path / "sae")])
    assert r.exit_code == 2 and "out of range" in r.output


def test_steer_sweep_a_feature_on_my_questions_keeps_every_answer(root, tmp_path):
    import shutil

    import torch

    from thoughtscope.sae.stats import FeatureStats, save_feature_stats

    shutil.copytree(root / "sae", tmp_path / "sae")
    save_feature_stats(FeatureStats(torch.full((64,), 2.0), torch.full((64,), 0.1), "test", 10), tmp_path / "sae")
    (tmp_path / "q.txt").write_text("first question\nsecond one\nthird\n")
    out = _ok(
        [
            "steer",
            "sweep",
            "--feature",
            5,
            "--sae",
            tmp_path / "sae",
            "--strengths",
            "0,3",
            "--keywords",
            "zzz",
            "--questions",
            tmp_path / "q.txt",
            "--out",
            tmp_path / "sw",
            "--model",
            root / "model",
            "--max-new-tokens",
            3,
        ]
    ).output
    assert "x max = 2" in out
    res = json.loads((tmp_path / "sw.json").read_text())
    assert res["n_prompts"] == 3 and all(len(p["samples"]) == 3 for p in res["points"])
    preset = json.loads((tmp_path / "sw.preset.json").read_text())["interventions"][0]
    assert preset["feature"] == 5 and preset["unit"] == "max" and preset["max_act"] == 2.0
    assert preset["range"] == [0.0, 3.0]


def test_steer_find_end_to_end_writes_json_and_preset(root, tmp_path):
    (tmp_path / "q.txt").write_text("first question\nsecond one\nthird\n")
    args = [
        "steer",
        "find",
        "zzz",
        "--keywords",
        "zzz,z",
        "--prompts",
        root / "prompts.txt",
        "--controls",
        root / "controls.txt",
        "--questions",
        tmp_path / "q.txt",
        "--sae",
        root / "sae",
        "--model",
        root / "model",
        "--max-new-tokens",
        4,
        "--n-features",
        2,
        "--n-calibrate",
        1,
        "--ppl-bound",
        1e9,
        "--json",
        tmp_path / "f.json",
        "--preset",
        tmp_path / "p.json",
    ]
    r = runner.invoke(app, [str(a) for a in args])
    res = json.loads((tmp_path / "f.json").read_text())
    assert {"concept", "baseline", "prompt_only", "handles", "frontier", "best"} <= set(res)
    kinds = {h["kind"] for h in res["handles"]}
    assert {"feature", "caa", "logit"} <= kinds <= {"feature", "caa", "logit", "pair"}
    if res["best"] is None:  # a random tiny model may not mention "z" more under any handle
        assert r.exit_code == 1 and "no handle raised" in r.output
    else:
        assert r.exit_code == 0, r.output
        assert {"kind", "id", "strength", "concept_rate", "perplexity_ratio"} <= set(res["best"])
        items = json.loads((tmp_path / "p.json").read_text())["interventions"]
        refs = [1.0]
        if res["best"]["kind"] == "pair":  # two sliders, each at its share of the pair's strength
            refs = [
                q["reference_strength"]
                for q in next(h for h in res["handles"] if h["id"] == res["best"]["id"])["parts"]
            ]
        assert [it["suggested"] for it in items] == pytest.approx([res["best"]["strength"] * r for r in refs])


def test_find_cli_defaults_match_the_library():
    import inspect

    from thoughtscope.cli.steer import steer_find
    from thoughtscope.steer.find import FindConfig

    opts = {
        k: v.default.default
        for k, v in inspect.signature(steer_find).parameters.items()
        if hasattr(v.default, "default")
    }
    cfg = FindConfig()
    for name in ("ppl_bound", "n_features", "n_calibrate", "positions", "loop_repetition", "max_new_tokens", "seed"):
        assert opts[name] == getattr(cfg, name), name
