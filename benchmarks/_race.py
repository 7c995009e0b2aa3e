"""The rules of the SAE race, shared by every contender: one FVU definition, the sanity rule, a turn-taking clock.

* **FVU** (:func:`evaluate`): sum ||x - x_hat||^2 over sum ||x - mean(x)||^2, the mean taken over the evaluated
  rows themselves; L0 = mean active latents per row; dead share = latents that never fire on those rows.
* **Sanity rule** (:func:`check_sane`): a contender whose held-out FVU is >= 1 (no better than predicting the mean)
  or whose dead share is >= 50 % is a broken harness, not a result: the benchmark stops with
  :class:`InsaneContender` instead of printing a ratio.
* **Loss recovered** (:func:`spliced_recovery`): each contender's reconstruction spliced into the model at the
  store's site on held-out text of the same corpus (after the text the store holds, the product's own rule), all
  against one clean, zero- and mean-ablated run: ``loss_recovered_vs_mean`` = (L_mean - L_spliced) /
  (L_mean - L_clean), the figure FVU alone can hide (thoughtscope's ``sae eval`` reports the same).
* **Turn-taking** (:class:`Baton`): contenders run in threads of one process and hand a baton over before every
  batch, so exactly one computes at a time and load from other processes on a shared machine falls on all of them
  alike. Each contender's clock runs only while it holds the baton; evaluations of its weights during training
  (:meth:`Baton.feed` ``evaluate_at``) stop its clock, so they cost it nothing.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from thoughtscope.errors import ThoughtscopeError

# fn(x) -> (recon [N, d], fired [n_latents] bool, n_active): any contender's current weights on raw rows
EncodeDecode = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, int]]


class InsaneContender(ThoughtscopeError, RuntimeError):
    """A contender ended no better than predicting the mean, or with most latents dead: a harness bug."""


@torch.no_grad()
def evaluate(fn: EncodeDecode, x: torch.Tensor, chunk: int = 4096) -> dict:
    """FVU (mean of ``x`` itself), mean L0 and dead share of one contender on rows ``x`` (the same for all)."""
    sse, active, fired = 0.0, 0, None
    for i in range(0, x.shape[0], chunk):
        xb = x[i : i + chunk]
        recon, f, n_act = fn(xb)
        sse += float((xb.double() - recon.double()).pow(2).sum())
        active += int(n_act)
        fired = f.clone() if fired is None else fired | f
    var = float((x.double() - x.double().mean(0)).pow(2).sum())
    fvu = sse / var if var > 0 else math.inf
    if not math.isfinite(fvu):
        fvu = math.inf
    return {"fvu": fvu, "l0": active / x.shape[0], "dead_frac": float((~fired).float().mean()), "rows": int(x.shape[0])}


def spliced_recovery(fns: dict[str, EncodeDecode], store, *, lm, n_tokens: int, progress: bool = True) -> dict:
    """``loss_recovered_vs_mean`` (and the rest of the spliced figures) of every contender on ``n_tokens`` tokens of
    the store's corpus after the text the store holds; ``lm`` is the store's model."""
    from thoughtscope.corpus import Corpus
    from thoughtscope.sae.metrics import spliced_losses
    from thoughtscope.sae.run import LOSS_CTX_LEN, heldout_contexts, loss_batches, store_text

    text = store_text(store)
    corpus = Corpus(text["corpus"]["spec"])
    skip, said = heldout_contexts(text, corpus)
    batches = loss_batches(lm, corpus, skip, max(1, math.ceil(n_tokens / LOSS_CTX_LEN)))

    def splice(fn: EncodeDecode):
        def replace(a: torch.Tensor) -> torch.Tensor:
            return fn(a.reshape(-1, a.shape[-1]).float().cpu())[0].reshape(a.shape).to(a)

        return replace

    r = spliced_losses(lm, store.site, batches, {n: splice(f) for n, f in fns.items()}, progress=progress)
    common = {k: v for k, v in r.items() if k != "replaced"}
    return {n: {**v, **common, "text": said} for n, v in r["replaced"].items()}


def check_sane(name: str, metrics: dict, *, max_fvu: float = 1.0, max_dead: float = 0.5) -> None:
    """Stop the benchmark when a contender is no better than the mean or mostly dead (see module doc)."""
    bad = []
    if not metrics["fvu"] < max_fvu:
        bad.append(f"held-out FVU {metrics['fvu']:.4g} >= {max_fvu} (no better than predicting the mean)")
    if not metrics["dead_frac"] < max_dead:
        bad.append(f"dead share {metrics['dead_frac']:.1%} >= {max_dead:.0%}")
    if bad:
        raise InsaneContender(
            f"contender {name!r}: " + " and ".join(bad) + "; this is a harness bug, not a result, "
            "so no ratio is printed"
        )


class Baton:
    """Exactly one contender computes at a time, in turn; each one's compute time is summed per step."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.cv = threading.Condition()
        self.turn = 0
        self.done: set[str] = set()
        self.busy = {n: 0.0 for n in self.names}
        self.segments: dict[str, list[float]] = {n: [] for n in self.names}  # seconds per baton hold (~ per step)
        self._t = 0.0

    def _advance(self) -> None:
        for _ in self.names:
            self.turn = (self.turn + 1) % len(self.names)
            if self.names[self.turn] not in self.done:
                return

    def acquire(self, name: str) -> None:
        with self.cv:
            self.cv.wait_for(lambda: self.names[self.turn] == name)
            self._t = time.perf_counter()

    def stop_clock(self, name: str) -> None:
        dt = time.perf_counter() - self._t
        self.busy[name] += dt
        self.segments[name].append(dt)

    def release(self, name: str, finished: bool = False) -> None:
        with self.cv:
            if finished:
                self.done.add(name)
            if len(self.done) < len(self.names):
                self._advance()
            self.cv.notify_all()

    def feed(self, name: str, batches: Iterable[torch.Tensor], evaluate_at: Callable[[int], None] | None = None):
        """Data iterator for one contender: hands the baton over before every batch after the first.

        ``evaluate_at(i)`` runs (clock stopped) before batch i is handed out, i.e. after i training steps.
        """
        for i, b in enumerate(batches):
            if i:
                self.stop_clock(name)
                if evaluate_at is not None:
                    evaluate_at(i)
                self.release(name)
                self.acquire(name)
            yield b


