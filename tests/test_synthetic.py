"""The synthetic activation generator: deterministic bytes, and the statistics it promises (true L0, Zipf slope,
hierarchy, mutual exclusion, correlations, near-orthogonal unit directions)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from thoughtscope.configdoc import undocumented
from thoughtscope.errors import SAEError
from thoughtscope.sae.synthetic import L0_TOLERANCE, SyntheticActivations, SyntheticConfig

SMALL = SyntheticConfig(
    n_features=1024,
    d_model=64,
    target_l0=12.0,
    hierarchy_roots=8,
    hierarchy_branching=4,
    hierarchy_depth=2,
    mutually_exclusive=0.5,
    correlation_rank=8,
    correlation_scale=0.2,
    orthogonalize_steps=10,
    bias_norm=1.0,
    seed=3,
)


@pytest.fixture(scope="module")
def small():
    torch.set_num_threads(1)
    model = SyntheticActivations(SMALL)
    x, acts = model.sample(20_000, seed=11)
    return model, x, acts


def _zipf_slope(freq: torch.Tensor, idx: torch.Tensor) -> float:
    """Slope of log(frequency) against log(rank) (rank = index + 1) over the given features."""
    f = freq[idx].double().numpy()
    r = idx.double().numpy() + 1
    return float(np.polyfit(np.log(r), np.log(f), 1)[0])


def test_same_config_and_seed_give_the_same_bytes(small):
    model, x, acts = small
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the fixture built `model` on one thread: the bytes must not depend on it
    try:
        again = SyntheticActivations(SMALL)
        x2, a2 = again.sample(8_500, seed=5)  # not a multiple of the chunk: the last chunk is partial
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(again.features, model.features) and torch.equal(again.parent, model.parent)
    x1, a1 = model.sample(8_500, seed=5)
    assert x1.numpy().tobytes() == x2.numpy().tobytes()
    assert a1.numpy().tobytes() == a2.numpy().tobytes()
    assert torch.equal(model.sample_x(8_500, seed=5), x1)
    x3, _ = model.sample(8_500, seed=6)
    assert not torch.equal(x1, x3)
    tiny = SyntheticConfig(n_features=256, d_model=16, target_l0=4.0, hierarchy_roots=2)
    one, other = SyntheticActivations(tiny), SyntheticActivations(dataclasses.replace(tiny, seed=1))
    assert not torch.equal(one.features, other.features)
    assert not torch.equal(one.sample_x(100, seed=0), other.sample_x(100, seed=0))
    assert x.dtype == acts.dtype == torch.float32
    summary = model.summary()
    assert summary["n_features"] == 1024 and summary["children"] == 160 and summary["exclusive_parents"] == 20
    assert abs(summary["calibrated_l0"] - 12.0) < 0.1 and 0 < summary["mean_max_overlap"] < 1


def test_rows_are_the_firing_magnitudes_times_the_directions(small):
    model, x, acts = small
    assert x.shape == (20_000, 64) and acts.shape == (20_000, 1024)
    assert torch.allclose(x, acts @ model.features + model.bias, atol=1e-4)
    assert bool((acts >= 0).all())
    assert torch.allclose(model.features.norm(dim=1), torch.ones(1024), atol=1e-5)
    assert abs(float(model.bias.norm()) - 1.0) < 1e-5
    fired = acts[acts > 0]  # magnitudes: mean between the rare (4) and frequent (5) means, noisy
    assert 4.0 < float(fired.mean()) < 5.0 and float(fired.std()) > 0.2


def test_true_l0_is_the_target_within_the_stated_tolerance(small):
    _, _, acts = small
    l0 = float((acts > 0).sum(1).float().mean())
    assert abs(l0 - SMALL.target_l0) <= L0_TOLERANCE * SMALL.target_l0, l0
    default = SyntheticActivations(SyntheticConfig(orthogonalize_steps=0))
    _, big = default.sample(10_000, seed=1)
    l0 = float((big > 0).sum(1).float().mean())
    assert abs(l0 - 30.0) <= L0_TOLERANCE * 30.0, l0


def test_firing_frequencies_follow_the_configured_zipf_exponent(small):
    model, _, acts = small
    freq = (acts > 0).float().mean(0)
    free = (model.parent < 0).nonzero().squeeze(1)  # roots and features outside the trees fire at p_i exactly
    assert abs(_zipf_slope(freq, free) + SMALL.zipf_exponent) < 0.06
    for exponent in (0.5, 0.9):
        flat = SyntheticConfig(n_features=512, d_model=32, target_l0=6.0, hierarchy_roots=0, zipf_exponent=exponent)
        m = SyntheticActivations(flat)
        _, a = m.sample(20_000, seed=2)
        f = (a > 0).float().mean(0)
        assert abs(_zipf_slope(f, torch.arange(512)) + exponent) < 0.06, exponent
        assert torch.allclose(f.double(), m.probabilities, atol=0.01)


def test_a_child_never_fires_without_its_parent_and_exclusive_siblings_never_together(small):
    model, _, acts = small
    on = acts > 0
    kids = (model.parent >= 0).nonzero().squeeze(1)
    assert kids.numel() == 8 * 4 + 8 * 16
    assert not bool((on[:, kids] & ~on[:, model.parent[kids]]).any())
    assert bool(on[:, kids].any(0).all())  # every child does fire somewhere
    together = {True: 0, False: 0}
    for p in model.parent[kids].unique().tolist():
        siblings = on[:, model.parent == p].sum(1)
        together[bool(model.exclusive[p])] += int((siblings > 1).sum())
    assert together[True] == 0 and together[False] > 0
    assert int(model.exclusive.sum()) == round(0.5 * 40)


def test_children_are_scaled_by_their_parents_magnitude(small):
    """With scale_children_by_parent (SynthSAEBench-16k's setting, the default) a child's magnitude over its own
    mean tracks its parent's over the parent's mean; without it the two are independent."""
    model, _, acts = small

    def ratios(m, a):
        kids = (m.parent >= 0).nonzero().squeeze(1)
        both = a[:, kids] > 0
        child = (a[:, kids] / m.magnitude_mean[kids])[both]
        parent = (a[:, m.parent[kids]] / m.magnitude_mean[m.parent[kids]])[both]
        return child, parent

    child, parent = ratios(model, acts)
    assert float(torch.corrcoef(torch.stack([child, parent]))[0, 1]) > 0.3
    plain = SyntheticActivations(dataclasses.replace(SMALL, scale_children_by_parent=False))
    child, parent = ratios(plain, plain.sample(8_000, seed=1)[1])
    assert abs(float(torch.corrcoef(torch.stack([child, parent]))[0, 1])) < 0.1


def test_firings_are_correlated_as_the_low_rank_factor_says(small):
    model, _, acts = small
    free = (model.parent < 0).nonzero().squeeze(1)[:64]  # the most frequent free features
    on = (acts[:, free] > 0).double()
    measured = torch.corrcoef(on.T)
    factor = model.correlation_factor[free]
    predicted = factor @ factor.T
    off = ~torch.eye(64, dtype=torch.bool)
    agreement = torch.corrcoef(torch.stack([measured[off], predicted[off]]))[0, 1]
    assert float(agreement) > 0.6
    plain = SyntheticActivations(dataclasses.replace(SMALL, correlation_rank=0))
    assert plain.correlation_factor is None
    _, a = plain.sample(20_000, seed=11)
    flat = torch.corrcoef((a[:, free] > 0).double().T)[off]
    assert float(flat.abs().mean()) < 0.5 * float(measured[off].abs().mean())


def test_directions_are_near_orthogonal_but_not_orthogonal():
    cfg = SyntheticConfig(n_features=1024, d_model=64, target_l0=6.0, hierarchy_roots=0, correlation_rank=0)
    raw = SyntheticActivations(dataclasses.replace(cfg, orthogonalize_steps=0))
    pushed = SyntheticActivations(cfg)
    assert 0.05 < pushed.mean_max_overlap() < raw.mean_max_overlap() < 0.8


def test_config_fields_are_documented_and_bad_values_are_refused():
    assert undocumented(SyntheticConfig) == []
    with pytest.raises(SAEError, match="n_features"):
        SyntheticConfig(n_features=0)
    with pytest.raises(SAEError, match="mutually_exclusive"):
        SyntheticConfig(mutually_exclusive=1.5)
    with pytest.raises(SAEError, match="target_l0"):
        SyntheticConfig(n_features=64, d_model=8, target_l0=30.0, hierarchy_roots=0)
    with pytest.raises(SAEError, match="hierarchy_roots"):
        SyntheticConfig(n_features=100, d_model=8, target_l0=2.0, hierarchy_roots=8)
    with pytest.raises(SAEError, match="zipf_exponent"):
        SyntheticConfig(zipf_exponent=float("nan"))
    model = SyntheticActivations(SyntheticConfig(n_features=256, d_model=16, target_l0=4.0, hierarchy_roots=2))
    with pytest.raises(SAEError, match="rows"):
        model.sample(0, seed=1)
    with pytest.raises(SAEError, match="seed"):
        model.sample(10, seed=1.5)
