"""Read access to a built atlas: `Atlas` opens the database file (`schema.py` describes its tables) and turns
rows into `Feature` and `Example` objects; it also stores explanations and searches them.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..values import is_finite as _is_num
from ..values import is_int as _is_int
from .schema import (
    DB_NAME,
    EXPLANATION_COLUMNS,
    EXPLANATION_EXTRA_COLUMNS,
    KIND_COLUMNS,
    SCHEMA,
    SCHEMA_VERSION,
    SCORE_KEYS,
    AtlasError,
    connect,
    db_path,
    ensure_explanation_columns,
    ensure_kinds_table,
    has_fts,
    has_table,
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


TABLES = ("meta", "features", "contexts", "examples", "random_acts", "explanations")


class Atlas:
    """Read access to a built atlas (and the writes explain / report need).

    Reading never writes: opening leaves the file (and its journal mode) as it is; the first write
    (`save_explanations`) switches the file to WAL, so a reader and the explainer can share it, and adds any
    explanation column an older atlas lacks. Whatever a query reads from the file is checked before it is
    returned: a damaged file gives an AtlasError naming it, never another exception type.
    """

    def __init__(self, con: sqlite3.Connection, path: Path):
        self.con = con
        self.path = path
        self._writable = False
        try:
            self._read_meta()
        except BaseException:
            con.close()
            raise

    def _read_meta(self) -> None:
        path = self.path
        with self._reading("the table list"):
            have = {r[0] for r in self.con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        missing = [t for t in TABLES if t not in have]
        if missing:
            raise AtlasError(f"{path} lacks the table(s) {', '.join(missing)}; it is not a complete atlas, rebuild it")
        self.meta: dict[str, Any] = {}
        with self._reading("the meta table"):
            for k, v in self.con.execute("SELECT key, value FROM meta").fetchall():
                if not isinstance(k, str) or not isinstance(v, str):
                    raise AtlasError(f"{path}: meta entry {k!r} is not text; the atlas is damaged, rebuild it")
                self.meta[k] = json.loads(v)
        if self.meta.get("schema_version") != SCHEMA_VERSION:
            raise AtlasError(
                f"{path}: atlas schema version {self.meta.get('schema_version')!r}, this thoughtscope "
                f"reads version {SCHEMA_VERSION}; rebuild the atlas"
            )
        if self.meta.get("complete") is not True:
            raise AtlasError(
                f"{path}: the atlas build did not finish; rerun `thoughtscope atlas build` with the "
                f"same --out to resume it"
            )
        m = self.meta
        for key, ok, expected in (
            ("n_features", lambda v: _is_int(v) and v > 0, "a positive integer"),
            ("window_left", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
            ("window_right", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
            ("hist_edges", lambda v: isinstance(v, list) and all(_is_num(x) for x in v), "a list of numbers"),
            ("random_contexts", lambda v: isinstance(v, list) and all(_is_int(x) for x in v), "a list of ids"),
        ):
            if (key in m or key != "random_contexts") and not ok(m.get(key)):
                raise self._bad(f"meta {key!r}", m.get(key), expected)
        with self._reading("the features table"):
            (rows,) = self.con.execute("SELECT count(*) FROM features").fetchone()
        if rows != m["n_features"]:
            raise AtlasError(
                f"{path}: the features table has {rows} rows but meta says n_features={m['n_features']}; "
                "the atlas is damaged, rebuild it"
            )
        self.n_features = m["n_features"]
        self.window_left = m["window_left"]
        self.window_right = m["window_right"]
        self.hist_edges = np.asarray(m["hist_edges"], dtype=np.float64)

    @classmethod
    def open(cls, path: str | os.PathLike) -> Atlas:
        p = db_path(path)
        return cls(connect(p), p)

    @contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """Turn what a damaged file makes SQLite, json or numpy raise into one AtlasError naming the file."""
        try:
            yield
        except AtlasError:
            raise
        except (sqlite3.Error, ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError) as e:
            raise AtlasError(f"{self.path}: cannot read {what} ({type(e).__name__}: {e}); rebuild the atlas") from None

    def _bad(self, what: str, value: Any, expected: str) -> AtlasError:
        shown = repr(value) if not isinstance(value, bytes) else f"{len(value)} bytes"
        return AtlasError(f"{self.path}: {what} is {shown[:80]}, expected {expected}; the atlas is damaged, rebuild it")

    def _int(self, v: Any, what: str) -> int:
        if not _is_int(v):
            raise self._bad(what, v, "an integer")
        return v

    def _num(self, v: Any, what: str) -> float:
        if not _is_num(v):
            raise self._bad(what, v, "a finite number")
        return float(v)

    def _blob(self, v: Any, dtype: Any, what: str) -> np.ndarray:
        size = np.dtype(dtype).itemsize
        if not isinstance(v, bytes) or len(v) % size:
            raise self._bad(what, v, f"a blob of {np.dtype(dtype).name} values")
        return np.frombuffer(v, dtype=dtype).copy()

    def _pairs(self, v: Any, what: str) -> list[tuple[int, float]]:
        """A JSON list of [id, value] pairs (logit effects, neighbours)."""
        with self._reading(what):
            x = json.loads(v) if isinstance(v, str) else None
        if not isinstance(x, list) or not all(
            isinstance(p, list) and len(p) == 2 and _is_int(p[0]) and _is_num(p[1]) for p in x
        ):
            raise self._bad(what, v, "a JSON list of [id, value] pairs")
        return [(p[0], float(p[1])) for p in x]

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
        with self._reading(f"feature {n}"):
            row = self.con.execute(
                "SELECT id, n_active, density, max_act, mean_act, hist, logits_pos, logits_neg, neighbours "
                "FROM features WHERE id=?",
                (n,),
            ).fetchone()
        if row is None:
            raise AtlasError(
                f"{self.path}: feature {n} is missing from the features table; the atlas is corrupt, rebuild it"
            )
        w = f"feature {n}'s"
        f = Feature(
            id=n,
            n_active=self._int(row[1], f"{w} n_active"),
            density=self._num(row[2], f"{w} density"),
            max_act=self._num(row[3], f"{w} max_act"),
            mean_act=self._num(row[4], f"{w} mean_act"),
            hist=self._blob(row[5], np.int32, f"{w} histogram"),
            logits_pos=self._pairs(row[6], f"{w} logits_pos"),
            logits_neg=self._pairs(row[7], f"{w} logits_neg"),
            neighbours=self._pairs(row[8], f"{w} neighbours"),
        )
        f.explanation = self.explanation(n)
        return f

    def context(self, ctx: int) -> list[int]:
        with self._reading(f"context {ctx}"):
            row = self.con.execute("SELECT tokens FROM contexts WHERE id=?", (int(ctx),)).fetchone()
        if row is None:
            raise AtlasError(f"{self.path}: context {ctx} is referenced but not stored; the atlas is corrupt")
        return self._blob(row[0], np.int32, f"context {ctx}'s tokens").tolist()

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
        w = f"an example of feature {n}:"
        with self._reading(f"feature {n}'s examples"):
            rows = self.con.execute(q, args).fetchall()
        for _feat, kd, rank, b, ctx, pos, act, win in rows:
            ctx, pos = self._int(ctx, f"{w} ctx"), self._int(pos, f"{w} pos")
            if not isinstance(kd, str):
                raise self._bad(f"{w} kind", kd, "'top' or 'quantile'")
            if ctx not in cache:
                cache[ctx] = self.context(ctx)
            out.append(
                Example(
                    feature=n,
                    kind=kd,
                    rank=self._int(rank, f"{w} rank"),
                    bin=self._int(b, f"{w} bin"),
                    ctx=ctx,
                    pos=pos,
                    act=self._num(act, f"{w} act"),
                    tokens=cache[ctx],
                    window=self._blob(win, np.float16, f"{w} window").astype(np.float32),
                    start=pos - self.window_left,
                )
            )
        return out

    def random_contexts(self) -> list[int]:
        with self._reading("the random contexts"):
            return [
                self._int(r[0], "a random context id")
                for r in self.con.execute(
                    "SELECT id FROM contexts WHERE id IN (SELECT value FROM json_each(?))",
                    (json.dumps(self.meta.get("random_contexts", [])),),
                ).fetchall()
            ]

    def random_activations(self, n: int) -> dict[int, dict[int, float]]:
        """ctx -> {pos: activation} of feature n on the fixed random context sample (only non-zero entries)."""
        n = self.check_feature(n)
        out: dict[int, dict[int, float]] = {}
        w = f"feature {n}'s random activations:"
        with self._reading(f"feature {n}'s random activations"):
            rows = self.con.execute("SELECT ctx, pos, act FROM random_acts WHERE feature=?", (n,)).fetchall()
        for ctx, pos, act in rows:
            out.setdefault(self._int(ctx, f"{w} ctx"), {})[self._int(pos, f"{w} pos")] = self._num(act, f"{w} act")
        return out

    def stats(self) -> dict[str, np.ndarray]:
        """Per-feature arrays over the whole SAE (for the report)."""
        with self._reading("the features table"):
            rows = self.con.execute(
                "SELECT id, n_active, density, max_act, mean_act FROM features ORDER BY id"
            ).fetchall()
        for r in rows:
            if not (all(_is_int(v) for v in r[:2]) and all(_is_num(v) for v in r[2:])):
                raise self._bad(f"feature row {r[0]!r}", r, "integer id and n_active, finite numbers")
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
        with self._reading("the feature ids"):
            ids = [self._int(r[0], "a feature id") for r in self.con.execute(q).fetchall()]
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
        with self._reading(f"feature {n}'s explanation"):
            cur = self.con.execute("SELECT * FROM explanations WHERE feature=?", (int(n),))
            row = cur.fetchone()
            names = [c[0] for c in cur.description]
        if row is None:
            return None
        d = dict.fromkeys(EXPLANATION_COLUMNS)
        d.update(zip(names, row))
        self._check_explanation(d, f"feature {n}'s explanation")
        with self._reading(f"feature {n}'s explanation details"):
            d["details"] = json.loads(d["details"]) if d.get("details") else None
        return d

    def _check_explanation(self, d: dict, what: str) -> None:
        for k in ("explanation", "error", "explainer", "scorer", "method", "scorer_method"):
            if d.get(k) is not None and not isinstance(d[k], str):
                raise self._bad(f"{what}: {k}", d[k], "text or NULL")
        if "status" in d and not isinstance(d["status"], str):
            raise self._bad(f"{what}: status", d["status"], "'ok' or 'failed'")
        for k in (*SCORE_KEYS, "seconds", "created"):
            v = d.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise self._bad(f"{what}: {k}", v, "a number or NULL")
        if d.get("details") is not None and not isinstance(d["details"], str):
            raise self._bad(f"{what}: details", d["details"], "JSON text or NULL")

    def explained(self, status: str | None = "ok") -> set[int]:
        """Ids of features with a stored explanation of this status ('ok', 'failed'; None: any)."""
        q = "SELECT feature FROM explanations" + (" WHERE status=?" if status else "")
        with self._reading("the explanations table"):
            return {
                self._int(r[0], "an explained feature id") for r in self.con.execute(q, (status,) if status else ())
            }

    def _prepare_writes(self) -> None:
        """Before the first write: WAL (readers and this writer do not block each other) and the explanation
        columns added since schema version 1 (an older atlas gets them, NULL for the rows written before)."""
        if self._writable:
            return
        try:
            self.con.execute("PRAGMA journal_mode=WAL")
            ensure_explanation_columns(self.con)
        except sqlite3.DatabaseError as e:
            raise AtlasError(f"{self.path}: cannot write explanations ({e})") from None
        self._writable = True

    def save_explanation(self, n: int, rec: dict) -> None:
        """Store (replace) feature n's explanation; keys as `explanation` returns them, missing ones NULL."""
        self.save_explanations({n: rec})

    def save_explanations(self, recs: dict[int, dict]) -> None:
        """Store many explanations in one transaction (and keep the full-text index in step)."""
        self._prepare_writes()
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
        """Features whose explanation of any kind (input side, output side, NLA) matches `text`: FTS5 ranking when
        available (each feature once, at its best-ranked kind, with that kind's text), else substring match."""
        text = text.strip()
        if not text:
            raise AtlasError("search text is empty")
        kinds = has_table(self.con, "explanation_kinds")
        with self._reading("the explanations"):
            rows = []
            if has_fts(self.con):
                words = [w for w in "".join(c if c.isalnum() else " " for c in text).split() if w]
                if words:
                    q = " OR ".join(f'"{w}"' for w in words)
                    sql = "SELECT feature, explanation, rank FROM explanations_fts WHERE explanations_fts MATCH ?"
                    args: list[Any] = [q]
                    if kinds and has_table(self.con, "explanation_kinds_fts"):
                        sql += (
                            " UNION ALL SELECT feature, explanation, rank FROM explanation_kinds_fts "
                            "WHERE explanation_kinds_fts MATCH ?"
                        )
                        args.append(q)
                    rows = self.con.execute(f"{sql} ORDER BY rank LIMIT ?", (*args, 4 * limit)).fetchall()
            if not rows:
                sql = "SELECT feature, explanation, 0 FROM explanations WHERE status='ok' AND explanation LIKE ?"
                args = [f"%{text}%"]
                if kinds:
                    sql += " UNION ALL SELECT feature, explanation, 1 FROM explanation_kinds WHERE status='ok' AND "
                    sql += "explanation LIKE ?"
                    args.append(f"%{text}%")
                rows = self.con.execute(f"{sql} ORDER BY 1, 3 LIMIT ?", (*args, 4 * limit)).fetchall()
        out: dict[int, str] = {}
        for f, e, _ in rows:
            if not _is_int(f) or not isinstance(e, str):
                raise self._bad("a search result", (f, e), "a feature id and its explanation text")
            out.setdefault(f, e)
        return list(out.items())[:limit]

    # ------------------------------------------------------------------ explanation kinds
    def save_explanation_kinds(self, recs: dict[int, dict[str, dict]]) -> None:
        """Store (replace) explanations of kinds other than 'input' ({feature: {kind: record}}, keys as
        `explanation_kinds` returns them, missing ones NULL) in one transaction, with their full-text index."""
        self._prepare_writes()
        try:
            ensure_kinds_table(self.con)
        except sqlite3.DatabaseError as e:
            raise AtlasError(f"{self.path}: cannot write explanation kinds ({e})") from None
        fts = has_table(self.con, "explanation_kinds_fts")
        cols = KIND_COLUMNS
        with self.con:
            for n, by_kind in recs.items():
                for kind, rec in by_kind.items():
                    if kind == "input":
                        raise AtlasError("the input-side explanation is stored with save_explanations, not as a kind")
                    rec = dict(rec, feature=int(n), kind=kind)
                    if isinstance(rec.get("details"), (dict, list)):
                        rec["details"] = json.dumps(rec["details"])
                    self.con.execute(
                        f"INSERT OR REPLACE INTO explanation_kinds ({', '.join(cols)}) "
                        f"VALUES ({', '.join('?' * len(cols))})",
                        [rec.get(c) for c in cols],
                    )
                    if fts:
                        self.con.execute("DELETE FROM explanation_kinds_fts WHERE feature=? AND kind=?", (int(n), kind))
                        if rec.get("explanation") and rec.get("status") == "ok":
                            self.con.execute(
                                "INSERT INTO explanation_kinds_fts (explanation, feature, kind) VALUES (?, ?, ?)",
                                (rec["explanation"], int(n), kind),
                            )

    def explanation_kinds(self, n: int) -> dict:
        """Every kind of explanation stored for feature n, with its scores, and which is best.

        Returns {"kinds": [record, ...] (input side first), "best": kind or None, "best_rule": how it was chosen,
        and "nla" (`nla_kind.nla_note`) when no NLA reading is stored}. A record has the keys of `explanation`
        that apply (explanation, status, error, method, scorer_method, detection_auroc / _bacc,
        shuffled_detection_auroc / _bacc, details) plus kind, own_method, own_score, own_effect,
        own_control_effect (None where not measured) and at_or_below_control (True when its detection AUROC is
        at or below its shuffled control's; None where either is missing). The best kind is the 'ok' one with
        the highest held-out detection AUROC (the one score every kind has); `best.cross_fit` is the unbiased
        version a summary over features uses."""
        from .best import best_kind, mark_controls

        n = self.check_feature(n)
        out = []
        inp = self.explanation(n)
        if inp is not None:
            out.append({**dict.fromkeys(KIND_COLUMNS), **inp, "kind": "input"})
        out += self._kind_rows("WHERE feature=?", (n,))
        mark_controls(out)
        res = {"kinds": out, "best": best_kind(out), "best_rule": "highest held-out detection AUROC"}
        if not any(r["kind"] == "nla" for r in out):
            from .nla_kind import nla_note

            res["nla"] = nla_note(self.meta.get("site"))
        return res

    def _kind_rows(self, where: str, args: tuple) -> list[dict]:
        if not has_table(self.con, "explanation_kinds"):
            return []
        with self._reading("the explanation kinds"):
            cur = self.con.execute(f"SELECT * FROM explanation_kinds {where} ORDER BY feature, kind", args)
            names = [c[0] for c in cur.description]
            rows = cur.fetchall()
        out = []
        for row in rows:
            d = dict(zip(names, row))
            what = f"feature {d.get('feature')!r}'s {d.get('kind')!r} explanation"
            self._int(d["feature"], "an explained feature id")
            if not isinstance(d.get("kind"), str):
                raise self._bad(f"{what}: kind", d.get("kind"), "text")
            self._check_explanation({k: v for k, v in d.items() if k not in ("kind", "own_method")}, what)
            for k in ("own_score", "own_effect", "own_control_effect"):
                if d[k] is not None and not _is_num(d[k]):
                    raise self._bad(f"{what}: {k}", d[k], "a number or NULL")
            with self._reading(f"{what}'s details"):
                d["details"] = json.loads(d["details"]) if d.get("details") else None
            out.append(d)
        return out

    def kind_records(self, kind: str, features: Sequence[int] | None = None) -> dict[int, dict]:
        """feature -> its record of this kind ('input' included), with details, for summaries over features."""
        if kind == "input":
            keep = None if features is None else {int(f) for f in features}
            with self._reading("the explanations"):
                cur = self.con.execute("SELECT * FROM explanations")
                names = [c[0] for c in cur.description]
                rows = cur.fetchall()
            out = {}
            for row in rows:
                d = {**dict.fromkeys(EXPLANATION_COLUMNS), **dict(zip(names, row)), "kind": "input"}
                f = self._int(d["feature"], "an explained feature id")
                if keep is not None and f not in keep:
                    continue
                self._check_explanation(d, f"feature {f}'s explanation")
                with self._reading(f"feature {f}'s explanation details"):
                    d["details"] = json.loads(d["details"]) if d.get("details") else None
                out[f] = d
            return out
        rows = {d["feature"]: d for d in self._kind_rows("WHERE kind=?", (kind,))}
        return rows if features is None else {f: rows[f] for f in features if f in rows}

    def kinds_present(self) -> list[str]:
        """The kinds of explanation this atlas stores ('input' first when it has any)."""
        out = ["input"] if self.explained(None) else []
        if has_table(self.con, "explanation_kinds"):
            with self._reading("the explanation kinds"):
                out += [r[0] for r in self.con.execute("SELECT DISTINCT kind FROM explanation_kinds ORDER BY kind")]
        return out

    def scores(self, features: Sequence[int] | None = None) -> list[dict]:
        """One dict per 'ok' explanation (of `features`, or all): feature, explanation, method, scorer_method and
        every score key of `explanation` (None where not measured)."""
        keys = ["feature", *SCORE_KEYS, "explanation", "method", "scorer_method"]
        with self._reading("the explanations"):
            have = {r[1] for r in self.con.execute("PRAGMA table_info(explanations)")}
            sel = ", ".join(k if k in have else "NULL" for k in keys)
            rows = self.con.execute(f"SELECT {sel} FROM explanations WHERE status='ok'").fetchall()
        keep = set(int(f) for f in features) if features is not None else None
        out = []
        for r in rows:
            d = dict(zip(keys, r))
            self._int(d["feature"], "an explained feature id")
            self._check_explanation(d, f"feature {d['feature']}'s explanation")
            if keep is None or d["feature"] in keep:
                out.append(d)
        return out


