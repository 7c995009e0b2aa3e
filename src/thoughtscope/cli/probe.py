"""`thoughtscope probe ...`: datasets, layer sweeps, probe artefacts, monitoring, causal checks, erasure, weights.

It stays one file: it is the one `probe` command group (one cli module per group), each command a thin
wrapper over thoughtscope.probes sharing the same option parsing helpers.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..configdoc import field_help
from ..probes.config import ReadConfig, SweepConfig
from .common import _load, console, renamed

probe_app = typer.Typer(
    no_args_is_help=True, help="Linear probes: find where a concept is readable, monitor it, steer with it, erase it."
)

DATA_HELP = (
    "a built-in set (comparisons, cities, cities_negated, cities_known, translations, arithmetic, "
    "sentiment, honesty) or a .jsonl/.csv file"
)


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


def _read_cfg(read: str, chat: bool, texts_per_batch: int = ReadConfig.texts_per_batch) -> ReadConfig:
    return ReadConfig(read=read, chat=chat, texts_per_batch=texts_per_batch)


@probe_app.command("datasets")
def datasets_cmd(
    export: str | None = typer.Option(None, help="write this built-in set as JSONL to --out"),
    out: Path | None = typer.Option(None, help="output .jsonl for --export"),
) -> None:
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
        t.add_row(
            name,
            str(len(ds)),
            str(sum(ds.labels)),
            str(len(set(ds.groups))),
            str(len(set(ds.entities))),
            ds.texts[0][:60],
        )
    console.print(t)


@probe_app.command("sweep")
def sweep_cmd(
    data: str = typer.Option(..., help=DATA_HELP),
    sites: str = typer.Option("resid.0-29", help="sites, e.g. resid.0-29 or resid.3,resid.9 (embed is added)"),
    model: str = typer.Option("default", help="model spec"),
    fitters: str = typer.Option("mean,lda,logistic,lat", help=field_help(SweepConfig, "fitters", "(comma-separated)")),
    read: str = typer.Option(ReadConfig.read, help=field_help(ReadConfig, "read")),
    chat: bool = typer.Option(ReadConfig.chat, help=field_help(ReadConfig, "chat")),
    json_path: Path | None = typer.Option(None, "--json", help="write every number here"),
    plot_path: Path | None = typer.Option(None, "--plot", help="PNG of the curves (default: next to --json)"),
    seed: int = typer.Option(SweepConfig.seed, help=field_help(SweepConfig, "seed")),
    n_random: int = typer.Option(SweepConfig.n_random, help=field_help(SweepConfig, "n_random")),
    n_shuffle: int = typer.Option(SweepConfig.n_shuffle, help=field_help(SweepConfig, "n_shuffle")),
    texts_per_batch: int | None = typer.Option(
        ReadConfig.texts_per_batch, help=field_help(ReadConfig, "texts_per_batch")
    ),
    batch_size: int | None = typer.Option(None, "--batch-size", hidden=True),
    cache: Path | None = typer.Option(None, help="activation cache folder"),
    device: str | None = typer.Option(None),
    quiet: bool = typer.Option(False),
) -> None:
    """Held-out AUROC per site and fitter beside random directions, a label-shuffle null and a control task."""
    from ..probes.generators import resolve
    from ..probes.report import print_sweep
    from ..probes.sweep import plot, save_json, sweep

    per_batch = renamed(
        texts_per_batch,
        batch_size,
        new="--texts-per-batch",
        old="--batch-size",
        default=ReadConfig.texts_per_batch,
    )
    ds = resolve(data)
    cfg = SweepConfig(
        fitters=tuple(f.strip() for f in fitters.split(",") if f.strip()),
        seed=seed,
        n_random=n_random,
        n_shuffle=n_shuffle,
    )
    lm = _load(model, device, None)
    out = sweep(lm, ds, _expand_sites(sites), _read_cfg(read, chat, per_batch), cfg, cache=cache, progress=not quiet)
    print_sweep(out, console)
    if json_path:
        save_json(out, json_path)
        console.print(f"JSON → {json_path}")
    png = plot_path or (json_path.with_suffix(".png") if json_path else None)
    if png:
        plot(out, png)
        console.print(f"plot → {png}")


@probe_app.command("transfer")
def transfer_cmd(
    data: list[str] = typer.Option(..., help="datasets (repeat): train on each, test on each"),
    site: str = typer.Option(..., help="one site, e.g. resid.12"),
    model: str = typer.Option("default"),
    fitter: str = typer.Option("mean"),
    read: str = typer.Option(ReadConfig.read, help=field_help(ReadConfig, "read")),
    json_path: Path | None = typer.Option(None, "--json"),
    seed: int = typer.Option(0),
    cache: Path | None = typer.Option(None),
    device: str | None = typer.Option(None),
) -> None:
    """Train on A's training split, test on B's held-out split: the AUROC matrix and A→B / B→B ratios."""
    from ..probes.generators import resolve
    from ..probes.read import read_activations
    from ..probes.sweep import save_json, transfer

    sets = {name: resolve(name) for name in data}
    lm = _load(model, device, None)
    rc = _read_cfg(read, False)
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
    data: str = typer.Option(..., help=DATA_HELP),
    site: str = typer.Option(..., help="e.g. resid.12"),
    out: Path = typer.Option(..., help="probe folder to write"),
    model: str = typer.Option("default"),
    fitter: str = typer.Option("mean"),
    read: str = typer.Option(ReadConfig.read, help=field_help(ReadConfig, "read")),
    chat: bool = typer.Option(ReadConfig.chat, help=field_help(ReadConfig, "chat")),
    seed: int = typer.Option(0),
    cache: Path | None = typer.Option(None),
    device: str | None = typer.Option(None),
) -> None:
    """Fit one probe on the training split and save it with its held-out metrics."""
    from ..probes.generators import resolve
    from ..probes.probe import fit_probe

    ds = resolve(data)
    lm = _load(model, device, None)
    probe = fit_probe(lm, ds, site, fitter, _read_cfg(read, chat), seed=seed, cache=cache)
    probe.save(out)
    m = probe.cfg.metrics
    console.print(
        f"{probe!r}: held-out AUROC {m['test_auroc']:.3f} [{m['test_auroc_ci'][0]:.3f}, "
        f"{m['test_auroc_ci'][1]:.3f}] → {out}"
    )


def _write_json(obj: dict, path: Path | None) -> None:
    if path:
        from ..probes.sweep import save_json

        save_json(obj, path)
        console.print(f"JSON → {path}")


@probe_app.command("monitor")
def monitor_cmd(
    probe: Path = typer.Option(..., help="probe folder from `probe fit`"),
    text: list[str] = typer.Option([], help="text(s) to score per token"),
    calibrate: bool = typer.Option(False, help="set thresholds on the default corpus at 1% and 5% FPR"),
    data: str | None = typer.Option(None, help="with --calibrate: report recall on this dataset's class-1 rows"),
    n_docs: int = typer.Option(32, help="neutral documents for the threshold"),
    model: str = typer.Option("default"),
    json_path: Path | None = typer.Option(None, "--json"),
    device: str | None = typer.Option(None),
) -> None:
    """Score texts token by token with a saved probe; optionally calibrate thresholds on neutral text."""
    from ..probes.monitor import calibrate as run_calibrate
    from ..probes.monitor import neutral_texts, score_texts
    from ..probes.probe import load_probe

    lm = _load(model, device, None)
    pr = load_probe(probe, lm)
    res: dict = {"probe": str(probe), "site": pr.cfg.site}
    if calibrate:
        pos = neg = None
        if data:
            from ..probes.datasets import group_split
            from ..probes.generators import resolve

            ds = resolve(data)
            te = group_split(ds, 0.25, pr.cfg.seed).test
            pos = [ds.texts[i] for i in te if ds.labels[i] == 1]
            neg = [ds.texts[i] for i in te if ds.labels[i] == 0]
        cal = run_calibrate(lm, pr, neutral=neutral_texts(n_docs), positives=pos, negatives=neg)
        res["calibration"] = cal
        console.print(
            f"thresholds on {cal['n_neutral_tokens']:,} neutral tokens: "
            + ", ".join(f"{k} FPR → {v:.3f}" for k, v in cal["thresholds"].items())
        )
        if cal["recall"]:
            console.print(
                "recall on held-out class-1 rows: "
                + ", ".join(f"{v:.3f} at {k} FPR" for k, v in cal["recall"].items())
                + "; class-0 rows flagged: "
                + ", ".join(f"{v:.3f} at {k}" for k, v in cal["false_alarms_on_negatives"].items())
            )
    rows = []
    for ts in score_texts(lm, pr, text) if text else []:
        console.print(f"[bold]{ts.text[:80]!r}[/bold]  max {ts.max:.3f}  mean {ts.mean:.3f}")
        console.print(
            "  " + " ".join(f"{t!r}:{s:.2f}" if s == s else f"{t!r}:-" for t, s in zip(ts.tokens, ts.scores.tolist()))
        )
        rows.append({"text": ts.text, "tokens": ts.tokens, "scores": ts.scores.tolist()})
    res["texts"] = rows
    _write_json(res, json_path)


@probe_app.command("erase")
def erase_cmd(
    data: str = typer.Option(..., help=DATA_HELP),
    site: str = typer.Option(..., help="e.g. resid.12"),
    model: str = typer.Option("default"),
    read: str = typer.Option(ReadConfig.read, help=field_help(ReadConfig, "read")),
    seed: int = typer.Option(0),
    n_contexts: int = typer.Option(16, help="default-corpus contexts (128 tokens) for the LM-loss change"),
    reread: bool = typer.Option(
        True,
        help="re-read the rows under the erasure hook (--no-reread: erase the cached "
        "rows, identical at the erased site and two forward passes cheaper)",
    ),
    json_path: Path | None = typer.Option(None, "--json"),
    cache: Path | None = typer.Option(None),
    device: str | None = typer.Option(None),
) -> None:
    """LEACE at a site: held-out AUROC of fresh probes before/after (and after a random erasure), LM-loss change."""
    from ..probes.erase import erase_check
    from ..probes.generators import resolve

    lm = _load(model, device, None)
    res = erase_check(
        lm,
        resolve(data),
        site,
        _read_cfg(read, False),
        seed=seed,
        n_contexts=n_contexts,
        cache=cache,
        reread=reread,
    )
    t = Table(title=f"erasure at {res['site']} (rank {res['rank']}): held-out AUROC of freshly trained probes")
    for c in ("fitter", "before", "after LEACE", "after random rank-1"):
        t.add_column(c, justify="right")
    for m in res["before"]:
        t.add_row(m, f"{res['before'][m]:.3f}", f"{res['after_leace'][m]:.3f}", f"{res['after_random'][m]:.3f}")
    console.print(t)
    lo = res["lm_loss"]
    console.print(
        f"LM loss on {lo['n_contexts']} default-corpus contexts: {lo['none']:.4f} → LEACE "
        f"{lo['leace']:.4f} ({lo['delta_leace']:+.4f}), random {lo['random']:.4f} ({lo['delta_random']:+.4f})"
        f"; AUROC <= 0.55 after LEACE: {'yes' if res['passes'] else 'NO'}"
    )
    _write_json(res, json_path)


@probe_app.command("causal")
def causal_cmd(
    probe: Path = typer.Option(..., help="probe folder"),
    data: str = typer.Option(..., help=DATA_HELP),
    strengths: str = typer.Option("-2,-1,0,1,2", help="class-gap multiples"),
    n: int = typer.Option(48),
    suffix: str = typer.Option(" This statement is"),
    words: str = typer.Option(" true, false"),
    model: str = typer.Option("default"),
    json_path: Path | None = typer.Option(None, "--json"),
    device: str | None = typer.Option(None),
) -> None:
    """Add the probe vector at its site and measure P(word1) − P(word2), against random vectors of equal norm."""
    from ..probes.causal import causal_check
    from ..probes.datasets import group_split
    from ..probes.generators import resolve
    from ..probes.probe import load_probe

    lm = _load(model, device, None)
    pr = load_probe(probe, lm)
    ds = resolve(data)
    te = group_split(ds, 0.25, pr.cfg.seed).test[:n]
    w = [x if x.startswith(" ") else " " + x for x in words.split(",")]
    res = causal_check(
        lm,
        pr,
        [ds.texts[i] for i in te],
        strengths=[float(x) for x in strengths.split(",")],
        suffix=suffix,
        words=(w[0], w[1]),
    )
    t = Table(
        title=f"steering along the probe at {res['site']}: change of P({w[0]!r}) − P({w[1]!r}) "
        f"(baseline {res['baseline_gap']:+.4f}, {res['n_texts']} held-out texts)"
    )
    for c in ("class gaps", "probe vector", "random (mean of 3)", "random max |Δ|"):
        t.add_column(c, justify="right")
    for r in res["sweep"]:
        t.add_row(f"{r['strength']:+g}", f"{r['probe']:+.4f}", f"{r['random_mean']:+.4f}", f"{r['random_max_abs']:.4f}")
    console.print(t)
    _write_json(res, json_path)


@probe_app.command("weights")
def weights_cmd(
    layers: str = typer.Option("0-29", help="blocks, e.g. 0-29 or 3,7"),
    top: int = typer.Option(2),
    probe: Path | None = typer.Option(None, help="also give each direction's cosine with this probe"),
    model: str = typer.Option("default"),
    json_path: Path | None = typer.Option(None, "--json"),
    device: str | None = typer.Option(None),
) -> None:
    """Top singular directions of each block's MLP output and attention OV, read as tokens through the unembedding."""
    from ..probes.probe import load_probe
    from ..probes.weights import probe_alignment, weight_atlas

    lm = _load(model, device, None)
    idx = [int(s.removeprefix("resid.")) for s in _expand_sites(",".join(f"resid.{p}" for p in layers.split(",")))]
    d = load_probe(probe, lm).direction if probe else None
    rows = weight_atlas(lm, idx, top=top, probe_direction=d)
    t = Table(title="what each block writes: top singular directions read through the unembedding")
    for c in ("block", "part", "#", "σ", "tokens (+)", "tokens (−)", *(["cos probe"] if d is not None else [])):
        t.add_column(c)
    for r in rows:
        if r["component"] == "mlp" or r["rank"] == 0:
            t.add_row(
                str(r["layer"]),
                r["component"],
                str(r["rank"]),
                f"{r['singular_value']:.2f}" + (" ~" if r["near_tie"] else ""),
                " ".join(map(repr, r["tokens_plus"][:5])),
                " ".join(map(repr, r["tokens_minus"][:5])),
                *([f"{r['cosine_with_probe']:+.3f}"] if d is not None else []),
            )
    console.print(t)
    out = {"rows": rows}
    if d is not None:
        out["alignment"] = probe_alignment(lm, d, idx)[:10]
    _write_json(out, json_path)


@probe_app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("probe-demo"), help="folder for probe_sweep.json / .png"),
    full: bool = typer.Option(False, help="600 statements, all 30 blocks, 4 fitters (slow on a CPU)"),
    model: str = typer.Option("default"),
    device: str | None = typer.Option(None),
) -> None:
    """Sweep the shipped comparisons set on the default model, print the table beside its controls, save the plot."""
    from ..demo.probes import probe_demo

    probe_demo(_load(model, device, None), out, console, quick=not full)


__all__ = ["probe_app"]
