"""`thoughtscope graph` and `thoughtscope transcoders train / eval` on a tiny model saved as a folder."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.transcoder_sets import random_transcoder_set
from typer.testing import CliRunner

from thoughtscope.causal.graph_files import load_graph
from thoughtscope.cli import app
from thoughtscope.models import tiny_model
from thoughtscope.sae.transcoder_set import load_transcoder_set, save_transcoder_set

pytestmark = pytest.mark.usefixtures("one_thread")

D, L = 32, 2
TEXT = "\n\n\n".join(f"Log {i}: a small green frog {i} sat by {i * 3} ponds near {i * 7} reeds. " for i in range(300))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphcli")
    tiny = tiny_model("llama", d_model=D, n_layers=L, vocab=256)
    tiny.model.save_pretrained(root / "model")
    tiny.tokenizer.save_pretrained(root / "model")
    (root / "corpus.txt").write_text(TEXT)
    return root


def test_graph_command_prints_paths_and_writes_both_files(model_dir, tmp_path):
    save_transcoder_set(random_transcoder_set(L, D, 48), tmp_path / "set", quantize="none")
    args = ["graph", "a small green frog sat by the", "--model", str(model_dir / "model"),
            "--transcoders", str(tmp_path / "set"), "--json", str(tmp_path / "g.json"),
            "--save", str(tmp_path / "g.safetensors"), "--max-feature-nodes", "40"]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "strongest paths from the prompt's tokens into logit" in r.output
    assert "replacement" in r.output and "estimate:" in r.output
    g = load_graph(tmp_path / "g.safetensors")
    assert g.n_selected == 40 and g.n_layers == L
    data = json.loads((tmp_path / "g.json").read_text())
    assert data["metadata"]["prompt"].startswith("a small green frog") and data["nodes"] and data["links"]
    # bad input: one error line each, nothing written
    for extra, msg in ((["--target", "frogs and toads"], "not one"), (["--transcoders", str(tmp_path)], "")):
        bad = CliRunner().invoke(app, args[:2] + ["--model", str(model_dir / "model")] + extra
                                 + (["--transcoders", str(tmp_path / "set")] if "--transcoders" not in extra else [])
                                 + ["--json", str(tmp_path / "bad.json")])  # fmt: skip
        assert bad.exit_code == 2 and "error" in bad.output and msg in bad.output
        assert not (tmp_path / "bad.json").exists()
    other = random_transcoder_set(L, D + 8, 48)  # a set for another width
    save_transcoder_set(other, tmp_path / "wide", quantize="none")
    bad = CliRunner().invoke(
        app, args[:2] + ["--model", str(model_dir / "model"), "--transcoders", str(tmp_path / "wide")]
    )
    assert bad.exit_code == 2 and "40" in bad.output and "32" in bad.output


def _train_args(model_dir, out, tokens: int, features: int, *extra: str) -> list[str]:
    """`transcoders train` on the tiny model and its corpus, k 4, batches of 200."""
    return ["transcoders", "train", "--out", str(out), "--model", str(model_dir / "model"),
            "--corpus", str(model_dir / "corpus.txt"), "--tokens", str(tokens), "--features", str(features),
            "--k", "4", "--batch-size", "200", *extra]  # fmt: skip


def test_transcoders_train_of_one_block_keeps_its_folder_and_writes_no_set(model_dir, tmp_path):
    """--layers 1 trains block 1 alone: a set is indexed from block 0, so the block's folder is the result."""
    r = CliRunner().invoke(app, _train_args(model_dir, tmp_path / "tc", 1000, 32, "--layers", "1"))
    assert r.exit_code == 0, r.output
    assert "no set was written" in " ".join(r.output.split())
    assert (tmp_path / "tc" / "layers" / "layer_01").is_dir() and not (tmp_path / "tc" / "layers" / "layer_00").exists()
    assert not (tmp_path / "tc" / "set").exists()
    from thoughtscope.sae import SAE

    assert SAE.load(tmp_path / "tc" / "layers" / "layer_01").cfg.site == "mlp_in.1"


def test_transcoders_train_then_eval(model_dir, tmp_path):
    r = CliRunner().invoke(app, _train_args(model_dir, tmp_path / "tc", 2000, 64, "--quantize", "none"))
    assert r.exit_code == 0, r.output
    ts = load_transcoder_set(tmp_path / "tc" / "set")
    assert len(ts) == L and all(tc.cfg.site == f"mlp_in.{i}" for i, tc in enumerate(ts))
    assert (tmp_path / "tc" / "layers" / "layer_01").is_dir()
    e = CliRunner().invoke(app, ["transcoders", "eval", "--transcoders", str(tmp_path / "tc" / "set"), "--model",
                                 str(model_dir / "model"), "--corpus", str(model_dir / "corpus.txt"), "--tokens", "512",
                                 "--skip-tokens", "1000", "--json", str(tmp_path / "e.json")])  # fmt: skip
    assert e.exit_code == 0, e.output
    res = json.loads((tmp_path / "e.json").read_text())
    # an atlas of one transcoder of the set (its features read the block's MLP input)
    atlas_args = ["atlas", "build", "--sae", str(tmp_path / "tc" / "layers" / "layer_01"), "--model",
                  str(model_dir / "model"), "--corpus", str(model_dir / "corpus.txt"), "--tokens", "1024",
                  "--ctx-len", "32", "--quiet", "--out", str(tmp_path / "atlas")]  # fmt: skip
    a = CliRunner().invoke(app, atlas_args)
    assert a.exit_code == 0, a.output
    assert (tmp_path / "atlas" / "atlas.sqlite").is_file()
    # its explanations label the graph's nodes of that block, in the printed paths and the JSON
    from thoughtscope.atlas import Atlas
    from thoughtscope.causal.graph_files import from_circuit_tracer_json

    with Atlas.open(tmp_path / "atlas") as at:
        at.save_explanations({f: {"explanation": f"block-1 feature {f}", "status": "ok"} for f in range(64)})
    g = CliRunner().invoke(app, ["graph", "a small green frog sat by the", "--model", str(model_dir / "model"),
                                 "--transcoders", str(tmp_path / "tc" / "set"), "--atlas", str(tmp_path / "atlas"),
                                 "--json", str(tmp_path / "g.json"), "--node-threshold", "1",
                                 "--edge-threshold", "1"])  # fmt: skip
    assert g.exit_code == 0, g.output
    nodes = from_circuit_tracer_json(tmp_path / "g.json")["nodes"]
    block1 = [n for n in nodes if n.get("feature_type") == "cross layer transcoder" and str(n["layer"]) == "1"]
    assert block1 and all(n["clerp"].startswith("block-1 feature ") for n in block1)  # feature: circuit-tracer's id
    wrong = CliRunner().invoke(app, ["graph", "a frog", "--model", str(model_dir / "model"), "--transcoders",
                                     str(tmp_path / "tc" / "set"), "--atlas", str(tmp_path / "atlas"),
                                     "--atlas", str(tmp_path / "atlas")])  # fmt: skip
    assert wrong.exit_code == 2 and "two atlases for block 1" in wrong.output
    assert len(res["fvu"]) == L and all(torch.isfinite(torch.tensor(res["fvu"])))
    loss = res["loss"]
    assert loss["loss_zero_ablated"] != loss["loss_clean"] and "loss_recovered" in loss
