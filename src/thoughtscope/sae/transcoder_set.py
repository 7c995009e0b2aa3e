"""transcoder_set: one per-layer transcoder per block of a model (block L: mlp_in.L -> mlp_out.L), as one artefact.

An attribution graph needs every block's MLP replaced, so the transcoders travel together: one folder holding a
JSON manifest (format version, the model's recorded source, each layer's SAEConfig, how the weights are stored,
their sizes) and one safetensors file. Storage ``int8`` keeps the shipped set small: the three matrices (encoder
rows ``enc``, ``W_dec``, ``W_skip``) are quantised row by row, symmetric around 0 with the row's largest magnitude
at 127 (one float32 scale per row); biases and thresholds stay float32, and loading turns everything back into
float32. ``quantization_report`` measures what that costs on given activations.

Other tools' sets are read from a local folder (never fetched): circuit-tracer's (``config.yaml`` with
``model_kind: transcoder_set``, ``feature_input_hook`` / ``feature_output_hook`` and ``layer_<i>.safetensors`` or a
``transcoders:`` list of local files) and Gemma Scope's (``params.npz`` per layer, Gemma Scope 2's safetensors).
They become our JumpReLU transcoders with ``b_in = 0`` and the same outputs: circuit-tracer's JumpReLU is
``pre * (pre > threshold)``, ours too (it stores the log of the threshold; a ReLU transcoder gets threshold 0).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .._io import atomic_dir, atomic_save_tensors, atomic_write_json, read_json
from ..errors import SAEError
from .base import SAE
from .config import SAEConfig
from .formats import _read_safetensors
from .registry import sae_class
from .transcoder import TranscoderMixin

if TYPE_CHECKING:
    from ..models import LoadedModel

FORMAT = "thoughtscope-transcoder-set"
VERSION = 1
MANIFEST_FILE = "transcoder_set.json"
WEIGHTS_FILE = "transcoders.safetensors"
QUANTIZE_MODES = ("int8", "float16", "none")
MATRICES = ("enc", "W_dec", "W_skip")  # quantised row by row under int8
VECTORS = ("b_enc", "b_dec", "b_in", "log_threshold")  # always float32
TRANSCODER_ARCHES = ("transcoder", "jumprelu-transcoder")

# circuit-tracer's hook names (TransformerLens spelling) for the sites our transcoders read and write
INPUT_HOOKS = ("mlp.hook_in", "ln2.hook_normalized")  # what the MLP reads, after its norm: our mlp_in.L
OUTPUT_HOOKS = ("hook_mlp_out", "mlp.hook_out")  # what the MLP writes: our mlp_out.L
LAYOUTS = (
    f"thoughtscope: {MANIFEST_FILE} + {WEIGHTS_FILE}",
    "circuit-tracer: config.yaml (model_kind: transcoder_set, feature_input_hook, feature_output_hook) with "
    "layer_<i>.safetensors (W_enc, W_dec, b_enc, b_dec, optional W_skip and activation_function.threshold) or a "
    "'transcoders:' list of local files",
    "Gemma Scope: layer_<i>/params.npz (one under each layer_<i>/ folder) or layer_<i>.npz with W_enc, W_dec, b_enc, "
    "b_dec, threshold",
)


# ----------------------------------------------------------------------------- the set
class TranscoderSet:
    """The per-layer transcoders of one model, index = layer; each float32 and in eval mode."""

    def __init__(self, transcoders: Sequence[SAE], *, model: dict | None = None, source: str = ""):
        tcs = list(transcoders)
        if not tcs:
            raise SAEError("a transcoder set needs at least one transcoder (one per block)")
        for i, tc in enumerate(tcs):
            if not isinstance(tc, TranscoderMixin):
                raise SAEError(f"layer {i}: a {type(tc).__name__} ({tc.cfg.arch}) is not a transcoder")
            _check_layer_sites(tc.cfg, i)
        widths = {tc.cfg.d_model for tc in tcs}
        if len(widths) > 1:
            raise SAEError(f"the transcoders read different widths {sorted(widths)}; one set serves one model")
        self.transcoders: list[SAE] = [tc.float().eval() for tc in tcs]
        self.model: dict = dict(model if model is not None else (tcs[0].cfg.model_source or {}))
        self.source = str(source)

    @property
    def n_layers(self) -> int:
        return len(self.transcoders)

    @property
    def d_model(self) -> int:
        return int(self.transcoders[0].cfg.d_model)

    def __getitem__(self, layer: int) -> SAE:
        return self.transcoders[layer]

    def __len__(self) -> int:
        return len(self.transcoders)

    def __iter__(self) -> Iterator[SAE]:
        return iter(self.transcoders)

    def __repr__(self) -> str:
        return f"TranscoderSet({self.n_layers} layers, d_model={self.d_model}, from {self.source or 'memory'})"

    @property
    def label(self) -> str:
        name = self.transcoders[0].cfg.model or self.model.get("spec") or "an unnamed model"
        return (
            f"the transcoder set {self.source or '(in memory)'} ({self.n_layers} layers, d_model {self.d_model}, "
            f"for {name})"
        )

    def check_fits(self, lm: LoadedModel) -> None:
        """SAEError naming both sides unless the set has one transcoder per block of lm, of its width, for it."""
        from ..sites import POST_MLP_NORMS
        from .pretrained import same_model

        if self.d_model != lm.d_model or self.n_layers != lm.n_layers:
            raise SAEError(
                f"{self.label} does not fit {lm.name} ({lm.n_layers} layers, d_model {lm.d_model}): a set needs one "
                f"transcoder per block, of the model's width"
            )
        name = self.transcoders[0].cfg.model
        if name and not same_model(name, lm):
            raise SAEError(f"{self.label} was trained on {name!r}, not on {lm.name!r}; load {name!r} (--model)")
        hook = (self.transcoders[0].cfg.extra or {}).get("output_hook")
        if hook == "mlp.hook_out" and any(hasattr(lm.layers[0], n) for n in POST_MLP_NORMS):
            raise SAEError(
                f"{self.label} writes mlp.hook_out, the MLP's output before {lm.name}'s post-MLP norm, while "
                "mlp_out is after it; a set for this model writes hook_mlp_out"
            )


def _check_layer_sites(cfg: SAEConfig, layer: int) -> None:
    want = (f"mlp_in.{layer}", f"mlp_out.{layer}")
    if (cfg.site or want[0], cfg.target_site or want[1]) != want:
        raise SAEError(
            f"layer {layer}'s transcoder reads {cfg.site or '?'} and writes {cfg.target_site or '?'}; in a set, "
            f"layer {layer} reads {want[0]} and writes {want[1]}"
        )


# ----------------------------------------------------------------------------- storage
def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """int8 values and float32 per-row scales with w ~= q * scale[:, None]: symmetric, the row's absmax at 127."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    q = torch.round(w / torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)).clamp_(-127, 127)
    return q.to(torch.int8), scale


