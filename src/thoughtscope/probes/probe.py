"""The probe artefact: a direction and bias that read one concept at one site of one model.

Saved as a folder (config.json + probe.safetensors) like every thoughtscope artefact. It records what it was
fitted on (model, site, read position, dataset sha256, seed, fitter, held-out metrics) and refuses to score
activations of another model or site. `to_vector()` turns it into a steering vector in class-gap units.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from .._io import atomic_save_tensors, atomic_write_text, read_json
from ..errors import ProbeError
from ..values import fits_float as _is_num
from ..values import is_finite as _finite_number
from ..values import is_int as _is_int

FORMAT = "thoughtscope-probe-1"
CONFIG = "config.json"
WEIGHTS = "probe.safetensors"


_PROBE_RULES = (  # field, check, what was expected (model, site and d_model are checked first)
    ("fitter", lambda v: isinstance(v, str), "a fitter name"),
    ("read", lambda v: isinstance(v, str), "last, mean or span"),
    ("chat", lambda v: isinstance(v, bool), "true or false"),
    ("dataset", lambda v: isinstance(v, str), "a dataset name"),
    ("dataset_sha256", lambda v: isinstance(v, str), "a hex digest"),
    ("seed", _is_int, "an integer"),
    ("class_gap", lambda v: _finite_number(v), "a finite number"),
    ("sink_rule", lambda v: isinstance(v, str), "text"),
    (
        "metrics",
        lambda v: isinstance(v, dict) and ("test_auroc" not in v or _is_num(v["test_auroc"])),
        "an object (test_auroc a number)",
    ),
    ("threshold_note", lambda v: isinstance(v, str), "text"),
)


@dataclass
class ProbeConfig:
    model: str
    """Name of the model it was fitted on; it refuses any other."""
    site: str
    """Site it reads, e.g. resid.12; it refuses any other."""
    d_model: int
    """Width of the activations it reads (numbers per token)."""
    fitter: str = "mean"
    """How the direction was fitted: mean, lda, logistic, lat or ccs."""
    read: str = "last"
    """Which token of a text was read: last, mean (over its tokens) or span."""
    chat: bool = False
    """True: each text was the user turn of the model's chat template."""
    dataset: str = ""
    """Name of the dataset it was fitted on."""
    dataset_sha256: str = ""
    """SHA-256 of that dataset's content (hex)."""
    seed: int = 0
    """Seed of the group split and of the fitter."""
    class_gap: float = 1.0
    """(mean of class 1 − mean of class 0) projected on the unit direction (activation units): one steering unit."""
    sink_rule: str = "position 0 and tokens above 10x the median norm are never read"
    """Which tokens were never read (a record, in words)."""
    metrics: dict = field(default_factory=dict)
    """Held-out figures: train/test AUROC (0-1), its 95% CI, n_train / n_test rows, C for logistic."""
    threshold_note: str = "balanced-accuracy threshold on the training split"
    """How the class threshold was chosen (a record, in words)."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not isinstance(self.site, str) or not self.model or not self.site:
            raise ProbeError("a probe needs the model name and the site it reads (text)")
        if isinstance(self.d_model, bool) or not isinstance(self.d_model, int) or self.d_model <= 0:
            raise ProbeError(f"d_model must be a positive integer, got {self.d_model!r}")
        for name, ok, expected in _PROBE_RULES:
            if not ok(getattr(self, name)):
                raise ProbeError(f"ProbeConfig.{name}={getattr(self, name)!r:.80}: expected {expected}")


class Probe:
    """score(x) = x · weight + bias; class 1 above `threshold`."""

    def __init__(self, weight: torch.Tensor, bias: float, threshold: float, cfg: ProbeConfig):
        weight = torch.as_tensor(weight).detach().float().cpu()
        if weight.shape != (cfg.d_model,):
            raise ProbeError(f"probe weight has shape {tuple(weight.shape)}, expected ({cfg.d_model},)")
        if not torch.isfinite(weight).all() or float(weight.norm()) == 0:
            raise ProbeError("probe weight must be finite and non-zero")
        self.weight, self.bias, self.threshold, self.cfg = weight, float(bias), float(threshold), cfg

    @property
    def direction(self) -> torch.Tensor:
        return self.weight / self.weight.norm()

    def check(self, lm, site: str | None = None) -> None:
        """Refuse another model or site: a probe's direction means nothing elsewhere."""
        if lm.name != self.cfg.model or lm.d_model != self.cfg.d_model:
            raise ProbeError(
                f"probe was fitted on {self.cfg.model} (d_model {self.cfg.d_model}) but is applied to "
                f"{lm.name} (d_model {lm.d_model}); fit a probe for this model"
            )
        if site is not None and str(site) != self.cfg.site:
            raise ProbeError(f"probe reads {self.cfg.site} but was applied at {site}; use a probe fitted there")

    def score(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.cfg.d_model:
            raise ProbeError(f"activations have size {x.shape[-1]}, this probe reads {self.cfg.d_model}")
        return x.float() @ self.weight.to(x.device) + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return (self.score(x) > self.threshold).long()

    def to_vector(self):
        """A SteeringVector along the unit direction scaled to one class gap: strength 1 moves a class-0 mean to
        the class-1 mean along the probe (Marks & Tegmark's causal test); strength −1 the other way."""
        from ..steer.vectors import SteeringVector

        return SteeringVector(
            self.direction * self.cfg.class_gap,
            self.cfg.site,
            f"probe-{self.cfg.fitter}",
            self.cfg.model,
            0,
            None,
            {"probe_dataset": self.cfg.dataset, "unit": "class gap"},
        )

    def to_intervention(self, strength: float = 1.0, positions: str = "all", *, scale: float | None = None):
        """Add `strength` class gaps along the probe at its site (`scale` is strength's old name, deprecated)."""
        from ..steer.interventions import add_vector

        if scale is not None:
            warnings.warn(
                "Probe.to_intervention: 'scale' is now 'strength' (the old name still works for now)",
                DeprecationWarning,
                stacklevel=2,
            )
            strength = scale
        return add_vector(
            self.to_vector().vector, self.cfg.site, strength, positions=positions, label=f"probe {self.cfg.dataset}"
        )

    # -- artefact

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        cfg = asdict(self.cfg) | {"format": FORMAT, "bias": self.bias, "threshold": self.threshold}
        atomic_save_tensors({"weight": self.weight, "direction": self.direction}, folder / WEIGHTS)
        atomic_write_text(folder / CONFIG, json.dumps(cfg, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path, lm=None, site: str | None = None) -> Probe:
        """Load a probe folder; with lm (and site) it refuses a mismatched model or site.

        Every fault of the folder (bad JSON, a missing or mistyped field, an unreadable or mis-shaped weight) is a
        ProbeError naming the file."""
        folder = Path(folder)
        cf, wf = folder / CONFIG, folder / WEIGHTS
        if not cf.is_file() or not wf.is_file():
            raise ProbeError(
                f"{folder} is not a probe folder: expected {CONFIG} and {WEIGHTS} (written by `thoughtscope probe fit`)"
            )
        raw = read_json(cf, ProbeError)
        if raw.pop("format", None) != FORMAT:
            raise ProbeError(f"{cf}: not a thoughtscope probe (format should be {FORMAT})")
        for key in ("bias", "threshold"):
            if not _finite_number(raw.get(key)):
                raise ProbeError(f"{cf}: {key!r} is {raw.get(key)!r}, expected a finite number")
        bias, threshold = raw.pop("bias"), raw.pop("threshold")
        known = {f.name for f in fields(ProbeConfig)}  # a newer writer's extra fields are left out
        try:
            cfg = ProbeConfig(**{k: v for k, v in raw.items() if k in known})
        except (ProbeError, TypeError) as e:  # TypeError: a required field missing
            raise ProbeError(f"{cf}: {e}") from None
        weight = _read_weight(wf)
        try:
            probe = cls(weight, bias, threshold, cfg)
        except ProbeError as e:
            raise ProbeError(f"{wf}: {e}") from None
        if lm is not None:
            probe.check(lm, site)
        return probe

    def __repr__(self) -> str:
        m = self.cfg.metrics
        extra = f", test AUROC {m['test_auroc']:.3f}" if "test_auroc" in m else ""
        return f"Probe({self.cfg.fitter} on {self.cfg.dataset!r} at {self.cfg.model} {self.cfg.site}{extra})"


def _read_weight(path: Path) -> torch.Tensor:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        t = load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError, OverflowError) as e:
        raise ProbeError(f"{path}: not a readable safetensors file ({e})") from None
    w = t.get("weight")
    if w is None:
        raise ProbeError(f"{path} lacks the tensor 'weight' (has {sorted(t)})")
    if not w.is_floating_point():
        raise ProbeError(f"{path}: 'weight' has dtype {w.dtype}, expected floating point")
    return w


def load_probe(folder: str | Path, lm=None, site: str | None = None) -> Probe:
    return Probe.load(folder, lm, site)


def fit_probe(
    lm,
    ds,
    site: str,
    fitter: str = "mean",
    read=None,
    *,
    seed: int = 0,
    test_fraction: float = 0.25,
    cache=None,
    progress: bool = False,
) -> Probe:
    """Fit on the group-disjoint training split and record held-out AUROC (with CI) in the artefact."""
    from .datasets import group_folds, group_split
    from .fitters import fit
    from .metrics import auroc, best_threshold, bootstrap_auroc
    from .read import ReadConfig, read_activations, site_names

    read = read or ReadConfig()
    (name,) = site_names(lm, [site])
    split = group_split(ds, test_fraction, seed)
    X = read_activations(lm, ds, [name], read, cache=cache, progress=progress)[name]
    y = ds.y
    tr, te = torch.tensor(split.train), torch.tensor(split.test)
    pos = {r: k for k, r in enumerate(split.train)}
    kw: dict = {"seed": seed}
    if fitter in ("lat", "ccs"):
        kw["pairs"] = [(pos[a], pos[b]) for a, b in ds.pairs(split.train)]
    if fitter == "logistic":
        kw["folds"] = [
            ([pos[i] for i in a], [pos[i] for i in b]) for a, b in group_folds(ds.groups, split.train, 4, seed)
        ]
    W, b, info = fit(fitter, X[tr][None], y[tr], **kw)
    s_tr = X[tr] @ W[0] + b[0]
    s_te = X[te] @ W[0] + b[0]
    thr = float(best_threshold(s_tr[None], y[tr])[0])
    lo, hi = bootstrap_auroc(s_te[None], y[te], 200, seed)
    d = W[0] / W[0].norm()
    gap = float((X[tr][y[tr] == 1].mean(0) - X[tr][y[tr] == 0].mean(0)) @ d)
    metrics = {
        "train_auroc": float(auroc(s_tr, y[tr])),
        "test_auroc": float(auroc(s_te, y[te])),
        "test_auroc_ci": [float(lo[0]), float(hi[0])],
        "n_train": len(split.train),
        "n_test": len(split.test),
        **({"C": info["C"][0]} if "C" in info else {}),
    }
    cfg = ProbeConfig(
        model=lm.name,
        site=name,
        d_model=lm.d_model,
        fitter=fitter,
        read=read.read,
        chat=read.chat,
        dataset=ds.name,
        dataset_sha256=ds.sha256,
        seed=seed,
        class_gap=gap,
        metrics=metrics,
    )
    return Probe(W[0], float(b[0]), thr, cfg)
