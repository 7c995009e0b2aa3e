"""The CLI end to end on a tiny model: harvest → sae train (store and on the fly) → eval → export/import."""

import json

import pytest
import torch
from typer.testing import CliRunner

from thoughtscope.cli import app
from thoughtscope.models import tiny_model
from thoughtscope.sae import load_sae

runner = CliRunner()
TEXT = "\n\n\n".join(
    f"Note {i}: cats and dogs {i} play in the garden near {i * 3} trees. " * (2 + i % 4) for i in range(300)
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    lm = tiny_model("llama", n_layers=2, d_model=32)
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    (root / "docs.txt").write_text(TEXT)
    return root


def _ok(args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def test_harvest_train_eval_export(setup):
    root = setup
    _ok(
        [
            "harvest",
            "--model",
            root / "model",
            "--corpus",
            root / "docs.txt",
            "--site",
            "resid.1",
            "--tokens",
            8192,
            "--out",
            root / "acts",
            "--ctx-len",
            32,
            "--batch-size",
            8,
            "--quiet",
        ]
    )
    r = _ok(["store", root / "acts", "--verify"])
    assert "8192" in r.output or "8,192" in r.output

    _ok(
        [
            "sae",
            "train",
            "--store",
            root / "acts",
            "--arch",
            "topk",
            "--k",
            4,
            "--expansion",
            4,
            "--batch-size",
            512,
            "--out",
            root / "sae",
            "--quiet",
        ]
    )
    sae = load_sae(root / "sae")
    assert sae.cfg.n_features == 128 and sae.cfg.site == "resid.1"

    _ok(
        [
            "sae",
            "eval",
            root / "sae",
            "--store",
            root / "acts",
            "--model",
            root / "model",
            "--corpus",
            root / "docs.txt",
            "--loss-tokens",
            2048,
            "--json",
            root / "eval.json",
        ]
    )
    m = json.loads((root / "eval.json").read_text())
    assert 0 < m["reconstruction"]["fvu"] < 1.0
    assert m["reconstruction"]["l0"] <= 4 + 1e-6
    assert "loss_recovered" in m["spliced"]

    _ok(["sae", "export", root / "sae", "--out", root / "saelens"])
    assert (root / "saelens" / "cfg.json").is_file() and (root / "saelens" / "sae_weights.safetensors").is_file()
    _ok(["sae", "import", root / "saelens", "--out", root / "back"])
    x = torch.randn(16, 32)
    torch.testing.assert_close(load_sae(root / "back")(x)[1], sae(x)[1], rtol=1e-5, atol=1e-5)


def test_sweep_and_on_the_fly(setup):
    root = setup
    _ok(
        [
            "sae",
            "train",
            "--model",
            root / "model",
            "--site",
            "resid.0",
            "--corpus",
            root / "docs.txt",
            "--tokens",
            4096,
            "--arch",
            "topk",
            "--k",
            "2,4",
            "--decoder-norm",
            "free, unit",
            "--expansion",
            2,
            "--batch-size",
            256,
            "--out",
            root / "sweep",
            "--quiet",
        ]
    )
    runs = {p.name: load_sae(p).cfg for p in (root / "sweep").iterdir() if (p / "cfg.json").is_file()}
    assert sorted((c.k, c.decoder_norm) for c in runs.values()) == [(2, "free"), (2, "unit"), (4, "free"), (4, "unit")]
    assert runs["topk-x2-k4-unitdec"].decoder_norm == "unit" and runs["topk-x2-k4"].decoder_norm == "free"


def test_cli_errors(setup):
    root = setup
    r = runner.invoke(app, ["sae", "train", "--out", str(root / "x")])
    assert r.exit_code == 2 and "exactly one of --store" in r.output
    r = runner.invoke(app, ["sae", "train", "--store", str(root / "nope"), "--out", str(root / "x")])
    assert r.exit_code == 2 and "nope" in r.output
    r = runner.invoke(app, ["sae", "train", "--store", str(root / "acts"), "--arch", "foo", "--out", str(root / "y")])
    assert r.exit_code == 2 and "unknown SAE architecture 'foo'" in r.output
    r = runner.invoke(
        app, ["sae", "train", "--store", str(root / "acts"), "--k", "999", "--expansion", "1", "--out", str(root / "z")]
    )
    assert r.exit_code == 2 and "k=999" in r.output
    r = runner.invoke(
        app,
        [
            "sae",
            "train",
            "--store",
            str(root / "acts"),
            "--arch",
            "jumprelu",
            "--decoder-norm",
            "free",
            "--out",
            str(root / "w"),
        ],
    )
    assert r.exit_code == 2 and "decoder_norm='free'" in r.output and "'jumprelu'" in r.output


def test_nla_subcommand_forwards_to_the_nla_entry_point():
    r = runner.invoke(app, ["nla", "--help"])
    assert r.exit_code == 0 and "ar-sft" in r.output
