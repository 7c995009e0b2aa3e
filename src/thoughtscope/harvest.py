"""Model × corpus × sites → activation stores on disk.

The loop is deliberately thin: tokenised context batches go through one early-exit forward pass
that captures every requested site, and the rows go straight into each site's StoreWriter.
Shards hold a whole number of forward batches, so a resumed harvest re-runs exactly the batches
of an uninterrupted one (same batch composition → bit-identical activations).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from .corpus import Corpus
from .distributed import join_process_group
from .dtypes import torch_dtype
from .errors import HarvestError  # noqa: F401  (re-exported: their old home)
from .models import LoadedModel, Site, capture, parse_sites
from .plans import HarvestConfig
from .progress import ProgressBar
from .store import MANIFEST_NAME, ActivationStore, ShuffleBuffer, StoreError, StoreWriter
from .store.format import read_manifest

#: the most memory the shuffle buffer of activations streamed on the fly may take (bytes); wide rows (many sites
#: from one pass) get fewer buffered rows
STREAM_BUFFER_BYTES = 1 << 30

__all__ = ["HarvestConfig", "HarvestError", "harvest", "store_paths", "stream_activations"]


def store_paths(out: Path, sites: Sequence[Site]) -> dict[Site, Path]:
    """One site → the store is `out` itself; several sites → one store per site under `out`."""
    out = Path(out)
    if len(sites) == 1:
        return {sites[0]: out}
    return {s: out / str(s) for s in sites}


def harvest(
    lm: LoadedModel,
    corpus: Corpus,
    sites,
    out,
    config: HarvestConfig | None = None,
    *,
    progress: bool = True,
    overwrite: bool = False,
    on_shard: Callable[[int], None] | None = None,
) -> dict[Site, ActivationStore]:
    """Harvest activations at `sites` for the first `n_tokens` tokens of `corpus` into stores under `out`.

    Re-running the same command resumes an interrupted harvest, or returns a finished one unchanged.
    Under torchrun (WORLD_SIZE > 1) the forward batches are dealt round-robin to the ranks and gathered on rank 0,
    which alone writes: the store is the one a single process writes, row for row, and resumes the same way.
    """
    cfg = config or HarvestConfig()
    cfg.validate()
    site_list = parse_sites(sites)
    for s in site_list:
        lm.check_site(s)
    cfg.check_context(lm.name, lm.max_context)
    shard_tokens = cfg.resolved_shard_tokens()
    paths = store_paths(Path(out), site_list)
    world, rank = join_process_group(lm.device)
    writers, done, finished, failure = None, 0, None, None
    new_folders: set[Path] = set()  # the folders this call creates: removed again if it fails before any shard
    if rank == 0:  # only rank 0 touches the stores
        try:
            finished = None if overwrite else _finished_stores(paths, cfg.n_tokens)
            if finished is None:
                _check_corpus(corpus, lm, cfg)  # an unreadable corpus fails here, before anything is written
                new_folders = {p for p in (Path(out), *paths.values()) if not p.exists()}
                writers = _open_writers(lm, corpus, paths, cfg, shard_tokens, overwrite, out, new_folders)
                done = min(w.tokens_done for w in writers.values())
        except BaseException as e:  # noqa: BLE001 - re-raised below once the other ranks know
            failure = e
    if world > 1:
        state = torch.tensor([int(failure is not None), int(finished is not None), done], dtype=torch.int64)
        dist.broadcast(state, src=0)
        if int(state[0]):
            if failure is not None:
                raise failure
            raise StoreError(f"rank 0 could not open the stores under {out}; its error says why")
        if int(state[1]):
            dist.barrier()
            return {s: ActivationStore.open(p) for s, p in paths.items()}
        done = int(state[2])
    elif failure is not None:
        raise failure
    if finished is not None:
        return finished

    bar = ProgressBar(
        f"harvest {', '.join(map(str, site_list))}" + (f" on {world} processes" if world > 1 else ""),
        cfg.n_tokens,
        start=done,
        unit="tok",
        enabled=progress and rank == 0,
    )
    planned = tokens = done
    pending: list = []  # this round's forward batches, one per rank, in corpus order
    stores = None
    try:
        try:
            for _, batch in cfg.batches(corpus, lm.tokenizer, start=done // cfg.batch_tokens):
                if planned >= cfg.n_tokens:
                    break
                take = min(batch.input_ids.numel(), cfg.n_tokens - planned)
                pending.append((batch, take))
                planned += take
                if len(pending) == world:
                    tokens = _harvest_round(lm, site_list, pending, writers, cfg, world, rank, tokens, on_shard)
                    pending = []
                    bar.update(tokens)
            if pending:
                tokens = _harvest_round(lm, site_list, pending, writers, cfg, world, rank, tokens, on_shard)
                bar.update(tokens)
        finally:
            bar.close()
        if tokens < cfg.n_tokens:
            bar.note(f"the corpus ran out after {tokens} tokens (asked for {cfg.n_tokens})")
        if rank == 0:
            stores = {s: w.finish(extra={"n_tokens_requested": cfg.n_tokens}) for s, w in writers.items()}
    except BaseException:
        if writers:  # the locks go now (not when the writers are collected): the same call may be retried at once
            _abandon(writers, new_folders, Path(out))
        raise
    if world > 1:
        dist.barrier()
        if stores is None:
            stores = {s: ActivationStore.open(p) for s, p in paths.items()}
    return stores


def _check_corpus(corpus: Corpus, lm: LoadedModel, cfg: HarvestConfig) -> None:
    """Read the plan's first forward batch: a corpus that cannot be read (not UTF-8, bad JSON, too small to fill a
    context) or holds no text after `skip_tokens` raises now, before any store is written."""
    for _ in cfg.batches(corpus, lm.tokenizer):
        return
    raise HarvestError(
        f"corpus {getattr(corpus, 'spec', corpus)!r} has no text left to harvest after skip_tokens={cfg.skip_tokens}"
    )


def _abandon(writers: dict[Site, StoreWriter], new_folders: set[Path], out: Path) -> None:
    """After a failure: a store this call created and never committed a shard to is removed (a corpus error or a
    full disk leaves no empty store behind); any other is closed as it is, resumable by the same call."""
    for w in writers.values():
        with contextlib.suppress(Exception):  # never hide the error that brought us here
            if w.path in new_folders and w.tokens_done == 0:
                w.discard()
            else:
                w.close()
    if out in new_folders:
        with contextlib.suppress(OSError):
            out.rmdir()  # only if empty


def _open_writers(lm, corpus, paths, cfg, shard_tokens, overwrite, out, new_folders) -> dict[Site, StoreWriter]:
    # ctx_len and contexts per forward pass decide the batches, so a resume must use the same ones (the manifest
    # has called the latter "batch_size" since format version 1; the key stays so old stores resume and compare).
    extra = {
        "ctx_len": cfg.ctx_len,
        "batch_size": cfg.contexts_per_batch,
        "add_bos": cfg.add_bos,
        "skip_tokens": cfg.skip_tokens,
    }
    description = corpus.describe()
    writers: dict[Site, StoreWriter] = {}
    try:
        for s, p in paths.items():
            extra["model_source"] = _model_source_for(p, lm, overwrite)
            writers[s] = StoreWriter(
                p,
                model=lm.name,
                site=str(s),
                d_model=lm.d_model,
                dtype=cfg.dtype,
                shard_tokens=shard_tokens,
                corpus=description,
                extra=extra,
                overwrite=overwrite,
            )
    except BaseException:  # e.g. another harvest holds one of the stores: let go of those already opened
        _abandon(writers, new_folders, Path(out))
        raise
    done = min(w.tokens_done for w in writers.values())
    if any(w.tokens_done != done for w in writers.values()):
        for w in writers.values():
            w.close()
        raise HarvestError(
            "the stores under "
            + str(out)
            + " were left at different points ("
            + ", ".join(f"{s}: {w.tokens_done}" for s, w in writers.items())
            + " tokens); remove them or harvest each site separately"
        )
    return writers


def _model_source_for(path: Path, lm: LoadedModel, overwrite: bool) -> dict:
    """What the store records about its model (`lm.source`: how to load it again). A store being resumed keeps its
    own record when it names the same model (the same content hash, or for a record from before hashes were kept,
    the same spec), so a resume is not refused over a record's new fields or a moved cache folder."""
    if overwrite:
        return lm.source
    try:
        old = (read_manifest(Path(path)).get("extra") or {}).get("model_source")
    except StoreError:
        return lm.source  # a new store, or one the writer will report on
    if not isinstance(old, dict) or old == lm.source:
        return lm.source
    same = old["sha256"] == lm.source.get("sha256") if old.get("sha256") else old.get("spec") == lm.source["spec"]
    return old if same else lm.source


