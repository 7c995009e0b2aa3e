"""Fuzzing the steering readers (issue #32): preset files (`Preset.load`), the preset JSON a web user uploads
(`Preset.from_dict`, after the JSON parse the server does) and steering-vector files (`SteeringVector.load`). A
tiny valid artefact, one mutation, then the reader. The rule: a valid result, or a `ThoughtscopeError` naming the
file (or "uploaded preset"); never another exception, never a hang, never a write."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from helpers.mutate import (
    BYTE_KINDS,
    Mutation,
    TensorFile,
    byte_mutations,
    dump_json,
    expect_clean,
    json_bytes_mutations,
    json_mutations,
    safetensors_mutations,
)
from hypothesis import event, given
from hypothesis import strategies as st

from thoughtscope.steer.presets import Preset
from thoughtscope.steer.vectors import SteeringVector

PRESET = {
    "format": "thoughtscope-preset-2",
    "name": "fuzz",
    "description": "every kind of item",
    "model": "tiny",
    "interventions": [
        {
            "type": "feature",
            "op": "clamp",
            "site": "resid.1",
            "sae": "default",
            "feature": 3,
            "strength": 2.0,
            "unit": "max",
            "max_act": 1.5,
            "positions": "all",
            "label": "a feature",
            "range": [0, 4],
            "suggested": 2.0,
        },
        {
            "type": "vector",
            "op": "add",
            "site": "resid.1",
            "vector": "happy.safetensors",
            "strength": 0.5,
            "unit": "norm",
            "positions": "generated",
        },
        {"type": "vector", "op": "project_out", "site": "resid.0", "vector": [0.1, -0.2, 0.3, 0.4]},
        {"type": "feature", "op": "ablate", "site": "resid.1", "sae": "saes/mine", "feature": 0, "value": 0.0},
    ],
}
PRESET_BYTES = dump_json(PRESET, indent=2)


def check_preset(p: Preset) -> Preset:
    """What a loaded preset must be: checked items, string texts, and a JSON form that reads back the same."""
    assert isinstance(p.name, str) and isinstance(p.description, str) and isinstance(p.model, str)
    for i, it in enumerate(p.items):
        it.check(f"item {i}")
    d = p.to_dict()
    text = json.dumps(d, allow_nan=False)
    assert Preset.from_dict(json.loads(text), source="round trip").to_dict() == d
    return p


@given(json_bytes_mutations())
def test_preset_file(mutation):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.json"
        path.write_bytes(mutation(PRESET_BYTES))
        expect_clean(lambda: check_preset(Preset.load(path)), names=[str(path)], folder=tmp, mutation=mutation)


@given(json_mutations())
def test_uploaded_preset(mutation):
    """The upload route parses the body with json.loads and hands the value to Preset.from_dict."""
    raw = dump_json(mutation(PRESET))
    try:
        d = json.loads(raw)
    except (ValueError, RecursionError):  # refused by the route's own parse before from_dict sees it
        event("refused by the JSON parse")
        return
    expect_clean(
        lambda: check_preset(Preset.from_dict(d, source="uploaded preset")),
        names=["uploaded preset"],
        mutation=mutation,
    )


def test_preset_template_is_valid(tmp_path):
    path = tmp_path / "p.json"
    path.write_bytes(PRESET_BYTES)
    p = check_preset(Preset.load(path))
    assert len(p.items) == 4 and p.items[3].strength == 0.0


def _vector_file(dtype: str) -> TensorFile:
    v = torch.linspace(-1, 1, 8)
    meta = {
        "site": "resid.1",
        "method": "mean",
        "model": "tiny",
        "n_pairs": "4",
        "typical_norm": "2.5",
        "extra": json.dumps({"note": "fuzz"}),
        "format": "thoughtscope-steering-vector-1",
    }
    if dtype == "bfloat16":
        bits = v.bfloat16().view(torch.int16).numpy().view(np.uint16)
        return TensorFile({"vector": bits}, meta, bf16=("vector",))
    return TensorFile({"vector": v.to(getattr(torch, dtype)).numpy()}, meta)


def read_vector(path: Path) -> SteeringVector:
    sv = SteeringVector.load(path)
    v = sv.vector
    assert v.dim() == 1 and v.numel() > 0 and v.dtype == torch.float32 and bool(torch.isfinite(v).all())
    assert isinstance(sv.site, str) and isinstance(sv.method, str) and isinstance(sv.model, str)
    assert isinstance(sv.n_pairs, int) and sv.n_pairs >= 0
    assert sv.typical_norm is None or (math.isfinite(sv.typical_norm) and sv.typical_norm > 0)
    assert isinstance(sv.extra, dict)
    return sv


dtypes = st.sampled_from(["float32", "float16", "bfloat16"])


def check_vector(dtype: str, mutation: Mutation) -> None:
    tf = _vector_file(dtype)
    # byte mutations change the written file; the others the tensors, metadata or header before it is written
    data = mutation(tf.to_bytes()) if mutation.kind in BYTE_KINDS else mutation(tf)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.safetensors"
        path.write_bytes(data)
        expect_clean(lambda: read_vector(path), names=[str(path)], folder=tmp, mutation=mutation)


@given(dtypes, safetensors_mutations())
def test_vector_file_contents(dtype, mutation):
    check_vector(dtype, mutation)


@given(dtypes, byte_mutations())
def test_vector_file_bytes(dtype, mutation):
    check_vector(dtype, mutation)


def test_vector_templates_are_valid(tmp_path):
    for dtype in ("float32", "float16", "bfloat16"):
        path = tmp_path / f"{dtype}.safetensors"
        path.write_bytes(_vector_file(dtype).to_bytes())
        sv = read_vector(path)
        assert sv.site == "resid.1" and sv.n_pairs == 4 and sv.typical_norm == 2.5 and sv.extra == {"note": "fuzz"}
        assert torch.allclose(sv.vector, torch.linspace(-1, 1, 8), atol=1e-2)


def test_saved_vector_loads(tmp_path):
    """A vector written by SteeringVector.save reads back through the same checks."""
    sv = SteeringVector(torch.randn(6), "resid.2", "pca", "tiny", 3, 1.25, {"a": [1, 2]})
    back = read_vector(sv.save(tmp_path / "s.safetensors"))
    assert torch.equal(back.vector, sv.vector) and back.extra == sv.extra and back.typical_norm == 1.25
