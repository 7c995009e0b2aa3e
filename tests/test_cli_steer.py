"""The steering commands end to end on a tiny model: steer with a preset, vector fit, features contrast/at, sweep."""

import json
import re

import pytest
from typer.testing import CliRunner

from thoughtscope.cli import app
from thoughtscope.models import load_model, tiny_model
from thoughtscope.sae import SAEConfig, build_sae, load_sae, save_sae
from thoughtscope.steer import GenerationConfig
from thoughtscope.steer.run import features_contrast, steer_with_preset
from thoughtscope.steer.search import top_features_at

runner = CliRunner()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("steer-cli")
    lm = tiny_model("llama", n_layers=2, d_model=32)
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    sae = build_sae(SAEConfig(arch="relu-l1", d_model=32, n_features=64, model=str(root / "model"), site="resid.1"))
    save_sae(sae, root / "sae")
    (root / "pairs.jsonl").write_text("\n".join(json.dumps({"positive": f"good {i}", "negative": f"bad {i}"})
                                                for i in range(6)))
    (root / "prompts.txt").write_text("zzz one\nzzz two\nzzz three\n")
    (root / "controls.txt").write_text("aaa one\naaa two\naaa three\n")
    preset = {"format": "thoughtscope-preset-1", "name": "t", "interventions": [
        {"type": "vector", "op": "add", "site": "resid.1", "vector": "v.safetensors", "value": 4.0, "label": "v"}]}
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
    _ok(["vector", "fit", root / "pairs.jsonl", "--out", root / "v.safetensors", "--site", "resid.1",
         "--model", root / "model"])
    assert (root / "v.safetensors").is_file()
    r = _ok(["steer", "--preset", root / "preset.json", "-p", "hello", "--model", root / "model",
             "--max-new-tokens", 4, "--temperature", 0])
    # the table's row shows the library's own unsteered and steered answers for the same settings
    lm = load_model(str(root / "model"))
    want = steer_with_preset(lm, root / "preset.json", ["hello"], GenerationConfig(max_new_tokens=4, temperature=0))[0]
    assert want.unsteered != want.steered
    rows = [line for line in r.output.splitlines() if line.startswith("│")]
    cells = [_printable(c) for c in rows[0].strip("│").split("│")]
    assert cells == [_printable(want.unsteered), _printable(want.steered)]


def test_features_contrast_and_at(root):
    r = _ok(["features", "contrast", "--prompts", root / "prompts.txt", "--controls", root / "controls.txt",
             "--sae", root / "sae", "--model", root / "model", "--top", 5])
    lm, sae = load_model(str(root / "model")), load_sae(root / "sae")
    want = features_contrast(lm, sae, "resid.1", root / "prompts.txt", root / "controls.txt", top=5)
    shown = [line.split("│")[1].strip() for line in r.output.splitlines() if line.startswith("│")]
    assert shown == [str(s.feature) for s in want]          # the same features, in the same order
    r = _ok(["features", "at", "zzz one", "--sae", root / "sae", "--model", root / "model", "--top", 3])
    token, top = top_features_at(lm, sae, "resid.1", "zzz one", -1, top=3)
    assert r.output.splitlines()[0] == token
    assert [int(x) for x in re.findall(r"\((\d+), ", r.output)] == [f for f, _ in top]


def test_steer_sweep_writes_files(root):
    _ok(["steer", "sweep", "--preset", root / "preset.json", "--strengths", "0,8", "--keywords", "zzz",
         "--out", root / "sw", "--model", root / "model", "--max-new-tokens", 3])
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
