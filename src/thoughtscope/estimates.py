"""What a long run will cost on this machine, said before it starts: peak memory, disk written and wall time.

Every estimate comes from a few seconds of the real job, run on the real inputs in a temporary folder (a harvest of
three forward batches, a few SAE optimiser steps on real activations, three atlas batches), extrapolated to the
whole run:

* **time**: the measured seconds per forward batch / optimiser step / checkpoint, times how many the run does,
  plus the measured fixed cost. Never a constant.
* **memory** (peak resident set): a sum of named terms. The arithmetic terms are what the run holds (model weights,
  one forward pass's activations, store shards in flight, SAE parameters with their gradients and Adam moments,
  atlas reservoirs, ...); one measured term is the rest of the process: its peak RSS after the probe (VmHWM)
  minus the arithmetic of what the probe itself held (interpreter, libraries, allocator slack). So the estimate is
  the probe's measured peak plus what the full run holds beyond the probe, and the terms add up to it.
* **disk**: arithmetic (store: tokens × width × bytes per value × sites, plus the metadata columns and the
  manifest; SAE: its parameters, checkpoint as measured from the probe's; atlas: its reservoirs and windows).

`Estimate.check` refuses a run whose memory exceeds what is available (``MemAvailable`` of /proc/meminfo, psutil
when installed, or ``THOUGHTSCOPE_MEMORY_AVAILABLE`` — bytes, or a number with K/M/G/T — which overrides both) unless
forced. The CLI prints the estimate before every such run; ``--plan`` prints it and exits without writing.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import AtlasError, HarvestError, NLAError, SAEError, ThoughtscopeError

__all__ = [
    "ENV_AVAILABLE",
    "Estimate",
    "atlas_estimate",
    "available_memory",
    "harvest_estimate",
    "human_bytes",
    "nla_estimate",
    "peak_rss",
    "sae_estimate",
]

ENV_AVAILABLE = "THOUGHTSCOPE_MEMORY_AVAILABLE"
PROBE_BATCHES = 3  # forward batches a harvest or atlas probe runs
PROBE_STEPS = 4  # SAE optimiser steps a training probe runs (the first also initialises)
MEASURED = "rest of the process (measured peak RSS after the probe, less the probe's own terms)"
_ERRORS: dict[str, type[ThoughtscopeError]] = {
    "harvest": HarvestError,
    "sae train": SAEError,
    "atlas build": AtlasError,
    "nla train": NLAError,
}


# ----------------------------------------------------------------------------- the machine
def human_bytes(n: float) -> str:
    """1536 -> '1.5 KB' (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if m is None:
        raise ThoughtscopeError(
            f"{ENV_AVAILABLE}={text!r}: expected a number of bytes, optionally with K, M, G or T (e.g. 512M)"
        )
    scale = 1024 ** " KMGT".index((m.group(2) or " ").upper())
    return int(float(m.group(1)) * scale)


def available_memory() -> int:
    """Bytes a new run may use: THOUGHTSCOPE_MEMORY_AVAILABLE when set, else psutil's or /proc/meminfo's
    MemAvailable, else the physical memory."""
    if os.environ.get(ENV_AVAILABLE):
        return _parse_bytes(os.environ[ENV_AVAILABLE])
    with contextlib.suppress(ImportError):
        import psutil

        return int(psutil.virtual_memory().available)
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def peak_rss() -> int:
    """This process's peak resident set so far, in bytes (VmHWM; ru_maxrss where /proc is absent)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _where() -> str:
    return "MemAvailable" if not os.environ.get(ENV_AVAILABLE) else ENV_AVAILABLE


# ----------------------------------------------------------------------------- the estimate
@dataclass
class Estimate:
    """A run's plan: peak memory and disk as named terms (bytes; each total is the sum of its terms), wall time."""

    job: str
    """The run: harvest, sae train, atlas build or nla train."""
    memory: dict[str, int]
    """Peak resident memory, term by term (bytes); the peak is their sum."""
    disk: dict[str, int]
    """Bytes the run writes, term by term (bytes)."""
    seconds: float
    """Estimated wall time of the run after the probe (seconds)."""
    timing: str
    """How the time was measured (the probe's figures)."""
    available: int
    """Memory available to the run when planned (bytes)."""
    notes: list[str] = field(default_factory=list)
    """What the estimate leaves out or assumes."""
    scratch: dict[str, int] = field(default_factory=dict)
    """Disk used while the run goes and removed by its end (a resumable checkpoint), term by term (bytes)."""

    @property
    def memory_bytes(self) -> int:
        return int(sum(self.memory.values()))

    @property
    def disk_bytes(self) -> int:
        return int(sum(self.disk.values()))

    @property
    def fits(self) -> bool:
        return self.memory_bytes <= self.available

    def lines(self) -> list[str]:
        """The plan as printed before a run."""
        out = [
            f"plan for {self.job}: peak memory ~{human_bytes(self.memory_bytes)} "
            f"(available {human_bytes(self.available)}), disk ~{human_bytes(self.disk_bytes)}, "
            f"time ~{_duration(self.seconds)}",
            f"  time: {self.timing}",
            "  memory: " + "; ".join(f"{k} {human_bytes(v)}" for k, v in self.memory.items() if v),
            "  disk: " + ("; ".join(f"{k} {human_bytes(v)}" for k, v in self.disk.items() if v) or "nothing"),
        ]
        if any(self.scratch.values()):
            out.append(
                "  disk while running (removed at the end): "
                + "; ".join(f"{k} {human_bytes(v)}" for k, v in self.scratch.items() if v)
            )
        return out + [f"  note: {n}" for n in self.notes]

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "memory_bytes": self.memory_bytes,
            "disk_bytes": self.disk_bytes,
            "seconds": round(self.seconds, 2),
            "available_bytes": self.available,
            "fits": self.fits,
            "memory": dict(self.memory),
            "disk": dict(self.disk),
            "scratch": dict(self.scratch),
            "timing": self.timing,
            "notes": list(self.notes),
        }

    def check(self, force: bool = False) -> None:
        """Refuse (the job's error) a run whose peak memory exceeds what is available, unless `force`."""
        if force or self.fits:
            return
        err = _ERRORS.get(self.job, ThoughtscopeError)
        raise err(
            f"{self.job} would need ~{human_bytes(self.memory_bytes)} of memory at its peak but "
            f"{human_bytes(self.available)} is available ({_where()}); its largest terms: "
            + ", ".join(f"{k} {human_bytes(v)}" for k, v in sorted(self.memory.items(), key=lambda t: -t[1])[:3])
            + ". Make the run smaller (fewer contexts per batch, a smaller dictionary or batch) or pass --force"
        )


