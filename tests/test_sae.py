"""SAE tests: formats, folding, loaders, bad input (the synthetic data is in helpers/sae_data.py).

Training-quality tests live in test_sae_recovery.py, trainer mechanics (resume, DDP, stores) in test_sae_train.py.
"""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from helpers.sae_data import D_MODEL, FAST, make_batches, recovery, true_dirs  # noqa: F401

import thoughtscope.sae as S
from thoughtscope.sae import SAEConfig, SAEError, TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: one thread beats a contended pool


def test_normalisation_is_folded_on_save(tmp_path):
    data = make_batches(10, offset=3.0)
    cfg = SAEConfig(arch="topk", d_model=D_MODEL, n_features=128, k=4, mean_center=True, input_scaling="per-dim")
    tr = S.Trainer([cfg], TrainConfig(batch_size=256, steps=10, lr=3e-3, **FAST))
    saved = tr.fit(data)[0]
    inner = copy.deepcopy(tr.slots[0].sae)
    inner.fold_decoder_norm()  # training-space weights, free decoder norms moved into the encoder (a separate fold)
    assert tr.norm_scale != 1.0 and tr.norm_mean is not None
    x = data[0][:64]
    scale = tr.norm_scale * tr.dim_scale  # per-dimension standardisation (the default) times the overall scale
    f_in, xh_in = inner((x - tr.norm_mean) * scale)
    saved.save(tmp_path / "sae")
    loaded = S.SAE.load(tmp_path / "sae")
    f_raw, xh_raw = loaded(x)
    torch.testing.assert_close(f_raw, f_in, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xh_raw, xh_in / scale + tr.norm_mean, rtol=1e-4, atol=1e-4)
    norm = json.loads((tmp_path / "sae" / "normalization.json").read_text())
    assert norm["folded_into_weights"] and math.isclose(norm["scale"], tr.norm_scale)


def _random_sae(arch, **kw):
    cfg = SAEConfig(arch=arch, d_model=16, n_features=48, k=5, **kw)
    sae = S.build_sae(cfg, seed=3)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_()
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.rand(48).mul(0.5).add(0.05).log())
        if arch == "batchtopk":
            sae.threshold.fill_(0.2)
    return sae


@pytest.mark.parametrize("arch", ["relu-l1", "topk", "batchtopk", "jumprelu"])
def test_native_and_saelens_round_trip(tmp_path, arch):
    sae = _random_sae(arch, model="tiny", site="resid.1")
    x = torch.randn(40, 16) * 2
    f0, r0 = sae(x)
    sae.save(tmp_path / "native")
    f1, r1 = S.load_sae(tmp_path / "native")(x)
    assert torch.equal(f0, f1) and torch.equal(r0, r1)
    S.export_saelens(sae, tmp_path / "sl")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["d_in"] == 16 and cfg["d_sae"] == 48 and cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    saelens_arch = {"relu-l1": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}
    assert cfg["architecture"] == saelens_arch[arch]
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "sl" / "sae_weights.safetensors"))
    assert w["W_enc"].shape == (16, 48) and w["W_dec"].shape == (48, 16)
    back = S.load_sae(tmp_path / "sl")
    assert back.cfg.arch == arch and back.cfg.site == "resid.1"
    f2, r2 = back(x)
    torch.testing.assert_close(f2, f0)
    torch.testing.assert_close(r2, r0)


def test_reads_plain_saelens_jumprelu_without_b_dec_on_input(tmp_path):
    from safetensors.torch import save_file

    d, m = 8, 20
    g = torch.Generator().manual_seed(0)
    W_enc, W_dec = torch.randn(d, m, generator=g), torch.randn(m, d, generator=g)
    b_enc, b_dec, thr = torch.randn(m, generator=g), torch.randn(d, generator=g), torch.rand(m, generator=g)
    (tmp_path / "cfg.json").write_text(
        json.dumps(
            {
                "architecture": "jumprelu",
                "d_in": d,
                "d_sae": m,
                "dtype": "float32",
                "device": "cpu",
                "apply_b_dec_to_input": False,
                "normalize_activations": "none",
                "metadata": {"model_name": "gemma-2-2b", "hook_name": "blocks.12.hook_resid_post"},
            }
        )
    )
    save_file(
        {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec, "threshold": thr},
        str(tmp_path / "sae_weights.safetensors"),
    )
    sae = S.load_sae(tmp_path)
    x = torch.randn(10, d, generator=g)
    pre = x @ W_enc + b_enc
    f = pre * (pre > thr)
    torch.testing.assert_close(sae.encode(x), f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(f), f @ W_dec + b_dec)
    assert sae.cfg.site == "resid.12" and sae.cfg.model == "gemma-2-2b"