def dequantize_rows(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale.float().unsqueeze(1)


def _named_tensors(tc: SAE) -> dict[str, Tensor]:
    """The inference tensors of one transcoder by their stored names (the JumpReLU threshold as its log)."""
    out = {"enc": tc.enc, "W_dec": tc.W_dec, "b_enc": tc.b_enc, "b_dec": tc.b_dec, "b_in": tc.b_in}
    if tc.W_skip is not None:
        out["W_skip"] = tc.W_skip
    if hasattr(tc, "log_threshold"):
        out["log_threshold"] = tc.log_threshold
    return {k: v.detach().float().cpu() for k, v in out.items()}


def _stored(tensors: dict[str, Tensor], prefix: str, quantize: str) -> dict[str, Tensor]:
    out = {}
    for name, t in tensors.items():
        if name in MATRICES and quantize == "int8":
            out[f"{prefix}{name}.q"], out[f"{prefix}{name}.scale"] = quantize_rows(t)
        elif name in MATRICES and quantize == "float16":
            out[f"{prefix}{name}"] = t.to(torch.float16)
        else:
            out[f"{prefix}{name}"] = t.contiguous()
    return out


def bytes_per_layer(
    d_model: int, n_features: int, *, skip: bool = True, jumprelu: bool = True, quantize: str = "int8"
) -> int:
    """Bytes of one layer's tensors in a saved set (the safetensors header, a few hundred bytes, aside)."""
    _check_mode(quantize)
    d, m = d_model, n_features
    rows = [(m, d), (m, d)] + ([(d, d)] if skip else [])
    per_value = {"int8": 1, "float16": 2, "none": 4}[quantize]
    matrices = sum(r * c * per_value + (4 * r if quantize == "int8" else 0) for r, c in rows)
    return matrices + 4 * (m + d + d + (m if jumprelu else 0))


def _check_mode(quantize: str) -> None:
    if quantize not in QUANTIZE_MODES:
        raise SAEError(f"quantize={quantize!r}: expected one of {', '.join(QUANTIZE_MODES)}")


def save_transcoder_set(ts: TranscoderSet, folder: str | Path, *, quantize: str = "int8") -> Path:
    """Write ts as one folder (manifest + one safetensors file), swapped in whole; returns the folder."""
    _check_mode(quantize)
    folder = Path(folder)
    tensors: dict[str, Tensor] = {}
    layers = []
    for i, tc in enumerate(ts.transcoders):
        if not tc.cfg.norm_folded:
            raise SAEError(f"layer {i}'s transcoder still expects normalised inputs; fold the normalisation first")
        stored = _stored(_named_tensors(tc), f"layer_{i}.", quantize)
        tensors.update(stored)
        nbytes = sum(t.numel() * t.element_size() for t in stored.values())
        layers.append({"layer": i, "config": tc.cfg.to_dict(), "bytes": nbytes})
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "model": ts.model,
        "n_layers": ts.n_layers,
        "d_model": ts.d_model,
        "quantize": quantize,
        "scale_dtype": "float32" if quantize == "int8" else None,
        "weights_file": WEIGHTS_FILE,
        "bytes": sum(layer["bytes"] for layer in layers),
        "layers": layers,
    }
    with atomic_dir(folder) as tmp:
        atomic_save_tensors(tensors, tmp / WEIGHTS_FILE, metadata={"format": FORMAT, "version": str(VERSION)})
        atomic_write_json(tmp / MANIFEST_FILE, manifest)
    return folder


