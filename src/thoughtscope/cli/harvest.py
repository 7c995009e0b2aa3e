"""`thoughtscope harvest`, `store` and `model`: read a model's activations into stores and describe what is there.

Option defaults are read from HarvestConfig (plans.py, torch-free), so the command and the library cannot drift
apart.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import typer

from ..configdoc import field_help
from ..plans import HarvestConfig
from .common import _fail, _load, console, renamed

PLAN_HELP = (
    "print the plan (peak memory, disk and time on this machine, from a few seconds of the real job) and exit "
    "without writing anything"
)
FORCE_HELP = "run even when the plan's peak memory exceeds the memory available"


def _plan_gate(estimate, *, plan: bool, force: bool, quiet: bool = False, json_out: Path | None = None) -> None:
    """Print a run's plan (not with --quiet, unless --plan); with --plan stop there (writing the plan to --json when
    given); refuse a run whose memory exceeds what is available unless --force. Shared by every command that starts
    a long run."""
    from .._io import atomic_write_json
    from ..errors import ThoughtscopeError

    for line in estimate.lines() if plan or not quiet else []:
        console.print(line, markup=False, highlight=False)
    if plan:
        if json_out is not None:
            atomic_write_json(json_out, {"plan": estimate.to_dict()})
        raise typer.Exit(0)
    try:
        estimate.check(force)
    except ThoughtscopeError as e:
        _fail(str(e))


def harvest_cmd(
    model: str = typer.Option("default", help="'default' (embedded SmolLM2), a hub id, a folder or a .gguf file"),
    site: list[str] = typer.Option(["resid.15"], help="site(s) to read, e.g. resid.15 (repeat or comma-separate)"),
    corpus: str = typer.Option("default", help="'default', a file, a folder, a .jsonl file or hf:<dataset>"),
    text_field: str = typer.Option("text", help="JSONL / dataset field holding the text"),
    tokens: int = typer.Option(HarvestConfig.n_tokens, help=field_help(HarvestConfig, "n_tokens")),
    out: Path = typer.Option(..., help="output folder (one store, or one per site when several)"),
    ctx_len: int = typer.Option(HarvestConfig.ctx_len, help=field_help(HarvestConfig, "ctx_len")),
    contexts_per_batch: int = typer.Option(
        HarvestConfig.contexts_per_batch,
        "--contexts-per-batch",
        help=field_help(HarvestConfig, "contexts_per_batch"),
    ),
    batch_size: int | None = typer.Option(None, "--batch-size", hidden=True),
    dtype: str = typer.Option(HarvestConfig.dtype, help=field_help(HarvestConfig, "dtype")),
    shard_tokens: int | None = typer.Option(HarvestConfig.shard_tokens, help=field_help(HarvestConfig, "shard_tokens")),
    skip_tokens: int = typer.Option(HarvestConfig.skip_tokens, help=field_help(HarvestConfig, "skip_tokens")),
    device: str | None = typer.Option(
        None, help="torch device, e.g. cuda:0; under torchrun 'cuda' = each process's own GPU (default: CPU)"
    ),
    model_dtype: str | None = typer.Option(None, help="dtype to run the model in"),
    overwrite: bool = typer.Option(False, help="replace a finished store at --out"),
    quiet: bool = typer.Option(False, help="no progress bar"),
    plan: bool = typer.Option(False, "--plan", help=PLAN_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Harvest activations at one or more sites into resumable on-disk stores (torchrun: contexts split across
    processes, one store)."""
    from ..corpus import Corpus
    from ..distributed import local_device
    from ..errors import ThoughtscopeError
    from ..estimates import harvest_estimate
    from ..harvest import harvest as run
    from ..models import parse_sites

    try:
        cfg = HarvestConfig(
            n_tokens=tokens,
            ctx_len=ctx_len,
            contexts_per_batch=renamed(
                contexts_per_batch,
                batch_size,
                new="--contexts-per-batch",
                old="--batch-size",
                default=HarvestConfig.contexts_per_batch,
            ),
            dtype=dtype,
            shard_tokens=shard_tokens,
            skip_tokens=skip_tokens,
        )
        sites = parse_sites(",".join(site))
        lm = _load(model, local_device(device), model_dtype)  # under torchrun, "cuda" = this process's GPU
        src = Corpus(corpus, text_field=text_field)
        if plan or int(os.environ.get("WORLD_SIZE", "1")) == 1:  # under torchrun only an explicit --plan probes
            _plan_gate(harvest_estimate(lm, src, sites, cfg), plan=plan, force=force, quiet=quiet)
        t0 = time.perf_counter()
        stores = run(lm, src, sites, out, cfg, progress=not quiet, overwrite=overwrite)
    except (ThoughtscopeError, ValueError) as e:
        _fail(str(e))
    dt = time.perf_counter() - t0
    for s, st in stores.items():
        console.print(f"[green]{s}[/green] → {st.path}: {st.describe()}")
        if st.massive_summary():
            console.print(f"[yellow]{s}: {st.massive_summary()}[/yellow]")
    console.print(f"done in {dt:.1f} s")


def store_info(
    path: Path = typer.Argument(..., help="an activation store folder"),
    verify: bool = typer.Option(False, help="also check every shard's checksum"),
) -> None:
    """Describe (and optionally verify) an activation store."""
    from ..store import ActivationStore, StoreError

    try:
        st = ActivationStore.open(path)
        if verify:
            st.verify(checksums=True)
    except StoreError as e:
        _fail(str(e))
    manifest = {k: v for k, v in st.manifest.items() if k != "shards"}
    if isinstance(manifest.get("stats"), dict):  # per-dimension lists (mean, rms) shown by their length
        manifest["stats"] = {
            k: f"[{len(v)} numbers]" if isinstance(v, list) and len(v) > 16 else v for k, v in manifest["stats"].items()
        }
    console.print_json(json.dumps(manifest, default=str))
    console.print(st.describe())
    if st.massive_summary():  # last, where a person reading the output sees it
        console.print(f"[yellow]{st.massive_summary()}[/yellow]")


def model_info(model: str = typer.Argument("default")) -> None:
    """Load a model and show its blocks, width and sites."""
    lm = _load(model, None, None)
    console.print(repr(lm))
    console.print(f"sites: resid.0 … resid.{lm.n_layers - 1} (residual stream after each block)")
