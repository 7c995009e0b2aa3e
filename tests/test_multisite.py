"""Many dictionaries from one forward pass (sae.multisite): N sites trained together equal N single runs."""

from __future__ import annotations

import pytest
import torch

from thoughtscope.corpus import Corpus
from thoughtscope.harvest import stream_activations
from thoughtscope.models import tiny_model
from thoughtscope.sae import SAEConfig, TrainConfig, load_sae, train_sae
from thoughtscope.sae.config import SAEError
from thoughtscope.sae.multisite import train_multisite
from thoughtscope.sites import mlp_module

pytestmark = pytest.mark.usefixtures("one_thread")

D = 32
TEXT = "\n\n\n".join(f"Entry {i}: a grey heron {i} waded past {i * 7} reeds and {i * 5} stones. " for i in range(200))


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", d_model=D, n_layers=3, vocab=256)


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "docs.txt").write_text(TEXT)
    return Corpus(str(tmp_path / "docs.txt"))


def _stream(lm, corpus, sites, targets=None, n=1200):
    return stream_activations(
        lm, corpus, sites, target_site=targets, n_tokens=n, batch_size=100, ctx_len=16, contexts_per_batch=4,
        buffer_tokens=300,
    )  # fmt: skip


def _tc(**kw):
    base = dict(batch_size=100, steps=10, lr=3e-3, progress=False, checkpoint_every=0, log_every=5)
    return TrainConfig(**{**base, **kw})


def _tcfg(layer, **kw):
    return SAEConfig(arch="transcoder", d_model=D, n_features=64, k=6, site=f"mlp_in.{layer}",
                     target_site=f"mlp_out.{layer}", **kw)  # fmt: skip


def _same(a, b):
    assert a.cfg.norm_scale == b.cfg.norm_scale
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n


def test_one_pass_gives_every_site_row_for_row(lm, corpus):
    src = _stream(lm, corpus, ["mlp_in.0", "mlp_in.2"], ["mlp_out.0", "mlp_out.2"])
    batches = list(src(0))
    assert batches and all(b.shape == (100, 2, 2, D) for b in batches)
    with torch.no_grad():  # row i of each site pairs that site's MLP input with its output, for the same token
        for slot, layer in enumerate((0, 2)):
            x, y = batches[1][:, slot, 0], batches[1][:, slot, 1]
            torch.testing.assert_close(mlp_module(lm.layers[layer])(x), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(list(src(3))[0], batches[3])  # skipping gives the same stream (resume)
    with pytest.raises(Exception, match="2 sites but 1 target sites"):
        _stream(lm, corpus, ["mlp_in.0", "mlp_in.2"], ["mlp_out.0"])


def test_n_transcoders_together_equal_n_single_runs(lm, corpus, tmp_path):
    layers = (0, 1, 2)
    src = _stream(lm, corpus, [f"mlp_in.{i}" for i in layers], [f"mlp_out.{i}" for i in layers])
    cfgs = [_tcfg(i, skip_connection=(i == 1)) for i in layers]
    dirs = [tmp_path / f"tc{i}" for i in layers]
    together = train_multisite(cfgs, src, _tc(), out_dirs=dirs)
    for slot, (cfg, tc) in enumerate(zip(cfgs, together)):
        alone = train_sae(cfg, lambda start, s=slot: (b[:, s] for b in src(start)), _tc())
        _same(tc, alone)
        _same(tc, load_sae(dirs[slot]))
    assert together[0].cfg.target_norm_scale != together[2].cfg.target_norm_scale  # scales are per site


def test_saes_at_several_residual_sites(lm, corpus):
    src = _stream(lm, corpus, ["resid.0", "resid.2"])
    assert next(iter(src(0))).shape == (100, 2, D)
    cfgs = [SAEConfig(arch="topk", d_model=D, n_features=64, k=4, site=s) for s in ("resid.0", "resid.2")]
    together = train_multisite(cfgs, src, _tc(steps=6))
    for slot, sae in enumerate(together):
        _same(sae, train_sae(cfgs[slot], lambda start, s=slot: (b[:, s] for b in src(start)), _tc(steps=6)))


class _Boom(Exception):
    pass


def test_a_killed_and_resumed_run_is_bit_identical(lm, corpus, tmp_path):
    src = _stream(lm, corpus, ["mlp_in.0", "mlp_in.1"], ["mlp_out.0", "mlp_out.1"])
    data = list(src(0))
    cfgs = [_tcfg(0), _tcfg(1, skip_connection=True)]

    def killing(start):
        for i, b in enumerate(data[start:], start):
            if i == 7:
                raise _Boom
            yield b

    kw = dict(steps=10, checkpoint_every=3)
    ref = train_multisite(cfgs, lambda s: iter(data[s:]), _tc(checkpoint_dir=str(tmp_path / "a"), **kw))
    with pytest.raises(_Boom):
        train_multisite(cfgs, killing, _tc(checkpoint_dir=str(tmp_path / "b"), **kw))
    got = train_multisite(cfgs, lambda s: iter(data[s:]), _tc(checkpoint_dir=str(tmp_path / "b"), **kw))
    for a, b in zip(ref, got):
        _same(a, b)
    with pytest.raises(SAEError, match="holds 2 sites, this run has 1"):
        train_multisite(cfgs[:1], lambda s: iter(data[s:]), _tc(checkpoint_dir=str(tmp_path / "b"), **kw))


def test_bad_input_is_named(lm, corpus):
    with pytest.raises(SAEError, match="read the same site"):
        train_multisite([_tcfg(0), _tcfg(0)], lambda s: iter([]), _tc())
    flat = [torch.randn(100, 2, D) for _ in range(3)]  # one transcoder's [B, 2, d] batches, not [B, S, 2, d]
    with pytest.raises(SAEError, match=r"multi-site batch is \[B, 2 sites, 2, d\]"):
        train_multisite([_tcfg(0), _tcfg(1)], lambda s: iter(flat[s:]), _tc())
