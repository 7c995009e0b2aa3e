"""A layer sweep as the terminal shows it: one table of held-out AUROC per site beside its controls, and the
suggested site. Rendering only: the numbers come from probes.sweep; the CLI and the demo print these."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

SWEEP_WIDTH = 150  # the table is wide: it is drawn at least this many columns wide, whatever the terminal


def sweep_table(out: dict) -> Table:
    """Per site: every fitter's test AUROC, the suggested fitter's CI, the nulls, the control task, selectivity."""
    primary = out["best_fitter"]
    rows = out["results"][primary]
    t = Table(
        title=f"{escape(str(out['dataset']))} on {escape(str(out.get('model', '?')))}: held-out AUROC by site "
        f"({out['n_train']} train / {out['n_test']} test rows, group-disjoint)"
    )
    for c in ["site", *out["results"], f"{primary} 95% CI", "random p95", "shuffle p95", "control", "selectivity"]:
        t.add_column(escape(str(c)), justify="right")
    for n in out["sites"]:
        r = rows[n]
        mark = " *" if n == out["best_site"] else ""
        t.add_row(
            escape(str(n)) + mark,
            *[f"{out['results'][m][n]['test_auroc']:.3f}" for m in out["results"]],
            escape(f"[{r['test_auroc_ci'][0]:.2f}, {r['test_auroc_ci'][1]:.2f}]"),
            f"{out['random_directions'][n]['p95']:.3f}",
            f"{r['shuffle_p95']:.3f}",
            f"{r['control_auroc']:.3f}",
            f"{r['selectivity']:+.3f}",
        )
    return t


def sweep_verdict(out: dict) -> str:
    """The suggested (fitter, site) with its AUROC, CI and selectivity (rich markup), flagged when not selective."""
    sel = "" if out["best_is_selective"] else " (no site passed the selectivity rule; best by selectivity shown)"
    return (
        f"suggested site: [bold]{escape(str(out['best_site']))}[/bold] ({escape(str(out['best_fitter']))})  "
        f"AUROC {out['best_auroc']:.3f} "
        + escape(f"[{out['best_auroc_ci'][0]:.3f}, {out['best_auroc_ci'][1]:.3f}]")
        + ", selectivity "
        f"{out['best_selectivity']:+.3f}{sel}"
    )


def print_sweep(out: dict, console: Console) -> None:
    """The table (at least SWEEP_WIDTH wide) and the verdict line."""
    console.print(sweep_table(out), width=max(console.width, SWEEP_WIDTH))
    console.print(sweep_verdict(out))
