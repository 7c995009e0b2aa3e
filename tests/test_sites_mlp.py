"""The mlp_in / mlp_out streams: what the block's MLP reads and what it adds to the residual, on tiny random models."""

from __future__ import annotations

import pytest
import torch

from thoughtscope.models import tiny_model
from thoughtscope.sites import STREAMS, Site, SiteError, capture, edit, mlp_module, parse_sites

pytestmark = pytest.mark.usefixtures("one_thread")

# (architecture, attention module, the norm the MLP reads through)
ARCHS = [("llama", "self_attn", "post_attention_layernorm"), ("gpt2", "attn", "ln_2")]


def _ids(vocab: int = 64) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 10), generator=torch.Generator().manual_seed(0))


def _attn_out(lm, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """What block `layer`'s attention adds to the residual, read by a hook of this test's own."""
    got = {}
    block = lm.layers[layer]
    attn = getattr(block, "self_attn", None) or block.attn
    h = attn.register_forward_hook(lambda m, a, o: got.setdefault("a", (o[0] if isinstance(o, tuple) else o).detach()))
    try:
        with torch.no_grad():
            lm.model(input_ids=ids, use_cache=False)
    finally:
        h.remove()
    return got["a"]


def test_streams_parse_and_resid_stays_the_default():
    assert {"resid", "mlp_in", "mlp_out"} <= set(STREAMS)
    assert Site(3) == Site.parse("resid.3") and str(Site.parse("mlp_out.2")) == "mlp_out.2"
    assert [str(s) for s in parse_sites("mlp_in.1,resid.0,mlp_out.1")] == ["resid.0", "mlp_in.1", "mlp_out.1"]
    with pytest.raises(SiteError, match="unknown stream 'mlp'"):
        Site.parse("mlp.1")


@pytest.mark.parametrize(("arch", "attn", "norm"), ARCHS)
def test_residual_is_input_plus_attention_plus_mlp_out(arch, attn, norm):
    lm = tiny_model(arch, d_model=32, n_layers=3, vocab=64)
    ids = _ids()
    L = 1
    got = capture(lm, ["resid.0", f"resid.{L}", f"mlp_in.{L}", f"mlp_out.{L}"], ids)
    h_in, resid = got[Site(0)], got[Site(L)]
    attn_out = _attn_out(lm, L, ids)
    mlp_in, mlp_out = got[Site(L, "mlp_in")], got[Site(L, "mlp_out")]
    torch.testing.assert_close(h_in + attn_out + mlp_out, resid, atol=1e-5, rtol=1e-5)
    block = lm.layers[L]
    with torch.no_grad():
        torch.testing.assert_close(getattr(block, norm)(h_in + attn_out), mlp_in, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mlp_module(block)(mlp_in), mlp_out, atol=1e-5, rtol=1e-5)
    assert mlp_in.shape == mlp_out.shape == (2, 10, 32)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_editing_mlp_out_replaces_what_the_mlp_writes(arch):
    lm = tiny_model(arch, d_model=32, n_layers=2, vocab=64)
    ids = _ids()
    before = capture(lm, ["resid.1", "mlp_out.1"], ids)
    with edit(lm, "mlp_out.1", torch.zeros_like):
        zeroed = capture(lm, ["resid.1", "mlp_out.1"], ids)
    torch.testing.assert_close(zeroed[Site(1)], before[Site(1)] - before[Site(1, "mlp_out")], atol=1e-5, rtol=1e-5)
    # in place, returning None, and the MLP input edit: the MLP then reads the new input
    with edit(lm, "mlp_in.1", lambda x: x.mul_(0.0)):
        out = capture(lm, ["mlp_out.1"], ids)[Site(1, "mlp_out")]
    with torch.no_grad():
        ref = mlp_module(lm.layers[1])(torch.zeros(2, 10, 32))
    torch.testing.assert_close(out, ref)
    after = capture(lm, ["resid.1"], ids)[Site(1)]  # hooks are gone
    torch.testing.assert_close(after, before[Site(1)])


def test_early_exit_and_a_model_without_an_mlp():
    lm = tiny_model("llama", d_model=32, n_layers=3, vocab=64)
    calls = []
    h = lm.layers[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        capture(lm, "mlp_in.1", _ids())
    finally:
        h.remove()
    assert not calls  # stopped after block 1
    mlp = lm.layers[0].mlp
    del lm.layers[0].mlp
    try:
        with pytest.raises(SiteError, match="cannot find the MLP of block 0"):
            capture(lm, "mlp_out.0", _ids())
    finally:
        lm.layers[0].mlp = mlp
    with pytest.raises(SiteError, match="returned shape"), edit(lm, "mlp_out.0", lambda x: x[:, :1]):
        capture(lm, "resid.0", _ids())


def test_gemma3_mlp_out_is_after_its_post_mlp_norm():
    """Gemma 3 norms the MLP's output before adding it: mlp_out is what is added, mlp_in what the MLP reads."""
    transformers = pytest.importorskip("transformers")
    from thoughtscope.models import LoadedModel, byte_tokenizer

    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=8, max_position_embeddings=64, sliding_window=16,
    )  # fmt: skip
    lm = LoadedModel(transformers.Gemma3ForCausalLM(cfg).float(), byte_tokenizer(64), "tiny-gemma3")
    ids = _ids()
    got = capture(lm, ["resid.0", "resid.1", "mlp_in.1", "mlp_out.1"], ids)
    block = lm.layers[1]
    with torch.no_grad():
        attn = block.post_attention_layernorm(_attn_out(lm, 1, ids))
        mid = got[Site(0)] + attn
        torch.testing.assert_close(block.pre_feedforward_layernorm(mid), got[Site(1, "mlp_in")], atol=1e-5, rtol=1e-5)
        out = block.post_feedforward_layernorm(block.mlp(got[Site(1, "mlp_in")]))
    torch.testing.assert_close(out, got[Site(1, "mlp_out")], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mid + out, got[Site(1)], atol=1e-5, rtol=1e-5)
