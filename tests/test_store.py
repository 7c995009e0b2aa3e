"""Tests for the on-disk activation store: exact round trips, crash safety, streaming, clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import env_with_tests_on_path
from helpers import (
    make_store_rows as make_data,  # shared with the child process of the kill test
)

from thoughtscope.store import (
    MANIFEST_NAME,
    TIMESTAMP_KEYS,
    ActivationStore,
    StoreCorruptError,
    StoreError,
    StoreMismatchError,
    StoreNotFoundError,
    StoreWriter,
)

D = 8
ARGS = dict(
    model="tiny-llama",
    site="resid.1",
    d_model=D,
    dtype="float32",
    shard_tokens=100,
    corpus={"spec": "synthetic", "n_docs": 20},
    extra={"ctx_len": 16},
)


def write_store(path, acts, meta, chunks=None, **over):
    kw = {**ARGS, **over}
    w = StoreWriter(path, **kw)
    n = acts.shape[0]
    sizes = chunks or [n]
    s = 0
    i = 0
    while s < n:
        k = sizes[i % len(sizes)]
        w.add(acts[s : s + k], {c: v[s : s + k] for c, v in meta.items()})
        s += k
        i += 1
    return w.finish()


def shard_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("shard_*.npy"))}


def manifest_sans_time(path: Path) -> dict:
    m = json.loads((path / MANIFEST_NAME).read_text())
    for k in TIMESTAMP_KEYS:
        m.pop(k, None)
    return m


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern view so comparisons are exact (and NaN-safe)."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_exact(tmp_path, dtype):
    acts, meta = make_data(350, D)
    st = write_store(tmp_path / "s", acts, meta, dtype=dtype)
    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    expect = acts.to(tdt)
    assert st.dtype == tdt and st.dtype_name == dtype
    assert len(st) == st.n_tokens == 350 and st.n_shards == 4 and st.complete
    assert [sh["n_tokens"] for sh in st.manifest["shards"]] == [100, 100, 100, 50]
    for i in range(st.n_shards):
        a, m = st.shard(i)
        assert a.dtype == tdt and a.shape == (st.manifest["shards"][i]["n_tokens"], D)
        sl = slice(i * 100, i * 100 + a.shape[0])
        assert torch.equal(as_bits(a), as_bits(expect[sl]))
        for c in meta:
            assert torch.equal(m[c].long(), meta[c][sl].long())
        assert m["doc_id"].dtype == torch.int64 and m["position"].dtype == torch.int32
    # ordered slice across shard boundaries
    part, pm = st.tokens(80, 305, with_meta=True)
    assert torch.equal(as_bits(part), as_bits(expect[80:305]))
    assert torch.equal(pm["token_id"].long(), torch.arange(80, 305))
    assert st.tokens(10, 10).shape == (0, D)
    assert torch.equal(as_bits(st.tokens()), as_bits(expect))
    assert st.tokens(0, 5, dtype=torch.float32).dtype == torch.float32
    # writing to a mapped shard never changes the file
    a, _ = st.shard(0)
    a.zero_()
    assert torch.equal(as_bits(st.shard(0)[0]), as_bits(expect[:100]))
    assert st.verify(checksums=True) is None
    stats = st.manifest["stats"]
    assert stats["exclude_bos"] is True and stats["nonfinite_tokens"] == 0
    assert stats["median_l2_norm"] > 0 and len(stats["mean"]) == D
    assert st.columns == ["doc_id", "position", "token_id", "doc_position"]


def test_chunking_independence(tmp_path):
    acts, meta = make_data(437, D)
    write_store(tmp_path / "a", acts, meta, chunks=[437])
    write_store(tmp_path / "b", acts, meta, chunks=[1])
    write_store(tmp_path / "c", acts, meta, chunks=[7, 150, 33, 99, 1, 250])
    ref = shard_bytes(tmp_path / "a")
    assert len(ref) == 5 * 5  # 5 shards x (acts + 4 columns)
    assert shard_bytes(tmp_path / "b") == ref
    assert shard_bytes(tmp_path / "c") == ref
    assert manifest_sans_time(tmp_path / "b") == manifest_sans_time(tmp_path / "a")
    assert manifest_sans_time(tmp_path / "c") == manifest_sans_time(tmp_path / "a")


def test_add_copies_input(tmp_path):
    acts, meta = make_data(30, D)
    w = StoreWriter(tmp_path / "s", **ARGS)
    buf = acts.clone()
    w.add(buf, meta)
    buf.zero_()  # caller reuses its buffer
    st = w.finish()
    assert torch.equal(st.tokens(), acts)


def test_optional_column_and_numpy_inputs(tmp_path):
    acts, meta = make_data(120, D, doc_position=False)
    w = StoreWriter(tmp_path / "s", **ARGS)
    w.add(acts.numpy(), {c: v.numpy() for c, v in meta.items()})
    st = w.finish()
    assert st.columns == ["doc_id", "position", "token_id"]
    _, m = st.shard(1)
    assert set(m) == {"doc_id", "position", "token_id"}


def test_empty_store(tmp_path):
    st = StoreWriter(tmp_path / "s", **ARGS).finish()
    assert len(st) == 0 and st.complete and st.n_shards == 0
    assert list(st.batches(4)) == []
    assert st.manifest["stats"]["median_l2_norm"] is None


# --------------------------------------------------------------------------- streaming


@pytest.fixture
def tagged(tmp_path):
    acts, meta = make_data(1000, D)
    return write_store(tmp_path / "s", acts, meta, shard_tokens=128), acts, meta


def collect(it):
    out = [(a.clone(), {c: v.clone() for c, v in m.items()}) for a, m in it]
    acts = torch.cat([a for a, _ in out])
    meta = {c: torch.cat([m[c] for _, m in out]) for c in out[0][1]}
    return out, acts, meta


def test_shuffle_visits_every_token_once_with_small_buffer(tagged):
    st, _, _ = tagged
    it = st.batches(32, seed=1, buffer_tokens=64, exclude_bos=False, with_meta=True)
    out, acts, meta = collect(it)
    ids = meta["token_id"].long()
    assert sorted(ids.tolist()) == list(range(1000))
    assert not torch.equal(ids, torch.arange(1000))
    assert torch.equal(acts[:, 0].long(), ids)  # rows stay aligned with their meta
    assert all(a.shape[0] == 32 for a, _ in out[:-1]) and out[-1][0].shape[0] == 1000 % 32
    assert acts.dtype == torch.float32
    # bounded memory: the first batch can only come from the first buffer fill (one 64-row chunk)
    assert len(set((out[0][1]["token_id"] // 64).tolist())) == 1


def test_shuffle_deterministic_and_seed_dependent(tagged):
    st, _, _ = tagged

    def order(seed, **kw):
        return torch.cat(
            [
                m["token_id"]
                for _, m in st.batches(50, seed=seed, buffer_tokens=300, exclude_bos=False, with_meta=True, **kw)
            ]
        )

    a = order(3)
    assert torch.equal(a, order(3))
    assert not torch.equal(a, order(4))
    assert sorted(order(4).tolist()) == list(range(1000))
    # buffer larger than the store: a plain full shuffle
    big = torch.cat(
        [m["token_id"] for _, m in st.batches(50, seed=3, buffer_tokens=10**6, exclude_bos=False, with_meta=True)]
    )
    assert sorted(big.tolist()) == list(range(1000))


def test_epochs_and_drop_last(tagged):
    st, _, _ = tagged
    bats = list(st.batches(64, seed=0, buffer_tokens=200, epochs=2, drop_last=True, exclude_bos=False, with_meta=True))
    assert all(a.shape[0] == 64 for a, _ in bats)
    per_epoch = 1000 // 64
    assert len(bats) == 2 * per_epoch
    e1 = torch.cat([m["token_id"] for _, m in bats[:per_epoch]])
    e2 = torch.cat([m["token_id"] for _, m in bats[per_epoch:]])
    assert len(set(e1.tolist())) == len(e1) == len(set(e2.tolist())) == per_epoch * 64
    assert not torch.equal(e1, e2)


def test_unshuffled_is_store_order(tagged):
    st, acts, meta = tagged
    got = torch.cat(list(st.batches(33, shuffle=False, exclude_bos=False)))
    assert torch.equal(got, acts)
    got = list(st.batches(33, shuffle=False, exclude_bos=True, with_meta=True, dtype=torch.float64))
    keep = meta["position"] != 0
    assert torch.equal(torch.cat([a for a, _ in got]), acts[keep].double())
    assert torch.equal(torch.cat([m["doc_id"] for _, m in got]), meta["doc_id"][keep])


def test_exclude_bos(tagged):
    st, _, meta = tagged
    ids = torch.cat([m["token_id"] for _, m in st.batches(40, seed=0, buffer_tokens=100, with_meta=True)])
    expect = set(meta["token_id"][meta["position"] != 0].tolist())
    assert set(ids.tolist()) == expect and len(ids) == len(expect)
    assert all(not bool((m["position"] == 0).any()) for _, m in st.batches(40, with_meta=True))


def test_max_norm_ratio_and_nonfinite_rows(tmp_path):
    acts, meta = make_data(300, D)
    acts[:, 0] = 0.0  # keep norms comparable
    big = torch.tensor([17, 18, 140])
    acts[big] *= 100.0
    acts[250, 3] = float("nan")
    acts[251, 4] = float("inf")
    meta["position"][:] = 5  # no BOS rows here
    st = write_store(tmp_path / "s", acts, meta)
    stats = st.manifest["stats"]
    assert stats["nonfinite_tokens"] == 2 and stats["tokens"] == 298
    assert stats["median_l2_norm"] == pytest.approx(
        float(torch.linalg.vector_norm(acts[torch.isfinite(acts).all(1)], dim=1).median()), rel=0.05
    )
    ids = torch.cat(
        [m["token_id"] for _, m in st.batches(16, seed=0, buffer_tokens=50, max_norm_ratio=10.0, with_meta=True)]
    ).tolist()
    assert not set(big.tolist()) & set(ids)
    assert 250 in ids and 251 in ids  # NaN/Inf rows are passed on, not silently dropped
    assert len(ids) == 297
    unfiltered = sum(a.shape[0] for a in st.batches(16, seed=0))
    assert unfiltered == 300


def test_batches_argument_errors(tagged):
    st, _, _ = tagged
    bad = [
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=8, buffer_tokens=0), "buffer_tokens"),
        (dict(batch_size=8, epochs=0), "epochs"),
        (dict(batch_size=8, max_norm_ratio=-1.0), "max_norm_ratio"),
        (dict(batch_size=8, dtype=torch.int64), "dtype"),
        (dict(batch_size=2.5), "batch_size"),
    ]
    for kw, word in bad:
        with pytest.raises(StoreError, match=word):
            st.batches(**kw)
    with pytest.raises(StoreError, match="start"):
        st.tokens(5, 2000)
    with pytest.raises(StoreError, match="shard index"):
        st.shard(99)


# --------------------------------------------------------------------------- crash safety / resume


CHILD = textwrap.dedent("""
    import sys, time
    from helpers import make_store_rows as make_data
    from thoughtscope.store import StoreWriter
    args = dict(model="tiny-llama", site="resid.1", d_model=8, dtype="float32", shard_tokens=100,
                corpus={"spec": "synthetic", "n_docs": 20}, extra={"ctx_len": 16})
    acts, meta = make_data(int(sys.argv[2]), 8)
    w = StoreWriter(sys.argv[1], **args)
    done = w.tokens_done
    for s in range(0, acts.shape[0], 30):
        w.add(acts[s:s + 30], {c: v[s:s + 30] for c, v in meta.items()})
        if w.tokens_done != done:
            done = w.tokens_done
            print("committed", done, flush=True)
        time.sleep(0.02)
    time.sleep(60)  # never finishes: the parent kills us
