"""Steering that leaves the workbench: llama.cpp control vectors and edited transformers checkpoints.

A control vector (the GGUF layout repeng writes and llama.cpp's `--control-vector` reads: `controlvector.model_hint`,
`controlvector.layer_count`, one float32 `direction.<L>` per layer) is a constant added to the output of block L at
every position, which is exactly our `resid.L` site with an additive edit at positions "all". So only those items
travel: vectors added with op "add" and SAE features with op "add" (their decoder row times the strength); a clamp,
a scale, a projection or an edit limited to some positions depends on the activation and cannot, and the export
names each such item and why. llama.cpp keeps no direction for block 0, so resid.0 cannot travel either.

An edited checkpoint bakes the same additive vectors into a block's MLP output bias (so plain `from_pretrained`
generates what hook-based steering generates), and bakes a direction out of the model as abliteration tools do: every
weight that writes into the residual stream (embeddings, attention and MLP output projections) is orthogonalised to
it, which equals projecting the direction out of every one of those writes (`abliterated`, the hook-based preview).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._io import atomic_dir, atomic_write
from ..errors import SteerError
from ..models import LoadedModel
from ..sites import Site
from .interventions import FeatureEdit, VectorEdit

ARCH = "controlvector"


@dataclass
class ControlVector:
    """Per block index L, the vector llama.cpp adds to block L's output (our resid.L) at every position."""

    directions: dict[int, torch.Tensor]
    model_hint: str
    layer_count: int
    notes: list[str] = field(default_factory=list)

    @property
    def d_model(self) -> int:
        return int(next(iter(self.directions.values())).shape[0]) if self.directions else 0


def additive_vectors(interventions, lm: LoadedModel) -> tuple[dict[int, torch.Tensor], list[str]]:
    """The constant vector each block's output gets from `interventions`, and why each other item cannot travel."""
    out: dict[int, torch.Tensor] = {}
    refused = []
    for i, iv in enumerate(interventions):
        what = f"item {i}" + (f" ({iv.label})" if getattr(iv, "label", "") else "")
        site = Site.parse(iv.site)
        vec, why = _constant_of(iv)
        if why is None and iv.positions != "all":
            why = f"it acts on positions {iv.positions!r} only, and a control vector is added at every position"
        if why is None and site.layer == 0:
            why = "it acts on resid.0, and llama.cpp applies control vectors from block 1 on"
        if why is not None:
            refused.append(f"{what}: {why}")
            continue
        v = vec.detach().float().cpu()
        out[site.layer] = out[site.layer] + v if site.layer in out else v
    return out, refused


def _constant_of(iv) -> tuple[torch.Tensor | None, str | None]:
    """(the constant added, None) for an additive edit; (None, why not) for any other."""
    if isinstance(iv, VectorEdit):
        if iv.op != "add":
            return None, f"op {iv.op!r} depends on the activation (only op 'add' is a constant vector)"
        return iv.strength * iv.vector, None
    if isinstance(iv, FeatureEdit):
        if iv.op != "add":
            return None, f"a feature {iv.op} depends on the feature's activation (only a feature 'add' is a constant)"
        return iv.target * iv.sae.W_dec[iv.feature], None
    return None, f"{type(iv).__name__} is not an edit this export knows"


def control_vector(lm: LoadedModel, interventions) -> ControlVector:
    """The control vector equal to `interventions`; SteerError naming every item that cannot travel, if any."""
    dirs, refused = additive_vectors(interventions, lm)
    if refused:
        raise SteerError(
            "these items cannot travel as a llama.cpp control vector (a constant added to a block's output at "
            "every position): " + "; ".join(refused)
        )
    if not dirs:
        raise SteerError("nothing to export: the preset has no additive items")
    hint = str(getattr(lm.model.config, "model_type", "") or lm.name)
    return ControlVector(dirs, hint, lm.n_layers)


