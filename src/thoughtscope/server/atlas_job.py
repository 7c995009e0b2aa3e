"""The first-start atlas, built while the workbench already serves: its progress and the steps that build it.

`thoughtscope serve` without --atlas needs an atlas of the SAE for its feature pages and explanation labels. The
model and the SAE are all the analyzer, the equalizer and the NLA view need, so the server answers as soon as they
are loaded and `run_first_start` builds the atlas in a background thread:

1. the corpus is read through the model and the SAE (`atlas.build_atlas`), a slice of forward batches at a time:
   each slice resumes from the build's checkpoint and writes it again, so the page shows the tokens read so far
   with an ETA, and a server killed mid-build resumes from the last slice; the last slice writes `atlas.sqlite`,
   which the build renames into place only once complete (a killed build never leaves a half atlas that loads);
   then the atlas is attached to the workbench (feature pages and labels appear without a restart);
2. offline explanations are written, a chunk of features at a time (each chunk saved when done, so a restart
   writes only the features still missing), and labels appear as the chunks land.

`AtlasBuild` is what the pages and `/api/status` show: the step, its percentage and an ETA from the rate of the
step so far, or the error that stopped the build.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("thoughtscope.server")

#: progress updates per step: the read is cut into about this many slices, the explanations into chunks of
#: EXPLAIN_CHUNK features (at least this many)
SLICES = 8
EXPLAIN_CHUNK = 256
STEPS = ("reading text through the model and the SAE", "writing offline explanations")


@dataclass
class AtlasBuild:
    """Where the first-start atlas build stands. Written by the build thread, read by the pages (plain attribute
    writes: a reader sees one consistent enough snapshot for a status line)."""

    out: Path
    """The atlas folder being built."""
    n_tokens: int = 0
    """Tokens the build reads (tokens)."""
    step: int = 0
    """1-based index into STEPS of the step running now; 0 before the first."""
    stage: str = "waiting to start"
    """What the build does now, in words."""
    done: int = 0
    """Units of the current step done so far (`unit`)."""
    total: int = 0
    """Units of the current step in all (`unit`); 0 where unknown."""
    unit: str = ""
    """What the current step counts ("tokens", "features")."""
    error: str | None = None
    """Why the build stopped, or None."""
    attached: bool = False
    """The atlas is attached to the workbench: feature pages and labels work."""
    finished: bool = False
    """Every step is done (or the build failed)."""
    started: float = field(default_factory=time.time)
    """When the build started (Unix seconds)."""
    _step_t0: float = 0.0
    _step_d0: int = 0
    _t_update: float = 0.0

    def begin(self, step: int, stage: str, total: int, unit: str, done: int = 0) -> None:
        self.step, self.stage, self.total, self.unit = step, stage, int(total), unit
        self.done = self._step_d0 = int(done)
        self._step_t0 = self._t_update = time.perf_counter()

    def update(self, done: int, stage: str | None = None) -> None:
        self.done = min(int(done), self.total) if self.total else int(done)
        self._t_update = time.perf_counter()
        if stage is not None:
            self.stage = stage

    @property
    def percent(self) -> float | None:
        """The current step's share done, 0..100, or None where its size is unknown."""
        return 100.0 * self.done / self.total if self.total else None

    def eta_s(self) -> float | None:
        """Seconds the current step still needs at the rate it has had so far (None before any progress)."""
        done = self.done - self._step_d0
        spent = self._t_update - self._step_t0
        if self.finished or not self.total or done <= 0 or spent <= 0:
            return None
        left = (self.total - self.done) * spent / done - (time.perf_counter() - self._t_update)
        return max(0.0, left)

    @property
    def running(self) -> bool:
        return not self.finished

    def to_dict(self) -> dict:
        eta = self.eta_s()
        pct = self.percent
        return {
            "out": str(self.out),
            "step": self.step,
            "n_steps": len(STEPS),
            "stage": self.stage,
            "done": self.done,
            "total": self.total,
            "unit": self.unit,
            "percent": None if pct is None else round(pct, 1),
            "eta_s": None if eta is None else round(eta, 1),
            "attached": self.attached,
            "finished": self.finished,
            "error": self.error,
            "elapsed_s": round(time.time() - self.started, 1),
        }


def eta_words(seconds: float | None) -> str:
    """The ETA in words ("about 1 min 20 s left"), or "" when unknown, for the status line."""
    if seconds is None or not math.isfinite(seconds):
        return ""
    s = int(round(seconds))
    if s < 5:
        return "a few seconds left"
    if s < 60:
        return f"about {s} s left"
    m, s = divmod(s, 60)
    return f"about {m} min {s:02d} s left" if m < 60 else f"about {m // 60} h {m % 60:02d} min left"


Progress = Callable[[AtlasBuild], None]


