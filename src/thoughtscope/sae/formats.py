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

from .._io import atomic_dir
from ..errors import SAEError
from .config import SAEConfig
from .registry import sae_class
from .stats import read_feature_stats

if TYPE_CHECKING:
    from .base import SAE

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
NORM_FILE = "normalization.json"
METRICS_FILE = "metrics.json"


# ----------------------------------------------------------------------------- io helpers
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SAEError(f"SAE folder is missing {path.name}: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAEError(f"corrupt JSON in {path}: {e}") from e
    if not isinstance(data, dict):
        raise SAEError(f"{path} must hold a JSON object")
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise SAEError(f"SAE folder is missing {path.name}: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SAEError(f"corrupt safetensors file {path}: {e}") from e


def _need(t: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], path: Path) -> torch.Tensor:
    if key not in t:
        raise SAEError(f"{path} lacks tensor {key!r} (has {sorted(t)})")
    v = t[key]
    if tuple(v.shape) != shape:
        raise SAEError(f"{path}: tensor {key!r} has shape {tuple(v.shape)}, expected {shape}")
    return v.float()


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
) -> SAE:
    sae = sae_class(cfg.arch)(cfg)  # zero weights: the tensors below replace them
    with torch.no_grad():
        if not apply_b_dec_to_input:
            # their encoder sees raw x: x W + c == (x - b_dec) W + (c + b_dec W)
            b_enc = b_enc + b_dec @ W_enc
        sae.enc.copy_(W_enc.t())
        sae.W_dec.copy_(W_dec)
        sae.b_enc.copy_(b_enc)
        sae.b_dec.copy_(b_dec)
        sae.load_extra_state_tensors(extra or {})
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
            "folded_into_weights": True,
        },
    }
    if metrics:
        files[METRICS_FILE] = metrics
    _write_folder_atomic(Path(path), files)
    return Path(path)


def load_sae(path: str | Path, *, device: str | torch.device | None = None) -> SAE:
    """Open any SAE folder we understand: native, SAELens, sparsify or dictionary_learning.

    "default" is the SAE shipped for the default model (SmolLM2-135M-Instruct, resid.15).
    """
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
    except TypeError as e:
        raise SAEError(f"{p / CFG_FILE}: bad config ({e})") from e
    t = _read_safetensors(p / WEIGHTS_FILE)
    d, m = cfg.d_model, cfg.n_features
    extra = {k: v.float() for k, v in t.items() if k == "threshold"}
    w = p / WEIGHTS_FILE
    return _sae_from_tensors(
        cfg,
        _need(t, "W_enc", (d, m), w),
        _need(t, "W_dec", (m, d), w),
        _need(t, "b_enc", (m,), w),
        _need(t, "b_dec", (d,), w),
        extra,
    )


