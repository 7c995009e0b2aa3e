"""SAE quality against ground truth: every contender at its best on the same synthetic activations, at matched L0.

Data (``synthetic``): thoughtscope's deterministic generator (:mod:`thoughtscope.sae.synthetic`, SynthSAEBench's
design: many more true features than dimensions, Zipfian firing, a parent / child hierarchy, low-rank correlations,
magnitude noise, true L0 about 30). One training pool, a validation sample (learning-rate and sparsity choice) and
a test sample (every reported figure), each drawn from its own seed; every contender trains on the same batch
sequence from the pool. ``synthetic_saelens_gen``: the same contenders on data from SAELens' own SynthSAEBench
generator (``sae_lens.synthetic.SyntheticModel``, built offline from a config with SynthSAEBench-16k's settings
scaled to a CPU size: Zipf exponent 0.5 between 0.4 and 5e-4, trees of branching 4 and depth 3 over about two thirds
of the features with mutually exclusive children, low-rank correlations rank 25 scale 0.1, magnitudes 5 to 4 with
folded-normal noise), so our figures sit beside the published table. Scaled down, its true L0 is far below
SynthSAEBench-16k's 34, so it is compared where SynthSAEBench compares (L0 25 = the true L0 of its 4,096 most
frequent features, its SAE width): at the true L0 of the ``n_latents`` most frequent features (``headline_l0``
under ``data.synthetic_saelens_gen``), its other targets scaled alike.

Contenders (``_synthetic_contenders.py``): thoughtscope's relu-l1, topk, batchtopk, jumprelu and matryoshka;
SAELens' standard (ReLU-L1), topk, batchtopk, jumprelu and matryoshka_batchtopk through its own ``SAETrainer``;
sparsify's TopK. SAE width is a quarter of the true feature count, as SynthSAEBench recommends (4,096 latents on
16,384 features).

Rules. Learning rate: one shared grid of multipliers of each tool's documented default; at each grid point a
contender trains once at the headline L0's setting (k = 25; a coefficient: its default, then one search step), and
its lr is the one with the best validation F1 at L0 25 among those that pass the sanity bounds. Matched L0, at that
lr: the top-k family's k, the L1 coefficient of ReLU-L1 and the L0 coefficient of JumpReLU are searched (secant in
log setting / log L0; a fixed step of at most 10x while the target is not bracketed) until each target L0 (15, 25,
40) is bracketed with a point within 10 %; TopK hits its L0 at k exactly, BatchTopK's learned threshold need not. A
contender's front is its points at the chosen lr, sorted by L0. Its headline figures are its test metrics at L0 25,
linearly interpolated in log L0 between the two points of its front that bracket 25 (``bracketed`` false: the
nearest point, and ``nearest_l0_rel_gap``). Sanity rule (``_race.check_sane``): a contender whose point nearest L0
25 is no better than predicting the mean (test FVU = 1 - explained variance >= 1) or has half its latents dead
stops the benchmark: a harness bug, not a result.

Metrics: :func:`thoughtscope.sae.groundtruth.ground_truth_metrics` (F1 / precision / recall of each latent against
the firing of its best-matching true feature, MCC after Hungarian matching of decoder directions, uniqueness,
absorption, explained variance, L0, dead share, shrinkage; definitions in its docstring, matching
``sae_lens.synthetic.evals``). Figures: ``synthetic.<contender>.{f1, mcc, uniqueness, absorption,
explained_variance, l0, dead, shrinkage, lr, points}``, ``f1_ours_best_vs_saelens_best`` (our best F1 over SAELens'
best at L0 25, among contenders that explain at least half the test variance there; goal >= 1),
``f1_ratio_by_arch`` (ours over SAELens' for each architecture both have: F1 can favour an SAE that barely
reconstructs, so read it beside explained variance), ``matryoshka_minus_batchtopk_f1`` (ours;
goal > 0), the same under
``synthetic_saelens_gen``, and with ``--real`` (on by default at full size) ``real.<sae>.{sparse_probing_auc,
absorption, detection_auroc, spliced_loss}`` on the real model for the default SAE and each ``--real-sae NAME=PATH``.

Sizes. ``--quick`` (under 5 minutes on 2 shared cores, one torch thread): 1,024 true features in 128 dimensions,
256 latents, batch 512 x 200 steps from a 65,536-row pool, grid x1 / x16 (a run this short wants the high end, and
thoughtscope's ReLU-L1 default, 5e-5, is tuned for ~30k steps; sparsify's rule, 5e-3 x sqrt(2^14 / m), already sits
there), only the L0-25 point of each front, 8,192 validation and test rows; on SAELens' generator each contender
keeps the lr it won on ours. Full (about an hour per tool on one core; fronts and the second generator add to it):
2,048 true features in 512 dimensions, 512 latents, batch 1,024 x 3,000 steps from a 262,144-row pool, grid x1 / x4
/ x16, fronts at L0 15 / 25 / 40, 16,384 validation and test rows, the whole procedure on both generators, and the
real-model figures. The width matters more than the step count: in 128 dimensions the interference of 30 active
features (random directions meet at |cosine| ~ 1/sqrt(d)) drowns them, and every contender scores F1 0.1-0.3 with
no architecture's advantage visible; SynthSAEBench itself uses 768 dimensions.

    python benchmarks/sae_quality.py --quick --json out.json

Runs of the same data split by contender (one process per core: ``--contenders``) or with the grid widened later
(``--grid 16``) make one result with ``--merge a.json b.json --json out.json``: each contender keeps the lr whose
validation F1 is best across the runs, the rule a single run applies; ``--replace`` instead takes a contender re-run
after a change to its code from the later run only. ``--seeds N`` re-trains each contender's L0-25 points from N - 1
more weight seeds (same data, batches, lr and k) and adds the mean F1 and its spread (``f1_by_seed``,
``f1_seed_mean``, ``f1_seed_sd``, and ``f1_ours_best_vs_saelens_best_seed_mean``): one seed's F1 moves by about 0.01
at the full size, as much as the gap between the tools' best. A seeds-only run at the lr a grid run chose merges
into that run's row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the peers' progress bars would interleave

import _settings
import torch
from _data import ShuffledBatches
from _race import InsaneContender, check_sane
from _synthetic_contenders import Fitted, all_contenders

from thoughtscope._io import atomic_write_json

METRIC_KEYS = ("f1", "precision", "recall", "mcc", "uniqueness", "absorption", "explained_variance", "l0", "dead")
METRIC_KEYS += ("shrinkage", "fvu")


def sizes(args) -> dict:
    quick = {
        "n_true": 1024,
        "d_model": 128,
        "n_latents": 256,
        "true_l0": 30.0,
        "headline_l0": 25.0,
        "batch_size": 512,
        "steps": 200,
        "pool_rows": 65_536,
        "eval_rows": 8192,
        "grid": "1,16",
        "targets": "25",
        "search_runs": 3,
        "gen_full": False,
    }
    full = {
        "n_true": 2048,
        "d_model": 512,
        "n_latents": 512,
        "true_l0": 30.0,
        "headline_l0": 25.0,
        "batch_size": 1024,
        "steps": 3000,
        "pool_rows": 262_144,
        "eval_rows": 16_384,
        "grid": "1,4,16",
        "targets": "15,25,40",
        "search_runs": 3,
        "gen_full": True,
    }
    base = quick if args.quick else full
    return {key: (getattr(args, key) if getattr(args, key, None) is not None else v) for key, v in base.items()}


@dataclass
class Data:
    """One generator's rows: the training pool, validation and test samples with their true activations."""

    pool: torch.Tensor
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    features: torch.Tensor
    parent: torch.Tensor | None
    info: dict


