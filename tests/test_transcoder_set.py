"""Transcoder sets: one transcoder per block, stored as one folder (int8 / float16 / float32), and other tools' sets
(circuit-tracer, Gemma Scope) read from a local folder with the same outputs as theirs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.transcoder_sets import (
    foreign_layer,
    random_transcoder,
    random_transcoder_set,
    their_forward,
    write_circuit_tracer,
    write_gemma_scope_npz,
)
from safetensors.torch import save_file

from thoughtscope.models import tiny_model
from thoughtscope.sae.config import SAEError
from thoughtscope.sae.transcoder_set import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    TranscoderSet,
    bytes_per_layer,
    dequantize_rows,
    load_transcoder_set,
    quantization_report,
    quantize_rows,
    save_transcoder_set,
    stored_copy,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


D, M = 16, 64


def _x(n=256, d=D, seed=7):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- our format
@pytest.mark.parametrize("arch", ["transcoder", "jumprelu-transcoder"])
def test_float32_round_trip_is_exact(tmp_path, arch):
    ts = random_transcoder_set(3, D, M, arch=arch, skip=arch == "jumprelu-transcoder")
    ts.model = {"spec": "tiny:llama", "registered": None}
    save_transcoder_set(ts, tmp_path / "set", quantize="none")
    back = load_transcoder_set(tmp_path / "set")
    assert back.n_layers == 3 and back.d_model == D and len(back) == 3 and back.model == ts.model
    assert back.source == str(tmp_path / "set")
    for a, b in zip(ts, back, strict=True):
        assert type(a) is type(b) and not b.training and b.W_dec.dtype == torch.float32
        assert b.cfg.to_dict() == a.cfg.to_dict()
        for name, p in a.named_parameters():
            assert torch.equal(p, dict(b.named_parameters())[name]), name
        assert torch.equal(a(_x())[1], b(_x())[1])


def test_manifest_records_sizes_and_configs(tmp_path):
    ts = random_transcoder_set(2, D, M)
    save_transcoder_set(ts, tmp_path / "s")
    man = json.loads((tmp_path / "s" / MANIFEST_FILE).read_text())
    assert man["version"] == 1 and man["quantize"] == "int8" and man["n_layers"] == 2 and man["d_model"] == D
    assert [entry["config"]["site"] for entry in man["layers"]] == ["mlp_in.0", "mlp_in.1"]
    per = bytes_per_layer(D, M, skip=True, jumprelu=True, quantize="int8")
    assert [entry["bytes"] for entry in man["layers"]] == [per, per] and man["bytes"] == 2 * per
    # the file is the tensors plus a header (names, shapes, offsets) of a few kB at most
    assert 0 < (tmp_path / "s" / WEIGHTS_FILE).stat().st_size - 2 * per < 8192
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted([MANIFEST_FILE, WEIGHTS_FILE])


def test_bytes_per_layer_of_the_shipped_shape():
    """d 576, m 2048 with skip (SmolLM2-135M, 30 blocks): only int8 keeps 30 layers under 100 MB."""
    got = {q: bytes_per_layer(576, 2048, skip=True, jumprelu=True, quantize=q) for q in ("int8", "float16", "none")}
    assert got == {"int8": 2_730_752, "float16": 5_403_136, "none": 10_785_280}
    assert 30 * got["int8"] < 100e6 < 30 * got["float16"]
    assert (
        bytes_per_layer(576, 2048, skip=False, jumprelu=False, quantize="int8")
        == 2048 * 576 * 2 + 2 * 2048 * 4 + (2048 + 2 * 576) * 4
    )


def test_int8_rounding_is_within_half_a_step():
    w = torch.randn(50, 40, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 50)[:, None]
    w[7] = 0  # an all-zero row stays zero (no division by a zero scale)
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and int(q.abs().max()) == 127
    back = dequantize_rows(q, scale)
    assert bool(((back - w).abs() <= scale[:, None] / 2 * (1 + 1e-5) + 1e-12).all())
    assert torch.equal(back[7], torch.zeros(40))
    assert float((back - w).norm() / w.norm()) < 0.01


@pytest.mark.parametrize("arch", ["transcoder", "jumprelu-transcoder"])
def test_int8_output_error_is_measured_and_bounded(tmp_path, arch):
    """Bounds tested on Gaussian inputs (d 16, m 64, skip): the decoder and skip alone (the same code) < 1 %; end to
    end, where rounding the encoder moves latents near the top-k boundary or a threshold across it, < 10 % (TopK)
    and < 3 % (JumpReLU). The report is what a set loaded from an int8 folder gives."""
    ts = random_transcoder_set(2, D, M, arch=arch)
    save_transcoder_set(ts, tmp_path / "q", quantize="int8")
    loaded = load_transcoder_set(tmp_path / "q")
    xs = [_x(seed=1), _x(seed=2)]
    rep = quantization_report(ts, xs)
    for layer in (0, 1):
        y, yq = ts[layer](xs[layer])[1], loaded[layer](xs[layer])[1]
        direct = float((yq - y).norm() / y.norm())
        r = rep["layers"][layer]
        assert r["rel_error"] == pytest.approx(direct, rel=1e-5)
        assert 0 < r["rel_error_decoder"] < 0.01
        assert r["rel_error"] < (0.10 if arch == "transcoder" else 0.03)
        assert 0.9 < r["active_jaccard"] <= 1 and r["max_row_rel_error"] >= r["rel_error"] * 0.5
    assert rep["max_rel_error"] == max(r["rel_error"] for r in rep["layers"].values())
    f16 = quantization_report(ts, xs, quantize="float16")
    assert f16["max_rel_error"] < rep["max_rel_error"]
    none = quantization_report(ts, xs, quantize="none")
    assert none["max_rel_error"] == 0.0


@pytest.mark.parametrize("arch", ["transcoder", "jumprelu-transcoder"])
def test_int8_error_is_under_one_percent_without_latents_at_a_boundary(arch):
    """Orthonormal encoder rows and inputs made of k of them at 1..3 (nothing near the k-th value or a threshold,
    0.2..0.8): int8 storage changes the output by < 1 %."""
    d = m = 32
    tc = random_transcoder(0, d, m, arch=arch)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        tc.enc.copy_(torch.linalg.qr(torch.randn(d, d, generator=g))[0].T)
        tc.b_enc.zero_()
    k = tc.cfg.k
    idx = torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(256)])
    x = tc.b_in + ((1 + 2 * torch.rand(256, k, generator=g))[..., None] * tc.enc[idx]).sum(1)
    r = quantization_report(TranscoderSet([tc]), [x])["layers"][0]
    assert r["active_jaccard"] == 1.0 and r["rel_error"] < 0.01


def test_report_gives_fvu_before_and_after(tmp_path):
    ts = random_transcoder_set(1, D, M)
    x = _x(seed=4)
    y_true = ts[0](x)[1] + 0.1 * _x(seed=5)
    rep = quantization_report(ts, {0: x}, y_by_layer={0: y_true})["layers"][0]
    fvu = float((y_true - ts[0](x)[1]).pow(2).sum() / (y_true - y_true.mean(0)).pow(2).sum())
    assert rep["fvu"] == pytest.approx(fvu, rel=1e-5) and rep["fvu_stored"] != rep["fvu"]


def test_stored_copy_equals_the_file(tmp_path):
    ts = random_transcoder_set(1, D, M, arch="transcoder")
    save_transcoder_set(ts, tmp_path / "f", quantize="float16")
    assert torch.equal(load_transcoder_set(tmp_path / "f")[0].enc, stored_copy(ts[0], "float16").enc)


def test_saving_over_a_set_swaps_it_whole_and_a_refused_save_keeps_the_old(tmp_path):
    out = tmp_path / "set"
    save_transcoder_set(random_transcoder_set(2, D, M), out)
    save_transcoder_set(random_transcoder_set(3, D, M, seed=5), out, quantize="float16")
    assert load_transcoder_set(out).n_layers == 3
    bad = random_transcoder_set(2, D, M)
    bad[1].cfg.norm_folded = False
    with pytest.raises(SAEError, match="layer 1's transcoder still expects normalised inputs"):
        save_transcoder_set(bad, out)
    with pytest.raises(SAEError, match="quantize='int4'"):
        save_transcoder_set(bad, out, quantize="int4")
    assert load_transcoder_set(out).n_layers == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_a_newer_manifest_version_is_refused(tmp_path):
    save_transcoder_set(random_transcoder_set(1, D, M), tmp_path / "s")
    mf = tmp_path / "s" / MANIFEST_FILE
    man = json.loads(mf.read_text())
    mf.write_text(json.dumps({**man, "version": 2}))
    with pytest.raises(SAEError, match=r"version 2, written by a newer thoughtscope; .* up to 1"):
        load_transcoder_set(tmp_path / "s")
    mf.write_text("{not json")
    with pytest.raises(SAEError, match="not valid JSON"):
        load_transcoder_set(tmp_path / "s")


def test_missing_weights_or_layer_tensors_are_named(tmp_path):
    save_transcoder_set(random_transcoder_set(2, D, M), tmp_path / "s", quantize="none")
    w = tmp_path / "s" / WEIGHTS_FILE
    from safetensors.torch import load_file

    t = load_file(str(w))
    save_file({k: v for k, v in t.items() if k != "layer_1.W_dec"}, str(w))
    with pytest.raises(SAEError, match="layer 1: lacks W_dec"):
        load_transcoder_set(tmp_path / "s")
    w.unlink()
    with pytest.raises(SAEError, match=f"missing {WEIGHTS_FILE}"):
        load_transcoder_set(tmp_path / "s")


def test_a_set_holds_transcoders_of_its_own_blocks():
    with pytest.raises(SAEError, match="layer 1's transcoder reads mlp_in.0 and writes mlp_out.0"):
        TranscoderSet([random_transcoder(0, D, M), random_transcoder(0, D, M)])
    with pytest.raises(SAEError, match="different widths"):
        TranscoderSet([random_transcoder(0, D, M), random_transcoder(1, 2 * D, M)])
    with pytest.raises(SAEError, match="at least one"):
        TranscoderSet([])


# ----------------------------------------------------------------------------- fits the model
@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", d_model=32, n_layers=2, vocab=64)


def _for(lm, n_layers, d):
    ts = random_transcoder_set(n_layers, d, 64, model=lm.name, model_source=dict(lm.source))
    return ts


def test_check_fits_refuses_another_width_or_depth(tmp_path, lm):
    _for(lm, 2, 32).check_fits(lm)
    with pytest.raises(
        SAEError, match=r"\(3 layers, d_model 32.*does not fit tiny-llama-32x2-seed0 \(2 layers, d_model 32"
    ):
        _for(lm, 3, 32).check_fits(lm)
    with pytest.raises(SAEError, match=r"2 layers, d_model 16.*\(2 layers, d_model 32\)"):
        _for(lm, 2, 16).check_fits(lm)
    other = random_transcoder_set(2, 32, 64, model="tiny-llama-32x2-seed9")
    with pytest.raises(SAEError, match="was trained on 'tiny-llama-32x2-seed9'"):
        other.check_fits(lm)
    save_transcoder_set(_for(lm, 3, 32), tmp_path / "deep")
    with pytest.raises(SAEError, match="does not fit"):
        load_transcoder_set(tmp_path / "deep", lm=lm)
    save_transcoder_set(_for(lm, 2, 32), tmp_path / "ok")
    assert load_transcoder_set(tmp_path / "ok", lm=lm).n_layers == 2


def test_an_output_hook_before_gemmas_post_mlp_norm_is_refused(tmp_path):
    import transformers

    from thoughtscope.models import LoadedModel, byte_tokenizer

    cfg = transformers.Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, head_dim=8, max_position_embeddings=64, sliding_window=16,
    )  # fmt: skip
    gemma = LoadedModel(transformers.Gemma3ForCausalLM(cfg).float(), byte_tokenizer(64), "tiny-gemma3")
    layers = [foreign_layer(32, 64, seed=0, skip=False, jumprelu=True)]
    write_circuit_tracer(tmp_path / "ct", layers, output_hook="mlp.hook_out")
    with pytest.raises(SAEError, match="mlp.hook_out, the MLP's output before tiny-gemma3's post-MLP norm"):
        load_transcoder_set(tmp_path / "ct", lm=gemma)
    write_circuit_tracer(tmp_path / "ct2", layers, output_hook="hook_mlp_out")
    assert load_transcoder_set(tmp_path / "ct2", lm=gemma).n_layers == 1


# ----------------------------------------------------------------------------- other tools' sets
@pytest.mark.parametrize(
    ("skip", "jumprelu", "enc_layout"), [(True, True, "md"), (False, False, "md"), (True, False, "dm")]
)
def test_circuit_tracer_set_gives_their_outputs(tmp_path, skip, jumprelu, enc_layout):
    layers = [foreign_layer(D, M, seed=i, skip=skip, jumprelu=jumprelu) for i in range(3)]
    write_circuit_tracer(tmp_path / "ct", layers, model_name="meta-llama/Llama-3.2-1B", enc_layout=enc_layout)
    ts = load_transcoder_set(tmp_path / "ct")
    assert ts.n_layers == 3 and ts.model == {"spec": "meta-llama/Llama-3.2-1B"}
    x = _x(512) * 2
    for i, t in enumerate(layers):
        tc = ts[i]
        assert tc.cfg.arch == "jumprelu-transcoder" and (tc.cfg.site, tc.cfg.target_site) == (
            f"mlp_in.{i}",
            f"mlp_out.{i}",
        )
        assert torch.equal(tc.b_in, torch.zeros(D)) and (tc.W_skip is not None) == skip
        f, y = tc(x)
        pre = x @ t["W_enc"].T + t["b_enc"]
        assert torch.equal(f > 0, (pre > t["threshold"]) if jumprelu else pre > 0)
        torch.testing.assert_close(y, their_forward(t, x), rtol=1e-5, atol=1e-5)
        assert 0 < float((f > 0).float().mean()) < 1
    save_transcoder_set(ts, tmp_path / "ours", quantize="none")  # a ReLU's threshold 0 (log -inf) survives too
    back = load_transcoder_set(tmp_path / "ours")
    assert all(torch.equal(a(x)[1], b(x)[1]) for a, b in zip(ts, back, strict=True))


def test_circuit_tracer_transcoders_list_reads_gemma_scope_files(tmp_path):
    """config.yaml listing local files, as circuit-tracer's Gemma configs do: a params.npz and a Gemma Scope 2
    safetensors (w_enc [d, m], affine_skip_connection [d_in, d_out])."""
    t0 = foreign_layer(D, M, seed=0, skip=False, jumprelu=True)
    t1 = foreign_layer(D, M, seed=1, skip=True, jumprelu=True)
    write_gemma_scope_npz(tmp_path / "gs" / "l0" / "params.npz", t0)
    gs2 = {"w_enc": t1["W_enc"].T, "w_dec": t1["W_dec"], "b_enc": t1["b_enc"], "b_dec": t1["b_dec"]}
    gs2 |= {"threshold": t1["threshold"], "affine_skip_connection": t1["W_skip"].T}
    save_file({k: v.contiguous() for k, v in gs2.items()}, str(tmp_path / "gs" / "l1.safetensors"))
    (tmp_path / "gs" / "config.yaml").write_text(
        "model_kind: transcoder_set\nfeature_input_hook: ln2.hook_normalized\nfeature_output_hook: hook_mlp_out\n"
        f"model_name: google/gemma-2-2b\ntranscoders:\n  - l0/params.npz\n  - {tmp_path / 'gs' / 'l1.safetensors'}\n"
    )
    ts = load_transcoder_set(tmp_path / "gs")
    x = _x(512)
    for tc, t in zip(ts, (t0, t1), strict=True):
        torch.testing.assert_close(tc(x)[1], their_forward(t, x), rtol=1e-5, atol=1e-5)


def test_gemma_scope_folder_matches_numpy(tmp_path):
    layers = [foreign_layer(D, M, seed=10 + i, skip=False, jumprelu=True) for i in range(2)]
    for i, t in enumerate(layers):
        write_gemma_scope_npz(tmp_path / "gs" / f"layer_{i}" / "width_64" / "average_l0_5" / "params.npz", t)
    ts = load_transcoder_set(tmp_path / "gs")
    x = _x(512).numpy()
    for i in range(2):
        p = np.load(tmp_path / "gs" / f"layer_{i}" / "width_64" / "average_l0_5" / "params.npz")
        pre = x @ p["W_enc"] + p["b_enc"]
        want = (np.maximum(pre, 0) * (pre > p["threshold"])) @ p["W_dec"] + p["b_dec"]  # Gemma Scope's JumpReLU
        np.testing.assert_allclose(ts[i](torch.from_numpy(x))[1].numpy(), want, rtol=1e-5, atol=1e-5)
        assert ts[i].cfg.extra["input_hook"] == "ln2.hook_normalized"
    # and it survives our own format
    save_transcoder_set(ts, tmp_path / "ours", quantize="none")
    back = load_transcoder_set(tmp_path / "ours")
    assert torch.equal(back[1](torch.from_numpy(x))[1], ts[1](torch.from_numpy(x))[1])


def test_a_missing_layer_file_is_named(tmp_path):
    layers = [foreign_layer(D, M, seed=i, skip=False, jumprelu=False) for i in range(3)]
    write_circuit_tracer(tmp_path / "ct", layers)
    (tmp_path / "ct" / "layer_1.safetensors").unlink()
    with pytest.raises(SAEError, match=r"layer 1 is missing \(layer_1.safetensors not found\)"):
        load_transcoder_set(tmp_path / "ct")
    write_gemma_scope_npz(
        tmp_path / "gs" / "layer_0" / "params.npz", foreign_layer(D, M, seed=0, skip=False, jumprelu=True)
    )
    write_gemma_scope_npz(
        tmp_path / "gs" / "layer_2" / "params.npz", foreign_layer(D, M, seed=2, skip=False, jumprelu=True)
    )
    with pytest.raises(SAEError, match=r"layer 1 is missing \(layer_1/\*\*/params.npz or layer_1.npz"):
        load_transcoder_set(tmp_path / "gs")
    (tmp_path / "ct" / "config.yaml").write_text(
        "feature_input_hook: mlp.hook_in\nfeature_output_hook: mlp.hook_out\n"
        "transcoders: [layer_0.safetensors, gone.safetensors]\n"
    )
    with pytest.raises(SAEError, match=r"layer 1's transcoder file .*gone.safetensors is missing"):
        load_transcoder_set(tmp_path / "ct")


def test_unknown_and_unsupported_layouts_say_why(tmp_path):
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "weights.bin").write_bytes(b"x")
    with pytest.raises(
        SAEError, match=r"found weights.bin; expected one of: thoughtscope: .*circuit-tracer: .*Gemma Scope"
    ):
        load_transcoder_set(tmp_path / "odd")
    with pytest.raises(SAEError, match="is not a folder"):
        load_transcoder_set(tmp_path / "nowhere")
    t = foreign_layer(D, M, seed=0, skip=False, jumprelu=True)
    ct = write_circuit_tracer(tmp_path / "ct", [t])
    cases = {
        "model_kind: cross_layer_transcoder\n": "cross-layer transcoders are not read",
        "feature_input_hook: hook_resid_mid\nfeature_output_hook: hook_mlp_out\n": "read 'hook_resid_mid'",
        "feature_input_hook: mlp.hook_in\nfeature_output_hook: mlp.hook_out\ntranscoders: [hf://g/x.npz]\n": "on a hub",
        "[1, 2]\n": "expected a mapping",
    }
    for text, why in cases.items():
        (ct / "config.yaml").write_text(text)
        with pytest.raises(SAEError, match=why):
            load_transcoder_set(ct)
    for i in (0, 1):
        write_gemma_scope_npz(tmp_path / "two" / "layer_0" / f"w{i}" / "params.npz", t)
    with pytest.raises(SAEError, match="holds 2 transcoders"):
        load_transcoder_set(tmp_path / "two")


def test_foreign_files_with_bad_tensors_are_refused(tmp_path):
    t = foreign_layer(D, M, seed=0, skip=False, jumprelu=True)
    bad = {**t, "threshold": t["threshold"] - 1}
    write_circuit_tracer(tmp_path / "neg", [bad], input_hook="mlp.hook_in")
    with pytest.raises(SAEError, match="thresholds are negative"):
        load_transcoder_set(tmp_path / "neg")
    write_circuit_tracer(tmp_path / "short", [{k: v for k, v in t.items() if k != "W_dec"}])
    with pytest.raises(SAEError, match=r"layer_0.safetensors lacks W_dec \(has W_enc, .*\); expected one of"):
        load_transcoder_set(tmp_path / "short")
    write_circuit_tracer(tmp_path / "shape", [{**t, "W_dec": t["W_dec"][:, :-1]}])
    with pytest.raises(SAEError, match=r"W_dec has shape \(64, 15\), expected \(64, 16\)"):
        load_transcoder_set(tmp_path / "shape")
    write_circuit_tracer(tmp_path / "nan", [{**t, "b_enc": t["b_enc"] * float("nan")}])
    with pytest.raises(SAEError, match="b_enc holds NaN"):
        load_transcoder_set(tmp_path / "nan")
    (tmp_path / "ct_bad").mkdir()
    (tmp_path / "ct_bad" / "layer_0.safetensors").write_bytes(b"\x00" * 20)
    (tmp_path / "ct_bad" / "config.yaml").write_text(
        "feature_input_hook: mlp.hook_in\nfeature_output_hook: mlp.hook_out\n"
    )
    with pytest.raises(SAEError, match="corrupt safetensors"):
        load_transcoder_set(tmp_path / "ct_bad")
