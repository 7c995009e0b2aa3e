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
over each handle's points (one point of 48 sampled answers, two per question, is too noisy to pick by),
re-measured on fresh seeds (the figures it reports) and ready to save as an equalizer preset.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .._io import atomic_write_json
from ..models import LoadedModel
from ..progress import ProgressBar
from ..stats import isotonic, wilson
from .calibrate import NEUTRAL_PROMPTS, SweepPoint, evaluate, score_answers
from .config import LOOP_REPETITION, FindConfig  # noqa: F401  (FindConfig: re-exported, its old home)
from .generate import GenerationConfig, has_chat_template
from .handles import Concept, Handle, build_handles, pair
from .interventions import SteerError
from .presets import Preset, PresetItem, sae_spec

__all__ = ["Concept", "FindConfig", "FindResult", "Handle", "build_handles", "find_handle", "save_preset"]

PLAN_SHARE = 0.9  # share of the time left that a budgeted search plans to fill
PROMPT_ONLY_INSTRUCTION = "Whatever the question, mention {concept} in your answer."


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


def _choose(per_handle: dict[str, Sequence[dict]], bound: float, margin: float = 1.0) -> dict | None:
    """The winning calibration point: the highest fitted concept rate among points whose fitted and
    measured perplexity ratios are both within bound × margin (ties: the lower fitted ratio); within the plain
    bound when no point passes with the margin (the point then says `margin_met: False`)."""
    fitted = [p for pts in per_handle.values() for p in _smoothed(pts)]
    for limit, met in ((bound * margin, True), (bound, margin >= 1.0)):
        ok = [p for p in fitted if p["fit_ppl_ratio"] <= limit and p["perplexity_ratio"] <= limit]
        if ok:
            best = max(ok, key=lambda p: (p["fit_rate"], -p["fit_ppl_ratio"], p["concept_rate"]))
            return {**best, "margin_met": met}
    return None


def _step_down(points: Sequence[dict], best: dict, bound: float) -> dict | None:
    """The handle's next weaker calibration point within the bound, for a winner whose fresh seeds crossed it."""
    weaker = [p for p in _smoothed(points) if p["strength"] < best["strength"] and p["fit_ppl_ratio"] <= bound]
    return max(weaker, key=lambda p: p["strength"]) if weaker else None


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


def _planned_work(handles: Sequence[Handle], questions: Sequence[str], config: FindConfig) -> int:
    """Answer tokens the search will generate if nothing is cut short (the progress bar's total)."""
    n_screen = min(len(questions), config.n_screen)
    screen = (sum(len(h.grid) for h in handles) + len(config.pair_grid)) * n_screen * config.screen_tokens
    calibration = (2 + config.n_calibrate * len(config.fine_steps)) * _per_question(config)
    return screen + (calibration + 2 * config.confirm_seeds) * len(questions) * config.max_new_tokens


def _worst_work(handles: Sequence[Handle], questions: Sequence[str], config: FindConfig) -> int:
    """Answer tokens the search generates at most: the planned work plus every calibration point it may add."""
    points = config.n_calibrate * (config.extend_steps + config.refine_steps)
    extra = points * _per_question(config) * len(questions) * config.max_new_tokens
    return _planned_work(handles, questions, config) + extra


def _per_question(config: FindConfig) -> int:
    """Answers per question at a calibration point (one when greedy: the others would repeat it)."""
    return config.answers_per_question if config.temperature > 0 else 1


def _search_weights(lm: LoadedModel, config: FindConfig) -> str:
    """The weights the search's answers are computed with: `config.weights`, "auto" resolved (bf16 where the lean
    decoder runs this model and the device multiplies bf16 clearly faster, else the model's own)."""
    if config.weights != "auto":
        return config.weights
    from ..decoding import bf16_is_faster, lean_reason
    from .config import _default_decoder

    if _default_decoder() == "transformers" or lean_reason(lm.model) is not None:
        return "exact"
    return "bf16" if bf16_is_faster(lm.device) else "exact"


def _repeated(questions: Sequence[str], k: int) -> list[str]:
    """Each question k times in a row: k sampled answers each from one batch (one sampler, different draws)."""
    return [q for q in questions for _ in range(k)]


