"""Automated explanations of atlas features, and the scores that say how far to trust them.

Explainer: shown a feature's top and quantile-sampled contexts with its active tokens marked
<<like this>>, it answers with one short phrase. Scorers (delphi-style, our own prompts):

* detection: held-out activating contexts and contexts where the feature is silent, unmarked; the scorer
  predicts which ones activate. Balanced accuracy at 0.5 and AUROC over its probabilities.
* fuzzing: activating contexts whose marks are either the true active tokens or the same number of
  tokens chosen at random; the scorer predicts which marks are right.

An explanation is only as good as these scores on contexts it has not seen, which is why the examples
shown to the explainer and those shown to the scorer are disjoint.

Clients (thoughtscope/llm.py, shared with the NLA data builder): any OpenAI-compatible endpoint, or the local
target model. The prompts and the parsing of the answers are in prompts.py. The lexical scorer
(scoring.py) can stand in for an LLM scorer, and the offline explainer (offline_explain.py) for an LLM
explainer.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import numpy as np

from ..llm import (
    HTTPChatClient,
    LLMError,
    LocalChatClient,
    MalformedAnswer,
    client_from_env,
)
from ..progress import ProgressBar
from .db import Atlas
from .heldout import ExplainConfig, ExplainerError, FeatureTask, prepare, render, shuffled_marks, true_marks
from .prompts import (
    EXPLAIN_SYSTEM,
    detection_messages,
    explain_messages,
    fuzz_messages,
    parse_explanation,
    parse_probabilities,
    single_messages,
)
from .scoring import (
    LexicalScorer,
    auroc,
    balanced_accuracy,
    derangement,
    detection_items,
    lexical_detection,
    lexical_fuzz,
    summarize,
)

__all__ = [
    "EXPLAIN_SYSTEM",
    "ExplainConfig",
    "ExplainerError",
    "FeatureTask",
    "HTTPChatClient",
    "LLMError",
    "LocalChatClient",
    "auroc",
    "balanced_accuracy",
    "client_from_env",
    "detection_messages",
    "estimate",
    "explain_atlas",
    "explain_messages",
    "fuzz_messages",
    "parse_explanation",
    "parse_probabilities",
    "prepare",
    "render",
    "single_messages",
]

# --------------------------------------------------------------------------- one feature


def _predict(client, explanation: str, texts: list[str], kind: str, cfg: ExplainConfig) -> list[float]:
    if isinstance(client, LocalChatClient):
        return [client.yes_probability(single_messages(explanation, t, kind)) for t in texts]
    make = detection_messages if kind == "detection" else fuzz_messages
    out: list[float] = []
    for s in range(0, len(texts), cfg.per_prompt):
        chunk = texts[s : s + cfg.per_prompt]
        out += client.call(
            make(explanation, chunk), max_new_tokens=cfg.score_max_new_tokens, parse=parse_probabilities(len(chunk))
        )
    return out


def score_detection(task: FeatureTask, explanation: str, scorer, tokenizer, cfg: ExplainConfig) -> dict:
    """Detection on the task's held-out windows, by an LLM client or the lexical scorer."""
    texts, labels = detection_items(task, tokenizer, cfg)
    if isinstance(scorer, LexicalScorer):
        return lexical_detection(explanation, texts, labels, scorer)
    items = list(zip(texts, labels))
    random.Random(cfg.seed * 104729 + task.feature).shuffle(items)  # no order for an LLM to pick up
    probs = _predict(scorer, explanation, [t for t, _ in items], "detection", cfg)
    labels = [y for _, y in items]
    return {"labels": labels, "probs": probs, "bacc": balanced_accuracy(labels, probs), "auroc": auroc(labels, probs)}


