"""Explanations without a language model, over a whole atlas: `explain_offline` has the offline explainer
(`cue_search.py`: the strings and kinds of text where a feature fires, and what it promotes) write each
feature's explanation, scores it with the lexical scorer on held-out contexts, adds the shuffled control
and stores the results in the atlas database.
"""

from __future__ import annotations

import functools
import os
import time

from ..progress import ProgressBar
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
from .output_explain import OUTPUT, WordBook, says_text, says_words

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
    kinds: tuple[str, ...] = ("input", "output"),
    output_logits: dict[int, list[tuple[int, float]]] | None = None,
) -> dict:
    """Explain and score features of an atlas without any language model; results go into its database.

    Every explanation is scored by the lexical scorer (scoring.py) on its feature's held-out contexts, and
    (control=True, two or more features) so is a shuffled control: each feature scored with another
    feature's explanation, from a seeded derangement. Features whose stored explanation came from another
    method (an LLM) are kept unless overwrite=True. Features are independent, so `workers` processes (default:
    one per CPU core, up to 8, when there are more than PARALLEL_FROM features) split them; the results are the
    same for any number of workers. Returns the summary `summarize` writes, with per kind the mean detection
    AUROC and its shuffled control, the cross-fitted best-kind mean and the share beating its control (the
    whole `best.summarize_kinds` under "kinds"), and "nla", whether an NLA reading applies (`nla_kind.py`).
    (`console` is kept for callers of earlier versions: the progress bar writes to stderr.)

    kinds: "output" also writes the output-side explanation (`output_explain.py`: the whole words of the
    feature's promoted tokens, `output_logits[feature]` when given, else the atlas's stored logit effects),
    scored by the same scorer on the same held-out windows, with its own shuffled control, into the
    explanation_kinds table. The input side is always written.
    """
    from .best import summarize_kinds
    from .explain import select_features
    from .nla_kind import nla_note
    from .scoring import summarize

    cfg = config or ExplainConfig()
    options = options or OfflineOptions()
    kinds = tuple(k.strip() for k in kinds)
    if "input" not in kinds or not set(kinds) <= {"input", "output"}:
        raise ExplainerError(
            f"explanation kinds must be 'input' and optionally 'output' (offline), got {','.join(kinds) or 'none'}"
        )
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
        bar = ProgressBar("explain (offline)", len(todo), unit="features", enabled=progress and bool(todo))
        setup = (cfg, options, "output" in kinds, output_logits)
        with bar, _Workers(at, tokenizer, setup, workers if len(todo) > 1 else 1) as run:
            recs, held = _explain_all(run, todo, bar)
            others = {n: rec.pop("kinds", {}) for n, rec in recs.items()}
            if control:
                _add_shuffled_control(run, recs, held, todo, cfg.seed)
                _add_shuffled_control(
                    run, {n: o["output"] for n, o in others.items() if "output" in o}, held, todo, cfg.seed
                )
        at.save_explanations(recs)
        if any(others.values()):
            at.save_explanation_kinds({n: o for n, o in others.items() if o})
        out = summarize(at, todo, method=OFFLINE, seconds=time.perf_counter() - t0)
        ks = summarize_kinds(at, todo, seed=cfg.seed)
        out.update(
            detection_auroc_by_kind={k: v["detection_auroc_mean"] for k, v in ks["kinds"].items()},
            shuffled_auroc_by_kind={k: v["shuffled_auroc_mean"] for k, v in ks["kinds"].items()},
            best_kind_auroc_mean=ks["best_kind_auroc_mean"],
            best_kind_auroc_ci=ks["best_kind_auroc_ci"],
            best_beats_shuffled_share=ks["best_beats_shuffled_share"],
            best_rule=ks["best_rule"],
            kinds=ks,
            nla=nla_note(at.meta.get("site")),
        )
        return out
    finally:
        if own:
            at.close()


def _explain_all(run: _Workers, todo: list[int], bar: ProgressBar) -> tuple[dict[int, dict], dict[int, tuple]]:
    """Every feature's record, and the held-out texts and labels of those explained (for the control)."""
    recs: dict[int, dict] = {}
    held: dict[int, tuple] = {}  # the texts only: a whole atlas of tasks would not fit in memory
    for n, rec, texts in run(_explain_features, todo):
        recs[n] = rec
        if texts is not None:
            held[n] = texts
        bar.advance(1)
    return recs, held


def _add_shuffled_control(run: _Workers, recs: dict[int, dict], held: dict[int, tuple], todo: list[int], seed: int):
    """Score each explained feature with another one's explanation (a seeded derangement), into its record."""
    from .scoring import derangement

    ok = [n for n in todo if n in recs and recs[n]["status"] == "ok" and n in held]
    pairs = derangement(ok, seed + 1)
    jobs = [(n, recs[other]["explanation"], *held[n]) for n, other in pairs.items()]
    for n, det in run(_score_controls, jobs):
        recs[n].update(shuffled_detection_auroc=det["auroc"], shuffled_detection_bacc=det["bacc"])
        recs[n]["details"]["shuffled_from"] = pairs[n]
        # per window, so a summary can read the control on the same half of the windows as the explanation
        recs[n]["details"]["detection"]["shuffled_probs"] = [round(p, 4) for p in det["probs"]]


