"""`thoughtscope sae ...`: train (one SAE or a sweep, resumable, torchrun-aware), eval, export, import.

Option defaults are read from SAEConfig / TrainConfig (sae/config.py, torch-free), so the command and the
library cannot drift apart.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.table import Table

from ..configdoc import field_help
from ..sae.config import SAEConfig, TrainConfig
from ..sae.run import TRAIN_LOSS_TOKENS
from .common import _csv, _fail, console, renamed
from .harvest import FORCE_HELP, PLAN_HELP, _plan_gate

sae_app = typer.Typer(no_args_is_help=True, help="Train, evaluate, import and export sparse autoencoders.")

SWEEP = "(comma-separate to sweep)"


@sae_app.command("train")
def sae_train(
    out: Path = typer.Option(..., help="output folder (one SAE; a sweep writes one subfolder per config)"),
    store: Path | None = typer.Option(None, help="train from this activation store"),
    model: str | None = typer.Option(None, help="or train on the fly from this model ('default', hub id, …)"),
    site: str = typer.Option("resid.15", help="site, when training on the fly"),
    target_site: str | None = typer.Option(
        None, help="train transcoders from --site to this site of the same block (mlp_in.L -> mlp_out.L; on the fly)"
    ),
    skip_connection: bool = typer.Option(False, help=field_help(SAEConfig, "skip_connection")),
    decoder_norm: str | None = typer.Option(None, help=field_help(SAEConfig, "decoder_norm", SWEEP)),
    corpus: str = typer.Option("default", help="corpus, when training on the fly"),
    tokens: int | None = typer.Option(TrainConfig.n_tokens, help=field_help(TrainConfig, "n_tokens")),
    arch: str = typer.Option(SAEConfig.arch, help=field_help(SAEConfig, "arch", SWEEP)),
    k: str = typer.Option(str(SAEConfig.k), help=field_help(SAEConfig, "k", SWEEP)),
    expansion: str = typer.Option(
        str(SAEConfig.n_features // SAEConfig.d_model), help=f"dictionary size / d_model {SWEEP}"
    ),
    l1_coeff: str = typer.Option(str(SAEConfig.l1_coeff), help=field_help(SAEConfig, "l1_coeff", SWEEP)),
    l0_coeff: str = typer.Option(str(SAEConfig.l0_coeff), help=field_help(SAEConfig, "l0_coeff", SWEEP)),
    batch_size: int = typer.Option(TrainConfig.batch_size, help=field_help(TrainConfig, "batch_size")),
    max_norm_ratio: float | None = typer.Option(
        SAEConfig.max_norm_ratio, help=field_help(SAEConfig, "max_norm_ratio", "0 keeps them.")
    ),
    lr: float | None = typer.Option(TrainConfig.lr, help=field_help(TrainConfig, "lr")),
    epochs: int = typer.Option(TrainConfig.epochs, help=field_help(TrainConfig, "epochs")),
    seed: int = typer.Option(TrainConfig.seed, help=field_help(TrainConfig, "seed")),
    device: str = typer.Option(TrainConfig.device, help=field_help(TrainConfig, "device")),
    dtype: str = typer.Option(TrainConfig.dtype, help=field_help(TrainConfig, "dtype")),
    checkpoint_every: int = typer.Option(
        TrainConfig.checkpoint_every, help=field_help(TrainConfig, "checkpoint_every")
    ),
    loss_tokens: int = typer.Option(
        TRAIN_LOSS_TOKENS,
        help="then measure the spliced loss on this many held-out tokens when the model can be loaded (0: skip)",
    ),
    quiet: bool = typer.Option(False),
    plan: bool = typer.Option(False, "--plan", help=PLAN_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Train one SAE, or a sweep over one pass of the data (re-run the same command to resume)."""
    from ..errors import ModelError, SAEError, StoreError, TrainingDiverged
    from ..estimates import sae_estimate
    from ..sae.run import train_grid

    if (store is None) == (model is None):
        _fail("give exactly one of --store (train from a store) or --model (train on the fly)")
    if model is not None and tokens is None:
        _fail("--tokens is required when training on the fly")
    grid = {
        "arch": _csv(arch, str),
        "k": _csv(k, int),
        "expansion": _csv(expansion, int),
        "l1_coeff": _csv(l1_coeff, float),
        "l0_coeff": _csv(l0_coeff, float),
        "decoder_norm": [None] if decoder_norm is None else _csv(decoder_norm, str.strip),
    }
    try:
        tc = TrainConfig(
            batch_size=batch_size,
            n_tokens=tokens,
            lr=lr,
            epochs=epochs,
            seed=seed,
            device=device,
            dtype=dtype,
            checkpoint_every=checkpoint_every,
            progress=not quiet,
        )
        what = dict(store=store, model=model, site=site, corpus=corpus, grid=grid, train_cfg=tc)
        what.update(max_norm_ratio=max_norm_ratio or None, loss_tokens=loss_tokens)
        if plan or int(os.environ.get("WORLD_SIZE", "1")) == 1:  # under torchrun only an explicit --plan probes
            _plan_gate(sae_estimate(**what), plan=plan, force=force, quiet=quiet)
        what["grid"] = {**grid, "skip_connection": [skip_connection]}  # a transcoder's (the plan leaves its d^2 out)
        runs, seconds = train_grid(out, **what, target_site=target_site)
    except (SAEError, StoreError, ModelError, TrainingDiverged, ValueError) as e:
        _fail(str(e))
    _print_trained(runs, seconds)