def run_turns(jobs: dict[str, Callable[[Baton], object]]) -> tuple[dict, Baton]:
    """Run ``name -> fn(baton)`` in threads, turn by turn; returns each fn's result and the baton (times)."""
    baton = Baton(list(jobs))
    results, errors = {}, {}

    def worker(name, fn):
        baton.acquire(name)
        try:
            results[name] = fn(baton)
        except BaseException as e:  # noqa: BLE001 - reported below; the others must still finish
            errors[name] = e
        finally:
            baton.stop_clock(name)  # the last segment holds the contender's end-of-fit work
            baton.release(name, finished=True)

    threads = [threading.Thread(target=worker, args=(n, f), daemon=True) for n, f in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n, e in errors.items():
        raise RuntimeError(f"{n} failed: {type(e).__name__}: {e}") from e
    return results, baton


@dataclass
class Curve:
    """Held-out FVU after a number of steps, against the contender's own compute seconds up to then."""

    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    fvu: list[float] = field(default_factory=list)

    def add(self, step: int, seconds: float, fvu: float) -> None:
        self.steps.append(step)
        self.seconds.append(seconds)
        self.fvu.append(fvu)

    def as_dict(self) -> dict:
        return {"steps": self.steps, "seconds": self.seconds, "fvu": self.fvu}

    def fvu_at_seconds(self, t: float) -> float | None:
        """FVU reached after ``t`` compute seconds (linear between evaluations; None before the first one)."""
        return _interp(self.seconds, self.fvu, t)

    def fvu_at_step(self, step: int) -> float | None:
        return _interp([float(s) for s in self.steps], self.fvu, float(step))

    def seconds_to_reach(self, target: float) -> float | None:
        """Compute seconds until the FVU first falls to ``target`` (linear between evaluations); None if never."""
        for i, f in enumerate(self.fvu):
            if f <= target:
                if i == 0:
                    return self.seconds[0]
                f0, t0, t1 = self.fvu[i - 1], self.seconds[i - 1], self.seconds[i]
                return t0 + (t1 - t0) * (f0 - target) / (f0 - f) if f0 != f else t1
        return None


def _interp(xs: list[float], ys: list[float], x: float) -> float | None:
    if not xs or x < xs[0]:
        return None
    for i in range(1, len(xs)):
        if x <= xs[i]:
            w = (x - xs[i - 1]) / (xs[i] - xs[i - 1]) if xs[i] != xs[i - 1] else 1.0
            return ys[i - 1] + w * (ys[i] - ys[i - 1])
    return ys[-1]


def eval_steps(n_steps: int, n_points: int) -> set[int]:
    """About ``n_points`` evenly spaced step counts in 1..n_steps-1 at which the curve is sampled."""
    if n_steps <= 1 or n_points <= 0:
        return set()
    return {max(1, round(n_steps * j / (n_points + 1))) for j in range(1, n_points + 1)} - {n_steps}