# ----------------------------------------------------------------------------- SAELens v6
def export_saelens(sae: SAE, path: str | Path, *, hook_name: str | None = None) -> Path:
    """Write a SAELens v6 inference folder (cfg.json + sae_weights.safetensors).

    batchtopk is written as jumprelu with its global threshold repeated per feature (what SAELens does).
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
    if len(parts) == 3 and parts[0] == "blocks" and parts[2] == "hook_resid_post" and parts[1].isdigit():
        return f"resid.{parts[1]}"
    if len(parts) == 3 and parts[0] == "blocks" and parts[2] == "hook_resid_pre" and parts[1].isdigit():
        return f"resid.{int(parts[1]) - 1}" if int(parts[1]) > 0 else hook
    return hook


def load_saelens(path: str | Path) -> SAE:
    """Read a SAELens folder (v6 layout; v5 top-level model_name/hook_name also accepted)."""
    p = Path(path)
    raw = _read_json(p / CFG_FILE)
    for key in ("d_in", "d_sae"):
        if key not in raw:
            raise SAEError(f"{p / CFG_FILE} lacks {key!r}; not a SAELens config")
    arch_in = raw.get("architecture", "standard")
    meta = raw.get("metadata") or {}
    if raw.get("normalize_activations", "none") not in ("none", None):
        raise SAEError(
            f"{p / CFG_FILE}: normalize_activations={raw['normalize_activations']!r} is not supported; "
            "fold the normalisation into the weights first"
        )
    our_arch = meta.get("thoughtscope_arch")
    if our_arch is None:
        our_arch = {"standard": "relu-l1", "topk": "topk", "jumprelu": "jumprelu"}.get(arch_in)
    if our_arch is None:
        raise SAEError(f"{p / CFG_FILE}: unknown SAE architecture {arch_in!r}; expected standard, topk or jumprelu")
    d, m = int(raw["d_in"]), int(raw["d_sae"])
    t = _read_safetensors(p / WEIGHTS_FILE)
    wf = p / WEIGHTS_FILE
    extra: dict[str, torch.Tensor] = {}
    if arch_in == "jumprelu":
        thr = _need(t, "threshold", (m,), wf) if "threshold" in t else _need(t, "log_threshold", (m,), wf).exp()
        extra["threshold"] = thr[0] if our_arch == "batchtopk" else thr
    hook = meta.get("hook_name", raw.get("hook_name", ""))
    cfg = SAEConfig(
        arch=our_arch,
        d_model=d,
        n_features=m,
        k=int(raw.get("k", min(32, m))),
        model=meta.get("model_name", raw.get("model_name", "")) or "",
        site=meta.get("thoughtscope_site") or _hook_to_site(hook or ""),
        exclude_bos=bool(meta.get("exclude_special_tokens", True)),
        normalize=False,
        max_norm_ratio=None,  # imported: the outlier rule it was trained with is unknown
        extra={"imported_from": "saelens", "saelens_architecture": arch_in},
    )
    W_dec = _need(t, "W_dec", (m, d), wf)
    if arch_in == "topk" and raw.get("rescale_acts_by_decoder_norm"):
        raise SAEError(f"{p / CFG_FILE}: rescale_acts_by_decoder_norm=true is not supported")
    return _sae_from_tensors(
        cfg,
        _need(t, "W_enc", (d, m), wf),
        W_dec,
        _need(t, "b_enc", (m,), wf),
        _need(t, "b_dec", (d,), wf),
        extra,
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
    )


# ----------------------------------------------------------------------------- sparsify
def load_sparsify(path: str | Path) -> SAE:
    """Read an EleutherAI sparsify folder: cfg.json (k, num_latents/expansion_factor, d_in) + sae.safetensors
    (encoder.weight [m, d], encoder.bias [m], W_dec [m, d], b_dec [d]). sparsify subtracts b_dec before encoding."""
    p = Path(path)
    raw = _read_json(p / CFG_FILE)
    t = _read_safetensors(p / "sae.safetensors")
    wf = p / "sae.safetensors"
    if "encoder.weight" not in t:
        raise SAEError(f"{wf} lacks tensor 'encoder.weight' (has {sorted(t)})")
    m, d = t["encoder.weight"].shape
    if "d_in" in raw and int(raw["d_in"]) != d:
        raise SAEError(f"{p / CFG_FILE}: d_in={raw['d_in']} but encoder.weight has d={d}")
    if "k" not in raw:
        raise SAEError(f"{p / CFG_FILE} lacks 'k'")
    cfg = SAEConfig(
        arch="topk",
        d_model=int(d),
        n_features=int(m),
        k=int(raw["k"]),
        normalize=False,
        max_norm_ratio=None,
        extra={"imported_from": "sparsify"},
    )
    W_dec = _need(t, "W_dec", (m, d), wf)
    return _sae_from_tensors(
        cfg,
        _need(t, "encoder.weight", (m, d), wf).t(),
        W_dec,
        _need(t, "encoder.bias", (m,), wf),
        _need(t, "b_dec", (d,), wf),
    )


# ----------------------------------------------------------------------------- dictionary_learning
def load_dictionary_learning(path: str | Path) -> SAE:
    """Read a dictionary_learning folder: ae.pt (state dict) + config.json ({"trainer": {...}}).

    Key names by dict_class: AutoEncoder (encoder.weight, encoder.bias, decoder.weight [d, m], bias = b_dec),
    AutoEncoderTopK / BatchTopKSAE (encoder.*, decoder.weight [d, m], b_dec, k, threshold),
    JumpReluAutoEncoder (W_enc [d, m], b_enc, W_dec [m, d], b_dec, threshold; encoder sees raw x).
    """
    p = Path(path)
    raw = _read_json(p / "config.json")
    tr = raw.get("trainer", raw)
    try:
        sd = torch.load(p / "ae.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged pickle
        raise SAEError(f"corrupt checkpoint {p / 'ae.pt'}: {e}") from e
    if not isinstance(sd, dict):
        raise SAEError(f"{p / 'ae.pt'} is not a state dict")
    cls = tr.get("dict_class", "")
    wf = p / "ae.pt"
    common = dict(
        normalize=False,
        max_norm_ratio=None,
        model=str(tr.get("lm_name", "")),
        site=f"resid.{tr['layer']}" if isinstance(tr.get("layer"), int) else "",
        extra={"imported_from": "dictionary_learning", "dict_class": cls},
    )
    if cls in ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "TopKSAE"):
        if "encoder.weight" not in sd:
            raise SAEError(f"{wf} lacks 'encoder.weight' (has {sorted(sd)})")
        m, d = sd["encoder.weight"].shape
        enc_w = _need(sd, "encoder.weight", (m, d), wf)
        enc_b = _need(sd, "encoder.bias", (m,), wf)
        W_dec = _need(sd, "decoder.weight", (d, m), wf).t()
        if cls == "AutoEncoder":
            cfg = SAEConfig(arch="relu-l1", d_model=d, n_features=m, **common)
            return _sae_from_tensors(cfg, enc_w.t(), W_dec, enc_b, _need(sd, "bias", (d,), wf))
        k = int(sd["k"]) if "k" in sd else int(tr.get("k", 0))
        if k <= 0:
            raise SAEError(f"{p} has no k (neither in ae.pt nor config.json)")
        extra = {}
        arch = "topk"
        if cls == "BatchTopKSAE" and "threshold" in sd and float(sd["threshold"]) >= 0:
            arch, extra = "batchtopk", {"threshold": sd["threshold"].float()}
        cfg = SAEConfig(arch=arch, d_model=d, n_features=m, k=k, **common)
        return _sae_from_tensors(cfg, enc_w.t(), W_dec, enc_b, _need(sd, "b_dec", (d,), wf), extra)
    if cls in ("JumpReluAutoEncoder",):
        if "W_enc" not in sd:
            raise SAEError(f"{wf} lacks 'W_enc' (has {sorted(sd)})")
        d, m = sd["W_enc"].shape
        cfg = SAEConfig(arch="jumprelu", d_model=d, n_features=m, **common)
        return _sae_from_tensors(
            cfg,
            _need(sd, "W_enc", (d, m), wf),
            _need(sd, "W_dec", (m, d), wf),
            _need(sd, "b_enc", (m,), wf),
            _need(sd, "b_dec", (d,), wf),
            {"threshold": _need(sd, "threshold", (m,), wf)},
            apply_b_dec_to_input=False,
        )
    raise SAEError(
        f"{p / 'config.json'}: unknown dictionary_learning dict_class {cls!r}; expected AutoEncoder, "
        "AutoEncoderTopK, BatchTopKSAE or JumpReluAutoEncoder"
    )
