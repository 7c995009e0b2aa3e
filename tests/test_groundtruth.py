"""Ground-truth SAE metrics: a perfect SAE scores 1 where it should, a random one scores low, an SAE whose parent
latents go silent when a child fires scores absorption near 1, and the definitions agree with SAELens'."""

from __future__ import annotations

import math

import pytest
import torch

from thoughtscope.errors import SAEError
from thoughtscope.sae.groundtruth import METRIC_KEYS, ground_truth_metrics, parent_from_tree
from thoughtscope.sae.synthetic import SyntheticActivations, SyntheticConfig

CFG = SyntheticConfig(
    n_features=512,
    d_model=48,
    target_l0=8.0,
    hierarchy_roots=8,
    hierarchy_branching=3,
    hierarchy_depth=2,
    mutually_exclusive=0.5,
    correlation_rank=8,
    bias_norm=1.0,
    orthogonalize_steps=10,
    seed=7,
)


class RowOracle:
    """An 'SAE' whose encoder returns given latents for each known input row (found by the row's bytes)."""

    def __init__(self, x: torch.Tensor, latents: torch.Tensor) -> None:
        self.index = {row.numpy().tobytes(): i for i, row in enumerate(x)}
        self.latents = latents

    def __call__(self, xc: torch.Tensor) -> torch.Tensor:
        return self.latents[[self.index[row.numpy().tobytes()] for row in xc]]


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    model = SyntheticActivations(CFG)
    x, acts = model.sample(12_000, seed=1)
    return model, x, acts


def _absorbed(model: SyntheticActivations, acts: torch.Tensor) -> torch.Tensor:
    """The true activations with every parent switched off on the rows where one of its children fires."""
    out = acts.clone()
    for p in model.parent[model.parent >= 0].unique().tolist():
        child_fires = (acts[:, model.parent == p] > 0).any(1)
        out[child_fires, p] = 0
    return out