def _x_only(sample, n: int, chunk: int = 8192) -> torch.Tensor:
    """``n`` rows of x from ``sample(rows, i) -> (x, acts)``, in chunks so the dense true activations stay small."""
    return torch.cat([sample(min(chunk, n - i), i)[0] for i in range(0, n, chunk)])


def true_stats(acts: torch.Tensor, parent: torch.Tensor | None, m: int) -> dict:
    """True L0, and the true L0 of the ``m`` most frequent features alone (what an SAE of m latents can cover;
    SynthSAEBench compares at that L0: 25 for 4,096 latents on its 16,384 features)."""
    fires = acts > 0
    top = fires.float().mean(0).topk(min(m, fires.shape[1])).indices
    out = {
        "true_l0": float(fires.sum(1).float().mean()),
        "true_l0_top_m": float(fires[:, top].sum(1).float().mean()),
        "features_never_firing": int((~fires.any(0)).sum()),
    }
    if parent is not None:
        out["children"] = int((parent >= 0).sum())
    return out


def data_ours(sz: dict, seed: int) -> Data:
    from thoughtscope.sae.synthetic import SyntheticActivations, SyntheticConfig

    # its default hierarchy (32 trees of branching 4 and depth 3 on 4,096 features) scaled with the feature count
    roots = max(1, sz["n_true"] * SyntheticConfig.hierarchy_roots // 4096)
    cfg = SyntheticConfig(
        n_features=sz["n_true"], d_model=sz["d_model"], target_l0=sz["true_l0"], hierarchy_roots=roots, seed=seed
    )
    gen = SyntheticActivations(cfg)
    pool = gen.sample_x(sz["pool_rows"], seed=1)
    val, test = gen.sample(sz["eval_rows"], seed=2), gen.sample(sz["eval_rows"], seed=3)
    info = {
        "generator": "thoughtscope.sae.synthetic",
        "config": _plain(cfg),
        **true_stats(test[1], gen.parent, sz["n_latents"]),
    }
    return Data(pool, val, test, gen.features, gen.parent, info)


def saelens_model_config(n_true: int, d: int, seed: int):
    """SynthSAEBench-16k's documented settings (docs/synth_sae_bench.md in SAELens) at a CPU size: the hierarchy's
    root count scaled with the feature count (128 roots of branching 4, depth 3 for 16,384), the rest as published."""
    from sae_lens.synthetic import (
        FoldedNormalMagnitudeConfig,
        HierarchyConfig,
        LinearMagnitudeConfig,
        LowRankCorrelationConfig,
        OrthogonalizationConfig,
        SyntheticModelConfig,
        ZipfianFiringProbabilityConfig,
    )

    return SyntheticModelConfig(
        num_features=n_true,
        hidden_dim=d,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=5e-4),
        hierarchy=HierarchyConfig(
            total_root_nodes=max(1, n_true * 128 // 16384),
            branching_factor=4,
            max_depth=3,
            mutually_exclusive_portion=1.0,
            compensate_probabilities=True,
            scale_children_by_parent=True,
        ),
        orthogonalization=OrthogonalizationConfig(num_steps=100, lr=3e-4),
        correlation=LowRankCorrelationConfig(rank=25, correlation_scale=0.1),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        seed=seed,
    )


def data_saelens(sz: dict, seed: int) -> Data:
    import logging

    from sae_lens.synthetic import SyntheticModel

    from thoughtscope.sae.groundtruth import parent_from_tree

    logging.getLogger("sae_lens").setLevel(logging.ERROR)
    cfg = saelens_model_config(sz["n_true"], sz["d_model"], seed)
    sm = SyntheticModel(cfg)

    def sample(n, i):
        torch.manual_seed(seed * 1_000_003 + i)
        return sm.sample_with_features(n)

    pool = _x_only(lambda n, i: sample(n, 1 + i), sz["pool_rows"])
    val, test = sample(sz["eval_rows"], 999_001), sample(sz["eval_rows"], 999_002)
    parent = parent_from_tree(sm.hierarchy.roots if sm.hierarchy else [], sz["n_true"])
    feats = sm.feature_dict.feature_vectors.detach()
    info = {
        "generator": "sae_lens.synthetic.SyntheticModel",
        "config": cfg.to_dict(),
        **true_stats(test[1], parent, sz["n_latents"]),
    }
    return Data(pool, (val[0], val[1].to_dense()), (test[0], test[1].to_dense()), feats, parent, info)


def _plain(cfg) -> dict:
    from dataclasses import asdict

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}