def _print_trained(runs, seconds: float) -> None:
    table = Table(title=f"trained in {seconds:.0f} s")
    for col in ("SAE", "folder", "loss recovered vs mean", "FVU", "L0", "dead"):
        table.add_column(col)
    notes, where = [], None
    for run in runs:
        m = getattr(run.sae, "train_metrics", {}) or {}
        held = getattr(run.sae, "heldout", {}) or {}
        rec = (held.get("spliced") or {}).get("loss_recovered_vs_mean")
        if held.get("spliced_skipped"):
            notes.append(f"{run.name}: {held['spliced_skipped']}")
        where = where or (held.get("spliced_text") or {}).get("text")
        table.add_row(
            run.name,
            str(run.folder),
            "-" if rec is None else f"{rec:.3f}",
            f"{m.get('fvu', float('nan')):.3f}",
            f"{m.get('l0', float('nan')):.1f}",
            f"{m.get('dead_frac', float('nan')):.3f}",
        )
    console.print(table)
    if where:
        console.print(f"loss recovered on {where}; FVU, L0 and dead share on the training rows")
    for n in notes:
        console.print(f"[yellow]{n}[/yellow]")


@sae_app.command("eval")
def sae_eval(
    path: Path = typer.Argument(..., help="an SAE folder (native, SAELens, sparsify or dictionary_learning)"),
    store: Path | None = typer.Option(None, help="held-out activations for MSE / FVU / L0 / dead fraction"),
    tokens: int | None = typer.Option(200_000, help="at most this many store tokens"),
    max_tokens: int | None = typer.Option(None, "--max-tokens", hidden=True),
    model: str | None = typer.Option(
        None, help="model for the spliced language-model loss (default: the one recorded with the SAE)"
    ),
    corpus: str | None = typer.Option(None, help="corpus for the spliced loss (default: the SAE's training corpus)"),
    loss_tokens: int = typer.Option(16_384, help="tokens for the spliced loss (0: reconstruction only)"),
    skip_contexts: int | None = typer.Option(
        None, help="skip this many contexts of 128 tokens first (default: past the text the SAE trained on)"
    ),
    skip_tokens: int | None = typer.Option(
        None, help="or skip this many corpus tokens (contexts of 128, BOS included)"
    ),
    write: bool = typer.Option(False, "--write", help="store the figures in the SAE folder's metrics.json (heldout)"),
    json_out: Path | None = typer.Option(None, "--json", help="write the metrics here"),
    device: str | None = typer.Option(None, help="torch device for the SAE and the model, e.g. cuda (default: CPU)"),
    quiet: bool = typer.Option(False, help="no progress bar"),
) -> None:
    """Measure an SAE: loss recovered vs mean ablation when its model is known, reconstruction on a store."""
    from ..errors import ModelError, SAEError, StoreError
    from ..sae.run import evaluate_folder

    if skip_contexts is not None and skip_tokens is not None:
        _fail("give at most one of --skip-contexts and --skip-tokens")
    n_tokens = renamed(tokens, max_tokens, new="--tokens", old="--max-tokens", default=200_000)
    try:
        result = evaluate_folder(
            path,
            store=store,
            model=model,
            corpus=corpus,
            n_tokens=n_tokens,
            loss_tokens=loss_tokens,
            skip_contexts=skip_contexts,
            skip_tokens=skip_tokens,
            progress=not quiet,
            write=write,
            device=device,
        )
    except (SAEError, StoreError, ModelError) as e:
        _fail(str(e))
    _print_eval(result)
    if json_out:
        json_out.write_text(json.dumps(result, indent=2, default=float))
    if write:
        console.print(f"stored in {path}/metrics.json (heldout)")


