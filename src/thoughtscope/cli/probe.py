"""`thoughtscope probe ...`: datasets, layer sweeps, probe artefacts, monitoring, causal checks, erasure, weights."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from . import _load, console

probe_app = typer.Typer(no_args_is_help=True, help="Linear probes: find where a concept is readable, monitor it, "
                                                   "steer with it, erase it.")

DATA_HELP = "a built-in set (comparisons, cities, cities_negated, cities_known, translations, arithmetic, " \
            "sentiment, honesty) or a .jsonl/.csv file"


def _expand_sites(spec: str) -> list[str]:
    """'resid.0-29' or 'resid.3,resid.7' -> site names."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        if "-" in part and part.startswith("resid."):
            a, b = part.removeprefix("resid.").split("-")
            out += [f"resid.{i}" for i in range(int(a), int(b) + 1)]
        elif part:
            out.append(part)
    return out


def _read_cfg(read: str, chat: bool, batch_size: int):
    from ..probes.read import ReadConfig

    return ReadConfig(read=read, chat=chat, batch_size=batch_size)


@probe_app.command("datasets")
def datasets_cmd(export: Optional[str] = typer.Option(None, help="write this built-in set as JSONL to --out"),
                 out: Optional[Path] = typer.Option(None, help="output .jsonl for --export")) -> None:
    """List the shipped datasets (rows, groups, balance), or export one as JSONL."""
    from ..probes.generators import BUILTIN, builtin

    if export:
        if out is None:
            raise typer.BadParameter("--export needs --out")
        path = builtin(export).to_jsonl(out)
        console.print(f"wrote {path}")
        return
    t = Table(title="shipped probe datasets")
    for c in ("name", "rows", "positives", "groups", "entities", "example"):
        t.add_column(c)
    for name in BUILTIN:
        ds = builtin(name)
        t.add_row(name, str(len(ds)), str(sum(ds.labels)), str(len(set(ds.groups))), str(len(set(ds.entities))),
                  ds.texts[0][:60])
    console.print(t)


def print_sweep(out: dict, top: int | None = None) -> None:
    primary = out["best_fitter"]
    rows = out["results"][primary]
    t = Table(title=f"{out['dataset']} on {out.get('model', '?')}: held-out AUROC by site "
                    f"({out['n_train']} train / {out['n_test']} test rows, group-disjoint)")
    for c in ["site", *[f"{m}" for m in out["results"]], f"{primary} 95% CI", "random p95", "shuffle p95",
              "control", "selectivity"]:
        t.add_column(c, justify="right")
    for n in out["sites"]:
        r = rows[n]
        mark = " *" if n == out["best_site"] else ""
        t.add_row(n + mark, *[f"{out['results'][m][n]['test_auroc']:.3f}" for m in out["results"]],
                  f"[{r['test_auroc_ci'][0]:.2f}, {r['test_auroc_ci'][1]:.2f}]",
                  f"{out['random_directions'][n]['p95']:.3f}", f"{r['shuffle_p95']:.3f}",
                  f"{r['control_auroc']:.3f}", f"{r['selectivity']:+.3f}")
    console.print(t)
    sel = "" if out["best_is_selective"] else " (no site passed the selectivity rule; best by selectivity shown)"
    console.print(f"suggested site: [bold]{out['best_site']}[/bold]  AUROC {out['best_auroc']:.3f} "
                  f"[{out['best_auroc_ci'][0]:.3f}, {out['best_auroc_ci'][1]:.3f}], selectivity "
                  f"{out['best_selectivity']:+.3f}{sel}")


