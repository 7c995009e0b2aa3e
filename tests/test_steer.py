"""Steering on tiny random models: exact feature clamps, vector shifts, hook removal, generation, presets, bad input."""

import json

import pytest
import torch

from thoughtscope.models import Site, capture, tiny_model
from thoughtscope.sae import SAE, SAEConfig, save_sae
from thoughtscope.steer import (
    FeatureEdit,
    GenerationConfig,
    Preset,
    PresetItem,
    SteerError,
    SteeringVector,
    StepContext,
    VectorEdit,
    ablate,
    add_feature,
    add_vector,
    clamp,
    clamp_projection,
    compare,
    feature_acts,
    generate,
    project_out,
    scale_feature,
    steering,
    stream,
)
from thoughtscope.steer.generate import format_prompt

SITE = "resid.0"
CONST = 5  # feature whose activation is 2.5 everywhere (zero encoder row, bias 2.5)
CONST_VALUE = 2.5


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", d_model=64, n_layers=2)


def make_sae(arch="relu-l1", seed=1, **kw):
    cfg = SAEConfig(arch=arch, d_model=64, n_features=128, site=SITE, k=kw.pop("k", 8), **kw)
    sae = SAE.from_config(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.enc.copy_(torch.randn(128, 64, generator=g) * 0.3)
        sae.W_dec.copy_(torch.randn(128, 64, generator=g) * 0.2)
        sae.b_enc.copy_(torch.randn(128, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(64, generator=g) * 0.05)
        sae.enc[CONST].zero_()
        sae.b_enc[CONST] = CONST_VALUE
    return sae.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def sae():
    return make_sae()


def ids_for(lm, texts=("hello there, general", "the bridge is red")):
    return lm.tokenize(list(texts))


def site_acts(lm, ids, mask):
    return capture(lm, SITE, ids, mask)[Site.parse(SITE)]


def logits(lm, ids, mask):
    with torch.no_grad():
        return lm.model(input_ids=ids, attention_mask=mask).logits


# ----------------------------------------------------------------------------- features


@pytest.mark.parametrize("arch", ["relu-l1", "jumprelu", "batchtopk"])
def test_partial_encode_equals_sae_encode(lm, arch):
    sae = make_sae(arch)
    if arch == "batchtopk":
        sae.threshold.fill_(0.05)
    x = site_acts(lm, *ids_for(lm))
    idx = torch.tensor([0, 3, CONST, 77])
    torch.testing.assert_close(feature_acts(sae, x, idx), sae.encode(x)[..., idx], rtol=1e-5, atol=1e-5)


def test_topk_partial_encode_matches_where_feature_is_in_topk(lm):
    sae = make_sae("topk", k=8)
    x = site_acts(lm, *ids_for(lm))
    f = sae.encode(x)
    part = feature_acts(sae, x, torch.arange(128))
    on = f > 0
    assert on.any()
    torch.testing.assert_close(part[on], f[on], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op,value", [("clamp", 7.0), ("clamp", -3.0), ("add", 2.0), ("scale", 3.0), ("ablate", 0.0)])
def test_feature_edit_equals_decode_of_edited_features_plus_error(lm, sae, op, value):
    ids, mask = ids_for(lm)
    x = site_acts(lm, ids, mask)
    i = 11
    with steering(lm, [FeatureEdit(sae, i, op, value)]):
        x2 = site_acts(lm, ids, mask)
    f = sae.encode(x)
    err = x - sae.decode(f)
    f2 = f.clone()
    f2[..., i] = {"clamp": value, "add": f[..., i] + value, "scale": f[..., i] * value, "ablate": 0.0}[op]
    torch.testing.assert_close(x2, sae.decode(f2) + err, rtol=1e-5, atol=1e-5)
    if op == "clamp":
        # the SAE's own encode of the edited activation, through the same encoder direction, reads the value
        # back exactly when decoder and encoder rows are bi-orthogonal; here we check the decomposition instead:
        delta = x2 - x
        torch.testing.assert_close(delta, (value - f[..., i])[..., None] * sae.W_dec[i], rtol=1e-5, atol=1e-5)


def test_clamp_sets_feature_exactly_in_sae_encode_with_biorthogonal_rows(lm):
    # With W_enc[:, i] · W_dec[i] = 1, every other encoder row orthogonal to W_dec[i], and feature i active
    # (pre-activation > 0) at every position, re-encoding the steered activation with the SAE's own encode
    # gives exactly the clamp value for i and unchanged values for every other feature.
    sae = make_sae()
    i = 9
    with torch.no_grad():
        d = sae.W_dec[i].clone()
        keep = torch.cat([torch.arange(0, i), torch.arange(i + 1, 128)])
        sae.enc[keep] -= (sae.enc[keep] @ d)[:, None] * d / d.dot(d)
        sae.enc[i] = d / d.dot(d)
        sae.b_enc[i] = 50.0  # keeps feature i on everywhere, so ReLU is the identity for it
    ids, mask = ids_for(lm)
    x = site_acts(lm, ids, mask)
    with steering(lm, [clamp(sae, i, 4.25)]):
        x2 = site_acts(lm, ids, mask)
    f, f2 = sae.encode(x), sae.encode(x2)
    torch.testing.assert_close(f2[..., i], torch.full_like(f2[..., i], 4.25), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        torch.cat([f2[..., :i], f2[..., i + 1 :]], -1),
        torch.cat([f[..., :i], f[..., i + 1 :]], -1),
        rtol=1e-4,
        atol=1e-4,
    )


def test_clamp_to_current_value_changes_nothing_bit_for_bit(lm, sae):
    ids, mask = ids_for(lm)
    base = logits(lm, ids, mask)
    assert torch.allclose(feature_acts(sae, site_acts(lm, ids, mask), torch.tensor([CONST])), torch.tensor(CONST_VALUE))
    with steering(lm, [clamp(sae, CONST, CONST_VALUE), scale_feature(sae, CONST, 1.0), add_feature(sae, CONST, 0.0)]):
        same = logits(lm, ids, mask)
    assert torch.equal(same, base)


def test_feature_group_is_simultaneous(lm, sae):
    ids, mask = ids_for(lm)
    x = site_acts(lm, ids, mask)
    with steering(lm, [clamp(sae, 3, 5.0), clamp(sae, 4, -2.0), ablate(sae, 6)]):
        x2 = site_acts(lm, ids, mask)
    f = sae.encode(x)
    f2 = f.clone()
    f2[..., 3], f2[..., 4], f2[..., 6] = 5.0, -2.0, 0.0
    torch.testing.assert_close(x2, x + (f2 - f) @ sae.W_dec, rtol=1e-5, atol=1e-5)


def test_unit_max_scales_by_max_act(sae):
    e = FeatureEdit(sae, 3, "clamp", 10.0, unit="max", max_act=0.5)
    assert e.target == 5.0


# ----------------------------------------------------------------------------- directions


def test_add_vector_shifts_activation_by_exactly_the_vector(lm):
    ids, mask = ids_for(lm)
    x = site_acts(lm, ids, mask)
    v = torch.randn(64, generator=torch.Generator().manual_seed(3))
    with steering(lm, [add_vector(v, SITE, strength=2.0)]):
        x2 = site_acts(lm, ids, mask)
    assert torch.equal(x2, x + 2.0 * v)
    with pytest.warns(DeprecationWarning, match="'scale' is now 'strength'"):
        old = add_vector(v, SITE, scale=2.0)  # the old keyword still means the same
    assert old.strength == 2.0 and old.op == "add" and torch.equal(old.vector, v)


def test_project_out_and_clamp_projection(lm):
    ids, mask = ids_for(lm)
    u = torch.randn(64, generator=torch.Generator().manual_seed(4))
    un = u / u.norm()
    with steering(lm, [project_out(u, SITE)]):
        x2 = site_acts(lm, ids, mask)
    assert (x2 @ un).abs().max() < 1e-4
    with steering(lm, [clamp_projection(u, SITE, 3.0)]):
        x3 = site_acts(lm, ids, mask)
    torch.testing.assert_close(x3 @ un, torch.full(x3.shape[:2], 3.0), rtol=1e-4, atol=1e-4)


def test_removing_interventions_restores_logits_bit_for_bit(lm, sae):
    ids, mask = ids_for(lm)
    before = logits(lm, ids, mask)
    hooks = [len(b._forward_hooks) for b in lm.layers]
    ivs = [clamp(sae, 3, 9.0), add_vector(torch.ones(64), "resid.1", 0.5), project_out(torch.ones(64), SITE)]
    with steering(lm, ivs):
        during = logits(lm, ids, mask)
    assert not torch.equal(during, before)
    assert torch.equal(logits(lm, ids, mask), before)
    assert [len(b._forward_hooks) for b in lm.layers] == hooks
    with pytest.raises(RuntimeError), steering(lm, ivs):
        raise RuntimeError("boom")
    assert [len(b._forward_hooks) for b in lm.layers] == hooks


# ----------------------------------------------------------------------------- positions


def test_position_masks():
    ctx = StepContext(offset=0, prompt_len=5)
    assert ctx.mask("all", 5, "cpu") is True
    assert ctx.mask("prompt", 5, "cpu") is True and ctx.mask("generated", 5, "cpu") is False
    ctx.offset = 5
    assert ctx.mask("prompt", 1, "cpu") is False and ctx.mask("generated", 1, "cpu") is True
    ctx = StepContext(offset=3, prompt_len=5)
    m = ctx.mask("generated", 4, "cpu")
    assert m.view(-1).tolist() == [False, False, True, True]
    assert StepContext().mask("generated", 7, "cpu") is False  # plain forward: all prompt


def test_positions_in_cached_generation(lm):
    cfg = GenerationConfig(max_new_tokens=6, temperature=0.0)
    prompts = ["abc", "hello world"]
    v = torch.randn(64, generator=torch.Generator().manual_seed(5)) * 50
    base = generate(lm, prompts, (), cfg)
    gen_only = generate(lm, prompts, [add_vector(v, SITE, positions="generated")], cfg)
    prompt_only = generate(lm, prompts, [add_vector(v, SITE, positions="prompt")], cfg)
    for b, g, p in zip(base, gen_only, prompt_only):
        assert g.token_ids[0] == b.token_ids[0]  # first token comes from prompt columns only
        assert g.token_ids != b.token_ids
        assert p.token_ids[0] != b.token_ids[0]
    # "generated" seen during generation equals a full forward with the vector added from the prompt end on
    seq = base[0].prompt_ids + gen_only[0].token_ids
    P = len(base[0].prompt_ids)
    ids = torch.tensor([seq])
    from thoughtscope.steer import Steerer

    st = Steerer(lm, [add_vector(v, SITE, positions="generated")])
    with st.active(prompt_len=P), torch.no_grad():
        full = lm.model(ids).logits[0]
    assert full[P - 1 : -1].argmax(-1).tolist()[1:] == gen_only[0].token_ids[1:]


# ----------------------------------------------------------------------------- generation


def test_cached_batched_greedy_matches_single_full_forward(lm):
    cfg = GenerationConfig(max_new_tokens=8, temperature=0.0, stop_at_eos=False)
    prompts = ["a", "a much longer prompt here", "mid length"]
    batch = generate(lm, prompts, (), cfg)
    for p, g in zip(prompts, batch):
        ids = torch.tensor([format_prompt(lm, p)])
        for _ in range(8):
            with torch.no_grad():
                nxt = lm.model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
        assert g.token_ids == ids[0, -8:].tolist(), p


def test_seeded_sampling_and_side_by_side(lm, sae):
    cfg = GenerationConfig(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=7, stop_at_eos=False)
    a = generate(lm, ["hi", "there"], (), cfg)
    b = generate(lm, ["hi", "there"], (), cfg)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    c = generate(
        lm, ["hi", "there"], (), GenerationConfig(max_new_tokens=10, temperature=1.0, seed=8, stop_at_eos=False)
    )
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    # a no-op intervention from the same seed gives the very same sample; a strong one changes it
    same = compare(lm, ["hi", "there"], [clamp(sae, CONST, CONST_VALUE)], cfg)
    assert all(r.steered == r.unsteered for r in same)
    diff = compare(lm, ["hi", "there"], [clamp(sae, 3, 80.0)], cfg)
    assert any(r.steered != r.unsteered for r in diff)
    assert [r.unsteered for r in diff] == [g.text for g in a]


def test_streaming_events_add_up_to_the_text(lm):
    cfg = GenerationConfig(max_new_tokens=7, temperature=0.8, seed=1, stop_at_eos=False)
    pieces = {0: "", 1: ""}
    done = set()
    for ev in stream(lm, ["x", "yy"], (), cfg):
        pieces[ev.row] += ev.text
        if ev.done:
            done.add(ev.row)
    gens = generate(lm, ["x", "yy"], (), cfg)
    assert [pieces[0], pieces[1]] == [g.text for g in gens]
    assert done == {0, 1}


def test_chat_template_is_used_when_present():
    lm2 = tiny_model("llama", d_model=32, n_layers=1)
    lm2.tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    ids = format_prompt(lm2, "hey")
    assert lm2.tokenizer.decode(ids) == "<user>hey\n<assistant>"
    out = generate(
        lm2,
        [
            "hey",
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
        ],
        (),
        GenerationConfig(max_new_tokens=3),
    )
    assert len(out) == 2 and "<assistant>b" in lm2.tokenizer.decode(out[1].prompt_ids)
    plain = tiny_model("llama", d_model=32, n_layers=1)
    with pytest.raises(SteerError, match="no chat template"):
        generate(plain, ["hey"], (), GenerationConfig(chat=True))


# ----------------------------------------------------------------------------- presets


def test_preset_round_trip_and_build(lm, sae, tmp_path):
    save_sae(sae, tmp_path / "sae")
    vec = torch.randn(64, generator=torch.Generator().manual_seed(2))
    SteeringVector(vec, "resid.1", "mean", lm.name, 4, typical_norm=3.0).save(tmp_path / "v.safetensors")
    p = Preset(
        "demo",
        [
            PresetItem(
                "feature", "clamp", SITE, 6.0, feature=3, sae="sae", label="three", range=[0.0, 10.0], suggested=6.0
            ),
            PresetItem(
                "feature", "clamp", SITE, 2.0, feature=4, sae="sae", unit="max", max_act=1.5, positions="generated"
            ),
            PresetItem("vector", "add", "resid.1", 0.5, vector="v.safetensors", unit="norm", label="v"),
            PresetItem("vector", "project_out", SITE, 0.0, vector=[1.0] * 64),
        ],
        description="test",
    )
    path = p.save(tmp_path / "demo.json")
    q = Preset.load(path)
    assert q == p
    saved = json.loads(path.read_text())
    assert saved["format"] == "thoughtscope-preset-2" and saved["interventions"][0]["strength"] == 6.0
    assert all("value" not in it for it in saved["interventions"])
    ivs = q.build(lm)
    assert isinstance(ivs[0], FeatureEdit) and ivs[0].target == 6.0 and ivs[1].target == 3.0
    assert isinstance(ivs[2], VectorEdit)
    torch.testing.assert_close(ivs[2].strength * ivs[2].vector, vec / vec.norm() * 1.5)
    ids, mask = ids_for(lm)
    with steering(lm, ivs):
        a = logits(lm, ids, mask)
    with steering(lm, Preset.load(path).build(lm)):
        b = logits(lm, ids, mask)
    assert torch.equal(a, b)
    q2 = q.with_strength(0, 9.0)
    assert q2.items[0].strength == 9.0 and q.items[0].strength == 6.0


def test_presets_written_before_the_rename_load_unchanged(lm, sae, tmp_path):
    """A preset file from before strength had one name says "value" (format thoughtscope-preset-1): it loads
    and builds the same interventions; the old Python names warn and still work."""
    save_sae(sae, tmp_path / "sae")
    item = {"type": "feature", "op": "clamp", "site": SITE, "sae": "sae", "feature": 3, "unit": "max", "max_act": 2.0}
    old = {"format": "thoughtscope-preset-1", "name": "o", "interventions": [{**item, "value": 1.5}]}
    new = {"format": "thoughtscope-preset-2", "name": "o", "interventions": [{**item, "strength": 1.5}]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    a, b = Preset.load(tmp_path / "old.json"), Preset.load(tmp_path / "new.json")
    assert a.items == b.items and a.items[0].strength == 1.5
    assert a.build(lm)[0].target == b.build(lm)[0].target == 3.0
    both = {**old, "interventions": [{**item, "value": 1.5, "strength": 1.5}]}
    with pytest.raises(SteerError, match="give 'strength' only"):
        Preset.from_dict(both)
    with pytest.warns(DeprecationWarning):
        assert a.items[0].value == 1.5 and a.with_value(0, 2.0).items[0].strength == 2.0
    with pytest.warns(DeprecationWarning):
        assert PresetItem("feature", "clamp", SITE, value=4.0, feature=3, sae="sae").strength == 4.0
    with pytest.warns(DeprecationWarning):
        e = FeatureEdit(sae, 3, "clamp", value=4.0)
    assert e.strength == 4.0 and e == FeatureEdit(sae, 3, "clamp", 4.0)
    with pytest.warns(DeprecationWarning):
        assert e.value == 4.0 and scale_feature(sae, 3, factor=2.0).strength == 2.0
    with pytest.raises(SteerError, match="give strength only"), pytest.warns(DeprecationWarning):
        FeatureEdit(sae, 3, "clamp", 1.0, value=4.0)
    u = torch.ones(64)
    with pytest.warns(DeprecationWarning):
        c = VectorEdit(u, SITE, "clamp_projection", scale=1.0, value=3.0)  # how callers wrote it before
    assert c.strength == 3.0 == clamp_projection(u, SITE, 3.0).strength and c.op == "clamp_projection"


def test_example_presets_parse():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "examples" / "presets").glob("*.json"))
    assert files
    for f in files:
        Preset.load(f)
    v = SteeringVector.load(files[0].parent / "happy.safetensors")
    assert v.site == "resid.12" and v.vector.shape == (576,) and v.typical_norm > 0


# ----------------------------------------------------------------------------- bad input


class _Counter:
    def __init__(self, lm):
        self.n = 0
        self.h = lm.model.register_forward_hook(lambda *a: setattr(self, "n", self.n + 1))

    def close(self):
        self.h.remove()


def test_bad_inputs_fail_before_generation(lm, sae, tmp_path):
    cnt = _Counter(lm)
    try:
        with pytest.raises(SteerError, match="out of range.*128 features"):
            clamp(sae, 128, 1.0)
        with pytest.raises(SteerError, match="out of range"):
            clamp(sae, -1, 1.0)
        with pytest.raises(SteerError, match="finite"):
            clamp(sae, 3, float("nan"))
        with pytest.raises(SteerError, match="finite"):
            add_vector(torch.ones(64), SITE, float("inf"))
        with pytest.raises(SteerError, match="dimension 63.*d_model=64"):
            generate(lm, ["hi"], [add_vector(torch.ones(63), SITE)])
        with pytest.raises(SteerError, match="non-finite"):
            add_vector(torch.tensor([float("nan")] * 64), SITE)
        with pytest.raises(SteerError, match="resid.9.*2 blocks"):
            generate(lm, ["hi"], [add_vector(torch.ones(64), "resid.9")])
        with pytest.raises(SteerError, match="context window"):
            generate(lm, ["word " * 300], [], GenerationConfig(max_new_tokens=4))
        with pytest.raises(SteerError, match="context window"):
            compare(lm, ["hi", "x" * 300], [clamp(sae, 3, 1.0)])
        with pytest.raises(SteerError, match="max_act"):
            FeatureEdit(sae, 3, "clamp", 2.0, unit="max")
        # presets
        bad = {
            "name": "b",
            "interventions": [
                {"type": "feature", "op": "clamp", "site": SITE, "sae": "nowhere", "feature": 3, "value": 1.0}
            ],
        }
        (tmp_path / "b.json").write_text(json.dumps(bad))
        with pytest.raises(SteerError, match=r"b\.json, intervention 0: SAE folder not found: .*nowhere"):
            Preset.load(tmp_path / "b.json").build(lm)
        save_sae(sae, tmp_path / "sae")
        bad["interventions"][0].update(sae="sae", site="resid.7")
        (tmp_path / "b.json").write_text(json.dumps(bad))
        with pytest.raises(SteerError, match="intervention 0: site resid.7 is beyond"):
            Preset.load(tmp_path / "b.json").build(lm)
        bad["interventions"][0].update(site=SITE, feature=500)
        (tmp_path / "b.json").write_text(json.dumps(bad))
        with pytest.raises(SteerError, match="feature index 500 is out of range"):
            Preset.load(tmp_path / "b.json").build(lm)
        bad["interventions"][0].update(feature=3, value=float("nan"))
        (tmp_path / "b.json").write_text(json.dumps(bad))
        with pytest.raises(SteerError, match="strength must be a finite number"):
            Preset.load(tmp_path / "b.json")
        bad["interventions"][0].update(value=1.0, site="attn.x")
        (tmp_path / "b.json").write_text(json.dumps(bad))
        with pytest.raises(SteerError, match="cannot parse site"):
            Preset.load(tmp_path / "b.json")
        bad["interventions"] = [{"type": "vector", "op": "add", "site": SITE, "vector": [1.0] * 10, "value": 1.0}]
        (tmp_path / "b.json").write_text(json.dumps(bad))
        with pytest.raises(SteerError, match=r"shape \(10,\).*d_model=64"):
            Preset.load(tmp_path / "b.json").build(lm)
        with pytest.raises(SteerError, match="not found"):
            Preset.load(tmp_path / "missing.json")
        assert cnt.n == 0, "a forward pass ran before the error"
    finally:
        cnt.close()


@pytest.mark.slow
def test_default_model_chat_generation_and_steering():
    from thoughtscope.models import load_model

    lm = load_model("default")
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.0)
    ids = format_prompt(lm, "What is the capital of France?")
    assert "<|im_start|>assistant" in lm.tokenizer.decode(ids)
    base = generate(lm, ["What is the capital of France?", "Hi"], (), cfg)
    assert "Paris" in base[0].text
    v = torch.zeros(lm.d_model)
    same = generate(lm, ["What is the capital of France?", "Hi"], [add_vector(v, "resid.15")], cfg)
    assert [g.token_ids for g in same] == [g.token_ids for g in base]
