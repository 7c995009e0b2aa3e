"""Sites, capture/edit hooks and early exit on tiny random models of several families."""

import pytest
import torch

from thoughtscope.models import (
    ModelError,
    Site,
    SiteError,
    capture,
    edit,
    find_layers,
    load_model,
    parse_sites,
    tiny_model,
)

ARCHS = ["llama", "gpt2", "gpt_neox", "qwen2", "gemma"]


@pytest.fixture(scope="module", params=ARCHS)
def lm(request):
    return tiny_model(request.param, n_layers=3, d_model=32)


def _ids(lm, batch=2, length=12):
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, lm.vocab_size, (batch, length), generator=g)


def test_site_parse_roundtrip():
    s = Site.parse("resid.15")
    assert s == Site(15) and str(s) == "resid.15"
    assert parse_sites("resid.3,resid.1") == [Site(1), Site(3)]
    for bad in ["resid", "mlp.x", "15", "resid.-1", ""]:
        with pytest.raises(SiteError, match="site|stream"):
            Site.parse(bad)
    with pytest.raises(SiteError, match="unknown stream 'attn'"):
        Site.parse("attn.2")


def test_capture_equals_hidden_states(lm):
    ids = _ids(lm)
    with torch.no_grad():
        hs = lm.model(ids, output_hidden_states=True).hidden_states
    # hidden_states[-1] has the final norm applied in transformers, so compare the blocks before the last
    got = capture(lm, ["resid.0", "resid.1"], ids)
    for layer in (0, 1):
        torch.testing.assert_close(got[Site(layer)], hs[layer + 1], rtol=0, atol=0)


def test_early_exit_computes_no_later_layer(lm):
    calls = [0] * lm.n_layers
    handles = [
        b.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, b in enumerate(lm.layers)
    ]
    head_calls = []
    handles.append(lm.unembed.register_forward_hook(lambda *a: head_calls.append(1)))
    try:
        capture(lm, "resid.0", _ids(lm))
    finally:
        for h in handles:
            h.remove()
    assert calls == [1] + [0] * (lm.n_layers - 1)
    assert head_calls == []


def test_edit_changes_logits_and_is_removed(lm):
    ids = _ids(lm)
    before = [len(b._forward_hooks) for b in lm.layers]
    with torch.no_grad():
        clean = lm.model(ids).logits
        with edit(lm, "resid.1", lambda h: h + 5.0):
            edited = lm.model(ids).logits
            inner = capture(lm, "resid.1", ids)[Site(1)]
        after = lm.model(ids).logits
        hs = lm.model(ids, output_hidden_states=True).hidden_states
    assert not torch.allclose(clean, edited)
    torch.testing.assert_close(inner, hs[2] + 5.0)
    assert torch.equal(clean, after)
    assert [len(b._forward_hooks) for b in lm.layers] == before


def test_edit_in_place_and_error_cleanup():
    lm = tiny_model("llama")
    ids = _ids(lm)
    before = len(lm.layers[0]._forward_hooks)

    def zero(h):
        h.zero_()

    with torch.no_grad():
        with edit(lm, "resid.0", zero):
            got = capture(lm, "resid.0", ids)[Site(0)]
        assert torch.count_nonzero(got) == 0
        with pytest.raises(RuntimeError), edit(lm, "resid.0", lambda h: h):
            raise RuntimeError("boom")
    assert len(lm.layers[0]._forward_hooks) == before
    with (
        pytest.raises(SiteError, match="expected \\(2, 12, 64\\)"),
        torch.no_grad(),
        edit(lm, "resid.0", lambda h: h[:, :1]),
    ):
        lm.model(ids)


def test_site_beyond_model():
    lm = tiny_model("gpt2", n_layers=2)
    with pytest.raises(SiteError, match="resid.5 is beyond .* 2 blocks"):
        capture(lm, "resid.5", _ids(lm))


def test_unsupported_model_names_class():
    class Odd(torch.nn.Module):
        config = type("C", (), {"num_hidden_layers": 3})()

    with pytest.raises(ModelError, match="Odd"):
        find_layers(Odd())


def test_load_model_missing_folder():
    with pytest.raises(ModelError, match="model folder not found: ./nope"):
        load_model("./nope")


def test_load_model_from_saved_folder(tmp_path):
    lm = tiny_model("llama")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    ids = _ids(lm)
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, again.model(ids).logits)


def test_tokenize_adds_bos_once():
    lm = tiny_model("llama")
    ids, mask = lm.tokenize(["ab", "abcd"])
    assert ids.shape == (2, 5) and ids[0, 0] == lm.tokenizer.bos_token_id and mask[0].tolist() == [1, 1, 1, 0, 0]


@pytest.mark.slow
def test_default_model_loads_and_captures():
    lm = load_model("default")
    assert lm.n_layers == 30 and lm.d_model == 576
    ids, mask = lm.tokenize("The Golden Gate Bridge is")
    acts = capture(lm, "resid.15", ids, mask)[Site(15)]
    assert acts.shape == (1, ids.shape[1], 576)
    assert lm.tokenizer.chat_template
