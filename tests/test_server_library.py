"""The library pieces the web workbench calls: lockstep lanes (steer.stream_lanes) and the analyzer."""

from __future__ import annotations

import pytest
import torch
from helpers.atlas_fixtures import PLANT, PLANT_CHAR, identity_model, planted_sae

from thoughtscope.analyzer import AnalyzerError, analyze_text, chat_text, compare_texts
from thoughtscope.models import tiny_model
from thoughtscope.steer import (
    GenerationConfig,
    Lane,
    SteerError,
    add_vector,
    generate,
    stream_lanes,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", d_model=32, n_layers=2, seed=3)


def _collect(events):
    out: dict[str, list] = {}
    order = []
    for name, ev in events:
        out.setdefault(name, []).append(ev)
        order.append(name)
    return out, order


def test_lanes_reproduce_generate_token_for_token(lm):
    torch.manual_seed(0)
    vec = torch.randn(lm.d_model) * 4
    ivs = [add_vector(vec, "resid.0")]
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.8, seed=7, stop_at_eos=False)
    out, order = _collect(
        stream_lanes(lm, "abc def", [Lane("steered", ivs), Lane("plain"), Lane("told", system="talk about cats")], cfg)
    )
    assert order[:3] == ["steered", "plain", "told"]  # the steered lane's first token comes first
    steered = generate(lm, ["abc def"], ivs, cfg)[0]
    plain = generate(lm, ["abc def"], (), cfg)[0]
    told = generate(lm, ["talk about cats\n\nabc def"], (), cfg)[0]  # no chat template: the instruction leads
    assert [e.token_id for e in out["steered"]] == steered.token_ids
    assert [e.token_id for e in out["plain"]] == plain.token_ids
    assert [e.token_id for e in out["told"]] == told.token_ids
    assert "".join(e.text for e in out["steered"]) == steered.text
    assert steered.token_ids != plain.token_ids and out["steered"][-1].done


def test_lanes_validate_first_and_stop_early(lm):
    with pytest.raises(SteerError, match="beyond"):
        stream_lanes(lm, "hi", [Lane("bad", [add_vector(torch.ones(lm.d_model), "resid.9")])])
    with pytest.raises(SteerError, match="differ"):
        stream_lanes(lm, "hi", [Lane("a"), Lane("a")])
    with pytest.raises(SteerError, match="context window"):
        stream_lanes(lm, "x" * 250, [Lane("a")], GenerationConfig(max_new_tokens=20))
    calls = []

    def stop():
        return len(calls) >= 5

    for name, _ in stream_lanes(
        lm, "hi", [Lane("a"), Lane("b")], GenerationConfig(max_new_tokens=30, stop_at_eos=False), should_stop=stop
    ):
        calls.append(name)
    assert len(calls) == 5


@pytest.fixture(scope="module")
def planted():
    lm = identity_model()
    return lm, planted_sae(lm)


def test_analyzer_finds_the_planted_feature_and_reconstruction_error(planted):
    lm, sae = planted
    a = analyze_text(lm, sae, "a quiet queen sat", k=3, features=[PLANT])
    q = [i for i, t in enumerate(a.tokens) if t == PLANT_CHAR]
    assert q and all(a.top[i][0][0] == PLANT for i in q)
    assert all(a.chosen[PLANT][i] > 0 for i in q) and a.chosen[PLANT][0] == 0
    assert a.excluded == [0] and len(a.recon_error) == len(a.tokens) == len(a.token_ids)
    # the error is ‖x − x̂‖² / ‖x‖² of the SAE's own reconstruction
    from thoughtscope.models import Site, capture

    ids, mask = lm.tokenize("a quiet queen sat")
    x = capture(lm, ["resid.1"], ids, mask)[Site.parse("resid.1")][0]
    with torch.no_grad():
        ref = ((x - sae.decode(sae.encode(x))).pow(2).sum(-1) / x.pow(2).sum(-1)).tolist()
    assert a.recon_error == pytest.approx(ref, rel=1e-4, abs=1e-6)
    assert a.peaks[0][0] == PLANT and a.tokens[a.peaks[0][2]] == PLANT_CHAR


def test_compare_texts_ranks_the_feature_that_differs(planted):
    lm, sae = planted
    rows = compare_texts(lm, sae, "a quiet queen", "a calm king", k=5)
    assert rows[0]["feature"] == PLANT and rows[0]["diff"] == pytest.approx(1.0)
    assert rows[0]["peak_b"] == 0
    back = compare_texts(lm, sae, "a calm king", "a quiet queen", k=5)
    assert back[0]["feature"] == PLANT and back[0]["diff"] == pytest.approx(-1.0)


def test_analyzer_bad_inputs(planted):
    lm, sae = planted
    with pytest.raises(AnalyzerError, match="empty"):
        analyze_text(lm, sae, "   ")
    with pytest.raises(AnalyzerError, match="out of range"):
        analyze_text(lm, sae, "abc", features=[10_000])
    with pytest.raises(AnalyzerError, match="limit is 4"):
        analyze_text(lm, sae, "abcdefgh", max_text_tokens=4)
    with pytest.raises(AnalyzerError, match="max_act has"):
        compare_texts(lm, sae, "a", "b", max_act=[1.0, 2.0])


def test_chat_transcript_goes_through_the_chat_template():
    lm = tiny_model("llama", d_model=32, n_layers=2, seed=5)
    with pytest.raises(AnalyzerError, match="no chat template"):
        chat_text(lm, "User: hi")
    lm.tokenizer.chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}"
    out = chat_text(lm, "hello first\nUser: hi there\nand more\nASSISTANT: fine\nSystem: be brief\nnote: kept")
    assert out == "[user]hello first\n[user]hi there\nand more\n[assistant]fine\n[system]be brief\nnote: kept\n"
    with pytest.raises(AnalyzerError, match="no turns"):
        chat_text(lm, "User:\nAssistant:   ")