def _load_ours(folder: Path) -> TranscoderSet:
    mf = folder / MANIFEST_FILE
    man = read_json(mf, SAEError)
    version = man.get("version")
    if man.get("format") != FORMAT or isinstance(version, bool) or not isinstance(version, int):
        raise SAEError(f"{mf}: not a transcoder set manifest (format {man.get('format')!r}, version {version!r})")
    if version > VERSION:
        raise SAEError(
            f"{mf} is version {version}, written by a newer thoughtscope; this one reads versions up to {VERSION}: "
            "upgrade thoughtscope"
        )
    quantize, layers = man.get("quantize"), man.get("layers")
    if quantize not in QUANTIZE_MODES or not isinstance(layers, list) or len(layers) != man.get("n_layers"):
        raise SAEError(
            f"{mf}: bad manifest (quantize {quantize!r}, {man.get('n_layers')!r} layers listed as "
            f"{type(layers).__name__}); expected one of {QUANTIZE_MODES} and one entry per layer"
        )
    tensors = _read_safetensors(folder / WEIGHTS_FILE)
    tcs = []
    for i, entry in enumerate(layers):
        cfg = _layer_config(entry, i, mf)
        tcs.append(_build(cfg, _layer_tensors(tensors, i, quantize, folder / WEIGHTS_FILE), where=f"{mf} layer {i}"))
    model = man.get("model") if isinstance(man.get("model"), dict) else {}
    return TranscoderSet(tcs, model=model, source=str(folder))


