"""Massive dimensions (a few residual dimensions ~100x the rest, as in Gemma 3): found by one rule, reported by the
store, and kept from taking an SAE's reconstruction loss from every other dimension."""

from __future__ import annotations

import pytest
import torch
from helpers.sae_data import D_MODEL, FAST, make_batches

import thoughtscope.sae as S
from thoughtscope.store import massive_dims

MASSIVE = 5


def _with_massive(batches: list[torch.Tensor], seed: int = 7) -> list[torch.Tensor]:
    """Dimension MASSIVE gets a large offset and a spread ~60x the other dimensions' (Gemma 3's dimension 163)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in batches:
        b = b.clone()
        b[:, MASSIVE] = 300.0 + 30.0 * torch.randn(b.shape[0], generator=g)
        out.append(b)
    return out


def _fvu(sae: S.SAE, x: torch.Tensor, dims: torch.Tensor) -> float:
    with torch.no_grad():
        r = sae(x)[1][:, dims] - x[:, dims]
    xs = x[:, dims]
    return float(r.square().sum() / (xs - xs.mean(0)).square().sum())


def test_rule_finds_the_large_dimensions_largest_first():
    rms = torch.ones(64)
    rms[[3, 40]] = torch.tensor([25.0, 200.0])
    rms[10] = 19.0  # below 20x the median
    assert massive_dims(rms) == [40, 3]
    assert massive_dims(torch.ones(16)) == []
    assert massive_dims(rms, ratio=10) == [40, 3, 10]


def _train(scaling: str, batches: list[torch.Tensor]) -> S.SAE:
    cfg = S.SAEConfig(arch="topk", d_model=D_MODEL, n_features=64, k=4, input_scaling=scaling)
    tc = S.TrainConfig(batch_size=256, steps=len(batches), lr=3e-3, seed=0, init_batches=4, **FAST)
    return S.train_sae(cfg, batches, tc)


def test_massive_dimension_is_recorded_scaled_and_folded():
    batches = _with_massive(make_batches(30))
    sae = _train("massive", batches)
    assert sae.cfg.massive_dims == [MASSIVE]
    scale = torch.tensor(sae.cfg.dim_scale)
    assert scale[MASSIVE] < 0.1 and bool((scale[torch.arange(D_MODEL) != MASSIVE] == 1).all())
    assert sae.cfg.norm_folded
    # folded: the saved SAE reads raw activations and writes them back, massive dimension included
    x = torch.cat(batches[-4:])
    with torch.no_grad():
        recon = sae(x)[1]
    assert float((recon[:, MASSIVE] - x[:, MASSIVE]).abs().mean()) < float((x[:, MASSIVE] - 300).abs().mean())


def test_massive_scaling_gives_the_other_dimensions_back_their_reconstruction():
    """At the same budget, the default recipe reconstructs the ordinary dimensions better than plain scaling, which
    spends its loss on the one massive dimension (FVU over all dimensions hides it)."""
    batches = _with_massive(make_batches(50))
    held = torch.cat(_with_massive(make_batches(4, seed=99), seed=99))
    rest = torch.tensor([i for i in range(D_MODEL) if i != MASSIVE])
    plain, scaled = _train("none", batches), _train("massive", batches)
    assert plain.cfg.massive_dims == [MASSIVE] and plain.cfg.dim_scale is None
    fvu_plain, fvu_scaled = _fvu(plain, held, rest), _fvu(scaled, held, rest)
    assert fvu_scaled < 0.6 * fvu_plain, (fvu_plain, fvu_scaled)


def test_no_massive_dimension_changes_nothing():
    batches = make_batches(20)
    tc = S.TrainConfig(batch_size=256, steps=len(batches), lr=3e-3, seed=0, **FAST)
    cfg = S.SAEConfig(arch="topk", d_model=D_MODEL, n_features=64, k=4, input_scaling="massive")
    a = S.train_sae(cfg, batches, tc)
    b = S.train_sae(S.SAEConfig(arch="topk", d_model=D_MODEL, n_features=64, k=4, input_scaling="none"), batches, tc)
    assert a.cfg.massive_dims == [] and a.cfg.dim_scale is None
    assert torch.equal(a.W_dec, b.W_dec) and torch.equal(a.b_dec, b.b_dec)


def test_per_dim_scaling_round_trips_through_save(tmp_path):
    sae = _train("per-dim", _with_massive(make_batches(10)))
    assert len(sae.cfg.dim_scale) == D_MODEL and sae.cfg.dim_scale[MASSIVE] < 0.1
    sae.save(tmp_path / "s")
    back = S.load_sae(tmp_path / "s")
    assert back.cfg.dim_scale == pytest.approx(sae.cfg.dim_scale) and back.cfg.input_scaling == "per-dim"
    x = torch.cat(make_batches(1, seed=5))
    with torch.no_grad():
        assert torch.allclose(back(x)[1], sae(x)[1], atol=1e-4)


def test_auto_standardises_only_where_a_massive_dimension_carries_the_variance():
    """Gemma 3's dimension 163 varies (62 % of the variance): every dimension is standardised. SmolLM2's massive
    dimensions are near-constant offsets (2 % of the variance): nothing is rescaled. The choice is saved."""
    assert S.SAEConfig(d_model=8, n_features=16, k=2).input_scaling == "auto"
    varies = _train("auto", _with_massive(make_batches(6)))
    assert varies.cfg.input_scaling == "per-dim" and varies.cfg.massive_dims == [MASSIVE]
    offset = [b.clone() for b in make_batches(6)]
    for b in offset:
        b[:, MASSIVE] += 300.0  # huge, but constant
    still = _train("auto", offset)
    assert still.cfg.input_scaling == "none" and still.cfg.massive_dims == [MASSIVE] and still.cfg.dim_scale is None
    plain = _train("auto", make_batches(6))
    assert plain.cfg.input_scaling == "none" and plain.cfg.massive_dims == []


def test_bad_scaling_names_the_field():
    with pytest.raises(S.SAEError, match="input_scaling"):
        S.SAEConfig(d_model=8, n_features=16, k=2, input_scaling="whiten")


def test_store_statistics_report_the_massive_dimension(tmp_path):
    from thoughtscope.store import ActivationStore, StoreWriter

    acts = torch.cat(_with_massive(make_batches(4)))
    idx = torch.arange(acts.shape[0])
    meta = {"doc_id": idx // 32, "position": idx % 32, "token_id": idx % 101}
    w = StoreWriter(tmp_path / "acts", model="synthetic", site="resid.0", d_model=D_MODEL, shard_tokens=512)
    w.add(acts, meta)
    w.finish()
    st = ActivationStore.open(tmp_path / "acts")
    assert st.describe()["massive_dims"] == [MASSIVE]
    assert len(st.stats["rms"]) == D_MODEL
    assert st.massive_summary().startswith(f"massive dimensions (RMS over 20x the median dimension's): {MASSIVE} (")
    plain = tmp_path / "plain"
    w = StoreWriter(plain, model="synthetic", site="resid.0", d_model=D_MODEL, shard_tokens=512)
    w.add(torch.cat(make_batches(4)), meta)
    w.finish()
    assert ActivationStore.open(plain).massive_summary() is None