def write_control_vector(cv: ControlVector, path: str | Path) -> Path:
    """Write `cv` as a GGUF control vector (repeng's layout), atomically."""
    import gguf
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "cv.gguf"
        w = gguf.GGUFWriter(str(staged), ARCH)
        w.add_string(f"{ARCH}.model_hint", cv.model_hint)
        w.add_uint32(f"{ARCH}.layer_count", len(cv.directions))
        for layer in sorted(cv.directions):
            w.add_tensor(f"direction.{layer}", cv.directions[layer].numpy().astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        data = staged.read_bytes()
    return atomic_write(path, lambda f: f.write(data))


def read_control_vector(path: str | Path, lm: LoadedModel | None = None) -> ControlVector:
    """A GGUF control vector; with `lm`, refused unless its layers and width fit that model."""
    import gguf

    path = Path(path)
    try:
        r = gguf.GGUFReader(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise SteerError(f"{path} is not a readable GGUF control vector: {e}") from None

    def field_value(key: str):
        f = r.fields.get(key)
        if f is None:
            return None
        part = f.parts[f.data[0]]
        return bytes(part).decode("utf-8") if f.types and f.types[0] == gguf.GGUFValueType.STRING else part[0].item()

    dirs = {}
    for t in r.tensors:
        if not t.name.startswith("direction."):
            continue
        try:
            layer = int(t.name.split(".", 1)[1])
        except ValueError:
            raise SteerError(f"{path}: tensor {t.name!r} is not direction.<layer>") from None
        dirs[layer] = torch.tensor(t.data.astype("float32")).reshape(-1)
    if not dirs:
        raise SteerError(f"{path} holds no direction.<layer> tensors: not a control vector")
    cv = ControlVector(dirs, str(field_value(f"{ARCH}.model_hint") or ""), int(max(dirs) + 1))
    if lm is not None:
        check_fits(cv, lm, path)
    return cv


def check_fits(cv: ControlVector, lm: LoadedModel, where: str | Path = "control vector") -> None:
    """Refuse a control vector made for another shape of model (layers or width)."""
    bad = [layer for layer in cv.directions if not 1 <= layer < lm.n_layers]
    if bad:
        raise SteerError(
            f"{where} has directions for layers {bad}, but {lm.name} has blocks 0..{lm.n_layers - 1} "
            f"(control vectors apply from block 1): it was made for another model"
        )
    if cv.d_model != lm.d_model:
        raise SteerError(f"{where} has {cv.d_model}-dimensional directions but {lm.name} has d_model={lm.d_model}")
    ours = str(getattr(lm.model.config, "model_type", "") or "")
    if cv.model_hint and ours and cv.model_hint != ours:
        cv.notes.append(f"it was made for a {cv.model_hint!r} model and {lm.name} is {ours!r}; shapes match")


def control_vector_preset(cv: ControlVector, name: str, lm: LoadedModel):
    """A preset of additive vector items (strength 1, raw units) equal to the control vector."""
    from .presets import Preset, PresetItem

    items = [
        PresetItem("vector", "add", f"resid.{layer}", 1.0, vector=cv.directions[layer].tolist(), label=f"block {layer}")
        for layer in sorted(cv.directions)
    ]
    return Preset(name, items, f"imported llama.cpp control vector ({cv.model_hint or 'no model hint'})", lm.name)


# --------------------------------------------------------------------------- edited checkpoints


def _block(lm: LoadedModel, layer: int):
    return lm.layers[layer]


def _writes_out(mod, d: int) -> bool:
    w = getattr(mod, "weight", None)
    if w is None or w.dim() != 2:
        return False
    is_conv1d = type(mod).__name__ == "Conv1D"
    return (w.shape[1] if is_conv1d else w.shape[0]) == d


def _mlp_out(lm: LoadedModel, layer: int):
    """The module whose output a block adds to the residual stream as its MLP write, or SteerError why not."""
    blk = _block(lm, layer)
    if any(hasattr(blk, n) for n in ("post_feedforward_layernorm", "post_mlp_layernorm")):
        raise SteerError(
            f"{lm.name}: block {layer} normalises its MLP output before adding it to the residual stream, so no "
            f"bias can add a constant there; steer it with hooks, or export a llama.cpp control vector"
        )
    mlp = getattr(blk, "mlp", None)
    outs = [m for m in (mlp.children() if mlp is not None else ()) if _writes_out(m, lm.d_model)]
    if len(outs) != 1:
        raise SteerError(f"{lm.name}: cannot find block {layer}'s MLP output projection (found {len(outs)})")
    return outs[0]


def _residual_writers(lm: LoadedModel) -> list:
    """Every module that writes into the residual stream: embeddings, and per block its attention and MLP outputs."""
    writers = [lm.model.get_input_embeddings()]
    pos = getattr(getattr(lm.model, "transformer", None), "wpe", None)
    if pos is not None:
        writers.append(pos)
    for layer in range(lm.n_layers):
        blk = _block(lm, layer)
        attn = next((getattr(blk, n) for n in ("self_attn", "attn", "attention") if hasattr(blk, n)), None)
        found = [m for m in (attn.children() if attn is not None else ()) if _writes_out(m, lm.d_model)]
        found = [m for m in found if type(m).__name__ in ("Linear", "Conv1D")]
        names = [n for n, m in (attn.named_children() if attn is not None else ()) if m in found]
        keep = [m for n, m in zip(names, found) if n in ("o_proj", "c_proj", "dense", "out_proj")]
        if len(keep) != 1:
            raise SteerError(f"{lm.name}: cannot find block {layer}'s attention output projection")
        writers += [keep[0], _mlp_out(lm, layer)]
    return writers


@contextmanager
def abliterated(lm: LoadedModel, direction: torch.Tensor) -> Iterator[None]:
    """Hook-based preview of baking `direction` out: project it out of every write into the residual stream."""
    u = (direction.float() / direction.float().norm()).to(lm.device)

    def hook(_mod, _inp, out):
        return out - (out.float() @ u)[..., None].to(out.dtype) * u.to(out.dtype)

    handles = [m.register_forward_hook(hook) for m in _residual_writers(lm)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _orthogonalise(mod, u: torch.Tensor) -> None:
    """Make `mod`'s output orthogonal to u: W' = W - u uᵀ W on the output side (and its bias)."""
    w = mod.weight.data
    if isinstance(mod, torch.nn.Embedding):
        w -= (w.float() @ u)[:, None].to(w.dtype) * u.to(w.dtype)
        return
    if type(mod).__name__ == "Conv1D":  # [in, out]
        w -= (w.float() @ u)[:, None].to(w.dtype) * u.to(w.dtype)
    else:  # Linear [out, in]
        w -= u[:, None].to(w.dtype) * (u.to(w.dtype) @ w)[None, :]
    b = getattr(mod, "bias", None)
    if b is not None:
        b.data -= (b.data.float() @ u).to(b.dtype) * u.to(b.dtype)


def split_for_checkpoint(interventions, *, abliterate: bool = False):
    """(additive interventions, directions to abliterate); SteerError naming every item a checkpoint cannot hold."""
    additive, directions, refused = [], [], []
    for i, iv in enumerate(interventions):
        if isinstance(iv, VectorEdit) and iv.op == "project_out" and iv.positions == "all":
            if abliterate:
                directions.append(iv.vector)
            else:
                refused.append(
                    f"item {i}: a projection at one site cannot be baked exactly; pass --abliterate to bake the "
                    f"direction out of every write into the residual stream instead (a stronger edit)"
                )
            continue
        _, why = _constant_of(iv)
        if why is None and iv.positions != "all":
            why = f"it acts on positions {iv.positions!r} only, and a baked bias acts at every position"
        if why is not None:
            refused.append(f"item {i}: {why}")
        else:
            additive.append(iv)
    if refused:
        raise SteerError("these items cannot be baked into a checkpoint: " + "; ".join(refused))
    return additive, directions


def edited_model(lm: LoadedModel, interventions, *, abliterate: bool = False) -> LoadedModel:
    """A copy of the model with the additive items baked into MLP output biases and, with `abliterate`, every
    projected-out direction orthogonalised out of the residual writers; the original model is left unchanged."""
    import copy

    additive, directions = split_for_checkpoint(interventions, abliterate=abliterate)
    vectors, _ = additive_vectors(additive, lm)
    model = copy.deepcopy(lm.model).cpu()
    if directions and getattr(model.config, "tie_word_embeddings", False):
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    if any(getattr(_mlp_out(lm, layer), "bias", None) is None for layer in vectors):
        model = _with_mlp_bias(model, lm)
    out = LoadedModel(model, lm.tokenizer, lm.name, dict(lm.source or {}))
    with torch.no_grad():
        for d in directions:
            u = d.float().cpu() / d.float().norm()
            for mod in _residual_writers(out):
                _orthogonalise(mod, u)
        for layer, v in vectors.items():
            bias = _mlp_out(out, layer).bias
            bias += v.to(bias.dtype)
    return out


def _with_mlp_bias(model, lm: LoadedModel):
    """The same weights in a model built with `mlp_bias=True` (zero biases), or SteerError if the family has none."""
    import copy

    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    if not hasattr(cfg, "mlp_bias"):
        raise SteerError(
            f"{lm.name} ({cfg.model_type}) has no bias on its MLP output and its config cannot add one (no "
            f"'mlp_bias'): an additive vector cannot be baked into it; export a llama.cpp control vector instead"
        )
    cfg.mlp_bias = True
    new = AutoModelForCausalLM.from_config(cfg).to(next(model.parameters()).dtype)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.endswith(".bias") for k in missing):
        raise SteerError(f"{lm.name}: rebuilding with MLP biases left weights unmatched: {unexpected or missing}")
    with torch.no_grad():
        for name, p in new.named_parameters():
            if name in missing:
                p.zero_()
    if getattr(cfg, "tie_word_embeddings", False):
        new.tie_weights()
    return new.eval()


def bake_checkpoint(lm: LoadedModel, interventions, out: str | Path, *, abliterate: bool = False, about=None) -> Path:
    """Write a transformers checkpoint (loads with plain `from_pretrained`) that generates what the hooks do."""
    edited = edited_model(lm, interventions, abliterate=abliterate)
    out = Path(out)
    with atomic_dir(out) as tmp:
        edited.model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        (tmp / "thoughtscope_edit.json").write_text(
            json.dumps({"base_model": lm.source or lm.name, "edit": about or {}, "abliterate": abliterate}, indent=2)
        )
        for f in [tmp, *tmp.iterdir()]:  # ordinary permissions, as any checkpoint folder has
            f.chmod(0o755 if f.is_dir() else 0o644)
    return out


def export_preset(
    lm: LoadedModel,
    preset,
    *,
    control_vector_path: str | Path | None = None,
    checkpoint: str | Path | None = None,
    abliterate: bool = False,
) -> list[str]:
    """Export a preset (name, file or Preset) as a control vector and/or an edited checkpoint; lines saying what
    was written. Every check runs before anything is written."""
    from .presets import Preset

    p = preset if isinstance(preset, Preset) else Preset.load(preset)
    ivs = p.build(lm)
    cv = control_vector(lm, ivs) if control_vector_path is not None else None
    if checkpoint is not None:
        split_for_checkpoint(ivs, abliterate=abliterate)
    lines = []
    if cv is not None:
        path = write_control_vector(cv, control_vector_path)
        layers = ", ".join(str(x) for x in sorted(cv.directions))
        lines.append(
            f"control vector {path}: blocks {layers}, strength folded in (llama.cpp: --control-vector {path.name})"
        )
    if checkpoint is not None:
        about = {"preset": p.name, "items": [it.to_dict() for it in p.items if not isinstance(it.vector, list)]}
        out = bake_checkpoint(lm, ivs, checkpoint, abliterate=abliterate, about=about)
        lines.append(f"checkpoint {out}: loads with AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return lines


def import_control_vector(lm: LoadedModel, path: str | Path, out: str | Path) -> tuple[Path, list[str]]:
    """Save a llama.cpp control vector as a preset of additive vectors (checked against the model)."""
    cv = read_control_vector(path, lm)
    preset = control_vector_preset(cv, Path(path).stem, lm)
    return preset.save(out), cv.notes
