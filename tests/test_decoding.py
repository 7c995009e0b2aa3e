"""The lean decode path gives transformers' tokens: every Llama-family layout (grouped-query attention, q/k/v
biases, q/k norms), padded batches, sampling, steering at every stream; the other families and foreign hooks
fall back to transformers' forward; int8 weights stay close; bad settings are refused."""

import pytest
import torch
import transformers

from thoughtscope.decoding import LeanDecoder, lean_reason
from thoughtscope.errors import ModelError
from thoughtscope.models import LoadedModel, byte_tokenizer, tiny_model
from thoughtscope.sae import SAE, SAEConfig
from thoughtscope.sites import edit
from thoughtscope.steer import GenerationConfig, SteerError, add_vector, clamp, generate

PROMPTS = ["hello there", "a much longer prompt, so the batch is padded", "x"]


def _lm(family: str, **extra) -> LoadedModel:
    """A tiny random model of one family, with grouped-query attention (4 query heads on 2 key/value heads)."""
    torch.manual_seed(0)
    cls = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}
    cfg = getattr(transformers, cls[family])(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, **extra,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg).float()
    return LoadedModel(model, byte_tokenizer(256), f"tiny-{family}")


FAMILIES = {
    "llama": {},
    "llama-biases": {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True},
    "mistral": {"sliding_window": None},
    "qwen2": {},  # q, k and v with biases
    "qwen3": {},  # q and k normed per head
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_lm(request):
    name = request.param
    return _lm(name.split("-")[0], **FAMILIES[name])


def _tokens(lm, prompts, ivs=(), **kw):
    cfg = GenerationConfig(**{"max_new_tokens": 12, "temperature": 0.0, "stop_at_eos": False, "chat": False, **kw})
    return [g.token_ids for g in generate(lm, prompts, ivs, cfg)]


def test_same_tokens_as_transformers_greedy_and_sampled(family_lm):
    assert lean_reason(family_lm.model) is None
    for kw in ({}, {"temperature": 0.9, "seed": 3}):
        for prompts in (PROMPTS, PROMPTS[:1]):  # a left-padded batch, and one prompt without padding
            assert _tokens(family_lm, prompts, decoder="lean", **kw) == _tokens(
                family_lm, prompts, decoder="transformers", **kw
            )


def test_same_tokens_as_model_generate(family_lm):
    """Against transformers' own `generate`, not only our loop over its forward."""
    lm = family_lm
    ids = torch.tensor([[1] + list(b"hello there")]).add(3).clamp_max(255)
    ids[0, 0] = 1
    with torch.inference_mode():
        ref = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                min_new_tokens=16, pad_token_id=0)[0, ids.shape[1]:].tolist()  # fmt: skip
        dec = LeanDecoder(lm.model, 1, ids.shape[1] + 16)
        logits = dec.prefill(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
        out = []
        for _ in range(16):
            t = logits.argmax(-1)
            out.append(int(t))
            logits = dec.step(t)
    assert out == ref


def _sae(d=64, site="resid.1"):
    sae = SAE.from_config(SAEConfig(arch="relu-l1", d_model=d, n_features=32, site=site), seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        sae.enc.copy_(torch.randn(32, d, generator=g))
        sae.W_dec.copy_(torch.randn(32, d, generator=g))
    return sae.eval().requires_grad_(False)


@pytest.mark.parametrize("site", ["resid.1", "mlp_in.0", "mlp_out.2"])
def test_steering_at_every_stream_same_tokens(site):
    lm = _lm("llama")
    vec = torch.randn(64, generator=torch.Generator().manual_seed(4)) * 3
    ivs = [add_vector(vec, site, 1.0), clamp(_sae(site=site), 3, 5.0, unit="raw")]
    lean = _tokens(lm, PROMPTS, ivs, decoder="lean")
    assert lean == _tokens(lm, PROMPTS, ivs, decoder="transformers")
    assert lean != _tokens(lm, PROMPTS, decoder="lean")  # the steering did something


def test_other_families_and_foreign_hooks_fall_back():
    gpt2 = tiny_model("gpt2")
    assert "gpt2" in lean_reason(gpt2.model)
    assert _tokens(gpt2, PROMPTS) == _tokens(gpt2, PROMPTS, decoder="transformers")  # auto: transformers' forward
    with pytest.raises(SteerError, match="lean decoder cannot run"):
        _tokens(gpt2, PROMPTS, decoder="lean")
    with pytest.raises(SteerError, match="weights='bf16' need the lean decoder, which cannot run .*weights='exact'"):
        _tokens(gpt2, PROMPTS, weights="bf16")
    lm = _lm("llama")
    attn = lm.model.model.layers[1].self_attn
    handle = attn.register_forward_hook(lambda m, a, o: (o[0] * 0.5, *o[1:]))
    try:
        assert "self_attn" in lean_reason(lm.model)
        hooked = _tokens(lm, PROMPTS)  # auto honours the hook through transformers' forward
    finally:
        handle.remove()
    assert hooked != _tokens(lm, PROMPTS)
    lm.model.train()
    try:
        assert lean_reason(lm.model) == "the model is in training mode"
    finally:
        lm.model.eval()


def test_transformers_output_recorders_do_not_turn_the_lean_path_off():
    """A call asking for hidden states and attentions leaves transformers' (inactive) recorder hooks on every block
    and attention module for good; they must not send later generation back to transformers' forward."""
    lm = _lm("llama")
    before = _tokens(lm, PROMPTS, decoder="lean")
    with torch.inference_mode():
        lm.model.model.config._attn_implementation = "eager"
        lm.model(torch.ones(1, 4, dtype=torch.long), output_hidden_states=True, output_attentions=True)
        lm.model.model.config._attn_implementation = "sdpa"
    assert lm.model.model.layers[0].self_attn._forward_hooks  # they are there
    assert lean_reason(lm.model) is None
    assert _tokens(lm, PROMPTS, decoder="lean") == before == _tokens(lm, PROMPTS, decoder="transformers")


def test_mistral_sliding_window_reached_falls_back():
    lm = _lm("mistral", sliding_window=8)
    assert "sliding-window" in lean_reason(lm.model, max_len=64)
    assert lean_reason(lm.model, max_len=8) is None
    assert _tokens(lm, PROMPTS[:1]) == _tokens(lm, PROMPTS[:1], decoder="transformers")


def test_weights_changed_in_place_are_read_again():
    lm = _lm("llama")
    before = _tokens(lm, PROMPTS, decoder="lean")
    with torch.no_grad():
        lm.model.model.layers[0].self_attn.v_proj.weight.mul_(-8.0)  # part of the fused q/k/v copy
    after = _tokens(lm, PROMPTS, decoder="lean")
    assert after == _tokens(lm, PROMPTS, decoder="transformers")
    assert after != before


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_low_precision_weights_stay_close(precision):
    lm = _lm("llama")
    ids = torch.tensor([[1, 40, 50, 60, 70, 80, 90]])
    args = (ids, torch.ones_like(ids), torch.arange(7)[None])
    with torch.inference_mode():
        exact = LeanDecoder(lm.model, 1, 8).prefill(*args, every=True)
        low = LeanDecoder(lm.model, 1, 8, precision=precision).prefill(*args, every=True)
    assert low.shape == exact.shape and low.dtype == exact.dtype
    rel = (low - exact).norm() / exact.norm()
    assert 0 < rel < 0.05, rel
    batch = _tokens(lm, PROMPTS, weights=precision)
    assert [len(t) for t in batch] == [12] * len(PROMPTS)


def test_bad_settings_are_refused():
    with pytest.raises(SteerError, match="decoder must be one of"):
        GenerationConfig(decoder="fast")
    with pytest.raises(SteerError, match="weights must be one of"):
        GenerationConfig(weights="int4")
    with pytest.raises(SteerError, match="needs the lean decoder"):
        GenerationConfig(weights="int8", decoder="transformers")
    lm = _lm("llama")
    with pytest.raises(ModelError, match="unknown decode precision"):
        LeanDecoder(lm.model, 1, 8, precision="fp4")
    dec = LeanDecoder(lm.model, 1, 4)
    with torch.inference_mode(), pytest.raises(ModelError, match="does not fit"):
        dec.prefill(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with torch.inference_mode():
        dec.prefill(torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4), torch.arange(4)[None])
        with pytest.raises(ModelError, match="holds 4 tokens"):
            dec.step(torch.ones(1, 1, dtype=torch.long))


def test_edit_hooks_are_called_with_the_blocks_arguments():
    """A plain `sites.edit` (not a Steerer) sees the same activations in both paths."""
    lm = _lm("llama")
    seen = {}
    for decoder in ("lean", "transformers"):
        got = []

        def fn(h, got=got):
            got.append(h.clone())

        with edit(lm, "resid.1", fn):
            _tokens(lm, PROMPTS[:1], decoder=decoder)
        seen[decoder] = got
    assert len(seen["lean"]) == len(seen["transformers"]) == 12
    for a, b in zip(seen["lean"], seen["transformers"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
def test_default_model_same_tokens_as_generate():
    from thoughtscope.models import load_model

    lm = load_model("default")
    prompts = ["Tell me a short story.", "What is the capital of France?", "Write a haiku about the sea."]
    lean = _tokens(lm, prompts, max_new_tokens=48, chat=True, decoder="lean")
    assert lean == _tokens(lm, prompts, max_new_tokens=48, chat=True, decoder="transformers")
    from thoughtscope.steer.generate import format_prompt

    ids = torch.tensor([format_prompt(lm, prompts[0])])
    with torch.inference_mode():
        ref = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, min_new_tokens=48,
                                do_sample=False)[0, ids.shape[1]:].tolist()  # fmt: skip
    ours = _tokens(lm, prompts[:1], max_new_tokens=48, chat=True)[0]
    cut = next((i for i, t in enumerate(ours) if t == lm.tokenizer.eos_token_id), len(ours))  # min_new_tokens
    assert ours[:cut] == ref[:cut] and cut > 20  # masks the end token in generate, so compare up to it


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lora_adapters_give_peft_tokens(family):
    """A plain LoRA adapter (the NLA's) is run with peft's own operations, so the tokens are peft's; a layer the
    lean path cannot run (dropout in the adapter) keeps transformers' forward."""
    from peft import LoraConfig, inject_adapter_in_model

    lm = _lm(family)
    targets = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    inject_adapter_in_model(LoraConfig(r=4, target_modules=targets, init_lora_weights=False), lm.model)
    assert lean_reason(lm.model) is None
    plain = _lm(family)
    for kw in ({}, {"temperature": 0.9, "seed": 1}):
        lean = _tokens(lm, PROMPTS, decoder="lean", **kw)
        assert lean == _tokens(lm, PROMPTS, decoder="transformers", **kw)
        assert lean != _tokens(plain, PROMPTS, decoder="lean", **kw)  # the adapter counts
    dropped = _lm(family)
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.1), dropped.model)
    assert "dropout" in lean_reason(dropped.model)
    assert _tokens(dropped, PROMPTS) == _tokens(dropped, PROMPTS, decoder="transformers")


@pytest.mark.slow
def test_generate_benchmark_quick_names_its_keys_and_checks_the_tokens(tmp_path):
    """benchmarks/generate.py --quick on the default model: every key the issue names, and the same tokens as
    transformers' generate at batch 1 and 24 and in the equalizer's lanes."""
    import json

    import generate as bench  # benchmarks/ is on the test path (pyproject: pythonpath)

    out = tmp_path / "g.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for key in ("steered_vs_plain", "batch24_vs_generate", "int8_perplexity_ratio", "equalizer_speedup"):
        assert res[key] > 0, key
    assert res["exact_same_tokens"] and res["batch24_same_tokens"] and res["equalizer_same_answers"]
    assert 0.95 < res["int8_perplexity_ratio"] < 1.1
    if "llama.cpp not run" not in res["peer"]:
        assert res["batch1_vs_llamacpp_f32"] > 0 and res["batch1_vs_llamacpp_q4"] > 0
