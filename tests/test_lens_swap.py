"""The lens-space swap: exchange what one layer says about token A and token B, the rest of the residual intact,
as a steering op that presets, the CLI and the equalizer carry."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from thoughtscope.cli import app
from thoughtscope.features import norm_scale
from thoughtscope.models import tiny_model
from thoughtscope.steer import Preset, SteerError, preset_from_interventions
from thoughtscope.steer.interventions import StepContext, VectorEdit, steering, swap
from thoughtscope.steer.vectors import lens_swap


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", d_model=16, n_layers=3, n_heads=2, seed=4)


def _ctx():
    return StepContext()


def test_swap_exchanges_the_two_components_and_keeps_the_rest():
    g = torch.Generator().manual_seed(0)
    a, b, h = torch.randn(16, generator=g), torch.randn(16, generator=g), torch.randn(2, 3, 16, generator=g)
    ua, ub = a / a.norm(), b / b.norm()
    out = swap(a, b, "resid.0").apply(h, _ctx())
    assert torch.allclose(out @ ua, h @ ub, atol=1e-5) and torch.allclose(out @ ub, h @ ua, atol=1e-5)
    q, _ = torch.linalg.qr(torch.stack([ua, ub], 1))  # the plane; its complement must not move
    rest = lambda x: x - (x @ q) @ q.T  # noqa: E731
    assert torch.allclose(rest(out), rest(h), atol=1e-5)
    half = swap(a, b, "resid.0", 0.5).apply(h, _ctx())  # halfway: both read the mean of the two
    assert torch.allclose(half @ ua, half @ ub, atol=1e-5)
    assert torch.allclose(swap(a, b, "resid.0", 0.0).apply(h, _ctx()), h)


def test_swap_refuses_what_cannot_define_a_plane():
    a = torch.ones(8)
    with pytest.raises(SteerError, match="parallel"):
        swap(a, 2 * a, "resid.0")
    with pytest.raises(SteerError, match="needs a second direction"):
        VectorEdit(a, "resid.0", "swap")
    with pytest.raises(SteerError, match="only swap takes one"):
        VectorEdit(a, "resid.0", "add", toward=torch.arange(8.0))
    with pytest.raises(SteerError, match="shape"):
        swap(a, torch.ones(4), "resid.0")
    with pytest.raises(SteerError, match="'toward'"):
        Preset.from_dict({"name": "x", "interventions": [{"type": "vector", "op": "swap", "site": "resid.0",
                                                          "vector": [1.0, 0.0]}]})  # fmt: skip


def test_a_lens_swap_at_the_last_block_exchanges_the_two_tokens_logits(lm):
    """At the last block the logit lens is the model: after the swap, each token's logit (per unit of its readout
    direction) is what the other's was, up to the final norm's common scale."""
    ids, _ = lm.tokenize(["hello there"])
    tok = {t: lm.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in ("q", "z")}
    gain = norm_scale(lm.final_norm)
    w = lm.unembed.weight.detach().float() * (gain.detach() if gain is not None else 1)
    size = {t: float(w[i].norm()) for t, i in tok.items()}

    def read(ivs):
        with torch.inference_mode(), steering(lm, ivs):
            out = lm.model(ids).logits[0, -1]
        return {t: float(out[i]) / size[t] for t, i in tok.items()}

    before, after = read([]), read([lens_swap(lm, "q", "z", lm.n_layers - 1)])
    assert before["q"] != pytest.approx(before["z"], rel=1e-3)
    assert after["q"] / after["z"] == pytest.approx(before["z"] / before["q"], rel=1e-3)


def test_swap_travels_through_presets_and_the_cli(lm, tmp_path):
    edit = lens_swap(lm, "q", "z", 1)
    path = preset_from_interventions("qz", [edit]).save(tmp_path / "qz.json")
    item = json.loads(path.read_text())["interventions"][0]
    assert item["op"] == "swap" and len(item["toward"]) == lm.d_model
    back = Preset.load(path).build(lm)[0]
    h = torch.randn(1, 4, lm.d_model)
    assert torch.allclose(back.apply(h, _ctx()), edit.apply(h, _ctx()), atol=1e-5)
    model = tmp_path / "model"
    lm.model.save_pretrained(model)
    lm.tokenizer.save_pretrained(model)
    out = tmp_path / "cli.json"
    args = ["lens", "swap", "--token", "q", "--toward", "z", "--layer", "1", "--out", str(out), "--model", str(model)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["interventions"][0]["op"] == "swap"
    r = CliRunner().invoke(app, ["lens", "swap", "--token", "q", "--layer", "1", "--model", str(model)])
    assert r.exit_code != 0 and "needs --token, --toward" in r.output