def _harvest_round(lm, site_list, pending, writers, cfg, world, rank, tokens, on_shard) -> int:
    """Forward this rank's batch of the round, gather every rank's activations on rank 0, write them in order."""
    store_dtype = torch_dtype(cfg.dtype)
    d = lm.d_model
    mine = pending[rank][0] if rank < len(pending) else None
    acts = capture(lm, site_list, mine.input_ids.to(lm.device), early_exit=True) if mine is not None else None
    if world == 1:
        per_batch = [{s: acts[s].reshape(-1, d).to("cpu", store_dtype) for s in site_list}]
    else:
        # fixed-shape buffers (the corpus's last batch may be short; ranks without a batch send zeros)
        buf = torch.zeros(len(site_list), cfg.contexts_per_batch, cfg.ctx_len, d, dtype=store_dtype, device=lm.device)
        if acts is not None:
            for i, s in enumerate(site_list):
                buf[i, : acts[s].shape[0]] = acts[s].to(store_dtype)
        gathered = [torch.empty_like(buf) for _ in range(world)] if rank == 0 else None
        dist.gather(buf, gathered, dst=0)
        per_batch = None
        if rank == 0:
            per_batch = [
                {s: gathered[j][i, : batch.input_ids.shape[0]].reshape(-1, d).cpu() for i, s in enumerate(site_list)}
                for j, (batch, _) in enumerate(pending)
            ]
    for (batch, take), rows in zip(pending, per_batch or []):
        ids = batch.input_ids
        meta = {
            "doc_id": batch.doc_ids.reshape(-1)[:take],
            "position": torch.arange(ids.shape[1]).repeat(ids.shape[0])[:take].to(torch.int32),
            "token_id": ids.reshape(-1)[:take].to(torch.int32),
            "doc_position": batch.doc_positions.reshape(-1)[:take].to(torch.int32),
        }
        for s, w in writers.items():
            before = w.tokens_done
            w.add(rows[s][:take], meta)
            if on_shard is not None and w.tokens_done != before and s == site_list[0]:
                on_shard(w.tokens_done)
    return tokens + sum(take for _, take in pending)


