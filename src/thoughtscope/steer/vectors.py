"""Steering vectors from contrastive prompt pairs, and the typical residual norm used as their unit.

Two methods on the site's activation at the last token of each prompt:
- "mean": mean of (positive − negative) over the pairs (CAA, Rimsky et al.); keeps its natural size,
  so strength 1 adds exactly the average difference;
- "pca": first principal component of the paired differences, centred over pairs as repeng's
  `pca_diff` does (sklearn's PCA centres), unit length, sign chosen so that positives project above their
  negatives in most pairs (repeng's rule).
A vector is saved as one safetensors file: tensor "vector" [d_model] plus string metadata (site, model,
method, n_pairs, typical_norm).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._io import atomic_save_tensors
from ..models import LoadedModel, Site, capture
from .interventions import SteerError
from .renamed import renamed_keyword

METHODS = ("mean", "pca")


@dataclass
class SteeringVector:
    vector: torch.Tensor
    site: str
    method: str = "mean"
    model: str = ""
    n_pairs: int = 0
    typical_norm: float | None = None  # median residual norm at the site (the unit "norm" of vector strengths)
    extra: dict = field(default_factory=dict)

    def summary(self) -> str:
        """One line for a terminal: site, method, norm (and in × the site's typical residual norm), shape, pairs."""
        norm = float(self.vector.float().norm())
        rel = f" ({norm / self.typical_norm:.3g} × the median residual norm there)" if self.typical_norm else ""
        return (
            f"{self.site}, method {self.method}, norm {norm:.4g}{rel}, shape {tuple(self.vector.shape)}, "
            f"from {self.n_pairs} pairs"
        )

    def save(self, path: str | Path) -> Path:

        path = Path(path)
        if path.suffix != ".safetensors":
            raise SteerError(f"steering vectors are saved as .safetensors files, got {path}")
        meta = {
            "site": self.site,
            "method": self.method,
            "model": self.model,
            "n_pairs": str(self.n_pairs),
            "typical_norm": "" if self.typical_norm is None else repr(float(self.typical_norm)),
            "extra": json.dumps(self.extra),
            "format": "thoughtscope-steering-vector-1",
        }
        return atomic_save_tensors({"vector": self.vector.float()}, path, metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> SteeringVector:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise SteerError(f"steering vector file not found: {path} (expected a .safetensors file from `vector fit`)")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if "vector" not in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    raise SteerError(f"{path}: no tensor named 'vector' (keys: {', '.join(f.keys())})")
                v = f.get_tensor("vector")
        except SteerError:
            raise
        except Exception as e:  # safetensors raises its own error types on a corrupt header
            raise SteerError(f"{path}: not a readable safetensors file ({e})") from e
        if v.dim() != 1 or v.numel() == 0 or not v.is_floating_point():
            raise SteerError(
                f"{path}: tensor 'vector' has shape {tuple(v.shape)} and dtype {v.dtype}; expected a non-empty "
                "1-D floating-point vector [d_model]"
            )
        v = v.float()
        if not bool(torch.isfinite(v).all()):  # float64 values past float32's range count too
            raise SteerError(
                f"{path}: tensor 'vector' holds NaN or Inf values (as float32); refit it with `vector fit`"
            )
        return cls(v, *_read_metadata(meta, path))


def _read_metadata(meta: dict[str, str], path: Path) -> tuple:
    """(site, method, model, n_pairs, typical_norm, extra) from a vector file's string metadata; SteerError naming
    the file and the field when one cannot be what `save` writes."""

    def bad(key: str, expected: str):
        value = meta.get(key, "")
        shown = value if len(value) <= 40 else value[:37] + "..."
        return SteerError(f"{path}: metadata {key!r} is {shown!r}; expected {expected}")

    site = meta.get("site", "")
    if site:
        try:
            site = str(Site.parse(site))
        except ValueError:
            raise bad("site", "a site such as 'resid.15'") from None
    try:
        n_pairs = int(meta.get("n_pairs", "0") or 0)
    except ValueError:
        raise bad("n_pairs", "a whole number") from None
    if n_pairs < 0:
        raise bad("n_pairs", "a whole number >= 0")
    tn = meta.get("typical_norm") or None
    if tn is not None:
        try:
            tn = float(tn)
        except ValueError:
            raise bad("typical_norm", "a number or nothing") from None
        if not math.isfinite(tn) or tn <= 0:
            raise bad("typical_norm", "a finite number > 0 or nothing")
    try:
        extra = json.loads(meta.get("extra", "{}") or "{}")
    except (ValueError, RecursionError):
        raise bad("extra", "a JSON object") from None
    if not isinstance(extra, dict):
        raise bad("extra", "a JSON object")
    return site, meta.get("method", "mean"), meta.get("model", ""), n_pairs, tn, extra


def last_token_acts(
    lm: LoadedModel,
    site: str | Site,
    texts: Sequence[str],
    *,
    texts_per_batch: int | None = None,
    add_bos: bool = True,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Activation at the site for the last real token of each text, [N, d] float32. `texts_per_batch`: texts
    per forward pass (default 16; `batch_size` is its old name)."""
    n = renamed_keyword(
        texts_per_batch, batch_size, new="texts_per_batch", old="batch_size", where="last_token_acts", default=16
    )
    site = lm.check_site(site)
    out = []
    for i in range(0, len(texts), n):
        chunk = list(texts[i : i + n])
        ids, mask = lm.tokenize(chunk, add_bos=add_bos)
        acts = capture(lm, site, ids, mask)[site].float()
        last = mask.sum(1) - 1
        out.append(acts[torch.arange(len(chunk), device=acts.device), last].cpu())
    return torch.cat(out)


def pca_of_differences(diffs: torch.Tensor, *, center: bool = True) -> torch.Tensor:
    """Unit first principal direction of the rows (centred first, as sklearn's PCA does)."""
    x = diffs.double()
    if center:
        x = x - x.mean(0, keepdim=True)
    # The top right-singular vector; for n << d an SVD of the n×d matrix is the cheap way.
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    return vh[0].float()


def fit_vector(
    lm: LoadedModel,
    site: str | Site,
    pairs: Sequence[tuple[str, str]],
    *,
    method: str = "mean",
    texts_per_batch: int | None = None,
    typical_norm: bool = True,
    add_bos: bool = True,
    batch_size: int | None = None,
) -> SteeringVector:
    """Fit a steering vector at a site from (positive, negative) prompt pairs (last-token activations).
    `texts_per_batch`: texts per forward pass (default 16; `batch_size` is its old name)."""
    n = renamed_keyword(
        texts_per_batch, batch_size, new="texts_per_batch", old="batch_size", where="fit_vector", default=16
    )
    if method not in METHODS:
        raise SteerError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    pairs = [tuple(p) for p in pairs]
    if len(pairs) < (2 if method == "pca" else 1) or any(len(p) != 2 for p in pairs):
        raise SteerError(
            f"need {'at least 2' if method == 'pca' else 'at least 1'} (positive, negative) pairs, got {len(pairs)}"
        )
    site = lm.check_site(site)
    texts = [t for p in pairs for t in p]
    h = last_token_acts(lm, site, texts, texts_per_batch=n, add_bos=add_bos)
    pos, neg = h[0::2], h[1::2]
    diffs = pos - neg
    if method == "mean":
        v = diffs.mean(0)
    else:
        v = pca_of_differences(diffs)
        proj_pos, proj_neg = pos @ v, neg @ v
        if (proj_pos < proj_neg).float().mean() > (proj_pos > proj_neg).float().mean():
            v = -v
    tn = site_norm(lm, site) if typical_norm else None
    return SteeringVector(v, str(site), method, lm.name, len(pairs), tn)


def site_norm(lm: LoadedModel, site: str | Site, texts: Sequence[str] | None = None) -> float:
    """Median L2 norm of the residual at the site over ordinary text, position 0 excluded (attention sink).

    This is the unit of "relative" vector strengths (unit "norm"): 0.5 adds half a typical activation's length.
    """
    from .calibrate import NEUTRAL_PROMPTS

    site = lm.check_site(site)
    texts = list(texts or NEUTRAL_PROMPTS)
    ids, mask = lm.tokenize(texts)
    acts = capture(lm, site, ids, mask)[site].float()
    keep = mask.bool().clone()
    keep[:, 0] = False
    return float(acts[keep].norm(dim=-1).median())


def lens_vector(lm: LoadedModel, token: str, layer: int, lens=None) -> SteeringVector:
    """The direction the logit lens (or a Jacobian lens) reads as `token` at resid.`layer`, as a unit steering
    vector (`causal.lens.token_direction`): add it to steer toward the token, project it out to remove it."""
    from ..causal.lens import token_direction

    site = f"resid.{layer}"
    kind = "jacobian" if lens is not None else "logit"
    d = token_direction(lm, token, layer, lens)
    return SteeringVector(d, site, f"lens:{kind}", lm.name, 0, site_norm(lm, site), {"token": token})


def lens_swap(lm: LoadedModel, token: str, toward: str, layer: int, lens=None, strength: float = 1.0):
    """A swap edit at resid.`layer` between the directions the lens reads as `token` and as `toward`: what that
    layer says about one token it now says about the other, the rest of the residual unchanged (VectorEdit "swap")."""
    from ..causal.lens import token_direction
    from .interventions import VectorEdit

    a, b = token_direction(lm, token, layer, lens), token_direction(lm, toward, layer, lens)
    return VectorEdit(a, f"resid.{layer}", "swap", strength, toward=b, label=f"{token} ⇄ {toward}")
