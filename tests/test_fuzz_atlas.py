"""Fuzzing the atlas reader (issue #32): ``Atlas.open`` and its queries on damaged SQLite files.

A tiny atlas is built once (the planted-feature SAE over the identity model), in two states: as the build leaves it
(rollback journal, no explanations) and after explanations were saved (WAL, explanations and their full-text
index). Each example copies one, damages it (its bytes, a table or column dropped, rows deleted, a cell set to a
value of another type, a meta entry's JSON mutated), then opens it and runs every query once. The rule
(helpers.mutate.expect_clean): the queries return, or raise a ThoughtscopeError whose message names the file;
never another exception type (no raw sqlite3.DatabaseError, JSONDecodeError, numpy error), never past the time
bound, never a write (the file, its journal mode and the folder stay exactly as they were).
"""

from __future__ import annotations

import json
import math
import sqlite3
import tempfile
from pathlib import Path

import pytest
from helpers.atlas_fixtures import PLANT, identity_model, one_thread, planted_sae, write_corpus
from helpers.mutate import (
    Mutation,
    byte_mutations,
    dump_json,
    expect_clean,
    expect_unmutated,
    json_mutations,
    write_tree,
)
from hypothesis import given
from hypothesis import strategies as st

from thoughtscope.atlas import Atlas, AtlasConfig, build_atlas
from thoughtscope.corpus import Corpus

CFG = dict(
    n_tokens=1024,
    ctx_len=32,
    contexts_per_batch=8,
    top_k=4,
    n_bins=2,
    per_bin=2,
    window_left=3,
    window_right=2,
    n_random_contexts=8,
    n_logits=3,
    n_neighbours=3,
)


@pytest.fixture(scope="module")
def atlases(tmp_path_factory) -> dict[str, bytes]:
    """name -> the bytes of atlas.sqlite: 'built' (as build_atlas leaves it) and 'explained' (after explain)."""
    d = tmp_path_factory.mktemp("fuzz-atlas")
    with one_thread():
        lm = identity_model()
        corpus = Corpus(str(write_corpus(d / "corpus.txt", n_docs=40)))
        path = build_atlas(lm, planted_sae(lm), corpus, d / "atlas", AtlasConfig(**CFG), progress=False)
    out = {"built": path.read_bytes()}
    with Atlas.open(path) as at:
        at.save_explanations(
            {
                PLANT: {"explanation": "the letter q", "status": "ok", "detection_auroc": 0.9, "details": {"n": 4}},
                0: {"explanation": None, "status": "failed", "error": "no examples"},
                1: {"explanation": "words about cats", "status": "ok", "fuzz_bacc": 0.6, "method": "given"},
            }
        )
    assert not Path(str(path) + "-wal").exists()
    out["explained"] = path.read_bytes()
    return out


def _use(path: Path) -> int:
    """Open the atlas and run each query once; the number of features it holds."""
    with Atlas.open(path) as at:
        for n in [i for i in (PLANT, 0) if i < at.n_features]:
            f = at.feature(n)
            assert f.id == n and f.hist.dtype.name == "int32"
            for ex in at.examples(n):
                ex.token_acts()
            at.random_activations(n)
        at.stats()
        at.explained(None)
        at.search("letter q")
        at.scores()
        at.random_features(3, seed=0)
        at.random_contexts()
        return at.n_features


