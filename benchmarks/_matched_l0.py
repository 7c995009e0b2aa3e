"""ReLU-L1 at matched L0: one lambda gives each tool a different L0, and FVU falls as L0 rises, so FVUs at unequal
L0 do not compare. thoughtscope is retrained (untimed, same batches and learning rate) at lambdas from a secant
search in (log lambda, log L0) until the peer's held-out L0 is bracketed; its FVU at that L0 is interpolated
linearly in log L0 between the two bracketing points.
"""

from __future__ import annotations

import math


def _log_ratio(l0: float, target: float) -> float:
    return math.log(max(l0, 1e-9) / max(target, 1e-9))


def _bracket(points: list[dict], target: float) -> tuple[dict | None, dict | None]:
    """The point with the largest L0 <= target and the one with the smallest L0 >= target (None if absent)."""
    below = [p for p in points if p["l0"] <= target]
    above = [p for p in points if p["l0"] >= target]
    return (max(below, key=lambda p: p["l0"]) if below else None, min(above, key=lambda p: p["l0"]) if above else None)


def next_l1(points: list[dict], target: float) -> float:
    """Next lambda to try: secant in (log lambda, log L0), inside the bracket when there is one.

    L0 falls as lambda rises. With one point the local slope d log L0 / d log lambda is taken as -2 (short runs
    measure -1 to -4); steps are kept between 10% and 4x so a flat stretch cannot send lambda to 0 or infinity.
    """
    lo, hi = _bracket(points, target)
    if lo is not None and hi is not None and lo is not hi:
        a, b = hi, lo  # hi has the larger L0, hence the smaller lambda
    else:
        near = sorted(points, key=lambda p: abs(_log_ratio(p["l0"], target)))
        if len(near) == 1:
            p = near[0]
            f = math.exp(_log_ratio(p["l0"], target) / 2.0)
            f = min(4.0, max(0.25, f))
            if abs(math.log(f)) < math.log(1.1):
                f = 1.1 if f >= 1 else 1 / 1.1
            return p["l1"] * f
        a, b = near[0], near[1]
    la, lb = math.log(a["l1"]), math.log(b["l1"])
    ya, yb = _log_ratio(a["l0"], target), _log_ratio(b["l0"], target)
    if ya == yb or la == lb:
        x = (la + lb) / 2 if (lo is not None and hi is not None) else la + math.copysign(math.log(2.0), ya)
    else:
        x = la - ya * (lb - la) / (yb - ya)
    if lo is not None and hi is not None and lo is not hi:  # stay strictly inside the bracket
        l_lo, l_hi = sorted((la, lb))
        x = min(max(x, l_lo + 0.1 * (l_hi - l_lo)), l_hi - 0.1 * (l_hi - l_lo))
    else:
        base = la
        x = min(max(x, base - math.log(4.0)), base + math.log(4.0))
    return math.exp(x)


def fvu_at_l0(points: list[dict], target: float) -> dict:
    """Our FVU at the target L0: linear in log L0 between the bracketing points, else the nearest point."""
    lo, hi = _bracket(points, target)
    nearest = min(points, key=lambda p: abs(_log_ratio(p["l0"], target)))
    if lo is not None and hi is not None:
        if lo is hi or hi["l0"] == lo["l0"]:
            fvu = lo["fvu"]
        else:
            t = _log_ratio(target, lo["l0"]) / _log_ratio(hi["l0"], lo["l0"])
            fvu = lo["fvu"] + t * (hi["fvu"] - lo["fvu"])
        return {
            "fvu": fvu,
            "bracketed": True,
            "between_l1": [lo["l1"], hi["l1"]],
            "nearest_l1": nearest["l1"],
            "nearest_l0_rel_gap": nearest["l0"] / target - 1,
        }
    return {
        "fvu": nearest["fvu"],
        "bracketed": False,
        "between_l1": None,
        "nearest_l1": nearest["l1"],
        "nearest_l0_rel_gap": nearest["l0"] / target - 1,
    }


def match_l0(train_at, first: dict, target: float, max_runs: int, tol: float) -> tuple[list[dict], dict]:
    """Retrain ours at new lambdas (train_at(l1) -> point dict) until the target L0 is bracketed and the nearest
    point is within tol of it, or max_runs extra runs are spent."""
    points = [first]
    for _ in range(max_runs):
        lo, hi = _bracket(points, target)
        nearest = min(points, key=lambda p: abs(_log_ratio(p["l0"], target)))
        if lo is not None and hi is not None and abs(nearest["l0"] / target - 1) <= tol:
            break
        l1 = next_l1(points, target)
        if any(abs(math.log(l1 / p["l1"])) < 1e-3 for p in points):
            break
        points.append(train_at(l1))
        p = points[-1]
        print(
            f"  matched-L0 search: lambda {p['l1']:.4g} -> L0 {p['l0']:.1f}, FVU {p['fvu']:.4f}, "
            f"dead {p['dead_frac']:.2%}",
            flush=True,
        )
    return points, fvu_at_l0(points, target)