# below this many features the workers' start-up (opening the atlas, reading its background text) outweighs the gain
PARALLEL_FROM = 500


def explain_and_score(at: Atlas, explainer: OfflineExplainer, tokenizer, cfg: ExplainConfig, n: int, output=None):
    """One feature: (its record for the database, its held-out texts and labels for the shuffled control or None).
    output (a `_Output`): the record also holds {"kinds": {"output": record}}, scored on the same windows."""
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
    if output is not None:
        rec["kinds"] = {"output": output.record(task, held, scorer)}
    rec["seconds"] = time.perf_counter() - t1
    return rec, held


class _Output:
    """Writes and scores the output-side explanation of a feature (`output_explain.py`)."""

    def __init__(self, at: Atlas, tokenizer, logits: dict[int, list[tuple[int, float]]] | None):
        self.tokenizer, self.logits = tokenizer, logits
        self.book = WordBook.from_atlas(at, tokenizer)

    def record(self, task, held: tuple | None, scorer) -> dict:
        from .scoring import lexical_detection

        cands = (self.logits or {}).get(task.feature) or task.logits_pos
        words = says_words(self.tokenizer, cands, self.book)
        rec = {"method": OUTPUT, "scorer_method": scorer.method, "created": time.time()}
        if not words:
            return {**rec, "status": "failed", "error": "none of its promoted tokens reads as a whole word"}
        rec.update(status="ok", explanation=says_text(words))
        details: dict = {"words": words, "candidates": len(cands)}
        if held is not None:
            det = lexical_detection(rec["explanation"], *held, scorer)
            rec.update(detection_auroc=det["auroc"], detection_bacc=det["bacc"])
            details["detection"] = {"labels": det["labels"], "probs": [round(p, 4) for p in det["probs"]]}
        rec["details"] = details
        return rec


class _Workers:
    """Runs a function over chunks of items, here or in worker processes (each with the atlas opened read-only
    and its own explainer), results in the items' order; one pool serves the explanations and the control."""

    def __init__(self, at: Atlas, tokenizer, setup: tuple, workers: int):
        self.setup = (str(at.path), tokenizer, *setup)
        self.workers, self.pool = workers, None
        self.state = _state(at, tokenizer, *setup) if workers == 1 else None

    def __enter__(self):
        if self.workers > 1:
            import multiprocessing

            # fork: workers start at once and a caller's script needs no `if __name__ == "__main__"` guard. The
            # workers only read (numpy, SQLite through their own connection, the tokenizer without its threads)
            self._env = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            ctx = multiprocessing.get_context("fork")
            self.pool = ctx.Pool(self.workers, initializer=_worker_start, initargs=self.setup)
        return self

    def __call__(self, fn, items: list):
        if self.pool is None:
            yield from fn(self.state, items)
            return
        chunk = max(1, min(64, len(items) // (4 * self.workers)))
        chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]
        for results in self.pool.imap(functools.partial(_in_worker, fn), chunks):
            yield from results

    def __exit__(self, exc_type, *exc) -> None:
        if self.pool is not None:
            if exc_type is None:  # a normal finish: let the workers exit (terminate can hang on the queue's lock)
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()
            if self._env is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = self._env


def _state(at: Atlas, tokenizer, cfg: ExplainConfig, options: OfflineOptions, output: bool, logits) -> dict:
    return {
        "at": at,
        "tokenizer": tokenizer,
        "cfg": cfg,
        "explainer": OfflineExplainer(at, tokenizer, cfg, options),
        "output": _Output(at, tokenizer, logits) if output else None,
    }


_WORKER: dict = {}  # a worker process's own state, set once when it starts


def _worker_start(path: str, tokenizer, *setup) -> None:
    _WORKER.update(_state(Atlas.open(path), tokenizer, *setup))


def _in_worker(fn, items: list) -> list:
    return fn(_WORKER, items)


def _explain_features(w: dict, features: list[int]) -> list[tuple]:
    return [
        (n, *explain_and_score(w["at"], w["explainer"], w["tokenizer"], w["cfg"], n, w["output"])) for n in features
    ]


def _score_controls(_w: dict, jobs: list[tuple]) -> list[tuple]:
    """(feature, another feature's explanation, this feature's held-out texts, labels) -> (feature, detection)."""
    from .scoring import LexicalScorer, lexical_detection

    scorer = LexicalScorer()
    return [(n, lexical_detection(explanation, texts, labels, scorer)) for n, explanation, texts, labels in jobs]
