"""SAEConfig / TrainConfig validation and defaults, the architecture registry, per-architecture hooks, and the
`sae train` command's defaults (read from the configs, so they cannot drift)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

import thoughtscope.sae as S
from thoughtscope.sae import SAEConfig, SAEError, TrainConfig
from thoughtscope.sae.base import SAE_CLASSES

ARCHS = ["relu-l1", "topk", "batchtopk", "jumprelu"]


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kw,field,expected",
    [
        (dict(d_model=0), "d_model", "positive integer"),
        (dict(n_features=2.5), "n_features", "positive integer"),
        (dict(l1_warmup_frac=1.5), "l1_warmup_frac", "[0, 1]"),
        (dict(aux_coeff=-1.0), "aux_coeff", ">= 0"),
        (dict(dead_tokens=0), "dead_tokens", "positive number of tokens"),
        (dict(jumprelu_init_threshold=0.0), "jumprelu_init_threshold", "> 0"),
        (dict(l0_penalty="cubic"), "l0_penalty", "'plain' or 'tanh'"),
        (dict(max_norm_ratio=float("nan")), "max_norm_ratio", "None or a number > 0"),
        (dict(norm_mean=[0.0, 1.0]), "norm_mean", "576 numbers"),
        (dict(arch="topk", k=0), "k", "1..n_features"),
    ],
)
def test_sae_config_errors_name_field_value_and_expectation(kw, field, expected):
    with pytest.raises(SAEError) as e:
        SAEConfig(**kw)
    msg = str(e.value)
    assert f"SAEConfig.{field}=" in msg and repr(kw[field]) in msg and expected in msg


@pytest.mark.parametrize(
    "kw,field,expected",
    [
        (dict(batch_size=0), "batch_size", "positive"),
        (dict(n_tokens=-5), "n_tokens", "positive number of tokens"),
        (dict(dtype="float8"), "dtype", "float32, bfloat16"),
        (dict(b_dec_init="median"), "b_dec_init", "geometric_median, mean, zero"),
        (dict(log_every=0), "log_every", "positive"),
        (dict(adam_betas=(0.9,)), "adam_betas", "two numbers"),
    ],
)
def test_train_config_errors_name_field_value_and_expectation(kw, field, expected):
    with pytest.raises(SAEError) as e:
        TrainConfig(**kw)
    msg = str(e.value)
    assert f"TrainConfig.{field}=" in msg and repr(kw[field]) in msg and expected in msg


def test_k_is_only_checked_where_it_is_used():
    SAEConfig(arch="relu-l1", d_model=8, n_features=16, k=999)
    with pytest.raises(SAEError, match="k=999 must be in 1..n_features=16"):
        SAEConfig(arch="batchtopk", d_model=8, n_features=16, k=999)


def test_total_tokens_is_the_former_name_of_n_tokens():
    with pytest.warns(DeprecationWarning, match="n_tokens"):
        tc = TrainConfig(total_tokens=1000)
    assert tc.n_tokens == 1000 and "total_tokens" not in dataclasses.asdict(tc)


def test_unknown_keys_are_kept_in_extra():
    cfg = SAEConfig.from_dict({"arch": "topk", "d_model": 8, "n_features": 16, "k": 2, "extra": {"a": 1}, "new": 2})
    assert cfg.extra == {"a": 1, "new": 2}


# ----------------------------------------------------------------------------- registry and hooks
def test_registry_lists_builtins_in_order_and_takes_new_architectures():
    # the built-ins this file's parametrised tests run (self-reconstructing), then matryoshka and the transcoder
    assert (*ARCHS, "matryoshka", "transcoder", "jumprelu-transcoder") == S.ARCHITECTURES
    assert [S.sae_class(a) for a in ARCHS] == [S.ReluL1SAE, S.TopKSAE, S.BatchTopKSAE, S.JumpReLUSAE]

    @S.register_sae_class
    class ShiftedReLU(S.SAE):  # a new architecture needs no change anywhere else
        arch = "test-shifted-relu"

        def activation(self, pre):
            return torch.relu(pre - 0.1)

    try:
        sae = S.build_sae(SAEConfig(arch="test-shifted-relu", d_model=8, n_features=16), seed=0)
        assert isinstance(sae, ShiftedReLU) and sae.encode(torch.randn(3, 8)).shape == (3, 16)
    finally:
        del SAE_CLASSES["test-shifted-relu"]
    with pytest.raises(SAEError, match="unknown SAE architecture 'test-shifted-relu'; expected one of relu-l1, topk"):
        SAEConfig(arch="test-shifted-relu")


def test_hooks_keep_the_former_per_architecture_rules():
    """Sweep folder names, learning rates and AuxK use as `sae train` and the trainer had them."""
    names, lrs, aux = {}, {}, {}
    for a in ARCHS:
        cfg = SAEConfig(arch=a, d_model=64, n_features=64 * 8, k=16, l1_coeff=2.5, l0_coeff=0.5)
        cls = S.sae_class(a)
        names[a], lrs[a], aux[a] = cls.run_name(cfg), cls.default_lr(cfg), cls.uses_aux
    assert names == {
        "relu-l1": "relu-l1-x8-l1_2.5",
        "topk": "topk-x8-k16",
        "batchtopk": "batchtopk-x8-k16",
        "jumprelu": "jumprelu-x8-l0_0.5",
    }
    assert lrs["relu-l1"] == 5e-5 and all(lrs[a] == 2e-4 / (512 / 2**14) ** 0.5 for a in ARCHS[1:])
    assert aux == {"relu-l1": False, "topk": True, "batchtopk": True, "jumprelu": False}


def _trained_like(arch: str) -> S.SAE:
    sae = S.build_sae(SAEConfig(arch=arch, d_model=16, n_features=48, k=5), seed=3)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.linspace(0.05, 0.6, 48).log())
        if arch == "batchtopk":
            sae.threshold.fill_(0.2)
    return sae


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_sparse_holds_exactly_the_non_zeros_of_encode(arch):
    sae = _trained_like(arch)
    x = torch.randn(2, 13, 16, generator=torch.Generator().manual_seed(1)) * 2
    f = sae.encode(x)
    vals, idx = sae.encode_sparse(x)
    assert vals.shape[:-1] == x.shape[:-1] and vals.shape == idx.shape
    rebuilt = torch.zeros_like(f).scatter_add_(-1, idx, vals)
    assert torch.equal(rebuilt, f)
    if not sae.sparse_native:  # padded form: non-zeros first in ascending feature order, then zeros
        n = (f > 0).sum(-1)
        assert vals.shape[-1] == int(n.max())


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_sparse_into_a_reused_buffer_is_bit_identical(arch):
    sae = _trained_like(arch)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(2))
    buf = torch.empty(40, 48)
    with torch.no_grad():  # an out= buffer is for inference only
        for a, b in zip(sae.encode_sparse(x, pre_out=buf), sae.encode_sparse(x)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ARCHS)
def test_partial_encoder_follows_the_architecture(arch):
    """Thresholded architectures: their threshold; top-k: ReLU(pre) (no competition between features)."""
    sae = _trained_like(arch)
    x = torch.randn(30, 16, generator=torch.Generator().manual_seed(3)) * 2
    idx = torch.tensor([0, 5, 47, 9])
    pre = sae.pre_acts(x)[:, idx]
    want = torch.relu(pre) if arch == "topk" else sae.activation(sae.pre_acts(x))[:, idx]
    torch.testing.assert_close(sae.partial_encoder(idx)(x), want, rtol=1e-6, atol=1e-6)


def test_untrained_batchtopk_reads_partial_features_by_relu():
    sae = S.build_sae(SAEConfig(arch="batchtopk", d_model=16, n_features=48, k=5), seed=0)
    assert sae.partial_thresholds(torch.tensor([1, 2])) is None


# ----------------------------------------------------------------------------- the command's defaults
def test_sae_train_defaults_are_the_configs():
    import typer.main

    from thoughtscope.cli.sae import sae_app

    cmd = typer.main.get_command(sae_app).commands["train"]
    got = {p.name: p.default for p in cmd.params}
    s, t = SAEConfig(), TrainConfig()
    assert got["arch"] == s.arch and int(got["k"]) == s.k and int(got["expansion"]) * s.d_model == s.n_features
    assert float(got["l1_coeff"]) == s.l1_coeff and float(got["l0_coeff"]) == s.l0_coeff
    assert got["max_norm_ratio"] == s.max_norm_ratio
    for name in ("batch_size", "lr", "epochs", "seed", "device", "dtype", "checkpoint_every"):
        assert got[name] == getattr(t, name), name


def test_the_cli_reads_config_defaults_without_torch():
    code = "import sys, thoughtscope.cli, thoughtscope.sae.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_package_export_resolves():
    assert sorted(S.__all__) == sorted(S._WHERE)
    for name in S.__all__:
        assert getattr(S, name) is not None, name
    from thoughtscope.sae.architectures import ARCHITECTURES, SAE, JumpReLUSAE, SAEConfig, build_sae  # noqa: F401


def test_the_train_grid_is_every_combination_once_per_run_name():
    """`sae train`'s comma-separated values become one config per run; a value an architecture ignores (k for
    relu-l1) gives one run, not two."""
    from thoughtscope.sae.run import Source, config_grid

    src = Source(None, 32, "m", "resid.1")
    cfgs, names = config_grid(
        src, arch=["topk", "relu-l1"], k=[4, 8], expansion=[2], l1_coeff=[1.0], l0_coeff=[1.0], max_norm_ratio=None
    )
    assert names == ["topk-x2-k4", "topk-x2-k8", "relu-l1-x2-l1_1"]
    assert all(c.d_model == 32 and c.n_features == 64 and c.site == "resid.1" for c in cfgs)
    assert cfgs[0].max_norm_ratio is None


def test_sae_help_says_what_each_count_counts():
    """`--batch-size` is rows per optimiser step; `sae eval`'s store budget is --tokens (--max-tokens, its old
    name, still works but is hidden); option help comes from the config fields."""
    import typer.main

    from thoughtscope.cli.sae import sae_app
    from thoughtscope.configdoc import field_help

    cmds = typer.main.get_command(sae_app).commands
    opts = {p.name: p for p in cmds["train"].params}
    assert "optimiser step" in opts["batch_size"].help
    assert opts["lr"].help == field_help(TrainConfig, "lr") and opts["tokens"].help == field_help(
        TrainConfig, "n_tokens"
    )
    ev = {p.name: p for p in cmds["eval"].params}
    assert "--tokens" in ev["tokens"].opts and not ev["tokens"].hidden and ev["max_tokens"].hidden