def atlases_by_block(atlases: Sequence[Atlas], transcoders: Sequence) -> dict[int, Atlas]:
    """Each atlas under the block whose transcoder it was built on (its site mlp_in.L, that transcoder's width):
    how a transcoder set's features find their explanations. AtlasError for an atlas of no block of the set, of
    another width, or a second one for a block."""
    n = len(transcoders)
    out: dict[int, Atlas] = {}
    for at in atlases:
        site = str(at.meta.get("site", ""))
        layer = int(site.split(".")[1]) if site.startswith("mlp_in.") and site[7:].isdigit() else -1
        if not 0 <= layer < n:
            raise AtlasError(f"the atlas {at.path} reads {site!r}, not the input of a block's MLP (mlp_in.L)")
        if at.n_features != transcoders[layer].cfg.n_features:
            raise AtlasError(
                f"the atlas {at.path} has {at.n_features} features, the transcoder of block {layer} "
                f"{transcoders[layer].cfg.n_features}: pass the atlas built on that transcoder"
            )
        if layer in out:
            raise AtlasError(f"two atlases for block {layer}: {out[layer].path} and {at.path}")
        out[layer] = at
    return out


def block_labels(atlases: dict[int, Atlas], pairs) -> dict[tuple[int, int], str]:
    """(block, feature) -> its atlas explanation, for the blocks that have an atlas and the features it explains."""
    out = {}
    for layer, feat in pairs:
        at = atlases.get(layer)
        ex = (at.explanation(feat) or {}) if at is not None else {}
        if ex.get("status", "ok") == "ok" and ex.get("explanation"):
            out[(layer, feat)] = ex["explanation"]
    return out
