"""The steering demonstrations, as functions so scripts/steer_demo.py, `thoughtscope demo` and tests share them.

(a) `concept_demo`: find a concept feature by contrastive search, sweep its clamp in multiples of its
    observed maximum on the 20 neutral questions, pick the strength with the highest mention rate whose
    perplexity stays within `ppl_bound` × unsteered, and report rate and perplexity ratio there.
(b) `suppression_demo`: on prompts that normally evoke the concept, compare the mention rate without
    steering and with the feature clamped negative (and with its decoder direction projected out).
`default_demo` is `thoughtscope demo`'s steering stage: the calibrated clamp that (a) found for the shipped SAE
(assets/default_steering.json), unsteered vs steered.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from ..features import contrast_features, feature_max_acts
from ..models import LoadedModel
from ..steer.calibrate import DEFAULT_SWEEP_CONFIG, NEUTRAL_PROMPTS, evaluate, plot_sweep, sweep
from ..steer.generate import GenerationConfig, compare
from ..steer.handles import Concept
from ..steer.interventions import FeatureEdit, VectorEdit


def _load_concepts() -> dict[str, Concept]:
    """The demonstration concepts (texts about each, controls, keywords, questions that evoke it)."""
    from ..paths import asset

    raw = json.loads(asset("demo_concepts.json").read_text())
    return {name: Concept(name, **d) for name, d in raw.items()}


CONCEPTS = _load_concepts()


def concept_demo(
    lm: LoadedModel,
    sae,
    site: str,
    concept: Concept,
    *,
    multiples: Sequence[float] = (0, 2, 4, 6, 8, 10),
    candidates: int = 3,
    ppl_bound: float = 2.0,
    config: GenerationConfig | None = None,
    prompts: Sequence[str] = NEUTRAL_PROMPTS,
    progress: bool = True,
    features: Sequence[int] = (),
    plot: str | Path | None = None,
    combine: bool = False,
    positions: str = "all",
) -> dict:
    """Issue point 6a. Tries the top `candidates` contrastive features and keeps the best calibrated one.

    `features` restricts the sweep to those ids (each must be among the top 10 of the search, so the
    demo still rests on the search); `plot` writes the best candidate's sweep as a PNG. `combine` clamps
    all the chosen features together (each at the same multiple of its own maximum) as one candidate.
    `positions="generated"` clamps only the answer's tokens: the question is read unsteered.
    """
    config = config or GenerationConfig(**DEFAULT_SWEEP_CONFIG)
    ranked, found = _candidates(lm, sae, site, concept, candidates, features)
    maxes = feature_max_acts(lm, sae, site, list(concept.prompts) + list(concept.controls), [f.feature for f in found])
    mx = [m if m > 0 else 1.0 for m in maxes.tolist()]
    groups = [list(zip(found, mx))] if combine else [[(fs, m)] for fs, m in zip(found, mx)]
    sweeps, tried = {}, []
    for group in groups:
        res, row = _calibrate(
            lm, sae, site, group, concept, multiples, prompts, config, ppl_bound, progress=progress, positions=positions
        )
        sweeps[row["feature"]] = res
        tried.append(row)
    # the calibrated candidate with the highest mention rate (the first of equals)
    best = max((r for r in tried if r["suggested_multiple"] is not None), key=lambda r: r["concept_rate"], default=None)
    out = {
        "concept": concept.name,
        "site": site,
        "positions": positions,
        "score": "z (see thoughtscope.features)",
        "concept_method": "keywords",
        "keywords": concept.keywords,
        "ppl_bound": ppl_bound,
        "n_prompts": len(prompts),
        "search_top10": [(f.feature, round(f.score, 3)) for f in ranked[:10]],
        "candidates": tried,
        "best": best,
        "generation": asdict(config),
    }
    out.update(_shown(best, tried, sweeps, concept, len(prompts), plot))
    if best is None:
        out["passed"] = False
        return out
    ivs = _clamps(sae, site, best["features"], best["max_acts"], best["suggested_multiple"], positions)
    out["side_by_side"] = [asdict(c) for c in compare(lm, list(prompts[:3]), ivs, config)]
    out["passed"] = best["concept_rate"] >= 0.6 and best["ppl_ratio"] <= ppl_bound
    return out


def _candidates(lm, sae, site: str, concept: Concept, candidates: int, features: Sequence[int]) -> tuple[list, list]:
    """(the contrastive search's top features, the ones to calibrate: the top `candidates` or the given ids)."""
    ranked = contrast_features(lm, sae, site, concept.prompts, concept.controls, top=max(10, candidates))
    if not features:
        return ranked, ranked[:candidates]
    by_id = {f.feature: f for f in ranked}
    missing = [f for f in features if f not in by_id]
    if missing:
        raise ValueError(
            f"features {missing} are not among the top {len(ranked)} contrastive features for "
            f"{concept.name!r}: {[f.feature for f in ranked]}"
        )
    return ranked, [by_id[f] for f in features]


def _clamps(sae, site: str, ids, max_acts, multiple: float, positions: str) -> list[FeatureEdit]:
    """Each feature clamped to `multiple` × its own maximum activation."""
    return [
        FeatureEdit(sae, f, "clamp", multiple, unit="max", max_act=m, site=site, positions=positions)
        for f, m in zip(ids, max_acts)
    ]


def _calibrate(lm, sae, site, group, concept, multiples, prompts, config, ppl_bound, *, progress, positions):
    """Sweep one candidate (one feature, or several clamped together) over `multiples`: (the sweep, its row)."""
    fs, m = group[0]
    ids, ms = [g[0].feature for g in group], [g[1] for g in group]
    res = sweep(
        lm,
        lambda s: _clamps(sae, site, ids, ms, s, positions),
        list(multiples),
        keywords=concept.keywords,
        prompts=prompts,
        config=config,
        ppl_bound=ppl_bound,
        progress=progress,
    )
    row = {
        "feature": fs.feature,
        "score": fs.score,
        "max_act": m,
        "features": ids,
        "max_acts": ms,
        "suggested_multiple": res.suggested,
        "sweep": res.table(),
        "baseline": {"concept_rate": res.baseline.concept_rate, "perplexity": res.baseline.perplexity},
    }
    if res.suggested is not None:
        pt = next(p for p in res.points if p.strength == res.suggested)
        row.update(concept_rate=pt.concept_rate, ppl_ratio=pt.perplexity / res.baseline.perplexity)
    return res, row


def _shown(best, tried: list[dict], sweeps: dict, concept: Concept, n_prompts: int, plot) -> dict:
    """The plot and the samples of the best candidate, or, when none stays within the bound, of the one with the
    highest concept rate at any strength (so a failed calibration is still shown)."""
    shown = best or max(tried, key=lambda r: max(p["concept_rate"] for p in r["sweep"]), default=None)
    if shown is None:
        return {}
    out: dict = {}
    if plot is not None:
        feats = ", ".join(map(str, shown["features"]))
        plot_sweep(
            sweeps[shown["feature"]],
            plot,
            title=f"{concept.name}: feature(s) {feats} clamped (x own max act), {n_prompts} neutral questions",
        )
        out["plot"] = str(plot)
    out["samples_by_strength"] = {str(pt.strength): pt.samples for pt in sweeps[shown["feature"]].points}
    return out


def suppression_demo(
    lm: LoadedModel,
    sae,
    site: str,
    concept: Concept,
    feature: int,
    max_act: float,
    *,
    multiple: float = -2.0,
    config: GenerationConfig | None = None,
) -> dict:
    """Issue point 6b: mention rate on concept-evoking prompts, before and after suppressing the feature."""
    config = config or GenerationConfig(**DEFAULT_SWEEP_CONFIG)
    prompts = concept.evoke or concept.prompts
    kw = dict(prompts=prompts, keywords=concept.keywords, config=config)
    before = evaluate(lm, [], **kw)
    clamp_neg = evaluate(
        lm,
        [FeatureEdit(sae, feature, "clamp", multiple, unit="max", max_act=max_act, site=site)],
        strength=multiple,
        **kw,
    )
    proj = evaluate(lm, [VectorEdit(sae.W_dec[feature].detach(), site, "project_out")], **kw)
    return {
        "concept": concept.name,
        "feature": feature,
        "site": site,
        "n_prompts": len(prompts),
        "concept_method": "keywords",
        "before": {"mention_rate": before.concept_rate, "perplexity": before.perplexity},
        "clamp": {
            "multiple_of_max": multiple,
            "mention_rate": clamp_neg.concept_rate,
            "perplexity": clamp_neg.perplexity,
        },
        "project_out": {"mention_rate": proj.concept_rate, "perplexity": proj.perplexity},
        "samples_before": before.samples,
        "samples_after": clamp_neg.samples,
    }


def default_steering_path() -> Path:
    """The calibrated concept clamp for the shipped SAE (written by `scripts/steer_demo.py concept`)."""
    from ..paths import asset

    return asset("default_steering.json")


def load_default_steering() -> dict:
    p = default_steering_path()
    if not p.is_file():
        raise FileNotFoundError(
            f"{p} is missing: run `python scripts/steer_demo.py concept ... --json ...` and "
            "write its best feature there (keys feature, max_act, strength, site, concept)"
        )
    d = json.loads(p.read_text())
    if "strength" not in d and "multiple" in d:  # the key's name before the one word for strength
        d["strength"] = d.pop("multiple")
    for k in ("feature", "max_act", "strength", "site"):
        if k not in d:
            raise ValueError(f"{p}: missing key {k!r} (expected feature, max_act, strength, site)")
    return d


DEMO_PROMPTS = ["What is a good way to start the morning?", "Tell me something interesting."]


def default_demo(
    lm: LoadedModel, console=None, max_new_tokens: int = 32, prompts: Sequence[str] = DEMO_PROMPTS
) -> list:
    """`thoughtscope demo`'s steering stage: the calibrated concept clamp on the default SAE, unsteered vs
    steered from the same seed, printed side by side. Returns the comparisons."""
    from rich.console import Console
    from rich.table import Table

    from ..sae import load_sae

    console = console or Console()
    d = load_default_steering()
    sae = load_sae("default").eval().requires_grad_(False)
    ivs = [
        FeatureEdit(
            sae,
            int(d["feature"]),
            "clamp",
            float(d["strength"]),
            unit="max",
            max_act=float(d["max_act"]),
            site=d["site"],
            positions=d.get("positions", "all"),
        )
    ]
    cfg = GenerationConfig(**{**DEFAULT_SWEEP_CONFIG, "max_new_tokens": int(max_new_tokens)})
    side = compare(lm, list(prompts), ivs, cfg)
    t = Table(
        title=f"steering: feature {d['feature']} ({d.get('concept', 'concept')}) clamped to "
        f"{d['strength']}x its max activation at {d['site']} "
        f"({d.get('positions', 'all')} positions)",
        show_lines=True,
    )
    t.add_column("prompt", max_width=24)
    t.add_column("unsteered")
    t.add_column("steered")
    for c in side:
        t.add_row(str(c.prompt), c.unsteered.strip(), c.steered.strip())
    console.print(t)
    if "concept_rate" in d:
        console.print(
            f"calibrated on 20 neutral questions: {100 * d['concept_rate']:.0f}% of steered answers mention "
            f"{d.get('concept', 'it')} (unsteered {100 * d.get('baseline_rate', 0):.0f}%), perplexity "
            f"{d.get('ppl_ratio', float('nan')):.2f}x unsteered"
        )
    return side
