"""Fuzzing the activation-store reader (issue #32): a tiny valid store, one mutation of its manifest, of a shard
file or of the folder, then `ActivationStore.open` and every read. The rule: a valid store comes back, or a
`ThoughtscopeError` naming the store's files; never another exception, never a hang, never a write."""

from __future__ import annotations

import functools
import io
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_store_rows
from helpers.mutate import (
    HUGE_INT_LITERAL,
    NPY_KINDS,
    Mutation,
    any_of,
    byte_mutations,
    dump_json,
    expect_clean,
    json_bytes_mutations,
    npy_mutations,
    read_tree,
    write_tree,
)
from hypothesis import given
from hypothesis import strategies as st

from thoughtscope.store import MANIFEST_NAME, ActivationStore, StoreError, StoreWriter

pytestmark = pytest.mark.usefixtures("one_thread")

D = 4
N_TOKENS = 20  # three shards: 8 + 8 + 4
STORE = "store_fuzz"  # the folder name every error must mention (it is part of every file's path)


@functools.cache
def template(dtype: str) -> dict[str, bytes]:
    """The files of a finished tiny store (built once per dtype)."""
    with tempfile.TemporaryDirectory() as tmp:
        acts, meta = make_store_rows(N_TOKENS, D)
        w = StoreWriter(
            Path(tmp) / STORE, model="tiny", site="resid.1", d_model=D, dtype=dtype, shard_tokens=8, extra={"k": 1}
        )
        w.add(acts, meta)
        w.finish()
        files = read_tree(Path(tmp) / STORE)
    files.pop(".writer.lock", None)
    return files


def read_everything(path: Path, checksums: bool) -> ActivationStore:
    """Open the store and use every read a caller has; check that what comes back is a consistent store."""
    store = ActivationStore.open(path, verify_checksums=checksums)  # without checksums, bad data is read on
    x, meta = store.tokens(with_meta=True)
    assert x.shape == (store.n_tokens, store.d_model) and x.dtype == store.dtype
    assert all(meta[c].shape == (store.n_tokens,) for c in store.columns)
    assert store.tokens(min(1, store.n_tokens), min(3, store.n_tokens)).shape[1] == store.d_model
    seen = sum(b.shape[0] for b in store.batches(3, buffer_tokens=8, exclude_bos=False))
    assert seen == store.n_tokens
    for a, m in store.batches(4, shuffle=False, max_norm_ratio=100.0, with_meta=True):
        assert a.dtype == torch.float32 and all(v.shape[0] == a.shape[0] for v in m.values())
    stats = store.stats
    assert isinstance(stats, dict)
    median = store.median_norm
    assert median is None or (isinstance(median, (int, float)) and median >= 0)
    desc = store.describe()
    json.dumps(desc)
    assert isinstance(desc["corpus"], dict)
    assert isinstance(store.extra, dict) and isinstance(store.corpus, dict)
    repr(store)
    return store


