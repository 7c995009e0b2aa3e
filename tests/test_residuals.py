"""The token panel's shared reading of a text: the blocks the analyzer ran are reused, the rest run once with the
SAE spliced in, and every answer drawn from that reading (residuals, logits, attribution) equals a fresh pass."""

from __future__ import annotations

import pytest
import torch

from thoughtscope.analyzer import analyze_text
from thoughtscope.causal.attribution import attribute
from thoughtscope.causal.lens import lens_column
from thoughtscope.causal.residuals import ResidualCache, read_residuals, readout
from thoughtscope.models import LoadedModel, byte_tokenizer, tiny_model
from thoughtscope.sae import SAE, SAEConfig
from thoughtscope.sites import Site, capture

TEXT = "hello there, you quiet queen"


def _gemma3() -> LoadedModel:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * 2,
    )  # fmt: skip
    return LoadedModel(transformers.Gemma3ForCausalLM(cfg).float().eval(), byte_tokenizer(256), "tiny-gemma3")


def _model(arch: str) -> LoadedModel:
    return _gemma3() if arch == "gemma3" else tiny_model(arch, d_model=32, n_layers=4, seed=3)


def _sae(lm: LoadedModel, site: str = "resid.1") -> SAE:
    torch.manual_seed(0)
    cfg = SAEConfig(d_model=lm.d_model, n_features=48, arch="topk", k=6, site=site, exclude_bos=True)
    return SAE.from_config(cfg).eval().requires_grad_(False)


class Calls:
    """Counts the MLP calls of each block: a block answering from the cache does not run its MLP."""

    def __init__(self, lm):
        self.n = [0] * len(lm.layers)
        self.hooks = [b.mlp.register_forward_hook(self._counter(i)) for i, b in enumerate(lm.layers)]

    def _counter(self, i):
        def hook(*_):
            self.n[i] += 1

        return hook

    def take(self) -> list[int]:
        n, self.n = self.n, [0] * len(self.n)
        return n

    def remove(self):
        for h in self.hooks:
            h.remove()


def _same_attribution(a, b) -> None:
    assert a.tokens == b.tokens and a.metric == pytest.approx(b.metric, abs=1e-4)
    assert set(a.total) == set(b.total)
    for k in a.total:
        assert a.total[k] == pytest.approx(b.total[k], rel=1e-4, abs=1e-5)
    assert a.error == pytest.approx(b.error, rel=1e-4, abs=1e-5)
    assert [[f for f, _ in r] for r in a.per_position] == [[f for f, _ in r] for r in b.per_position]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox", "gemma", "gemma3"])