@torch.no_grad()
def measure(f: Fitted, xa: tuple[torch.Tensor, torch.Tensor], data: Data) -> dict:
    """Ground-truth metrics of one trained contender on one sample, plus the race's FVU (full decode, b_dec too)."""
    from thoughtscope.sae.groundtruth import ground_truth_metrics

    x, acts = xa
    m = ground_truth_metrics(f.encode, f.W_dec, x, acts, data.features, parent=data.parent, decode=f.decode)
    m = {k: float(v) for k, v in m.items()}
    # the race's names for the sanity rule: FVU (the mean of x as baseline) is 1 - explained variance
    return {**m, "fvu": 1.0 - m["explained_variance"], "dead_frac": m["dead"]}


def _log_gap(l0: float, target: float) -> float:
    return abs(math.log(max(l0, 1e-9) / target))


def at_l0(points: list[dict], target: float, split: str) -> dict:
    """Every metric of a front at ``target`` L0: linear in log L0 between the bracketing points, else the nearest."""
    pts = [p for p in points if p[split]["l0"] > 0]
    below = [p for p in pts if p[split]["l0"] <= target]
    above = [p for p in pts if p[split]["l0"] >= target]
    nearest = min(pts or points, key=lambda p: _log_gap(p[split]["l0"], target))
    if below and above:
        lo, hi = max(below, key=lambda p: p[split]["l0"]), min(above, key=lambda p: p[split]["l0"])
        a, b = lo[split]["l0"], hi[split]["l0"]
        t = 0.0 if a == b else math.log(target / a) / math.log(b / a)
        out = {k: lo[split][k] + t * (hi[split][k] - lo[split][k]) for k in METRIC_KEYS if k in lo[split]}
        out["l0"] = target  # the interpolation is in log L0: its point sits at the target by construction
        return {**out, "bracketed": True, "between_l0": [a, b], "nearest_l0_rel_gap": nearest[split]["l0"] / target - 1}
    out = {k: nearest[split][k] for k in METRIC_KEYS if k in nearest[split]}
    return {**out, "bracketed": False, "between_l0": None, "nearest_l0_rel_gap": nearest[split]["l0"] / target - 1}


def next_knob(points: list[tuple[float, float]], target: float) -> float:
    """The next sparsity coefficient to try for ``target`` L0, from (coefficient, L0) points (L0 falls as it rises).

    Bracketed: the log-log interpolation between the two bracketing points, kept inside their middle half (so a
    cliff in the curve, where L0 collapses, still halves the bracket in a few steps). Not
    bracketed: a step from the end point towards the target by the L0 ratio (slope -1 in log-log), at least 1.5x and
    at most 10x, so a flat stretch (every latent dead, L0 near 0) still moves it the right way.
    """
    below = [p for p in points if p[1] <= target]
    above = [p for p in points if p[1] > target]
    if below and above:
        (k_lo, l_lo), (k_hi, l_hi) = max(above, key=lambda p: p[0]), min(below, key=lambda p: p[0])
        a, b = math.log(k_lo), math.log(k_hi)
        ya, yb = math.log(max(l_lo, 1e-3) / target), math.log(max(l_hi, 1e-3) / target)
        x = (a + b) / 2 if ya == yb else a - ya * (b - a) / (yb - ya)
        return math.exp(min(max(x, a + 0.25 * (b - a)), b - 0.25 * (b - a)))
    if above:  # every point too dense: raise the coefficient from the sparsest point
        k, l0 = max(above, key=lambda p: p[0])
        return k * min(10.0, max(1.5, l0 / target))
    k, l0 = min(below, key=lambda p: p[0])  # every point too sparse: lower it from the densest point
    return k / min(10.0, max(1.5, target / max(l0, target / 10)))