def _worst_calls(handles: Sequence[Handle], config: FindConfig) -> int:
    """Generations the search runs at most (each costs a fixed overhead beside its answer tokens)."""
    screen = 1 + sum(len(h.grid) for h in handles) + len(config.pair_grid)
    calibration = config.n_calibrate * (len(config.fine_steps) + config.extend_steps + config.refine_steps)
    return screen + 2 + calibration + 2 * config.confirm_seeds


def _thin(grid: Sequence[float], n: int) -> tuple[float, ...]:
    """`n` points of a sorted grid, the weakest dropped first (screening stops at broken text anyway, so the
    strongest points are the cheap ones to keep)."""
    g = sorted(grid)
    return tuple(g[len(g) - n :]) if len(g) > n else tuple(g)


def _fewer_handles(handles: Sequence[Handle], per_kind: int | None, grid_points: int | None) -> list[Handle]:
    """At most `per_kind` candidates of each kind (features: those ranked within `per_kind` by either ranking;
    the others are listed best first), each screened on at most `grid_points` strengths."""
    seen: dict[str, int] = {}
    out = []
    for h in handles:
        seen[h.kind] = seen.get(h.kind, 0) + 1
        if h.kind == "feature" and per_kind is not None:
            keep = min((r.get("rank", 99) for r in h.found_by.values() if isinstance(r, dict)), default=99) <= per_kind
        else:
            keep = per_kind is None or seen[h.kind] <= per_kind
        if keep:
            out.append(replace(h, grid=list(_thin(h.grid, grid_points))) if grid_points else h)
    return out


