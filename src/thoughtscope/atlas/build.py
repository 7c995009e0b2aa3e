"""Build a feature atlas in one streaming pass: model (early exit) -> SAE encode -> running statistics -> SQLite.

Memory is bounded by the number of features, never by the number of tokens (apart from the context
token ids, 4 bytes a token): the statistics are in `stats.py`, the SAE's sparse code in `encode.py`, and the
database is written by `writer.py`. Position 0 (the attention sink) is excluded when the SAE says so
(`cfg.exclude_bos`, the default).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .._io import atomic_torch_save, exclusive_lock
from ..models import LoadedModel, Site, capture
from ..plans import AtlasConfig
from ..progress import ProgressBar
from .db import AtlasError
from .encode import SparseEncoder, check_sae_matches, sae_fingerprint
from .stats import RunningFeatureStats
from .writer import write_db

__all__ = ["AtlasConfig", "build_atlas", "check_sae_matches", "sae_fingerprint"]

CKPT_NAME = "build.ckpt"
LOCK_NAME = ".build.lock"  # held while a build writes its folder, so a second build of the same folder stops at once


@contextlib.contextmanager
def _single_thread():
    """The bookkeeping is many small memory-bound ops, which one thread runs faster than a contended OpenMP pool on a
    shared CPU (benchmarks/atlas.py); the forward pass and the encoder GEMM keep all threads."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def _renamed_fields(ident: dict) -> dict:
    """A checkpoint's identity with the config written before contexts_per_batch was called batch_size."""
    cfg = ident.get("config")
    if isinstance(cfg, dict) and "batch_size" in cfg and "contexts_per_batch" not in cfg:
        cfg = {("contexts_per_batch" if k == "batch_size" else k): v for k, v in cfg.items()}
        return {**ident, "config": cfg}
    return ident


def build_atlas(
    lm: LoadedModel,
    sae,
    corpus,
    out: str | os.PathLike,
    config: AtlasConfig | None = None,
    *,
    site: Site | str | None = None,
    sae_path: str | None = None,
    progress: bool = True,
    stop_after_batches: int | None = None,
    timings: dict | None = None,
) -> Path:
    """Stream `config.n_tokens` tokens of `corpus` through the model and the SAE and write `out/atlas.sqlite`.

    Resumable: a checkpoint (`out/build.ckpt`) of the running statistics is written atomically every
    `checkpoint_every` batches; rerunning with the same arguments continues from it and produces the same
    atlas as an uninterrupted run. `stop_after_batches` interrupts on purpose (tests, time-boxed runs) and
    returns the checkpoint path instead of the database. `timings`, if given, receives the seconds spent
    streaming (`stream_s`; `stream_cpu_s` in process CPU time; split into `setup_s`, `forward_s`, `encode_s`,
    `update_s`, `checkpoint_s`) and
    writing the database (`finalize_s`: logit effects, neighbours, SQLite).
    """
    t_start, c_start = time.perf_counter(), time.process_time()
    cfg = config or AtlasConfig()
    cfg.validate()
    site = check_sae_matches(lm, sae, site)
    cfg.check_context(lm.name, lm.max_context)
    _check_corpus(corpus, lm, cfg)  # an unreadable corpus fails here, before anything is written
    out = Path(out)
    lock = exclusive_lock(out / LOCK_NAME, f"the atlas {out}", AtlasError)  # makes the folder
    try:
        run = _StreamingPass(lm, sae.to(lm.device).eval(), corpus, cfg, site, out / CKPT_NAME)
        run.phase["setup_s"] = time.perf_counter() - t_start
        stopped = run.stream(progress, stop_after_batches)
        if timings is not None:
            timings["stream_s"] = time.perf_counter() - t_start
            timings["stream_cpu_s"] = time.process_time() - c_start
            timings.update(run.phase)
        if stopped:
            lock.release()
            return run.ckpt
        t_fin = time.perf_counter()
        path = write_db(
            lm, run.sae, run.stats, cfg, out, run.ident, site, sae_path, corpus, run.random_stride, progress
        )
        run.ckpt.unlink(missing_ok=True)
    except BaseException:
        lock.release(remove=lock.holds_only_itself())  # a folder this build made and left empty goes again
        raise
    lock.release()
    if timings is not None:
        timings["finalize_s"] = time.perf_counter() - t_fin
    return path


def _check_corpus(corpus, lm: LoadedModel, cfg: AtlasConfig) -> None:
    """Read the plan's first forward batch: a corpus that cannot be read (not UTF-8, bad JSON, too small to fill a
    context) or holds no text after `skip_tokens` raises now, before the atlas folder is touched."""
    for _ in cfg.batches(corpus, lm.tokenizer):
        return
    raise AtlasError(
        f"corpus {getattr(corpus, 'spec', corpus)!r} has no text left to read after skip_tokens={cfg.skip_tokens}"
    )