def _finished_stores(paths: dict[Site, Path], n_tokens: int) -> dict[Site, ActivationStore] | None:
    """The stores of an earlier, finished run of the same harvest, or None when any is missing or unfinished."""
    out = {}
    for s, p in paths.items():
        if not (Path(p) / MANIFEST_NAME).is_file():
            return None
        st = ActivationStore.open(p)
        if not st.complete:
            return None
        out[s] = st
    for st in out.values():
        if st.extra.get("n_tokens_requested") != n_tokens:
            raise StoreError(
                f"{st.path} already holds a finished harvest of {st.extra.get('n_tokens_requested')} tokens; "
                f"pass overwrite=True to replace it with {n_tokens} tokens, or choose another output folder"
            )
    return out


def stream_activations(
    lm: LoadedModel,
    corpus: Corpus,
    site,
    *,
    n_tokens: int,
    batch_size: int = 4096,
    ctx_len: int = 128,
    contexts_per_batch: int = 16,
    exclude_bos: bool = True,
    buffer_tokens: int = 65_536,
    seed: int = 0,
    target_site=None,
    buffer_bytes: int = STREAM_BUFFER_BYTES,
):
    """A deterministic source of shuffled [batch_size, d] activation batches computed on the fly.

    ``batch_size`` counts rows (one optimiser step), ``contexts_per_batch`` contexts per forward pass.
    Rows pass through the same shuffle buffer a store read uses (``buffer_tokens`` rows, fewer when a row is so
    wide that the buffer would pass ``buffer_bytes``); a short last batch is dropped, as SAE training drops it from
    a store.

    Returns `f(start_batch)`, the callable form SAE training accepts: it regenerates the same stream
    and skips the first `start_batch` batches, which is how a resumed run stays identical.

    With ``target_site`` (a transcoder's data, e.g. site mlp_in.5, target_site mlp_out.5) both sites come from the
    same forward pass and each batch is [batch_size, 2, d]: row i's input and its target, shuffled together.
    With a list of sites (and of target sites, one per site) every site comes from the same forward pass: batches
    are [batch_size, S, d] (or [batch_size, S, 2, d]), a token's rows at all sites kept together, so many
    dictionaries train from one pass (sae.multisite).
    """
    many = isinstance(site, (list, tuple))
    sites = [lm.check_site(Site.parse(s)) for s in (site if many else [site])]
    if target_site is None:
        targets = None
    else:
        targets = [lm.check_site(Site.parse(t)) for t in (target_site if many else [target_site])]
        if len(targets) != len(sites):
            raise HarvestError(f"{len(sites)} sites but {len(targets)} target sites: give one target per site")
    wanted = sites if targets is None else [s for pair in zip(sites, targets) for s in pair]
    distinct = list(dict.fromkeys(wanted))
    n_sides = 1 if targets is None else 2
    shape = (-1, lm.d_model) if n_sides == 1 else (-1, 2, lm.d_model)
    if many:
        shape = (-1, len(sites)) + shape[1:]
    width = len(wanted) * lm.d_model  # a token's rows travel as one row [x | y | ...] through the buffer
    buffer_rows = max(batch_size, min(buffer_tokens, buffer_bytes // (4 * width)))

    def batches(start_batch: int = 0):
        buf = ShuffleBuffer(buffer_rows, batch_size, width, torch.float32, torch.Generator().manual_seed(seed))
        produced = 0
        emitted = 0
        for ctx in corpus.batches(lm.tokenizer, ctx_len, contexts_per_batch):
            if produced >= n_tokens:
                break
            got = capture(lm, distinct, ctx.input_ids.to(lm.device), early_exit=True)
            h = torch.cat([got[s] for s in wanted], -1)
            if exclude_bos:
                h = h[:, 1:]
            h = h.reshape(-1, width)[: n_tokens - produced].float().cpu()
            produced += h.shape[0]
            for b, _ in buf.add(h):
                emitted += 1
                if emitted > start_batch:
                    yield b.view(shape)
        for b, _ in buf.drain(drop_last=True):
            emitted += 1
            if emitted > start_batch:
                yield b.view(shape)

    return batches
