"""Free decoder norms (SAEConfig.decoder_norm "free") for the top-k family: each training step against SAELens'
formulation written out densely, the fold that ends training, and what the config accepts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.sae_data import D_MODEL, FAST, make_batches

import thoughtscope.sae as S
from thoughtscope.sae import SAEConfig, SAEError, TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

M, K = 48, 4
DEAD = [1, 7, 13, 20, 30, 31, 40, 47]


def _sae(arch: str, seed: int = 3, **kw) -> S.SAE:
    """A free-norm SAE off its tied init, with decoder rows of norms between 0.3 and 3."""
    extra = {"matryoshka_prefixes": (6, 12, 24)} if arch == "matryoshka" else {}
    cfg = SAEConfig(arch=arch, d_model=D_MODEL, n_features=M, k=K, k_aux=5, **extra, **kw)
    sae = S.build_sae(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.enc.add_(0.3 * torch.randn(sae.enc.shape, generator=g))
        sae.b_enc.copy_(0.1 * torch.randn(M, generator=g))
        sae.b_dec.copy_(0.2 * torch.randn(D_MODEL, generator=g))
        sae.W_dec.mul_(0.3 + 2.7 * torch.rand(M, 1, generator=g))
    return sae


def _saelens_reference(sae, x, dead_mask=None, aux_scale=None):
    """SAELens' rescale_acts_by_decoder_norm, densely: hidden_pre = pre x ||W_dec,i|| (norms with their gradient),
    top-k (per row, or over the batch) of relu(hidden_pre), decode acts / ||W_dec,i||; AuxK ranks dead latents by
    hidden_pre as well. Matryoshka: the mean of the nested prefixes' losses."""
    arch, B, k = sae.cfg.arch, x.shape[0], sae.cfg.k
    n = sae.W_dec.norm(dim=-1)
    hidden = ((x - sae.b_dec) @ sae.enc.T + sae.b_enc) * n
    acts = F.relu(hidden)
    keep = torch.zeros_like(acts, dtype=torch.bool)
    if arch == "topk":
        keep.scatter_(1, acts.detach().topk(k, dim=-1).indices, True)
    else:
        keep.view(-1)[acts.detach().reshape(-1).topk(k * B).indices] = True
    f = acts * keep
    widths = (6, 12, 24, M) if arch == "matryoshka" else (M,)
    losses = []
    for w in widths:
        recon = (f[:, :w] / n[:w]) @ sae.W_dec[:w] + sae.b_dec
        losses.append(((x - recon) ** 2).sum(-1).mean())
    loss = torch.stack(losses).mean()
    if dead_mask is not None:
        top = hidden.detach().masked_fill(~dead_mask, float("-inf")).topk(sae.cfg.k_aux_eff, dim=-1).indices
        a = F.relu(hidden) * torch.zeros_like(keep).scatter(1, top, True)
        aux = (((x - recon).detach() - (a / n) @ sae.W_dec) ** 2).sum(-1).mean() / aux_scale
        loss = loss + sae.cfg.aux_coeff * aux
    return loss, recon, f


