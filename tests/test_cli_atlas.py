"""The atlas and feature commands end to end on a tiny model with a small SAE."""

import pytest
from typer.testing import CliRunner

from thoughtscope.cli import app
from thoughtscope.models import tiny_model
from thoughtscope.sae import SAEConfig, build_sae, save_sae

runner = CliRunner()
TEXT = "\n\n\n".join(f"Line {i}: def f(x): return x * {i}. The sun sets over the sea {i} times. " * 3
                     for i in range(200))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("atlas-cli")
    lm = tiny_model("llama", n_layers=2, d_model=32)
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    sae = build_sae(SAEConfig(arch="topk", k=4, d_model=32, n_features=64, model=str(root / "model"), site="resid.1"))
    save_sae(sae, root / "sae")
    (root / "docs.txt").write_text(TEXT)
    (root / "code.txt").write_text("def g(y): return y\ndef h(z): return z + 1\n")
    (root / "prose.txt").write_text("The sun sets.\nThe sea is calm.\n")
    return root


def _ok(args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def test_build_then_query(root):
    _ok(["atlas", "build", "--sae", root / "sae", "--corpus", root / "docs.txt", "--tokens", 2048, "--ctx-len", 32,
         "--batch-size", 8, "--out", root / "atlas", "--quiet"])
    assert (root / "atlas" / "atlas.sqlite").is_file()
    _ok(["feature", "random", "--atlas", root / "atlas", "--n", 2, "--seed", 0])
    _ok(["feature", "show", 3, "--atlas", root / "atlas"])
    _ok(["feature", "top", "--text", "def f(x): return x", "--atlas", root / "atlas"])
    r = _ok(["feature", "contrast", "--prompts", root / "code.txt", "--controls", root / "prose.txt",
             "--atlas", root / "atlas", "--k", 5])
    assert "contrastive search" in r.output
    _ok(["atlas", "report", root / "atlas", "--cards", 2])
    assert (root / "atlas" / "report.html").is_file()


def test_errors(root):
    r = runner.invoke(app, ["feature", "show", "99999", "--atlas", str(root / "atlas")])
    assert r.exit_code == 2 and "99999" in r.output
    r = runner.invoke(app, ["feature", "show", "1", "--atlas", str(root / "missing")])
    assert r.exit_code == 2 and "missing" in r.output
