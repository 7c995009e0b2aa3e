"""Run the publicly released NLA checkpoints (kitft/nla-* on the Hugging Face hub) with thoughtscope.

Each released AV and AR is a full transformers folder plus an ``nla_meta.yaml`` sidecar. The fields
we read (layout of the public release, schema "nla_model"):

    kind: nla_model
    role: av | actor            (or ar | critic)
    d_model: 3584
    extraction_layer_index: 20  (older files: layer_index)
    tokens: {injection_char, injection_token_id, injection_left_neighbor_id, injection_right_neighbor_id}
    extraction: {injection_scale: 150, mse_scale: 59.87 | "sqrt_d_model"}
    prompt_templates: {av: "...<concept>{injection_char}</concept>...", ar: "...{explanation}..."}

The AV prompt is one user turn through the chat template (no system turn) with the generation
prompt; the model writes the ``<explanation>`` tags itself. The AR folder holds the backbone already
cut to K+1 blocks and ``value_head.safetensors`` (the d×d head, key "weight"); it reads
``template.format(explanation=...)`` with BOS at the last token. Vectors are the raw output of block K
(hidden_states[K+1]), rescaled to injection_scale for the AV.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .bundle import NLA
from .core import NLAConfig, NLAError

SIDECAR = "nla_meta.yaml"
HEAD_FILE = "value_head.safetensors"


def read_sidecar(folder: str | os.PathLike) -> dict:
    """Parse and check a released checkpoint's nla_meta.yaml; errors name the file and the missing field."""
    import yaml

    path = Path(folder) / SIDECAR
    if not path.is_file():
        raise NLAError(f"{path} not found: a released NLA checkpoint ships this sidecar next to config.json")
    meta = yaml.safe_load(path.read_text())
    if not isinstance(meta, dict):
        raise NLAError(f"{path} is not a YAML mapping")
    kind = meta.get("kind")
    if kind not in ("nla_model", "nla_dataset"):
        raise NLAError(f"{path}: kind is {kind!r}, expected 'nla_model'")
    role = str(meta.get("role", "")).lower()
    d = meta.get("d_model") or (meta.get("extraction") or {}).get("d_model")
    layer = meta.get("extraction_layer_index", meta.get("layer_index"))
    if d is None or layer is None:
        raise NLAError(f"{path}: needs d_model and extraction_layer_index (or layer_index)")
    ext = meta.get("extraction") or {}
    templates = meta.get("prompt_templates") or {}
    out = {
        "path": str(path),
        "role": role,
        "d_model": int(d),
        "layer": int(layer),
        "injection_scale": ext.get("injection_scale"),
        "mse_scale": ext.get("mse_scale"),
        "tokens": meta.get("tokens") or {},
        "av_template": templates.get("av") or templates.get("actor"),
        "ar_template": templates.get("ar") or templates.get("critic"),
        "raw": meta,
    }
    if role in ("av", "actor"):
        t = out["tokens"]
        for key in ("injection_char", "injection_token_id"):
            if key not in t:
                raise NLAError(f"{path}: tokens.{key} is missing (needed to find the injection position)")
        if out["av_template"] is None or "{injection_char}" not in out["av_template"]:
            raise NLAError(f"{path}: prompt_templates.av must contain '{{injection_char}}'")
        if out["injection_scale"] is None:
            raise NLAError(f"{path}: extraction.injection_scale is missing (the AV was trained at a fixed norm)")
    if role in ("ar", "critic") and (out["ar_template"] is None or "{explanation}" not in out["ar_template"]):
        raise NLAError(f"{path}: prompt_templates.ar must contain '{{explanation}}'")
    return out


def config_from_sidecars(av: dict, ar: dict | None, *, model: str = "") -> NLAConfig:
    """Translate released sidecars into an NLAConfig (marker, scale, templates, site)."""
    if ar is not None and (ar["d_model"] != av["d_model"] or ar["layer"] != av["layer"]):
        raise NLAError(
            f"AV sidecar ({av['d_model']}, layer {av['layer']}) and AR sidecar "
            f"({ar['d_model']}, layer {ar['layer']}) describe different NLAs"
        )
    t = av["tokens"]
    scale = av["injection_scale"]
    scale = math.sqrt(av["d_model"]) if scale == "sqrt_d_model" else float(scale)
    ar_prefix, ar_suffix = "", ""
    if ar is not None:
        ar_prefix, ar_suffix = ar["ar_template"].split("{explanation}", 1)
    return NLAConfig(
        model=model,
        site=f"resid.{av['layer']}",
        d_model=av["d_model"],
        n_layers=av["layer"] + 1,
        marker=t["injection_char"],
        marker_id=int(t["injection_token_id"]),
        injection_scale=scale,
        system_prompt="",
        av_template=av["av_template"].replace("{injection_char}", "{marker}"),
        response_prefix="",
        ar_prefix=ar_prefix,
        ar_suffix=ar_suffix,
        max_new_tokens=150,
        max_explanation_tokens=512,
        extra={
            "released": True,
            "left_neighbor_id": t.get("injection_left_neighbor_id"),
            "right_neighbor_id": t.get("injection_right_neighbor_id"),
        },
    )


