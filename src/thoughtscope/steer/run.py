"""Thin entry points for the command line: read files, call the library, print with rich."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..features import SCORES, FeatureScore, contrast_features
from ..models import LoadedModel
from .generate import Comparison, GenerationConfig, compare
from .interventions import SteerError
from .presets import Preset
from .vectors import SteeringVector, fit_vector


def steer_with_preset(
    lm: LoadedModel,
    preset: str | Path | Preset,
    prompts: Sequence[str],
    config: GenerationConfig | None = None,
    *,
    on_token=None,
) -> list[Comparison]:
    """`thoughtscope steer --preset P "prompt" ...`: unsteered and steered answers side by side, same seed."""
    p = preset if isinstance(preset, Preset) else Preset.load(preset)
    ivs = p.build(lm)
    return compare(lm, list(prompts), ivs, config, on_token=on_token)


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


def read_lines(path: str | Path) -> list[str]:
    """Prompts from a file: one per line (.txt) or a JSON list / JSONL with a "text" field."""
    path = Path(path)
    if not path.is_file():
        raise SteerError(f"prompt file not found: {path}")
    raw = path.read_text()
    if path.suffix == ".json":
        data = json.loads(raw)
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise SteerError(f"{path}: expected a JSON list of strings")
        return data
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(raw.splitlines()):
            if line.strip():
                obj = json.loads(line)
                if "text" not in obj:
                    raise SteerError(f"{path}, line {i + 1}: no 'text' field")
                out.append(obj["text"])
        return out
    return [line for line in raw.splitlines() if line.strip()]


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """Contrast pairs: JSONL / JSON list of {"positive": ..., "negative": ...}, or a TSV of positive<TAB>negative."""
    path = Path(path)
    if not path.is_file():
        raise SteerError(f"pairs file not found: {path}")
    text = path.read_text()
    rows: list = []
    if path.suffix == ".json":
        rows = json.loads(text)
    elif path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                parts = line.split("\t")
                if len(parts) != 2:
                    raise SteerError(f"{path}, line {i + 1}: expected 'positive<TAB>negative'")
                rows.append({"positive": parts[0], "negative": parts[1]})
    pairs = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("positive"), str) or not isinstance(r.get("negative"), str):
            raise SteerError(f'{path}, pair {i}: expected {{"positive": str, "negative": str}}')
        pairs.append((r["positive"], r["negative"]))
    if not pairs:
        raise SteerError(f"{path}: no pairs")
    return pairs


def vector_fit(
    lm: LoadedModel, site: str, pairs_path: str | Path, out: str | Path, *, method: str = "mean"
) -> SteeringVector:
    """`thoughtscope vector fit`: pairs file -> .safetensors steering vector (usable in presets)."""
    v = fit_vector(lm, site, read_pairs(pairs_path), method=method)
    v.save(out)
    return v


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


def features_contrast(
    lm: LoadedModel,
    sae,
    site: str,
    prompts_path: str | Path,
    controls_path: str | Path,
    *,
    score: str = "z",
    top: int = 20,
) -> list[FeatureScore]:
    """`thoughtscope features contrast`: prompt and control files -> ranked features."""
    return contrast_features(lm, sae, site, read_lines(prompts_path), read_lines(controls_path), score=score, top=top)
