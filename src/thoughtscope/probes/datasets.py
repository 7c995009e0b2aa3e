"""Probe datasets: labelled texts or contrastive pairs, validated before any forward pass, split by group.

A row is ``text, label`` plus optional ``group`` (a template or entity that must never straddle train and
test), ``entity`` (what the Hewitt–Liang control task assigns its random labels to; defaults to the group),
``difficulty`` (for the easy→hard column), ``pair_id`` (rows of one contrastive pair) and ``span``
([start, end) characters to read when the read position is "span"). Files are JSONL or CSV with those
columns; a pairs file has ``positive, negative`` (and optional ``group``) and becomes two rows per pair.
Every error names the file and the row (1-based, as an editor shows it) and what was expected.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..documents import jsonl_objects
from ..errors import ProbeError
from .config import READS  # noqa: F401  (re-exported: its old home)

COLUMNS = ("text", "label", "group", "entity", "difficulty", "pair_id", "span")


@dataclass
class ProbeSet:
    """Labelled texts (label 1 = the concept is present / the statement is true)."""

    texts: list[str]
    labels: list[int]
    groups: list[str]
    name: str = "probe-set"
    source: str = "<memory>"
    entities: list[str] | None = None
    difficulty: list[str | None] | None = None
    pair_ids: list[str | None] | None = None
    spans: list[tuple[int, int] | None] | None = None
    extra: dict[str, list] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.texts)
        self.entities = list(self.entities) if self.entities is not None else list(self.groups)
        self.difficulty = list(self.difficulty) if self.difficulty is not None else [None] * n
        self.pair_ids = list(self.pair_ids) if self.pair_ids is not None else [None] * n
        self.spans = list(self.spans) if self.spans is not None else [None] * n
        for name in ("labels", "groups", "entities", "difficulty", "pair_ids", "spans"):
            if len(getattr(self, name)) != n:
                raise ProbeError(f"{self.source}: column {name!r} has {len(getattr(self, name))} values for {n} texts")
        validate(self)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def y(self) -> torch.Tensor:
        return torch.tensor(self.labels, dtype=torch.long)

    @property
    def sha256(self) -> str:
        """Content hash of every column that changes what a probe learns (recorded in probe artefacts)."""
        h = hashlib.sha256()
        for row in zip(self.texts, self.labels, self.groups, self.entities, self.difficulty, self.pair_ids, self.spans):
            h.update(json.dumps(row, ensure_ascii=False).encode())
        return h.hexdigest()

    def subset(self, idx: Sequence[int], name: str | None = None) -> ProbeSet:
        idx = list(idx)
        pick = lambda col: [col[i] for i in idx]  # noqa: E731
        return ProbeSet(
            pick(self.texts),
            pick(self.labels),
            pick(self.groups),
            name or self.name,
            self.source,
            pick(self.entities),
            pick(self.difficulty),
            pick(self.pair_ids),
            pick(self.spans),
            {k: pick(v) for k, v in self.extra.items()},
        )

    def pairs(self, idx: Sequence[int] | None = None) -> list[tuple[int, int]]:
        """(positive row, negative row) for each pair_id with exactly one row of each label inside idx."""
        idx = range(len(self)) if idx is None else idx
        by: dict[str, dict[int, int]] = {}
        for i in idx:
            if self.pair_ids[i] is not None:
                by.setdefault(self.pair_ids[i], {})[self.labels[i]] = i
        return [(d[1], d[0]) for d in by.values() if len(d) == 2]

    def to_jsonl(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for i in range(len(self)):
                row = {
                    "text": self.texts[i],
                    "label": self.labels[i],
                    "group": self.groups[i],
                    "entity": self.entities[i],
                }
                for key, col in (("difficulty", self.difficulty), ("pair_id", self.pair_ids), ("span", self.spans)):
                    if col[i] is not None:
                        row[key] = list(col[i]) if key == "span" else col[i]
                row.update({k: v[i] for k, v in self.extra.items()})
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return path


def validate(ds: ProbeSet) -> None:
    """Empty or duplicate texts, labels outside {0, 1}, a single class, bad spans: one clear error each."""
    if not ds.texts:
        raise ProbeError(f"{ds.source}: no rows; expected labelled texts (text, label) or pairs (positive, negative)")
    seen: dict[str, int] = {}
    for i, (t, y) in enumerate(zip(ds.texts, ds.labels)):
        row = f"{ds.source} row {i + 1}"
        if not isinstance(t, str) or not t.strip():
            raise ProbeError(f"{row}: empty text; every row needs a non-empty 'text'")
        if t in seen:
            raise ProbeError(f"{row}: duplicate text (same as row {seen[t] + 1}): {t[:60]!r}")
        seen[t] = i
        if isinstance(y, bool) or y not in (0, 1):
            raise ProbeError(f"{row}: label {y!r} is not 0 or 1; probes need two classes written as 0 and 1")
        sp = ds.spans[i]
        if sp is not None and not (len(sp) == 2 and 0 <= sp[0] < sp[1] <= len(t)):
            raise ProbeError(f"{row}: span {sp!r} is not [start, end) inside the text's {len(t)} characters")
    classes = set(ds.labels)
    if len(classes) < 2:
        raise ProbeError(f"{ds.source}: every row has label {classes.pop()}; a probe needs both classes 0 and 1")


# --------------------------------------------------------------------------- files


def _label(value, where: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("0", "1", "true", "false"):
        return int(value.strip().lower() in ("1", "true"))
    raise ProbeError(f"{where}: label {value!r} is not two-class; expected 0/1 or true/false")


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise ProbeError(f"probe dataset not found: {path} (expected a .jsonl or .csv file)")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return [dict(r) for r in csv.DictReader(f)]
    text = path.read_text(encoding="utf-8")
    return [rec for _, rec in jsonl_objects(text, ProbeError, lambda n: f"{path} row {n}")]


def load_dataset(path: str | Path, name: str | None = None) -> ProbeSet:
    """Read labelled texts (text, label, ...) or pairs (positive, negative, ...) from JSONL or CSV."""
    path = Path(path)
    rows = _rows(path)
    if not rows:
        raise ProbeError(f"{path}: no rows; expected labelled texts (text, label) or pairs (positive, negative)")
    if "positive" in rows[0] or "negative" in rows[0]:
        return _from_pairs(rows, path, name)
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    extra: dict[str, list] = {}
    for i, r in enumerate(rows):
        where = f"{path} row {i + 1}"
        if "text" not in r or "label" not in r:
            raise ProbeError(
                f"{where}: missing {'text' if 'text' not in r else 'label'}; expected columns "
                f"text, label (optional group, entity, difficulty, pair_id, span)"
            )
        cols["text"].append(r["text"])
        cols["label"].append(_label(r["label"], where))
        group = r.get("group")
        cols["group"].append(str(group) if group not in (None, "") else f"row{i + 1}")
        ent = r.get("entity")
        cols["entity"].append(str(ent) if ent not in (None, "") else cols["group"][-1])
        cols["difficulty"].append(r.get("difficulty") or None)
        pid = r.get("pair_id")
        cols["pair_id"].append(str(pid) if pid not in (None, "") else None)
        sp = r.get("span")
        if isinstance(sp, str) and sp:
            sp = json.loads(sp)
        cols["span"].append(tuple(sp) if sp else None)
        for k, v in r.items():
            if k not in COLUMNS:
                extra.setdefault(k, [None] * i).append(v)
        for k in extra:
            if len(extra[k]) < i + 1:
                extra[k].append(None)
    return ProbeSet(
        cols["text"],
        cols["label"],
        cols["group"],
        name or path.stem,
        str(path),
        cols["entity"],
        cols["difficulty"],
        cols["pair_id"],
        cols["span"],
        extra,
    )


def _from_pairs(rows: list[dict], path: Path, name: str | None) -> ProbeSet:
    texts, labels, groups, pids = [], [], [], []
    for i, r in enumerate(rows):
        for side in ("positive", "negative"):
            if not isinstance(r.get(side), str) or not r[side].strip():
                raise ProbeError(
                    f"{path} row {i + 1}: pair has no {side} side; every row needs both 'positive' and 'negative' texts"
                )
        pid = str(r.get("pair_id") or f"pair{i + 1}")
        group = str(r.get("group") or pid)
        texts += [r["positive"], r["negative"]]
        labels += [1, 0]
        groups += [group, group]
        pids += [pid, pid]
    return ProbeSet(texts, labels, groups, name or path.stem, str(path), pair_ids=pids)


def from_pairs(pairs: Iterable[tuple[str, str]], name: str = "pairs", groups: Sequence[str] | None = None) -> ProbeSet:
    """Contrastive (positive, negative) pairs as a ProbeSet; each pair is its own group unless groups are given."""
    pairs = list(pairs)
    for i, p in enumerate(pairs):
        if len(p) != 2 or not all(isinstance(s, str) and s.strip() for s in p):
            raise ProbeError(f"{name} pair {i + 1}: expected (positive, negative) non-empty texts, got {p!r}")
    texts = [t for p in pairs for t in p]
    pids = [f"pair{i}" for i in range(len(pairs)) for _ in (0, 1)]
    grp = [str(g) for g in groups for _ in (0, 1)] if groups is not None else pids
    return ProbeSet(texts, [1, 0] * len(pairs), grp, name, name, pair_ids=pids)


# --------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class Split:
    train: list[int]
    test: list[int]


def group_split(ds: ProbeSet, test_fraction: float = 0.25, seed: int = 0, min_per_class: int = 2) -> Split:
    """Whole groups go to train or test (never both), chosen at random with the seed; both sides keep both classes."""
    if not 0 < test_fraction < 1:
        raise ProbeError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    groups = sorted(set(ds.groups))
    if len(groups) < 2:
        raise ProbeError(
            f"{ds.source}: all {len(ds)} rows share one group ({groups[0]!r}); a held-out split needs at least 2 groups"
        )
    rng = random.Random(seed)
    rng.shuffle(groups)
    n_test = min(len(groups) - 1, max(1, round(test_fraction * len(groups))))
    test_groups = set(groups[:n_test])
    train = [i for i, g in enumerate(ds.groups) if g not in test_groups]
    test = [i for i, g in enumerate(ds.groups) if g in test_groups]
    for side, idx in (("train", train), ("test", test)):
        counts = [sum(ds.labels[i] == c for i in idx) for c in (0, 1)]
        if min(counts) < min_per_class:
            raise ProbeError(
                f"{ds.source}: too small for a held-out split: the {side} side ({len(idx)} rows from "
                f"{len(test_groups) if side == 'test' else len(groups) - n_test} groups) has {counts[0]} rows of "
                f"class 0 and {counts[1]} of class 1; need >= {min_per_class} of each (add rows or groups)"
            )
    return Split(train, test)


def control_labels(ds: ProbeSet, seed: int = 0) -> list[int]:
    """Hewitt–Liang control task: one random label per entity (half the entities get 1), whatever the truth."""
    ents = sorted(set(ds.entities))
    rng = random.Random(seed + 7919)
    rng.shuffle(ents)
    ones = set(ents[: len(ents) // 2])
    return [int(e in ones) for e in ds.entities]


def group_folds(groups: Sequence[str], idx: Sequence[int], k: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """k cross-validation folds over the rows idx, whole groups per fold (training split only)."""
    gs = sorted({groups[i] for i in idx})
    random.Random(seed).shuffle(gs)
    k = max(2, min(k, len(gs)))
    fold_of = {g: j % k for j, g in enumerate(gs)}
    return [
        ([i for i in idx if fold_of[groups[i]] != f], [i for i in idx if fold_of[groups[i]] == f]) for f in range(k)
    ]
