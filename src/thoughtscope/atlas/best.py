"""Which kind of explanation reads a feature best, chosen without grading it on the contexts it was chosen on.

Every kind of explanation of a feature (input side, output side, an NLA's reading) is scored by the same
lexical scorer on the same held-out windows, so their detection AUROCs compare. Taking, per feature, the
kind with the highest AUROC and reporting that AUROC is biased upward: the maximum of noisy scores is
above each one's expectation even when no kind is better. `cross_fit` removes the bias by two-fold cross-fitting:
the held-out windows are split into two halves (stratified: half the activating and half the silent windows
each, seeded per feature), the best kind is chosen on one half and its AUROC read on the other, and the two
ways round are averaged. The shuffled control (another feature's explanation of the same kind, scored on
these windows) is read on the same half, so "beats its control" compares like with like.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from .. import stats

KIND_ORDER = ("input", "output", "nla")  # ties go to the earlier kind
MARGIN = 0.3  # detection AUROC by which another kind must beat the input side on the choosing half (set on the
# first-start atlas: the output side detects at chance, so a smaller margin only adds selection noise)
CROSS_FIT = "two-fold cross-fit: best kind chosen on one half of each feature's held-out windows, scored on the other"


def _mean(values) -> float | None:
    """Mean of the values that are not None (a bootstrap only where a CI is reported: it is the slow part)."""
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def _order(kind: str) -> int:
    return KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)


def at_or_below_control(rec: dict) -> bool | None:
    """Whether an explanation's detection AUROC is at or below its shuffled control's (None where either is
    missing or the explanation did not succeed): the one rule behind every warning not to trust one."""
    a, c = rec.get("detection_auroc"), rec.get("shuffled_detection_auroc")
    return None if a is None or c is None or rec.get("status") != "ok" else bool(a <= c)


def mark_controls(recs: list[dict]) -> None:
    """Set each record's at_or_below_control (`at_or_below_control`)."""
    for r in recs:
        r["at_or_below_control"] = at_or_below_control(r)


def best_kind(recs: list[dict]) -> str | None:
    """The 'ok' kind with the highest detection AUROC (ties: input, output, nla), None when none is scored."""
    scored = [r for r in recs if r.get("status") == "ok" and r.get("detection_auroc") is not None]
    if not scored:
        return None
    return max(scored, key=lambda r: (r["detection_auroc"], -_order(r["kind"])))["kind"]


