"""Thin entry points for the command line: read files, call the library (`steer/report.py` prints the results)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..documents import jsonl_objects, read_prompts, read_utf8
from ..features import FeatureScore, contrast_features
from ..models import LoadedModel
from .calibrate import NEUTRAL_PROMPTS, SweepResult, plot_sweep, save_sweep, sweep_preset
from .find import FindConfig, FindResult, find_handle, save_preset
from .generate import Comparison, GenerationConfig, compare
from .handles import Concept
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


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """Contrast pairs: JSONL / JSON list of {"positive": ..., "negative": ...}, or a TSV of positive<TAB>negative."""
    path = Path(path)
    if not path.is_file():
        raise SteerError(f"pairs file not found: {path}")
    text = read_utf8(path)
    rows: list = []
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise SteerError(f"{path}: not valid JSON ({e}); expected a list of pairs") from None
    elif path.suffix == ".jsonl":
        rows = [rec for _, rec in jsonl_objects(text, SteerError, lambda n: f"{path}, line {n}")]
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
    lm: LoadedModel,
    site: str,
    pairs_path: str | Path,
    out: str | Path,
    *,
    method: str = "mean",
    texts_per_batch: int = 16,
) -> SteeringVector:
    """`thoughtscope vector fit`: pairs file -> .safetensors steering vector (usable in presets)."""
    v = fit_vector(lm, site, read_pairs(pairs_path), method=method, texts_per_batch=texts_per_batch)
    v.save(out)
    return v


def recorded_model(*, sae=None, preset: str | Path | Preset | None = None) -> dict | str:
    """The model an SAE (loaded) or a preset was made with, as `models.load_recorded` takes it: the SAE's recorded
    source (else its model's name); a preset's first feature item's SAE, else the model the preset names; 'default'
    when nothing is recorded."""
    if sae is not None:
        return sae.cfg.model_source or sae.cfg.model or "default"
    if preset is None:
        return "default"
    p = preset if isinstance(preset, Preset) else Preset.load(preset)
    for it in p.items:
        if it.sae:
            from ..sae import load_sae
            from .presets import resolve_sae_path

            base = p.path.parent if p.path is not None else Path(".")
            return recorded_model(sae=load_sae(resolve_sae_path(it.sae, base)))
    return p.model or "default"


read_lines = read_prompts  # the old name: one prompt-file reader (documents.read_prompts) for every caller


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
    return contrast_features(
        lm, sae, site, read_prompts(prompts_path), read_prompts(controls_path), score=score, top=top
    )


@dataclass
class SweepFiles:
    """What `sweep_to_files` wrote: the result (OUT.json), its plot (OUT.png, None without matplotlib) and the
    preset with the calibrated range and suggested strength (OUT.preset.json)."""

    result: SweepResult
    json: Path
    png: Path | None
    preset: Path


def sweep_to_files(
    lm: LoadedModel,
    preset: Preset,
    strengths: Sequence[float],
    out: str | Path,
    *,
    index: int = 0,
    keywords: Sequence[str] = (),
    ppl_bound: float = 2.0,
    prompts: Sequence[str] = NEUTRAL_PROMPTS,
    config: GenerationConfig | None = None,
) -> SweepFiles:
    """`thoughtscope steer sweep`: sweep item `index` of the preset and write OUT.json, OUT.png and
    OUT.preset.json (the preset with the calibrated range, at the suggested strength)."""
    out = Path(out)
    result, calibrated = sweep_preset(
        lm, preset, strengths, index=index, keywords=keywords, ppl_bound=ppl_bound, prompts=prompts, config=config
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    js = save_sweep(result, out.with_suffix(".json"))
    png = plot_sweep(result, out.with_suffix(".png"))
    return SweepFiles(result, js, png, calibrated.save(out.with_suffix(".preset.json")))


def find_to_files(
    lm: LoadedModel,
    sae,
    concept: Concept,
    *,
    questions: Sequence[str] = NEUTRAL_PROMPTS,
    config: FindConfig | None = None,
    preset: str | Path | None = None,
    json_out: str | Path | None = None,
    progress: bool = True,
    minutes: float | None = None,
) -> tuple[FindResult, Path | None]:
    """`thoughtscope steer find`: search and calibrate a handle for the concept, write the whole search to
    `json_out` (when given) and the winner as a preset (default steer-find-NAME.json). Returns the result and
    the preset's path (None when no handle raised the concept rate within the bound)."""
    res = find_handle(lm, sae, concept, questions=questions, config=config, progress=progress, minutes=minutes)
    if json_out is not None:
        res.save(json_out)
    if res.best is None:
        return res, None
    return res, save_preset(res, sae, preset or Path(f"steer-find-{concept.name.replace(' ', '_')}.json"))