def _duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _with_measured(probe_terms: dict[str, int], full_terms: dict[str, int], hwm: int) -> dict[str, int]:
    """The full run's terms plus the measured rest of the process: peak RSS after the probe less the probe's terms."""
    rest = max(0, hwm - int(sum(probe_terms.values())))
    return {MEASURED: rest, **{k: int(v) for k, v in full_terms.items()}}


# ----------------------------------------------------------------------------- model arithmetic
def model_bytes(lm) -> int:
    """Bytes of the model's parameters and buffers."""
    m = lm.model
    return sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))


def forward_bytes(lm, contexts: int, ctx_len: int, *, logits: bool = False) -> int:
    """Transient bytes of one forward pass over `contexts` × `ctx_len` tokens (no gradients): the residual stream,
    one block's attention scores and MLP hidden state, and, with `logits`, the full float32 logits (vocabulary ×
    tokens × 4: 1 MB a token for a 262k vocabulary)."""
    cfg = getattr(lm.model, "config", None)
    tc = getattr(cfg, "text_config", None) or cfg
    n = contexts * ctx_len
    es = next(lm.model.parameters()).element_size()
    d = lm.d_model
    ff = int(getattr(tc, "intermediate_size", None) or getattr(tc, "n_inner", None) or 4 * d)
    heads = int(getattr(tc, "num_attention_heads", None) or getattr(tc, "n_head", None) or 1)
    out = n * (4 * d + 3 * ff) * es + 2 * contexts * heads * ctx_len * ctx_len * es
    if logits:
        out += n * int(getattr(tc, "vocab_size", 0) or len(lm.tokenizer)) * 4
    return int(out)


