"""The atlas database file: one SQLite file per SAE, laid out so that one feature page is a handful of indexed reads.

Tables
  meta          key -> JSON (model, site, SAE, corpus, build config, histogram edges, schema version)
  features      one row per feature: counts, density, max/mean activation, log-binned histogram (int32 blob),
                top ± logit effects and nearest neighbours (JSON)
  contexts      token ids (int32 blob) of every context some example refers to, stored once
  examples      per feature: top-k and quantile-sampled contexts with the activation window (float16 blob)
  random_acts   sparse activations of a fixed sample of contexts (for non-activating examples and the report)
  explanations  explanation text, detection / fuzzing scores, model names, status and error of each attempt
  explanations_fts  full-text index over explanations (FTS5 when SQLite has it; LIKE search otherwise)
  explanation_kinds the other kinds of explanation of a feature (keyed (feature, kind): 'output' from its logit
                effects, 'nla' an NLA's reading), each scored like the input-side one; the input-side explanation
                stays in `explanations` (kind 'input'), so atlases written before kinds existed read unchanged.
                Made on the first write of a kind (reading never writes), with `explanation_kinds_fts`.

Why SQLite: a single file, transactional (a crash never leaves half a feature), indexed lookups in
well under a millisecond, and readable by any tool. Dense arrays (histograms, windows) live in blobs.

This module is the file itself (schema, connection, bulk writes); `db.py` reads it (`Atlas`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import AtlasError  # noqa: F401  (re-exported: their old home)

SCHEMA_VERSION = 1
DB_NAME = "atlas.sqlite"


SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS features (
    id INTEGER PRIMARY KEY,
    n_active INTEGER NOT NULL,
    density REAL NOT NULL,
    max_act REAL NOT NULL,
    mean_act REAL NOT NULL,
    hist BLOB NOT NULL,
    logits_pos TEXT NOT NULL,
    logits_neg TEXT NOT NULL,
    neighbours TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS contexts (id INTEGER PRIMARY KEY, tokens BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS examples (
    feature INTEGER NOT NULL,
    kind TEXT NOT NULL,            -- 'top' | 'quantile'
    rank INTEGER NOT NULL,         -- order within kind (top: by activation; quantile: bin-major)
    bin INTEGER NOT NULL,          -- quantile bin (0 = weakest), -1 for top examples
    ctx INTEGER NOT NULL,
    pos INTEGER NOT NULL,          -- position of the activation inside the context
    act REAL NOT NULL,
    window BLOB NOT NULL,          -- float16 activations at positions pos-left .. pos+right
    PRIMARY KEY (feature, kind, rank)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS random_acts (ctx INTEGER NOT NULL, pos INTEGER NOT NULL, feature INTEGER NOT NULL,
                                        act REAL NOT NULL);
CREATE INDEX IF NOT EXISTS random_acts_feature ON random_acts (feature);
CREATE TABLE IF NOT EXISTS explanations (
    feature INTEGER PRIMARY KEY,
    explanation TEXT,
    status TEXT NOT NULL,          -- 'ok' | 'failed'
    error TEXT,
    explainer TEXT,
    scorer TEXT,
    detection_bacc REAL, detection_auroc REAL,
    fuzz_bacc REAL, fuzz_auroc REAL,
    details TEXT,                  -- JSON: predictions, labels, prompt sizes
    seconds REAL,
    created REAL
);
"""

# Explanation kinds other than the input side (kind 'input' is the explanations table). Created by
# `ensure_kinds_table` before the first write of a kind, so an atlas without it opens and reads as before.
KINDS_SCHEMA = """
CREATE TABLE IF NOT EXISTS explanation_kinds (
    feature INTEGER NOT NULL,
    kind TEXT NOT NULL,            -- 'output' | 'nla'
    explanation TEXT,
    status TEXT NOT NULL,          -- 'ok' | 'failed'
    error TEXT,
    method TEXT,                   -- how it was written: 'logit-words-v1', 'nla:<checkpoint>'
    scorer_method TEXT,            -- how its detection was scored: 'lexical-v2'
    detection_auroc REAL, detection_bacc REAL,
    shuffled_detection_auroc REAL, shuffled_detection_bacc REAL,
    own_method TEXT,               -- its own score's method: 'clamp-logprob-v1' (output side)
    own_score REAL,                -- share of random same-norm features it beats on its own score (0.5: chance)
    own_effect REAL,               -- its own measured effect (output side: mean log-probability gain, nats)
    own_control_effect REAL,       -- the same effect of the random features (the control, nats)
    details TEXT,                  -- JSON: detection labels and predictions, the control's, words, own-score data
    created REAL,
    PRIMARY KEY (feature, kind)
) WITHOUT ROWID;
"""
KIND_COLUMNS = [
    "feature",
    "kind",
    "explanation",
    "status",
    "error",
    "method",
    "scorer_method",
    "detection_auroc",
    "detection_bacc",
    "shuffled_detection_auroc",
    "shuffled_detection_bacc",
    "own_method",
    "own_score",
    "own_effect",
    "own_control_effect",
    "details",
    "created",
]


def has_table(con: sqlite3.Connection, name: str) -> bool:
    return con.execute("SELECT 1 FROM sqlite_master WHERE name=?", (name,)).fetchone() is not None