class _StreamingPass:
    """One build's pass over the corpus: model -> SAE sparse code -> running statistics, checkpointed."""

    def __init__(self, lm: LoadedModel, sae, corpus, cfg: AtlasConfig, site: Site, ckpt: Path):
        self.lm, self.sae, self.corpus, self.cfg, self.site, self.ckpt = lm, sae, corpus, cfg, site, ckpt
        self.exclude_bos = sae.cfg.exclude_bos if cfg.exclude_bos is None else cfg.exclude_bos
        self.n_contexts = math.ceil(cfg.n_tokens / cfg.ctx_len)
        self.random_stride = max(1, self.n_contexts // max(1, cfg.n_random_contexts))
        self.ident = {
            "model": lm.name,
            "site": str(site),
            "sae_fingerprint": sae_fingerprint(sae),
            "corpus": getattr(corpus, "spec", str(corpus)),
            "config": asdict(cfg),
            "exclude_bos": self.exclude_bos,
        }
        self.stats = RunningFeatureStats(sae.cfg.n_features, cfg)
        self.encoder = SparseEncoder(sae)
        self.phase = dict.fromkeys(("setup_s", "forward_s", "encode_s", "update_s", "checkpoint_s"), 0.0)
        if ckpt.is_file():
            self._resume()

    def _resume(self) -> None:
        """Continue from the checkpoint, which must belong to this very build."""
        ckpt = self.ckpt
        try:
            saved = torch.load(ckpt, weights_only=False)
        except Exception as e:  # a torn or foreign file: say so rather than silently restarting
            raise AtlasError(
                f"{ckpt} cannot be read ({type(e).__name__}: {e}); delete it to start the build over"
            ) from e
        old = _renamed_fields(saved.get("ident") or {})
        if old != self.ident:
            diff = [k for k in self.ident if old.get(k) != self.ident[k]]
            raise AtlasError(
                f"{ckpt} belongs to a different build (differs in: {', '.join(diff)}); use another "
                f"output folder or delete the checkpoint"
            )
        self.stats.load_state_dict(saved["stats"])

    def checkpoint(self) -> None:
        t0 = time.perf_counter()
        stats = self.stats
        atomic_torch_save({"ident": self.ident, "stats": stats.state_dict()}, self.ckpt)
        stats.contexts = [torch.cat(stats.contexts)] if stats.contexts else []
        self.phase["checkpoint_s"] += time.perf_counter() - t0

    def stream(self, progress: bool, stop_after_batches: int | None) -> bool:
        """Read batches until the token budget is spent (or the corpus ends); True when stopped on purpose."""
        cfg, stats, T = self.cfg, self.stats, self.cfg.ctx_len
        bar = ProgressBar(
            f"atlas {self.site} × {self.sae.cfg.n_features} features",
            self.n_contexts * T,
            start=stats.batches * cfg.batch_tokens,
            unit="tok",
            enabled=progress,
        )
        ctx_done = sum(c.shape[0] for c in stats.contexts)
        stopped = False
        try:
            for b, batch in cfg.batches(self.corpus, self.lm.tokenizer, start=stats.batches):  # b: 0 = first batch
                if ctx_done >= self.n_contexts:
                    break
                if stop_after_batches is not None and b >= stop_after_batches:
                    stopped = True
                    break
                ctx_done += self.step(b, batch.input_ids[: self.n_contexts - ctx_done], ctx_done)
                bar.update(ctx_done * T)
                if stats.batches % cfg.checkpoint_every == 0:
                    self.checkpoint()
            if not stopped and ctx_done < self.n_contexts:
                bar.note(f"the corpus ran out after {ctx_done * T} tokens (asked for {cfg.n_tokens})")
        finally:
            bar.close()
        self.checkpoint()
        return stopped

    def step(self, b: int, ids: torch.Tensor, ctx_done: int) -> int:
        """One batch of contexts through the model, the SAE and the statistics; returns how many contexts."""
        lm, site, T = self.lm, self.site, self.cfg.ctx_len
        Bn = ids.shape[0]
        t0 = time.perf_counter()
        acts = capture(lm, [site], ids.to(lm.device), early_exit=True)[site]
        t1 = time.perf_counter()
        x = acts.reshape(Bn * T, -1).to(self.sae.W_dec.dtype)
        rows, feats, vals = self.encoder(x)
        rows, feats, vals = rows.cpu(), feats.cpu(), vals.float().cpu()
        if self.exclude_bos:
            keep = rows % T != 0
            rows, feats, vals = rows[keep], feats[keep], vals[keep]
        t2 = time.perf_counter()
        with _single_thread():
            self.stats.update(
                None, ids, ctx_done, b, rows=rows, feats=feats, vals=vals, random_stride=self.random_stride
            )
        self.phase["forward_s"] += t1 - t0
        self.phase["encode_s"] += t2 - t1
        self.phase["update_s"] += time.perf_counter() - t2
        self.stats.tokens += Bn * (T - 1 if self.exclude_bos else T)
        return Bn


def build_atlas_from(
    sae: str | os.PathLike,
    out: str | os.PathLike,
    config: AtlasConfig | None = None,
    *,
    model: str | None = None,
    corpus: str = "default",
    progress: bool = True,
    timings: dict | None = None,
) -> Path:
    """`build_atlas` from names, as `thoughtscope atlas build` takes them: an SAE folder ('default': the shipped
    SAE), the model (default: the one the SAE was trained on, found again from what its config recorded, see
    `models.load_recorded`; 'default' for an SAE that recorded none) and a corpus spec."""
    from ..corpus import Corpus
    from ..models import load_recorded
    from ..sae import load_sae
    from ..sae.formats import default_sae_path
    from ..sae.pretrained import is_pretrained_spec

    folder = default_sae_path() if str(sae) == "default" else Path(sae)
    # saelens:<release>/<sae_id> is loaded and recorded by its name, not as a path
    sae_path = str(sae) if is_pretrained_spec(sae) else str(folder.resolve())
    sae_obj = load_sae(sae_path)
    lm = load_recorded(sae_model_source(sae_obj), model)
    return build_atlas(lm, sae_obj, Corpus(corpus), out, config, sae_path=sae_path, progress=progress, timings=timings)


def sae_model_source(sae) -> dict | str:
    """What an SAE recorded about its model, as `models.load_recorded` takes it: the full source record when the
    SAE has one, else its model's name ('default' when it names none)."""
    return sae.cfg.model_source or sae.cfg.model or "default"