@pytest.mark.parametrize("with_aux", [False, True])
@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
def test_a_free_norm_step_is_saelens_rescaled_step(arch, with_aux):
    torch.manual_seed(0)
    x = torch.randn(16, D_MODEL)
    sae = _sae(arch)
    assert sae.cfg.decoder_norm == "free"  # the top-k family's default
    dead = torch.zeros(M, dtype=torch.bool)
    dead[DEAD] = True
    dead_mask, scale = (dead, torch.tensor(3.0)) if with_aux else (None, None)
    params = [sae.enc, sae.b_enc, sae.W_dec, sae.b_dec]
    ref_loss, ref_recon, ref_f = _saelens_reference(sae, x, dead_mask, scale)
    ref_grads = torch.autograd.grad(ref_loss, params)
    out = sae.training_step(x, progress=0.5, dead_mask=dead_mask, aux_scale=scale)
    grads = torch.autograd.grad(out.loss, params)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.recon, ref_recon, rtol=1e-5, atol=1e-5)
    for name, g, r in zip(("enc", "b_enc", "W_dec", "b_dec"), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")
    assert torch.equal(out.fired, (ref_f > 0).any(0))
    if arch != "topk":  # the threshold is learned on the ranked quantity, pre x norm
        kept = ref_f[ref_f > 0]
        assert float(sae.threshold) == pytest.approx(float(kept.min()), rel=1e-5)
    # unit rows would have ranked otherwise: the test would not notice a step that ignores the norms
    unit = copy.deepcopy(sae)
    unit.cfg.decoder_norm = "unit"
    assert not torch.allclose(unit.training_step(x, progress=0.5, dead_mask=None, aux_scale=None).recon, out.recon)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
def test_folding_the_norms_keeps_what_training_selected_and_reconstructed(arch):
    torch.manual_seed(1)
    x = torch.randn(64, D_MODEL)
    sae = _sae(arch)
    for _ in range(3):  # learn a threshold on these rows (batchtopk, matryoshka)
        out = sae.training_step(x, progress=0.5, dead_mask=None, aux_scale=None)
    n_before = sae.W_dec.norm(dim=1)
    folded = copy.deepcopy(sae)
    folded.fold_decoder_norm()
    torch.testing.assert_close(folded.W_dec.norm(dim=1), torch.ones(M))
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.enc.T + sae.b_enc
        pre_folded = folded.pre_acts(x)
        f, recon = folded(x)
    torch.testing.assert_close(pre_folded, pre * n_before, rtol=1e-5, atol=1e-5)  # what training ranked: pre x n
    torch.testing.assert_close(f, F.relu(pre_folded) * (f > 0))
    if arch == "topk":  # the same k latents per row, the same reconstruction as the step
        torch.testing.assert_close(recon, out.recon.detach(), rtol=1e-5, atol=1e-5)
    else:  # the threshold, learned on pre x n, reads the folded pre-activations
        torch.testing.assert_close(f > 0, pre_folded > sae.threshold)
    again = copy.deepcopy(folded)
    again.fold_decoder_norm()  # unit rows: nothing moves
    torch.testing.assert_close(again.enc, folded.enc)


def test_free_norms_drift_in_training_and_the_trained_sae_has_unit_rows():
    data = make_batches(40)
    tc = TrainConfig(batch_size=256, steps=40, lr=3e-3, **FAST)
    common = {"d_model": D_MODEL, "n_features": M, "k": K, "normalize": False, "input_scaling": "none"}
    free, unit = SAEConfig(arch="topk", **common), SAEConfig(arch="topk", decoder_norm="unit", **common)
    tr = S.Trainer([free, unit], tc)
    saes = tr.fit(data)
    n_free = tr.slots[0].sae.W_dec.norm(dim=1)
    assert (n_free - 1).abs().max() > 0.05  # the norms trained
    torch.testing.assert_close(tr.slots[1].sae.W_dec.norm(dim=1), torch.ones(M))  # unit: held at 1 throughout
    for sae in saes:
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(M))
        assert sae.cfg.decoder_norm in ("free", "unit")
    x = data[0]
    with torch.no_grad():  # the trained free SAE reconstructs as its last training state did
        inner = tr.slots[0].sae
        step = inner.training_step(x, progress=1.0, dead_mask=None, aux_scale=None).recon
        torch.testing.assert_close(saes[0](x).recon, step, rtol=1e-4, atol=1e-4)


def test_the_default_follows_the_architecture_and_a_bad_choice_names_the_field():
    for arch in ("topk", "batchtopk", "matryoshka"):
        assert SAEConfig(arch=arch, d_model=8, n_features=16, k=2).decoder_norm == "free"
    for arch in ("relu-l1", "jumprelu", "transcoder"):
        assert SAEConfig(arch=arch, d_model=8, n_features=16, k=2).decoder_norm == "unit"
    with pytest.raises(SAEError, match=r"decoder_norm='free'.*'jumprelu'"):
        SAEConfig(arch="jumprelu", d_model=8, n_features=16, decoder_norm="free")
    with pytest.raises(SAEError, match=r"decoder_norm='fixed'.*free, unit"):
        SAEConfig(arch="topk", d_model=8, n_features=16, k=2, decoder_norm="fixed")
    # a config written before the field existed was trained with unit rows, and says so when read back
    old = SAEConfig(arch="topk", d_model=8, n_features=16, k=2).to_dict()
    del old["decoder_norm"]
    assert SAEConfig.from_dict(old).decoder_norm == "unit"
    assert SAEConfig.from_dict(SAEConfig(arch="topk", d_model=8, n_features=16, k=2).to_dict()).decoder_norm == "free"