def _check(files: dict[str, bytes], base: str, mutate_db, mutation) -> None:
    """Copy the atlas, apply mutate_db(path) (bytes or SQL), then read it under expect_clean."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tree(Path(tmp) / "atlas", {"atlas.sqlite": files[base]})
        path = folder / "atlas.sqlite"
        mutate_db(path)
        expect_clean(lambda: _use(path), names=[str(path)], folder=folder, mutation=mutation)


@pytest.mark.parametrize("base", ["built", "explained"])
def test_unmutated_atlases_answer_every_query(atlases, base):
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tree(Path(tmp) / "atlas", {"atlas.sqlite": atlases[base]})
        assert expect_unmutated(lambda: _use(folder / "atlas.sqlite"), folder) == 24


@given(base=st.sampled_from(["built", "explained"]), m=byte_mutations())
def test_atlas_file_bytes(atlases, base, m):
    """The SQLite file truncated, flipped, emptied, with NUL or garbage bytes, or replaced by garbage."""
    _check(atlases, base, lambda p: p.write_bytes(m(p.read_bytes())), m)


# ------------------------------------------------------------------------------------------ SQL-level damage
TABLE_KEYS = {  # table -> its columns (the first one picks the row a cell mutation changes)
    "meta": ("key", "value"),
    "features": ("id", "n_active", "density", "max_act", "mean_act", "hist", "logits_pos", "logits_neg", "neighbours"),
    "contexts": ("id", "tokens"),
    "examples": ("feature", "kind", "rank", "bin", "ctx", "pos", "act", "window"),
    "random_acts": ("ctx", "pos", "feature", "act"),
    "explanations": ("feature", "explanation", "status", "error", "details", "detection_auroc", "method"),
}
#: A cell's new value: NULL, every SQLite type, JSON that is not what the column holds, blobs of odd sizes.
CELL_VALUES = (
    None,
    "x",
    "",
    "[1",
    '[[1, "a"]]',
    '{"a": 1}',
    "[]",
    "null",
    "[[0, 1e999]]",
    "9" * 5000,
    b"",
    b"\x00",
    b"\xff\xfe\xfd",
    bytes(range(7)),
    -1,
    0,
    2**62,
    1.5,
    -1e308,
    math.inf,
    -math.inf,
)
SQL_KINDS = ("drop_table", "drop_column", "delete_rows", "extra_table", "extra_column", "fts_garbage")


def _sql_mutation(kind: str, table: str, pick: int, value) -> Mutation:
    cols = TABLE_KEYS[table]
    col = cols[pick % len(cols)]
    key = cols[0]

    def run(con: sqlite3.Connection) -> None:
        if kind == "drop_table":
            con.execute(f"DROP TABLE {table}")
        elif kind == "drop_column":
            keep = [c[1] for c in con.execute(f"PRAGMA table_info({table})") if c[1] != col]
            con.execute(f"CREATE TABLE fuzz_copy AS SELECT {', '.join(keep)} FROM {table}")
            con.execute(f"DROP TABLE {table}")
            con.execute(f"ALTER TABLE fuzz_copy RENAME TO {table}")
        elif kind == "delete_rows":
            if pick % 3 == 0:
                con.execute(f"DELETE FROM {table}")
            else:
                con.execute(f"DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} LIMIT 1 OFFSET ?)", (pick,))
        elif kind == "cell_value":
            where = "" if pick % 4 == 0 else f" WHERE {key} = (SELECT {key} FROM {table} LIMIT 1 OFFSET {pick % 7})"
            con.execute(f"UPDATE {table} SET {col} = ?{where}", (value,))
        elif kind == "extra_table":
            con.execute("CREATE TABLE fuzz_extra (a, b)")
            con.execute("INSERT INTO fuzz_extra VALUES (1, 'x')")
        elif kind == "extra_column":
            con.execute(f"ALTER TABLE {table} ADD COLUMN fuzz_extra TEXT DEFAULT 'x'")
        elif kind == "fts_garbage":
            con.execute("DROP TABLE IF EXISTS explanations_fts")
            con.execute("CREATE TABLE explanations_fts (explanation, feature)")
            con.execute("INSERT INTO explanations_fts VALUES (?, ?)", (value, value))

    def fn(path: Path) -> None:
        con = sqlite3.connect(str(path))
        try:
            with con:
                run(con)
        except sqlite3.Error:  # a NOT NULL or key constraint refused the change: the file stays valid
            pass
        finally:
            con.close()

    shown = value if not isinstance(value, str) else value[:20]
    return Mutation(kind, f"{table}.{col} (#{pick}) value {shown!r}", fn)


def sql_mutations(kinds) -> st.SearchStrategy[Mutation]:
    return st.builds(
        _sql_mutation,
        st.sampled_from(kinds),
        st.sampled_from(sorted(TABLE_KEYS)),
        st.integers(0, 1000),
        st.sampled_from(CELL_VALUES),
    )


@given(base=st.sampled_from(["built", "explained"]), m=sql_mutations(SQL_KINDS))
def test_atlas_tables(atlases, base, m):
    """Tables and columns dropped, rows deleted (dangling references), extra tables and columns, a plain table
    where the full-text index should be."""
    _check(atlases, base, m, m)


@given(base=st.sampled_from(["built", "explained"]), m=sql_mutations(["cell_value"]))
def test_atlas_cells(atlases, base, m):
    """One row's cell, or a whole column, set to NULL, text, JSON of the wrong shape, a blob of odd size, a huge or
    non-finite number."""
    _check(atlases, base, m, m)


META_KEYS = ("schema_version", "complete", "n_features", "window_left", "window_right", "hist_edges", "random_contexts")


def _meta_mutation(key: str, jm: Mutation | None, raw: str | None) -> Mutation:
    def fn(path: Path) -> None:
        con = sqlite3.connect(str(path))
        try:
            with con:
                (old,) = con.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
                new = raw if jm is None else dump_json(jm(json.loads(old))).decode()
                con.execute("UPDATE meta SET value=? WHERE key=?", (new, key))
        finally:
            con.close()

    if jm is None:
        return Mutation("meta_text", f"meta {key} = {raw[:20]!r}", fn)
    return Mutation(f"meta_{jm.kind}", f"meta {key}: {jm.detail}", fn)


meta_mutations = st.one_of(
    st.builds(_meta_mutation, st.sampled_from(META_KEYS), json_mutations(), st.none()),
    st.builds(
        _meta_mutation,
        st.sampled_from(META_KEYS),
        st.none(),
        st.sampled_from(["", "{", "nan", "NaN", "Infinity", "[" * 5000, "9" * 5000, "\x00", "\u2603", "true"]),
    ),
)


@given(base=st.sampled_from(["built", "explained"]), m=meta_mutations)
def test_atlas_meta(atlases, base, m):
    """The meta entries a reader relies on (schema version, sizes, window, histogram edges) mutated as JSON or
    replaced by text that is not JSON."""
    _check(atlases, base, m, m)