class Runner:
    """Trains one contender at (lr, knob) points on the shared batches and keeps every point's validation metrics."""

    def __init__(self, c, batches, data: Data, log):
        self.c, self.batches, self.data, self.log = c, batches, data, log

    def point(self, lr: float, knob: float) -> dict:
        t0 = time.perf_counter()
        f = self.c.fit(self.batches, lr, knob)
        p = {"lr": lr, "knob": knob, "seconds": time.perf_counter() - t0, "_fitted": f}
        p["val"] = measure(f, self.data.val, self.data)
        v = p["val"]
        self.log(
            f"    {self.c.name:32s} lr {lr:.3g} {self.c.knob} {knob:.4g}: L0 {v['l0']:.1f} F1 {v['f1']:.3f} "
            f"MCC {v['mcc']:.3f} FVU {v['fvu']:.3f} dead {v['dead_frac']:.0%} ({p['seconds']:.1f} s)"
        )
        return p

    def reach(self, lr: float, points: list[dict], target: float, runs: int, start: float) -> None:
        """Add points at ``lr`` (``runs`` at most, the first at ``start`` when ``lr`` has none) until ``target`` L0 is
        bracketed with the nearest point within 10 %. The top-k family starts at k = target (TopK's L0 is k exactly;
        BatchTopK's threshold can land elsewhere) and searches k, whose L0 rises with it."""
        mine = [p for p in points if p["lr"] == lr]
        is_k = self.c.knob == "k"
        if is_k:
            start = float(max(1, round(target)))
        if not mine or (is_k and not any(p["knob"] == start for p in mine)):
            mine.append(self.point(lr, start))
            points.append(mine[-1])
            runs -= 1
        for _ in range(runs):
            l0s = [p["val"]["l0"] for p in mine]
            near = min(l0s, key=lambda v: _log_gap(v, target))
            if min(l0s) <= target <= max(l0s) and abs(near / target - 1) <= 0.1:
                return
            if len(mine) >= 3 and max(l0s[-3:]) <= 1.02 * min(l0s[-3:]):
                return  # three settings, one L0: the setting does not move L0 in this budget
            if is_k:  # L0 rises with k: search 1/k with the coefficient rule
                knob = 1 / next_knob([(1 / p["knob"], p["val"]["l0"]) for p in mine], target)
                knob = float(max(1, round(knob)))
            else:
                knob = next_knob([(p["knob"], p["val"]["l0"]) for p in mine], target)
            if any(abs(math.log(knob / p["knob"])) < 1e-3 for p in mine):
                return
            mine.append(self.point(lr, knob))
            points.append(mine[-1])


def _sane(m: dict) -> bool:
    return m["fvu"] < 1 and m["dead_frac"] < 0.5  # the bounds of _race.check_sane


def lr_rank(score: dict) -> tuple:
    """How one lr of the grid ranks: sane first, then validation F1 at the headline L0, then the smaller lr."""
    return (score["sane"], score["val_f1_at_l0"], -score["lr_multiplier"])


def best_front(
    c, batches, data: Data, sz: dict, targets: list[float], grid: list[float], log, *, lazy: bool = False
) -> dict:
    """One contender at its best: the lr of the grid with the best validation F1 at the headline L0, then its front.

    Every lr of ``grid`` gets a look (one run, or two for a coefficient). A lr whose point nearest the headline
    breaks the sanity bounds, on validation or after its front is trained on test, is passed over for the next
    best; the benchmark stops only when every lr does. ``lazy``: the grid's lrs are looked at in order, the next
    only when none so far passes (the run on SAELens' generator, starting from the lr won on ours).
    """
    run = Runner(c, batches, data, log)
    head_l0 = sz["headline_l0"]
    points: list[dict] = []
    start = c.default_knob()  # every lr starts from the tool's default coefficient: its L0 moves with the lr
    scores: list[dict] = []
    pending = list(grid)

    def look(mult: float) -> None:
        lr = mult * c.default_lr()
        run.reach(lr, points, head_l0, 1 if c.knob == "k" else min(2, sz["search_runs"]), start)
        mine = [p for p in points if p["lr"] == lr]
        head = at_l0(mine, head_l0, "val")
        near = min(mine, key=lambda p: _log_gap(p["val"]["l0"], head_l0))
        scores.append(
            {
                "lr_multiplier": mult,
                "lr": lr,
                "val_f1_at_l0": head["f1"],
                "bracketed": head["bracketed"],
                "sane": _sane(near["val"]),
            }
        )

    while pending and (not lazy or not any(sc["sane"] for sc in scores)):
        look(pending.pop(0))
    rejected: list[float] = []
    while True:
        cands = [sc for sc in scores if sc["lr_multiplier"] not in rejected]
        win = max(cands, key=lr_rank)
        lr = win["lr"]
        for t in [head_l0] + [t for t in targets if t != head_l0]:  # the top-k family's k search, then the front
            near = min((p for p in points if p["lr"] == lr), key=lambda p: _log_gap(p["val"]["l0"], t))
            run.reach(lr, points, t, sz["search_runs"], near["knob"])
        front = sorted((p for p in points if p["lr"] == lr), key=lambda p: p["val"]["l0"])
        for p in front:
            if "test" not in p:
                p["test"] = measure(p.pop("_fitted"), data.test, data)
        nearest = min(front, key=lambda p: _log_gap(p["test"]["l0"], head_l0))
        if _sane(nearest["test"]) or (len(cands) == 1 and not pending):
            break
        rejected.append(win["lr_multiplier"])
        log(f"  {c.name}: lr {lr:.3g} breaks the sanity bounds at L0 {nearest['test']['l0']:.1f}; next lr")
        if pending and len(cands) == 1:
            look(pending.pop(0))
    check_sane(c.name, nearest["test"])
    head = at_l0(front, head_l0, "test")
    return {
        **head,
        "lr": lr,
        "lr_multiplier": win["lr_multiplier"],
        "knob": c.knob,
        "lr_grid": scores,
        "lr_rejected_by_sanity": rejected,
        "points": [{k: v for k, v in p.items() if not k.startswith("_")} for p in front],
        "runs": len(points),
        "train_seconds": sum(p["seconds"] for p in points),
        "settings": c.settings(),
    }


