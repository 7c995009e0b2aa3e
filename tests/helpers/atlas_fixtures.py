"""Shared fixtures for the atlas tests: a tiny model whose residual stream is its embedding, and a planted SAE."""

from __future__ import annotations

import functools
import random
from pathlib import Path

import torch

from helpers import single_thread
from thoughtscope.models import tiny_model
from thoughtscope.sae import SAE, SAEConfig

PLANT = 3  # the planted feature id
PLANT_CHAR = "q"  # ... fires on exactly this token
OUT_CHAR = "z"  # its decoder direction promotes this token


@functools.cache
def identity_model(seed: int = 0):
    """A tiny llama whose blocks add nothing (attention and MLP outputs zeroed): resid.L == token embedding.

    Cached: the atlas test files share one instance (building a model is the slowest step on a busy machine).
    """
    lm = tiny_model("llama", d_model=32, n_layers=2, vocab=256, seed=seed)
    with torch.no_grad():
        for layer in lm.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        g = torch.Generator().manual_seed(seed + 1)
        lm.final_norm.weight.copy_(0.5 + torch.rand(lm.d_model, generator=g))
    return lm


def token_id(lm, ch: str) -> int:
    return int(lm.tokenizer.convert_tokens_to_ids(ch))


def planted_sae(lm, n_features: int = 24, k: int = 4, site: str = "resid.1") -> SAE:
    cfg = SAEConfig(arch="topk", d_model=lm.d_model, n_features=n_features, k=k, model=lm.name, site=site)
    sae = SAE.from_config(cfg, seed=0)
    E = lm.model.get_input_embeddings().weight.detach()
    U = lm.unembed.weight.detach()
    g = lm.final_norm.weight.detach()
    t_in, t_out = token_id(lm, PLANT_CHAR), token_id(lm, OUT_CHAR)
    with torch.no_grad():
        sae.enc.mul_(0.01)
        e = E[t_in]
        sae.enc[PLANT] = 100.0 * e / e.pow(2).sum()
        sae.b_enc[PLANT] = -60.0  # pre-activation 40 on the planted token, far below 0 elsewhere
        d = U[t_out] / g
        sae.W_dec[PLANT] = d / d.norm()
    return sae


WORDS = "the cat sat on a mat and the dog ran far away from home while birds sang in warm light".split()
Q_WORDS = "quick quiet queen quest request equal liquid unique aqua squad".split()


def write_corpus(path: Path, n_docs: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(n_docs):
            f.write(
                " ".join(rng.choice(Q_WORDS if rng.random() < 0.04 else WORDS) for _ in range(rng.randint(8, 30)))
                + "\n\n\n"
            )
    return path


one_thread = single_thread  # a context manager here, for the atlas tests that want it around a block
