"""Transcoders (arch "transcoder"): read a block's MLP input, write its MLP output; trained, saved, spliced."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from thoughtscope.corpus import Corpus
from thoughtscope.harvest import stream_activations
from thoughtscope.models import capture, tiny_model
from thoughtscope.sae import SAEConfig, TrainConfig, build_sae, load_sae, save_sae, train_sae
from thoughtscope.sae.config import SAEError
from thoughtscope.sae.transcoder import TopKTranscoder, evaluate_transcoder, spliced_transcoder_loss
from thoughtscope.sites import Site, mlp_module

pytestmark = pytest.mark.usefixtures("one_thread")

D = 32
TEXT = "\n\n\n".join(f"Note {i}: a red kite {i} flew past {i * 3} small hills and {i * 11} trees. " for i in range(300))


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", d_model=D, n_layers=2, vocab=256)


@pytest.fixture(scope="module")
def token_batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 256, (16, 32), generator=g) for _ in range(12)]


@pytest.fixture(scope="module")
def pairs(lm, token_batches):
    """[B, 2, d] batches of (mlp_in.1, mlp_out.1), position 0 left out."""
    out = []
    for ids in token_batches:
        got = capture(lm, ["mlp_in.1", "mlp_out.1"], ids)
        x, y = got[Site(1, "mlp_in")][:, 1:], got[Site(1, "mlp_out")][:, 1:]
        out.append(torch.stack([x.reshape(-1, D), y.reshape(-1, D)], 1))
    return out


def _cfg(**kw):
    base = dict(arch="transcoder", d_model=D, n_features=256, k=12, site="mlp_in.1", target_site="mlp_out.1")
    return SAEConfig(**{**base, **kw})


def _tc(steps=150):
    return TrainConfig(batch_size=248, steps=steps, lr=3e-3, progress=False, checkpoint_every=0, log_every=25)


def test_bad_pairings_are_refused():
    with pytest.raises(SAEError, match="different blocks"):
        _cfg(site="mlp_in.1", target_site="mlp_out.2")
    with pytest.raises(SAEError, match="same site"):
        _cfg(site="mlp_out.1", target_site="mlp_out.1")
    with pytest.raises(SAEError, match="unknown stream 'mlp'"):
        _cfg(target_site="mlp.1")
    with pytest.raises(SAEError, match="k=0"):
        _cfg(k=0)
    g = torch.Generator().manual_seed(0)
    widths = [(torch.randn(64, D, generator=g), torch.randn(64, D - 4, generator=g))]
    with pytest.raises(SAEError, match="differ in shape"):
        train_sae(_cfg(), widths, TrainConfig(batch_size=64, steps=2, progress=False, checkpoint_every=0))
    single = [torch.randn(64, D, generator=g)]  # an SAE's batch: no target rows
    with pytest.raises(SAEError, match=r"trains on \[B, 2, 32\] batches"):
        train_sae(_cfg(), single, TrainConfig(batch_size=64, steps=2, progress=False, checkpoint_every=0))
    with pytest.raises(SAEError, match="cannot mix transcoders"):
        from thoughtscope.sae.train import Trainer

        Trainer([_cfg(), SAEConfig(arch="topk", d_model=D, n_features=64, k=4)], TrainConfig())


@pytest.mark.parametrize(("arch", "skip"), [("transcoder", False), ("transcoder", True), ("jumprelu-transcoder", True)])
def test_trained_on_a_tiny_mlp_it_predicts_the_mlp_output(pairs, arch, skip):
    held_out = pairs[-2:]
    tc = train_sae(_cfg(arch=arch, skip_connection=skip), pairs[:-2] * 25, _tc(steps=250))
    assert tc.arch == arch and tc.paired and tc.cfg.norm_folded and tc.cfg.target_norm_scale != 1.0
    m = evaluate_transcoder(tc, held_out)
    # raw activations in, raw MLP output out (normalisation folded); the best linear map of the input leaves ~0.9
    x, y = torch.cat(pairs)[:, 0], torch.cat(pairs)[:, 1]
    X = torch.cat([x, torch.ones(len(x), 1)], 1)
    linear_fvu = float((X @ torch.linalg.lstsq(X, y).solution - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert m["fvu"] < 0.3 and m["fvu"] < linear_fvu / 2, (m, linear_fvu)
    assert 1 <= m["l0"] <= 12 and 0 <= m["dead_frac"] < 0.5  # TopK: k = 12; JumpReLU: its L0 penalty
    assert abs(tc.train_metrics["fvu"] - evaluate_transcoder(tc, pairs[-4:-2])["fvu"]) < 0.15
    if skip:
        assert tc.W_skip.abs().sum() > 0  # the skip path learned something
    # an untrained one explains nothing: FVU about 1 or worse
    assert evaluate_transcoder(build_sae(_cfg()), held_out)["fvu"] > 0.9


@pytest.mark.parametrize("arch", ["transcoder", "jumprelu-transcoder"])
def test_fold_keeps_the_prediction_of_the_normalised_transcoder(arch):
    g = torch.Generator().manual_seed(3)
    tc = build_sae(_cfg(arch=arch, skip_connection=True, target_norm_scale=2.5, jumprelu_init_threshold=0.05), seed=1)
    with torch.no_grad():
        for p in (tc.b_in, tc.b_dec, tc.W_skip):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    tc.cfg.norm_folded = False
    x = torch.randn(40, D, generator=g) * 3 + 1
    mu, s = torch.randn(D, generator=g), torch.rand(D, generator=g) + 0.5
    f_norm, y_norm = tc((x - mu) * s)
    tc.fold_normalization(s, mu)
    f_raw, y_raw = tc(x)
    assert (f_norm > 0).sum() > 0
    torch.testing.assert_close(f_raw, f_norm, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y_raw, y_norm / 2.5, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["transcoder", "jumprelu-transcoder"])
def test_save_load_round_trip(tmp_path, arch):
    g = torch.Generator().manual_seed(5)
    tc = build_sae(_cfg(arch=arch, skip_connection=True), seed=2)
    with torch.no_grad():
        tc.W_skip.copy_(torch.randn(D, D, generator=g))
        tc.b_in.copy_(torch.randn(D, generator=g))
        if arch == "jumprelu-transcoder":
            tc.log_threshold.copy_(torch.randn(256, generator=g) - 2)
    save_sae(tc, tmp_path / "tc")
    back = load_sae(tmp_path / "tc")
    assert type(back) is type(tc) and back.cfg.target_site == "mlp_out.1" and back.cfg.skip_connection
    x = torch.randn(7, D, generator=g)
    for a, b in zip(tc(x), back(x)):
        torch.testing.assert_close(a, b)
    # a few latents from their own rows: equal to encode() (top-k: wherever the latent is among the k largest)
    part, full = back.partial_encoder([3, 7])(x), tc(x)[0][:, [3, 7]]
    keep = full > 0 if arch == "transcoder" else torch.ones_like(full, dtype=torch.bool)
    torch.testing.assert_close(part[keep], full[keep])
    plain = build_sae(_cfg(arch=arch), seed=2)
    save_sae(plain, tmp_path / "plain")
    assert load_sae(tmp_path / "plain").W_skip is None
    with pytest.raises(SAEError, match="no SAELens"):
        from thoughtscope.sae.formats import export_saelens

        export_saelens(tc, tmp_path / "sl")


def test_paired_stream_from_one_forward_pass(lm, tmp_path):
    (tmp_path / "docs.txt").write_text(TEXT)
    src = stream_activations(
        lm, Corpus(str(tmp_path / "docs.txt")), "mlp_in.0", target_site="mlp_out.0",
        n_tokens=600, batch_size=100, ctx_len=16, contexts_per_batch=4, buffer_tokens=200,
    )  # fmt: skip
    batches = list(src(0))
    assert len(batches) == 6 and all(b.shape == (100, 2, D) for b in batches)
    again = list(src(2))
    torch.testing.assert_close(again[0], batches[2])  # resumable: skipping gives the same stream
    # each row's target is the MLP applied to its own input
    with torch.no_grad():
        torch.testing.assert_close(mlp_module(lm.layers[0])(batches[0][:, 0]), batches[0][:, 1], atol=1e-5, rtol=1e-5)
    tc = train_sae(_cfg(site="mlp_in.0", target_site="mlp_out.0"), src, TrainConfig(batch_size=100, steps=5,
                   progress=False, checkpoint_every=0))  # fmt: skip
    assert math.isfinite(tc.train_metrics["fvu"])


def test_spliced_loss_replaces_the_mlp(lm, token_batches):
    ids = token_batches[:2]
    r = spliced_transcoder_loss(lm, build_sae(_cfg()), ids)
    for key in ("loss_clean", "loss_zero_ablated", "loss_mean_ablated"):
        assert math.isfinite(r[key])
    assert math.isfinite(r["loss_sae"]) and r["site"] == "mlp_out.1"
    assert r["loss_zero_ablated"] != r["loss_clean"]

    mlp = copy.deepcopy(mlp_module(lm.layers[1]))  # a copy: the block's own MLP carries the splice's hooks

    class Exact(TopKTranscoder):  # predicts with the block's own MLP: the splice must give back the clean model
        def forward(self, x):
            with torch.no_grad():
                return x, mlp(x)

    exact = Exact(_cfg())
    e = spliced_transcoder_loss(lm, exact, ids)
    assert abs(e["loss_recovered"] - 1) < 1e-4 and e["kl_sae"] < 1e-6 and abs(e["loss_sae"] - e["loss_clean"]) < 1e-5
    with pytest.raises(SAEError, match="does not record its sites"):
        spliced_transcoder_loss(lm, build_sae(_cfg(site="", target_site="")), ids)


class _Boom(Exception):
    pass


def test_a_killed_and_resumed_transcoder_run_is_bit_identical(pairs, tmp_path):
    from thoughtscope.sae import train_saes

    data = [b[:240] for b in pairs[:10]] * 2
    cfgs = [_cfg(skip_connection=True, dead_tokens=480), _cfg(n_features=128, k=6)]
    kw = {"batch_size": 240, "steps": 20, "lr": 3e-3, "progress": False, "checkpoint_every": 5, "log_every": 5}

    def killing(start):
        for i, b in enumerate(data[start:], start):
            if i == 12:
                raise _Boom
            yield b

    ref = train_saes(cfgs, lambda start: iter(data[start:]), TrainConfig(checkpoint_dir=str(tmp_path / "a"), **kw))
    with pytest.raises(_Boom):
        train_saes(cfgs, killing, TrainConfig(checkpoint_dir=str(tmp_path / "b"), **kw))
    got = train_saes(cfgs, lambda start: iter(data[start:]), TrainConfig(checkpoint_dir=str(tmp_path / "b"), **kw))
    for a, b in zip(ref, got):
        assert a.cfg.target_norm_scale == b.cfg.target_norm_scale != 1.0
        for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), n


def test_sae_train_cli_trains_a_transcoder_on_the_fly(lm, tmp_path):
    from typer.testing import CliRunner

    from thoughtscope.cli import app

    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    (tmp_path / "docs.txt").write_text(TEXT)
    common = ["sae", "train", "--model", str(tmp_path / "m"), "--corpus", str(tmp_path / "docs.txt"), "--quiet"]
    common += ["--site", "mlp_in.1", "--target-site", "mlp_out.1", "--tokens", "2000", "--batch-size", "200"]
    r = CliRunner().invoke(
        app, [*common, "--expansion", "4", "--k", "8", "--skip-connection", "--out", str(tmp_path / "tc")]
    )
    assert r.exit_code == 0, r.output
    assert "transcoder" in r.output  # the run name (its table cell may wrap)
    tc = load_sae(tmp_path / "tc")
    assert isinstance(tc, TopKTranscoder) and (tc.cfg.site, tc.cfg.target_site) == ("mlp_in.1", "mlp_out.1")
    assert tc.cfg.skip_connection and tc.W_skip.abs().sum() > 0
    held = json.loads((tmp_path / "tc" / "metrics.json").read_text())["heldout"]["spliced"]
    assert held["site"] == "mlp_out.1" and math.isfinite(held["loss_sae"])
    from thoughtscope.sae.run import evaluate_folder

    with pytest.raises(SAEError, match="is a transcoder .mlp_in.1 -> mlp_out.1.; a store holds one site"):
        evaluate_folder(tmp_path / "tc", store=tmp_path / "any-store")
    r = CliRunner().invoke(app, [*common, "--arch", "relu-l1", "--out", str(tmp_path / "bad")])
    assert r.exit_code != 0 and "has no transcoder form" in " ".join(r.output.split())
    assert not (tmp_path / "bad").exists()
    r = CliRunner().invoke(app, [*common, "--target-site", "mlp_out.0", "--out", str(tmp_path / "bad")])
    assert r.exit_code != 0 and "lie in different blocks" in " ".join(r.output.split())


def test_config_grid_maps_sae_architectures_to_their_transcoders():
    from thoughtscope.sae.run import Source, config_grid

    src = Source(None, D, "m", "mlp_in.1", target_site="mlp_out.1")
    grid = {"k": [8], "expansion": [4], "l1_coeff": [1.0], "l0_coeff": [1.0]}
    cfgs, names = config_grid(src, arch=["topk", "jumprelu"], **grid)
    assert [c.arch for c in cfgs] == ["transcoder", "jumprelu-transcoder"]
    assert all((c.site, c.target_site) == ("mlp_in.1", "mlp_out.1") for c in cfgs)
    assert names == ["transcoder-x4-k8", "jumprelu-transcoder-x4-l0_1"]
    with pytest.raises(SAEError, match="batchtopk' has no transcoder form"):
        config_grid(src, arch=["batchtopk"], **grid)
    plain, _ = config_grid(Source(None, D, "m", "resid.1"), arch=["topk"], **grid)
    assert plain[0].arch == "topk" and plain[0].target_site == ""
    both, names = config_grid(src, arch=["topk"], skip_connection=[False, True], **grid)
    assert [c.skip_connection for c in both] == [False, True] and names == ["transcoder-x4-k8", "transcoder-x4-k8-skip"]
    with pytest.raises(SAEError, match="skip connection belongs to a transcoder"):
        config_grid(Source(None, D, "m", "resid.1"), arch=["topk"], skip_connection=[True], **grid)


def test_two_stores_of_one_harvest_train_a_transcoder(lm, tmp_path):
    from thoughtscope.harvest import HarvestConfig, harvest
    from thoughtscope.sae.transcoder import PairedStores

    (tmp_path / "docs.txt").write_text(TEXT)
    cfg = HarvestConfig(n_tokens=2400, ctx_len=16, contexts_per_batch=4, shard_tokens=320)
    sites = ["mlp_in.1", "mlp_out.1"]
    stores = harvest(lm, Corpus(str(tmp_path / "docs.txt")), sites, tmp_path / "acts", cfg, progress=False)
    paired = PairedStores(stores[Site(1, "mlp_in")], tmp_path / "acts" / "mlp_out.1")
    assert (paired.site, paired.target_site, paired.d_model) == ("mlp_in.1", "mlp_out.1", D)
    got = list(paired.batches(200, shuffle=True, seed=3, drop_last=True, with_meta=True))
    assert len(got) >= 10 and all(b.shape == (200, 2, D) and (m["position"] > 0).all() for b, m in got)
    with torch.no_grad():  # the rows are paired: each target is the MLP of its own input
        torch.testing.assert_close(mlp_module(lm.layers[1])(got[0][0][:, 0]), got[0][0][:, 1], atol=1e-5, rtol=1e-5)
    tc = train_sae(_cfg(), paired, TrainConfig(batch_size=200, epochs=20, progress=False, checkpoint_every=0, lr=3e-3))
    assert tc.train_metrics["fvu"] < 0.5 and tc.cfg.target_norm_scale != 1.0
    with pytest.raises(SAEError, match="not two sites of one harvest"):
        other = harvest(lm, Corpus(str(tmp_path / "docs.txt")), ["mlp_out.1"], tmp_path / "b",
                        HarvestConfig(n_tokens=1200, ctx_len=16, contexts_per_batch=4), progress=False)  # fmt: skip
        PairedStores(stores[Site(1, "mlp_in")], other[Site(1, "mlp_out")])
    with pytest.raises(SAEError, match="different blocks"):
        two = harvest(lm, Corpus(str(tmp_path / "docs.txt")), ["mlp_in.0", "mlp_out.1"], tmp_path / "c", cfg,
                      progress=False)  # fmt: skip
        PairedStores(two[Site(0, "mlp_in")], two[Site(1, "mlp_out")])
