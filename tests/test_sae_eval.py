"""The spliced language-model loss in bounded chunks, held-out text by default, and `sae eval` finding its model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from thoughtscope.models import tiny_model
from thoughtscope.sae import SAEConfig, build_sae
from thoughtscope.sae.metrics import default_chunk_tokens, spliced_lm_loss, spliced_losses
from thoughtscope.sites import edit

VOCAB = 300


@torch.no_grad()
def _reference(lm, site, ids, mask, fn, exclude_first=True):
    """Whole-batch logits, the plain formula: summed next-token loss over real targets and summed KL."""
    kw = {} if mask is None else {"attention_mask": mask}
    clean = lm.model(ids, **kw).logits.float()

    def hooked(acts):
        a = acts.float()
        new = fn(a)
        if exclude_first:
            new[:, 0] = a[:, 0]
        return new

    with edit(lm, site, hooked):
        spliced = lm.model(ids, **kw).logits.float()
    w = torch.ones(ids.shape[0], ids.shape[1] - 1) if mask is None else mask[:, 1:].float()
    tgt = ids[:, 1:]
    ce = F.cross_entropy(spliced[:, :-1].transpose(1, 2), tgt, reduction="none")
    ce0 = F.cross_entropy(clean[:, :-1].transpose(1, 2), tgt, reduction="none")
    lp0, lp = clean[:, :-1].log_softmax(-1), spliced[:, :-1].log_softmax(-1)
    kl = (lp0.exp() * (lp0 - lp)).sum(-1)
    n = float(w.sum())
    return float((ce * w).sum()) / n, float((ce0 * w).sum()) / n, float((kl * w).sum()) / n


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
def test_chunked_loss_equals_whole_batch_logits(arch):
    lm = tiny_model(arch, d_model=32, n_layers=2, vocab=VOCAB)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 14:] = 0  # a padded row: its padding is never a target
    sae = build_sae(SAEConfig(arch="topk", d_model=32, n_features=64, k=4))
    mean = torch.randn(32, generator=g)
    got = spliced_lm_loss(lm, sae, "resid.0", [(ids, mask)], mean_act=mean, chunk_tokens=7)

    l_sae, l_clean, kl_sae = _reference(lm, "resid.0", ids, mask, lambda a: sae(a)[1])
    l_mean, _, kl_mean = _reference(lm, "resid.0", ids, mask, lambda a: mean.expand_as(a).clone())
    l_zero, _, _ = _reference(lm, "resid.0", ids, mask, torch.zeros_like)
    assert got["loss_clean"] == pytest.approx(l_clean, rel=1e-5)
    assert got["loss_sae"] == pytest.approx(l_sae, rel=1e-5)
    assert got["loss_mean_ablated"] == pytest.approx(l_mean, rel=1e-5)
    assert got["loss_zero_ablated"] == pytest.approx(l_zero, rel=1e-5)
    assert got["kl_sae"] == pytest.approx(kl_sae, rel=1e-4, abs=1e-6)
    assert got["kl_mean"] == pytest.approx(kl_mean, rel=1e-4, abs=1e-6)
    assert got["loss_recovered_vs_mean"] == pytest.approx((l_mean - l_sae) / (l_mean - l_clean), rel=1e-4)
    assert got["n_tokens"] == float(mask[:, 1:].sum())
    assert list(got)[0] == "loss_recovered_vs_mean"  # the headline figure comes first


def test_logits_never_exceed_one_chunk():
    """Every call of the unembedding sees at most chunk_tokens positions: no [tokens, vocab] tensor for a batch."""
    lm = tiny_model("llama", d_model=32, n_layers=2, vocab=VOCAB)
    ids = torch.randint(3, VOCAB, (4, 40), generator=torch.Generator().manual_seed(1))
    seen = []
    handle = lm.unembed.register_forward_hook(lambda m, a, out: seen.append(out.shape[:-1].numel()))
    try:
        r = spliced_losses(lm, "resid.1", [ids], {"id": lambda a: a.clone()}, chunk_tokens=9)
    finally:
        handle.remove()
    assert seen and max(seen) <= 9
    assert len(seen) >= 4 * math.ceil(4 * 39 / 9)  # four conditions (clean, zero, mean, id), every chunk
    assert r["replaced"]["id"]["loss_recovered_vs_mean"] == pytest.approx(1.0, abs=1e-5)
    assert r["replaced"]["id"]["kl"] < 1e-6
    assert default_chunk_tokens(262_144) * 262_144 <= 1 << 24


def test_mean_defaults_to_the_tokens_own_mean_without_position_zero():
    lm = tiny_model("llama", d_model=32, n_layers=2, vocab=VOCAB)
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    from thoughtscope.sites import capture

    acts = next(iter(capture(lm, "resid.0", ids).values()))
    mean = acts[:, 1:].reshape(-1, 32).mean(0)
    sae = build_sae(SAEConfig(arch="topk", d_model=32, n_features=64, k=4))
    auto = spliced_lm_loss(lm, sae, "resid.0", [ids[:1], ids[1:]])
    given = spliced_lm_loss(lm, sae, "resid.0", [ids], mean_act=mean)
    assert auto["loss_mean_ablated"] == pytest.approx(given["loss_mean_ablated"], rel=1e-5)