def ensure_kinds_table(con: sqlite3.Connection) -> None:
    """The explanation kinds table and its full-text index (FTS5 when SQLite has it), if missing."""
    con.executescript(KINDS_SCHEMA)
    with contextlib.suppress(sqlite3.OperationalError):  # no FTS5: search falls back to LIKE
        con.execute(
            "CREATE VIRTUAL TABLE IF NOT EXISTS explanation_kinds_fts USING fts5(explanation, feature UNINDEXED, "
            "kind UNINDEXED)"
        )


# Columns added after schema version 1 shipped. Atlases built before them get them on open (ALTER TABLE ADD
# COLUMN, NULL for rows written earlier), so old atlases keep opening and the schema version stays 1.
EXPLANATION_EXTRA_COLUMNS = {
    "method": "TEXT",  # how the explanation was written: 'offline-tokens-v1', 'llm', 'given'
    "scorer_method": "TEXT",  # how it was scored: 'lexical-v1', 'llm-detection'
    "shuffled_detection_auroc": "REAL",  # the same scorer, this feature's held-out contexts, another feature's
    "shuffled_detection_bacc": "REAL",  # explanation: the chance level, measured
}
EXPLANATION_COLUMNS = [
    "feature",
    "explanation",
    "status",
    "error",
    "explainer",
    "scorer",
    "detection_bacc",
    "detection_auroc",
    "fuzz_bacc",
    "fuzz_auroc",
    "details",
    "seconds",
    "created",
    *EXPLANATION_EXTRA_COLUMNS,
]
SCORE_KEYS = (
    "detection_auroc",
    "detection_bacc",
    "fuzz_auroc",
    "fuzz_bacc",
    "shuffled_detection_auroc",
    "shuffled_detection_bacc",
)


def db_path(path: str | os.PathLike) -> Path:
    """Accept the atlas folder or the database file itself."""
    p = Path(path)
    return p / DB_NAME if p.is_dir() or p.suffix != ".sqlite" else p


SQLITE_MAGIC = b"SQLite format 3\x00"


def connect(path: str | os.PathLike, *, create: bool = False) -> sqlite3.Connection:
    """Open the atlas file. Reading (create=False) writes nothing: a file that is not SQLite is refused before
    SQLite sees it (it would take an empty file for a new database), and the journal mode is left as it is
    (`Atlas.save_explanations` switches to WAL before its first write). create=True makes the tables."""
    p = db_path(path)
    if not create:
        if not p.is_file():
            raise AtlasError(f"no atlas at {p}: build one with `thoughtscope atlas build --sae ... --out {p.parent}`")
        try:
            with open(p, "rb") as fh:
                head = fh.read(len(SQLITE_MAGIC))
        except OSError as e:
            raise AtlasError(f"cannot read the atlas {p}: {e}") from None
        if head != SQLITE_MAGIC:
            raise AtlasError(
                f"{p} is not a readable atlas database (not an SQLite file); rebuild it with `thoughtscope atlas build`"
            )
    else:
        p.parent.mkdir(parents=True, exist_ok=True)
    try:
        con = sqlite3.connect(str(p), timeout=30.0, check_same_thread=False)
    except sqlite3.Error as e:
        raise AtlasError(f"cannot open the atlas {p}: {e}") from None
    try:
        if create:
            con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute("SELECT count(*) FROM sqlite_master").fetchone()  # reads the schema: a damaged file fails here
        if create:
            con.executescript(SCHEMA)
            _ensure_fts(con)
    except (sqlite3.DatabaseError, ValueError) as e:  # ValueError: SQLite quoting undecodable bytes of a damaged file
        con.close()
        raise AtlasError(
            f"{p} is not a readable atlas database ({e}); rebuild it with `thoughtscope atlas build`"
        ) from None
    return con


def ensure_explanation_columns(con: sqlite3.Connection) -> None:
    have = {r[1] for r in con.execute("PRAGMA table_info(explanations)")}
    missing = [(c, t) for c, t in EXPLANATION_EXTRA_COLUMNS.items() if c not in have]
    if not missing:
        return
    try:
        with con:
            for c, t in missing:
                con.execute(f"ALTER TABLE explanations ADD COLUMN {c} {t}")
    except sqlite3.OperationalError:  # a read-only file: reads fill the missing keys with None instead
        pass


def _ensure_fts(con: sqlite3.Connection) -> bool:
    try:
        con.execute("CREATE VIRTUAL TABLE IF NOT EXISTS explanations_fts USING fts5(explanation, feature UNINDEXED)")
        return True
    except sqlite3.OperationalError:  # SQLite built without FTS5: search falls back to LIKE
        return False


def has_fts(con: sqlite3.Connection) -> bool:
    row = con.execute("SELECT name FROM sqlite_master WHERE name='explanations_fts'").fetchone()
    return row is not None


def write_meta(con: sqlite3.Connection, items: dict[str, Any]) -> None:
    con.executemany(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", [(k, json.dumps(v)) for k, v in items.items()]
    )


def insert_many(con: sqlite3.Connection, table: str, cols: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    con.executemany(f"INSERT OR REPLACE INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", rows)
