"""Steering results rendered with rich: answers side by side, features ranked by a contrast. Rendering only: the
numbers come from the library; the CLI and the demos print these."""

from __future__ import annotations

from collections.abc import Sequence

from ..features import SCORES, FeatureScore
from .generate import Comparison


def print_comparisons(comps: Sequence[Comparison], console=None, *, title: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for c in comps:
        t = Table(
            title=f"{title} {c.prompt}".strip() if isinstance(c.prompt, str) else title, show_lines=True, expand=True
        )
        t.add_column("unsteered", ratio=1)
        t.add_column("steered", ratio=1)
        t.add_row(c.unsteered, c.steered)
        console.print(t)


def print_contrast(scores: Sequence[FeatureScore], score: str = "z", console=None, labels: dict | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=f"features ranked by {score}: {SCORES[score]}")
    for col in ("feature", "score", "mean prompts", "mean controls", "fires prompts", "fires controls"):
        t.add_column(col, justify="right")
    if labels:
        t.add_column("label")
    for s in scores:
        row = [
            str(s.feature),
            f"{s.score:.3f}",
            f"{s.mean_prompts:.3f}",
            f"{s.mean_controls:.3f}",
            f"{100 * s.freq_prompts:.0f}%",
            f"{100 * s.freq_controls:.0f}%",
        ]
        if labels:
            row.append(str(labels.get(s.feature, "")))
        t.add_row(*row)
    console.print(t)


def find_notes(result) -> list[str]:
    """What a steer find winner's figures rest on: the fresh seeds within the bound, a step down, a margin unmet."""
    b = result.best
    if b is None:
        return []
    out = []
    conf, bound = b.get("confirmation"), result.config["ppl_bound"]
    if conf:
        out.append(f"fresh seeds within the {bound:g}x bound: {conf['within_bound_share']:.0%}")
    down = b.get("stepped_down_from")
    if down:
        ratio = down["confirmation"]["perplexity_ratio"]
        out.append(f"stepped down from {down['strength']:g}: its fresh seeds read {ratio:.2f}x perplexity")
    if not b["search"].get("margin_met", True):
        out.append(f"no point had room under {b['search']['margin']:g} x the bound; chosen on the bound itself")
    return out
