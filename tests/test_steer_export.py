"""Steering that leaves the workbench: control vectors round-trip and equal our hooks; baked checkpoints load with
plain from_pretrained and generate the tokens hook-based steering generates."""

from __future__ import annotations

import pytest
import torch

from thoughtscope.errors import SteerError
from thoughtscope.models import LoadedModel, tiny_model
from thoughtscope.sae import SAE, SAEConfig
from thoughtscope.steer import GenerationConfig, generate
from thoughtscope.steer.export import (
    abliterated,
    bake_checkpoint,
    control_vector,
    control_vector_preset,
    read_control_vector,
    write_control_vector,
)
from thoughtscope.steer.interventions import FeatureEdit, VectorEdit, steering

GREEDY = GenerationConfig(max_new_tokens=12, temperature=0.0, chat=False, stop_at_eos=False)
PROMPTS = ["hello there", "the sea and"]


def _sae(lm, site="resid.1", seed=0):
    torch.manual_seed(seed)
    sae = SAE.from_config(SAEConfig(d_model=lm.d_model, n_features=32, arch="topk", k=4, site=site), seed=seed)
    return sae.eval().requires_grad_(False)


def _vec(lm, seed=1, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(lm.d_model, generator=g) * scale


def _tokens(lm, ivs=()):
    return [g.token_ids for g in generate(lm, PROMPTS, ivs, GREEDY)]


def _logits(lm, ivs=(), text="hello there, the sea"):
    ids, _ = lm.tokenize([text])
    with steering(lm, ivs):
        return lm.model(ids).logits.float()


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", n_layers=3, seed=3)


def test_control_vector_round_trip_equals_hooks(tmp_path, llama):
    lm = llama
    sae = _sae(lm, "resid.2")
    ivs = [
        VectorEdit(_vec(lm), "resid.1", "add", 0.5),
        VectorEdit(_vec(lm, 2), "resid.2", "add", 1.0),
        FeatureEdit(sae, 3, "add", 6.0, site="resid.2"),
    ]
    cv = control_vector(lm, ivs)
    assert sorted(cv.directions) == [1, 2]
    path = write_control_vector(cv, tmp_path / "cv.gguf")
    back = read_control_vector(path, lm)
    assert back.model_hint == "llama" and sorted(back.directions) == [1, 2]
    for layer in (1, 2):
        torch.testing.assert_close(back.directions[layer], cv.directions[layer])
    preset = control_vector_preset(back, "imported", lm)
    rebuilt = preset.build(lm)
    torch.testing.assert_close(_logits(lm, rebuilt), _logits(lm, ivs), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(_logits(lm, rebuilt), _logits(lm))  # the vector does something


def test_items_that_cannot_travel_are_named(llama):
    lm = llama
    sae = _sae(lm)
    ivs = [
        VectorEdit(_vec(lm), "resid.1", "add", 1.0),
        FeatureEdit(sae, 2, "clamp", 3.0, site="resid.1", label="sky"),
        VectorEdit(_vec(lm), "resid.1", "project_out"),
        VectorEdit(_vec(lm), "resid.2", "add", 1.0, positions="generated"),
        VectorEdit(_vec(lm), "resid.0", "add", 1.0),
    ]
    with pytest.raises(SteerError) as e:
        control_vector(lm, ivs)
    msg = str(e.value)
    assert "item 0" not in msg
    assert "item 1 (sky): a feature clamp depends" in msg
    assert "item 2: op 'project_out'" in msg
    assert "item 3: it acts on positions 'generated' only" in msg
    assert "item 4: it acts on resid.0" in msg


def test_control_vector_for_another_model_is_refused(tmp_path, llama):
    other = tiny_model("llama", d_model=32, n_layers=3)
    path = write_control_vector(control_vector(other, [VectorEdit(_vec(other), "resid.1")]), tmp_path / "o.gguf")
    with pytest.raises(SteerError, match="32-dimensional directions but .* d_model=64"):
        read_control_vector(path, llama)
    deep = tiny_model("llama", n_layers=5)
    path = write_control_vector(control_vector(deep, [VectorEdit(_vec(deep), "resid.4")]), tmp_path / "d.gguf")
    with pytest.raises(SteerError, match=r"layers \[4\].*made for another model"):
        read_control_vector(path, llama)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(SteerError, match="not a readable GGUF control vector"):
        read_control_vector(bad, llama)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "neox"])
