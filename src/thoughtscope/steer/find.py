"""Find the handle that makes the model *write* about a concept, and calibrate it into a slider.

A user names a concept (keywords, and/or texts with and without it). We build candidate handles:
- SAE features ranked by input contrast (they fire on the concept's texts and not on the controls) and,
  separately, by output effect (their decoder direction, read through the final norm and unembedding,
  promotes the concept's tokens), since in small models the two sides often differ;
- CAA vectors (mean activation on the concept's texts minus on the controls) at two or three sites;
- the concept tokens' logit direction (their unembedding rows read back through the final norm) added
  at a late site, which needs neither the SAE nor the texts.
Each is screened cheaply (a few questions, short answers, a coarse strength grid, stopping a handle as
soon as it breaks the text); handles that never beat the unsteered concept rate are dropped there. Only
the best few get a full calibration on all neutral questions. The result is the frontier (concept rate
against perplexity ratio, per handle and strength), the prompt-only baseline ("mention X" in the system
prompt) on the same questions, and the best handle within the perplexity bound: chosen on a curve fitted
over each handle's points (one point of 24 sampled answers is too noisy to pick by), re-measured on fresh
seeds (the figures it reports) and ready to save as an equalizer preset.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .._io import atomic_write_json
from ..models import LoadedModel
from ..progress import ProgressBar
from ..stats import isotonic, wilson
from .calibrate import LOOP_REPETITION, NEUTRAL_PROMPTS, SweepPoint, evaluate, score_answers
from .generate import GenerationConfig, has_chat_template
from .handles import Concept, Handle, build_handles, pair
from .interventions import SteerError
from .presets import Preset, PresetItem

__all__ = ["Concept", "FindConfig", "FindResult", "Handle", "build_handles", "find_handle", "save_preset"]

PROMPT_ONLY_INSTRUCTION = "Whatever the question, mention {concept} in your answer."


@dataclass
class FindConfig:
    """Budget knobs. Screening: `n_screen` questions, `screen_tokens` new tokens, the handle's coarse grid.
    Calibration: every question, `max_new_tokens`, a fine grid around the best screening strength."""

    n_features: int = 4  # per ranking (input contrast, output effect)
    caa_sites: Sequence[str] | None = None  # default: the SAE's site and layers at 1/3 and 2/3 depth; [] for none
    logit_sites: Sequence[str] | None = None  # default: the layer at 5/6 depth; [] for none
    n_screen: int = 6
    screen_tokens: int = 24
    n_calibrate: int = 2
    max_new_tokens: int = 64  # the length `steer generate` writes: a mention costs perplexity once per answer
    ppl_bound: float = 2.0
    feature_grid: Sequence[float] = (1.0, 2.0, 4.0, 8.0)
    vector_grid: Sequence[float] = (0.08, 0.12, 0.17, 0.24)
    fine_steps: Sequence[float] = (0.8, 1.0, 1.2, 1.4)
    pair_grid: Sequence[float] = (0.5, 0.65, 0.8, 1.0)  # x each part's best screening strength; () for no pair
    extend_steps: int = 3  # calibration points added above the fine grid while there is room under the bound
    extend_factor: float = 1.15
    refine_steps: int = 2  # points placed between the last strength within the bound and the first past it
    confirm_seeds: int = 2  # fresh seeds the winner is re-measured on; its reported figures come from them
    positions: str = "all"
    loop_repetition: float = LOOP_REPETITION  # answers repeating more 3-grams never count (1.0: count loops too)
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "n_features",
            "n_screen",
            "screen_tokens",
            "n_calibrate",
            "max_new_tokens",
            "extend_steps",
            "refine_steps",
            "confirm_seeds",
        ):
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, int)
                or v < (0 if name in ("n_features", "extend_steps", "refine_steps", "confirm_seeds") else 1)
            ):
                raise SteerError(f"FindConfig.{name} must be a positive integer, got {v!r}")
        if not (isinstance(self.extend_factor, (int, float)) and math.isfinite(self.extend_factor)) or not (
            self.extend_factor > 1
        ):
            raise SteerError(f"FindConfig.extend_factor must be a finite number > 1, got {self.extend_factor!r}")
        if not self.ppl_bound > 1:
            raise SteerError(
                f"FindConfig.ppl_bound must be > 1 (a multiple of the unsteered perplexity), got {self.ppl_bound}"
            )
        for name in ("feature_grid", "vector_grid", "fine_steps", "pair_grid"):
            g = list(getattr(self, name))
            if (not g and name != "pair_grid") or not all(
                isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in g
            ):
                raise SteerError(f"FindConfig.{name} must be positive finite numbers, got {g!r}")

    def generation(self, tokens: int, seed: int | None = None) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed if seed is None else seed,
        )


def _point(p: SweepPoint, base: SweepPoint, stage: str, handle: str, n_q: int) -> dict:
    ratio = p.perplexity / base.perplexity if base.perplexity else float("nan")
    return {
        "handle": handle,
        "stage": stage,
        "strength": p.strength,
        "concept_rate": p.concept_rate,
        "perplexity": p.perplexity,
        "perplexity_ratio": ratio,
        "repetition": p.repetition,
        "looping": p.looping,
        "n_questions": n_q,
        "answers": list(p.samples),
    }


def _room(p: dict, config: FindConfig) -> bool:
    """Whether a calibration point leaves room to push harder: clearly inside the perplexity bound and
    not yet looping."""
    return p["perplexity_ratio"] < 0.9 * config.ppl_bound and p["looping"] <= 0.1


def _between(points: Sequence[dict], bound: float) -> float | None:
    """A strength halfway (geometrically) between the strongest point within the bound and the next one
    past it, when that one reached a higher concept rate: the grid's steps of 1.2x straddle the bound,
    and what lies between is the strongest setting the budget allows. None when there is no such gap."""
    inside = [p for p in points if p["perplexity_ratio"] <= bound]
    if not inside:
        return None
    lo = max(inside, key=lambda p: p["strength"])
    past = [p for p in points if p["strength"] > lo["strength"]]
    if not past:
        return None
    hi = min(past, key=lambda p: p["strength"])
    if hi["concept_rate"] <= max(p["concept_rate"] for p in inside):
        return None
    return round(math.sqrt(lo["strength"] * hi["strength"]), 6)


def _best(points: Sequence[dict], bound: float) -> dict | None:
    ok = [p for p in points if math.isfinite(p["perplexity_ratio"]) and p["perplexity_ratio"] <= bound]
    return max(ok, key=lambda p: (p["concept_rate"], -p["perplexity_ratio"])) if ok else None


def _smoothed(points: Sequence[dict]) -> list[dict]:
    """One handle's calibration points with `fit_rate` and `fit_ppl_ratio`: both read as non-decreasing
    in strength and fitted jointly over the points (isotonic, weighted by answers). One point of 24
    sampled answers is +-20 points of concept rate; its neighbours at nearby strengths measure nearly
    the same thing, so the fit pools them and the winner is not simply the luckiest draw."""
    pts = sorted((p for p in points if math.isfinite(p["perplexity_ratio"])), key=lambda p: p["strength"])
    if not pts:
        return []
    w = [p["n_questions"] for p in pts]
    rate = isotonic([p["concept_rate"] for p in pts], w)
    logr = isotonic([math.log(p["perplexity_ratio"]) for p in pts], w)
    return [{**p, "fit_rate": r, "fit_ppl_ratio": math.exp(lr)} for p, r, lr in zip(pts, rate, logr)]


def _choose(per_handle: dict[str, Sequence[dict]], bound: float) -> dict | None:
    """The winning calibration point: the highest fitted concept rate among points whose fitted and
    measured perplexity ratios are both within the bound (ties: the lower fitted ratio)."""
    ok = [
        p
        for pts in per_handle.values()
        for p in _smoothed(pts)
        if p["fit_ppl_ratio"] <= bound and p["perplexity_ratio"] <= bound
    ]
    return max(ok, key=lambda p: (p["fit_rate"], -p["fit_ppl_ratio"], p["concept_rate"])) if ok else None


# ----------------------------------------------------------------------------- candidates
@dataclass
class FindResult:
    concept: Concept
    config: dict
    baseline: dict  # unsteered, all questions
    prompt_only: dict  # "mention X" in the system prompt, same questions
    handles: list[dict]
    frontier: list[dict]  # every calibration point
    best: dict | None
    seconds: float
    questions: list[str]

    def to_dict(self) -> dict:
        return {
            "concept": asdict(self.concept),
            "config": self.config,
            "questions": self.questions,
            "baseline": self.baseline,
            "prompt_only": self.prompt_only,
            "handles": self.handles,
            "frontier": self.frontier,
            "best": self.best,
            "seconds": self.seconds,
        }

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())


def _prompt_only(
    lm: LoadedModel,
    concept: Concept,
    questions: Sequence[str],
    gen: GenerationConfig,
    base: SweepPoint,
    loop_limit: float = LOOP_REPETITION,
) -> dict:
    """Ask for the concept in the instructions; score the answers as answers to the plain questions."""
    from .generate import format_prompt, generate

    instruction = PROMPT_ONLY_INSTRUCTION.format(concept=concept.name)
    if has_chat_template(lm.tokenizer) and gen.chat is not False:
        cfg = GenerationConfig(**{**asdict(gen), "system": instruction})
        gens = generate(lm, list(questions), [], cfg)
    else:
        gens = generate(lm, [f"{instruction}\n{q}" for q in questions], [], gen)
    plain = [format_prompt(lm, q, chat=gen.chat, system=gen.system) for q in questions]
    p = score_answers(lm, gens, judge=concept.mentioned, prompt_ids=plain, loop_limit=loop_limit)
    out = _point(p, base, "prompt-only", "prompt-only", len(questions))
    out["instruction"] = instruction
    return out


_UNITS = {"feature": "x max", "caa": "x median norm", "logit": "x median norm", "pair": "x each part's strength"}


def _pair_candidate(handles: Sequence[Handle], firsts: dict, reach: dict, config: FindConfig) -> Handle | None:
    """The best-screened CAA vector with the logit direction, when both have a point within the bound (a
    CAA vector that did nothing alone may still carry the topic the logit push needs). Each part's
    reference is the strongest push it took alone within the bound; the pair grid takes shares of it."""
    if not config.pair_grid:
        return None

    def top(kind: str):
        ok = [(firsts[h.id], h) for h in handles if h.kind == kind and firsts.get(h.id) is not None]
        return max(ok, key=lambda t: (t[0]["concept_rate"], -t[0]["perplexity_ratio"]), default=None)

    caa, logit = top("caa"), top("logit")
    if caa is None or logit is None:
        return None
    return pair(caa[1], reach[caa[1].id], logit[1], reach[logit[1].id], config.pair_grid)


def find_handle(
    lm: LoadedModel,
    sae,
    concept: Concept,
    *,
    questions: Sequence[str] = NEUTRAL_PROMPTS,
    config: FindConfig | None = None,
    handles: Sequence[Handle] | None = None,
    progress: bool = True,
) -> FindResult:
    """Search handles for `concept`, screen them cheaply, calibrate the best few (see module doc).

    `handles` replaces the automatic candidates (e.g. to calibrate a feature you already have in mind).
    """
    config = config or FindConfig()
    questions = [q for q in questions if q.strip()]
    if len(questions) < 2:
        raise SteerError("give at least 2 neutral questions to calibrate on")
    t0 = time.perf_counter()
    handles = list(handles) if handles is not None else build_handles(lm, sae, concept, config)
    if not handles:
        raise SteerError(f"no candidate handle for {concept.name!r}: no SAE and no CAA site gave a direction")
    screen_q = questions[: config.n_screen]
    screen_work = (sum(len(h.grid) for h in handles) + len(config.pair_grid)) * len(screen_q) * config.screen_tokens
    n_evals = 2 + 2 * config.confirm_seeds + config.n_calibrate * len(config.fine_steps)
    full_work = n_evals * len(questions) * config.max_new_tokens
    scfg, fcfg = config.generation(config.screen_tokens), config.generation(config.max_new_tokens)
    judged = dict(judge=concept.mentioned, loop_limit=config.loop_repetition)  # how every answer is scored
    report: dict[str, dict] = {h.id: {**h.describe(), "screen": [], "calibration": [], "status": ""} for h in handles}
    with ProgressBar(
        f"steer find {concept.name}", screen_work + full_work, unit="answer tokens", enabled=progress
    ) as bar:
        done = 0

        def tick(n_q: int, tokens: int, info: str) -> None:
            nonlocal done
            done += n_q * tokens
            bar.update(done, info=info)

        def steered(h: Handle, strength: float, qs, gen: GenerationConfig, base: SweepPoint, stage: str) -> dict:
            """One handle at one strength on the questions, as a frontier point; advances the bar."""
            ivs = h.interventions(sae, strength, config.positions)
            pt = evaluate(lm, ivs, prompts=qs, config=gen, strength=strength, **judged)
            tick(len(qs), gen.max_new_tokens, h.id)
            return _point(pt, base, stage, h.id, len(qs))

        def confirm(h: Handle, strength: float) -> dict:
            """The winner on `confirm_seeds` fresh seeds, each beside the unsteered answers of its seed. The
            search's own figure is the best of ~20 draws of 24 answers, so it runs high; these are the
            figures to expect."""
            ivs = h.interventions(sae, strength, config.positions)
            seeds = [config.seed + k for k in range(1, config.confirm_seeds + 1)]
            pts, ratios = [], []
            for seed in seeds:
                gen = config.generation(config.max_new_tokens, seed=seed)
                plain = evaluate(lm, [], prompts=questions, config=gen, keep_samples=0, **judged)
                pts.append(evaluate(lm, ivs, prompts=questions, config=gen, strength=strength, **judged))
                ratios.append(pts[-1].perplexity / plain.perplexity)
                tick(2 * len(questions), config.max_new_tokens, "confirmation")
            n = len(seeds) * len(questions)  # every seed answers every question: plain means over seeds
            hits = round(sum(p.concept_rate for p in pts) * len(questions))
            return {
                "seeds": seeds,
                "n_answers": n,
                "concept_rate": hits / n,
                "concept_rate_ci": wilson(hits, n),
                "perplexity_ratio": math.exp(sum(math.log(r) for r in ratios) / len(ratios)),
                "repetition": sum(p.repetition for p in pts) / len(pts),
                "looping": sum(p.looping for p in pts) / len(pts),
                "per_seed": [
                    {"seed": sd, "concept_rate": p.concept_rate, "perplexity_ratio": r}
                    for sd, p, r in zip(seeds, pts, ratios)
                ],
                "answers": [a for p in pts for a in p.samples],
            }

        sbase = evaluate(lm, [], prompts=screen_q, config=scfg, keep_samples=0, **judged)
        screened = []

        def screen(h: Handle) -> dict | None:
            """The handle on the coarse grid, weakest first; its best point within the (slackened) bound."""
            pts = []
            for s in sorted(h.grid):
                p = steered(h, s, screen_q, scfg, sbase, "screen")
                pts.append(p)
                if p["perplexity_ratio"] > 3 * config.ppl_bound:  # broken text: stronger is only worse
                    break
            nonlocal done
            done += (len(h.grid) - len(pts)) * len(screen_q) * config.screen_tokens
            report[h.id]["screen"] = pts
            inside = [p["strength"] for p in pts if p["perplexity_ratio"] <= config.ppl_bound * 1.25]
            reach[h.id] = max(inside, default=None)
            best = _best(pts, config.ppl_bound * 1.25)  # screening is noisy: a little slack
            if best is None or best["concept_rate"] <= sbase.concept_rate:
                report[h.id]["status"] = "dropped at screening: never above the unsteered concept rate within the bound"
            else:
                screened.append((best["concept_rate"], -best["perplexity_ratio"], h, best["strength"]))
            return best

        reach: dict[str, float | None] = {}  # per handle: the strongest screening push within the bound
        firsts = {h.id: screen(h) for h in handles}
        duo = _pair_candidate(handles, firsts, reach, config)
        if duo is not None:
            handles.append(duo)
            report[duo.id] = {**duo.describe(), "screen": [], "calibration": [], "status": ""}
            screen(duo)
        else:
            done += len(config.pair_grid) * len(screen_q) * config.screen_tokens
        screened.sort(key=lambda t: (t[0], t[1]), reverse=True)
        chosen = screened[: config.n_calibrate]
        for _, _, h, _ in screened[config.n_calibrate :]:
            report[h.id]["status"] = "screened, not among the best for calibration"
        base = evaluate(lm, [], prompts=questions, config=fcfg, keep_samples=len(questions), **judged)
        baseline = _point(base, base, "baseline", "unsteered", len(questions))
        tick(len(questions), config.max_new_tokens, "unsteered")
        prompt_only = _prompt_only(lm, concept, questions, fcfg, base, config.loop_repetition)
        tick(len(questions), config.max_new_tokens, "prompt-only")
        frontier = []
        for _, _, h, s_star in chosen:
            steps = list(config.fine_steps)
            while steps:
                s = round(s_star * steps.pop(0), 6)
                p = steered(h, s, questions, fcfg, base, "calibration")
                report[h.id]["calibration"].append(p)
                frontier.append(p)
                extended = len(report[h.id]["calibration"]) - len(config.fine_steps)
                if not steps and extended < config.extend_steps and _room(p, config):
                    # the 6 screening answers put the grid too low: go on up to the bound
                    steps.append(s * config.extend_factor / s_star)
                    bar.grow(len(questions) * config.max_new_tokens)
            for _ in range(config.refine_steps):
                s = _between(report[h.id]["calibration"], config.ppl_bound)
                if s is None:
                    break
                bar.grow(len(questions) * config.max_new_tokens)
                p = steered(h, s, questions, fcfg, base, "calibration")
                report[h.id]["calibration"].append(p)
                frontier.append(p)
            report[h.id]["status"] = "calibrated"
        done += (config.n_calibrate - len(chosen)) * len(config.fine_steps) * len(questions) * config.max_new_tokens
        best = _choose({h.id: report[h.id]["calibration"] for _, _, h, _ in chosen}, config.ppl_bound)
        best_out = None
        if best is not None:
            h = next(x for x in handles if x.id == best["handle"])
            conf = confirm(h, best["strength"]) if config.confirm_seeds else None
            head = conf or {k: best[k] for k in ("concept_rate", "perplexity_ratio", "repetition", "looping")}
            best_out = {
                "kind": h.kind,
                "id": h.id,
                "site": h.site,
                "feature": h.feature,
                "strength": best["strength"],
                "unit": _UNITS[h.kind],
                "concept_rate": head["concept_rate"],
                "perplexity_ratio": head["perplexity_ratio"],
                "repetition": head["repetition"],
                "looping": head["looping"],
                "concept_rate_ci": conf["concept_rate_ci"] if conf else None,
                "measured_on": "fresh seeds (confirmation)" if conf else f"the search's seed {config.seed}",
                "positions": config.positions,
                "max_act": h.max_act,
                "max_source": h.max_source,
                "range": [
                    min(p["strength"] for p in report[h.id]["calibration"]),
                    max(p["strength"] for p in report[h.id]["calibration"]),
                ],
                "search": {
                    "seed": config.seed,
                    "concept_rate": best["concept_rate"],
                    "perplexity_ratio": best["perplexity_ratio"],
                    "fit_rate": best["fit_rate"],
                    "fit_ppl_ratio": best["fit_ppl_ratio"],
                    "looping": best["looping"],
                },
                "confirmation": conf,
                "found_by": h.found_by,
            }

    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}
    cfg["caa_sites"] = [h.site for h in handles if h.kind == "caa"]
    cfg["logit_sites"] = [h.site for h in handles if h.kind == "logit"]
    result = FindResult(
        concept,
        cfg,
        baseline,
        prompt_only,
        list(report.values()),
        frontier,
        best_out,
        round(time.perf_counter() - t0, 1),
        list(questions),
    )
    result._handles = {h.id: h for h in handles}  # for save_preset
    return result


def _sae_spec(sae, base: Path) -> str:
    """How a preset names the SAE: "default", a path relative to the preset's folder, or absolute."""
    from .presets import default_sae_path

    src = getattr(sae, "source_dir", None)
    if src is None:
        raise SteerError("the SAE was not loaded from a folder; save it (save_sae) and load it before saving a preset")
    src = Path(src).resolve()
    if src == default_sae_path().resolve():
        return "default"
    try:
        return str(src.relative_to(base.resolve()))
    except ValueError:
        return str(src)