def test_the_panel_reuses_the_analyzers_blocks_and_answers_as_a_fresh_pass(arch):
    lm = _model(arch)
    sae = _sae(lm)
    ids, _ = lm.tokenize([TEXT])
    last = ids.shape[1] - 1
    cache = ResidualCache(sae)
    calls = Calls(lm)
    try:
        with cache.record(lm):
            analyze_text(lm, sae, TEXT, k=4)
        assert calls.take() == [1, 1, 0, 0] and cache.held_blocks(lm, ids) == 2  # early exit after the SAE's block
        col = lens_column(lm, TEXT, last, k=3, cache=cache)
        assert calls.take() == [0, 0, 1, 1]  # only the blocks above the site ran
        want = read_residuals(lm, ids, grad=False)
        got = cache.residuals(lm, ids)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        fresh = lens_column(lm, TEXT, last, k=3)
        assert col["model_top1_id"] == fresh["model_top1_id"]
        assert [[t for t, _ in r] for r in col["layers"]] == [[t for t, _ in r] for r in fresh["layers"]]
        target = col["model_top1_id"]
        calls.take()
        for pos in (last, last // 2):
            why = attribute(lm, sae, TEXT, target, check=0, pos=pos, cache=cache)
            assert calls.take() == [0, 0, 0, 0]  # one backward pass through the kept graph, no forward
            _same_attribution(why, attribute(lm, sae, TEXT, target, check=0, pos=pos))
            calls.take()
        checked = attribute(lm, sae, TEXT, target, check=6, pos=last, cache=cache)
        plain = attribute(lm, sae, TEXT, target, check=6, pos=last)
        assert checked.ablation == pytest.approx(plain.ablation, rel=1e-4, abs=1e-4)
    finally:
        calls.remove()


def test_without_the_analyzer_the_panel_reads_the_text_itself():
    lm = _model("llama")
    sae = _sae(lm, "resid.2")
    ids, _ = lm.tokenize([TEXT])
    cache = ResidualCache(sae)
    why = attribute(lm, sae, TEXT, "q", "z", check=0, cache=cache)  # no analyzer pass, no lens click: read now
    _same_attribution(why, attribute(lm, sae, TEXT, "q", "z", check=0))
    for g, w in zip(cache.residuals(lm, ids), read_residuals(lm, ids, grad=False), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    plain = ResidualCache()  # no SAE: residuals only, and no graph to attribute through
    assert len(plain.residuals(lm, ids)) == lm.n_layers
    with pytest.raises(ValueError, match="no attribution graph"):
        plain.spliced(lm, ids)
    other = attribute(lm, _sae(lm, "resid.2"), TEXT, "q", check=0, cache=cache)  # another SAE: its own pass
    assert other.site == "resid.2"


def test_a_batch_or_a_failed_pass_keeps_nothing():
    lm = _model("llama")
    sae = _sae(lm)
    ids, _ = lm.tokenize([TEXT])
    cache = ResidualCache(sae)
    with cache.record(lm):
        capture(lm, [Site(1)], ids.expand(2, -1))
    assert cache.held_blocks(lm, ids) == 0
    with pytest.raises(RuntimeError, match="boom"), cache.record(lm):
        capture(lm, [Site(1)], ids)
        raise RuntimeError("boom")
    assert cache.held_blocks(lm, ids) == 0
    with cache.record(lm):
        capture(lm, [Site(1)], ids)
    assert cache.held_blocks(lm, ids) == 2
    other, _ = lm.tokenize([TEXT + "!"])
    assert cache.held_blocks(lm, other) == 0  # another text is read afresh
    for g, w in zip(cache.residuals(lm, other), read_residuals(lm, other, grad=False), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    cache.clear()
    assert cache.held_blocks(lm, other) == 0


def test_readout_is_the_models_own_head_soft_cap_included():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, final_logit_softcapping=2.0,
    )  # fmt: skip
    lm = LoadedModel(transformers.Gemma2ForCausalLM(cfg).float().eval(), byte_tokenizer(256), "tiny-gemma2")
    ids, _ = lm.tokenize([TEXT])
    hs = read_residuals(lm, ids, grad=False)
    with torch.inference_mode():
        want = lm.model(ids).logits[0]
        got = readout(lm, hs[-1][0])
    assert want.abs().max() <= 2.0 and got.abs().max() <= 2.0
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_long_reading_keeps_no_graph_until_attribution_asks():
    lm = _model("llama")
    sae = _sae(lm)
    ids, _ = lm.tokenize([TEXT])
    cache = ResidualCache(sae, max_graph_tokens=ids.shape[1] - 1)
    calls = Calls(lm)
    try:
        with cache.record(lm):
            analyze_text(lm, sae, TEXT, k=4)
        calls.take()
        hs = cache.residuals(lm, ids)  # the lens: the blocks above the site run once, without a graph
        assert calls.take() == [0, 0, 1, 1] and cache._spliced is None
        for g, w in zip(hs, read_residuals(lm, ids, grad=False), strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        calls.take()
        why = attribute(lm, sae, TEXT, "q", check=0, cache=cache)  # asked for: the graph is built now
        assert calls.take() == [0, 0, 1, 1] and cache._spliced is not None
        _same_attribution(why, attribute(lm, sae, TEXT, "q", check=0))
    finally:
        calls.remove()