@probe_app.command("sweep")
def sweep_cmd(
    data: str = typer.Option(..., help=DATA_HELP),
    sites: str = typer.Option("resid.0-29", help="sites, e.g. resid.0-29 or resid.3,resid.9 (embed is added)"),
    model: str = typer.Option("default", help="model spec"),
    fitters: str = typer.Option("mean,lda,logistic,lat", help="comma-separated: mean, lda, logistic, lat, ccs"),
    read: str = typer.Option("last", help="read position: last, mean or span"),
    chat: bool = typer.Option(False, help="wrap each text in the model's chat template"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write every number here"),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="PNG of the curves (default: next to --json)"),
    seed: int = typer.Option(0), n_random: int = typer.Option(200), n_shuffle: int = typer.Option(10),
    batch_size: int = typer.Option(16), cache: Optional[Path] = typer.Option(None, help="activation cache folder"),
    device: Optional[str] = typer.Option(None), quiet: bool = typer.Option(False),
) -> None:
    """Held-out AUROC per site and fitter beside random directions, a label-shuffle null and a control task."""
    from ..probes.generators import resolve
    from ..probes.sweep import SweepConfig, plot, save_json, sweep

    ds = resolve(data)
    cfg = SweepConfig(fitters=tuple(f.strip() for f in fitters.split(",") if f.strip()), seed=seed,
                      n_random=n_random, n_shuffle=n_shuffle)
    lm = _load(model, device, None)
    out = sweep(lm, ds, _expand_sites(sites), _read_cfg(read, chat, batch_size), cfg, cache=cache,
                progress=not quiet)
    print_sweep(out)
    if json_path:
        save_json(out, json_path)
        console.print(f"JSON → {json_path}")
    png = plot_path or (json_path.with_suffix(".png") if json_path else None)
    if png:
        plot(out, png)
        console.print(f"plot → {png}")


@probe_app.command("transfer")
def transfer_cmd(
    data: List[str] = typer.Option(..., help="datasets (repeat): train on each, test on each"),
    site: str = typer.Option(..., help="one site, e.g. resid.12"),
    model: str = typer.Option("default"), fitter: str = typer.Option("mean"), read: str = typer.Option("last"),
    json_path: Optional[Path] = typer.Option(None, "--json"), seed: int = typer.Option(0),
    cache: Optional[Path] = typer.Option(None), device: Optional[str] = typer.Option(None),
) -> None:
    """Train on A's training split, test on B's held-out split: the AUROC matrix and A→B / B→B ratios."""
    from ..probes.generators import resolve
    from ..probes.read import read_activations
    from ..probes.sweep import save_json, transfer

    sets = {name: resolve(name) for name in data}
    lm = _load(model, device, None)
    rc = _read_cfg(read, False, 16)
    acts = {n: read_activations(lm, ds, [site], rc, cache=cache) for n, ds in sets.items()}
    out = transfer(acts, sets, str(lm.check_site(site)), fitter, seed)
    t = Table(title=f"transfer at {site} ({fitter}): rows train, columns test (held-out split)")
    t.add_column("train \\ test")
    for n in sets:
        t.add_column(n, justify="right")
    for a in sets:
        t.add_row(a, *[f"{out['auroc'][a][b]:.3f}" for b in sets])
    console.print(t)
    if json_path:
        save_json(out, json_path)


@probe_app.command("fit")
def fit_cmd(
    data: str = typer.Option(..., help=DATA_HELP), site: str = typer.Option(..., help="e.g. resid.12"),
    out: Path = typer.Option(..., help="probe folder to write"), model: str = typer.Option("default"),
    fitter: str = typer.Option("mean"), read: str = typer.Option("last"), chat: bool = typer.Option(False),
    seed: int = typer.Option(0), cache: Optional[Path] = typer.Option(None), device: Optional[str] = typer.Option(None),
) -> None:
    """Fit one probe on the training split and save it with its held-out metrics."""
    from ..probes.generators import resolve
    from ..probes.probe import fit_probe

    ds = resolve(data)
    lm = _load(model, device, None)
    probe = fit_probe(lm, ds, site, fitter, _read_cfg(read, chat, 16), seed=seed, cache=cache)
    probe.save(out)
    m = probe.cfg.metrics
    console.print(f"{probe!r}: held-out AUROC {m['test_auroc']:.3f} [{m['test_auroc_ci'][0]:.3f}, "
                  f"{m['test_auroc_ci'][1]:.3f}] → {out}")


__all__ = ["probe_app"]
