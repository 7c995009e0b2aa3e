"""Attribution graphs on the default model with the shipped transcoder set (slow: the real model)."""

from __future__ import annotations

import pytest

from thoughtscope.causal import attribution_graph as ag
from thoughtscope.causal.graph_check import prompt_check
from thoughtscope.causal.influence import graph_scores
from thoughtscope.models import load_model
from thoughtscope.sae.transcoder_set import default_transcoders_path, load_transcoder_set

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def lm_and_set():
    if not default_transcoders_path().is_dir():
        pytest.skip("the shipped transcoder set is not installed")
    lm = load_model("default")
    return lm, load_transcoder_set("default", lm=lm)


def test_a_graph_of_the_default_model_explains_its_answer(lm_and_set):
    lm, ts = lm_and_set
    assert len(ts) == len(lm.layers) and ts.d_model == lm.d_model
    g = ag.build(lm, ts, "The Eiffel Tower is in the city of", cfg=ag.GraphConfig(max_feature_nodes=256))
    top = lm.tokenizer.decode([int(g.logit_tokens[0])])
    assert top == " Paris" and float(g.logit_probabilities[0]) > 0.3  # the replacement forward reproduced the logits
    rep, comp = graph_scores(g)
    assert 0 < rep < 1 and 0.3 < comp <= 1
    check = prompt_check(lm, ts, g, k=5, n_direct=10)
    assert check["drop_top_frozen"] > check["drop_random_frozen"]
