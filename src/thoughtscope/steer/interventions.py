"""Interventions: small objects that edit one site's activation, applied through `models.edit` hooks.

Two families:
- on SAE features (clamp / add / scale / ablate): the edit is x' = x + Σ (f'ᵢ − fᵢ)·W_dec,ᵢ, so only the
  chosen features move and the SAE's reconstruction error stays in the activation (the model is not also
  hit by the SAE's own error, the pitfall of "replace x by decode(encode(x))");
- on directions (add a vector, project a direction out, clamp the projection to a value).

Every intervention says *where* it acts: all positions, prompt only, or generated tokens only. During
cached generation a forward pass only sees the new tokens, so the hook needs the absolute position of
its first column (`offset`) and the padded prompt width; the `Steerer` keeps both.

Composition rule: interventions at a site run in the order given, each seeing the previous one's output;
consecutive feature edits on the same SAE form one group computed from the same input, so a group is
exactly x + Σ (f'ᵢ − fᵢ)·W_dec,ᵢ as in the Golden Gate experiments.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import SteerError  # noqa: F401  (re-exported: their old home)
from ..models import LoadedModel, Site, edit
from .config import _check_finite
from .renamed import alias, renamed_strength, strength_from, warn_renamed

POSITIONS = ("all", "prompt", "generated")
FEATURE_OPS = ("clamp", "add", "scale", "ablate")
VECTOR_OPS = ("add", "project_out", "clamp_projection", "swap")


def _check_positions(p: str) -> str:
    if p not in POSITIONS:
        raise SteerError(f"positions must be one of {', '.join(POSITIONS)}, got {p!r}")
    return p


# --------------------------------------------------------------------------- step context


@dataclass
class StepContext:
    """What a hook knows about the current forward pass.

    offset: absolute index of the first column of this pass (the KV-cache length before it);
    prompt_len: padded prompt width (prompts are left-padded, so every prompt ends at the same column);
    None means the whole input is prompt (a plain forward pass outside generation).
    """

    offset: int = 0
    prompt_len: int | None = None

    def mask(self, positions: str, T: int, device) -> Tensor | bool:
        """True (every column), False (none) or a bool tensor [1, T, 1] of the columns to edit."""
        if positions == "all":
            return True
        end = self.prompt_len if self.prompt_len is not None else self.offset + T
        n_prompt = max(0, min(T, end - self.offset))  # columns of this pass that are prompt
        if positions == "prompt":
            if n_prompt == T:
                return True
            if n_prompt == 0:
                return False
        else:  # generated
            if n_prompt == 0:
                return True
            if n_prompt == T:
                return False
        cols = torch.arange(T, device=device) < n_prompt
        if positions == "generated":
            cols = ~cols
        return cols.view(1, T, 1)


def _where(mask, new: Tensor, old: Tensor) -> Tensor:
    if mask is True:
        return new
    if mask is False:
        return old
    return torch.where(mask, new, old)


# --------------------------------------------------------------------------- SAE features


class FeatureReader:
    """Activations of a few selected features without encoding the whole dictionary.

    The encoder rows, biases and thresholds of the selected features are gathered once, so a generation
    step costs one [T, d] × [d, n] product. Activation per architecture: relu-l1: ReLU(pre);
    jumprelu: pre·[pre > θᵢ]; batchtopk (trained): pre·[pre > global θ]; topk (and an untrained
    batchtopk): ReLU(pre). A top-k activation depends on every other feature, which would force a full
    encode per token; ReLU(pre) equals the SAE's own encode output whenever the feature is among the k
    largest (where one steers it), and elsewhere it also counts the sub-threshold part, so an ablation
    removes it and a clamp sets the feature's whole contribution (docs/steering.md).
    """

    def __init__(self, sae, idx: Tensor):
        self.encode = sae.partial_encoder(idx)  # the SAE owns the rule per architecture (SAE.partial_encoder)

    def __call__(self, x: Tensor) -> Tensor:
        return self.encode(x)


def feature_acts(sae, x: Tensor, idx: Tensor) -> Tensor:
    """Activations of the features `idx` at x ([..., d] -> [..., n]); see FeatureReader for the topk rule."""
    return FeatureReader(sae, torch.as_tensor(idx, dtype=torch.long))(x)


@dataclass
class FeatureEdit:
    """Edit one SAE feature: clamp it to a strength, add a strength to it, scale it by a strength, or ablate it.

    unit="max" reads the strength as a multiple of the feature's max activation `max_act` (the slider unit of
    the Golden Gate work: 10× max there); without `max_act` it is the max stored with the SAE
    (`features.feature_max`), the one reference the CLI, the web and presets share. unit="raw" reads it in
    activation units. `value=` is the old name of `strength` (still accepted, with a warning).
    """

    sae: object
    feature: int
    op: str = "clamp"
    strength: float = 0.0
    unit: str = "raw"
    max_act: float | None = None
    positions: str = "all"
    site: str | None = None  # defaults to the SAE's own cfg.site
    label: str = ""

    def __post_init__(self) -> None:
        if self.op not in FEATURE_OPS:
            raise SteerError(f"feature op must be one of {', '.join(FEATURE_OPS)}, got {self.op!r}")
        n = int(self.sae.W_dec.shape[0])
        if isinstance(self.feature, bool) or not isinstance(self.feature, int) or not 0 <= self.feature < n:
            raise SteerError(f"feature index {self.feature!r} is out of range: this SAE has {n} features (0..{n - 1})")
        self.strength = _check_finite(f"strength of feature {self.feature}", self.strength)
        if self.unit not in ("raw", "max"):
            raise SteerError(f"unit must be 'raw' or 'max', got {self.unit!r}")
        if self.unit == "max" and self.op in ("clamp", "add"):
            if self.max_act is None:  # the one reference: the max stored with the SAE (features.feature_max)
                stats = getattr(self.sae, "feature_stats", None)
                if stats is None:
                    raise SteerError(
                        f"feature {self.feature}: unit 'max' needs the feature's max activation and this "
                        f"SAE stores none; run 'thoughtscope features stats' on it, or give max_act"
                    )
                self.max_act = float(stats.max_act[self.feature])
            m = _check_finite(f"max_act of feature {self.feature}", self.max_act)
            if m <= 0:
                raise SteerError(f"feature {self.feature}: max_act must be > 0 for unit 'max', got {m}")
        _check_positions(self.positions)
        site = self.site or getattr(getattr(self.sae, "cfg", None), "site", "") or None
        if site is None:
            raise SteerError(f"feature {self.feature}: no site given and the SAE's config names none")
        self.site = str(Site.parse(site))

    @property
    def target(self) -> float:
        """The strength in activation units (clamp target / amount added / scale factor)."""
        if self.unit == "max" and self.op in ("clamp", "add"):
            return self.strength * float(self.max_act)
        return self.strength

    def new_value(self, f: Tensor) -> Tensor:
        if self.op == "clamp":
            return torch.full_like(f, self.target)
        if self.op == "add":
            return f + self.target
        if self.op == "scale":
            return f * self.target
        return torch.zeros_like(f)

    def apply(self, h: Tensor, ctx: StepContext) -> Tensor:
        return _FeatureGroup([self]).apply(h, ctx)


class _FeatureGroup:
    """Consecutive FeatureEdits on one SAE, computed from the same input: one small matmul per pass."""

    def __init__(self, edits: list[FeatureEdit]):
        self.edits = edits
        self.sae = edits[0].sae
        self.idx = torch.tensor([e.feature for e in edits], dtype=torch.long, device=self.sae.W_dec.device)
        self.W = self.sae.W_dec[self.idx].detach().float()  # [n, d]
        self.read = FeatureReader(self.sae, self.idx)
        self.positions = [e.positions for e in edits]

    def apply(self, h: Tensor, ctx: StepContext) -> Tensor:
        T = h.shape[1]
        masks = [ctx.mask(p, T, h.device) for p in self.positions]
        if all(m is False for m in masks):
            return h
        with torch.no_grad():
            f = self.read(h)  # [B, T, n]
            cols = []
            for e, m in zip(self.edits, masks):
                fj = f[..., len(cols)]
                m = m if isinstance(m, bool) else m[..., 0]  # [1, T] against fj [B, T]
                cols.append(_where(m, e.new_value(fj), fj) - fj)
            delta = torch.stack(cols, -1) @ self.W  # Σ (f'ᵢ − fᵢ)·W_dec,ᵢ
        return h + delta.to(h.dtype)


# --------------------------------------------------------------------------- directions


@dataclass
class VectorEdit:
    """Edit along a direction at a site.

    op="add": h + strength·vector (the vector as given; presets can express the strength in units of the
    site's typical residual norm). op="project_out": remove the component along the direction.
    op="clamp_projection": set the component along the unit direction to `strength`. op="swap": exchange what
    h says along the unit direction a (`vector`) and the unit direction b (`toward`), leaving the complement of
    their plane as it was: with p_a = h·a, p_b = h·b and c = a·b, h + strength·(p_b − p_a)/(1 − c)·(a − b), so at
    strength 1 h·a becomes p_b and h·b becomes p_a (a lens reads token A where it read B, and back). The
    default strength is 1 for "add" and "swap", 0 for "clamp_projection". `scale=` (add) and `value=`
    (clamp_projection) are the old names of `strength` (still accepted, with a warning).
    """

    vector: Tensor
    site: str
    op: str = "add"
    strength: float | None = None
    positions: str = "all"
    label: str = ""
    toward: Tensor | None = None
    """op "swap" only: the second direction b [d_model] (any length; its unit direction is used)."""
    _unit: Tensor | None = field(default=None, repr=False)
    _toward_unit: Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.op not in VECTOR_OPS:
            raise SteerError(f"vector op must be one of {', '.join(VECTOR_OPS)}, got {self.op!r}")
        v = torch.as_tensor(self.vector).detach()
        if v.dim() != 1:
            raise SteerError(f"steering vector must be 1-D [d_model], got shape {tuple(v.shape)}")
        if not torch.isfinite(v).all():
            raise SteerError("steering vector contains non-finite values")
        self.vector = v.float()
        if self.strength is None:
            self.strength = 1.0 if self.op in ("add", "swap") else 0.0
        self.strength = _check_finite("vector strength", self.strength)
        _check_positions(self.positions)
        self.site = str(Site.parse(self.site))
        if self.op != "add":
            n = float(self.vector.norm())
            if n == 0:
                raise SteerError(f"{self.op} needs a non-zero direction")
            self._unit = self.vector / n
        if (self.toward is not None) != (self.op == "swap"):
            raise SteerError("op 'swap' needs a second direction (toward=...), and only swap takes one")
        if self.op == "swap":
            self._toward_unit = _swap_partner(self._unit, self.toward)

    def to(self, device) -> VectorEdit:
        self.vector = self.vector.to(device)
        for name in ("_unit", "toward", "_toward_unit"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        return self

    def apply(self, h: Tensor, ctx: StepContext) -> Tensor:
        mask = ctx.mask(self.positions, h.shape[1], h.device)
        if mask is False:
            return h
        if self.op == "add":
            new = h + (self.strength * self.vector).to(h.dtype)
        elif self.op == "swap":
            a, b = self._unit, self._toward_unit
            amount = self.strength * (h.float() @ b - h.float() @ a) / (1.0 - float(a @ b))  # [B, T]
            new = h + (amount[..., None] * (a - b)).to(h.dtype)
        else:
            u = self._unit
            proj = h.float() @ u  # [B, T]
            target = 0.0 if self.op == "project_out" else self.strength
            new = h + ((target - proj)[..., None] * u).to(h.dtype)
        return _where(mask, new, h)


def _swap_partner(a: Tensor, toward) -> Tensor:
    """The unit direction b of a swap, refused where it cannot define a plane with a (zero, or parallel)."""
    b = torch.as_tensor(toward).detach().float()
    if b.shape != a.shape:
        raise SteerError(f"swap: the second direction has shape {tuple(b.shape)}, expected {tuple(a.shape)}")
    if not torch.isfinite(b).all() or float(b.norm()) == 0:
        raise SteerError("swap: the second direction must be finite and non-zero")
    b = b / b.norm()
    if abs(float(a @ b)) > 0.999:
        raise SteerError(f"swap: the two directions are parallel (cosine {float(a @ b):.4f}); nothing to exchange")
    return b


Intervention = "FeatureEdit | VectorEdit"


def _vector_init(init):
    """VectorEdit(..., scale=s) / VectorEdit(..., value=c): the old keywords of `strength` for "add" and for
    "clamp_projection"; the one an op does not read is ignored, as it always was."""

    @functools.wraps(init)
    def __init__(self, *args, scale=None, value=None, **kw):
        if scale is not None or value is not None:
            op = args[2] if len(args) > 2 else kw.get("op", "add")
            read = "scale" if op == "add" else "value" if op == "clamp_projection" else None
            old = {"scale": scale, "value": value}
            for name in old:
                if name != read and old[name] is not None:
                    warn_renamed(name, "strength", "VectorEdit")
            if read is not None and old[read] is not None:
                given = kw.get("strength", args[3] if len(args) > 3 else None)
                kw["strength"] = strength_from(given, {read: old[read]}, "VectorEdit")
        init(self, *args, **kw)

    return __init__


renamed_strength(FeatureEdit)
VectorEdit.__init__ = _vector_init(VectorEdit.__init__)
alias(
    VectorEdit,
    "scale",
    lambda e: e.strength if e.op == "add" else 1.0,
    lambda e, v: setattr(e, "strength", v) if e.op == "add" else None,
)
alias(
    VectorEdit,
    "value",
    lambda e: e.strength if e.op == "clamp_projection" else 0.0,
    lambda e, v: setattr(e, "strength", v) if e.op == "clamp_projection" else None,
)


# --------------------------------------------------------------------------- applying them


def validate(lm: LoadedModel, interventions: Sequence) -> None:
    """Check every intervention against the model (site exists, sizes match) before anything runs."""
    for iv in interventions:
        if not isinstance(iv, (FeatureEdit, VectorEdit)):
            raise SteerError(f"not an intervention: {iv!r} (expected FeatureEdit or VectorEdit)")
        try:
            lm.check_site(iv.site)
        except ValueError as e:
            raise SteerError(str(e)) from None
        if isinstance(iv, FeatureEdit):
            d = int(iv.sae.W_dec.shape[1])
            if d != lm.d_model:
                raise SteerError(f"SAE for feature {iv.feature} has d_model={d} but {lm.name} has d_model={lm.d_model}")
        else:
            if iv.vector.shape[0] != lm.d_model:
                raise SteerError(
                    f"steering vector {iv.label or ''} has dimension {iv.vector.shape[0]} but "
                    f"{lm.name} has d_model={lm.d_model} at {iv.site}".replace("  ", " ")
                )


def _plan(interventions: Sequence) -> dict[str, list]:
    """Group by site; merge consecutive feature edits on one SAE into one group."""
    plan: dict[str, list] = {}
    for iv in interventions:
        steps = plan.setdefault(iv.site, [])
        if isinstance(iv, FeatureEdit):
            if steps and isinstance(steps[-1], list) and steps[-1][0].sae is iv.sae:
                steps[-1].append(iv)
            else:
                steps.append([iv])
        else:
            steps.append(iv)
    return {site: [(_FeatureGroup(s) if isinstance(s, list) else s) for s in steps] for site, steps in plan.items()}


class Steerer:
    """Holds interventions and installs one edit hook per site while active.

    The generation loop updates `ctx.offset` / `ctx.prompt_len` before each forward pass.
    """

    def __init__(self, lm: LoadedModel, interventions: Sequence = ()):
        interventions = list(interventions)
        validate(lm, interventions)
        for iv in interventions:
            if isinstance(iv, VectorEdit):
                iv.to(lm.device)
            elif isinstance(iv, FeatureEdit) and iv.sae.W_dec.device != lm.device:
                iv.sae.to(lm.device)  # an SAE loaded on the CPU beside a model on a GPU
        self.lm = lm
        self.interventions = interventions
        self.ctx = StepContext()
        self._plan = _plan(interventions)

    def _hook(self, steps):
        ctx = self.ctx

        def fn(h: Tensor) -> Tensor:
            for step in steps:
                h = step.apply(h, ctx)
            return h

        return fn

    @contextmanager
    def active(self, *, prompt_len: int | None = None, offset: int = 0) -> Iterator[Steerer]:
        self.ctx.prompt_len, self.ctx.offset = prompt_len, offset
        with ExitStack() as stack:
            for site, steps in self._plan.items():
                stack.enter_context(edit(self.lm, site, self._hook(steps)))
            yield self


@contextmanager
def steering(lm: LoadedModel, interventions: Sequence, *, prompt_len: int | None = None) -> Iterator[Steerer]:
    """`with steering(lm, [clamp(...), add(...)]): lm.model(ids)` — every forward pass inside is steered."""
    st = Steerer(lm, interventions)
    with st.active(prompt_len=prompt_len):
        yield st


# --------------------------------------------------------------------------- short constructors


def _strength(strength, kw: dict, old: str, where: str, default=None):
    """The strength of a short constructor, given positionally, as strength= or under its old keyword."""
    s = strength_from(strength, {old: kw.pop(old, None)}, where, stacklevel=5)
    if s is None and default is None:
        raise SteerError(f"{where}: give a strength")
    return default if s is None else s


def clamp(sae, feature: int, strength: float | None = None, **kw) -> FeatureEdit:
    """Set the feature to `strength` (activation units, or × its max with unit="max")."""
    return FeatureEdit(sae, feature, "clamp", _strength(strength, kw, "value", "clamp"), **kw)


def add_feature(sae, feature: int, strength: float | None = None, **kw) -> FeatureEdit:
    """Add `strength` to the feature (activation units, or × its max with unit="max")."""
    return FeatureEdit(sae, feature, "add", _strength(strength, kw, "value", "add_feature"), **kw)


def scale_feature(sae, feature: int, strength: float | None = None, **kw) -> FeatureEdit:
    """Multiply the feature by `strength`."""
    return FeatureEdit(sae, feature, "scale", _strength(strength, kw, "factor", "scale_feature"), **kw)


def ablate(sae, feature: int, **kw) -> FeatureEdit:
    return FeatureEdit(sae, feature, "ablate", 0.0, **kw)


def add_vector(vector: Tensor, site: str, strength: float | None = None, **kw) -> VectorEdit:
    """h + strength · vector (strength 1 by default)."""
    return VectorEdit(vector, site, "add", _strength(strength, kw, "scale", "add_vector", 1.0), **kw)


def project_out(direction: Tensor, site: str, **kw) -> VectorEdit:
    return VectorEdit(direction, site, "project_out", **kw)


def swap(direction: Tensor, toward: Tensor, site: str, strength: float = 1.0, **kw) -> VectorEdit:
    """Exchange h's components along two directions (strength 1: fully), the rest of h unchanged."""
    return VectorEdit(direction, site, "swap", strength, toward=toward, **kw)


def clamp_projection(direction: Tensor, site: str, strength: float | None = None, **kw) -> VectorEdit:
    """Set h's component along the unit direction to `strength`."""
    return VectorEdit(direction, site, "clamp_projection", _strength(strength, kw, "value", "clamp_projection"), **kw)