def read_in_slices(lm, sae, corpus, out: Path, cfg, job: AtlasBuild, *, sae_path, on_progress, progress) -> Path:
    """Step 1: `build_atlas` a slice of forward batches at a time (each slice resumes from the checkpoint the
    previous one wrote) until it writes `atlas.sqlite`; returns its path."""
    from ..atlas import build_atlas
    from ..atlas.build import CKPT_NAME
    from ..corpus import Corpus
    from ..progress import ProgressBar

    corpus = Corpus(corpus) if isinstance(corpus, str) else corpus
    n_contexts = math.ceil(cfg.n_tokens / cfg.ctx_len)
    n_batches = math.ceil(n_contexts / cfg.contexts_per_batch)
    per_slice = max(1, math.ceil(n_batches / SLICES))
    total = n_contexts * cfg.ctx_len
    job.begin(1, STEPS[0], total, "tokens")
    bar = ProgressBar("first-start atlas", total, unit="tok", enabled=progress)
    try:
        stop = 0
        while True:
            stop += per_slice
            last = stop >= n_batches
            if last:
                job.update(job.done, "reading the last tokens and writing the atlas database")
                _report(job, on_progress)
            path = build_atlas(
                lm, sae, corpus, out, cfg, sae_path=sae_path, progress=False, stop_after_batches=None if last else stop
            )
            if Path(path).name != CKPT_NAME:  # the database: the read is over
                job.update(total)
                bar.update(total)
                return Path(path)
            job.update(min(stop * cfg.batch_tokens, total))
            bar.update(job.done)
            _report(job, on_progress)
    finally:
        bar.close()


def explain_in_chunks(at_path: Path, tokenizer, job: AtlasBuild, *, on_progress, progress) -> None:
    """Step 2: offline explanations of every alive feature that has none, EXPLAIN_CHUNK features at a time (each
    chunk is saved when it is done, so labels appear as they land and a restart only writes what is missing). The
    features that fire most often come first: they are the ones a text in the analyzer most likely shows."""
    import numpy as np

    from ..atlas import Atlas, explain_offline
    from ..progress import ProgressBar

    with Atlas.open(at_path) as at:
        n_active = at.stats()["n_active"]
        done = at.explained(None)
        todo = [int(f) for f in np.argsort(-n_active, kind="stable") if n_active[f] > 0 and int(f) not in done]
        job.begin(2, STEPS[1], len(todo), "features")
        _report(job, on_progress)
        with ProgressBar("explain (offline)", len(todo), unit="features", enabled=progress and bool(todo)) as bar:
            for i in range(0, len(todo), EXPLAIN_CHUNK):
                # workers=1: in this process; a server's threads make forking worker processes unsafe (a pool of
                # them was seen to hang in its terminate() here)
                chunk = todo[i : i + EXPLAIN_CHUNK]
                explain_offline(at, tokenizer=tokenizer, features=chunk, progress=False, workers=1)
                job.update(min(i + EXPLAIN_CHUNK, len(todo)))
                bar.update(job.done)
                _report(job, on_progress)


def _report(job: AtlasBuild, on_progress: Progress | None) -> None:
    if on_progress is not None:
        on_progress(job)


def run_first_start(
    model_for_build,
    tokenizer,
    sae,
    corpus,
    out: Path,
    cfg,
    job: AtlasBuild,
    attach,
    *,
    sae_path,
    on_progress=None,
    progress=True,
) -> None:
    """Every step in order, here (the caller's thread); `model_for_build()` gives the model the read goes through
    (asked only when the atlas has to be read, and let go after it), `attach(path)` hands the finished atlas to the
    workbench before the explanations are written. Raises what a step raised, with `job.error` set."""
    try:
        path = out / "atlas.sqlite"
        if not path.is_file():
            path = read_in_slices(
                model_for_build(),
                sae,
                corpus,
                out,
                cfg,
                job,
                sae_path=sae_path,
                on_progress=on_progress,
                progress=progress,
            )
        attach(path)
        job.attached = True
        explain_in_chunks(path, tokenizer, job, on_progress=on_progress, progress=progress)
        job.stage = "done"
    except BaseException as e:
        job.error = f"{type(e).__name__}: {e}"
        raise
    finally:
        job.finished = True
        _report_quietly(job, on_progress)


def _report_quietly(job: AtlasBuild, on_progress: Progress | None) -> None:
    try:
        _report(job, on_progress)
    except Exception:  # noqa: BLE001 - the build is over; a failing observer changes nothing now
        log.exception("the atlas progress callback failed after the build ended")


def private_copy(lm):
    """The model and tokenizer again, for a build beside a serving workbench: a forward pass of the build sets
    hooks on its model's modules (`models.capture` stops the pass at the SAE's site), which a request's forward
    pass on the same modules would run into (and a steering request's hooks would edit the build's activations);
    and a fast tokenizer used from two threads at once can fail ("Already borrowed")."""
    import copy

    from ..models import LoadedModel

    return LoadedModel(copy.deepcopy(lm.model), copy.deepcopy(lm.tokenizer), lm.name, lm.source)


def start_in_background(run: Callable[[], None], job: AtlasBuild) -> threading.Thread:
    """`run()` in a daemon thread; a failure is kept on `job.error` (shown on the pages) and logged, never raised."""

    def target() -> None:
        try:
            run()
        except Exception:  # noqa: BLE001 - shown on the pages and in the terminal
            log.error("building the first-start atlas %s failed: %s", job.out, job.error)

    t = threading.Thread(target=target, name="thoughtscope-atlas", daemon=True)
    t.start()
    return t
