"""The causal commands as a user runs them (`thoughtscope patch`, `lens`, `lens fit`, `analyze --lens --target`) on
a tiny model saved to a folder: what they print, the files they write, and a killed lens fit that resumes."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from thoughtscope.cli import app
from thoughtscope.models import tiny_model
from thoughtscope.sae import SAE, SAEConfig, save_sae


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal-cli")
    lm = tiny_model("llama", d_model=16, n_layers=3, n_heads=2, seed=4)
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    torch.manual_seed(0)
    sae = SAE.from_config(SAEConfig(d_model=16, n_features=32, arch="topk", k=4, site="resid.1", model=lm.name))
    save_sae(sae, root / "sae")
    return root


def _ok(*args) -> str:
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def test_patch_prints_the_top_cells_and_writes_both_maps_and_the_png(folder, tmp_path):
    out, png = tmp_path / "p.json", tmp_path / "p.png"
    text = _ok("patch", "--clean", "abcq", "--corrupt", "abcz", "--target", "q", "--against", "z",
               "--model", folder / "model", "--json", out, "--png", png)  # fmt: skip
    assert "attribution vs activation patching, Spearman" in text and "layer" in text and "pos" in text
    res = json.loads(out.read_text())
    assert {"atp_spearman", "atp_speedup", "resid", "attn", "mlp"} <= set(res)
    grid = res["resid"]["activation_patching"]
    assert len(grid) == 3 and len(grid[0]) == len(res["tokens"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = CliRunner().invoke(app, ["patch", "--clean", "abcq", "--corrupt", "abcdz", "--target", "q",
                                 "--model", str(folder / "model")])  # fmt: skip
    assert r.exit_code != 0 and "same number of tokens" in r.output


def test_lens_prints_each_layer_and_tracks_a_token(folder, tmp_path):
    out = tmp_path / "lens.json"
    text = _ok("lens", "hello there", "--track", "q", "--model", folder / "model", "--json", out)
    assert "logit lens" in text and text.count("layer") >= 3 and "'q': rank" in text
    view = json.loads(out.read_text())
    assert view["kind"] == "logit" and len(view["top"]) == 3 and view["track"]["token"] == "q"


def test_a_killed_lens_fit_resumes_where_it_stopped(folder, tmp_path, monkeypatch):
    import thoughtscope.causal.lens as lens_mod

    saves = []
    real = lens_mod.atomic_torch_save

    def dies_after_two(obj, path):
        real(obj, path)
        saves.append(obj["done"])
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(lens_mod, "atomic_torch_save", dies_after_two)
    args = ("lens", "fit", "--model", folder / "model", "--out", tmp_path / "jl", "--contexts", 48)
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code != 0 and (tmp_path / "jl.fit.ckpt").is_file() and not (tmp_path / "jl").exists()
    monkeypatch.setattr(lens_mod, "atomic_torch_save", lambda obj, path: (saves.append(obj["done"]), real(obj, path)))
    text = _ok(*args)
    # the console wraps lines at its width, so a long temporary path can split the words
    assert "Jacobian lens" in " ".join(text.split()) and saves[2] == 3  # batches 1 and 2 were not measured again
    assert not (tmp_path / "jl.fit.ckpt").exists()
    lens = lens_mod.JacobianLens.load(tmp_path / "jl")
    fresh = lens_mod.fit_jacobian_lens(_reload(folder), lens_mod.LensFitConfig(n_contexts=48), progress=False)
    torch.testing.assert_close(lens.J, fresh.J, atol=2e-3, rtol=1e-2)  # stored as float16
    text = _ok("lens", "hello there", "--lens", tmp_path / "jl", "--model", folder / "model")
    assert "jacobian lens" in text


def _reload(folder):
    from thoughtscope.models import load_model

    return load_model(str(folder / "model"))


def test_analyze_reads_features_lens_and_why_in_one_command(folder, tmp_path):
    out = tmp_path / "an.json"
    text = _ok("analyze", "hello there", "--lens", "--target", "q", "--sae", folder / "sae",
               "--model", folder / "model", "--json", out)  # fmt: skip
    assert "logit lens: the next token" in text and "why 'q':" in text and "Spearman" in text
    res = json.loads(out.read_text())
    assert {"tokens", "features", "lens", "why"} <= set(res)
    assert res["lens"]["track"]["token"] == "q" and res["why"]["top"]


def test_the_lens_benchmark_writes_its_keys_per_layer_and_a_png(tmp_path):
    """benchmarks/lens.py --tiny --quick: the Jacobian-minus-logit agreement with its interval, the fit time, both
    lenses per layer, and the picture."""
    import subprocess
    import sys
    from pathlib import Path

    from helpers import env_with_tests_on_path

    out = tmp_path / "lens.json"
    script = Path(__file__).parent.parent / "benchmarks/lens.py"
    r = subprocess.run([sys.executable, str(script), "--tiny", "--quick", "--json", str(out)],
                       env=env_with_tests_on_path(), capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    lo, hi = res["jlens_top1_vs_logit_lens_ci"]
    assert lo <= res["jlens_top1_vs_logit_lens"] <= hi and res["fit_seconds"] > 0
    assert len(res["logit_lens_top1"]) == len(res["jacobian_lens_top1"]) > 0 and res["band_layers"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
