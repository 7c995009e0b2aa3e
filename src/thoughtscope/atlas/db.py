"""The atlas database: one SQLite file per SAE, laid out so that one feature page is a handful of indexed reads.

Tables
  meta          key -> JSON (model, site, SAE, corpus, build config, histogram edges, schema version)
  features      one row per feature: counts, density, max/mean activation, log-binned histogram (int32 blob),
                top ± logit effects and nearest neighbours (JSON)
  contexts      token ids (int32 blob) of every context some example refers to, stored once
  examples      per feature: top-k and quantile-sampled contexts with the activation window (float16 blob)
  random_acts   sparse activations of a fixed sample of contexts (for non-activating examples and the report)
  explanations  explanation text, detection / fuzzing scores, model names, status and error of each attempt
  explanations_fts  full-text index over explanations (FTS5 when SQLite has it; LIKE search otherwise)

Why SQLite: a single file, transactional (a crash never leaves half a feature), indexed lookups in
well under a millisecond, and readable by any tool. Dense arrays (histograms, windows) live in blobs.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ThoughtscopeError

SCHEMA_VERSION = 1
DB_NAME = "atlas.sqlite"


class AtlasError(ThoughtscopeError, ValueError):
    """A missing, corrupt or mismatched atlas, or a query it cannot answer; the message says which."""


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


@dataclass
class Example:
    """One context shown for a feature: where it peaks and the activations around that position."""

    feature: int
    kind: str
    rank: int
    bin: int
    ctx: int
    pos: int
    act: float
    tokens: list[int]  # the whole context
    window: np.ndarray  # float32 activations at positions start .. start+len(window)-1
    start: int  # context position of window[0] (may be negative near the left edge)

    def token_acts(self) -> list[tuple[int, int, float]]:
        """(position, token id, activation) for every in-context position the window covers."""
        out = []
        for i, a in enumerate(self.window):
            p = self.start + i
            if 0 <= p < len(self.tokens):
                out.append((p, self.tokens[p], float(a)))
        return out


@dataclass
class Feature:
    """Everything the atlas knows about one feature (examples loaded on demand by Atlas.examples)."""

    id: int
    n_active: int
    density: float
    max_act: float
    mean_act: float
    hist: np.ndarray
    logits_pos: list[tuple[int, float]]
    logits_neg: list[tuple[int, float]]
    neighbours: list[tuple[int, float]]
    explanation: dict | None = None
    extra: dict = field(default_factory=dict)

    @property
    def dead(self) -> bool:
        return self.n_active == 0


def db_path(path: str | os.PathLike) -> Path:
    """Accept the atlas folder or the database file itself."""
    p = Path(path)
    return p / DB_NAME if p.is_dir() or p.suffix != ".sqlite" else p


def connect(path: str | os.PathLike, *, create: bool = False) -> sqlite3.Connection:
    p = db_path(path)
    if not create and not p.is_file():
        raise AtlasError(f"no atlas at {p}: build one with `thoughtscope atlas build --sae ... --out {p.parent}`")
    p.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(str(p), timeout=30.0, check_same_thread=False)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        if create:
            con.executescript(SCHEMA)
            _ensure_fts(con)
    except sqlite3.DatabaseError as e:
        con.close()
        raise AtlasError(
            f"{p} is not a readable atlas database ({e}); rebuild it with `thoughtscope atlas build`"
        ) from e
    return con


def _ensure_explanation_columns(con: sqlite3.Connection) -> None:
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


def _has_fts(con: sqlite3.Connection) -> bool:
    row = con.execute("SELECT name FROM sqlite_master WHERE name='explanations_fts'").fetchone()
    return row is not None


class Atlas:
    """Read access to a built atlas (and the writes explain / report need)."""

    def __init__(self, con: sqlite3.Connection, path: Path):
        self.con = con
        self.path = path
        try:
            rows = con.execute("SELECT key, value FROM meta").fetchall()
        except sqlite3.DatabaseError as e:
            raise AtlasError(f"{path} is not a readable atlas database ({e}); rebuild it") from e
        self.meta: dict[str, Any] = {k: json.loads(v) for k, v in rows}
        if self.meta.get("schema_version") != SCHEMA_VERSION:
            raise AtlasError(
                f"{path}: atlas schema version {self.meta.get('schema_version')!r}, this thoughtscope "
                f"reads version {SCHEMA_VERSION}; rebuild the atlas"
            )
        if not self.meta.get("complete"):
            raise AtlasError(
                f"{path}: the atlas build did not finish; rerun `thoughtscope atlas build` with the "
                f"same --out to resume it"
            )
        self.n_features = int(self.meta["n_features"])
        self.window_left = int(self.meta["window_left"])
        self.window_right = int(self.meta["window_right"])
        self.hist_edges = np.asarray(self.meta["hist_edges"], dtype=np.float64)
        _ensure_explanation_columns(con)

    @classmethod
    def open(cls, path: str | os.PathLike) -> Atlas:
        p = db_path(path)
        con = connect(p)
        try:
            con.execute("SELECT count(*) FROM features").fetchone()
        except sqlite3.DatabaseError as e:
            con.close()
            raise AtlasError(
                f"{p} is not a readable atlas database ({e}); rebuild it with `thoughtscope atlas build`"
            ) from e
        return cls(con, p)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Atlas:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ lookups
    def check_feature(self, n: int) -> int:
        if not isinstance(n, (int, np.integer)) or not 0 <= int(n) < self.n_features:
            raise AtlasError(f"feature id {n!r} is out of range: this SAE has features 0..{self.n_features - 1}")
        return int(n)

    def feature(self, n: int) -> Feature:
        n = self.check_feature(n)
        row = self.con.execute(
            "SELECT id, n_active, density, max_act, mean_act, hist, logits_pos, logits_neg, neighbours "
            "FROM features WHERE id=?",
            (n,),
        ).fetchone()
        if row is None:
            raise AtlasError(
                f"{self.path}: feature {n} is missing from the features table; the atlas is corrupt, rebuild it"
            )
        f = Feature(
            id=row[0],
            n_active=row[1],
            density=row[2],
            max_act=row[3],
            mean_act=row[4],
            hist=np.frombuffer(row[5], dtype=np.int32).copy(),
            logits_pos=[tuple(x) for x in json.loads(row[6])],
            logits_neg=[tuple(x) for x in json.loads(row[7])],
            neighbours=[tuple(x) for x in json.loads(row[8])],
        )
        f.explanation = self.explanation(n)
        return f

    def context(self, ctx: int) -> list[int]:
        row = self.con.execute("SELECT tokens FROM contexts WHERE id=?", (int(ctx),)).fetchone()
        if row is None:
            raise AtlasError(f"{self.path}: context {ctx} is referenced but not stored; the atlas is corrupt")
        return np.frombuffer(row[0], dtype=np.int32).tolist()

    def examples(self, n: int, kind: str | None = None, limit: int | None = None) -> list[Example]:
        n = self.check_feature(n)
        q = "SELECT feature, kind, rank, bin, ctx, pos, act, window FROM examples WHERE feature=?"
        args: list[Any] = [n]
        if kind is not None:
            q += " AND kind=?"
            args.append(kind)
        q += " ORDER BY kind DESC, rank"  # 'top' before 'quantile'
        if limit is not None:
            q += " LIMIT ?"
            args.append(int(limit))
        out = []
        cache: dict[int, list[int]] = {}
        for feat, kd, rank, b, ctx, pos, act, win in self.con.execute(q, args).fetchall():
            if ctx not in cache:
                cache[ctx] = self.context(ctx)
            out.append(
                Example(
                    feature=feat,
                    kind=kd,
                    rank=rank,
                    bin=b,
                    ctx=ctx,
                    pos=pos,
                    act=act,
                    tokens=cache[ctx],
                    window=np.frombuffer(win, dtype=np.float16).astype(np.float32),
                    start=pos - self.window_left,
                )
            )
        return out

    def random_contexts(self) -> list[int]:
        return [
            r[0]
            for r in self.con.execute(
                "SELECT id FROM contexts WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps(self.meta.get("random_contexts", [])),),
            ).fetchall()
        ]

    def random_activations(self, n: int) -> dict[int, dict[int, float]]:
        """ctx -> {pos: activation} of feature n on the fixed random context sample (only non-zero entries)."""
        n = self.check_feature(n)
        out: dict[int, dict[int, float]] = {}
        for ctx, pos, act in self.con.execute("SELECT ctx, pos, act FROM random_acts WHERE feature=?", (n,)):
            out.setdefault(ctx, {})[pos] = act
        return out

    def stats(self) -> dict[str, np.ndarray]:
        """Per-feature arrays over the whole SAE (for the report)."""
        rows = self.con.execute("SELECT id, n_active, density, max_act, mean_act FROM features ORDER BY id").fetchall()
        a = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
        return {
            "id": a[:, 0].astype(np.int64),
            "n_active": a[:, 1].astype(np.int64),
            "density": a[:, 2],
            "max_act": a[:, 3],
            "mean_act": a[:, 4],
        }

    def random_features(self, n: int = 5, *, seed: int | None = None, alive_only: bool = True) -> list[int]:
        """A uniform sample of feature ids (alive ones by default): the unbiased way to browse."""
        q = "SELECT id FROM features" + (" WHERE n_active > 0" if alive_only else "")
        ids = [r[0] for r in self.con.execute(q)]
        rng = random.Random(seed)
        return sorted(rng.sample(ids, min(n, len(ids))))

    # ------------------------------------------------------------------ explanations
    def explanation(self, n: int) -> dict | None:
        """Feature n's stored explanation, or None when it has none. Stable keys (None where not measured):

        explanation, status ('ok' | 'failed'), error, explainer and scorer (who: 'offline:offline-tokens-v1',
        'local:<model>', '<model>@<url>'), method and scorer_method (how: 'offline-tokens-v1' | 'llm' |
        'given', and 'lexical-v1' | 'llm-detection'; None in atlases explained before these were recorded),
        detection_auroc, detection_bacc, fuzz_auroc, fuzz_bacc (on held-out contexts only),
        shuffled_detection_auroc / _bacc (the same scorer given another feature's explanation: chance,
        measured), details (JSON: counts, labels, predictions, held-out context ids), seconds, created.
        """
        cur = self.con.execute("SELECT * FROM explanations WHERE feature=?", (int(n),))
        row = cur.fetchone()
        if row is None:
            return None
        d = dict.fromkeys(EXPLANATION_COLUMNS)
        d.update(zip([c[0] for c in cur.description], row))
        d["details"] = json.loads(d["details"]) if d.get("details") else None
        return d

    def explained(self, status: str | None = "ok") -> set[int]:
        """Ids of features with a stored explanation of this status ('ok', 'failed'; None: any)."""
        q = "SELECT feature FROM explanations" + (" WHERE status=?" if status else "")
        return {r[0] for r in self.con.execute(q, (status,) if status else ())}

    def save_explanation(self, n: int, rec: dict) -> None:
        """Store (replace) feature n's explanation; keys as `explanation` returns them, missing ones NULL."""
        self.save_explanations({n: rec})

    def save_explanations(self, recs: dict[int, dict]) -> None:
        """Store many explanations in one transaction (and keep the full-text index in step)."""
        cols = EXPLANATION_COLUMNS
        fts = _has_fts(self.con)
        with self.con:
            for n, rec in recs.items():
                rec = dict(rec, feature=int(n))
                if isinstance(rec.get("details"), (dict, list)):
                    rec["details"] = json.dumps(rec["details"])
                self.con.execute(
                    f"INSERT OR REPLACE INTO explanations ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                    [rec.get(c) for c in cols],
                )
                if fts:
                    self.con.execute("DELETE FROM explanations_fts WHERE feature=?", (int(n),))
                    if rec.get("explanation") and rec.get("status") == "ok":
                        self.con.execute(
                            "INSERT INTO explanations_fts (explanation, feature) VALUES (?, ?)",
                            (rec["explanation"], int(n)),
                        )

    def search(self, text: str, limit: int = 20) -> list[tuple[int, str]]:
        """Features whose explanation matches `text` (FTS5 ranking when available, else substring match)."""
        text = text.strip()
        if not text:
            raise AtlasError("search text is empty")
        if _has_fts(self.con):
            words = [w for w in "".join(c if c.isalnum() else " " for c in text).split() if w]
            if words:
                q = " OR ".join(f'"{w}"' for w in words)
                rows = self.con.execute(
                    "SELECT feature, explanation FROM explanations_fts WHERE explanations_fts MATCH ? "
                    "ORDER BY rank LIMIT ?",
                    (q, limit),
                ).fetchall()
                if rows:
                    return [(int(f), e) for f, e in rows]
        rows = self.con.execute(
            "SELECT feature, explanation FROM explanations WHERE status='ok' AND "
            "explanation LIKE ? ORDER BY feature LIMIT ?",
            (f"%{text}%", limit),
        ).fetchall()
        return [(int(f), e) for f, e in rows]

    def scores(self, features: Sequence[int] | None = None) -> list[dict]:
        """One dict per 'ok' explanation (of `features`, or all): feature, explanation, method, scorer_method and
        every score key of `explanation` (None where not measured)."""
        have = {r[1] for r in self.con.execute("PRAGMA table_info(explanations)")}
        keys = ["feature", *SCORE_KEYS, "explanation", "method", "scorer_method"]
        sel = ", ".join(k if k in have else "NULL" for k in keys)
        rows = self.con.execute(f"SELECT {sel} FROM explanations WHERE status='ok'").fetchall()
        keep = set(int(f) for f in features) if features is not None else None
        return [dict(zip(keys, r)) for r in rows if keep is None or r[0] in keep]


def write_meta(con: sqlite3.Connection, items: dict[str, Any]) -> None:
    con.executemany(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", [(k, json.dumps(v)) for k, v in items.items()]
    )


def insert_many(con: sqlite3.Connection, table: str, cols: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    con.executemany(f"INSERT OR REPLACE INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", rows)