# ----------------------------------------------------------------------------- harvest
def _timestamps() -> tuple[list[float], Callable[[int], None]]:
    stamps = [time.perf_counter()]
    return stamps, lambda _tokens: stamps.append(time.perf_counter())


def harvest_estimate(lm, corpus, sites, config, *, available: int | None = None) -> Estimate:
    """Plan `harvest(lm, corpus, sites, out, config)`: a real harvest of up to three forward batches into a
    temporary folder (one shard per batch, timed shard by shard), extrapolated to `config.n_tokens`."""
    from .dtypes import torch_dtype
    from .harvest import harvest
    from .models import parse_sites

    cfg = config
    cfg.validate()
    site_list = parse_sites(sites)
    n_batches = math.ceil(cfg.n_tokens / cfg.batch_tokens)
    k = min(PROBE_BATCHES, n_batches)
    probe = replace(cfg, n_tokens=k * cfg.batch_tokens, shard_tokens=cfg.batch_tokens)
    stamps, on_shard = _timestamps()
    with tempfile.TemporaryDirectory(prefix="thoughtscope-plan-") as tmp:
        stores = harvest(lm, corpus, site_list, Path(tmp) / "probe", probe, progress=False, on_shard=on_shard)
        manifest_path = Path(next(iter(stores.values())).path) / "manifest.json"
        manifest_size = manifest_path.stat().st_size
        manifest = json.loads(manifest_path.read_text())
    hwm = peak_rss()
    done = len(stamps) - 1  # shards the probe wrote (the corpus may hold fewer batches than asked)
    if done == 0:
        raise HarvestError("the corpus gave no full forward batch to measure; nothing to plan")
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    per_batch = statistics.median(gaps) if gaps else stamps[1] - stamps[0]
    setup = max(0.0, stamps[1] - stamps[0] - per_batch)
    width = torch_dtype(cfg.dtype).itemsize
    row = lm.d_model * width
    meta_row = 8 + 4 + 4 + 4  # doc_id int64, position, token_id, doc_position int32
    shard = cfg.resolved_shard_tokens()
    n_shards = math.ceil(cfg.n_tokens / shard)

    def held(shard_rows: int) -> dict[str, int]:
        return {
            "model weights": model_bytes(lm),
            "forward pass": forward_bytes(lm, cfg.contexts_per_batch, cfg.ctx_len),
            "captured activations (float32 and store dtype)": len(site_list) * cfg.batch_tokens * lm.d_model * 8,
            # pending rows, and their concatenation when a shard is committed
            "store shards in flight": 2 * len(site_list) * shard_rows * (row + meta_row),
            # finishing a store reads it back for its statistics, shard by shard, memory-mapped
            "statistics pass (two shards mapped)": 2 * shard_rows * (row + meta_row),
        }

    header = 128 * 5  # one .npy header per file: activations and four metadata columns
    # the manifest: its fixed part and one entry per shard, as the probe's finished manifest holds them
    fixed = len(json.dumps({**manifest, "shards": []}, indent=2)) + 1
    per_entry = (manifest_size - fixed) / done
    per_site = cfg.n_tokens * (row + meta_row) + n_shards * header + fixed + int(n_shards * per_entry)
    return Estimate(
        "harvest",
        _with_measured(held(cfg.batch_tokens), held(min(shard, cfg.n_tokens)), hwm),
        {f"stores ({len(site_list)} site(s), {cfg.dtype})": len(site_list) * per_site},
        setup + n_batches * per_batch,
        f"{done} forward batch(es) of {cfg.batch_tokens} tokens measured: {per_batch:.2f} s each "
        f"(+{setup:.1f} s setup) × {n_batches} batches",
        available_memory() if available is None else available,
        notes=[f"{cfg.n_tokens} tokens asked for; a corpus that runs out sooner writes less"],
    )


