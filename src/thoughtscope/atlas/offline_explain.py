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
    workers: int | None = None,
) -> dict:
    """Explain and score features of an atlas without any language model; results go into its database.

    Every explanation is scored by the lexical scorer (scoring.py) on its feature's held-out contexts, and
    (control=True, two or more features) so is a shuffled control: each feature scored with another
    feature's explanation, from a seeded derangement. Features whose stored explanation came from another
    method (an LLM) are kept unless overwrite=True. Features are independent, so `workers` processes (default:
    one per CPU core, up to 8, when there are more than PARALLEL_FROM features) split them; the results are the
    same for any number of workers. Returns the summary `summarize` writes.
    """
    from .explain import select_features
    from .scoring import LexicalScorer, derangement, lexical_detection, summarize

    cfg = config or ExplainConfig()
    options = options or OfflineOptions()
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
        if workers is None:
            workers = min(8, os.cpu_count() or 1) if len(todo) > PARALLEL_FROM else 1
        if workers < 1:
            raise ExplainerError(f"explain_offline: workers must be >= 1, got {workers}")
        bar = _bar(progress and bool(todo), console, len(todo))
        recs: dict[int, dict] = {}
        held: dict[int, tuple] = {}  # the texts only: a whole atlas of tasks would not fit in memory
        try:
            for n, rec, texts in _explained(at, tokenizer, cfg, options, todo, workers):
                recs[n] = rec
                if texts is not None:
                    held[n] = texts
                if bar is not None:
                    bar[0].update(bar[1], advance=1)
            if control:
                scorer = LexicalScorer()
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


# below this many features the workers' start-up (opening the atlas, reading its background text) outweighs the gain
PARALLEL_FROM = 500


def explain_and_score(at: Atlas, explainer: OfflineExplainer, tokenizer, cfg: ExplainConfig, n: int):
    """One feature: (its record for the database, its held-out texts and labels for the shuffled control or None)."""
    from .scoring import LexicalScorer, detection_items, lexical_detection, lexical_fuzz

    scorer = LexicalScorer()
    t1 = time.perf_counter()
    task = prepare(at, n, cfg)
    rec = {
        "explainer": explainer.name,
        "scorer": scorer.name,
        "method": explainer.method,
        "scorer_method": scorer.method,
        "created": time.time(),
    }
    held = None
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
        held = (texts, labels)
    except ExplainerError as e:  # one feature's failure is recorded, the run goes on
        rec.update(status="failed", error=str(e))
    rec["seconds"] = time.perf_counter() - t1
    return rec, held


def _explained(at: Atlas, tokenizer, cfg: ExplainConfig, options: OfflineOptions, todo: list[int], workers: int):
    """(feature, record, held-out texts) for every feature in `todo`, in order: here, or in worker processes that
    each open the atlas read-only and take chunks of features."""
    if workers == 1 or len(todo) < 2:
        explainer = OfflineExplainer(at, tokenizer, cfg, options)
        for n in todo:
            yield (n, *explain_and_score(at, explainer, tokenizer, cfg, n))
        return
    import multiprocessing

    chunk = max(1, min(64, len(todo) // (4 * workers)))
    chunks = [todo[i : i + chunk] for i in range(0, len(todo), chunk)]
    # fork: workers start at once and a caller's script needs no `if __name__ == "__main__"` guard. The workers
    # only read (numpy, SQLite through their own connection, the tokenizer without its thread pool)
    ctx = multiprocessing.get_context("fork")
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with ctx.Pool(workers, initializer=_worker_start, initargs=(str(at.path), tokenizer, cfg, options)) as pool:
            for results in pool.imap(_worker_run, chunks):
                yield from results
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


_WORKER: dict = {}


def _worker_start(path: str, tokenizer, cfg: ExplainConfig, options: OfflineOptions) -> None:
    at = Atlas.open(path)
    _WORKER.update(at=at, tokenizer=tokenizer, cfg=cfg, explainer=OfflineExplainer(at, tokenizer, cfg, options))


def _worker_run(features: list[int]) -> list[tuple]:
    w = _WORKER
    return [(n, *explain_and_score(w["at"], w["explainer"], w["tokenizer"], w["cfg"], n)) for n in features]


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
