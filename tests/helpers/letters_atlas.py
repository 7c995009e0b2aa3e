"""A tiny atlas whose features fire on known letters: the planted-letters SAE over the identity model, its corpus,
and the module-scoped `planted` fixture (the offline explainer's, the explain CLI's and the report's tests)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from helpers.atlas_fixtures import identity_model, one_thread, token_id
from thoughtscope.atlas import AtlasConfig, ExplainConfig, build_atlas
from thoughtscope.corpus import Corpus
from thoughtscope.sae import SAE, SAEConfig

PLANTED = {2: "q", 5: "x", 7: "j", 11: "k", 13: "v"}  # feature -> the letter it fires on
CFG = ExplainConfig(n_top=6, n_quantile=8, n_score_pos=12, n_score_neg=12)
FILLER = "the cat sat on a mat and the dog ran far away from home while birds sang in warm light".split()
RARE = ["quiet", "queen", "box", "fox", "jam", "joy", "kit", "ask", "vow", "ivy"]


def planted_letters_sae(lm, n_features: int = 16) -> SAE:
    """A topk SAE whose features in PLANTED fire on exactly their letter (pre-activation 20 there, < 0 elsewhere)."""
    cfg = SAEConfig(arch="topk", d_model=lm.d_model, n_features=n_features, k=4, model=lm.name, site="resid.1")
    sae = SAE.from_config(cfg, seed=0)
    E = lm.model.get_input_embeddings().weight.detach()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        sae.enc.mul_(0.01)
        for f, ch in PLANTED.items():
            e = E[token_id(lm, ch)]
            sae.enc[f] = 100.0 * e / e.pow(2).sum()
            sae.b_enc[f] = -80.0
            d = torch.randn(lm.d_model, generator=g)
            sae.W_dec[f] = d / d.norm()
    return sae


def write_letters_corpus(path: Path, n_docs: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n_docs):
            fh.write(
                " ".join(rng.choice(RARE if rng.random() < 0.06 else FILLER) for _ in range(rng.randint(10, 30)))
                + "\n\n\n"
            )
    return path


LETTERS_ATLAS = dict(
    n_tokens=16_384,
    ctx_len=32,
    contexts_per_batch=8,
    top_k=24,
    n_bins=5,
    per_bin=8,
    window_left=8,
    window_right=3,
    n_random_contexts=256,
)


def build_letters_atlas(lm, d: Path, **overrides) -> Path:
    """The letters corpus read through the planted-letters SAE into an atlas under d (LETTERS_ATLAS, overridden)."""
    corpus = Corpus(str(write_letters_corpus(d / "corpus.txt")))
    cfg = AtlasConfig(**{**LETTERS_ATLAS, **overrides})
    return build_atlas(lm, planted_letters_sae(lm), corpus, d / "atlas", cfg, progress=False)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    d = tmp_path_factory.mktemp("offline")
    with one_thread():
        lm = identity_model()
        sae = planted_letters_sae(lm)
        for f, ch in PLANTED.items():  # the plant really is what the SAE computes
            acts = sae.encode(lm.model.get_input_embeddings().weight.detach()[token_id(lm, ch)][None])[0]
            assert acts[f] > 0
        path = build_letters_atlas(lm, d)
    return lm, path, d