def _check_neighbours(nla_av, cfg: NLAConfig, where: str) -> None:
    ids = nla_av.prompt
    p = ids.index(cfg.marker_id)
    left, right = cfg.extra.get("left_neighbor_id"), cfg.extra.get("right_neighbor_id")
    if left is not None and (p == 0 or ids[p - 1] != left):
        raise NLAError(
            f"{where}: the token before the marker is {ids[p - 1] if p else None}, the sidecar says {left} "
            f"(tokenizer or template drift)"
        )
    if right is not None and (p + 1 >= len(ids) or ids[p + 1] != right):
        raise NLAError(
            f"{where}: the token after the marker is {ids[p + 1] if p + 1 < len(ids) else None}, "
            f"the sidecar says {right} (tokenizer or template drift)"
        )


def load_released(
    av_dir: str | os.PathLike,
    ar_dir: str | os.PathLike | None = None,
    *,
    target=None,
    device: str | None = None,
    dtype=None,
) -> NLA:
    """Load a released AV (+ AR) pair as an NLA usable with `explain_text` / `nla explain`.

    target: the LoadedModel whose activations will be explained (defaults to the AV folder's own base
    weights, which is only right for reading; pass the real target model when you have it). Its d_model
    and depth are checked against the sidecar.
    """
    from thoughtscope.models import load_model

    from .reconstructor import Reconstructor
    from .verbalizer import Verbalizer

    av_dir = Path(av_dir)
    av_meta = read_sidecar(av_dir)
    if ar_dir is None:
        for cand in (
            av_dir.parent / (av_dir.name[:-3] + "-ar") if av_dir.name.endswith("-av") else None,
            av_dir.parent / "ar",
        ):
            if cand is not None and (cand / SIDECAR).is_file():
                ar_dir = cand
                break
    ar_meta = read_sidecar(ar_dir) if ar_dir is not None else None
    cfg = config_from_sidecars(av_meta, ar_meta, model=str(av_dir))
    av_lm = load_model(str(av_dir), device=device, dtype=dtype)
    if av_lm.d_model != cfg.d_model:
        raise NLAError(f"{av_dir}: the model has d_model {av_lm.d_model}, its sidecar says {cfg.d_model}")
    tgt = target or av_lm
    if tgt.d_model != cfg.d_model:
        raise NLAError(
            f"target {tgt.name} has d_model {tgt.d_model} but the NLA at {av_dir} was trained on d_model {cfg.d_model}"
        )
    if cfg.layer >= tgt.n_layers:
        raise NLAError(f"the NLA at {av_dir} reads layer {cfg.layer}, beyond {tgt.name} ({tgt.n_layers} blocks)")
    cfg.n_layers = tgt.n_layers
    cfg.model = tgt.source.get("spec", tgt.name) if target is not None else str(av_dir)
    nla = NLA.__new__(NLA)
    nla.lm, nla.cfg, nla.path = tgt, cfg, av_dir
    av_cfg = NLAConfig.from_dict({**cfg.to_dict(), "n_layers": av_lm.n_layers})
    nla.av = Verbalizer(av_lm, av_cfg, lora=False)
    _check_neighbours(nla.av, cfg, str(av_dir / SIDECAR))
    nla.ar = None
    if ar_dir is not None:
        from safetensors.torch import load_file

        ar_lm = load_model(str(ar_dir), device=device, dtype=dtype)
        if ar_lm.n_layers < cfg.layer + 1:
            raise NLAError(f"{ar_dir}: the AR keeps {ar_lm.n_layers} blocks, needs {cfg.layer + 1}")
        ar_cfg = NLAConfig.from_dict({**cfg.to_dict(), "n_layers": ar_lm.n_layers})
        nla.ar = Reconstructor(ar_lm, ar_cfg, lora=False)
        head = Path(ar_dir) / HEAD_FILE
        if not head.is_file():
            raise NLAError(f"{head} not found: released AR checkpoints ship their d×d head there")
        w = load_file(str(head))
        if "weight" not in w or tuple(w["weight"].shape) != (cfg.d_model, cfg.d_model):
            raise NLAError(f"{head}: expected a 'weight' of shape ({cfg.d_model}, {cfg.d_model})")
        with torch.no_grad():
            nla.ar.head.weight.copy_(w["weight"].to(nla.ar.head.weight.dtype))
    return nla
