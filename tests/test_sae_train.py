"""Trainer mechanics: resume, DDP (2 gloo processes), real activation stores, bad input."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from helpers.sae_data import D_MODEL, FAST, make_batches, recovery

import thoughtscope.sae as S
from thoughtscope.sae import SAEConfig, SAEError, TrainConfig
from thoughtscope.store import ActivationStore, StoreWriter

pytestmark = pytest.mark.usefixtures("one_thread")


class _Boom(Exception):
    pass


def _killing_source(data, kill_at):
    def src(start):
        for i, b in enumerate(data[start:], start):
            if i == kill_at:
                raise _Boom()
            yield b

    return src


@pytest.mark.parametrize("arch", ["topk", "relu-l1"])
def test_resume_is_bit_identical(tmp_path, arch):
    data = make_batches(20, B=128)
    cfgs = [
        SAEConfig(arch=arch, d_model=D_MODEL, n_features=128, k=4, dead_tokens=128 * 3),
        SAEConfig(arch="batchtopk", d_model=D_MODEL, n_features=64, k=8),
    ]
    tc = {"batch_size": 128, "steps": 20, "lr": 3e-3, "progress": False, "checkpoint_every": 5, "log_every": 5}
    ref = S.train_saes(cfgs, lambda start: iter(data[start:]), TrainConfig(checkpoint_dir=str(tmp_path / "a"), **tc))
    with pytest.raises(_Boom):
        S.train_saes(cfgs, _killing_source(data, 12), TrainConfig(checkpoint_dir=str(tmp_path / "b"), **tc))
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 10 and ck["batches_consumed"] == 10
    got = S.train_saes(cfgs, lambda start: iter(data[start:]), TrainConfig(checkpoint_dir=str(tmp_path / "b"), **tc))
    for a, b in zip(ref, got):
        for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), n


# ----------------------------------------------------------------------------- DDP
def _ddp_worker(rank, world, port, out, data, cfgs, tc):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        saes = S.train_saes(cfgs, data, tc)
        if rank == 0:
            torch.save([s.state_dict() for s in saes], out)
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_processes_match_single(tmp_path):
    """2 ranks x 64 rows must train the same SAEs as 1 process x 128 rows (gradients, AuxK scale, dead counters
    are reduced over ranks).

    Run in float64. In float32 the mean gradient over 2 x 64 rows differs from the one over 128 rows by summation
    order (~1e-7 relative), and Adam turns that into lr-sized update differences wherever a gradient entry is
    near zero (m / sqrt(v) ~ sign(g)): that made an rtol=1e-4 comparison flaky. In float64 the order noise is
    ~1e-16, far below Adam's eps, so a tolerance of 1e-9 is safe and still catches real mismatches. Measured on
    this problem: max |diff| 2e-15 in float64, 1e-6 in float32; with the gradient all-reduce removed, 1e-2.
    """
    import socket

    import torch.multiprocessing as mp

    data = make_batches(12, B=128)
    cfgs = [
        SAEConfig(arch="topk", d_model=D_MODEL, n_features=128, k=4, dead_tokens=128 * 3),
        SAEConfig(arch="relu-l1", d_model=D_MODEL, n_features=64),
    ]
    tc = TrainConfig(batch_size=128, steps=12, lr=3e-3, dtype="float64", **FAST)
    single = S.train_saes(cfgs, data, tc)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ddp.pt")
    # fork (Linux): the ranks inherit the imported modules; spawning re-imports torch per rank (~20 s on a
    # loaded 2-core machine vs ~1 s). Ranks run single-threaded, so no OpenMP pool is used after the fork.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    mp.start_processes(_ddp_worker, args=(2, port, out, data, cfgs, tc), nprocs=2, join=True, start_method=method)
    got = torch.load(out)
    for a, sd in zip(single, got):
        assert a.W_dec.dtype == torch.float64
        for n, p in a.state_dict().items():
            torch.testing.assert_close(
                sd[n], p, rtol=1e-9, atol=1e-10, msg=lambda m, a=a, n=n: f"{a.cfg.arch} {n}: {m}"
            )
        moved = (a.state_dict()["W_dec"] - S.build_sae(a.cfg, seed=None).state_dict()["W_dec"]).abs().max()
        assert moved > 0  # sanity: the SAEs did train


# ----------------------------------------------------------------------------- activation stores
DOC_LEN = 32  # tokens per synthetic document; position 0 is the BOS/attention-sink row the trainer drops


def _write_store(path, n_rows: int, *, d_model: int = D_MODEL, nan_row: int | None = None, shard_tokens: int = 2048):
    """A finished store of synthetic rows (make_batches) with doc_id / position / token_id columns."""
    acts = torch.cat(make_batches(n_rows // 256, B=256, seed=3))[:, :d_model].contiguous()
    if nan_row is not None:
        acts[nan_row, 1] = float("nan")
    idx = torch.arange(acts.shape[0])
    meta = {"doc_id": idx // DOC_LEN, "position": idx % DOC_LEN, "token_id": (idx * 7) % 101}
    w = StoreWriter(path, model="synthetic", site="resid.0", d_model=d_model, shard_tokens=shard_tokens)
    w.add(acts[: len(acts) // 2], {k: v[: len(acts) // 2] for k, v in meta.items()})  # two adds: shards span them
    w.add(acts[len(acts) // 2 :], {k: v[len(acts) // 2 :] for k, v in meta.items()})
    w.finish()
    return acts, meta


def test_trains_on_a_real_activation_store(tmp_path):
    acts, meta = _write_store(tmp_path / "store", 256 * 40)
    store = ActivationStore.open(tmp_path / "store")
    assert store.n_shards == 5

    # the trainer's input path: shuffled batches with meta, BOS rows dropped, meta aligned with rows
    seen = 0
    for x, m in store.batches(128, shuffle=True, seed=0, drop_last=True, with_meta=True, buffer_tokens=1024):
        assert set(m) >= {"doc_id", "position", "token_id"} and bool((m["position"] != 0).all())
        rows = m["doc_id"] * DOC_LEN + m["position"]
        assert torch.equal(x, acts[rows]) and torch.equal(m["token_id"], meta["token_id"][rows])
        seen += len(x)
    n_kept = int((meta["position"] != 0).sum())
    assert seen == n_kept // 128 * 128

    cfg = SAEConfig(arch="topk", d_model=D_MODEL, n_features=128, k=4, model="synthetic", site="resid.0")
    tr = S.Trainer([cfg], TrainConfig(batch_size=128, lr=4e-3, log_every=10, progress=False, checkpoint_every=0))
    sae = tr.fit(store)[0]
    assert tr.total_steps == n_kept // 128 and tr.step == tr.total_steps  # schedule sized to non-BOS rows
    assert not any("note" in r for r in tr.metrics_log)
    ev = S.evaluate_sae(sae, [acts[meta["position"] != 0]])
    # 77 steps: far from converged, but clearly learned (an untrained decoder scores ~0.5 here)
    assert ev["fvu"] < 0.5 and recovery(sae) > recovery(S.build_sae(cfg)) + 0.1, (ev, recovery(sae))

    # a sweep of two architectures over the same store (one read of the data)
    sw = S.train_saes(
        [cfg, SAEConfig(arch="relu-l1", d_model=D_MODEL, n_features=64)],
        store,
        TrainConfig(batch_size=128, steps=20, **FAST),
    )
    assert [s.cfg.arch for s in sw] == ["topk", "relu-l1"]


def test_nan_row_in_store_names_shard_and_row(tmp_path):
    bad = 2048 * 3 + 77  # shard 3, row 77 (shards hold 2048 rows)
    _write_store(tmp_path / "store", 256 * 40, nan_row=bad)
    store = ActivationStore.open(tmp_path / "store")
    cfg = SAEConfig(arch="topk", d_model=D_MODEL, n_features=64, k=4)
    with pytest.raises(SAEError) as ei:
        S.train_sae(cfg, store, TrainConfig(batch_size=128, **FAST))
    msg = str(ei.value)
    assert "contains NaN/Inf in 1 row(s)" in msg
    assert f"doc_id={bad // DOC_LEN}, position={bad % DOC_LEN}" in msg
    assert "in shard 3 (row 77 of " in msg and "shard_00003.acts.npy" in msg, msg


def test_store_width_mismatch(tmp_path):
    _write_store(tmp_path / "narrow", 256 * 2, d_model=24)
    cfg = SAEConfig(arch="topk", d_model=D_MODEL, n_features=64, k=4)
    with pytest.raises(SAEError, match=r"store .*narrow has d_model=24 but the SAE expects d_model=32"):
        S.train_sae(cfg, ActivationStore.open(tmp_path / "narrow"), TrainConfig(batch_size=64, **FAST))


def test_nan_batch_is_named():
    data = make_batches(6, B=64)
    data[3][5, 2] = float("nan")
    cfg = SAEConfig(arch="topk", d_model=D_MODEL, n_features=64, k=4)
    with pytest.raises(SAEError, match=r"batch 3 contains NaN/Inf in 1 row\(s\) \(first row 5"):
        S.train_sae(cfg, data, TrainConfig(batch_size=64, steps=6, **FAST))


def _bench_module(monkeypatch):
    """benchmarks/sae_train.py imported without leaving its TQDM_DISABLE default behind."""
    import importlib

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    monkeypatch.syspath_prepend(root)
    had = "TQDM_DISABLE" in os.environ
    mod = importlib.import_module("sae_train")
    if not had:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
    return mod


def test_benchmark_matched_l0_search_brackets_and_interpolates(monkeypatch):
    """The relu-l1 benchmark compares FVU at SAELens' L0: the search must bracket it and interpolate in log L0."""
    import math

    B = _bench_module(monkeypatch)

    def l0_of(l1):  # a steep, then flat L0(lambda) like short relu-l1 runs
        return 3000.0 * l1**-4 + 20.0

    def train_at(l1):
        l0 = l0_of(l1)
        return {"l1": l1, "l0": l0, "fvu": 0.9 - 0.08 * math.log(l0), "dead_frac": 0.0}

    target = 152.0
    for start in (1.0, 2.2, 8.0):
        pts, at = B.match_l0(train_at, train_at(start), target, max_runs=6, tol=0.1)
        assert at["bracketed"], (start, pts)
        assert abs(at["nearest_l0_rel_gap"]) <= 0.1
        lo, hi = sorted(at["between_l1"], reverse=True)  # larger lambda = smaller L0
        assert l0_of(lo) <= target <= l0_of(hi)
        # the interpolated FVU is the value of the (log-linear) curve at the target
        assert at["fvu"] == pytest.approx(0.9 - 0.08 * math.log(target), abs=1e-9)
    # out of reach: the nearest point is reported, unbracketed
    pts, at = B.match_l0(train_at, train_at(8.0), 5.0, max_runs=3, tol=0.1)
    assert not at["bracketed"] and len(pts) == 4


def test_a_run_whose_data_runs_out_between_log_steps_keeps_its_final_metrics():
    batches = make_batches(7)  # 7 steps of the 20 asked for, none of them a log step (every 50)
    cfg = S.SAEConfig(arch="topk", d_model=D_MODEL, n_features=64, k=4)
    sae = S.train_sae(cfg, batches, S.TrainConfig(batch_size=256, steps=20, lr=3e-3, **FAST))
    assert set(sae.train_metrics) >= {"fvu", "l0", "dead_frac"} and sae.train_metrics["l0"] == 4
