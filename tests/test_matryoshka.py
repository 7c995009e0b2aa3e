"""Matryoshka BatchTopK: the training loss against a dense reference, files, SAELens export, and what it is for."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from helpers.sae_data import D_MODEL, FAST, make_batches

import thoughtscope.sae as S
from thoughtscope.sae.formats import export_saelens, load_sae
from thoughtscope.sae.matryoshka import MatryoshkaSAE, batch_topk, matryoshka_widths
from thoughtscope.sae.metrics import evaluate_sae


def _sae(m: int = 48, k: int = 4, prefixes=(6, 12, 24), seed: int = 3, **kw) -> MatryoshkaSAE:
    cfg = S.SAEConfig(arch="matryoshka", d_model=D_MODEL, n_features=m, k=k, matryoshka_prefixes=prefixes, **kw)
    sae = S.build_sae(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # off the tied init, so encoder and decoder gradients differ
        sae.enc.add_(0.3 * torch.randn(sae.enc.shape, generator=g))
        sae.b_enc.copy_(0.1 * torch.randn(m, generator=g))
        sae.b_dec.copy_(0.2 * torch.randn(D_MODEL, generator=g))
    return sae


def _dense_reference_loss(sae, x, widths, dead_mask=None, aux_scale=None):
    """Plain dense PyTorch: batch top-k of relu(pre) over all B*m cells, one MSE per prefix, their mean, + AuxK."""
    B, m, k = x.shape[0], sae.cfg.n_features, sae.cfg.k
    pre = (x - sae.b_dec) @ sae.enc.T + sae.b_enc
    acts = F.relu(pre)
    keep = torch.zeros(B * m, dtype=torch.bool)
    keep[acts.detach().reshape(-1).topk(k * B).indices] = True
    f = acts * keep.view(B, m)
    losses = []
    for w in widths:
        recon = f[:, :w] @ sae.W_dec[:w] + sae.b_dec
        losses.append(((x - recon) ** 2).sum(-1).mean())
    loss = torch.stack(losses).mean()
    if dead_mask is not None:
        err = (x - recon).detach()
        masked = pre.masked_fill(~dead_mask, float("-inf"))
        top = masked.detach().topk(min(sae.cfg.k_aux_eff, int(dead_mask.sum())), dim=-1).indices
        sel = torch.zeros_like(pre, dtype=torch.bool).scatter(1, top, True)
        a = F.relu(pre) * sel
        aux = ((err - a @ sae.W_dec) ** 2).sum(-1).mean() / aux_scale
        loss = loss + sae.cfg.aux_coeff * aux
    return loss, recon


@pytest.mark.parametrize("with_aux", [False, True])
def test_training_loss_and_gradients_match_a_dense_reference(with_aux):
    torch.manual_seed(0)
    x = torch.randn(16, D_MODEL)
    sae = _sae(k_aux=5)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[[1, 7, 13, 20, 30, 31, 40, 47]] = True
    dead_mask, scale = (dead, torch.tensor(3.0)) if with_aux else (None, None)
    ref_loss, ref_recon = _dense_reference_loss(sae, x, (6, 12, 24, 48), dead_mask, scale)
    ref_grads = torch.autograd.grad(ref_loss, [sae.enc, sae.b_enc, sae.W_dec, sae.b_dec])
    out = sae.training_step(x, progress=0.5, dead_mask=dead_mask, aux_scale=scale)
    grads = torch.autograd.grad(out.loss, [sae.enc, sae.b_enc, sae.W_dec, sae.b_dec])
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.recon, ref_recon, rtol=1e-5, atol=1e-5)
    for name, g, r in zip(("enc", "b_enc", "W_dec", "b_dec"), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")
    assert float(out.l0) == pytest.approx(4.0)  # k per row on average: the batch top-k kept k * B positive cells
    assert float(sae.threshold) > 0  # the first step sets the inference threshold
    if with_aux:
        assert float(out.aux) > 0


@pytest.mark.parametrize("loud_rows", [0, 3, 40])
def test_batch_topk_from_row_candidates_is_the_whole_batch_top_k(loud_rows):
    g = torch.Generator().manual_seed(loud_rows)
    pre = torch.randn(40, 300, generator=g)
    pre[:loud_rows] *= 10  # rows holding far more than 2k of the batch's top cells
    for k in (3, 8, 150, 300):
        vals, flat = batch_topk(pre, k)
        want_vals, want_flat = pre.reshape(-1).topk(k * 40)
        assert torch.equal(flat.sort().values, want_flat.sort().values)
        torch.testing.assert_close(vals.sort().values, want_vals.sort().values, rtol=0, atol=0)
        torch.testing.assert_close(pre.reshape(-1)[flat], vals, rtol=0, atol=0)


def test_default_prefixes_are_geometric_and_bad_ones_are_refused_naming_the_field():
    assert matryoshka_widths(S.SAEConfig(arch="matryoshka", d_model=8, n_features=1024, k=4)) == (
        64,
        128,
        256,
        512,
        1024,
    )
    assert matryoshka_widths(S.SAEConfig(arch="matryoshka", d_model=8, n_features=4, k=1)) == (1, 2, 4)
    for bad in [(8, 4), (4, 4), (0, 8), (-2, 8), (8, 64), (8, 70), (2.5,), ("a",)]:
        with pytest.raises(S.SAEError, match="matryoshka_prefixes"):
            S.SAEConfig(arch="matryoshka", d_model=8, n_features=64, k=4, matryoshka_prefixes=bad)


def test_save_load_round_trip_and_saelens_export(tmp_path):
    sae = _sae()
    with torch.no_grad():
        sae.threshold.fill_(0.3)
    x = torch.randn(40, D_MODEL, generator=torch.Generator().manual_seed(5))
    back = load_sae(sae.save(tmp_path / "native"))
    assert isinstance(back, MatryoshkaSAE) and back.cfg.matryoshka_prefixes == (6, 12, 24)
    assert float(back.threshold) == pytest.approx(0.3)
    torch.testing.assert_close(back.encode(x), sae.encode(x))
    export_saelens(sae, tmp_path / "lens")
    again = load_sae(tmp_path / "lens")  # our own reader takes it back as matryoshka with the global threshold
    assert again.cfg.arch == "matryoshka"
    torch.testing.assert_close(again(x).recon, sae(x).recon, rtol=1e-5, atol=1e-5)
    if importlib.util.find_spec("sae_lens") is None:
        pytest.skip("sae-lens is not installed (the bench extra)")
    from sae_lens import SAE as LensSAE

    lens = LensSAE.load_from_disk(str(tmp_path / "lens"), device="cpu")
    assert lens.cfg.architecture() == "jumprelu"
    with torch.no_grad():
        torch.testing.assert_close(lens.decode(lens.encode(x)), sae(x).recon, rtol=1e-5, atol=1e-5)


def test_trainer_lowers_fvu_and_the_first_prefix_beats_a_random_one_of_its_size():
    torch.set_num_threads(1)
    data = make_batches(60, B=256, seed=1)
    held = make_batches(2, B=256, seed=2)
    # a fast threshold EMA: the default (0.999 per step) barely leaves its first value in a 60-step run
    cfg = S.SAEConfig(
        arch="matryoshka", d_model=D_MODEL, n_features=128, k=4, matryoshka_prefixes=(16, 32, 64), threshold_beta=0.9
    )
    before = evaluate_sae(S.build_sae(cfg, seed=0), held)["fvu"]
    sae = S.train_sae(cfg, data, S.TrainConfig(batch_size=256, steps=60, lr=1e-2, **FAST))
    after = evaluate_sae(sae, held)["fvu"]
    assert after < 0.5 * before and after < 0.4, (before, after)
    x = torch.cat(held)
    with torch.no_grad():
        f = sae.encode(x)

        def fvu(cols):
            recon = f[:, cols] @ sae.W_dec[cols] + sae.b_dec
            return float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())

        first = fvu(torch.arange(16))
        g = torch.Generator().manual_seed(0)
        others = [fvu(16 + torch.randperm(112, generator=g)[:16]) for _ in range(5)]
    assert first < min(others) - 0.1, (first, others)
