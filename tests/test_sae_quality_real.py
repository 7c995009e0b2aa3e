"""SAE quality on the real model (probes/sparse_probing.py, probes/absorption.py, probes/sae_quality.py): k-sparse
probing finds a planted separating latent and not a random one, first-letter absorption sees a latent silenced and
carried by another and nothing in an SAE without that, and `real_quality` returns every key in range on a tiny
word-level model (and, slow, on the default SAE)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.letter_words import letter_model, write_word_corpus

from thoughtscope.probes import ProbeSet
from thoughtscope.probes.absorption import (
    AbsorptionConfig,
    absorption_from_acts,
    balanced_logistic,
    first_letter_absorption,
    vocab_words,
    word_prompts,
)
from thoughtscope.probes.sae_quality import RealQualityConfig, real_quality
from thoughtscope.probes.sparse_probing import dataset_scores, top_k_mean_diff
from thoughtscope.sae import SAE, SAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- sparse probing


def _probe_set(n: int = 240, seed: int = 0) -> ProbeSet:
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < 0.5).long().tolist()
    y[0], y[1] = 0, 1
    return ProbeSet([f"text {i}" for i in range(n)], y, [f"g{i // 2}" for i in range(n)], "planted")


def test_a_planted_separating_latent_gives_auroc_one_at_k1_and_random_latents_chance():
    ds = _probe_set()
    g = torch.Generator().manual_seed(1)
    y = ds.y.float()
    noise = torch.rand(len(ds), 64, generator=g).relu()
    planted = noise.clone()
    planted[:, 17] = 3.0 * y + 0.1 * torch.rand(len(ds), generator=g)
    resid = torch.randn(len(ds), 16, generator=g)
    r = dataset_scores(resid, planted, ds, ks=(1, 2, 5), seed=0)
    assert r["sae"]["1"]["auroc"] > 0.99 and r["sae"]["1"]["features"] == [17]
    rand = dataset_scores(resid, noise, ds, ks=(1, 2, 5), seed=0)
    for k in ("1", "2", "5"):
        assert abs(rand["sae"][k]["auroc"] - 0.5) < 0.15, rand["sae"][k]
    assert abs(rand["residual_full"]["auroc"] - 0.5) < 0.2


def test_top_k_mean_diff_ranks_by_absolute_class_mean_difference():
    X = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0], [2.0, 0.0, 1.0], [2.0, 0.0, 1.0]])
    y = torch.tensor([1, 1, 0, 0])
    assert top_k_mean_diff(X, y, 2).tolist() == [1, 0]


def test_balanced_logistic_matches_its_weighted_objective_optimum():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(1, 80, 3, generator=g).double()
    y = (X[0, :, 0] + 0.5 * torch.randn(80, generator=g).double() > 0.8).double()[None]
    theta = balanced_logistic(X, y).requires_grad_(True)
    n, pos = 80, float(y.sum())
    w = torch.where(y > 0, n / (2 * pos), n / (2 * (n - pos)))
    z = X[0] @ theta[0, :3] + theta[0, 3]
    f = (w[0] * (torch.nn.functional.softplus(z) - y[0] * z)).sum() + 0.5 * theta[0, :3].pow(2).sum()
    f.backward()
    assert theta.grad.abs().max() < 1e-6


# --------------------------------------------------------------------------- absorption


N_WORDS, N_ABSORBED, D = 480, 30, 64  # 4 letters; the first 30 'a' words each carry their own marker direction


def _letter_data(seed: int = 0):
    """Residuals 4·e_letter + noise; absorbed 'a' words add 3·m_j (their own marker). Letters 0..3 cycle."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, D, generator=g))[0].T
    letters = torch.arange(N_WORDS) % 4
    noise = torch.randn(N_WORDS, D - 4 - N_ABSORBED, generator=g) @ basis[4 + N_ABSORBED :]
    x = 4.0 * basis[letters] + 0.3 * noise
    absorbed = (letters == 0).nonzero().squeeze(1)[:N_ABSORBED]
    for j, i in enumerate(absorbed.tolist()):
        x[i] += 3.0 * basis[4 + j]
    return x, letters, basis, absorbed


def _letter_sae(basis: torch.Tensor, absorbing: bool) -> SAE:
    """Latent l < 4 reads letter l (no bias); latent 4 + j fires on absorbed word j. Absorbing: latent 0 is
    silenced on absorbed words and latent 4 + j decodes the letter and its marker; else latents 4 + j are dead."""
    sae = SAE.from_config(SAEConfig(arch="relu-l1", d_model=D, n_features=4 + N_ABSORBED), seed=0)
    with torch.no_grad():
        for t in (sae.enc, sae.b_enc, sae.W_dec, sae.b_dec):
            t.zero_()
        for ch in range(4):
            sae.enc[ch] = basis[ch]
            sae.W_dec[ch] = basis[ch]
        for j in range(N_ABSORBED):
            m = basis[4 + j]
            if absorbing:
                sae.enc[0] -= 10.0 * m
                sae.enc[4 + j] = 3.0 * m
                sae.b_enc[4 + j] = -1.5
                sae.W_dec[4 + j] = (basis[0] + m) / (basis[0] + m).norm()
            else:
                sae.b_enc[4 + j] = -1.0  # never fires
                sae.W_dec[4 + j] = m
    return sae