def test_sparsify_checkpoint(tmp_path):
    from safetensors.torch import save_file

    d, m, k = 8, 24, 3
    g = torch.Generator().manual_seed(1)
    ew, eb = torch.randn(m, d, generator=g), torch.randn(m, generator=g)
    W_dec, b_dec = torch.randn(m, d, generator=g), torch.randn(d, generator=g)
    (tmp_path / "cfg.json").write_text(
        json.dumps(
            {"expansion_factor": 3, "normalize_decoder": True, "num_latents": m, "k": k, "multi_topk": False, "d_in": d}
        )
    )
    save_file(
        {"encoder.weight": ew, "encoder.bias": eb, "W_dec": W_dec, "b_dec": b_dec}, str(tmp_path / "sae.safetensors")
    )
    sae = S.load_sae(tmp_path)
    x = torch.randn(6, d, generator=g)
    pre = torch.relu((x - b_dec) @ ew.T + eb)
    v, i = pre.topk(k)
    ref = torch.zeros_like(pre).scatter(-1, i, v)
    torch.testing.assert_close(sae.encode(x), ref)
    torch.testing.assert_close(sae.decode(ref), ref @ W_dec + b_dec)


@pytest.mark.parametrize("cls", ["AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder"])
def test_dictionary_learning_checkpoint(tmp_path, cls):
    d, m, k = 8, 24, 3
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, d, generator=g)
    if cls == "JumpReluAutoEncoder":
        W_enc, b_enc = torch.randn(d, m, generator=g), torch.randn(m, generator=g)
        W_dec, b_dec = torch.randn(m, d, generator=g), torch.randn(d, generator=g)
        thr = torch.rand(m, generator=g)
        sd = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": thr}
        pre = x @ W_enc + b_enc
        f = pre * (pre > thr)

        def dec(f):
            return f @ W_dec + b_dec
    else:
        ew, eb = torch.randn(m, d, generator=g), torch.randn(m, generator=g)
        dw, bd = torch.randn(d, m, generator=g), torch.randn(d, generator=g)
        sd = {"encoder.weight": ew, "encoder.bias": eb, "decoder.weight": dw}
        pre = torch.relu((x - bd) @ ew.T + eb)
        if cls == "AutoEncoder":
            sd["bias"] = bd
            f = pre
        else:
            sd.update({"b_dec": bd, "k": torch.tensor(k), "threshold": torch.tensor(-1.0)})
            v, i = pre.topk(k)
            f = torch.zeros_like(pre).scatter(-1, i, v)

        def dec(f):
            return f @ dw.T + bd

    torch.save(sd, tmp_path / "ae.pt")
    trainer = {
        "dict_class": cls,
        "activation_dim": d,
        "dict_size": m,
        "k": k,
        "lm_name": "EleutherAI/pythia-70m-deduped",
        "layer": 3,
    }
    (tmp_path / "config.json").write_text(json.dumps({"trainer": trainer}))
    sae = S.load_sae(tmp_path)
    torch.testing.assert_close(sae.encode(x), f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(f), dec(f), rtol=1e-5, atol=1e-5)
    assert sae.cfg.site == "resid.3"


# ----------------------------------------------------------------------------- errors
def test_bad_configs():
    with pytest.raises(SAEError, match="unknown SAE architecture 'gated'"):
        SAEConfig(arch="gated", d_model=8, n_features=16)
    with pytest.raises(SAEError, match="k=32 must be in 1..n_features=16"):
        SAEConfig(arch="topk", d_model=8, n_features=16, k=32)


def test_corrupt_folders_name_the_file(tmp_path):
    sae = _random_sae("topk")
    sae.save(tmp_path / "s")
    (tmp_path / "s" / "sae_weights.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(SAEError, match="sae_weights.safetensors"):
        S.load_sae(tmp_path / "s")
    sae.save(tmp_path / "t")
    (tmp_path / "t" / "cfg.json").write_text("{not json")
    with pytest.raises(SAEError, match=r"cfg.json: not valid JSON"):
        S.load_sae(tmp_path / "t")
    sae.save(tmp_path / "u")
    os.remove(tmp_path / "u" / "sae_weights.safetensors")
    with pytest.raises(SAEError, match="missing sae_weights.safetensors"):
        S.load_sae(tmp_path / "u")
    sae.save(tmp_path / "v")
    c = json.loads((tmp_path / "v" / "cfg.json").read_text())
    c["arch"] = "nope"
    (tmp_path / "v" / "cfg.json").write_text(json.dumps(c))
    with pytest.raises(SAEError, match="unknown SAE architecture 'nope'"):
        S.load_sae(tmp_path / "v")
    with pytest.raises(SAEError, match="not a folder"):
        S.load_sae(tmp_path / "missing")


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path):
    data = make_batches(8, B=64)
    data[6] = data[6] * 1e30  # finite input, overflowing loss
    cfg = SAEConfig(arch="relu-l1", d_model=D_MODEL, n_features=64)
    tc = TrainConfig(batch_size=64, steps=8, checkpoint_dir=str(tmp_path), checkpoint_every=2, progress=False)
    with pytest.raises(S.TrainingDiverged, match="at step 6"):
        S.train_sae(cfg, data, tc)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 6 and all(torch.isfinite(v).all() for v in ck["saes"][0].values())