""")


def resume_and_finish(path, acts, meta):
    w = StoreWriter(path, **ARGS)
    done = w.tokens_done
    assert done % ARGS["shard_tokens"] == 0 or done == acts.shape[0]  # the latter: finish() was cut short
    for s in range(done, acts.shape[0], 45):
        w.add(acts[s : s + 45], {c: v[s : s + 45] for c, v in meta.items()})
    return done, w.finish()


def test_resume_after_sigkill(tmp_path):
    n = 730
    acts, meta = make_data(n, D)
    ref = tmp_path / "ref"
    write_store(ref, acts, meta)

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    path = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path), str(n)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_with_tests_on_path(),
    )
    try:
        commits = 0
        deadline = time.time() + 60
        while commits < 2 and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            commits += line.startswith("committed")
        assert commits == 2, proc.stderr.read() if proc.poll() is not None else "child too slow"
        time.sleep(0.03)  # land somewhere inside the next adds
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    # the killed store reads as its committed shards, marked incomplete
    st = ActivationStore.open(path)
    assert not st.complete and st.n_tokens >= 200 and st.n_tokens % 100 == 0
    assert torch.equal(st.tokens(), acts[: st.n_tokens])
    assert st.stats["median_l2_norm"] > 0  # computed on the fly for an unfinished store
    (path / ".tmp.shard_00099.acts.npy.123").write_bytes(b"junk from a dead writer")

    done, final = resume_and_finish(path, acts, meta)
    assert done == st.n_tokens
    assert not list(path.glob(".tmp.*"))
    assert final.complete and len(final) == n
    assert shard_bytes(path) == shard_bytes(ref)
    assert manifest_sans_time(path) == manifest_sans_time(ref)


@pytest.mark.parametrize("crash_at", [1, 3, 5, 6, 8, 12, 24, 25])
def test_crash_at_any_rename_is_recoverable(tmp_path, monkeypatch, crash_at):
    """Fail the k-th os.replace (shard file or manifest) as a process death would, then resume."""
    n = 350
    acts, meta = make_data(n, D)
    ref = tmp_path / "ref"
    write_store(ref, acts, meta)

    real_replace = os.replace
    calls = {"n": 0}

    def flaky(src, dst):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise OSError("simulated crash")
        return real_replace(src, dst)

    path = tmp_path / "s"
    w = StoreWriter(path, **ARGS)  # its initial manifest is written before the patch
    # each shard: 5 file renames then 1 manifest rename; #24 is the last shard's manifest, #25 the final one
    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="simulated crash"):
        for s in range(0, n, 60):
            w.add(acts[s : s + 60], {c: v[s : s + 60] for c, v in meta.items()})
        w.finish()
    monkeypatch.setattr(os, "replace", real_replace)
    w.close()  # what process death does to the lock

    st = ActivationStore.open(path)
    assert not st.complete
    assert torch.equal(st.tokens(), acts[: st.n_tokens])
    if st.n_tokens == n:  # only the final manifest was lost: adding more would break equal shards
        w2 = StoreWriter(path, **ARGS)
        with pytest.raises(StoreError, match="final"):
            w2.add(acts[:1], {c: v[:1] for c, v in meta.items()})
        w2.close()
    done, final = resume_and_finish(path, acts, meta)
    assert done == st.n_tokens
    assert not list(path.glob(".tmp.*"))
    assert shard_bytes(path) == shard_bytes(ref)
    assert manifest_sans_time(path) == manifest_sans_time(ref)


def test_incomplete_store_is_readable(tmp_path):
    acts, meta = make_data(250, D)
    w = StoreWriter(tmp_path / "s", **ARGS)
    w.add(acts, meta)
    assert w.tokens_done == 200 and w.tokens_buffered == 50
    st = ActivationStore.open(tmp_path / "s")
    assert not st.complete and len(st) == 200 and st.manifest["stats"] is None
    assert "INCOMPLETE" in repr(st)
    assert sum(b.shape[0] for b in st.batches(16, exclude_bos=False)) == 200
    w.close()


def test_second_writer_is_refused(tmp_path):
    w = StoreWriter(tmp_path / "s", **ARGS)
    with pytest.raises(StoreError, match="another StoreWriter"):
        StoreWriter(tmp_path / "s", **ARGS)
    w.close()
    StoreWriter(tmp_path / "s", **ARGS).close()


def test_finished_store_needs_overwrite(tmp_path):
    acts, meta = make_data(150, D)
    write_store(tmp_path / "s", acts, meta)
    with pytest.raises(StoreError, match=r"finished store.*overwrite=True") as ei:
        StoreWriter(tmp_path / "s", **ARGS)
    assert MANIFEST_NAME in str(ei.value)
    st = write_store(tmp_path / "s", acts[:120] * 2, {c: v[:120] for c, v in meta.items()}, overwrite=True)
    assert len(st) == 120 and st.n_shards == 2
    assert sorted(p.name for p in (tmp_path / "s").glob("shard_*.acts.npy")) == [
        "shard_00000.acts.npy",
        "shard_00001.acts.npy",
    ]


@pytest.mark.parametrize(
    "field,value",
    [
        ("model", "other-model"),
        ("site", "resid.0"),
        ("d_model", 16),
        ("dtype", "bfloat16"),
        ("shard_tokens", 64),
        ("corpus", {"spec": "other"}),
    ],
)
def test_resume_with_different_arguments_fails(tmp_path, field, value):
    acts, meta = make_data(250, D)
    w = StoreWriter(tmp_path / "s", **ARGS)
    w.add(acts, meta)
    w.close()
    before = (tmp_path / "s" / MANIFEST_NAME).read_bytes()
    with pytest.raises(StoreMismatchError, match=field) as ei:
        StoreWriter(tmp_path / "s", **{**ARGS, field: value})
    assert MANIFEST_NAME in str(ei.value)
    assert (tmp_path / "s" / MANIFEST_NAME).read_bytes() == before  # nothing overwritten


def test_resume_with_conflicting_extra_fails(tmp_path):
    w = StoreWriter(tmp_path / "s", **ARGS)
    w.close()
    with pytest.raises(StoreMismatchError, match="ctx_len"):
        StoreWriter(tmp_path / "s", **{**ARGS, "extra": {"ctx_len": 32}})


def test_refuses_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(StoreError, match="not empty"):
        StoreWriter(tmp_path, **ARGS)


# --------------------------------------------------------------------------- bad inputs


def test_add_validation(tmp_path):
    acts, meta = make_data(10, D)
    w = StoreWriter(tmp_path / "s", **ARGS)
    with pytest.raises(StoreError, match=r"d_model=8.*\(10, 9\)"):
        w.add(torch.zeros(10, 9), meta)
    with pytest.raises(StoreError, match="reshape"):
        w.add(torch.zeros(2, 5, D), meta)
    with pytest.raises(StoreError, match=r"missing \['token_id'\]"):
        w.add(acts, {c: v for c, v in meta.items() if c != "token_id"})
    with pytest.raises(StoreError, match="unknown"):
        w.add(acts, {**meta, "layer": torch.zeros(10, dtype=torch.long)})
    with pytest.raises(StoreError, match=r"meta\['position'\] must have shape \[10\]"):
        w.add(acts, {**meta, "position": meta["position"][:9]})
    with pytest.raises(StoreError, match="integers"):
        w.add(acts, {**meta, "doc_id": meta["doc_id"].float()})
    with pytest.raises(StoreError, match="floating"):
        w.add(acts.long(), meta)
    w.add(acts, meta)
    with pytest.raises(StoreError, match="differ from the columns"):
        w.add(acts, {c: v for c, v in meta.items() if c != "doc_position"})
    with pytest.raises(StoreError, match="dtype='int8'"):
        StoreWriter(tmp_path / "t", **{**ARGS, "dtype": "int8"})
    with pytest.raises(StoreError, match="shard_tokens"):
        StoreWriter(tmp_path / "t", **{**ARGS, "shard_tokens": 0})
    w.finish()
    with pytest.raises(StoreError, match="closed"):
        w.add(acts, meta)


def test_open_missing_folder(tmp_path):
    p = tmp_path / "nope"
    with pytest.raises(StoreNotFoundError, match="does not exist") as ei:
        ActivationStore.open(p)
    assert str(p) in str(ei.value)
    assert isinstance(ei.value, FileNotFoundError)


def test_open_missing_manifest(tmp_path):
    with pytest.raises(StoreNotFoundError, match=r"manifest\.json.*not found.*expected an activation store"):
        ActivationStore.open(tmp_path)


@pytest.fixture
def small(tmp_path):
    acts, meta = make_data(250, D)
    return write_store(tmp_path / "s", acts, meta).path


def test_open_malformed_manifest(small):
    (small / MANIFEST_NAME).write_text('{"format": "thoughtscope-activation-store", ')
    with pytest.raises(StoreCorruptError, match=r"manifest.json.*not valid JSON"):
        ActivationStore.open(small)


def test_open_manifest_missing_field(small):
    m = json.loads((small / MANIFEST_NAME).read_text())
    del m["d_model"]
    (small / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(StoreCorruptError, match=r"manifest.json.*'d_model'"):
        ActivationStore.open(small)


def test_open_manifest_token_count_mismatch(small):
    m = json.loads((small / MANIFEST_NAME).read_text())
    m["n_tokens"] = 999
    (small / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(StoreCorruptError, match="n_tokens=999 but shards hold 250"):
        ActivationStore.open(small)


def test_open_truncated_shard(small):
    f = small / "shard_00001.acts.npy"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size - 10)
    with pytest.raises(StoreCorruptError, match="truncated") as ei:
        ActivationStore.open(small)
    msg = str(ei.value)
    assert "shard_00001.acts.npy" in msg and str(size) in msg and str(size - 10) in msg


def test_open_shard_with_trailing_bytes(small):
    with open(small / "shard_00002.token_id.npy", "ab") as fh:
        fh.write(b"\0" * 4)
    with pytest.raises(StoreCorruptError, match=r"shard_00002\.token_id\.npy.*trailing data"):
        ActivationStore.open(small)


def test_open_shard_truncated_inside_header(small):
    with open(small / "shard_00000.position.npy", "r+b") as fh:
        fh.truncate(20)
    with pytest.raises(StoreCorruptError, match=r"shard_00000\.position\.npy.*header"):
        ActivationStore.open(small)


def test_open_listed_shard_missing(small):
    (small / "shard_00002.doc_id.npy").unlink()
    with pytest.raises(StoreCorruptError, match=r"shard_00002\.doc_id\.npy.*listed in the manifest but missing"):
        ActivationStore.open(small)


def test_open_manifest_shape_mismatch(small):
    m = json.loads((small / MANIFEST_NAME).read_text())
    m["d_model"] = 4
    (small / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(StoreCorruptError, match=r"shard_00000\.acts\.npy.*shape \(100, 8\).*\(100, 4\)"):
        ActivationStore.open(small)


def test_verify_checksum_mismatch(small):
    f = small / "shard_00001.acts.npy"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF  # same size, different content
    f.write_bytes(bytes(data))
    st = ActivationStore.open(small)  # sizes still fine
    st.verify(checksums=False)
    with pytest.raises(StoreCorruptError, match=r"checksum mismatch.*shard_00001\.acts\.npy"):
        st.verify(checksums=True)
    with pytest.raises(StoreCorruptError, match="checksum mismatch"):
        ActivationStore.open(small, verify_checksums=True)


def test_resume_refuses_damaged_store(tmp_path):
    acts, meta = make_data(250, D)
    w = StoreWriter(tmp_path / "s", **ARGS)
    w.add(acts, meta)
    w.close()
    with open(tmp_path / "s" / "shard_00001.acts.npy", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(StoreCorruptError, match=r"shard_00001\.acts\.npy"):
        StoreWriter(tmp_path / "s", **ARGS)


def test_describe_and_repr(small):
    st = ActivationStore.open(small)
    d = st.describe()
    assert d["n_tokens"] == 250 and d["n_shards"] == 3 and d["dtype"] == "float32" and d["complete"]
    assert d["size_bytes"] > 250 * D * 4
    json.dumps(d)
    r = repr(st)
    assert "250 tokens" in r and "3 shards" in r and "float32" in r and "MiB" in r


# --------------------------------------------------------------------------- compatibility and the shuffle buffer

FIXTURE = Path(__file__).parent / "fixtures" / "store_v1"


def test_store_written_before_the_package_split_still_reads_the_same(tmp_path):
    """tests/fixtures/store_v1 was written by the single-module store (format version 1, bfloat16, 3 shards)."""
    st = ActivationStore.open(FIXTURE, verify_checksums=True)
    acts, meta = make_data(50, 4, seed=7)
    assert st.complete and st.n_shards == 3 and st.dtype == torch.bfloat16
    assert torch.equal(as_bits(st.tokens()), as_bits(acts.to(torch.bfloat16)))
    # the shuffled order the old reader produced for this seed: the SAE training data order must not move
    ids = torch.cat([m["token_id"] for _, m in st.batches(8, seed=0, buffer_tokens=16, with_meta=True)])
    assert ids.tolist() == [
        40,
        3,
        19,
        46,
        42,
        44,
        17,
        4,
        7,
        2,
        5,
        45,
        12,
        1,
        49,
        9,
        43,
        41,
        21,
        15,
        24,
        13,
        23,
        11,
        47,
        28,
        30,
        26,
        8,
        29,
        18,
        6,
        20,
        34,
        38,
        25,
        10,
        35,
        37,
        33,
        22,
        27,
        36,
        39,
        31,
        14,
    ]
    assert st.stats["tokens"] == 46 and abs(st.stats["median_l2_norm"] - 24.53582191467285) < 1e-6


def test_shuffle_buffer_emits_every_row_once_with_its_columns():
    from thoughtscope.store import ShuffleBuffer

    buf = ShuffleBuffer(
        capacity=10,
        batch_size=4,
        width=2,
        dtype=torch.float32,
        generator=torch.Generator().manual_seed(0),
        columns={"tag": torch.int64},
    )
    rows = torch.arange(23, dtype=torch.float32)[:, None].repeat(1, 2)
    out = []
    for s in range(0, 23, 7):  # pieces of uneven size, as shards and forward passes deliver them
        out += list(buf.add(rows[s : s + 7], {"tag": torch.arange(s, min(s + 7, 23))}))
        assert len(buf) <= 10
    out += list(buf.drain())
    assert [b.shape[0] for b, _ in out] == [4] * 5 + [3]
    got = torch.cat([b[:, 0] for b, _ in out]).long()
    assert sorted(got.tolist()) == list(range(23)) and got.tolist() != list(range(23))
    assert all(torch.equal(b[:, 1].long(), m["tag"]) for b, m in out)
    assert len(buf) == 0 and list(buf.drain()) == []