def _layer_config(entry: Any, i: int, mf: Path) -> SAEConfig:
    raw = entry.get("config") if isinstance(entry, dict) else None
    if not isinstance(raw, dict):
        raise SAEError(f"{mf}: layer {i} has no config object")
    try:
        cfg = SAEConfig.from_dict(raw)
    except (TypeError, SAEError) as e:
        raise SAEError(f"{mf}: layer {i}'s config: {e}") from None
    if cfg.arch not in TRANSCODER_ARCHES:
        raise SAEError(f"{mf}: layer {i} is arch {cfg.arch!r}; expected one of {', '.join(TRANSCODER_ARCHES)}")
    return cfg


def _layer_tensors(t: dict[str, Tensor], i: int, quantize: str, path: Path) -> dict[str, Tensor]:
    """Layer i's tensors as float32, dequantised."""
    pre = f"layer_{i}."
    out = {}
    for name in MATRICES + VECTORS:
        if quantize == "int8" and name in MATRICES and f"{pre}{name}.q" in t:
            if f"{pre}{name}.scale" not in t:
                raise SAEError(f"{path} lacks {pre}{name}.scale (the int8 scales of {pre}{name})")
            out[name] = dequantize_rows(t[f"{pre}{name}.q"], t[f"{pre}{name}.scale"])
        elif pre + name in t:
            out[name] = t[pre + name].float()
    if not out:
        raise SAEError(f"{path} holds no tensors of layer {i} (expected {pre}enc, {pre}W_dec, ...)")
    return out


def _build(cfg: SAEConfig, t: dict[str, Tensor], *, where: str) -> SAE:
    """A transcoder of cfg's class holding t (enc [m, d], W_dec, b_enc, b_dec, b_in, W_skip, log_threshold)."""
    tc = sae_class(cfg.arch)(cfg)
    want = _named_tensors(tc)
    missing = [k for k in want if k not in t]
    if missing:
        raise SAEError(f"{where}: lacks {', '.join(missing)} (arch {cfg.arch}, skip_connection={cfg.skip_connection})")
    for k, ref in want.items():
        if tuple(t[k].shape) != tuple(ref.shape):
            raise SAEError(f"{where}: {k} has shape {tuple(t[k].shape)}, expected {tuple(ref.shape)}")
        bad = t[k].isnan() | (t[k] == math.inf) if k == "log_threshold" else ~torch.isfinite(t[k])
        if bool(bad.any()):
            raise SAEError(f"{where}: {k} holds NaN or Inf values")
    params = dict(tc.named_parameters())
    with torch.no_grad():
        for k in want:
            params[k].copy_(t[k])
    tc.cfg.norm_folded = True
    return tc.float().eval()


def stored_copy(tc: SAE, quantize: str = "int8") -> SAE:
    """tc as it comes back from a set saved with `quantize` (the same code path, without the file)."""
    _check_mode(quantize)
    stored = _stored(_named_tensors(tc), "layer_0.", quantize)
    t = _layer_tensors(stored, 0, quantize, Path("(in memory)"))
    return _build(SAEConfig.from_dict(tc.cfg.to_dict()), t, where="(in memory)").to(tc.device)