def test_a_perfect_sae_scores_one_and_no_absorption(data):
    model, x, acts = data
    got = ground_truth_metrics(
        RowOracle(x, acts), model.features, x, acts, model.features, model.parent, b_dec=model.bias
    )
    assert tuple(got) == METRIC_KEYS and all(isinstance(v, float) for v in got.values())
    for key in ("f1", "precision", "recall", "mcc", "uniqueness"):
        assert got[key] == pytest.approx(1.0, abs=1e-6), key
    assert got["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert got["shrinkage"] == pytest.approx(1.0, abs=1e-5)
    assert got["absorption"] == 0.0 and got["dead"] == 0.0
    assert got["l0"] == pytest.approx(float((acts > 0).sum()) / acts.shape[0])
    # the order of the latents does not matter; a decode callable gives the same reconstruction
    perm = torch.randperm(CFG.n_features, generator=torch.Generator().manual_seed(0))
    shuffled = ground_truth_metrics(
        RowOracle(x, acts[:, perm]),
        model.features[perm],
        x,
        acts,
        model.features,
        model.parent,
        decode=lambda z: z @ model.features[perm] + model.bias,
        chunk_rows=1000,
    )
    assert shuffled == pytest.approx(got)


def test_a_random_sae_scores_low(data):
    model, x, acts = data
    w = torch.randn(CFG.n_features, CFG.d_model, generator=torch.Generator().manual_seed(1))
    got = ground_truth_metrics(lambda xc: torch.relu(xc @ w.T - 8.0), w, x, acts, model.features, model.parent)
    assert got["mcc"] < 0.5 and got["f1"] < 0.2 and got["uniqueness"] < 0.8
    assert got["absorption"] < 0.1  # it fires at random whatever the context


def test_parent_latents_silenced_by_a_child_score_absorption_near_one(data):
    model, x, acts = data
    absorbed = _absorbed(model, acts)
    got = ground_truth_metrics(RowOracle(x, absorbed), model.features, x, acts, model.features, model.parent)
    assert got["absorption"] > 0.95
    assert got["mcc"] == pytest.approx(1.0, abs=1e-6)  # the directions are right, the firing is not
    assert got["recall"] < 1.0
    # half the silencing gives about half the score
    half = acts.clone()
    half[: acts.shape[0] // 2] = absorbed[: acts.shape[0] // 2]
    got = ground_truth_metrics(RowOracle(x, half), model.features, x, acts, model.features, model.parent)
    assert 0.35 < got["absorption"] < 0.65
    no_tree = ground_truth_metrics(RowOracle(x, absorbed), model.features, x, acts, model.features)
    assert math.isnan(no_tree["absorption"])


def _absorption_by_hand(latents: torch.Tensor, acts: torch.Tensor, parent: torch.Tensor, min_support: int = 5):
    """The module docstring's absorption, parent by parent with dense masks, for latents whose decoder rows are
    the true directions (so the latent of feature P is latent P)."""
    num = den = 0.0
    for p in parent[parent >= 0].unique().tolist():
        fires, lat = acts[:, p] > 0, latents[:, p] != 0
        kid_on = acts[:, parent == p] > 0
        contexts = [fires & ~kid_on.any(1)] + [fires & kid_on[:, j] for j in range(kid_on.shape[1])]
        rates = [float((lat & c).sum()) / int(c.sum()) if int(c.sum()) >= min_support else None for c in contexts]
        ref = max((r for r in rates if r is not None), default=0.0)
        for c, r in zip(contexts[1:], rates[1:]):
            if r is not None:
                num += int(c.sum()) * max(0.0, ref - r - 2.0 * (ref * (1 - ref) / int(c.sum())) ** 0.5)
                den += int(c.sum()) * ref
    return num / den


def test_absorption_is_the_documented_sum_over_contexts(data):
    """A parent latent that keeps firing only alongside its first child: the score equals the definition computed
    by hand, and sits between none and full absorption."""
    model, x, acts = data
    latents = acts.clone()
    for p in model.parent[model.parent >= 0].unique().tolist():
        kids = (model.parent == p).nonzero().squeeze(1)
        latents[(acts[:, kids[1:]] > 0).any(1), p] = 0
    got = ground_truth_metrics(RowOracle(x, latents), model.features, x, acts, model.features, model.parent)
    assert got["absorption"] == pytest.approx(_absorption_by_hand(latents, acts, model.parent), abs=1e-9)
    assert 0.3 < got["absorption"] < 0.9


def test_per_latent_precision_and_recall_by_hand():
    """Two true features along the axes, three latents: a perfect detector of feature 0, a latent along feature 1
    that fires on rows 0-1 where feature 1 fires on rows 1-2, and a dead latent along feature 1."""
    features = torch.eye(2)
    acts = torch.tensor([[1.0, 0.0], [1.0, 2.0], [0.0, 3.0], [0.0, 0.0]])
    x = acts @ features
    z = torch.tensor([[1.0, 0.5, 0.0], [1.0, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    w_dec = torch.tensor([[1.0, 0.0], [0.1, 1.0], [0.0, 1.0]])
    got = ground_truth_metrics(RowOracle(x, z), w_dec, x, acts, features)
    assert got["precision"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert got["recall"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert got["f1"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert got["dead"] == pytest.approx(1 / 3) and got["l0"] == pytest.approx(1.0)
    assert got["uniqueness"] == pytest.approx(2 / 3)
    assert got["mcc"] == pytest.approx((1 + 1) / 2)  # latents 0 and 2 match the two features exactly


def test_bad_shapes_are_refused(data):
    model, x, acts = data
    with pytest.raises(SAEError, match="acts"):
        ground_truth_metrics(lambda xc: xc, model.features, x, acts[:, :10], model.features)
    with pytest.raises(SAEError, match="encode gave"):
        ground_truth_metrics(lambda xc: xc, model.features, x, acts, model.features)
    with pytest.raises(SAEError, match="width"):
        ground_truth_metrics(lambda xc: xc, model.features[:, :5], x, acts, model.features)


@pytest.mark.slow  # importing sae_lens takes several seconds
def test_the_definitions_match_saelens_synthetic_evals(data):
    """Our numbers equal sae_lens.synthetic.evals' on the same latents, decoder and true features."""
    evals = pytest.importorskip("sae_lens.synthetic.evals")
    from sae_lens.evals import ExplainedVarianceCalculator

    model, x, acts = data
    x, acts = x[:4000], acts[:4000]
    g = torch.Generator().manual_seed(3)
    w_dec = model.features[torch.randperm(CFG.n_features, generator=g)[:300]] + 0.3 * torch.randn(300, 48, generator=g)
    w_dec[:100] = model.features[:100] + 0.05 * torch.randn(100, 48, generator=g)
    z = torch.relu(x @ w_dec.T - 3.0)
    z[:, 280:] = 0  # some dead latents
    b_dec = 0.1 * torch.randn(48, generator=g)
    ours = ground_truth_metrics(RowOracle(x, z), w_dec, x, acts, model.features, model.parent, b_dec=b_dec)
    x_hat = z @ w_dec + b_dec
    cls = evals.compute_classification_metrics(z, acts, w_dec, model.features)
    shrink, l0, dead, ev = (
        evals.ShrinkageCalculator(),
        evals.L0Calculator(),
        evals.DeadLatentsCalculator(300),
        ExplainedVarianceCalculator(),
    )
    shrink.add_batch(x_hat, x)
    l0.add_batch(z)
    dead.add_batch(z)
    ev.add_batch(x_hat, x)
    theirs = {
        "mcc": evals.mean_correlation_coefficient(w_dec, model.features),
        "uniqueness": evals.feature_uniqueness(w_dec, model.features),
        "precision": cls.precision,
        "recall": cls.recall,
        "f1": cls.f1_score,
        "shrinkage": shrink.compute(),
        "l0": l0.compute(),
        "dead": dead.compute() / 300,
        "explained_variance": ev.compute(),
    }
    assert 0.05 < theirs["f1"] < 0.95 and theirs["dead"] > 0  # an example where every number says something
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=1e-4), key


@pytest.mark.slow  # importing sae_lens takes several seconds
def test_parent_from_a_saelens_hierarchy_follows_its_gating():
    """The parent tensor read from a SAELens hierarchy says exactly which features SAELens' own modifier silences
    when their parent is off."""
    hierarchy = pytest.importorskip("sae_lens.synthetic.hierarchy")
    config = hierarchy.HierarchyConfig(total_root_nodes=3, branching_factor=(2, 4), max_depth=2)
    tree = hierarchy.generate_hierarchy(80, config, seed=0)
    parent = parent_from_tree(tree.roots, 80)
    assert int((parent >= 0).sum()) > 0
    acts = (torch.rand(2000, 80, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    gated = tree.modifier(acts)
    on = gated > 0
    kids = (parent >= 0).nonzero().squeeze(1)
    assert not bool((on[:, kids] & ~on[:, parent[kids]]).any())  # a child never fires without its parent
    free = (parent < 0).nonzero().squeeze(1)
    assert torch.equal(gated[:, free], acts[:, free])  # features with no parent are never gated
    assert bool((acts[:, kids] > gated[:, kids]).any())
