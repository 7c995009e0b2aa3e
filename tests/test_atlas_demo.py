"""The demo's atlas stage and the skip_tokens option it relies on, on a tiny model with a planted feature."""

from __future__ import annotations

import io

import pytest
import torch
from helpers.atlas_fixtures import (
    PLANT,
    identity_model,
    one_thread,
    planted_sae,
    write_corpus,
)
from rich.console import Console

from thoughtscope.atlas import Atlas, AtlasConfig, AtlasError, build_atlas
from thoughtscope.corpus import Corpus
from thoughtscope.demo.atlas import demo_feature_cards


@pytest.fixture(scope="module", autouse=True)
def _threads():
    with one_thread():
        yield


def test_skip_tokens_starts_later_in_the_corpus(tmp_path):
    lm = identity_model()
    sae = planted_sae(lm)
    corpus = Corpus(str(write_corpus(tmp_path / "c.txt", n_docs=80)))
    cfg = dict(
        n_tokens=256, ctx_len=32, contexts_per_batch=4, top_k=4, n_bins=2, per_bin=2, window_left=4, window_right=2
    )
    with pytest.raises(
        AtlasError,
        match="AtlasConfig.skip_tokens must be a non-negative multiple of contexts_per_batch × ctx_len = 128, got 100",
    ):
        AtlasConfig(**cfg, skip_tokens=100)
    path = build_atlas(lm, sae, corpus, tmp_path / "a", AtlasConfig(**cfg, skip_tokens=256), progress=False)
    expected = torch.cat([b.input_ids for b in corpus.batches(lm.tokenizer, 32, 4)])[8:16]
    with Atlas.open(path) as at:
        assert at.meta["config"]["skip_tokens"] == 256 and at.meta["n_contexts"] == 8
        for c in at.random_contexts():
            assert at.context(c) == expected[c].tolist()


def test_demo_feature_cards_on_a_tiny_model(tmp_path):
    lm = identity_model()
    sae = planted_sae(lm)
    corpus = Corpus(str(write_corpus(tmp_path / "c.txt", n_docs=200)))
    console = Console(record=True, width=120, file=io.StringIO())
    res = demo_feature_cards(
        lm,
        tmp_path,
        console,
        sae=sae,
        corpus=corpus,
        tokens=2048,
        skip_tokens=2048,
        prompts=["a quiet queen", "the quest is equal", "quick squad"],
        controls=["the sun is up", "run under a blue sun", "a unit of rum"],
        concept="q",
    )
    text = console.export_text()
    assert "3. feature atlas" in text
    assert len(res["random"]) == 2 and all(f"#{n}" in text for n in res["random"])
    assert res["contrast"][0]["feature"] == PLANT and f"#{PLANT}" in text
    assert res["n_tokens"] > 0 and (tmp_path / "atlas" / "atlas.sqlite").is_file()