def _cuts(config: FindConfig, n_questions: int):
    """The ways to shrink a search, least harmful first: (what is cut, config, questions kept, candidates kept
    per kind, screening points kept per candidate)."""
    c, q, k, g = config, n_questions, None, None
    steps = [("1 answer per calibration question", dict(answers_per_question=1))] if _per_question(c) > 1 else []
    steps += [
        ("no CAA + logit pair", dict(pair_grid=())),
        ("1 confirmation seed", dict(confirm_seeds=min(1, c.confirm_seeds))),
        ("no calibration points past the fine grid", dict(extend_steps=0, refine_steps=min(1, c.refine_steps))),
        ("no confirmation on fresh seeds", dict(confirm_seeds=0, refine_steps=0)),
        ("3-point screening grids", ("grid", 3)),
        ("2 candidates per kind", ("kind", 2)),
        ("1 candidate calibrated", dict(n_calibrate=1)),
        (f"{max(2, c.n_screen // 2)} screening questions", dict(n_screen=max(2, c.n_screen // 2))),
        ("2-point screening grids", ("grid", 2)),
        ("2-point calibration grid", dict(fine_steps=tuple(sorted(c.fine_steps))[1:3] or c.fine_steps)),
        ("1 candidate per kind", ("kind", 1)),
        (f"{max(4, n_questions // 2)} calibration questions", ("questions", max(4, n_questions // 2))),
        ("screening answers of 16 tokens", dict(screen_tokens=min(16, c.screen_tokens))),
        ("answers of 32 tokens", dict(max_new_tokens=min(32, c.max_new_tokens))),
        ("no calibration points past the grid", dict(refine_steps=0)),
        (f"{max(2, c.n_screen // 2)} calibration questions", ("questions", max(2, c.n_screen // 2))),
        ("answers of 16 tokens", dict(max_new_tokens=min(16, c.max_new_tokens))),
    ]
    for what, change in steps:
        if isinstance(change, dict):
            c = replace(c, **change)
        elif change[0] == "grid":
            g = change[1]
        elif change[0] == "kind":
            k = change[1]
        else:
            q = min(q, change[1])
        yield what, c, q, k, g


def _fit_budget(handles, questions, config: FindConfig, seconds_left: float, rate: float, per_call: float = 0.0):
    """Shrink the search until its worst case (answer tokens × the measured seconds per answer token, plus the
    measured overhead per generation) fits in `seconds_left`: (config, questions, handles, cuts made, predicted
    seconds). Past the last cut it runs as small as it gets, and says the budget cannot be kept."""

    def cost(hs, qs, c) -> float:
        return rate * _worst_work(hs, qs, c) + per_call * _worst_calls(hs, c)

    predicted = cost(handles, questions, config)
    cuts: list[str] = []
    kept_q, kept_h = list(questions), list(handles)
    for what, c, q, k, g in _cuts(config, len(questions)):
        if predicted <= seconds_left:
            break
        config, kept_q, kept_h = c, list(questions[:q]), _fewer_handles(handles, k, g)
        cuts.append(what)
        predicted = cost(kept_h, kept_q, config)
    if predicted > seconds_left:
        cuts.append(f"still ~{predicted / 60:.1f} min at the smallest search: the budget cannot be kept")
    return config, kept_q, kept_h, cuts, predicted


class _Budget:
    """A time budget: the deadline, the seconds per answer token measured on the first generations, the cuts."""

    def __init__(self, minutes: float, start: float) -> None:
        if not (isinstance(minutes, (int, float)) and math.isfinite(minutes) and minutes > 0):
            raise SteerError(f"the time budget must be a positive number of minutes, got {minutes!r}")
        self.minutes, self.deadline = float(minutes), start + 60.0 * minutes
        self.rate = 0.0  # seconds per answer token
        self.per_call = 0.0  # seconds of overhead per generation (prompt, scoring), once sizes differ enough to tell
        self.calls: list[tuple[int, float]] = []  # (answer tokens, seconds) of every generation so far
        self.cuts: list[str] = []
        self.predicted_full = self.predicted = 0.0

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def plannable(self) -> float:
        """The time left that a plan may fill: a tenth is kept back for what a plan does not see (the noise of a
        shared machine, the winner's write-up)."""
        return PLAN_SHARE * self.left()

    def measured(self, seconds: float, answer_tokens: int) -> None:
        """One more generation: seconds = per_call + rate × answer tokens, fitted (least squares) on every one so
        far when their sizes differ by half or more, else the mean rate with no overhead."""
        self.calls.append((answer_tokens, seconds))
        xs, ys = [float(x) for x, _ in self.calls], [y for _, y in self.calls]
        n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
        self.rate, self.per_call = sum(ys) / max(1.0, sum(xs)), 0.0
        if n >= 2 and max(xs) >= 1.5 * min(xs):
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            if slope > 0 and my - slope * mx > 0:
                self.rate, self.per_call = slope, my - slope * mx

    def seconds(self, answer_tokens: int, calls: int = 1) -> float:
        return self.rate * answer_tokens + self.per_call * calls

    def cut(self, what: str) -> None:
        if what not in self.cuts:
            self.cuts.append(what)

    def affords(self, answer_tokens: int, calls: int = 1) -> bool:
        return self.seconds(answer_tokens, calls) <= self.left()

    def describe(self) -> dict:
        return {
            "minutes": self.minutes,
            "seconds_per_answer_token": round(self.rate, 5),
            "seconds_per_generation": round(self.per_call, 3),
            "predicted_minutes_uncut": round(self.predicted_full / 60, 2),
            "predicted_minutes": round(self.predicted / 60, 2),
            "cuts": list(self.cuts),
        }


class _Search:
    """One run of `find_handle`: the questions, how an answer is scored, the progress bar and, per handle, its
    screening and calibration points with a status."""

    def __init__(self, lm, sae, concept: Concept, questions: list[str], config: FindConfig, handles, bar) -> None:
        self.lm, self.sae, self.concept, self.config, self.bar = lm, sae, concept, config, bar
        self.weights = _search_weights(lm, config)
        self.set_questions(questions)
        self.judged = dict(judge=concept.mentioned, loop_limit=config.loop_repetition)  # how every answer is scored
        self.report: dict[str, dict] = {}
        for h in handles:
            self.add(h)
        self.done = 0
        self.reach: dict[str, float | None] = {}  # per handle: the strongest screening push within the bound
        self.screened: list[tuple] = []  # (concept rate, -perplexity ratio, handle, best screening strength)
        self.sbase: SweepPoint | None = None
        self.budget: _Budget | None = None

    def set_questions(self, questions: list[str]) -> None:
        """The questions (and the config) the search runs on from now: screening's first few, calibration's every
        question `answers_per_question` times, both answered with the search's weights."""
        config = self.config
        self.questions = list(questions)
        self.screen_q = self.questions[: config.n_screen]
        self.calib_q = _repeated(self.questions, _per_question(config))
        self.scfg = config.generation(config.screen_tokens, weights=self.weights)
        self.fcfg = config.generation(config.max_new_tokens, weights=self.weights)

    def screening_baseline(self) -> None:
        """The unsteered answers to the screening questions: the first generations, timed for a budget."""
        t = time.perf_counter()
        self.sbase = evaluate(self.lm, [], prompts=self.screen_q, config=self.scfg, keep_samples=0, **self.judged)
        if self.budget is not None:
            self.budget.measured(time.perf_counter() - t, len(self.screen_q) * self.config.screen_tokens)

    def keep_budget(self, handles: list[Handle]) -> list[Handle]:
        """Shrink the search to the budget (what was cut is noted and reported); the handles to screen."""
        b = self.budget
        b.predicted_full = b.seconds(
            _worst_work(handles, self.questions, self.config), _worst_calls(handles, self.config)
        )
        config, questions, kept, b.cuts, b.predicted = _fit_budget(
            handles, self.questions, self.config, b.plannable(), b.rate, b.per_call
        )
        if b.cuts:
            self.bar.note(
                f"budget {b.minutes:g} min: the full search would take ~{b.predicted_full / 60:.0f} min; cut: "
                + "; ".join(b.cuts)
                + f" (now ~{b.predicted / 60:.1f} min)"
            )
        measured_on = (len(self.screen_q), self.config.screen_tokens)
        self.config = config
        self.set_questions(questions)
        for h in [h for h in handles if all(h.id != x.id for x in kept)]:
            self.report[h.id]["status"] = "not screened: cut to keep the time budget"
        if (len(self.screen_q), config.screen_tokens) != measured_on:  # the unsteered reference of the cut screen
            self.screening_baseline()
        self.bar.grow(self.done + _planned_work(kept, questions, config) - (self.bar.total or 0))
        return kept

    def add(self, h: Handle) -> None:
        self.report[h.id] = {**h.describe(), "screen": [], "calibration": [], "status": ""}

    def skip(self, answer_tokens: int) -> None:
        """Work planned and not done (a handle stopped early): counted, shown at the next tick."""
        self.done += answer_tokens

    def tick(self, n_q: int, tokens: int, info: str) -> None:
        self.done += n_q * tokens
        self.bar.update(self.done, info=info)

    def steered(self, h: Handle, strength: float, qs, gen: GenerationConfig, base: SweepPoint, stage: str) -> dict:
        """One handle at one strength on the questions, as a frontier point; advances the bar."""
        ivs = h.interventions(self.sae, strength, self.config.positions)
        t = time.perf_counter()
        pt = evaluate(self.lm, ivs, prompts=qs, config=gen, strength=strength, **self.judged)
        if self.budget is not None:
            self.budget.measured(time.perf_counter() - t, len(qs) * gen.max_new_tokens)
        self.tick(len(qs), gen.max_new_tokens, h.id)
        return _point(pt, base, stage, h.id, len(qs))

    # -- screening
    def screen(self, h: Handle) -> dict | None:
        """The handle on the coarse grid, weakest first; its best point within the (slackened) bound."""
        config, pts = self.config, []
        for s in sorted(h.grid):
            p = self.steered(h, s, self.screen_q, self.scfg, self.sbase, "screen")
            pts.append(p)
            if p["perplexity_ratio"] > 3 * config.ppl_bound:  # broken text: stronger is only worse
                break
        self.skip((len(h.grid) - len(pts)) * len(self.screen_q) * config.screen_tokens)
        self.report[h.id]["screen"] = pts
        inside = [p["strength"] for p in pts if p["perplexity_ratio"] <= config.ppl_bound * 1.25]
        self.reach[h.id] = max(inside, default=None)
        best = _best(pts, config.ppl_bound * 1.25)  # screening is noisy: a little slack
        if best is None or best["concept_rate"] <= self.sbase.concept_rate:
            self.report[h.id]["status"] = (
                "dropped at screening: never above the unsteered concept rate within the bound"
            )
        else:
            self.screened.append((best["concept_rate"], -best["perplexity_ratio"], h, best["strength"]))
        return best

    def screen_all(self, handles: list[Handle]) -> list[tuple]:
        """Screen every handle, then the CAA + logit pair (appended to `handles`); the best `n_calibrate`."""
        config = self.config
        if self.sbase is None:
            self.screening_baseline()
        firsts = {h.id: self.screen(h) for h in handles if self._affords_screening(h)}
        duo = _pair_candidate(handles, firsts, self.reach, config)
        if duo is not None:
            handles.append(duo)
            self.add(duo)
            self.screen(duo)
        else:
            self.skip(len(config.pair_grid) * len(self.screen_q) * config.screen_tokens)
        self.screened.sort(key=lambda t: (t[0], t[1]), reverse=True)
        for _, _, h, _ in self.screened[config.n_calibrate :]:
            self.report[h.id]["status"] = "screened, not among the best for calibration"
        return self.screened[: config.n_calibrate]

    # -- calibration
    def references(self) -> tuple[SweepPoint, dict, dict]:
        """The unsteered answers on every question and the prompt-only baseline: (base, baseline, prompt-only)."""
        qs, n = self.calib_q, len(self.calib_q)
        base = evaluate(self.lm, [], prompts=qs, config=self.fcfg, keep_samples=n, **self.judged)
        baseline = _point(base, base, "baseline", "unsteered", n)
        self.tick(n, self.config.max_new_tokens, "unsteered")
        prompt_only = _prompt_only(self.lm, self.concept, qs, self.fcfg, base, self.config.loop_repetition)
        self.tick(n, self.config.max_new_tokens, "prompt-only")
        return base, baseline, prompt_only

    def calibrate(self, h: Handle, s_star: float, base: SweepPoint) -> list[dict]:
        """The fine grid around the best screening strength, extended upwards while there is room under the
        bound, then refined between the last strength within it and the first past it."""
        config, mine = self.config, self.report[h.id]["calibration"]
        steps = list(config.fine_steps)
        while steps:
            s = round(s_star * steps.pop(0), 6)
            p = self.steered(h, s, self.calib_q, self.fcfg, base, "calibration")
            mine.append(p)
            extended = len(mine) - len(config.fine_steps)
            if not steps and extended < config.extend_steps and _room(p, config) and self._affords_point():
                # the 6 screening answers put the grid too low: go on up to the bound
                steps.append(s * config.extend_factor / s_star)
                self.bar.grow(len(self.calib_q) * config.max_new_tokens)
        for _ in range(config.refine_steps):
            s = _between(mine, config.ppl_bound)
            if s is None or not self._affords_point():
                break
            self.bar.grow(len(self.calib_q) * config.max_new_tokens)
            mine.append(self.steered(h, s, self.calib_q, self.fcfg, base, "calibration"))
        self.report[h.id]["status"] = "calibrated"
        return list(mine)

    def _reserve(self) -> int:
        """Answer tokens the search needs after screening at the least: references and one fine grid per calibrated
        handle."""
        c = self.config
        return (2 + c.n_calibrate * len(c.fine_steps)) * len(self.calib_q) * c.max_new_tokens

    def _affords_screening(self, h: Handle) -> bool:
        """Whether screening `h` leaves time for the rest (always, without a budget); a handle skipped is noted."""
        b = self.budget
        cost = len(h.grid) * len(self.screen_q) * self.config.screen_tokens
        reserve_calls = len(h.grid) + 2 + self.config.n_calibrate * len(self.config.fine_steps)
        if b is None or b.affords(cost + self._reserve(), reserve_calls) or not self.screened:
            return True
        self.report[h.id]["status"] = "not screened: the time budget ran out"
        self.skip(cost)
        b.cut("candidates left unscreened at the deadline")
        return False

    def fit_calibration(self, chosen: list[tuple]) -> list[tuple]:
        """After screening, with the rate measured on every answer so far: shrink what is left (calibrated handles,
        grid, questions, answer length; the cuts that touch calibration, in the same order) to the time left; the
        handles to calibrate."""
        b = self.budget
        if b is None:
            return chosen
        later = (
            "answers_per_question", "confirm_seeds", "extend_steps", "refine_steps", "n_calibrate", "fine_steps",
            "max_new_tokens",
        )  # fmt: skip
        config, questions = self.config, self.questions
        for what, c, q, _, _ in _cuts(self.config, len(self.questions)):
            c0 = replace(config, pair_grid=())
            if b.seconds(_worst_work([], questions, c0), _worst_calls([], c0) - 1) <= b.plannable():
                break
            if q < len(questions) or any(getattr(c, k) != getattr(config, k) for k in later):
                config, questions = replace(config, **{k: getattr(c, k) for k in later}), questions[:q]
                b.cut(f"{what} (after screening)")
        self.config = replace(config, pair_grid=self.config.pair_grid)
        self.set_questions(list(questions))
        for _, _, h, _ in chosen[config.n_calibrate :]:
            self.report[h.id]["status"] = "screened; calibration cut to keep the time budget"
        return chosen[: config.n_calibrate]

    def _affords_point(self) -> bool:
        """Whether one more calibration point fits the budget (always, without one); a point skipped is noted."""
        b = self.budget
        if b is None or b.affords(len(self.calib_q) * self.config.max_new_tokens):
            return True
        b.cut("calibration points skipped at the deadline")
        return False

    def confirm(self, h: Handle, strength: float) -> dict:
        """The winner on `confirm_seeds` fresh seeds, each beside the unsteered answers of its seed. The search's
        own figure is the best of ~20 draws of 48 answers, so it runs high; these are the figures to expect."""
        config, questions = self.config, self.questions
        ivs = h.interventions(self.sae, strength, config.positions)
        seeds = [config.seed + k for k in range(1, config.confirm_seeds + 1)]
        pts, ratios = [], []
        for seed in seeds:
            gen = config.generation(config.max_new_tokens, seed=seed)
            plain = evaluate(self.lm, [], prompts=questions, config=gen, keep_samples=0, **self.judged)
            pts.append(evaluate(self.lm, ivs, prompts=questions, config=gen, strength=strength, **self.judged))
            ratios.append(pts[-1].perplexity / plain.perplexity)
            self.tick(2 * len(questions), config.max_new_tokens, "confirmation")
        n = len(seeds) * len(questions)  # every seed answers every question: plain means over seeds
        hits = round(sum(p.concept_rate for p in pts) * len(questions))
        return {
            "seeds": seeds,
            "within_bound_share": sum(r <= config.ppl_bound for r in ratios) / len(ratios),
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

    def winner(self, h: Handle, best: dict) -> dict:
        """The chosen handle and strength with the figures to report (the confirmation's, when there is one)."""
        config = self.config
        seeds_cost = 2 * config.confirm_seeds * len(self.questions) * config.max_new_tokens
        affordable = self.budget is None or self.budget.affords(seeds_cost, 2 * config.confirm_seeds)
        if config.confirm_seeds and not affordable:
            self.budget.cut("confirmation on fresh seeds skipped at the deadline")
        conf = self.confirm(h, best["strength"]) if config.confirm_seeds and affordable else None
        calibration = self.report[h.id]["calibration"]
        crossed = None
        if conf is not None and conf["perplexity_ratio"] > config.ppl_bound:
            lower = _step_down(calibration, best, config.ppl_bound)
            if lower is not None and (self.budget is None or self.budget.affords(seeds_cost, 2 * config.confirm_seeds)):
                crossed = {"strength": best["strength"], "confirmation": conf}
                best = {**lower, "margin_met": best.get("margin_met", True)}
                conf = self.confirm(h, best["strength"])
        head = conf or {k: best[k] for k in ("concept_rate", "perplexity_ratio", "repetition", "looping")}
        return {
            "kind": h.kind,
            "id": h.id,
            "site": h.site,
            "feature": h.feature,
            "strength": best["strength"],
            "unit": _UNITS[h.kind],
            **{k: head[k] for k in ("concept_rate", "perplexity_ratio", "repetition", "looping")},
            "concept_rate_ci": conf["concept_rate_ci"] if conf else None,
            "measured_on": "fresh seeds (confirmation)" if conf else f"the search's seed {config.seed}",
            "positions": config.positions,
            "max_act": h.max_act,
            "max_source": h.max_source,
            "range": [min(p["strength"] for p in calibration), max(p["strength"] for p in calibration)],
            "search": {
                "seed": config.seed,
                **{k: best[k] for k in ("concept_rate", "perplexity_ratio", "fit_rate", "fit_ppl_ratio", "looping")},
                "margin": config.ppl_margin,
                "margin_met": best.get("margin_met", True),
            },
            "confirmation": conf,
            "stepped_down_from": crossed,
            "found_by": h.found_by,
        }


def find_handle(
    lm: LoadedModel,
    sae,
    concept: Concept,
    *,
    questions: Sequence[str] = NEUTRAL_PROMPTS,
    config: FindConfig | None = None,
    handles: Sequence[Handle] | None = None,
    progress: bool = True,
    minutes: float | None = None,
) -> FindResult:
    """Search handles for `concept`, screen them cheaply, calibrate the best few (see module doc).

    `handles` replaces the automatic candidates (e.g. to calibrate a feature you already have in mind).
    `minutes`: a wall-time budget, kept on any model. The first generations (the unsteered screening answers) are
    timed; the search is then shrunk until its worst case fits (the pair, confirmation seeds, extra calibration
    points, screening grids, candidates, questions, answer length: least harmful first), and calibration points
    that would pass the deadline are skipped. What was cut is in `result.config["budget"]`.
    """
    config = config or FindConfig()
    questions = [q for q in questions if q.strip()]
    if len(questions) < 2:
        raise SteerError("give at least 2 neutral questions to calibrate on")
    t0 = time.perf_counter()
    handles = list(handles) if handles is not None else build_handles(lm, sae, concept, config)
    if not handles:
        raise SteerError(f"no candidate handle for {concept.name!r}: no SAE and no CAA site gave a direction")
    work = _planned_work(handles, questions, config)
    with ProgressBar(f"steer find {concept.name}", work, unit="answer tokens", enabled=progress) as bar:
        run = _Search(lm, sae, concept, questions, config, handles, bar)
        screened = handles
        if minutes is not None:
            run.budget = _Budget(minutes, t0)
            run.screening_baseline()
            screened = run.keep_budget(handles)
        chosen = run.fit_calibration(run.screen_all(screened))
        handles += [h for h in screened if all(h is not x for x in handles)]  # the pair, and cut grids
        config, questions = run.config, run.questions
        base, baseline, prompt_only = run.references()
        frontier = [p for _, _, h, s_star in chosen for p in run.calibrate(h, s_star, base)]
        run.skip((config.n_calibrate - len(chosen)) * len(config.fine_steps) * len(run.calib_q) * config.max_new_tokens)
        best = _choose(
            {h.id: run.report[h.id]["calibration"] for _, _, h, _ in chosen}, config.ppl_bound, config.ppl_margin
        )
        best_out = None if best is None else run.winner(next(x for x in handles if x.id == best["handle"]), best)
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}
    cfg["caa_sites"] = [h.site for h in handles if h.kind == "caa"]
    cfg["logit_sites"] = [h.site for h in handles if h.kind == "logit"]
    cfg["search_weights"] = run.weights
    if run.budget is not None:
        cfg["budget"] = {**run.budget.describe(), "seconds": round(time.perf_counter() - t0, 1)}
    result = FindResult(
        concept,
        cfg,
        baseline,
        prompt_only,
        list(run.report.values()),
        frontier,
        best_out,
        round(time.perf_counter() - t0, 1),
        list(questions),
    )
    result._handles = {h.id: h for h in handles}  # for save_preset
    return result


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
            strength=float(best["strength"]) * scale,
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
                sae=sae_spec(sae, path.parent),
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