def _print_eval(result: dict) -> None:
    """The headline first (loss recovered vs mean ablation, FVU), where the text came from, then every figure."""
    s, r = result.get("spliced"), result.get("reconstruction")
    if s is not None:
        console.print(
            f"[bold]loss recovered vs mean ablation: {s['loss_recovered_vs_mean']:.3f}[/bold]  (LM loss clean "
            f"{s['loss_clean']:.3f}, with the SAE {s['loss_sae']:.3f}, mean-ablated {s['loss_mean_ablated']:.3f}, "
            f"zero-ablated {s['loss_zero_ablated']:.3f}; vs zero {s['loss_recovered']:.3f}; "
            f"{s['n_tokens']:,.0f} tokens)"
        )
        console.print(f"  text: {result['spliced_text']['text']}")
    else:
        console.print(f"[yellow]no spliced loss: {result.get('spliced_skipped')}[/yellow]")
    if r is not None:
        console.print(
            f"[bold]FVU: {r['fvu']:.3f}[/bold]  (L0 {r['l0']:.1f}, dead {r['dead_frac']:.1%}, "
            f"{r['n_tokens']:,} store tokens; {r['text']})"
        )
    console.print_json(json.dumps(result, default=float))


@sae_app.command("export")
def sae_export(
    path: Path = typer.Argument(..., help="an SAE folder"),
    out: Path = typer.Option(..., help="destination folder"),
    format: str = typer.Option("saelens", help="saelens or native"),
) -> None:
    """Write an SAE in SAELens' folder format (cfg.json + sae_weights.safetensors) or ours."""
    from ..sae import SAEError, export_saelens, load_sae, save_sae

    try:
        sae = load_sae(path)
        if format == "saelens":
            export_saelens(sae, out)
        elif format == "native":
            save_sae(sae, out)
        else:
            _fail(f"unknown format {format!r}: expected saelens or native")
    except SAEError as e:
        _fail(str(e))
    console.print(f"wrote {out}")


@sae_app.command("import")
def sae_import(
    path: Path = typer.Argument(..., help="an SAELens, sparsify or dictionary_learning SAE folder"),
    out: Path = typer.Option(..., help="destination folder (native format)"),
) -> None:
    """Convert a peer's SAE checkpoint into thoughtscope's format."""
    from ..sae import SAEError, load_sae, save_sae

    try:
        save_sae(load_sae(path), out)
    except SAEError as e:
        _fail(str(e))
    console.print(f"wrote {out}")