def _rel(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| over every row (Frobenius)."""
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _fvu(y_hat: Tensor, y: Tensor) -> float:
    return float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum().clamp_min(1e-30))


@torch.no_grad()
def quantization_report(
    ts: TranscoderSet,
    x_by_layer: Mapping[int, Tensor] | Sequence[Tensor],
    *,
    y_by_layer: Mapping[int, Tensor] | Sequence[Tensor] | None = None,
    quantize: str = "int8",
) -> dict:
    """What storing ts as `quantize` does to each transcoder's output on the inputs x_by_layer[L] ([N, d] each).

    Per layer: rel_error = ||y_q - y|| / ||y|| over all rows (y from ts, y_q from the same weights stored and read
    back), max_row_rel_error the worst row, rel_error_decoder the part the decoder and skip alone make (ts's own
    code decoded by the stored weights), active_jaccard the share of (row, latent) pairs active in both codes among
    those active in either (the rest is the encoder moving a latent across its threshold or the top-k boundary);
    with y_by_layer (the true MLP outputs) also fvu and fvu_stored.
    """
    _check_mode(quantize)
    items = x_by_layer.items() if isinstance(x_by_layer, Mapping) else enumerate(x_by_layer)
    layers = {}
    for layer, x in items:
        tc = ts[int(layer)]
        tq = stored_copy(tc, quantize)
        x = x.to(tc.device, torch.float32).reshape(-1, tc.cfg.d_model)
        f, y = tc(x)
        fq, yq = tq(x)
        skip = tq.skip(x)
        y_dec = tq.decode(f) + (0 if skip is None else skip)
        a, b = f > 0, fq > 0
        union = float((a | b).sum())
        row = (yq - y).norm(dim=1) / y.norm(dim=1).clamp_min(1e-12)
        rec = {
            "rel_error": _rel(yq, y),
            "max_row_rel_error": float(row.max()),
            "rel_error_decoder": _rel(y_dec, y),
            "active_jaccard": float((a & b).sum()) / union if union else 1.0,
            "n_rows": int(x.shape[0]),
        }
        if y_by_layer is not None:
            target = y_by_layer[layer].to(tc.device, torch.float32).reshape(-1, tc.cfg.d_model)
            rec.update(fvu=_fvu(y, target), fvu_stored=_fvu(yq, target))
        layers[int(layer)] = rec
    errs = [v["rel_error"] for v in layers.values()]
    return {
        "quantize": quantize,
        "layers": layers,
        "max_rel_error": max(errs) if errs else None,
        "mean_rel_error": sum(errs) / len(errs) if errs else None,
        "bytes_per_layer": [
            bytes_per_layer(
                t.cfg.d_model,
                t.cfg.n_features,
                skip=t.W_skip is not None,
                jumprelu=hasattr(t, "log_threshold"),
                quantize=quantize,
            )
            for t in ts.transcoders
        ],
    }


# ----------------------------------------------------------------------------- other tools' sets
def default_transcoders_path() -> Path:
    """The transcoder set shipped for the default model (one per block), what "default" names."""
    from ..paths import asset

    return asset("default_transcoders")


def load_transcoder_set(folder: str | Path, *, lm: LoadedModel | None = None) -> TranscoderSet:
    """Our set, a circuit-tracer set or a Gemma Scope set from a local folder (the layout is detected), or
    "default", the set shipped for the default model; with lm, checked to fit it (check_fits) and moved to its
    device."""
    p = default_transcoders_path() if str(folder) == "default" else Path(folder)
    if not p.is_dir():
        if str(folder) == "default":
            raise SAEError(f"the default transcoder set is not installed at {p}; train one with `thoughtscope "
                           "transcoders train` and pass its folder")  # fmt: skip
        raise SAEError(f"transcoder set {p} is not a folder")
    if (p / MANIFEST_FILE).is_file():
        ts = _load_ours(p)
    elif (p / "config.yaml").is_file():
        ts = _load_circuit_tracer(p)
    else:
        ts = _load_gemma_scope(p)
    if lm is not None:
        ts.check_fits(lm)
        ts.transcoders = [tc.to(lm.device) for tc in ts.transcoders]
    return ts


def _unknown_layout(p: Path, why: str) -> SAEError:
    found = sorted(str(f.relative_to(p)) for f in p.rglob("*") if f.is_file())
    shown = ", ".join(found[:20]) + (f" and {len(found) - 20} more" if len(found) > 20 else "") or "no files"
    return SAEError(f"{p}: {why}; found {shown}; expected one of: " + "; ".join(LAYOUTS))


def _numbered(p: Path, pattern: str) -> dict[int, Path]:
    """Files or folders of p named like layer_<i><suffix>, by i (pattern holds one (\\d+) group)."""
    out = {}
    for f in p.iterdir():
        m = re.fullmatch(pattern, f.name)
        if m:
            out[int(m.group(1))] = f
    return out


def _contiguous(found: dict[int, Path], p: Path, name: str) -> list[Path]:
    """found's paths for layers 0..max, or SAEError naming the first missing layer's file."""
    n = max(found) + 1
    missing = [i for i in range(n) if i not in found]
    if missing:
        raise SAEError(
            f"{p}: the transcoder of layer {missing[0]} is missing ({name.format(missing[0])} not found); a set needs "
            f"one per layer 0..{n - 1}, found {len(found)}"
        )
    return [found[i] for i in range(n)]


def _load_circuit_tracer(p: Path) -> TranscoderSet:
    import yaml

    cf = p / "config.yaml"
    try:
        conf = yaml.safe_load(cf.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SAEError(f"cannot read {cf}: {e}") from None
    if not isinstance(conf, dict):
        raise SAEError(f"{cf}: expected a mapping with model_kind, feature_input_hook and feature_output_hook")
    kind = conf.get("model_kind", "transcoder_set")
    if kind != "transcoder_set":
        raise SAEError(
            f"{cf}: model_kind {kind!r} is not supported; expected transcoder_set (one transcoder per "
            "layer; cross-layer transcoders are not read)"
        )
    hooks = (conf.get("feature_input_hook"), conf.get("feature_output_hook"))
    if hooks[0] not in INPUT_HOOKS or hooks[1] not in OUTPUT_HOOKS:
        raise SAEError(
            f"{cf}: the transcoders read {hooks[0]!r} and write {hooks[1]!r}; thoughtscope's read what the MLP reads "
            f"after its norm ({' or '.join(INPUT_HOOKS)}) and write its output ({' or '.join(OUTPUT_HOOKS)})"
        )
    listed = conf.get("transcoders")
    if listed is not None:
        if not isinstance(listed, list) or not listed or not all(isinstance(s, str) for s in listed):
            raise SAEError(f"{cf}: 'transcoders' must be a list of file paths, one per layer")
        hub = [s for s in listed if "://" in s]
        if hub:
            raise SAEError(f"{cf} names files on a hub ({hub[0]}); download them and list the local paths instead")
        files = [Path(s) if Path(s).is_absolute() else p / s for s in listed]
        for i, f in enumerate(files):
            if not f.is_file():
                raise SAEError(f"{cf}: layer {i}'s transcoder file {f} is missing")
    else:
        found = _numbered(p, r"layer_(\d+)\.safetensors")
        if not found:
            raise _unknown_layout(p, "config.yaml lists no 'transcoders' and there are no layer_<i>.safetensors")
        files = _contiguous(found, p, "layer_{}.safetensors")
    model = conf.get("model_name") if isinstance(conf.get("model_name"), str) else ""
    tcs = [_foreign(_read_foreign(f), i, model, f, hooks) for i, f in enumerate(files)]
    return TranscoderSet(tcs, model={"spec": model} if model else {}, source=str(p))


def _load_gemma_scope(p: Path) -> TranscoderSet:
    flat = _numbered(p, r"layer_(\d+)\.npz")
    dirs = {i: d for i, d in _numbered(p, r"layer_(\d+)").items() if d.is_dir()}
    if not flat and not dirs:
        raise _unknown_layout(p, "no transcoder set layout recognised")
    found = dict(flat)
    for i, d in dirs.items():
        params = sorted(d.rglob("params.npz"))
        if len(params) > 1:
            raise SAEError(
                f"{d} holds {len(params)} transcoders ({', '.join(str(f.relative_to(p)) for f in params[:6])}); "
                "keep one params.npz per layer, or write a config.yaml listing one file per layer under "
                "'transcoders:' (feature_input_hook: ln2.hook_normalized, feature_output_hook: hook_mlp_out)"
            )
        if params:
            found[i] = params[0]
    if not found:
        raise _unknown_layout(p, "the layer_<i> folders hold no params.npz")
    files = _contiguous(found, p, "layer_{0}/**/params.npz or layer_{0}.npz")
    hooks = ("ln2.hook_normalized", "hook_mlp_out")  # Gemma Scope's transcoders: pre-MLP norm out -> MLP out
    return TranscoderSet([_foreign(_read_foreign(f), i, "", f, hooks) for i, f in enumerate(files)], source=str(p))


def _read_foreign(f: Path) -> dict[str, Tensor]:
    """One foreign layer file in circuit-tracer's orientation: W_enc [m, d], W_dec [m, d], b_enc [m], b_dec [d],
    optional W_skip [d_out, d_in] and threshold [m]."""
    if f.suffix == ".npz":
        import numpy as np

        try:
            with np.load(f) as z:
                raw = {k: torch.from_numpy(np.asarray(z[k], dtype=np.float32)) for k in z.files}
        except (OSError, ValueError, KeyError) as e:
            raise SAEError(f"cannot read {f}: {e}") from None
    else:
        raw = _read_safetensors(f)
    if "w_enc" in raw:  # Gemma Scope 2: w_enc [d, m], affine_skip_connection [d_in, d_out]
        out = {k: raw[k] for k in ("w_enc", "w_dec", "b_enc", "b_dec", "threshold") if k in raw}
        out["W_enc"], out["W_dec"] = out.pop("w_enc"), out.pop("w_dec")
        if "affine_skip_connection" in raw:
            out["W_skip"] = raw["affine_skip_connection"].t()
    else:
        out = {k: raw[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec", "W_skip") if k in raw}
        thr = raw.get("activation_function.threshold", raw.get("threshold"))
        if thr is not None:
            out["threshold"] = thr
    missing = [k for k in ("W_enc", "W_dec", "b_enc", "b_dec") if k not in out]
    if missing:
        raise SAEError(
            f"{f} lacks {', '.join(missing)} (has {', '.join(sorted(raw))}); expected one of: " + "; ".join(LAYOUTS[1:])
        )
    m, d = out["b_enc"].numel(), out["b_dec"].numel()
    w = out["W_enc"]
    if tuple(w.shape) == (d, m) and m != d:  # Gemma Scope's [d, m]
        out["W_enc"] = w.t()
    return {k: v.float() for k, v in out.items()}


def _foreign(t: dict[str, Tensor], layer: int, model: str, f: Path, hooks: tuple[str, str]) -> SAE:
    """Our JumpReLU transcoder with their outputs: b_in = 0, W_skip transposed to ours, log of the threshold
    (0 for a ReLU transcoder)."""
    m, d = t["b_enc"].numel(), t["b_dec"].numel()
    thr = t.get("threshold")
    if thr is not None and bool((thr < 0).any()):
        raise SAEError(f"{f}: {int((thr < 0).sum())} thresholds are negative; a JumpReLU threshold here is >= 0")
    cfg = SAEConfig(
        arch="jumprelu-transcoder",
        d_model=d,
        n_features=m,
        site=f"mlp_in.{layer}",
        target_site=f"mlp_out.{layer}",
        skip_connection="W_skip" in t,
        model=model,
        model_source={"spec": model} if model else None,
        normalize=False,
        max_norm_ratio=None,
        input_scaling="none",
        massive_ratio=None,
        extra={
            "imported_from": str(f),
            "input_hook": hooks[0],
            "output_hook": hooks[1],
            "activation": "jumprelu" if thr is not None else "relu",
        },
    )
    ours = {
        "enc": t["W_enc"],
        "W_dec": t["W_dec"],
        "b_enc": t["b_enc"].reshape(m),
        "b_dec": t["b_dec"].reshape(d),
        "b_in": torch.zeros(d),
        "log_threshold": torch.full((m,), -math.inf) if thr is None else thr.reshape(-1).double().log().float(),
    }
    if "W_skip" in t:
        ours["W_skip"] = t["W_skip"].t()
    return _build(cfg, ours, where=str(f))


@torch.no_grad()
def replacement_losses(lm: LoadedModel, ts: TranscoderSet, token_batches: Sequence[Tensor]) -> dict[str, float]:
    """Next-token loss of the replacement model (every block's MLP output replaced by its transcoder's prediction,
    position 0 kept as the model computes it: the transcoders never saw it, and graphs make it an error node)
    beside the clean model and every MLP zero- or mean-ablated (means over the same tokens); with
    `loss_recovered` = (zero - replaced) / (zero - clean) and `loss_recovered_vs_mean` likewise."""
    from ..sites import mlp_module, mlp_out_module

    L = len(lm.layers)
    reads: dict[int, Tensor] = {}
    sums = [torch.zeros(lm.d_model, dtype=torch.float64) for _ in range(L)]
    count = [0]

    def run(mode: str) -> float:
        def write(i: int):
            def hook(_m, _a, out):
                if mode == "clean":
                    if i == 0:
                        count[0] += out[:, 1:].shape[0] * out[:, 1:].shape[1]
                    sums[i] += out[:, 1:].double().sum((0, 1)).cpu()
                    return out
                if mode == "zero":
                    new = torch.zeros_like(out)
                elif mode == "mean":
                    new = (sums[i] / max(count[0], 1)).to(out).expand_as(out).clone()
                else:
                    new = ts[i](reads[i].float())[1].to(out.dtype)
                new[:, 0] = out[:, 0]
                return new

            return hook

        handles = []
        for i in range(L):
            handles.append(
                mlp_module(lm.layers[i], i).register_forward_pre_hook(lambda m, a, i=i: reads.__setitem__(i, a[0]))
            )
            handles.append(mlp_out_module(lm.layers[i], i).register_forward_hook(write(i)))
        total, n = 0.0, 0
        try:
            for ids in token_batches:
                ids = ids.to(lm.device)
                logits = lm.model(ids).logits[:, :-1].float()
                total += float(
                    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
                )
                n += ids[:, 1:].numel()
        finally:
            for h in handles:
                h.remove()
        return total / n

    out = {m: run(m) for m in ("clean", "replaced", "zero", "mean")}  # clean first: it measures the means
    gap_zero, gap_mean = out["zero"] - out["clean"], out["mean"] - out["clean"]
    return {
        "loss_clean": out["clean"],
        "loss_replaced": out["replaced"],
        "loss_zero_ablated": out["zero"],
        "loss_mean_ablated": out["mean"],
        "loss_recovered": (out["zero"] - out["replaced"]) / gap_zero if gap_zero else float("nan"),
        "loss_recovered_vs_mean": (out["mean"] - out["replaced"]) / gap_mean if gap_mean else float("nan"),
        "n_tokens": int(sum(ids[:, 1:].numel() for ids in token_batches)),
    }


@torch.no_grad()
def evaluate_set(lm: LoadedModel, ts: TranscoderSet, *, corpus: str = "default", n_tokens: int = 16_384,
                 skip_tokens: int = 2_000_000) -> dict:  # fmt: skip
    """A set on held-out text (the corpus after `skip_tokens`): each block's FVU of the MLP output and L0 (position
    0 left out, as in training), and `replacement_losses` on the same contexts."""
    from ..corpus import Corpus
    from ..sites import Site, capture
    from .run import LOSS_CTX_LEN, loss_batches

    batches = loss_batches(lm, Corpus(corpus), skip_tokens // LOSS_CTX_LEN, max(1, n_tokens // LOSS_CTX_LEN))
    L = len(ts)
    err = torch.zeros(L, dtype=torch.float64)
    ss = torch.zeros(L, dtype=torch.float64)
    s1 = torch.zeros(L, lm.d_model, dtype=torch.float64)
    l0 = torch.zeros(L, dtype=torch.float64)
    n = 0
    for ids in batches:
        got = capture(lm, [Site(i, s) for i in range(L) for s in ("mlp_in", "mlp_out")], ids.to(lm.device))
        for i in range(L):
            x = got[Site(i, "mlp_in")][:, 1:].flatten(0, 1).float()
            y = got[Site(i, "mlp_out")][:, 1:].flatten(0, 1).float()
            f, y_hat = ts[i](x)
            err[i] += float((y - y_hat).pow(2).sum())
            ss[i] += float(y.double().pow(2).sum())
            s1[i] += y.double().sum(0).cpu()
            l0[i] += float((f > 0).sum())
        n += ids[:, 1:].numel()
    var = ss - s1.pow(2).sum(1) / n
    return {
        "fvu": (err / var).tolist(),
        "l0": (l0 / n).tolist(),
        "n_tokens": n,
        "loss": replacement_losses(lm, ts, batches),
        "source": ts.source,
    }