def reseed(c, batches, data: Data, sz: dict, row: dict, n_seeds: int, log) -> dict:
    """A contender's headline figures again from other initial weights: the points of its front that its L0-25
    figures are read from (the bracketing pair, or the nearest), re-trained at the chosen lr and settings on the same
    batches with weight seeds ``seed + 1 .. seed + n_seeds - 1``, read at L0 25 the same way. One seed's F1 moves by
    about 0.01 here, as much as some gaps between the tools, so the table says how much of a gap that is."""
    head = sz["headline_l0"]
    pts = row["points"]
    if row["between_l0"]:
        lo, hi = row["between_l0"]
        used = [p for p in pts if p["test"]["l0"] in (lo, hi)]
    else:
        used = [min(pts, key=lambda p: _log_gap(p["test"]["l0"], head))]
    base = c.seed
    f1s, evs = [row["f1"]], [row["explained_variance"]]
    try:
        for extra in range(1, n_seeds):
            c.seed = base + extra
            again = []
            for p in used:
                t0 = time.perf_counter()
                again.append({"test": measure(c.fit(batches, row["lr"], p["knob"]), data.test, data)})
                log(
                    f"    {c.name:32s} seed {c.seed} {c.knob} {p['knob']:.4g}: test L0 {again[-1]['test']['l0']:.1f} "
                    f"F1 {again[-1]['test']['f1']:.3f} ({time.perf_counter() - t0:.1f} s)"
                )
            h = at_l0(again, head, "test")
            f1s.append(h["f1"])
            evs.append(h["explained_variance"])
    finally:
        c.seed = base
    return {
        "seeds": [base + i for i in range(n_seeds)],
        "f1_by_seed": f1s,
        "f1_seed_mean": statistics.fmean(f1s),
        "f1_seed_sd": statistics.stdev(f1s) if len(f1s) > 1 else 0.0,
        "explained_variance_seed_mean": statistics.fmean(evs),
    }


#: a dictionary that explains less than half the variance at L0 25 is not one anyone would use, however selectively
#: its latents fire (an L1 penalty strong enough to reach a low L0 early in training shrinks the code toward 0 and
#: can score a high F1 that way); such contenders stay in the table but cannot be a tool's "best"
MIN_EXPLAINED_VARIANCE = 0.5


def summarise(rows: dict) -> dict:
    """The two acceptance figures of one generator's table (None where a side did not run)."""

    def best(tool):
        cand = {
            n: r["f1"]
            for n, r in rows.items()
            if n.startswith(tool + "-") and (r.get("explained_variance") or 0) >= MIN_EXPLAINED_VARIANCE
        }
        return (max(cand, key=cand.get), max(cand.values())) if cand else (None, None)

    (on, of), (sn, sf) = best("thoughtscope"), best("saelens")
    # each tool's best again as the mean over weight seeds, where both were re-trained with seeds (--seeds)
    om, sm = (rows[n].get("f1_seed_mean") if n else None for n in (on, sn))
    out = {
        "f1_ours_best": {"contender": on, "f1": of, "f1_seed_mean": om},
        "f1_saelens_best": {"contender": sn, "f1": sf, "f1_seed_mean": sm},
        "f1_ours_best_vs_saelens_best": (of / sf) if of is not None and sf else None,
        "f1_ours_best_vs_saelens_best_seed_mean": (om / sm) if om is not None and sm else None,
        "best_needs_explained_variance": MIN_EXPLAINED_VARIANCE,
        "not_eligible_for_best": sorted(
            n for n, r in rows.items() if (r.get("explained_variance") or 0) < MIN_EXPLAINED_VARIANCE
        ),
    }
    pairs = {  # the same architecture in both tools
        "relu-l1": ("thoughtscope-relu-l1", "saelens-standard"),
        **{a: (f"thoughtscope-{a}", f"saelens-{a}") for a in ("topk", "batchtopk", "jumprelu")},
        "matryoshka": ("thoughtscope-matryoshka", "saelens-matryoshka_batchtopk"),
    }
    out["f1_ratio_by_arch"] = {
        a: rows[o]["f1"] / rows[p]["f1"] if o in rows and p in rows and rows[p]["f1"] else None
        for a, (o, p) in pairs.items()
    }
    for tool, key in (
        ("thoughtscope", "matryoshka_minus_batchtopk_f1"),
        ("saelens", "saelens_matryoshka_minus_batchtopk_f1"),
    ):
        mat = rows.get(f"{tool}-matryoshka" if tool == "thoughtscope" else "saelens-matryoshka_batchtopk")
        btk = rows.get(f"{tool}-batchtopk")
        out[key] = (mat["f1"] - btk["f1"]) if mat and btk else None
    return out