def score_explanation(task: FeatureTask, explanation: str, scorer, tokenizer, cfg: ExplainConfig) -> dict:
    """Detection and fuzzing scores of `explanation` on the task's held-out examples."""
    res: dict[str, Any] = {}
    if task.pos or task.neg:
        res["detection"] = score_detection(task, explanation, scorer, tokenizer, cfg)
    if cfg.fuzz and task.pos:
        if isinstance(scorer, LexicalScorer):
            res["fuzz"] = lexical_fuzz(task, explanation, tokenizer, cfg, scorer)
            return res
        rng = random.Random(cfg.seed * 104729 + task.feature)
        fz = []
        for i, e in enumerate(task.pos):
            right = i % 2 == 0
            marks = true_marks(e, cfg) if right else shuffled_marks(e, cfg, rng)
            fz.append((render(e, tokenizer, cfg, marks=marks), int(right)))
        rng.shuffle(fz)
        probs = _predict(scorer, explanation, [t for t, _ in fz], "fuzz", cfg)
        labels = [y for _, y in fz]
        res["fuzz"] = {
            "labels": labels,
            "probs": probs,
            "bacc": balanced_accuracy(labels, probs),
            "auroc": auroc(labels, probs),
        }
    return res


def scorer_method(scorer) -> str | None:
    if scorer is None:
        return None
    return getattr(scorer, "method", None) or "llm-detection"


def explain_one(
    task: FeatureTask, explainer, scorer, tokenizer, cfg: ExplainConfig, explanation: str | None = None
) -> dict:
    """Explain (unless `explanation` is given) and score one feature; never raises for endpoint failures."""
    t0 = time.perf_counter()
    rec: dict[str, Any] = {
        "explainer": explainer.name if explainer is not None and explanation is None else "given",
        "method": "llm" if explanation is None else "given",
        "scorer": scorer.name if scorer is not None else None,
        "scorer_method": scorer_method(scorer),
        "created": time.time(),
    }
    try:
        if explanation is None:
            if not task.shown:
                raise ExplainerError("the feature never fired in the atlas corpus: nothing to explain")
            explanation = explainer.call(
                explain_messages(task, tokenizer, cfg),
                max_new_tokens=cfg.explain_max_new_tokens,
                parse=parse_explanation,
            )
        rec["explanation"] = explanation
        details: dict[str, Any] = {
            "n_shown": len(task.shown),
            "n_pos": len(task.pos),
            "n_neg": len(task.neg),
            "shown_contexts": sorted(task.shown_contexts()),
            "heldout_contexts": sorted(task.heldout_contexts()),
        }
        if scorer is not None:
            s = score_explanation(task, explanation, scorer, tokenizer, cfg)
            details.update(s)
            rec["detection_bacc"] = s.get("detection", {}).get("bacc")
            rec["detection_auroc"] = s.get("detection", {}).get("auroc")
            rec["fuzz_bacc"] = s.get("fuzz", {}).get("bacc")
            rec["fuzz_auroc"] = s.get("fuzz", {}).get("auroc")
        rec["details"] = details
        rec["status"] = "ok"
    except (ExplainerError, LLMError, MalformedAnswer) as e:
        rec["status"] = "failed"
        rec["error"] = str(e)
    rec["seconds"] = time.perf_counter() - t0
    return rec


def shuffled_control(at: Atlas, features: Sequence[int], scorer, tokenizer, cfg: ExplainConfig) -> int:
    """Score each explained feature among `features` with another one's explanation (seeded derangement) and
    store the result as its shuffled_detection_auroc / _bacc; features that already have one are skipped, so
    an interrupted control resumes. Returns how many were scored."""
    ok = sorted(set(int(f) for f in features) & at.explained("ok"))
    done = 0
    for n, other in derangement(ok, cfg.seed + 1).items():
        rec = at.explanation(n)
        if (rec.get("details") or {}).get("shuffled_from") is not None or not rec.get("explanation"):
            continue
        try:
            det = score_detection(prepare(at, n, cfg), at.explanation(other)["explanation"], scorer, tokenizer, cfg)
        except (ExplainerError, LLMError, MalformedAnswer):
            continue
        rec.update(shuffled_detection_auroc=det["auroc"], shuffled_detection_bacc=det["bacc"])
        rec["details"] = dict(rec.get("details") or {}, shuffled_from=other)
        at.save_explanation(n, rec)
        done += 1
    return done