# ----------------------------------------------------------------------------- SAE training
class _TimedBatches:
    """A source for the trainer (f(start) -> batches) that notes when each batch is asked for."""

    def __init__(self, batches: Sequence):
        self.rows, self.stamps = list(batches), []

    def __call__(self, start: int = 0) -> Iterator:
        for b in self.rows[start:]:
            self.stamps.append(time.perf_counter())
            yield b


def sae_params(cfg) -> int:
    """Parameters of one SAE: encoder and decoder matrices and their biases (plus a threshold per latent for an
    architecture that has one)."""
    m, d = cfg.n_features, cfg.d_model
    return 2 * m * d + m + d + (m if cfg.arch == "jumprelu" else 0)


def _sae_held(cfgs, batch_size: int) -> dict[str, int]:
    params = sum(sae_params(c) for c in cfgs)
    m_total = sum(c.n_features for c in cfgs)
    d = cfgs[0].d_model
    return {
        "SAE parameters": params * 4,
        "gradients": params * 4,
        "Adam moments": 2 * params * 4,
        "copy folded for saving": params * 4,
        "training batch (input, normalised, reconstruction)": 3 * batch_size * d * 4,
        # dense pre-activations and their gradient, per SAE of the sweep; dead-latent counters
        "encoder activations": 2 * batch_size * m_total * 4 + m_total * 8,
    }


def _store_batches(store, tc, cfg0, k: int) -> tuple[list, float, float, int]:
    """k + 1 real training batches of the store (as training reads them): (batches, seconds to the first, median
    seconds per later batch, rows read into the shuffle buffer before the first)."""
    from .sae.stream import make_stream

    it = (b for b, _ in make_stream(store, tc, cfg0, 0))  # the trainer's own reader
    t0 = time.perf_counter()
    b0 = next(it, None)
    if b0 is None:
        raise SAEError(
            f"store {store.path} holds fewer usable rows than one optimiser step reads ({tc.batch_size:,} rows, "
            f"--batch-size): harvest more tokens or lower --batch-size"
        )
    out = [b0]
    first = time.perf_counter() - t0
    gaps = []
    for _ in range(k):
        t = time.perf_counter()
        b = next(it, None)
        if b is None:
            break
        gaps.append(time.perf_counter() - t)
        out.append(b)
    filled = min(int(store.n_tokens), max(262_144, tc.batch_size))
    return out, first, statistics.median(gaps) if gaps else 0.0, filled


def _fly_batches(lm, corpus, site, tc, k: int) -> tuple[list, float, int]:
    """Real activations for k + 1 training batches computed on the fly: (batches, seconds per forward pass, rows
    a forward pass gives). Two forward passes are timed; their rows are repeated to fill the batches."""
    import torch

    from .models import capture

    rows, secs = [], []
    for i, ctx in enumerate(corpus.batches(lm.tokenizer, 128, 16)):
        if i == 2:
            break
        t = time.perf_counter()
        h = capture(lm, [site], ctx.input_ids.to(lm.device), early_exit=True)[site]
        secs.append(time.perf_counter() - t)
        rows.append(h[:, 1:].reshape(-1, lm.d_model).float().cpu())
    if not rows:
        raise SAEError("the corpus gave no context to measure; nothing to plan")
    x = torch.cat(rows)
    reps = math.ceil((k + 1) * tc.batch_size / x.shape[0])
    x = x.repeat(reps, 1)
    return [x[i * tc.batch_size : (i + 1) * tc.batch_size] for i in range(k + 1)], min(secs), rows[0].shape[0]