def _absorption(absorbing: bool) -> dict:
    x, y, basis, _ = _letter_data()
    perm = torch.randperm(N_WORDS, generator=torch.Generator().manual_seed(3))
    te, tr = perm[: N_WORDS // 5], perm[N_WORDS // 5 :]
    sae = _letter_sae(basis, absorbing)
    return absorption_from_acts(x[tr], y[tr], x[te], y[te], sae.encode, sae.W_dec, AbsorptionConfig())


def test_a_letter_latent_silenced_and_carried_by_another_is_absorption():
    got = _absorption(absorbing=True)
    a = got["per_letter"]["a"]
    assert a["main_latents"] == [0]  # the token-specific carriers are not splits of the letter
    assert a["n_true_positives"] > 0
    assert 0.1 < a["absorption"] < 0.5 and a["absorption_full"] > 0.1
    assert got["absorption"] > 0.02
    for ch in "bcd":
        assert got["per_letter"][ch]["absorption"] == 0.0


def test_an_sae_without_absorbing_latents_has_no_absorption():
    got = _absorption(absorbing=False)
    assert got["letters"] == 4
    assert got["absorption"] == 0.0 and got["absorption_full"] == 0.0


def test_centered_absorption_does_not_move_when_the_data_and_the_decoder_bias_move_together():
    x, y, basis, _ = _letter_data()
    perm = torch.randperm(N_WORDS, generator=torch.Generator().manual_seed(3))
    te, tr = perm[: N_WORDS // 5], perm[N_WORDS // 5 :]
    sae = _letter_sae(basis, absorbing=True)
    base = absorption_from_acts(x[tr], y[tr], x[te], y[te], sae.encode, sae.W_dec, b_dec=sae.b_dec)
    shift = -3.0 * basis[0] + 2.0 * basis[1]
    with torch.no_grad():
        sae.b_dec.copy_(shift)  # encodes x + shift as the unshifted SAE encodes x
    xs = x + shift
    moved = absorption_from_acts(xs[tr], y[tr], xs[te], y[te], sae.encode, sae.W_dec, b_dec=sae.b_dec)
    assert moved["absorption_centered"] == pytest.approx(base["absorption_centered"])
    assert base["absorption_centered"] == pytest.approx(base["absorption"])  # no decoder bias: the same figure


# --------------------------------------------------------------------------- the whole function on a tiny model


def _tiny_letter_sae(lm) -> SAE:
    sae = SAE.from_config(
        SAEConfig(arch="topk", d_model=lm.d_model, n_features=48, k=4, model=lm.name, site="resid.1"), seed=0
    )
    return sae


def test_word_prompts_read_each_word_at_its_own_single_token():
    lm = letter_model()
    words = vocab_words(lm.tokenizer)
    assert "has" in words and all(w.isalpha() and len(w) >= 2 for w in words)
    prompts = word_prompts(lm, words, 40, 2, seed=1)
    assert len(prompts) == 40 and len({w for w, _, _ in prompts}) == 40
    for w, ids, pos in prompts:
        assert ids[0] == lm.tokenizer.bos_token_id and pos == len(ids) - 1
        assert ids[pos] == lm.tokenizer.convert_tokens_to_ids(w)
        assert lm.tokenizer.decode(ids[1:]).count(" has the first letter: ") == 2


def test_first_letter_absorption_runs_on_a_model_whose_words_know_their_letter():
    lm = letter_model()
    sae = _tiny_letter_sae(lm)
    got = first_letter_absorption(lm, sae, AbsorptionConfig(n_words=150, n_icl=2), seed=0)
    assert got["n_words"] == 150 and got["letters"] >= 4
    assert got["probe_f1"] > 0.8  # the residual knows the letter
    assert 0.0 <= got["absorption"] <= 1.0 and 0.0 <= got["absorption_full"] <= 1.0


def test_real_quality_returns_every_key_in_range(tmp_path):
    lm = letter_model()
    sae = _tiny_letter_sae(lm)
    corpus = write_word_corpus(tmp_path / "words.txt")
    cfg = RealQualityConfig(
        absorption=AbsorptionConfig(n_words=120, n_icl=2),
        corpus=str(corpus),
        atlas_tokens=8192,
        explain_features=8,
        loss_tokens=512,
    )
    q = real_quality(sae, lm, seed=0, config=cfg)
    for key in ("sparse_probing_auc", "sparse_probing_auc_residual", "sparse_probing_auc_residual_full"):
        assert 0.0 <= q[key] <= 1.0, key
    assert set(q["sparse_probing_auc_by_k"]) == {"1", "2", "5", "20"}
    assert 0.0 <= q["absorption"] <= 1.0 and 0.0 <= q["absorption_full"] <= 1.0
    assert 0.0 <= q["absorption_centered"] <= 1.0
    assert q["detection_features"] >= 1 and 0.0 <= q["detection_auroc"] <= 1.0
    assert math.isfinite(q["spliced_loss"]) and q["spliced_loss"] > 0
    assert math.isfinite(q["loss_recovered"])
    parts = ("sparse_probing", "absorption", "detection", "spliced_loss", "total")
    assert set(q["seconds"]) == {*parts, *(p + "_cpu" for p in parts)}


@pytest.mark.slow
def test_real_quality_of_the_default_sae_runs_and_its_residual_ceiling_beats_one_latent(tmp_path):
    small = RealQualityConfig(
        absorption=AbsorptionConfig(n_words=600), atlas_tokens=8192, explain_features=16, loss_tokens=2048
    )
    q = real_quality("default", "default", seed=0, config=small)
    assert q["sparse_probing_auc_residual_full"] > q["sparse_probing_auc_by_k"]["1"]
    assert q["sparse_probing_auc_by_k"]["20"] > q["sparse_probing_auc_by_k"]["1"]
    assert 0.0 <= q["absorption"] <= 1.0 and q["absorption_detail"]["letters"] >= 10
    assert 0.5 < q["detection_auroc"] <= 1.0
    assert q["loss_clean"] < q["spliced_loss"] and 0.5 < q["loss_recovered"] <= 1.0