def race(data: Data, sz: dict, args, log, *, lrs: dict | None = None) -> tuple[dict, dict]:
    """Every contender on one generator's data; ``lrs``: a fixed lr multiplier per contender (no grid)."""
    batches = ShuffledBatches(data.pool, sz["batch_size"], sz["steps"], seed=args.seed)
    contenders, skipped = all_contenders(
        sz["d_model"], sz["n_latents"], batch_size=sz["batch_size"], n_steps=sz["steps"], seed=args.seed,
        ours_changed=getattr(args, "ours_changed", None),
    )  # fmt: skip
    only = {s.strip() for s in args.contenders.split(",")} if args.contenders else None
    grid = [float(g) for g in str(sz["grid"]).split(",")]
    targets = [float(t) for t in str(sz["targets"]).split(",")]
    rows, insane = {}, {}
    for c in contenders:
        if only and c.name not in only:
            continue
        won = lrs.get(c.name) if lrs else None  # the lr won on ours first, the rest of the grid if it fails
        g = grid if won is None else [won] + [m for m in grid if m != won]
        t = targets if lrs is None or sz["gen_full"] else [sz["headline_l0"]]  # fixed lrs (quick): the headline only
        log(f"  {c.name}: lr grid {g} x {c.default_lr():.3g}, targets L0 {t}")
        try:
            rows[c.name] = best_front(c, batches, data, sz, t, g, log, lazy=won is not None)
        except InsaneContender as e:  # the run still fails (main), but the other contenders' hours are kept
            insane[c.name] = str(e)
            log(f"  {e}")
            continue
        r = rows[c.name]
        if args.seeds > 1:
            r.update(reseed(c, batches, data, sz, r, args.seeds, log))
            log(f"  {c.name}: F1 by seed {', '.join(f'{f:.3f}' for f in r['f1_by_seed'])}")
        log(
            f"  {c.name}: lr {r['lr']:.3g} -> test at L0 {sz['headline_l0']:g}"
            f"{'' if r['bracketed'] else ' (nearest, not bracketed)'}: F1 {r['f1']:.3f} MCC {r['mcc']:.3f} "
            f"absorption {r['absorption']:.3f} EV {r['explained_variance']:.3f} dead {r['dead']:.3g}"
        )
    if insane:
        skipped["insane"] = insane
    return rows, skipped


def real_quality(args, log) -> dict:
    """``real.<sae>``: the real-model quality of the shipped default SAE and of each ``--real-sae NAME=PATH``
    (:func:`thoughtscope.probes.sae_quality.real_quality` on the default model, the same budgets for all)."""
    try:
        from thoughtscope.probes.sae_quality import real_quality as quality
    except ImportError as e:
        return {"status": "not built", "note": f"the real-model quality function is not in this checkout ({e})"}
    saes = {"default": "default"}
    for item in args.real_sae:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--real-sae {item!r}: expected NAME=PATH")
        saes[name] = path
    from thoughtscope.models import load_model

    lm = load_model("default")  # once, for every SAE
    out = {}
    for name, sae in saes.items():
        log(f"real model: {name} ({sae})")
        t0 = time.perf_counter()
        out[name] = quality(sae, lm, tokens=args.real_tokens, seed=args.seed)
        r = out[name]
        log(
            f"  {name}: sparse probing AUC {r['sparse_probing_auc']:.3f}, absorption {r['absorption']:.3f}, "
            f"detection AUROC {r['detection_auroc']:.3f}, spliced loss {r['spliced_loss']:.3f} "
            f"({time.perf_counter() - t0:.0f} s)"
        )
    return out


class MergeError(ValueError):
    """Runs that cannot be merged: a different data set or training budget, or the same section twice."""


def _chosen_score(row: dict) -> tuple:
    """A contender's row ranked by the lr it chose, as best_front ranks lrs (:func:`lr_rank`)."""
    return lr_rank(next(g for g in row["lr_grid"] if g["lr_multiplier"] == row["lr_multiplier"]))


SEED_KEYS = ("seeds", "f1_by_seed", "f1_seed_mean", "f1_seed_sd", "explained_variance_seed_mean")


def _same_lr(a: dict, b: dict) -> bool:
    """Two runs' rows of one contender at the same chosen lr (a seeds-only re-run at the lr the grid search chose).
    Their first seeds' figures need not agree to the bit: SAELens' trainer does not repeat a run exactly across
    processes (the same seed, batches and settings gave validation F1 0.714 at L0 24.8, then 0.720 at L0 24.7)."""
    return a["lr_multiplier"] == b["lr_multiplier"]