def _probe_training(cfgs, batches, tc) -> tuple[float, float, float, int, int]:
    """A few real optimiser steps of the whole sweep, then one checkpoint and one save, in a temporary folder:
    (init seconds, seconds per step, seconds per checkpoint, checkpoint bytes, saved folder bytes per SAE)."""
    from .sae.formats import save_sae
    from .sae.train import Trainer

    src = _TimedBatches(batches)
    with tempfile.TemporaryDirectory(prefix="thoughtscope-plan-") as tmp:
        # dead_check_every=1: latents go dead within the probe, so its steps include AuxK, as most of a run's do
        ptc = replace(
            tc, steps=len(batches), checkpoint_dir=tmp, checkpoint_every=0, progress=False, init_batches=1,
            dead_check_every=1,
        )  # fmt: skip
        trainer = Trainer(cfgs, ptc)
        t0 = time.perf_counter()
        trainer.fit(src)
        # the first batch is asked for before the init; each later request ends one optimiser step
        later = [*src.stamps[1:], time.perf_counter()]
        steps = [b - a for a, b in zip(later, later[1:])] or [later[0] - t0]
        per_step = statistics.median(steps)
        init = max(0.0, later[0] - t0 - per_step)
        try:
            t = time.perf_counter()
            trainer.save_checkpoint()
            per_ckpt = time.perf_counter() - t
            ckpt = (Path(tmp) / "checkpoint.pt").stat().st_size
            t = time.perf_counter()
            saes = trainer.finished_saes()
            save_sae(saes[0], Path(tmp) / "sae", metrics={"final": {}, "log": trainer.metrics_log})
            per_ckpt += (time.perf_counter() - t) / max(1, len(cfgs))
            folder = sum(p.stat().st_size for p in (Path(tmp) / "sae").rglob("*") if p.is_file())
        except (OSError, ThoughtscopeError):
            # the probe could not write its temporary files (a full disk, a file-size limit): sizes from arithmetic
            # and no write time; the run itself then reports a write it cannot make, naming its own output
            params = [sum(p.numel() * p.element_size() for p in sl.sae.parameters()) for sl in trainer.slots]
            per_ckpt, ckpt, folder = 0.0, 3 * sum(params), params[0]
    return init, per_step, per_ckpt, ckpt, folder


def _heldout_probe(lm, cfg, site, loss_tokens: int) -> tuple[float, str]:
    """The spliced loss `train_grid` measures after training (`loss_tokens` held-out tokens): one batch of it run
    for real (an untrained SAE of the same size spliced in; the cost does not depend on the weights), scaled."""
    import torch

    from .sae.base import build_sae
    from .sae.metrics import spliced_lm_loss
    from .sae.run import LOSS_CONTEXTS, LOSS_CTX_LEN

    sae = build_sae(cfg, seed=0).to(lm.device).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(lm.tokenizer), (LOSS_CONTEXTS, LOSS_CTX_LEN), generator=g)
    t = time.perf_counter()
    spliced_lm_loss(lm, sae, site, [ids], max_batches=1)
    per_batch = time.perf_counter() - t
    n = math.ceil(loss_tokens / (LOSS_CONTEXTS * LOSS_CTX_LEN))
    return n * per_batch, f"held-out spliced loss: {per_batch:.2f} s per {LOSS_CONTEXTS * LOSS_CTX_LEN} tokens × {n}"


