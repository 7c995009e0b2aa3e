"""The `thoughtscope` command: one subcommand per verb."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Read, map and steer what an open language model is thinking.")
console = Console()
err = Console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/bold red] {message}")
    raise typer.Exit(code)


def _load(model: str, device: Optional[str], dtype: Optional[str]):
    from .models import ModelError, load_model

    try:
        return load_model(model, device=device, dtype=dtype)
    except ModelError as e:
        _fail(str(e))


@app.command()
def harvest(
    model: str = typer.Option("default", help="'default' (embedded SmolLM2), a hub id, a folder or a .gguf file"),
    site: List[str] = typer.Option(["resid.15"], help="site(s) to read, e.g. resid.15 (repeat or comma-separate)"),
    corpus: str = typer.Option("default", help="'default', a file, a folder, a .jsonl file or hf:<dataset>"),
    text_field: str = typer.Option("text", help="JSONL / dataset field holding the text"),
    tokens: int = typer.Option(200_000, help="number of tokens to harvest"),
    out: Path = typer.Option(..., help="output folder (one store, or one per site when several)"),
    ctx_len: int = typer.Option(128, help="tokens per context"),
    batch_size: int = typer.Option(16, help="contexts per forward pass"),
    dtype: str = typer.Option("float32", help="stored dtype: float32, float16 or bfloat16"),
    shard_tokens: Optional[int] = typer.Option(None, help="tokens per shard (a multiple of batch-size × ctx-len)"),
    device: Optional[str] = typer.Option(None, help="torch device, e.g. cuda:0 (default: CPU)"),
    model_dtype: Optional[str] = typer.Option(None, help="dtype to run the model in"),
    overwrite: bool = typer.Option(False, help="replace a finished store at --out"),
    quiet: bool = typer.Option(False, help="no progress bar"),
) -> None:
    """Harvest activations at one or more sites into resumable on-disk stores."""
    from .corpus import Corpus, CorpusError
    from .harvest import HarvestConfig, harvest as run
    from .models import SiteError, parse_sites
    from .store import StoreError

    try:
        sites = parse_sites(",".join(site))
        lm = _load(model, device, model_dtype)
        src = Corpus(corpus, text_field=text_field)
        cfg = HarvestConfig(n_tokens=tokens, ctx_len=ctx_len, batch_size=batch_size, dtype=dtype,
                            shard_tokens=shard_tokens)
        t0 = time.perf_counter()
        stores = run(lm, src, sites, out, cfg, progress=not quiet, overwrite=overwrite)
    except (SiteError, CorpusError, StoreError, ValueError) as e:
        _fail(str(e))
    dt = time.perf_counter() - t0
    for s, st in stores.items():
        console.print(f"[green]{s}[/green] → {st.path}: {st.describe()}")
    console.print(f"done in {dt:.1f} s")


@app.command("store")
def store_info(path: Path = typer.Argument(..., help="an activation store folder"),
               verify: bool = typer.Option(False, help="also check every shard's checksum")) -> None:
    """Describe (and optionally verify) an activation store."""
    from .store import ActivationStore, StoreError

    try:
        st = ActivationStore.open(path)
        if verify:
            st.verify(checksums=True)
    except StoreError as e:
        _fail(str(e))
    console.print(st.describe())
    console.print_json(json.dumps({k: v for k, v in st.manifest.items() if k != "shards"}, default=str))


@app.command("model")
def model_info(model: str = typer.Argument("default")) -> None:
    """Load a model and show its blocks, width and sites."""
    lm = _load(model, None, None)
    console.print(repr(lm))
    console.print(f"sites: resid.0 … resid.{lm.n_layers - 1} (residual stream after each block)")


@app.command()
def demo(
    tokens: int = typer.Option(16_384, help="tokens to harvest for the demo store"),
    out: Path = typer.Option(Path("demo-out"), help="where the demo writes its artefacts"),
    site: str = typer.Option("resid.15", help="site to study"),
) -> None:
    """Run the main workflow on the embedded SmolLM2-135M-Instruct, offline."""
    from .demo import run_demo

    run_demo(out=out, site=site, tokens=tokens, console=console)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