def test_baked_vector_checkpoint_generates_what_hooks_generate(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    lm = tiny_model(arch, n_layers=3, seed=5)
    sae = _sae(lm, "resid.2")
    ivs = [VectorEdit(_vec(lm, scale=6.0), "resid.1", "add", 1.0), FeatureEdit(sae, 5, "add", 8.0, site="resid.2")]
    hooked = _tokens(lm, ivs)
    assert hooked != _tokens(lm)  # the edit changes the greedy text, so equality below means something
    out = bake_checkpoint(lm, ivs, tmp_path / "baked")
    model = AutoModelForCausalLM.from_pretrained(out)
    baked = LoadedModel(model.float(), lm.tokenizer, "baked")
    assert _tokens(baked) == hooked
    torch.testing.assert_close(_logits(baked), _logits(lm, ivs), atol=1e-4, rtol=1e-4)
    assert _tokens(lm) != hooked  # the original model was left unchanged


def test_abliterated_checkpoint_equals_its_hook_preview(tmp_path, llama):
    from transformers import AutoModelForCausalLM

    lm = llama
    d = _vec(lm, 7)
    ivs = [VectorEdit(d, "resid.1", "project_out")]
    with pytest.raises(SteerError, match="pass --abliterate"):
        bake_checkpoint(lm, ivs, tmp_path / "no")
    assert not (tmp_path / "no").exists()
    with abliterated(lm, d):
        preview = _tokens(lm)
        preview_logits = _logits(lm)
    out = bake_checkpoint(lm, ivs, tmp_path / "abl", abliterate=True)
    baked = LoadedModel(AutoModelForCausalLM.from_pretrained(out).float(), lm.tokenizer, "abl")
    assert _tokens(baked) == preview
    torch.testing.assert_close(_logits(baked), preview_logits, atol=1e-4, rtol=1e-4)
    ids, _ = lm.tokenize(["hello there"])
    with torch.no_grad():
        hs = baked.model(ids, output_hidden_states=True).hidden_states
    u = d / d.norm()
    assert max(float((h @ u).abs().max()) for h in hs[:-1]) < 1e-4  # the direction is written nowhere


def test_family_without_a_bias_slot_is_refused_clearly(tmp_path):
    lm = tiny_model("qwen2", n_layers=2)
    with pytest.raises(SteerError, match="no bias on its MLP output.*control vector instead"):
        bake_checkpoint(lm, [VectorEdit(_vec(lm), "resid.1")], tmp_path / "q")
    assert not (tmp_path / "q").exists()


# --------------------------------------------------------------------------- the default model (slow)


@pytest.fixture(scope="module")
def smol():
    from thoughtscope.models import load_model

    return load_model("default")


SKY = {  # feature 3448 of the shipped SAE writes about the sky (README); 'add' is a constant, so it can travel
    "name": "sky",
    "interventions": [
        {"type": "feature", "op": "add", "site": "resid.15", "sae": "default", "feature": 3448, "strength": 1.0,
         "unit": "max"},
        {"type": "vector", "op": "add", "site": "resid.10", "strength": 0.0, "vector": [0.0] * 576},
    ],
}  # fmt: skip
ASK = ["Tell me about your day.", "What should I cook tonight?"]


def _greedy(n=24):
    return GenerationConfig(max_new_tokens=n, temperature=0.0, stop_at_eos=False)


@pytest.mark.slow
def test_default_model_baked_checkpoint_same_tokens(tmp_path, smol):
    from transformers import AutoModelForCausalLM

    from thoughtscope.steer import Preset

    ivs = Preset.from_dict(SKY).build(smol)
    hooked = [g.token_ids for g in generate(smol, ASK, ivs, _greedy())]
    out = bake_checkpoint(smol, ivs, tmp_path / "sky")
    baked = LoadedModel(AutoModelForCausalLM.from_pretrained(out), smol.tokenizer, "baked")
    assert [g.token_ids for g in generate(baked, ASK, (), _greedy())] == hooked
    assert hooked != [g.token_ids for g in generate(smol, ASK, (), _greedy())]


@pytest.mark.slow
def test_exported_control_vector_steers_llama_cpp_as_we_do(tmp_path, smol):
    """The CLI's export, applied by a real llama.cpp to an F32 conversion of the shipped GGUF, gives the greedy
    tokens our own steering gives. Tolerance: identical for the first 20 of 24 tokens of each answer (float
    sums differ in order between the two programs)."""
    import json

    from typer.testing import CliRunner

    from thoughtscope.cli import app
    from thoughtscope.models import REGISTERED
    from thoughtscope.steer import Preset
    from thoughtscope.steer.generate import format_prompt

    try:
        from helpers.llamacpp import LlamaCpp, to_f32
    except ImportError as e:  # pragma: no cover - depends on the machine
        pytest.skip(str(e))
    try:
        ll = LlamaCpp(to_f32(REGISTERED["default"].locate(), tmp_path / "smol-f32.gguf"))
    except ImportError as e:
        pytest.skip(str(e))
    (tmp_path / "sky.json").write_text(json.dumps(SKY))
    r = CliRunner().invoke(
        app, ["steer", "--preset", str(tmp_path / "sky.json"), "--export-control-vector", str(tmp_path / "sky.gguf")]
    )
    assert r.exit_code == 0, r.output
    cv = read_control_vector(tmp_path / "sky.gguf", smol)
    ivs = Preset.from_dict(SKY).build(smol)
    for prompt in ASK:
        ids = format_prompt(smol, prompt)
        ours = [generate(smol, [prompt], iv, _greedy())[0].token_ids for iv in ((), ivs)]
        theirs = []
        for dirs in (None, {k: v.numpy() for k, v in cv.directions.items()}):
            ll.set_control_vector(dirs)
            theirs.append(ll.greedy(ids, 24))
        assert ours[0] != ours[1]  # the vector changes the answer
        for a, b in zip(ours, theirs):
            assert a[:20] == b[:20], (smol.tokenizer.decode(a), smol.tokenizer.decode(b))