def check(files: dict[str, bytes], mutation: Mutation, *, checksums: bool = False, prepare=None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tree(Path(tmp) / STORE, files)
        if prepare is not None:
            prepare(folder)
        expect_clean(
            lambda: read_everything(folder, checksums), names=[STORE], folder=tmp, timeout=20, mutation=mutation
        )


dtypes = st.sampled_from(["float32", "bfloat16"])


@given(dtypes, json_bytes_mutations(), st.booleans())
def test_manifest_mutations(dtype, mutation, checksums):
    files = dict(template(dtype))
    files[MANIFEST_NAME] = mutation(files[MANIFEST_NAME])
    check(files, mutation, checksums=checksums)


#: Values a manifest field should never hold (and a few it may): wrong types, bools posing as ints, huge,
#: negative and non-finite numbers, unhashable column names, shard file names that leave the folder.
FIELD_VALUES = (
    None,
    True,
    0,
    -1,
    2**63,
    10**400,
    HUGE_INT_LITERAL,
    NPY_KINDS,
    math.nan,
    math.inf,
    1.5,
    "",
    "x",
    "../outside.npy",
    "/etc/hostname",
    "shard\u0000.npy",
    [],
    [["doc_id"]],
    ["doc_id", "position", "token_id", "doc_id"],
    {},
    {"acts": 3},
    {"median_l2_norm": "x"},
)
FIELDS = (
    ("d_model",),
    ("shard_tokens",),
    ("n_tokens",),
    ("dtype",),
    ("columns",),
    ("complete",),
    ("corpus",),
    ("extra",),
    ("stats",),
    ("stats", "median_l2_norm"),
    ("stats", "mean"),
    ("shards",),
    ("shards", 0),
    ("shards", 0, "n_tokens"),
    ("shards", 1, "files"),
    ("shards", 1, "files", "acts"),
    ("shards", 2, "files", "position"),
    ("shards", 0, "sha256"),
    ("shards", 0, "sha256", "acts"),
)


def _set_field(m: dict, path: tuple, value):
    for k in path[:-1]:
        m = m[k]
    m[path[-1]] = value


@given(dtypes, st.sampled_from(FIELDS), st.sampled_from(FIELD_VALUES))
def test_manifest_fields(dtype, path, value):
    files = dict(template(dtype))
    manifest = json.loads(files[MANIFEST_NAME])
    _set_field(manifest, path, value)
    files[MANIFEST_NAME] = dump_json(manifest)
    check(files, Mutation("field_value", f"{path} = {value!r}"[:80], lambda x: x))


def shard_names(files: dict[str, bytes]) -> list[str]:
    return sorted(n for n in files if n.startswith("shard_"))


@given(dtypes, st.integers(0, 1000), any_of(byte_mutations(), npy_mutations()), st.booleans())
def test_shard_mutations(dtype, pick, mutation, checksums):
    files = dict(template(dtype))
    name = shard_names(files)[pick % len(shard_names(files))]
    # .npy mutations change the array (and write a new file), byte mutations the file as it is
    files[name] = mutation(np.load(io.BytesIO(files[name])) if mutation.kind in NPY_KINDS else files[name])
    check(files, mutation, checksums=checksums)


def _folder_mutation(kind: str, pick: int) -> tuple[Mutation, object]:
    """A change to the store folder itself, applied after its files are written."""

    def shard(folder: Path) -> Path:
        names = sorted(p.name for p in folder.glob("shard_*.npy"))
        return folder / names[pick % len(names)]

    def run(folder: Path) -> None:
        if kind == "missing_file":
            shard(folder).unlink()
        elif kind == "missing_manifest":
            (folder / MANIFEST_NAME).unlink()
        elif kind == "manifest_is_folder":
            (folder / MANIFEST_NAME).unlink()
            (folder / MANIFEST_NAME).mkdir()
        elif kind == "shard_is_folder":
            p = shard(folder)
            p.unlink()
            p.mkdir()
        elif kind == "shard_is_fifo":
            p = shard(folder)
            p.unlink()
            os.mkfifo(p)
        elif kind == "swapped_shards":
            a, b = folder / "shard_00000.acts.npy", folder / "shard_00001.acts.npy"
            da, db = a.read_bytes(), b.read_bytes()
            a.write_bytes(db)
            b.write_bytes(da)
        elif kind == "extra_files":
            (folder / "shard_00099.acts.npy").write_bytes(b"stray")
            (folder / ".tmp.manifest.json.x").write_bytes(b"{")
            (folder / ".writer.lock").write_bytes(b"")
        elif kind == "folder_is_file":
            for p in folder.iterdir():
                p.unlink()
            folder.rmdir()
            folder.write_bytes(b"{}")
        elif kind == "empty_folder":
            for p in folder.iterdir():
                p.unlink()

    return Mutation(kind, f"{kind} #{pick}", lambda x: x), run


FOLDER_KINDS = (
    "missing_file",
    "missing_manifest",
    "manifest_is_folder",
    "shard_is_folder",
    "shard_is_fifo",
    "swapped_shards",
    "extra_files",
    "folder_is_file",
    "empty_folder",
)


@given(dtypes, st.sampled_from(FOLDER_KINDS), st.integers(0, 1000), st.booleans())
def test_folder_mutations(dtype, kind, pick, checksums):
    mutation, prepare = _folder_mutation(kind, pick)
    check(dict(template(dtype)), mutation, checksums=checksums, prepare=prepare)


def test_valid_store_reads(tmp_path):
    """The unmutated template passes every read (so a mutation that is rejected was rejected for itself)."""
    for dtype in ("float32", "bfloat16"):
        folder = write_tree(tmp_path / dtype / STORE, template(dtype))
        ok, store = expect_clean(lambda f=folder: read_everything(f, True), names=[STORE], folder=tmp_path)
        assert ok and store.n_tokens == N_TOKENS and store.n_shards == 3


def test_manifest_escaping_the_folder_is_refused(tmp_path):
    """A shard file name that points outside the store folder is refused before anything is read."""
    folder = write_tree(tmp_path / STORE, template("float32"))
    outside = tmp_path / "outside.npy"
    outside.write_bytes((folder / "shard_00000.acts.npy").read_bytes())
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["shards"][0]["files"]["acts"] = "../outside.npy"
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="outside.npy"):
        ActivationStore.open(folder)