def test_spliced_lm_loss_on_tiny_model():
    models = pytest.importorskip("thoughtscope.models")
    lm = models.tiny_model(d_model=32, n_layers=2, vocab=64)
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    acts = models.capture(lm, "resid.0", ids)
    acts = next(iter(acts.values()))
    sae = S.build_sae(SAEConfig(arch="topk", d_model=32, n_features=64, k=8))
    res = S.spliced_lm_loss(lm, sae, "resid.0", [ids])
    for key in ("loss_clean", "loss_sae", "loss_zero_ablated", "loss_mean_ablated", "loss_recovered", "kl_sae"):
        assert math.isfinite(res[key]), key
    assert res["kl_sae"] >= 0 and res["first_position_excluded"]

    class Identity(S.TopKSAE):  # perfect reconstruction -> all loss recovered, zero KL
        def forward(self, x):
            return S.SAEOutput(x, x)

    ident = Identity(SAEConfig(arch="topk", d_model=32, n_features=64, k=8))
    r = S.spliced_lm_loss(lm, ident, "resid.0", [ids])
    assert abs(r["loss_recovered"] - 1) < 1e-4 and r["kl_sae"] < 1e-6


def test_half_precision_save_loads_as_float32(tmp_path):
    from thoughtscope.sae import SAEConfig, build_sae, load_sae, save_sae

    sae = build_sae(SAEConfig(arch="topk", d_model=8, n_features=16, k=2))
    save_sae(sae, tmp_path / "half", weights_dtype=torch.float16)
    back = load_sae(tmp_path / "half")
    assert back.W_dec.dtype == torch.float32
    torch.testing.assert_close(back.W_dec, sae.W_dec.detach().half().float())


# ----------------------------------------------------------------------------- folders written before the reshape
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "sae_v1")


def _fixture_names() -> list[str]:
    return sorted(n for n in os.listdir(FIXTURES) if os.path.isdir(os.path.join(FIXTURES, n)))


@pytest.mark.parametrize("name", _fixture_names())
def test_folders_written_by_earlier_code_load_exactly(name):
    """Native (float32 and float16), SAELens, sparsify and dictionary_learning folders written by the code of
    before the per-architecture modules: same class, same config, the same activations and reconstructions (to
    float32 rounding: the matrix products' summation order differs between CPU kernels)."""
    from safetensors.torch import load_file

    expected = load_file(os.path.join(FIXTURES, "expected.safetensors"))
    with open(os.path.join(FIXTURES, "expected_cfg.json")) as fh:
        meta = json.loads(fh.read())[name]
    sae = S.load_sae(os.path.join(FIXTURES, name))
    cfg = sae.cfg.to_dict()
    assert type(sae).__name__ == meta["class"] and {k: cfg[k] for k in meta["cfg"]} == meta["cfg"]
    # fields added since: a folder from before says it was trained without them
    assert {k: cfg[k] for k in cfg.keys() - meta["cfg"].keys()} == {
        "model_source": None,
        "massive_ratio": None,
        "input_scaling": "none",
        "massive_dims": None,
        "dim_scale": None,
        "matryoshka_prefixes": (),
        "target_site": "",
        "skip_connection": False,
        "target_norm_scale": 1.0,
        "decoder_norm": "unit",
    }
    f, recon = sae(expected[f"{name}/x"])
    torch.testing.assert_close(f, expected[f"{name}/f"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recon, expected[f"{name}/recon"], rtol=1e-5, atol=1e-5)


def test_shipped_sae_config_is_what_its_folder_says():
    from thoughtscope.sae.formats import default_sae_path

    sae = S.SAE.load("default")
    raw = json.loads((default_sae_path() / "cfg.json").read_text())
    got = sae.cfg.to_dict()
    assert type(sae) is S.TopKSAE and {k: got[k] for k in raw} == raw  # fields added since keep their defaults