def save_preset(result: FindResult, sae, path: str | Path) -> Path:
    """The winning handle as an equalizer preset with its calibrated range (vectors are saved beside it; a
    pair becomes two sliders)."""
    from .vectors import SteeringVector

    if result.best is None:
        raise SteerError(
            f"no handle for {result.concept.name!r} raised the concept rate within the perplexity "
            f"bound; nothing to save"
        )
    path = Path(path)
    best = result.best
    h: Handle = result._handles[best["id"]]

    def item(part: Handle, scale: float) -> PresetItem:
        """One slider; a pair's parts each get theirs, at the share of the strength the pair used."""
        common = dict(
            value=float(best["strength"]) * scale,
            positions=best["positions"],
            label=result.concept.name if part is h else f"{result.concept.name} ({part.id})",
            range=[float(x) * scale for x in best["range"]],
            suggested=float(best["strength"]) * scale,
        )
        if part.kind == "feature":
            return PresetItem(
                "feature",
                "clamp",
                part.site,
                feature=part.feature,
                unit="max",
                max_act=float(part.max_act),
                sae=_sae_spec(sae, path.parent),
                **common,
            )
        vec_path = path.with_name(f"{path.stem}.{part.kind}.{part.site}.safetensors")
        vec_path.parent.mkdir(parents=True, exist_ok=True)
        SteeringVector(
            part.direction,
            part.site,
            method="caa-token-mean" if part.kind == "caa" else "concept-logit-direction",
            model=getattr(sae, "model_name", "") or "",
            typical_norm=part.typical_norm,
            extra={"concept": result.concept.name},
        ).save(vec_path)
        return PresetItem("vector", "add", part.site, vector=vec_path.name, unit="norm", **common)

    items = [item(part, ref) for part, ref in (h.parts if h.kind == "pair" else [(h, 1.0)])]
    desc = (
        f"{result.concept.name}: {best['id']} at {best['strength']:g} {best['unit']} — concept rate "
        f"{100 * best['concept_rate']:.0f} % at {best['perplexity_ratio']:.2f}x perplexity "
        f"({len(result.questions)} questions; found by steer find)"
    )
    return Preset(path.stem, items, desc).save(path)
