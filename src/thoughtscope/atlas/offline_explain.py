"""Explanations without a language model, over a whole atlas: `explain_offline` has the offline explainer
(`cue_search.py`: the strings and kinds of text where a feature fires, and what it promotes) write each
feature's explanation, scores it with the lexical scorer on held-out contexts, adds the shuffled control
and stores the results in the atlas database.
"""

from __future__ import annotations

import os
import time

from .cue_search import (
    KIND_WORDS,
    LANGUAGE_WORDS,
    LAYOUT_WORDS,
    OFFLINE,
    OfflineExplainer,
    OfflineOptions,
)
from .db import Atlas
from .heldout import ExplainConfig, ExplainerError, prepare

__all__ = [
    "KIND_WORDS",
    "LANGUAGE_WORDS",
    "LAYOUT_WORDS",
    "OFFLINE",
    "OfflineExplainer",
    "OfflineOptions",
    "explain_offline",
]


def explain_offline(
    atlas: Atlas | str | os.PathLike,
    *,
    tokenizer,
    features=None,
    sample: int | None = None,
    config: ExplainConfig | None = None,
    options: OfflineOptions | None = None,
    overwrite: bool = False,
    control: bool = True,
    progress: bool = True,
    console=None,
) -> dict:
    """Explain and score features of an atlas without any language model; results go into its database.

    Every explanation is scored by the lexical scorer (scoring.py) on its feature's held-out contexts, and
    (control=True, two or more features) so is a shuffled control: each feature scored with another
    feature's explanation, from a seeded derangement. Features whose stored explanation came from another
    method (an LLM) are kept unless overwrite=True. Returns the summary `summarize` writes.
    """
    from .explain import select_features
    from .scoring import LexicalScorer, derangement, detection_items, lexical_detection, lexical_fuzz, summarize

    cfg = config or ExplainConfig()
    own = not isinstance(atlas, Atlas)
    at = Atlas.open(atlas) if own else atlas
    t0 = time.perf_counter()
    try:
        todo = select_features(at, features, sample, cfg.seed)
        if not overwrite:
            # an earlier offline version's explanation is replaced; another method's (an LLM's, a person's) is kept
            keep = {
                f
                for f in at.explained("ok")
                if not str((at.explanation(f) or {}).get("method") or OFFLINE).startswith("offline-tokens")
            }
            todo = [f for f in todo if f not in keep]
        explainer = OfflineExplainer(at, tokenizer, cfg, options)
        scorer = LexicalScorer()
        bar = _bar(progress and bool(todo), console, len(todo))
        recs: dict[int, dict] = {}
        held: dict[int, tuple] = {}
        try:
            for n in todo:
                t1 = time.perf_counter()
                task = prepare(at, n, cfg)
                rec = {
                    "explainer": explainer.name,
                    "scorer": scorer.name,
                    "method": explainer.method,
                    "scorer_method": scorer.method,
                    "created": time.time(),
                }
                try:
                    rec["explanation"] = explainer.explain(task)
                    texts, labels = detection_items(task, tokenizer, cfg)
                    det = lexical_detection(rec["explanation"], texts, labels, scorer)
                    fz = lexical_fuzz(task, rec["explanation"], tokenizer, cfg, scorer) if cfg.fuzz and task.pos else {}
                    rec.update(
                        status="ok",
                        detection_auroc=det["auroc"],
                        detection_bacc=det["bacc"],
                        fuzz_auroc=fz.get("auroc"),
                        fuzz_bacc=fz.get("bacc"),
                    )
                    rec["details"] = {
                        "n_shown": len(task.shown),
                        "n_pos": len(task.pos),
                        "n_neg": len(task.neg),
                        "shown_contexts": sorted(task.shown_contexts()),
                        "heldout_contexts": sorted(task.heldout_contexts()),
                        "detection": {"labels": det["labels"], "probs": [round(p, 4) for p in det["probs"]]},
                    }
                    held[n] = (texts, labels)  # the texts only: a whole atlas of tasks would not fit in memory
                except ExplainerError as e:  # one feature's failure is recorded, the run goes on
                    rec.update(status="failed", error=str(e))
                rec["seconds"] = time.perf_counter() - t1
                recs[n] = rec
                if bar is not None:
                    bar[0].update(bar[1], advance=1)
            if control:
                ok = [n for n in todo if recs[n]["status"] == "ok"]
                for n, other in derangement(ok, cfg.seed + 1).items():
                    det = lexical_detection(recs[other]["explanation"], *held[n], scorer)
                    recs[n].update(shuffled_detection_auroc=det["auroc"], shuffled_detection_bacc=det["bacc"])
                    recs[n]["details"]["shuffled_from"] = other
        finally:
            if bar is not None:
                bar[0].stop()
        at.save_explanations(recs)
        return summarize(at, todo, method=OFFLINE, seconds=time.perf_counter() - t0)
    finally:
        if own:
            at.close()


def _bar(enabled: bool, console, total: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("[bold]explain (offline)"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )
    tid = bar.add_task("explain", total=total)
    bar.start()
    return bar, tid
