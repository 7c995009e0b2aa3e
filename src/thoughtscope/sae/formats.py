"""SAE folders: our native format, SAELens (v6) import/export, sparsify and dictionary_learning readers.

Native folder: ``cfg.json`` (SAEConfig) + ``sae_weights.safetensors`` with W_enc [d_model, n_features],
W_dec [n_features, d_model], b_enc, b_dec (+ ``threshold`` for jumprelu/batchtopk), and optional
``normalization.json`` / ``metrics.json``. Saved weights always act on raw activations.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .._io import atomic_dir, read_json
from ..errors import SAEError
from .config import SAEConfig
from .pretrained import fetch_pretrained, finish, is_pretrained_spec
from .registry import sae_class
from .stats import read_feature_stats

if TYPE_CHECKING:
    from .base import SAE

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
NORM_FILE = "normalization.json"
METRICS_FILE = "metrics.json"


# ----------------------------------------------------------------------------- io helpers
# Every reader below checks what it takes from a file (type, shape, finite values) before it builds anything, so a
# damaged or foreign folder ends in one SAEError naming the file and the fault, never in another exception type.
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SAEError(f"SAE folder is missing {path.name}: {path}")
    return read_json(path, SAEError)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise SAEError(f"SAE folder is missing {path.name}: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError, OverflowError) as e:
        raise SAEError(f"corrupt safetensors file {path}: {e}") from None


def _tensor(v: Any, key: str, path: Path) -> torch.Tensor:
    """v as float32, or SAEError: not a tensor, not numeric, or holding NaN/Inf."""
    if not isinstance(v, torch.Tensor):
        raise SAEError(f"{path}: {key!r} is a {type(v).__name__}, expected a tensor")
    if v.is_complex() or not (v.is_floating_point() or v.dtype in _INT_DTYPES):
        raise SAEError(f"{path}: tensor {key!r} has dtype {v.dtype}, expected a floating-point tensor")
    v = v.float()
    if not bool(torch.isfinite(v).all()):
        raise SAEError(f"{path}: tensor {key!r} holds NaN or Inf values")
    return v


_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _need(t: dict[str, Any], key: str, shape: tuple[int, ...], path: Path) -> torch.Tensor:
    if key not in t:
        raise SAEError(f"{path} lacks tensor {key!r} (has {sorted(map(str, t))})")
    v = t[key]
    if isinstance(v, torch.Tensor) and tuple(v.shape) != shape:
        raise SAEError(f"{path}: tensor {key!r} has shape {tuple(v.shape)}, expected {shape}")
    return _tensor(v, key, path)


def _matrix_shape(t: dict[str, Any], key: str, path: Path) -> tuple[int, int]:
    """The shape of a 2-D tensor the other sizes are read from (sparsify, dictionary_learning)."""
    if key not in t:
        raise SAEError(f"{path} lacks tensor {key!r} (has {sorted(map(str, t))})")
    v = t[key]
    if not isinstance(v, torch.Tensor) or v.dim() != 2 or v.numel() == 0:
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise SAEError(f"{path}: {key!r} must be a non-empty matrix, got {got}")
    return int(v.shape[0]), int(v.shape[1])


def _int(raw: dict[str, Any], key: str, path: Path, default: Any = None) -> int:
    """raw[key] as an int (an integral float is accepted); SAEError naming the file otherwise."""
    v = raw.get(key)
    if v is None:  # absent, or null as some writers leave an unused field
        v = default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise SAEError(f"{path}: {key!r} is {v!r:.80}, expected an integer")
    return v


def _str(raw: dict[str, Any], key: str, path: Path, default: str = "") -> str:
    v = raw.get(key)
    if v is None:
        return default
    if not isinstance(v, str):
        raise SAEError(f"{path}: {key!r} is {v!r:.80}, expected a string")
    return v


def _config(path: Path, **kw: Any) -> SAEConfig:
    """SAEConfig(**kw) of a foreign folder, its errors naming the file the values came from. The massive-dimension
    rule its trainer followed is unknown: recorded as none; its decoder rows are read as they are (unit)."""
    kw = {"input_scaling": "none", "massive_ratio": None, "decoder_norm": "unit", **kw}
    try:
        return SAEConfig(**kw)
    except SAEError as e:
        raise SAEError(f"{path}: {e}") from None


def _write_folder_atomic(path: Path, files: dict[str, Any]) -> None:
    """Write all files into a temp folder beside path, then swap it in (a crash leaves the old folder)."""
    with atomic_dir(path) as tmp:
        for name, content in files.items():
            if isinstance(content, dict) and content and all(isinstance(v, torch.Tensor) for v in content.values()):
                save_file({k: v.detach().contiguous().cpu() for k, v in content.items()}, str(tmp / name))
            else:
                (tmp / name).write_text(json.dumps(content, indent=2))


def _sae_from_tensors(
    cfg: SAEConfig,
    W_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    extra: dict[str, torch.Tensor] | None = None,
    apply_b_dec_to_input: bool = True,
    *,
    path: Path | None = None,
) -> SAE:
    sae = sae_class(cfg.arch)(cfg)  # zero weights: the tensors below replace them
    want = {k: tuple(v.shape) for k, v in sae.extra_state_tensors().items()}
    extra = {k: v for k, v in (extra or {}).items() if k in want}
    for k, v in extra.items():  # e.g. jumprelu: one threshold per feature; batchtopk: one global threshold
        if tuple(v.shape) != want[k] and not (want[k] == () and v.numel() == 1):
            raise SAEError(f"{path}: tensor {k!r} has shape {tuple(v.shape)}, expected {want[k]} for arch {cfg.arch}")
    with torch.no_grad():
        if not apply_b_dec_to_input:
            # their encoder sees raw x: x W + c == (x - b_dec) W + (c + b_dec W)
            b_enc = b_enc + b_dec @ W_enc
        sae.enc.copy_(W_enc.t())
        sae.W_dec.copy_(W_dec)
        sae.b_enc.copy_(b_enc)
        sae.b_dec.copy_(b_dec)
        sae.load_extra_state_tensors(extra)
    sae.cfg.norm_folded = True
    return sae


# ----------------------------------------------------------------------------- native
def default_sae_path() -> Path:
    """The SAE shipped inside the package for the default model."""
    from ..paths import asset

    return asset("default_sae")


def save_sae(
    sae: SAE, path: str | Path, *, metrics: dict | None = None, weights_dtype: torch.dtype | None = None
) -> Path:
    """Save sae as a native folder (atomic). The SAE must already act on raw activations.

    weights_dtype=torch.float16 halves the folder (how the default SAE ships); loading casts back to float32.
    """
    if not sae.cfg.norm_folded:
        raise SAEError("SAE still expects normalised inputs; call sae.fold_normalization(scale, mean) before saving")
    tensors = {
        "W_enc": sae.W_enc,
        "W_dec": sae.W_dec,
        "b_enc": sae.b_enc,
        "b_dec": sae.b_dec,
        **sae.extra_state_tensors(),
    }
    if weights_dtype is not None:
        tensors = {k: v.to(weights_dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    files: dict[str, Any] = {
        CFG_FILE: sae.cfg.to_dict(),
        WEIGHTS_FILE: tensors,
        NORM_FILE: {
            "scale": sae.cfg.norm_scale,
            "mean": sae.cfg.norm_mean,
            "mean_center": sae.cfg.mean_center,
            "dim_scale": sae.cfg.dim_scale,
            "massive_dims": sae.cfg.massive_dims,
            "folded_into_weights": True,
        },
    }
    if metrics:
        files[METRICS_FILE] = metrics
    _write_folder_atomic(Path(path), files)
    return Path(path)


def load_sae(path: str | Path, *, device: str | torch.device | None = None) -> SAE:
    """Open any SAE folder we understand: native, SAELens, sparsify or dictionary_learning.

    "default" is the SAE shipped for the default model (SmolLM2-135M-Instruct, resid.15);
    "saelens:<release>/<sae_id>" a pretrained SAE of SAELens' registry, from the hub cache or the hub (pretrained.py).
    """
    if is_pretrained_spec(path):
        sae = _load_pretrained(str(path))
        return sae.to(device) if device is not None else sae
    p = default_sae_path() if str(path) == "default" else Path(path)
    if not p.is_dir():
        raise SAEError(f"SAE path {p} is not a folder")
    if (p / "ae.pt").exists():
        sae = load_dictionary_learning(p)
    elif (p / "sae.safetensors").exists():
        sae = load_sparsify(p)
    else:
        cfg = _read_json(p / CFG_FILE)
        sae = load_saelens(p) if "d_in" in cfg and "arch" not in cfg else _load_native(p, cfg)
    sae.feature_stats = read_feature_stats(p, int(sae.W_dec.shape[0]))
    sae.source_dir = p
    return sae.to(device) if device is not None else sae


def _load_native(p: Path, raw: dict[str, Any]) -> SAE:
    try:
        cfg = SAEConfig.from_dict(raw)
    except (TypeError, SAEError) as e:
        raise SAEError(f"{p / CFG_FILE}: bad config ({e})") from None
    t = _read_safetensors(p / WEIGHTS_FILE)
    d, m = cfg.d_model, cfg.n_features
    w = p / WEIGHTS_FILE
    # every tensor beyond the four weights (a threshold, a transcoder's b_in and W_skip): the class keeps what it knows
    extra = {k: _tensor(v, k, w) for k, v in t.items() if k not in ("W_enc", "W_dec", "b_enc", "b_dec")}
    return _sae_from_tensors(
        cfg,
        _need(t, "W_enc", (d, m), w),
        _need(t, "W_dec", (m, d), w),
        _need(t, "b_enc", (m,), w),
        _need(t, "b_dec", (d,), w),
        extra,
        path=w,
    )


# ----------------------------------------------------------------------------- SAELens v6
def export_saelens(sae: SAE, path: str | Path, *, hook_name: str | None = None) -> Path:
    """Write a SAELens v6 inference folder (cfg.json + sae_weights.safetensors).

    batchtopk and matryoshka are written as jumprelu with the global threshold repeated per feature (what SAELens
    does).
    relu-l1 becomes "standard"; decoder norms are left unfolded, which is exact for inference.
    """
    cfg = sae.cfg
    own = sae.saelens_config()  # "architecture" and the keys that go with it
    tensors = {"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_enc": sae.b_enc, "b_dec": sae.b_dec, **sae.saelens_tensors()}
    out = {
        "architecture": own.pop("architecture"),
        "d_in": cfg.d_model,
        "d_sae": cfg.n_features,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",  # our normalisation is folded into the weights
        "reshape_activations": "none",
        "metadata": {
            "model_name": cfg.model,
            "hook_name": hook_name if hook_name is not None else _site_to_hook(cfg.site),
            "hook_head_index": None,
            "prepend_bos": True,
            "exclude_special_tokens": bool(cfg.exclude_bos),
            "thoughtscope_site": cfg.site,
            "thoughtscope_arch": cfg.arch,
        },
    }
    out.update(own)
    _write_folder_atomic(Path(path), {CFG_FILE: out, WEIGHTS_FILE: tensors})
    return Path(path)


def _site_to_hook(site: str) -> str:
    # "resid.15" (output of block 15) is TransformerLens' blocks.15.hook_resid_post
    try:
        stream, layer = site.split(".")
        if stream == "resid":
            return f"blocks.{int(layer)}.hook_resid_post"
    except ValueError:
        pass
    return site


def _hook_to_site(hook: str) -> str:
    parts = hook.split(".")
    if len(parts) == 3 and parts[0] == "blocks" and parts[2] == "hook_resid_post" and parts[1].isdecimal():
        return f"resid.{int(parts[1])}"
    if len(parts) == 3 and parts[0] == "blocks" and parts[2] == "hook_resid_pre" and parts[1].isdecimal():
        return f"resid.{int(parts[1]) - 1}" if int(parts[1]) > 0 else hook
    return hook


def _load_pretrained(spec: str) -> SAE:
    """A pretrained SAE by release name: pretrained.py finds its files, the readers here convert them."""
    found = fetch_pretrained(spec)
    if found.layout == "dl":
        sae = load_dictionary_learning(found.folder)
    else:
        sae = _from_saelens(
            found.cfg, found.tensors, found.cfg_file or found.folder, found.weights_file or found.folder
        )
    return finish(sae, found)


def load_saelens(path: str | Path) -> SAE:
    """Read a SAELens folder (v6 layout; v5 top-level model_name/hook_name also accepted)."""
    p = Path(path)
    return _from_saelens(_read_json(p / CFG_FILE), None, p / CFG_FILE, p / WEIGHTS_FILE)


def _from_saelens(raw: dict[str, Any], t: dict[str, Any] | None, cf: Path, wf: Path) -> SAE:
    """An SAE from a SAELens config `raw` (read from cf) and its tensors `t` (None: read from the file wf)."""
    for key in ("d_in", "d_sae"):
        if key not in raw:
            raise SAEError(f"{cf} lacks {key!r}; not a SAELens config")
    arch_in = raw.get("architecture", "standard")
    meta = raw.get("metadata") or {}
    if not isinstance(meta, dict):
        raise SAEError(f"{cf}: 'metadata' is {meta!r:.80}, expected an object")
    if raw.get("normalize_activations", "none") not in ("none", None):
        raise SAEError(
            f"{cf}: normalize_activations={raw['normalize_activations']!r} is not supported; "
            "fold the normalisation into the weights first"
        )
    our_arch = meta.get("thoughtscope_arch")
    if our_arch is None and isinstance(arch_in, str):
        our_arch = {"standard": "relu-l1", "topk": "topk", "jumprelu": "jumprelu"}.get(arch_in)
    if our_arch is None:
        raise SAEError(f"{cf}: unknown SAE architecture {arch_in!r:.80}; expected standard, topk or jumprelu")
    d, m = _int(raw, "d_in", cf), _int(raw, "d_sae", cf)
    hook = _str(meta, "hook_name", cf) or _str(raw, "hook_name", cf)
    cfg = _config(
        cf,
        arch=our_arch,
        d_model=d,
        n_features=m,
        k=_int(raw, "k", cf, min(32, m) if m > 0 else 32),
        model=_str(meta, "model_name", cf) or _str(raw, "model_name", cf),
        site=_str(meta, "thoughtscope_site", cf) or _hook_to_site(hook),
        exclude_bos=bool(meta.get("exclude_special_tokens", True)),
        normalize=False,
        max_norm_ratio=None,  # imported: the outlier rule it was trained with is unknown
        extra={"imported_from": "saelens", "saelens_architecture": arch_in},
    )
    if arch_in == "topk" and raw.get("rescale_acts_by_decoder_norm"):
        raise SAEError(f"{cf}: rescale_acts_by_decoder_norm=true is not supported")
    if t is None:
        t = _read_safetensors(wf)
    extra: dict[str, torch.Tensor] = {}
    if arch_in == "jumprelu":
        if "threshold" in t:
            thr = _need(t, "threshold", (m,), wf)
        else:
            thr = _need(t, "log_threshold", (m,), wf).exp()
            if not bool(torch.isfinite(thr).all()):
                raise SAEError(f"{wf}: tensor 'log_threshold' gives an infinite threshold")
        extra["threshold"] = thr[0] if our_arch in ("batchtopk", "matryoshka") else thr  # one global threshold
    return _sae_from_tensors(
        cfg,
        _need(t, "W_enc", (d, m), wf),
        _need(t, "W_dec", (m, d), wf),
        _need(t, "b_enc", (m,), wf),
        _need(t, "b_dec", (d,), wf),
        extra,
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        path=wf,
    )


# ----------------------------------------------------------------------------- sparsify
def load_sparsify(path: str | Path) -> SAE:
    """Read an EleutherAI sparsify folder: cfg.json (k, num_latents/expansion_factor, d_in) + sae.safetensors
    (encoder.weight [m, d], encoder.bias [m], W_dec [m, d], b_dec [d]). sparsify subtracts b_dec before encoding."""
    p = Path(path)
    cf = p / CFG_FILE
    raw = _read_json(cf)
    if "k" not in raw:
        raise SAEError(f"{cf} lacks 'k'")
    k = _int(raw, "k", cf)
    t = _read_safetensors(p / "sae.safetensors")
    wf = p / "sae.safetensors"
    m, d = _matrix_shape(t, "encoder.weight", wf)
    if "d_in" in raw and _int(raw, "d_in", cf) != d:
        raise SAEError(f"{cf}: d_in={raw['d_in']} but encoder.weight in {wf.name} has d={d}")
    cfg = _config(
        cf,
        arch="topk",
        d_model=d,
        n_features=m,
        k=k,
        normalize=False,
        max_norm_ratio=None,
        extra={"imported_from": "sparsify"},
    )
    return _sae_from_tensors(
        cfg,
        _need(t, "encoder.weight", (m, d), wf).t(),
        _need(t, "W_dec", (m, d), wf),
        _need(t, "encoder.bias", (m,), wf),
        _need(t, "b_dec", (d,), wf),
        path=wf,
    )


# ----------------------------------------------------------------------------- dictionary_learning
def load_dictionary_learning(path: str | Path) -> SAE:
    """Read a dictionary_learning folder: ae.pt (state dict) + config.json ({"trainer": {...}}).

    Key names by dict_class: AutoEncoder (encoder.weight, encoder.bias, decoder.weight [d, m], bias = b_dec),
    AutoEncoderTopK / BatchTopKSAE (encoder.*, decoder.weight [d, m], b_dec, k, threshold),
    JumpReluAutoEncoder (W_enc [d, m], b_enc, W_dec [m, d], b_dec, threshold; encoder sees raw x).
    """
    p = Path(path)
    cf = p / "config.json"
    raw = _read_json(cf)
    tr = raw.get("trainer", raw)
    if not isinstance(tr, dict):
        raise SAEError(f"{cf}: 'trainer' is {tr!r:.80}, expected an object")
    wf = p / "ae.pt"
    try:
        sd = torch.load(wf, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged pickle
        raise SAEError(f"corrupt checkpoint {wf}: {e}") from None
    if not isinstance(sd, dict):
        raise SAEError(f"{wf} is not a state dict")
    cls = tr.get("dict_class", "")
    common = dict(
        normalize=False,
        max_norm_ratio=None,
        model=str(tr.get("lm_name", "")),
        site=f"resid.{tr['layer']}" if isinstance(tr.get("layer"), int) and not isinstance(tr["layer"], bool) else "",
        extra={"imported_from": "dictionary_learning", "dict_class": cls},
    )
    if cls in ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "TopKSAE"):
        m, d = _matrix_shape(sd, "encoder.weight", wf)
        enc_w = _need(sd, "encoder.weight", (m, d), wf)
        enc_b = _need(sd, "encoder.bias", (m,), wf)
        W_dec = _need(sd, "decoder.weight", (d, m), wf).t()
        if cls == "AutoEncoder":
            cfg = _config(cf, arch="relu-l1", d_model=d, n_features=m, **common)
            return _sae_from_tensors(cfg, enc_w.t(), W_dec, enc_b, _need(sd, "bias", (d,), wf), path=wf)
        if "k" in sd:
            kt = sd["k"]
            if not isinstance(kt, (torch.Tensor, int)) or isinstance(kt, torch.Tensor) and kt.numel() != 1:
                raise SAEError(f"{wf}: 'k' must be one integer, got {kt!r:.80}")
            k = _int({"k": kt.item() if isinstance(kt, torch.Tensor) else kt}, "k", wf)
        else:
            k = _int(tr, "k", cf, 0)
        if k <= 0:
            raise SAEError(f"{p} has no k (neither in ae.pt nor config.json)")
        extra = {}
        arch = "topk"
        if cls == "BatchTopKSAE" and "threshold" in sd:
            thr = _tensor(sd["threshold"], "threshold", wf)
            if thr.numel() != 1:
                raise SAEError(f"{wf}: 'threshold' has shape {tuple(thr.shape)}, expected one number")
            if float(thr) >= 0:
                arch, extra = "batchtopk", {"threshold": thr.reshape(())}
        cfg = _config(cf, arch=arch, d_model=d, n_features=m, k=k, **common)
        return _sae_from_tensors(cfg, enc_w.t(), W_dec, enc_b, _need(sd, "b_dec", (d,), wf), extra, path=wf)
    if cls in ("JumpReluAutoEncoder",):
        d, m = _matrix_shape(sd, "W_enc", wf)
        cfg = _config(cf, arch="jumprelu", d_model=d, n_features=m, **common)
        return _sae_from_tensors(
            cfg,
            _need(sd, "W_enc", (d, m), wf),
            _need(sd, "W_dec", (m, d), wf),
            _need(sd, "b_enc", (m,), wf),
            _need(sd, "b_dec", (d,), wf),
            {"threshold": _need(sd, "threshold", (m,), wf)},
            apply_b_dec_to_input=False,
            path=wf,
        )
    raise SAEError(
        f"{cf}: unknown dictionary_learning dict_class {cls!r}; expected AutoEncoder, "
        "AutoEncoderTopK, BatchTopKSAE or JumpReluAutoEncoder"
    )