# --------------------------------------------------------------------------- the run


def estimate(
    atlas: Atlas,
    features: Sequence[int],
    tokenizer,
    cfg: ExplainConfig,
    *,
    scoring: bool = True,
    seconds_per_request: float = 2.0,
    concurrency: int = 1,
    usd_per_mtok: float | None = None,
) -> dict:
    """Tokens, requests, time (and cost, given a price) of explaining `features`, from a sample of real prompts."""
    sample = list(features)[:: max(1, len(features) // 8)][:8]
    chars, reqs = [], 0
    for n in sample:
        task = prepare(atlas, n, cfg)
        c = sum(len(m["content"]) for m in explain_messages(task, tokenizer, cfg))
        r = 1
        if scoring:
            texts = [render(e, tokenizer, cfg) for e in task.pos + task.neg]
            n_det = math.ceil(len(texts) / cfg.per_prompt) if texts else 0
            c += sum(len(t) + 12 for t in texts) + 300 * n_det
            r += n_det
            if cfg.fuzz and task.pos:
                c += sum(len(render(e, tokenizer, cfg)) + 20 for e in task.pos) + 400
                r += math.ceil(len(task.pos) / cfg.per_prompt)
        chars.append(c)
        reqs += r
    per_feature_tokens = (np.mean(chars) / 3.5) if chars else 0.0  # ~3.5 characters per token
    per_feature_reqs = reqs / max(1, len(sample))
    n = len(features)
    out = {
        "features": n,
        "requests": int(round(per_feature_reqs * n)),
        "prompt_tokens_per_feature": int(per_feature_tokens),
        "prompt_tokens": int(per_feature_tokens * n),
        "completion_tokens": int(n * (cfg.explain_max_new_tokens + (cfg.score_max_new_tokens if scoring else 0))),
        "seconds": per_feature_reqs * n * seconds_per_request / max(1, concurrency),
    }
    if usd_per_mtok is not None:
        out["usd"] = (out["prompt_tokens"] + out["completion_tokens"]) * usd_per_mtok / 1e6
    return out


def select_features(
    atlas: Atlas, features: Sequence[int] | None = None, sample: int | None = None, seed: int = 0
) -> list[int]:
    if features is not None:
        return [atlas.check_feature(int(f)) for f in features]
    if sample is not None:
        return atlas.random_features(sample, seed=seed, alive_only=True)
    return [int(r[0]) for r in atlas.con.execute("SELECT id FROM features WHERE n_active > 0 ORDER BY id")]


def explain_atlas(
    atlas: Atlas | str | os.PathLike,
    explainer,
    scorer=None,
    *,
    tokenizer,
    features=None,
    sample: int | None = None,
    config: ExplainConfig | None = None,
    resume: bool = True,
    retry_failed: bool = True,
    progress: bool = True,
    console=None,
    given: dict[int, str] | None = None,
    control: bool = True,
) -> dict:
    """Explain and score features of an atlas; results go straight into its database as they arrive.

    The scorer is an LLM client or a `LexicalScorer` (any explanation, scored from its text alone).
    resume skips features already explained ("ok"); failed ones are tried again unless retry_failed=False.
    `given` maps feature -> explanation to score without calling the explainer (hand-written hypotheses).
    control=True (and a scorer) adds the shuffled-explanation control over the selected features.
    Returns a summary: counts, failures, mean scores with CIs (detection_auroc_mean, shuffled_auroc_mean, ...),
    usage, and the pre-run estimate.
    """
    cfg = config or ExplainConfig()
    if explainer is None and given is None:
        raise ExplainerError("no explainer: pass an HTTP or local client, or `given` explanations to score")
    own = not isinstance(atlas, Atlas)
    at = Atlas.open(atlas) if own else atlas
    try:
        selected = (
            select_features(at, features, sample, cfg.seed) if given is None else [at.check_feature(f) for f in given]
        )
        todo = list(selected)
        if resume:
            done = at.explained("ok") | (set() if retry_failed else at.explained("failed"))
            todo = [f for f in todo if f not in done]
        conc = cfg.concurrency if getattr(explainer or scorer, "concurrent", False) else 1
        est = estimate(at, todo, tokenizer, cfg, scoring=scorer is not None, concurrency=conc) if todo else {}
        if progress and console is not None and todo:
            console.print(_plan_line(len(todo), explainer, scorer, est, conc))
        summary = {"requested": len(todo), "ok": 0, "failed": 0, "errors": {}, "estimate": est}
        run = _FeatureRun(at, explainer, scorer, tokenizer, cfg, given or {}, summary)
        run.all(todo, conc, progress)
        if control and scorer is not None:
            summary["control_scored"] = shuffled_control(at, selected, scorer, tokenizer, cfg)
        sc = at.scores(todo)
        for key in ("detection_bacc", "detection_auroc", "fuzz_bacc", "fuzz_auroc"):
            vals = [r[key] for r in sc if r[key] is not None]
            summary[key] = float(np.mean(vals)) if vals else None
        summary["selected"] = summarize(at, selected, method="llm" if given is None else "given")
        summary["usage"] = {"explainer": getattr(explainer, "usage", None), "scorer": getattr(scorer, "usage", None)}
        return summary
    finally:
        if own:
            at.close()


def _plan_line(n: int, explainer, scorer, est: dict, conc: int) -> str:
    """What a run is about to do and what it will cost, from the estimate."""
    return (
        f"[bold]explaining {n} features[/bold] with {getattr(explainer, 'name', 'given')}"
        f"; scoring with {getattr(scorer, 'name', 'none')}: about {est['requests']} requests, "
        f"{est['prompt_tokens']:,} prompt tokens ({est['prompt_tokens_per_feature']:,}/feature), "
        f"~{est['seconds'] / 60:.1f} min at {conc} concurrent" + (f", ~${est['usd']:.2f}" if "usd" in est else "")
    )


class _FeatureRun:
    """Explains and scores features one by one or `conc` at a time, storing each record as it arrives and
    counting it in `summary`."""

    def __init__(self, at: Atlas, explainer, scorer, tokenizer, cfg: ExplainConfig, given: dict, summary: dict):
        self.at, self.explainer, self.scorer, self.tokenizer, self.cfg = at, explainer, scorer, tokenizer, cfg
        self.given, self.summary = given, summary

    def one(self, n: int) -> dict:
        task = prepare(self.at, n, self.cfg)
        return explain_one(task, self.explainer, self.scorer, self.tokenizer, self.cfg, self.given.get(n))

    def record(self, n: int, rec: dict, bar: ProgressBar) -> None:
        summary = self.summary
        self.at.save_explanation(n, rec)
        summary[rec["status"]] += 1
        if rec["status"] == "failed":
            summary["errors"][n] = rec.get("error")
        bar.advance(1, info=f"{summary['ok']} ok, {summary['failed']} failed")

    def all(self, todo: list[int], conc: int, progress: bool) -> None:
        with ProgressBar("explain", len(todo), unit="features", enabled=progress and bool(todo)) as bar:
            if conc <= 1:
                for n in todo:
                    self.record(n, self.one(n), bar)
                return
            with ThreadPoolExecutor(max_workers=conc) as pool:
                futs = {}
                for n in todo:  # prepared in this thread, which owns the atlas connection
                    task = prepare(self.at, n, self.cfg)
                    args = (task, self.explainer, self.scorer, self.tokenizer, self.cfg, self.given.get(n))
                    futs[pool.submit(explain_one, *args)] = n
                for fut in as_completed(futs):
                    self.record(futs[fut], fut.result(), bar)