def merge(figs: list[dict], names: list[str], *, replace: bool = False) -> dict:
    """One result from runs of the same data split by contender or by lr grid (two processes on two cores, or an
    lr grid widened afterwards): for a contender in several runs, the run whose chosen lr scores best on
    validation, by the rule of :func:`best_front`, with every lr each run tried listed in its ``lr_grid``.

    ``replace``: a contender in a later run replaces its rows of the earlier runs outright (it was re-run after a
    change to its code, so the older figures measure something that no longer ships); ``replaced`` lists them.
    """
    if not figs:
        raise MergeError("nothing to merge")
    base = {k: v for k, v in figs[0]["sizes"].items() if k != "grid"}
    rows: dict = {}
    replaced: dict[str, str] = {}
    for fig, name in zip(figs, names):
        sz = {k: v for k, v in fig["sizes"].items() if k != "grid"}
        if sz != base or fig.get("data", {}).get("synthetic") != figs[0].get("data", {}).get("synthetic"):
            raise MergeError(f"{name}: sizes or data {sz} differ from {names[0]}'s {base}; only the grid may differ")
        for c, row in fig["synthetic"].items():
            old = rows.get(c)
            if replace and old is not None:
                replaced[c] = name
                old = None
            best = row if old is None or _chosen_score(row) > _chosen_score(old) else old
            tried = {g["lr_multiplier"]: g for g in [*(old or {}).get("lr_grid", []), *row["lr_grid"]]}
            rows[c] = {**best, "lr_grid": [tried[m] for m in sorted(tried)]}
            other = old if best is row else row
            if other and "f1_by_seed" in other and "f1_by_seed" not in best and _same_lr(best, other):
                rows[c].update({k: other[k] for k in SEED_KEYS})  # its seeds, run apart at the same lr
    out = {k: v for k, v in figs[0].items() if k not in ("synthetic", "real", "command", "wall_seconds")}
    grids = sorted({float(g) for fig in figs for g in str(fig["sizes"]["grid"]).split(",")})
    out["sizes"] = {**figs[0]["sizes"], "grid": ",".join(f"{g:g}" for g in grids)}
    out["synthetic"] = rows
    out["skipped"] = {}
    for fig in figs:  # what each run left out (a contender not installed, one that broke the sanity bounds)
        for key, why in (fig.get("skipped") or {}).items():
            out["skipped"][key] = (
                {**out["skipped"][key], **why} if isinstance(why, dict) and key in out["skipped"] else why
            )
    out.update(summarise(rows))
    for key in ("real", "synthetic_saelens_gen"):
        held = [(fig[key], name) for fig, name in zip(figs, names) if fig.get(key)]
        if len(held) > 1:
            raise MergeError(f"{key} is in both {held[0][1]} and {held[1][1]}; merge keeps one of each")
        if held:
            out[key] = held[0][0]
    if "synthetic_saelens_gen" in out:
        out["synthetic_saelens_gen_summary"] = summarise(out["synthetic_saelens_gen"])
    out["wall_seconds"] = sum(fig.get("wall_seconds", 0.0) for fig in figs)
    out["merged_from"] = [
        {"file": name, "command": fig.get("command"), "contenders": sorted(fig["synthetic"])}
        for fig, name in zip(figs, names)
    ]
    if replace:
        out["replaced"] = replaced  # contender -> the run whose rows replaced the earlier runs'
        grids = sorted({float(g["lr_multiplier"]) for row in rows.values() for g in row["lr_grid"]})
        out["sizes"]["grid"] = ",".join(f"{g:g}" for g in grids)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small run (about 4 minutes on 2 cores)")
    p.add_argument("--json", type=Path, help="write the figures here")
    for key, kind, what in (
        ("n_true", int, "true features of the generators"),
        ("d_model", int, "dimensions of the activations"),
        ("n_latents", int, "latents of every SAE"),
        ("true_l0", float, "mean true features firing per row (thoughtscope's generator)"),
        ("headline_l0", float, "the L0 at which contenders are compared (the lr is chosen there)"),
        ("batch_size", int, "rows per training step"),
        ("steps", int, "training steps of every run (same batches for all)"),
    ):
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=kind, help=what)
    p.add_argument("--pool-rows", dest="pool_rows", type=int, help="rows of the training pool (epochs beyond it)")
    p.add_argument("--eval-rows", dest="eval_rows", type=int, help="rows of the validation and of the test sample")
    p.add_argument("--grid", help="learning-rate multipliers of each tool's documented default, e.g. 1,4,16")
    p.add_argument("--targets", help="target L0s of each front, e.g. 15,25,40 (25 is the headline)")
    p.add_argument("--search-runs", dest="search_runs", type=int, help="relu-l1 / jumprelu: runs per target L0")
    p.add_argument("--contenders", help="comma-separated subset, e.g. thoughtscope-topk,saelens-topk")
    p.add_argument("--no-saelens-gen", action="store_true", help="skip the run on SAELens' own generator")
    p.add_argument("--real", action="store_true", default=None, help="also the real-model figures (default: full)")
    p.add_argument("--no-real", dest="real", action="store_false")
    p.add_argument("--real-sae", action="append", default=[], metavar="NAME=PATH", help="another SAE for --real")
    p.add_argument("--real-tokens", type=int, help="--real: tokens of the atlas and of the spliced loss each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="re-train each contender's L0-25 points with this many weight seeds in all (same data) and report "
        "their mean F1 beside the first seed's",
    )
    p.add_argument(
        "--ours-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="train our contenders with this SAEConfig / TrainConfig setting changed (e.g. b_dec_init=zero); "
        "repeatable; recorded in each contender's settings",
    )
    p.add_argument("--threads", type=int, help="torch threads (default: 1 with --quick, whose matrices are small)")
    p.add_argument("--merge", nargs="+", type=Path, metavar="RUN", help="merge these runs' JSON (see merge())")
    p.add_argument(
        "--replace",
        action="store_true",
        help="--merge: a contender in a later run replaces its earlier rows (re-run after a change to its code)",
    )
    args = p.parse_args(argv)
    if args.replace and not args.merge:
        p.error("--replace only applies to --merge")
    if args.merge:
        try:
            figs = [json.loads(f.read_text()) for f in args.merge]
            fig = merge(figs, [str(f) for f in args.merge], replace=args.replace)
        except (OSError, ValueError) as e:  # MergeError and JSONDecodeError are ValueErrors
            p.error(f"--merge: {e}")
        except (KeyError, TypeError, StopIteration) as e:
            p.error(f"--merge: a file is not the --json output of sae_quality.py (no {e})")
        if args.json:
            atomic_write_json(args.json, fig, default=_jsonable)
        print(
            f"merged {len(args.merge)} runs: f1_ours_best_vs_saelens_best {fig['f1_ours_best_vs_saelens_best']}, "
            f"matryoshka_minus_batchtopk_f1 {fig['matryoshka_minus_batchtopk_f1']}"
        )
        return fig
    sz = sizes(args)
    try:  # before any data is made: a bad setting is refused at once
        args.ours_changed = dict(_settings.parse(t) for t in args.ours_setting)
    except SystemExit as e:
        p.error(f"--ours-setting: {e}")
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    t_start = time.perf_counter()

    def log(msg):
        print(msg, flush=True)

    fig: dict = {"quick": args.quick, "sizes": sz, "headline_l0": sz["headline_l0"], "threads": torch.get_num_threads()}
    fig["torch_version"] = torch.__version__
    if args.ours_changed:
        fig["ours_changed_from_defaults"] = args.ours_changed
    data = data_ours(sz, args.seed)
    fig["data"] = {"synthetic": data.info}
    log(f"synthetic (thoughtscope's generator): true L0 {data.info['true_l0']:.1f}; sizes {sz}")
    fig["synthetic"], fig["skipped"] = race(data, sz, args, log)
    fig.update(summarise(fig["synthetic"]))
    if not args.no_saelens_gen:
        try:
            gen = data_saelens(sz, args.seed)
        except ImportError as e:
            fig["synthetic_saelens_gen"] = {}
            fig["skipped"]["synthetic_saelens_gen"] = f"sae-lens' synthetic module is not installed ({e})"
        else:
            # compared where SynthSAEBench compares: at the true L0 of the n_latents most frequent features
            scale = round(gen.info["true_l0_top_m"], 1) / sz["headline_l0"]
            sz_gen = {**sz, "headline_l0": round(gen.info["true_l0_top_m"], 1)}
            sz_gen["targets"] = ",".join(f"{float(t) * scale:.3g}" for t in str(sz["targets"]).split(","))
            gen.info["headline_l0"], gen.info["targets"] = sz_gen["headline_l0"], sz_gen["targets"]
            fig["data"]["synthetic_saelens_gen"] = gen.info
            log(
                f"synthetic_saelens_gen (SAELens' SyntheticModel): true L0 {gen.info['true_l0']:.1f}, of the "
                f"{sz['n_latents']} most frequent features {gen.info['true_l0_top_m']:.1f}: compared there"
            )
            lrs = None if sz["gen_full"] else {n: r["lr_multiplier"] for n, r in fig["synthetic"].items()}
            fig["synthetic_saelens_gen"], gen_skipped = race(gen, sz_gen, args, log, lrs=lrs)
            for name, why in gen_skipped.get("insane", {}).items():
                fig["skipped"].setdefault("insane", {})[f"{name} on SAELens' generator"] = why
            fig["synthetic_saelens_gen_summary"] = summarise(fig["synthetic_saelens_gen"])
    if args.real if args.real is not None else not args.quick:
        fig["real"] = real_quality(args, log)
    fig["wall_seconds"] = time.perf_counter() - t_start
    log(
        f"f1_ours_best_vs_saelens_best {fig['f1_ours_best_vs_saelens_best']}, "
        f"matryoshka_minus_batchtopk_f1 {fig['matryoshka_minus_batchtopk_f1']}; {fig['wall_seconds']:.0f} s"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, fig, default=_jsonable)
    if fig["skipped"].get("insane"):
        raise InsaneContender("; ".join(fig["skipped"]["insane"].values()) + " (the other figures are written)")
    return fig


def _jsonable(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


if __name__ == "__main__":
    main()
    sys.exit(0)
