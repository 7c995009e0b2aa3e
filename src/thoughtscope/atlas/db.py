"""Read access to a built atlas: `Atlas` opens the database file (`schema.py` describes its tables) and turns
rows into `Feature` and `Example` objects; it also stores explanations and searches them.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .schema import (
    DB_NAME,
    EXPLANATION_COLUMNS,
    EXPLANATION_EXTRA_COLUMNS,
    SCHEMA,
    SCHEMA_VERSION,
    SCORE_KEYS,
    AtlasError,
    connect,
    db_path,
    ensure_explanation_columns,
    has_fts,
    insert_many,
    write_meta,
)

__all__ = [
    "DB_NAME",
    "EXPLANATION_COLUMNS",
    "EXPLANATION_EXTRA_COLUMNS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "SCORE_KEYS",
    "Atlas",
    "AtlasError",
    "Example",
    "Feature",
    "connect",
    "db_path",
    "insert_many",
    "write_meta",
]


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
        ensure_explanation_columns(con)

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
        fts = has_fts(self.con)
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
        if has_fts(self.con):
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