def halves(labels: Sequence[int], feature: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Two disjoint halves of the held-out windows (indices), each with half the activating and half the silent
    ones, seeded per feature so every kind of the feature is split the same way."""
    rng = random.Random(seed * 1_000_003 + int(feature))
    a: list[int] = []
    b: list[int] = []
    for cls in (1, 0):
        idx = [i for i, y in enumerate(labels) if int(y) == cls]
        rng.shuffle(idx)
        a += idx[: len(idx) // 2]
        b += idx[len(idx) // 2 :]
    return sorted(a), sorted(b)


def _detection(rec: dict) -> tuple[list[int], list[float], list[float] | None] | None:
    det = ((rec.get("details") or {}) if rec.get("status") == "ok" else {}).get("detection") or {}
    labels, probs = det.get("labels"), det.get("probs")
    if not labels or not probs or len(labels) != len(probs):
        return None
    shuf = det.get("shuffled_probs")
    return list(labels), list(probs), list(shuf) if shuf and len(shuf) == len(labels) else None


def cross_fit(recs: dict[str, dict], feature: int, seed: int = 0, margin: float = 0.0) -> dict | None:
    """The feature's best kind chosen on one half of its held-out windows and scored on the other, both ways.

    recs: kind -> record (details.detection holds labels and per-window scores; shuffled_probs those of the
    shuffled control, else the control's whole-set AUROC stands in). Kinds scored on other windows than the
    first kind's (different labels) are left out. Another kind displaces the input side only when it beats it
    on the choosing half by more than `margin` (a prior for the kind that is usually best). Returns {"auroc":
    mean of the two out-of-half AUROCs, "shuffled": the chosen kinds' controls on the same halves, "chosen":
    [kind on half A, kind on half B], "beats_control": auroc > shuffled, "input": the input side's own mean
    over the two halves} or None when no kind has scores with both classes on both halves."""
    dets = {k: d for k, r in recs.items() if (d := _detection(r)) is not None}
    if not dets:
        return None
    ref = dets[min(dets, key=_order)][0]
    dets = {k: d for k, d in dets.items() if d[0] == ref}
    a, b = halves(ref, feature, seed)
    # every kind's and control's AUROC on each half, one batched call per half: rows are kinds, then controls
    names = list(dets)
    rows = [dets[k][1] for k in names] + [dets[k][2] or dets[k][1] for k in names]
    on = {}
    for h, idx in (("a", a), ("b", b)):
        y = np.asarray([ref[i] for i in idx], dtype=bool)
        if y.all() or not y.any():
            return None
        m = np.asarray(rows, dtype=np.float64)[:, idx]
        v = stats.auroc(m, y).tolist()
        on[h] = {k: v[i] for i, k in enumerate(names)}
        on[h + "_shuffled"] = {k: v[len(names) + i] if dets[k][2] else None for i, k in enumerate(names)}
    got, shuf, chosen = [], [], []
    for pick, score in (("a", "b"), ("b", "a")):
        k = max(
            names,
            key=lambda kk: (on[pick][kk] - (margin if kk != "input" and "input" in on[pick] else 0.0), -_order(kk)),
        )
        c = on[score + "_shuffled"][k]
        got.append(on[score][k]), chosen.append(k)
        shuf.append(c if c is not None else recs[k].get("shuffled_detection_auroc"))
    out = {"auroc": float(np.mean(got)), "chosen": chosen}
    out["shuffled"] = float(np.mean(shuf)) if None not in shuf else None
    out["beats_control"] = None if out["shuffled"] is None else bool(out["auroc"] > out["shuffled"])
    out["input"] = float(np.mean([on["a"]["input"], on["b"]["input"]])) if "input" in names else None
    return out


def summarize_kinds(at, features: Sequence[int] | None = None, *, seed: int = 0, margin: float = MARGIN) -> dict:
    """Per kind: features, mean detection AUROC and its shuffled control (CIs over features), the share beating
    the control; over kinds: the cross-fitted best-kind mean AUROC, the share whose best kind beats its control
    on the same half, how often each kind is chosen, and, for comparison on the same halves, the input side
    alone and the biased pick (best kind read on the windows it was chosen on)."""
    kinds = at.kinds_present()
    by_kind = {k: at.kind_records(k, features) for k in kinds}
    out: dict = {"kinds": {}, "best_rule": CROSS_FIT, "margin": margin}
    for k, recs in by_kind.items():
        ok = [r for r in recs.values() if r.get("status") == "ok"]
        auc = [r.get("detection_auroc") for r in ok]
        ctl = [r.get("shuffled_detection_auroc") for r in ok]
        pairs = [(x, c) for x, c in zip(auc, ctl) if x is not None and c is not None]
        ci = stats.mean_ci(auc)
        out["kinds"][k] = {
            "features": len(ok),
            "detection_auroc_mean": ci["mean"],
            "detection_auroc_ci": ci["ci"],
            "shuffled_auroc_mean": _mean(ctl),
            "beats_shuffled_share": (sum(x > c for x, c in pairs) / len(pairs)) if pairs else None,
        }
    feats = sorted(set().union(*[set(r) for r in by_kind.values()])) if by_kind else []
    fits, inputs, biased = [], [], []
    for f in feats:
        recs = {k: by_kind[k][f] for k in kinds if f in by_kind[k]}
        cf = cross_fit(recs, f, seed, margin)
        if cf is None:
            continue
        fits.append(cf)
        inputs.append(cf["input"])
        best = best_kind([{**r, "kind": k} for k, r in recs.items()])
        biased.append(recs[best].get("detection_auroc") if best else None)
    ci = stats.mean_ci([c["auroc"] for c in fits])
    beats = [c["beats_control"] for c in fits if c["beats_control"] is not None]
    chosen = [k for c in fits for k in c["chosen"]]
    out.update(
        best_kind_features=len(fits),
        best_kind_auroc_mean=ci["mean"],
        best_kind_auroc_ci=ci["ci"],
        best_kind_shuffled_mean=_mean([c["shuffled"] for c in fits]),
        best_beats_shuffled_share=(sum(beats) / len(beats)) if beats else None,
        best_kind_chosen_share={k: chosen.count(k) / len(chosen) for k in sorted(set(chosen))} if chosen else {},
        input_only_same_halves_auroc_mean=_mean(inputs),
        best_kind_same_contexts_auroc_mean_biased=_mean(biased),
    )
    return out