def sae_estimate(
    *,
    store=None,
    model: str | None = None,
    site: str = "resid.15",
    corpus: str = "default",
    grid: dict[str, Sequence],
    max_norm_ratio: float | None = 10.0,
    train_cfg,
    loss_tokens: int = 0,
    lm=None,
    available: int | None = None,
) -> Estimate:
    """Plan `sae.run.train_grid` with the same arguments: a few real optimiser steps of the whole sweep on real
    activations (read from the store as training reads them, or computed by the model), a checkpoint and a
    save in a temporary folder, extrapolated to the run's steps; with `loss_tokens`, one batch of the held-out
    spliced loss measured after training (the store's recorded model is loaded for it). `lm` reuses an already
    loaded model."""
    from .sae.run import Source, config_grid
    from .sae.train import total_steps

    tc = train_cfg
    if store is not None:
        from .store import ActivationStore

        st = ActivationStore.open(store)
        source = Source(st, st.d_model, st.model, st.site)
    else:
        from .corpus import Corpus
        from .models import load_model

        lm = lm if lm is not None else load_model(model)
        site_obj = lm.check_site(site)
        source = Source(None, lm.d_model, lm.name, str(site_obj))
    cfgs, _ = config_grid(source, max_norm_ratio=max_norm_ratio, **grid)
    steps = total_steps(tc, source.data if store is not None else None, exclude_bos=cfgs[0].exclude_bos)
    if store is not None:
        batches, first, per_read, filled = _store_batches(source.data, tc, cfgs[0], PROBE_STEPS)
        rows = steps * tc.batch_size
        data_s = first * rows / max(1, filled) + steps * per_read
        data_how = f"store read: {first:.2f} s for the first {filled} rows, {per_read * 1e3:.0f} ms per batch"
        row = st.d_model * (2 if st.dtype_name != "float32" else 4)
        buffer = {
            "store shuffle buffer": min(262_144, st.n_tokens) * (row + 20),
            "mapped store shard": st.shard_tokens * (row + 20),
        }
    else:
        batches, per_fwd, fwd_rows = _fly_batches(lm, Corpus(corpus), site_obj, tc, PROBE_STEPS)
        data_s = steps * tc.batch_size / fwd_rows * per_fwd
        data_how = f"forward pass: {per_fwd:.2f} s per {fwd_rows} rows"
        buffer = {
            "model weights": model_bytes(lm),
            "forward pass": forward_bytes(lm, 16, 128),
            "on-the-fly shuffle buffer": 65_536 * lm.d_model * 4,
        }
    init, per_step, per_ckpt, ckpt, folder = _probe_training(cfgs, batches, tc)
    after_s, after_how = 0.0, ""
    if loss_tokens > 0:
        if lm is None:
            from .models import load_recorded

            extra = st.manifest.get("extra") or {}
            recorded = extra.get("model_source") if isinstance(extra.get("model_source"), dict) else st.model
            lm = load_recorded(recorded or None)
            buffer["model weights (loaded after training)"] = model_bytes(lm)
        after_s, after_how = _heldout_probe(lm, cfgs[0], lm.check_site(source.site), loss_tokens)
        after_how = "; " + after_how
    hwm = peak_rss()
    n_ckpt = (steps // tc.checkpoint_every + 1) if tc.checkpoint_every else 0
    held = _sae_held(cfgs, tc.batch_size)
    probe_extra = {k: v for k, v in buffer.items() if k != "on-the-fly shuffle buffer"}
    return Estimate(
        "sae train",
        _with_measured({**held, **probe_extra}, {**held, **buffer}, hwm),
        {f"SAE folder(s) ({len(cfgs)})": folder * len(cfgs)},
        init + steps * per_step + data_s + n_ckpt * per_ckpt + len(cfgs) * after_s,
        f"{PROBE_STEPS} optimiser steps of {len(cfgs)} SAE(s) measured: {per_step:.3f} s each × {steps} steps; "
        f"{data_how}; {n_ckpt} checkpoint(s) at {per_ckpt:.2f} s{after_how}",
        available_memory() if available is None else available,
        scratch={"resumable checkpoint": ckpt if n_ckpt else 0},
    )


# ----------------------------------------------------------------------------- atlas build
def _atlas_state_bytes(m: int, cfg) -> int:
    """The running statistics of `atlas.stats.RunningFeatureStats`: counts, sums, maxima, histogram, top-k and
    reservoir buffers with their float16 windows."""
    K, R, W = cfg.top_k, cfg.reservoir, cfg.window
    n_hist = len(cfg.hist_edges()) - 1
    per_feature = 8 + 8 + 4 + 8 * n_hist + K * (4 + 8 + 2 * W) + R * (4 + 4 + 8 + 2 * W)
    return m * per_feature


def _finalize_seconds(lm, sae, cfg) -> tuple[float, str]:
    """The end of a build, measured on one chunk each and scaled to every feature: logit effects (decoder rows
    through the unembedding) and nearest neighbours (decoder cosines)."""
    import torch

    from .features import logit_effects

    W = sae.W_dec.detach()
    m, c = W.shape[0], min(512, W.shape[0])
    t = time.perf_counter()
    logit_effects(lm, W[:c], cfg.n_logits)
    logits_s = (time.perf_counter() - t) * m / c
    t = time.perf_counter()
    with torch.no_grad():
        Wn = torch.nn.functional.normalize(W.float(), dim=1)
        torch.topk(Wn[:c] @ Wn.T, min(m, cfg.n_neighbours + 1), dim=1)
    neigh_s = (time.perf_counter() - t) * m / c
    return logits_s + neigh_s, f"logit effects {logits_s:.1f} s, neighbours {neigh_s:.1f} s (one chunk measured)"


def atlas_estimate(
    sae,
    config,
    *,
    model: str | None = None,
    corpus: str = "default",
    available: int | None = None,
) -> Estimate:
    """Plan `atlas.build_atlas_from(sae, out, config, model=..., corpus=...)`: the real build stopped after three
    batches in a temporary folder (forward, encode and statistics timed by the build itself), one chunk of the
    final logit effects and neighbours, extrapolated to the build's batches and features."""
    from .atlas import build_atlas
    from .atlas.build import sae_model_source
    from .corpus import Corpus
    from .models import load_recorded
    from .sae import load_sae
    from .sae.formats import default_sae_path

    cfg = config
    cfg.validate()
    folder = default_sae_path() if str(sae) == "default" else Path(sae)
    sae_obj = load_sae(folder)
    lm = load_recorded(sae_model_source(sae_obj), model)  # the model the build will load, by the build's own rule
    n_batches = math.ceil(cfg.n_tokens / cfg.batch_tokens)
    k = min(PROBE_BATCHES, n_batches)
    timings: dict = {}
    with tempfile.TemporaryDirectory(prefix="thoughtscope-plan-") as tmp:
        ckpt = build_atlas(
            lm, sae_obj, Corpus(corpus), Path(tmp), cfg, progress=False, stop_after_batches=k, timings=timings
        )
        ckpt_bytes = Path(ckpt).stat().st_size if Path(ckpt).is_file() else 0
    per_batch = (timings["forward_s"] + timings["encode_s"] + timings["update_s"]) / k
    final_s, final_how = _finalize_seconds(lm, sae_obj, cfg)
    hwm = peak_rss()
    m, T, B = sae_obj.cfg.n_features, cfg.ctx_len, cfg.contexts_per_batch
    n_ctx = math.ceil(cfg.n_tokens / T)
    active = sae_obj.cfg.k if sae_obj.cfg.k > 0 else 64
    vocab = int(getattr(getattr(lm.model, "config", None), "vocab_size", 0) or len(lm.tokenizer))

    def held(contexts: int, finalize: bool) -> dict[str, int]:
        return {
            "model weights": model_bytes(lm),
            "forward pass": forward_bytes(lm, B, T),
            "SAE parameters": sae_params(sae_obj.cfg) * 4,
            "encoder pre-activations": B * T * m * 4,
            "feature reservoirs and windows": _atlas_state_bytes(m, cfg),
            "context token ids (2 copies at a checkpoint)": 2 * contexts * T * 4,
            "random contexts' activations": min(contexts, cfg.n_random_contexts) * T * active * 28,
            "logit effects (512 features × vocabulary × 4, twice)": 2 * 512 * vocab * 4 if finalize else 0,
            "neighbours (1024 features × features × 4)": 1024 * m * 4 if finalize else 0,
        }

    n_ckpt = n_batches // cfg.checkpoint_every + 1
    db = (
        _atlas_state_bytes(m, cfg)
        + n_ctx * T * 4
        + min(n_ctx, cfg.n_random_contexts) * T * active * 16
        + m * 2 * cfg.n_logits * 12
    )
    return Estimate(
        "atlas build",
        _with_measured(held(k * B, False), held(n_ctx, True), hwm),
        {"atlas.sqlite (arithmetic)": db},
        timings.get("setup_s", 0.0) + n_batches * per_batch + n_ckpt * timings.get("checkpoint_s", 0.0) + final_s,
        f"{k} batch(es) of {cfg.batch_tokens} tokens measured: {per_batch:.2f} s each × {n_batches} batches; "
        f"{n_ckpt} checkpoint(s) at {timings.get('checkpoint_s', 0.0):.2f} s; {final_how}",
        available_memory() if available is None else available,
        notes=["writing the SQLite file itself is not timed"],
        scratch={"build checkpoint": ckpt_bytes + n_ctx * T * 4},
    )


# ----------------------------------------------------------------------------- NLA training
def _link_copy(src: Path, dst: Path) -> None:
    """`src`'s files under `dst` as hard links (copies across file systems). Safe to train on: every NLA writer
    renames a new file into place, so the originals are never written through a link. Lock files stay behind."""
    import shutil

    for p in src.rglob("*"):
        if not p.is_file() or p.name.endswith(".lock"):
            continue
        q = dst / p.relative_to(src)
        q.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(p, q)
        except OSError:
            shutil.copy2(p, q)


def _params(nla) -> tuple[int, int]:
    """(bytes of the NLA's parameters, count of its trainable ones), over its verbalizer, reconstructor and any
    other model it holds (modules may share the frozen base; each tensor counts once)."""
    import torch

    mods = [v for v in vars(nla).values() if isinstance(v, torch.nn.Module)]
    ps = list({id(p): p for m in mods for p in m.parameters()}.values())
    return sum(p.numel() * p.element_size() for p in ps), sum(p.numel() for p in ps if p.requires_grad)


def nla_estimate(
    nla_dir,
    data,
    stage: str,
    *,
    device: str | None = None,
    probe_s: float = 10.0,
    available: int | None = None,
    **overrides,
) -> Estimate:
    """Plan `nla.recipe.run_stage(nla_dir, data, stage, **overrides)`: the real stage, on a linked copy of the NLA
    folder in a temporary folder, for about `probe_s` seconds of steps (at least one; no validation), timed step by
    step and extrapolated to the stage's remaining steps."""
    import dataclasses

    from .nla.recipe import stage_settings
    from .nla.train import NLATrainConfig, train_stage

    cfg = NLATrainConfig(**stage_settings(stage, **overrides))
    nla_dir = Path(nla_dir)
    stamps: list[tuple[float, int]] = []
    parent = nla_dir.parent if nla_dir.parent.is_dir() else None
    with tempfile.TemporaryDirectory(prefix=".thoughtscope-plan-", dir=parent) as tmp:
        probe_dir = Path(tmp) / "nla"
        if nla_dir.is_dir():
            _link_copy(nla_dir, probe_dir)
        before = {p: p.stat().st_ino for p in probe_dir.rglob("*") if p.is_file()} if probe_dir.is_dir() else {}
        probe = dataclasses.replace(cfg, eval_every=0, checkpoint_every=10**9, time_budget_s=probe_s)
        t0 = time.perf_counter()
        r = train_stage(
            probe_dir,
            data,
            probe,
            progress=False,
            device=device,
            log=lambda rec: stamps.append((time.perf_counter(), int(rec.get("step", 0)))),
        )
        t_end = time.perf_counter()
        written = sum(
            p.stat().st_size for p in probe_dir.rglob("*") if p.is_file() and before.get(p) != p.stat().st_ino
        )
    hwm = peak_rss()
    if not stamps:
        raise NLAError(f"stage {stage} has no step left to run in {nla_dir}; nothing to plan")
    times = [t0] + [t for t, _ in stamps]
    gaps = [b - a for a, b in zip(times[1:], times[2:])]
    per_step = statistics.median(gaps) if gaps else times[1] - t0
    setup = max(0.0, times[1] - t0 - per_step)
    left = max(0, cfg.steps - r["step"] + len(stamps))
    save_s = t_end - times[-1]
    n_ckpt = math.ceil(left / cfg.checkpoint_every) if cfg.checkpoint_every else 1
    nla_bytes, trainable = _params(r["nla"])
    held = {
        "NLA models (verbalizer and reconstructor)": nla_bytes,
        "gradients and AdamW moments of the trained half": 3 * trainable * 4,
    }
    return Estimate(
        "nla train",
        _with_measured(held, held, hwm),
        {"NLA state and weights (one copy, replaced at each checkpoint)": written},
        setup + left * per_step + n_ckpt * save_s,
        f"{len(stamps)} step(s) of batch {cfg.batch_size} measured: {per_step:.2f} s each × {left} steps; "
        f"{n_ckpt} checkpoint(s) at {save_s:.1f} s",
        available_memory() if available is None else available,
        notes=[f"validation every {cfg.eval_every} steps is not timed"] if cfg.eval_every else [],
    )
