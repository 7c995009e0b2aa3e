"""Model × corpus × sites → activation stores on disk.

The loop is deliberately thin: tokenised context batches go through one early-exit forward pass
that captures every requested site, and the rows go straight into each site's StoreWriter.
Shards hold a whole number of forward batches, so a resumed harvest re-runs exactly the batches
of an uninterrupted one (same batch composition → bit-identical activations).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .corpus import Corpus
from .models import LoadedModel, Site, capture, parse_sites
from .store import MANIFEST_NAME, ActivationStore, StoreError, StoreWriter

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class HarvestConfig:
    n_tokens: int = 200_000
    ctx_len: int = 128
    batch_size: int = 16
    dtype: str = "float32"
    shard_tokens: int | None = None  # default: ~32k tokens, rounded to whole batches
    add_bos: bool = True
    skip_tokens: int = 0  # start this far into the corpus (e.g. a held-out store after a training store)

    def validate(self) -> None:
        if self.n_tokens <= 0:
            raise ValueError(f"--tokens must be positive, got {self.n_tokens}")
        if self.ctx_len < 2:
            raise ValueError(f"--ctx-len must be at least 2, got {self.ctx_len}")
        if self.batch_size <= 0:
            raise ValueError(f"--batch-size must be positive, got {self.batch_size}")
        if self.skip_tokens < 0 or self.skip_tokens % self.batch_tokens:
            raise ValueError(f"--skip-tokens must be a non-negative multiple of batch_size × ctx_len = "
                             f"{self.batch_tokens}, got {self.skip_tokens}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r} is not supported: expected one of {', '.join(DTYPES)}")

    @property
    def batch_tokens(self) -> int:
        return self.ctx_len * self.batch_size

    def resolved_shard_tokens(self) -> int:
        if self.shard_tokens is None:
            return max(1, 32768 // self.batch_tokens) * self.batch_tokens
        if self.shard_tokens % self.batch_tokens:
            raise ValueError(
                f"shard size {self.shard_tokens} must be a multiple of batch_size × ctx_len = {self.batch_tokens} "
                f"so that a resumed harvest replays the same forward batches"
            )
        return self.shard_tokens


def store_paths(out: Path, sites: Sequence[Site]) -> dict[Site, Path]:
    """One site → the store is `out` itself; several sites → one store per site under `out`."""
    out = Path(out)
    if len(sites) == 1:
        return {sites[0]: out}
    return {s: out / str(s) for s in sites}


def harvest(lm: LoadedModel, corpus: Corpus, sites, out, config: HarvestConfig | None = None, *,
            progress: bool = True, overwrite: bool = False,
            on_shard: Callable[[int], None] | None = None) -> dict[Site, ActivationStore]:
    """Harvest activations at `sites` for the first `n_tokens` tokens of `corpus` into stores under `out`.

    Re-running the same command resumes an interrupted harvest, or returns a finished one unchanged.
    """
    cfg = config or HarvestConfig()
    cfg.validate()
    site_list = parse_sites(sites)
    for s in site_list:
        lm.check_site(s)
    if cfg.ctx_len > lm.max_context:
        raise ValueError(f"--ctx-len {cfg.ctx_len} exceeds {lm.name}'s context window of {lm.max_context} tokens")
    shard_tokens = cfg.resolved_shard_tokens()
    paths = store_paths(Path(out), site_list)
    description = corpus.describe()
    # ctx_len and batch_size decide the forward batches, so a resume must use the same ones.
    extra = {"ctx_len": cfg.ctx_len, "batch_size": cfg.batch_size, "add_bos": cfg.add_bos,
             "skip_tokens": cfg.skip_tokens, "model_source": lm.source}
    if not overwrite:
        finished = _finished_stores(paths)
        if finished is not None:
            for st in finished.values():
                if st.extra.get("n_tokens_requested") != cfg.n_tokens:
                    raise StoreError(
                        f"{st.path} already holds a finished harvest of {st.extra.get('n_tokens_requested')} tokens; "
                        f"pass overwrite (--overwrite) to replace it with {cfg.n_tokens} tokens, or choose another --out"
                    )
            return finished
    writers = {
        s: StoreWriter(p, model=lm.name, site=str(s), d_model=lm.d_model, dtype=cfg.dtype,
                       shard_tokens=shard_tokens, corpus=description, extra=extra, overwrite=overwrite)
        for s, p in paths.items()
    }
    done = min(w.tokens_done for w in writers.values())
    if any(w.tokens_done != done for w in writers.values()):
        raise RuntimeError(
            "the stores under " + str(out) + " were left at different points ("
            + ", ".join(f"{s}: {w.tokens_done}" for s, w in writers.items())
            + " tokens); remove them or harvest each site separately"
        )
    skip_batches = (cfg.skip_tokens + done) // cfg.batch_tokens
    store_dtype = DTYPES[cfg.dtype]

    bar = _Progress(cfg.n_tokens, done, enabled=progress, label=f"harvest {', '.join(map(str, site_list))}")
    tokens = done
    device = lm.device
    try:
        for b, batch in enumerate(corpus.batches(lm.tokenizer, cfg.ctx_len, cfg.batch_size, add_bos=cfg.add_bos)):
            if tokens >= cfg.n_tokens:
                break
            if b < skip_batches:
                continue
            ids = batch.input_ids
            acts = capture(lm, site_list, ids.to(device), early_exit=True)
            n = ids.numel()
            take = min(n, cfg.n_tokens - tokens)
            meta = {
                "doc_id": batch.doc_ids.reshape(-1)[:take],
                "position": torch.arange(ids.shape[1]).repeat(ids.shape[0])[:take].to(torch.int32),
                "token_id": ids.reshape(-1)[:take].to(torch.int32),
                "doc_position": batch.doc_positions.reshape(-1)[:take].to(torch.int32),
            }
            for s, w in writers.items():
                before = w.tokens_done
                w.add(acts[s].reshape(n, lm.d_model)[:take].to("cpu", store_dtype), meta)
                if on_shard is not None and w.tokens_done != before and s == site_list[0]:
                    on_shard(w.tokens_done)
            tokens += take
            bar.update(tokens)
    finally:
        bar.close()
    if tokens < cfg.n_tokens:
        bar.note(f"the corpus ran out after {tokens} tokens (asked for {cfg.n_tokens})")
    return {s: w.finish(extra={"n_tokens_requested": cfg.n_tokens}) for s, w in writers.items()}


def _finished_stores(paths: dict[Site, Path]) -> dict[Site, ActivationStore] | None:
    """The stores of an earlier, finished run of the same harvest, or None when any is missing or unfinished."""
    out = {}
    for s, p in paths.items():
        if not (Path(p) / MANIFEST_NAME).is_file():
            return None
        st = ActivationStore.open(p)
        if not st.complete:
            return None
        out[s] = st
    return out


class _Progress:
    """A rich progress bar with tokens/s and ETA that stays silent when disabled (tests, benchmarks)."""

    def __init__(self, total: int, start: int, *, enabled: bool, label: str):
        self.enabled = enabled
        self.start_time = time.perf_counter()
        self.start = start
        self.last_line = self.start_time
        if enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.console = Console(stderr=True)
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]} tok/s"), TimeElapsedColumn(), TextColumn("ETA"),
                                TimeRemainingColumn(), console=self.console, transient=False)
            self.task = self.bar.add_task(label, total=total, completed=start, rate="-")
            self.bar.start()

    def update(self, completed: int) -> None:
        if self.enabled:
            now = time.perf_counter()
            dt = now - self.start_time
            rate = (completed - self.start) / dt if dt > 0 else 0.0
            self.bar.update(self.task, completed=completed, rate=f"{rate:,.0f}")
            # A log file gets no live bar, so print a plain line every half minute instead.
            if not self.console.is_terminal and now - self.last_line >= 30:
                self.last_line = now
                left = (self.bar.tasks[0].total - completed) / rate if rate > 0 else float("nan")
                self.console.print(f"{completed:,} tokens, {rate:,.0f} tok/s, ETA {left / 60:.1f} min")

    def note(self, message: str) -> None:
        if self.enabled:
            self.console.print(f"[yellow]{message}[/yellow]")

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()


def stream_activations(lm: LoadedModel, corpus: Corpus, site, *, n_tokens: int, batch_size: int = 4096,
                       ctx_len: int = 128, forward_batch: int = 16, exclude_bos: bool = True,
                       buffer_tokens: int = 65_536, seed: int = 0):
    """A deterministic source of shuffled [batch_size, d] activation batches computed on the fly.

    Returns `f(start_batch)`, the callable form SAE training accepts: it regenerates the same stream
    and skips the first `start_batch` batches, which is how a resumed run stays identical.
    """
    site = lm.check_site(Site.parse(site))

    def batches(start_batch: int = 0):
        gen = torch.Generator().manual_seed(seed)
        buf: list[torch.Tensor] = []
        held = 0
        produced = 0
        emitted = 0

        def drain(final: bool):
            nonlocal buf, held, emitted
            x = torch.cat(buf) if buf else torch.empty(0, lm.d_model)
            x = x[torch.randperm(x.shape[0], generator=gen)]
            keep = x.shape[0] if final else x.shape[0] // 2
            n_full = keep // batch_size
            out = [x[i * batch_size:(i + 1) * batch_size] for i in range(n_full)]
            rest = x[n_full * batch_size:]
            buf, held = [rest], rest.shape[0]
            return out

        for ctx in corpus.batches(lm.tokenizer, ctx_len, forward_batch):
            if produced >= n_tokens:
                break
            h = capture(lm, [site], ctx.input_ids.to(lm.device), early_exit=True)[site]
            if exclude_bos:
                h = h[:, 1:]
            h = h.reshape(-1, lm.d_model)[: n_tokens - produced].float().cpu()
            produced += h.shape[0]
            buf.append(h)
            held += h.shape[0]
            if held >= buffer_tokens:
                for b in drain(final=False):
                    emitted += 1
                    if emitted > start_batch:
                        yield b
        for b in drain(final=True):
            emitted += 1
            if emitted > start_batch:
                yield b

    return batches
