"""Fuzzing the NLA and probe readers (issue #32): NLA folders (``load_nla``: nla_config.json, av.safetensors,
ar.safetensors), an NLA stage's resumable state (``nla.checkpoint.load_state``: train_state/<stage>.pt), probe folders
(``load_probe``: config.json, probe.safetensors) and a probe sweep's JSON (``probes.sweep.load_json``).

Each example writes a tiny valid artefact, mutates one of its files, calls the reader and uses the result once
(the AR reconstructs one explanation; the resumed optimiser takes a step; the probe scores a row; the sweep's table
and verdict are built). The rule (helpers.mutate.expect_clean): it works, or raises a ThoughtscopeError whose
message names the file; never another exception type, never past the time bound, never a write.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import pytest
import torch
from helpers.mutate import (
    TensorFile,
    byte_mutations,
    expect_clean,
    expect_unmutated,
    json_bytes_mutations,
    json_mutations,
    read_tree,
    safetensors_mutations,
    write_tree,
)
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import load as np_load
from safetensors.torch import load as torch_load

from thoughtscope.models import tiny_model
from thoughtscope.nla import NLA, NLATrainConfig, config_for, load_nla
from thoughtscope.nla.checkpoint import load_state, save_state, state_path
from thoughtscope.probes.config import SweepConfig
from thoughtscope.probes.datasets import ProbeSet
from thoughtscope.probes.probe import Probe, ProbeConfig, load_probe
from thoughtscope.probes.report import sweep_table, sweep_verdict
from thoughtscope.probes.sweep import load_json, save_json, sweep_arrays

pytestmark = pytest.mark.usefixtures("one_thread")

STAGE = "rl"  # the state with the most in it: AV and AR weights, the AV's and the AR's optimisers
TENSOR_KINDS = ("wrong_dtype", "wrong_shape", "nan_inf", "missing_tensor", "extra_tensor")


# ------------------------------------------------------------------------------------------ NLA folders
@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", d_model=32, n_layers=3, seed=0)


@pytest.fixture(scope="module")
def nla_tree(lm, tmp_path_factory) -> dict[str, bytes]:
    """A tiny NLA folder (config + non-zero adapters) with an rl stage's state file, as relative path -> bytes."""
    d = tmp_path_factory.mktemp("fuzz-nla") / "nla"
    nla = NLA(lm, config_for(lm, site="resid.1", injection_scale=6.0, lora_rank=2, max_new_tokens=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in nla.av.trainable_parameters() + nla.ar.trainable_parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    nla.save(d)
    cfg, opt, ar_opt = _stage(nla)
    for o in (opt, ar_opt):  # one step each, so the optimisers have moments to save
        for p in o.param_groups[0]["params"]:
            p.grad = torch.full_like(p, 1e-3)
        o.step()
        o.zero_grad()
    save_state(d, cfg, nla, opt, ar_opt, 1, [{"step": 1, "reward": -1.0}], done=False)
    return read_tree(d)


def _stage(nla: NLA):
    cfg = NLATrainConfig(stage=STAGE, steps=4, batch_size=2, group_size=2)
    opt = torch.optim.AdamW(nla.av.trainable_parameters(), lr=cfg.lr)
    ar_opt = torch.optim.AdamW(nla.ar.trainable_parameters(), lr=cfg.ar_lr)
    return cfg, opt, ar_opt


def _use_nla(folder: Path, lm) -> torch.Tensor:
    nla = load_nla(folder, lm=lm)
    rec = nla.reconstruct(["the cat sat"])
    assert rec.shape == (1, lm.d_model)
    return rec


def _check_nla(tree, rel: str, data: bytes, lm, mutation) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tree(Path(tmp) / "nla", {k: v for k, v in tree.items() if "train_state" not in k} | {rel: data})
        expect_clean(lambda: _use_nla(folder, lm), names=[str(folder)], folder=folder, timeout=30, mutation=mutation)


def test_unmutated_nla_loads_and_resumes(nla_tree, lm):
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tree(Path(tmp) / "nla", nla_tree)
        expect_unmutated(lambda: _use_nla(folder, lm), folder)
        nla = load_nla(folder, lm=lm)
        assert expect_unmutated(lambda: _resume(folder, nla), folder) == (1, [{"step": 1, "reward": -1.0}])


@given(m=json_bytes_mutations())
def test_nla_config(nla_tree, lm, m):
    """nla_config.json: JSON mutations (missing, extra and mistyped keys, NaN, huge numbers, ...) and byte ones."""
    _check_nla(nla_tree, "nla_config.json", m(nla_tree["nla_config.json"]), lm, m)


@given(rel=st.sampled_from(["av.safetensors", "ar.safetensors"]), m=byte_mutations())
def test_nla_adapter_bytes(nla_tree, lm, rel, m):
    _check_nla(nla_tree, rel, m(nla_tree[rel]), lm, m)


@given(rel=st.sampled_from(["av.safetensors", "ar.safetensors"]), m=safetensors_mutations())
def test_nla_adapter_tensors(nla_tree, lm, rel, m):
    """The adapters' tensors: wrong dtype or shape, NaN/Inf, huge dimensions, missing and extra tensors, ..."""
    _check_nla(nla_tree, rel, m(TensorFile(dict(np_load(nla_tree[rel])))), lm, m)


# ------------------------------------------------------------------------------------------ NLA stage state
@pytest.fixture(scope="module")
def nla_obj(nla_tree, lm, tmp_path_factory):
    """One NLA the state tests restore into (a state only changes its adapter values, never their shapes)."""
    return load_nla(write_tree(tmp_path_factory.mktemp("fuzz-nla-obj") / "nla", nla_tree), lm=lm)


def _resume(folder: Path, nla: NLA):
    """load_state, then one optimiser step of each optimiser from what it restored."""
    cfg, opt, ar_opt = _stage(nla)
    step, history = load_state(folder, cfg, nla, opt, ar_opt)
    for o in (opt, ar_opt):
        for p in o.param_groups[0]["params"]:
            p.grad = torch.zeros_like(p)
        o.step()
        o.zero_grad(set_to_none=True)
    return step, history


def _check_state(tree, nla, data: bytes, mutation) -> None:
    rel = state_path(Path("."), STAGE).as_posix()
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tree(Path(tmp) / "nla", tree | {rel: data})
        saved = [{k: v.detach().clone() for k, v in m.adapter_state().items()} for m in (nla.av, nla.ar)]
        try:
            expect_clean(
                lambda: _resume(folder, nla), names=[str(folder)], folder=folder, timeout=30, mutation=mutation
            )
        finally:
            nla.av.load_adapter_state(saved[0])
            nla.ar.load_adapter_state(saved[1])


def _state(tree) -> dict:
    return torch.load(io.BytesIO(tree[state_path(Path("."), STAGE).as_posix()]), weights_only=True)


def _save(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@given(m=byte_mutations())
def test_nla_state_bytes(nla_tree, nla_obj, m):
    _check_state(nla_tree, nla_obj, m(nla_tree[state_path(Path("."), STAGE).as_posix()]), m)


@given(m=json_mutations())
def test_nla_state_structure(nla_tree, nla_obj, m):
    """The state's containers and numbers (step, history, config, optimiser settings and moments, weights):
    keys dropped or added, values of another type, NaN/Inf, huge numbers, deep nesting, another root."""
    _check_state(nla_tree, nla_obj, _save(m(_state(nla_tree))), m)


def _leaves(obj, prefix=()) -> dict[tuple, torch.Tensor]:
    """Every tensor in a nest of dicts and lists, by its path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    out = {}
    for k, v in items:
        out.update(_leaves(v, (*prefix, k)))
    return out


@given(m=safetensors_mutations(TENSOR_KINDS))
def test_nla_state_tensors(nla_tree, nla_obj, m):
    """The state's tensors (adapter weights and optimiser moments): wrong dtype or shape, NaN/Inf, one dropped."""
    st_ = _state(nla_tree)
    leaves = _leaves(st_)
    names = {"/".join(map(str, p)): p for p in leaves}
    mutated = torch_load(m(TensorFile({n: leaves[p].numpy() for n, p in names.items()})))
    for n, path in names.items():
        parent = st_
        for k in path[:-1]:
            parent = parent[k]
        if n in mutated:
            parent[path[-1]] = mutated[n]
        else:
            del parent[path[-1]]
    st_.update({n: t for n, t in mutated.items() if n not in names})  # an extra tensor: a key the state lacks
    _check_state(nla_tree, nla_obj, _save(st_), m)


# ------------------------------------------------------------------------------------------ probes
def _probe_tree() -> dict[str, bytes]:
    g = torch.Generator().manual_seed(0)
    cfg = ProbeConfig(
        model="tiny-llama",
        site="resid.1",
        d_model=16,
        fitter="logistic",
        dataset="tiny",
        dataset_sha256="0" * 64,
        class_gap=1.5,
        metrics={"test_auroc": 0.91, "test_auroc_ci": [0.8, 0.97], "n_train": 30, "n_test": 10, "C": 1.0},
    )
    with tempfile.TemporaryDirectory() as tmp:
        return read_tree(Probe(torch.randn(16, generator=g), 0.25, 0.1, cfg).save(Path(tmp) / "probe"))


PROBE = _probe_tree()


def _use_probe(folder: Path) -> Probe:
    probe = load_probe(folder)
    assert probe.score(torch.ones(2, probe.cfg.d_model)).shape == (2,)
    repr(probe)
    return probe


def _check_probe(rel: str, data: bytes, mutation) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tree(Path(tmp) / "probe", PROBE | {rel: data})
        expect_clean(lambda: _use_probe(folder), names=[str(folder)], folder=folder, mutation=mutation)


def test_unmutated_probe_loads():
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tree(Path(tmp) / "probe", PROBE)
        expect_unmutated(lambda: _use_probe(folder), folder)


@given(m=json_bytes_mutations())
def test_probe_config(m):
    _check_probe("config.json", m(PROBE["config.json"]), m)


@given(m=byte_mutations())
def test_probe_weights_bytes(m):
    _check_probe("probe.safetensors", m(PROBE["probe.safetensors"]), m)


@given(m=safetensors_mutations())
def test_probe_weights_tensors(m):
    """probe.safetensors' weight and direction: wrong dtype or shape, NaN/Inf, huge dimensions, one missing, ..."""
    _check_probe("probe.safetensors", m(TensorFile(dict(np_load(PROBE["probe.safetensors"])))), m)


# ------------------------------------------------------------------------------------------ sweep JSON
def _sweep_bytes() -> bytes:
    g = torch.Generator().manual_seed(0)
    n, d = 48, 8
    y = torch.randint(0, 2, (n,), generator=g)
    u = torch.randn(d, generator=g)
    acts = {
        s: torch.randn(n, d, generator=g) + k * (2 * y[:, None].float() - 1) * u
        for k, s in enumerate(["embed", "resid.0"])
    }
    ds = ProbeSet(
        [f"text {i}" for i in range(n)],
        y.tolist(),
        [f"g{i // 2}" for i in range(n)],
        "tiny",
        entities=[f"e{i % 8}" for i in range(n)],
    )
    out = sweep_arrays(acts, ds, SweepConfig(fitters=("mean", "lda"), n_random=5, n_shuffle=2, n_boot=10, cv_folds=2))
    out["model"] = "tiny-llama"
    with tempfile.TemporaryDirectory() as tmp:
        return save_json(out, Path(tmp) / "sweep.json").read_bytes()


SWEEP = _sweep_bytes()


def _use_sweep(path: Path) -> dict:
    out = load_json(path)
    _render(out)
    return out


def _render(out: dict) -> str:
    """The table and the verdict as the terminal shows them (names from the file are escaped, never markup)."""
    from rich.console import Console

    console = Console(record=True, width=200, file=io.StringIO())
    console.print(sweep_table(out))
    console.print(sweep_verdict(out))
    return console.export_text()


def test_a_sweep_whose_names_look_like_markup_prints_them_as_text():
    out = json.loads(SWEEP)
    out["dataset"], out["model"] = "[/]data[bold]", "[red]model"
    text = _render(out)
    assert "[/]data[bold]" in text and "[red]model" in text


@given(m=json_bytes_mutations())
def test_sweep_json(m):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / "sweep.json"
        path.write_bytes(m(SWEEP))
        expect_clean(lambda: _use_sweep(path), names=[str(path)], folder=folder, mutation=m)


def test_unmutated_sweep_loads_and_renders():
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sweep.json"
        path.write_bytes(SWEEP)
        assert expect_unmutated(lambda: _use_sweep(path), tmp)["best_fitter"] in ("mean", "lda")
