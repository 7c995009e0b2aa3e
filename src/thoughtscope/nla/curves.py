"""Training curves beside the NLA: one JSON and one PNG per stage, rewritten at every checkpoint.

A long run is judged by its curves (is the reward still rising, is KL drifting, are explanations growing?),
so they live in the NLA folder (`curves/<stage>.json`, `curves/<stage>.png`), travel with the weights and
survive resumes: they are drawn from the stage's history, which is part of the checkpoint.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

from .._io import atomic_write_bytes, atomic_write_json
from .config import RL_STAGES

# (history key, panel title); stages other than rl show their loss and every validation figure they log
RL_PANELS = [
    ("reward", "reward (mean over the group)"),
    ("kl", "KL to the warm-start verbalizer"),
    ("length", "explanation length (tokens)"),
    ("val_fve_round_trip", "validation round-trip FVE"),
]


def series(history: Sequence[dict]) -> dict[str, list[list[float]]]:
    """Every finite number a step logged, as [step, value] pairs per key (lr and the step itself left out)."""
    out: dict[str, list[list[float]]] = {}
    for rec in history:
        for k, v in rec.items():
            if k in ("step", "lr") or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            out.setdefault(k, []).append([int(rec["step"]), float(v)])
    return out


def panels(stage: str, found: dict) -> list[tuple[str, str]]:
    if stage in RL_STAGES:
        return RL_PANELS
    return [("loss", "training loss")] + [(k, k.replace("_", " ")) for k in sorted(found) if k.startswith("val_")]


def write_curves(nla_dir: str | Path, stage: str, history: Sequence[dict]) -> tuple[Path, Path]:
    """Write curves/<stage>.json (every logged series) and curves/<stage>.png (the stage's panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(nla_dir) / "curves"
    found = series(history)
    shown = panels(stage, found)
    json_path = atomic_write_json(
        folder / f"{stage}.json",
        {"stage": stage, "steps": len(history), "panels": [k for k, _ in shown], "series": found},
    )
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 2.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], shown):
        pts = found.get(key, [])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None, lw=1)
        else:
            ax.text(0.5, 0.5, "not logged yet", ha="center", va="center", transform=ax.transAxes, color="#888")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"nla {stage}: {len(history)} steps", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return json_path, atomic_write_bytes(folder / f"{stage}.png", buf.getvalue())
