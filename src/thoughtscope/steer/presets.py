"""Presets: a named list of interventions saved as JSON — the "semantic equalizer" settings.

    {"format": "thoughtscope-preset-2", "name": "golden_gate", "description": "...",
     "interventions": [
       {"type": "feature", "op": "clamp", "site": "resid.15", "sae": "default", "feature": 1234,
        "strength": 10.0, "unit": "max", "max_act": 3.1, "positions": "all", "label": "Golden Gate Bridge",
        "range": [0, 20], "suggested": 8.0},
       {"type": "vector", "op": "add", "site": "resid.12", "vector": "happy.safetensors",
        "strength": 0.5, "unit": "norm", "positions": "generated", "label": "happy"}]}

`strength` is the slider of every item: clamp target / amount added / scale factor for features (unit
"max": × `max_act`, or × the max stored with the SAE when the item has none); for vectors the strength of
"add" (unit "norm": multiples of the site's typical residual norm along the unit direction; "raw": the
vector as saved times strength), the target of "clamp_projection", or how far "swap" exchanges the
components along `vector` and `toward` (1: fully). `range` and `suggested` hold a
calibrated slider range (from `steer sweep`). Paths are relative to the preset file; "sae": "default" names
the SAE shipped with the package. Files written before strength had one name (format
"thoughtscope-preset-1") call it "value"; they load unchanged.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_json, read_json
from ..models import LoadedModel, Site
from ..values import is_finite as _finite_number
from .interventions import (
    FEATURE_OPS,
    POSITIONS,
    VECTOR_OPS,
    FeatureEdit,
    SteerError,
    VectorEdit,
    renamed_strength,
    validate,
)

FORMAT = "thoughtscope-preset-2"
OLD_KEYS = {"value": "strength"}  # keys of older preset files -> their name now


def default_sae_path() -> Path:
    from ..sae.formats import default_sae_path as shipped

    return shipped()


def preset_dirs() -> list[Path]:
    """Where `/preset <name>` looks: $THOUGHTSCOPE_PRESETS (os.pathsep-separated), ./presets, the examples."""
    dirs = [Path(p) for p in os.environ.get("THOUGHTSCOPE_PRESETS", "").split(os.pathsep) if p]
    dirs.append(Path.cwd() / "presets")
    dirs.append(Path(__file__).resolve().parents[3] / "examples" / "presets")
    return dirs


def find_preset(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    for d in preset_dirs():
        for cand in (d / name_or_path, d / f"{name_or_path}.json"):
            if cand.is_file():
                return cand
    raise SteerError(
        f"preset {name_or_path!r} not found: not a file, and no {name_or_path}.json in "
        + ", ".join(str(d) for d in preset_dirs())
    )


@renamed_strength
@dataclass
class PresetItem:
    type: str  # "feature" | "vector"
    op: str
    site: str
    strength: float = 0.0
    feature: int | None = None  # type feature
    sae: str | None = None  # type feature: folder or "default"
    unit: str = "raw"  # feature: raw | max ; vector add: raw | norm
    max_act: float | None = None
    vector: str | list[float] | None = None  # type vector: .safetensors path or the numbers inline
    toward: str | list[float] | None = None  # op swap: the second direction, as `vector`
    positions: str = "all"
    label: str = ""
    range: list[float] | None = None
    suggested: float | None = None

    def check(self, where: str) -> None:
        """Structural checks that need no model: types, ops, finite numbers."""
        if not isinstance(self.type, str) or self.type not in ("feature", "vector"):
            raise SteerError(f"{where}: type must be 'feature' or 'vector', got {_show(self.type)}")
        ops = FEATURE_OPS if self.type == "feature" else VECTOR_OPS
        if not isinstance(self.op, str) or self.op not in ops:
            raise SteerError(f"{where}: op for a {self.type} must be one of {', '.join(ops)}, got {_show(self.op)}")
        if not isinstance(self.site, str):
            raise SteerError(f"{where}: site must be a string such as 'resid.15', got {_show(self.site)}")
        try:
            Site.parse(self.site)
        except ValueError as e:
            raise SteerError(f"{where}: {e}") from None
        for name in ("strength", "max_act", "suggested"):
            v = getattr(self, name)
            if (v is not None or name == "strength") and not _finite_number(v):
                raise SteerError(f"{where}: {name} must be a finite number, got {_show(v)}")
        if self.range is not None and (
            not isinstance(self.range, list) or len(self.range) != 2 or not all(map(_finite_number, self.range))
        ):
            raise SteerError(f"{where}: range must be [low, high] finite numbers, got {_show(self.range)}")
        if not isinstance(self.positions, str) or self.positions not in POSITIONS:
            raise SteerError(f"{where}: positions must be one of {', '.join(POSITIONS)}, got {_show(self.positions)}")
        if self.label is not None and not isinstance(self.label, str):
            raise SteerError(f"{where}: label must be a string, got {_show(self.label)}")
        if self.type == "feature":
            if not isinstance(self.sae, str) or not self.sae.strip():
                raise SteerError(f"{where}: a feature item needs 'sae' (a folder or 'default'), got {_show(self.sae)}")
            if isinstance(self.feature, bool) or not isinstance(self.feature, int) or self.feature < 0:
                raise SteerError(f"{where}: feature must be a non-negative integer, got {_show(self.feature)}")
            if not isinstance(self.unit, str) or self.unit not in ("raw", "max"):
                raise SteerError(f"{where}: unit for a feature must be 'raw' or 'max', got {_show(self.unit)}")
        else:
            _check_direction(self.vector, "vector", where)
            if (self.toward is not None) != (self.op == "swap"):
                raise SteerError(f"{where}: 'toward' (the second direction) goes with op 'swap', and swap needs it")
            if self.toward is not None:
                _check_direction(self.toward, "toward", where)
            if not isinstance(self.unit, str) or self.unit not in ("raw", "norm"):
                raise SteerError(f"{where}: unit for a vector must be 'raw' or 'norm', got {_show(self.unit)}")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and v != "" or k in ("type", "op", "site")}


@dataclass
class Preset:
    name: str
    items: list[PresetItem] = field(default_factory=list)
    description: str = ""
    model: str = ""
    path: Path | None = field(default=None, compare=False, repr=False)

    # -- JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": self.name,
            "description": self.description,
            "model": self.model,
            "interventions": [it.to_dict() for it in self.items],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "preset") -> Preset:
        if not isinstance(d, dict) or not isinstance(d.get("interventions"), list):
            raise SteerError(f"{source}: expected a JSON object with an 'interventions' list")
        names = {f.name for f in fields(PresetItem)}
        items = []
        for i, raw in enumerate(d["interventions"]):
            where = f"{source}, intervention {i}"
            if not isinstance(raw, dict):
                raise SteerError(f"{where}: expected an object, got {type(raw).__name__}")
            raw = _current_keys(raw, where)
            unknown = set(raw) - names
            if unknown:
                raise SteerError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(names)})")
            missing = {"type", "op", "site"} - set(raw)
            if missing:
                raise SteerError(f"{where}: missing {sorted(missing)}")
            it = PresetItem(**raw)
            it.check(where)
            items.append(it)
        texts = {}
        for key in ("name", "description", "model"):
            value = d.get(key)
            if value is not None and not isinstance(value, str):
                raise SteerError(f"{source}: {key!r} must be a string, got {_show(value)}")
            texts[key] = value or ""
        return cls(texts["name"], items, texts["description"], texts["model"])

    def save(self, path: str | Path) -> Path:
        path = atomic_write_json(path, self.to_dict())
        self.path = path
        return path

    @classmethod
    def load(cls, name_or_path: str | Path) -> Preset:
        path = find_preset(str(name_or_path))
        d = read_json(path, SteerError, expect=None)  # from_dict says what a preset must hold
        p = cls.from_dict(d, source=str(path))
        p.path = path
        return p

    def with_strength(self, index: int, strength: float) -> Preset:
        """A copy with item `index` set to `strength` (what a slider or a sweep does)."""
        items = [PresetItem(**asdict(it)) for it in self.items]
        items[index].strength = float(strength)
        items[index].check(f"preset {self.name}, intervention {index}")
        return Preset(self.name, items, self.description, self.model, self.path)

    def with_value(self, index: int, value: float) -> Preset:
        """Deprecated name of `with_strength`."""
        import warnings

        warnings.warn("Preset.with_value is now Preset.with_strength", DeprecationWarning, stacklevel=2)
        return self.with_strength(index, value)

    # -- to interventions
    def build(self, lm: LoadedModel, *, sae_cache: dict | None = None) -> list:
        """Load SAEs / vectors and return checked interventions; every error names the preset and item."""
        base = self.path.parent if self.path else Path.cwd()
        cache = sae_cache if sae_cache is not None else {}
        out = []
        for i, it in enumerate(self.items):
            where = f"preset {self.path or self.name!s}, intervention {i}"
            it.check(where)
            try:
                lm.check_site(it.site)
            except ValueError as e:
                raise SteerError(f"{where}: {e}") from None
            try:
                if it.type == "feature":
                    sae = load_sae_cached(it.sae, base, cache, lm)
                    out.append(
                        FeatureEdit(
                            sae,
                            it.feature,
                            it.op,
                            it.strength,
                            unit=it.unit,
                            max_act=it.max_act,
                            positions=it.positions,
                            site=it.site,
                            label=it.label,
                        )
                    )
                else:
                    out.append(_vector_item(it, base, lm))
                validate(lm, out[-1:])
            except SteerError as e:
                raise SteerError(f"{where}: {e}") from None
        return out


def sae_spec(sae, base: Path) -> str:
    """How a preset names an SAE: "default", saelens:<release>/<sae_id>, a path relative to the preset's folder
    `base`, or absolute."""
    if getattr(sae, "source_spec", None):
        return str(sae.source_spec)
    src = getattr(sae, "source_dir", None)
    if src is None:
        raise SteerError("the SAE was not loaded from a folder; save it (save_sae) and load it before saving a preset")
    src = Path(src).resolve()
    if src == default_sae_path().resolve():
        return "default"
    try:
        return str(src.relative_to(Path(base).resolve()))
    except ValueError:
        return str(src)


def feature_preset(sae, feature: int, folder: str | Path, *, strength: float = 1.0, positions: str = "all") -> Preset:
    """A one-slider preset: a clamp of `feature` at `strength` × the max stored with the SAE, to be saved in
    `folder` (what `steer sweep --feature` sweeps). Raises SteerError when the SAE stores no maxima."""
    from ..features import feature_max

    ref = feature_max(sae)
    if ref is None:
        where = getattr(sae, "source_dir", None) or "FOLDER"
        raise SteerError(
            f"the SAE stores no feature maxima for 'x max'; run 'thoughtscope features stats --sae {where}'"
        )
    n = ref.values.numel()
    if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < n:
        raise SteerError(f"feature {feature} is out of range: the SAE has {n} features (0..{n - 1})")
    folder = Path(folder).resolve()
    item = PresetItem(
        "feature",
        "clamp",
        str(Site.parse(sae.cfg.site)),
        float(strength),
        feature=feature,
        sae=sae_spec(sae, folder),
        unit="max",
        max_act=float(ref.values[feature]),
        positions=positions,
    )
    p = Preset(f"feature-{feature}", [item], f"clamp of feature {feature} in x its max ({ref.source})")
    p.path = folder / f"feature-{feature}.json"  # relative paths in it resolve against `folder`
    return p


def resolve_sae_path(spec: str, base: Path) -> Path:
    if spec == "default":
        p = default_sae_path()
        if not p.is_dir():
            raise SteerError(f"the default SAE is not installed at {p}; pass an SAE folder instead")
        return p
    p = Path(spec)
    if not p.is_absolute():
        p = base / p
    if not p.is_dir():
        raise SteerError(f"SAE folder not found: {p} (expected a folder with cfg.json and sae_weights.safetensors)")
    return p


def load_sae_cached(spec: str, base: Path, cache: dict, lm: LoadedModel | None = None):
    from ..sae import load_sae
    from ..sae.pretrained import is_pretrained_spec

    p = spec if is_pretrained_spec(spec) else resolve_sae_path(spec, base)
    key = spec if is_pretrained_spec(spec) else str(p.resolve())
    if key not in cache:
        try:
            sae = load_sae(p, device=lm.device if lm is not None else None)
        except (OSError, ValueError) as e:
            raise SteerError(f"could not load the SAE at {p}: {e}") from None
        cache[key] = sae.eval().requires_grad_(False)
    return cache[key]


def _check_direction(value, name: str, where: str) -> None:
    if isinstance(value, str) and value.strip():
        return
    if isinstance(value, list) and value:
        if not all(map(_finite_number, value)):
            raise SteerError(f"{where}: inline {name} must hold finite numbers")
        return
    raise SteerError(
        f"{where}: a vector item needs {name!r} (a .safetensors path or a list of numbers), got {_show(value)}"
    )


def _direction(value, it: PresetItem, base: Path, lm: LoadedModel) -> tuple[torch.Tensor, float | None]:
    """A direction named by a preset item (inline numbers or a saved vector) and its typical norm if saved."""
    from .vectors import SteeringVector

    typical = None
    if isinstance(value, list):
        v = torch.tensor(value, dtype=torch.float32)
    else:
        p = Path(value)
        sv = SteeringVector.load(p if p.is_absolute() else base / p)
        if sv.site and sv.site != str(Site.parse(it.site)):
            raise SteerError(f"vector {value} was fitted at {sv.site} but the preset applies it at {it.site}")
        v, typical = sv.vector, sv.typical_norm
    if v.dim() != 1 or v.shape[0] != lm.d_model:
        raise SteerError(f"vector has shape {tuple(v.shape)} but {lm.name} has d_model={lm.d_model}")
    return v, typical


def _vector_item(it: PresetItem, base: Path, lm: LoadedModel) -> VectorEdit:
    from .vectors import site_norm

    v, typical = _direction(it.vector, it, base, lm)
    toward = _direction(it.toward, it, base, lm)[0] if it.toward is not None else None
    strength = it.strength
    if it.op == "add" and it.unit == "norm":
        n = float(v.norm())
        if n == 0:
            raise SteerError("cannot use unit 'norm' with a zero vector")
        typical = typical if typical is not None else site_norm(lm, it.site)
        v, strength = v / n, it.strength * typical
    return VectorEdit(v, it.site, it.op, strength, positions=it.positions, label=it.label, toward=toward)


def _show(value: Any, limit: int = 80) -> str:
    """A short repr for an error message (a 5000-digit int or a long list cannot break or flood it)."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        return "an integer too long to print"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _current_keys(raw: dict, where: str) -> dict:
    """An item's keys as they are named now: a file written before the rename says "value" for "strength"."""
    out = dict(raw)
    for old, new in OLD_KEYS.items():
        if old in out:
            if new in out:
                raise SteerError(f"{where}: give {new!r} only ({old!r} is its old name)")
            out[new] = out.pop(old)
    return out


def preset_from_interventions(name: str, interventions, *, sae_paths: dict | None = None) -> Preset:
    """The JSON form of live interventions (feature items need the SAE's folder in sae_paths[id(sae)])."""
    items = []
    for iv in interventions:
        if isinstance(iv, FeatureEdit):
            path = (sae_paths or {}).get(id(iv.sae))
            if path is None:
                raise SteerError(f"feature {iv.feature}: no folder known for its SAE; pass sae_paths={{id(sae): path}}")
            items.append(
                PresetItem(
                    "feature",
                    iv.op,
                    iv.site,
                    iv.strength,
                    feature=iv.feature,
                    sae=str(path),
                    unit=iv.unit,
                    max_act=iv.max_act,
                    positions=iv.positions,
                    label=iv.label,
                )
            )
        else:
            items.append(
                PresetItem(
                    "vector",
                    iv.op,
                    iv.site,
                    iv.strength,
                    vector=[float(x) for x in iv.vector.cpu()],
                    toward=[float(x) for x in iv.toward.cpu()] if iv.toward is not None else None,
                    positions=iv.positions,
                    label=iv.label,
                )
            )
    return Preset(name, items)
