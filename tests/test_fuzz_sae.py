"""Fuzzing the SAE readers (issue #32): every file of an SAE folder, in all four formats (native, SAELens, sparsify,
dictionary_learning) and the feature statistics beside the weights, damaged one file at a time.

Each example copies a tiny valid folder (tests/fixtures/sae_v1, written by earlier code in each format), mutates one
of its files, then loads it with ``load_sae`` and encodes and decodes two rows. The rule (helpers.mutate.expect_clean):
the SAE loads and works, or ``load_sae`` raises a ThoughtscopeError whose message names the folder's path; never
another exception type, never past the time bound, never a write to the folder.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.mutate import (
    JSON_SAMPLES,
    TensorFile,
    byte_mutations,
    expect_clean,
    expect_unmutated,
    json_bytes_mutations,
    read_tree,
    safetensors_mutations,
    write_tree,
)
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import load as np_load

from thoughtscope.sae import load_sae
from thoughtscope.sae.stats import STATS_FILE, FeatureStats, save_feature_stats

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = Path(__file__).parent / "fixtures" / "sae_v1"
FORMATS = {
    "native": ("native-topk", "native-jumprelu", "native-batchtopk", "native-batchtopk-untrained", "native-relu-l1"),
    "native-float16": ("half-topk",),
    "saelens": ("sl-topk", "sl-jumprelu", "sl-batchtopk", "sl-relu-l1"),
    "sparsify": ("sparsify",),
    "dictionary_learning": ("dl-AutoEncoder", "dl-AutoEncoderTopK", "dl-BatchTopKSAE", "dl-JumpReluAutoEncoder"),
}
CONFIG_FILES = ("cfg.json", "config.json")
WEIGHT_FILES = ("sae_weights.safetensors", "sae.safetensors", "ae.pt", STATS_FILE)
STATS_FOLDER = "native-topk+stats"  # a native folder with feature_stats.safetensors beside its weights


def _trees() -> dict[str, dict[str, bytes]]:
    """Every fixture folder as relative path -> bytes, plus one native folder that carries feature statistics."""
    trees = {name: read_tree(FIXTURES / name) for names in FORMATS.values() for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tree(Path(tmp) / "sae", trees["native-topk"])
        m = load_sae(folder).cfg.n_features
        g = torch.Generator().manual_seed(0)
        save_feature_stats(
            FeatureStats(torch.rand(m, generator=g) * 5, torch.rand(m, generator=g), "fuzz", 1000), folder
        )
        trees[STATS_FOLDER] = read_tree(folder)
    return trees


TREES = _trees()
FOLDERS = sorted(TREES)


def _files(kinds: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(name, f) for name in FOLDERS for f in TREES[name] if f in kinds]


def _use(folder: Path):
    """The reader and one cheap use: load, then encode and decode two rows."""
    sae = load_sae(folder)
    x = torch.randn(2, sae.cfg.d_model, generator=torch.Generator().manual_seed(0))
    f = sae.encode(x)
    assert f.shape == (2, sae.cfg.n_features)
    assert sae.decode(f).shape == (2, sae.cfg.d_model)
    if sae.feature_stats is not None:
        assert sae.feature_stats.max_act.shape == (sae.cfg.n_features,)
    return sae


def _check(name: str, rel: str, data: bytes, mutation) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tree(Path(tmp) / name, {**TREES[name], rel: data})
        expect_clean(lambda: _use(folder), names=[str(folder)], folder=folder, mutation=mutation)


@pytest.mark.parametrize("name", FOLDERS)
def test_every_fixture_folder_loadsexpect_unmutated(name):
    """The fuzz tests start from valid folders: each one loads and encodes as it is, and writes nothing."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tree(Path(tmp) / name, TREES[name])
        sae = expect_unmutated(lambda: _use(folder), folder)
        assert (sae.feature_stats is not None) == (name == STATS_FOLDER)


@given(target=st.sampled_from(_files(CONFIG_FILES)), m=json_bytes_mutations())
def test_config_files(target, m):
    """cfg.json (native, SAELens, sparsify) and config.json (dictionary_learning): JSON and byte mutations."""
    name, rel = target
    _check(name, rel, m(TREES[name][rel]), m)


@given(target=st.sampled_from(_files(WEIGHT_FILES)), m=byte_mutations())
def test_weight_files_bytes(target, m):
    """The weights (safetensors or ae.pt) and the feature statistics: truncated, flipped, emptied, garbage."""
    name, rel = target
    _check(name, rel, m(TREES[name][rel]), m)


def _tensor_file(data: bytes) -> TensorFile:
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as fh:
        fh.write(data)
        fh.flush()
        with safe_open(fh.name, framework="np") as f:
            meta = f.metadata()
    return TensorFile(dict(np_load(data)), meta)


SAFETENSORS = [t for t in _files(WEIGHT_FILES) if t[1].endswith(".safetensors")]


@given(target=st.sampled_from(SAFETENSORS), m=safetensors_mutations())
def test_safetensors_contents(target, m):
    """The tensors themselves: wrong dtype or shape, NaN/Inf, huge dimensions, missing and extra tensors, metadata,
    lying offsets and header lengths, a mutated header."""
    name, rel = target
    _check(name, rel, m(_tensor_file(TREES[name][rel])), m)


# ae.pt (dictionary_learning) is a torch pickle of a state dict: the tensor mutations are drawn as for safetensors,
# read back as torch tensors and saved with torch.save; values of other types replace a tensor as well.
TENSOR_KINDS = ("wrong_dtype", "wrong_shape", "nan_inf", "missing_tensor", "extra_tensor")
AE_PT = [t for t in _files(("ae.pt",))]


def _state_dict(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _save(sd: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


@given(target=st.sampled_from(AE_PT), m=safetensors_mutations(TENSOR_KINDS))
def test_state_dict_tensors(target, m):
    name, rel = target
    sd = _state_dict(TREES[name][rel])
    from safetensors.torch import load as torch_load

    mutated = torch_load(m(TensorFile({k: v.numpy() for k, v in sd.items()})))
    _check(name, rel, _save(mutated), m)


@given(target=st.sampled_from(AE_PT), pick=st.integers(0, 1000), value=st.sampled_from(JSON_SAMPLES))
def test_state_dict_values_of_other_types(target, pick, value):
    """A tensor of ae.pt replaced by None, a bool, a number, a string, a list or a dict."""
    name, rel = target
    sd = _state_dict(TREES[name][rel])
    key = sorted(sd)[pick % len(sd)]
    sd[key] = value
    _check(name, rel, _save(sd), None)


@given(
    target=st.sampled_from(AE_PT),
    value=st.sampled_from([[], [1, 2], "state", 3, None, {"k": torch.zeros(2)}, np.zeros(2).tolist()]),
)
def test_state_dict_root_of_another_type(target, value):
    name, rel = target
    _check(name, rel, _save(value), None)
