"""Layer sweep: where is a concept linearly readable, how sure are we, and is it more than the controls?

For every site (the embedding layer included, as a control) and every fitter, on a group-disjoint held-out
split: test AUROC with a bootstrap CI and balanced accuracy at a training-chosen threshold, next to
- random directions (mean and 95th percentile over many, each oriented on the training rows),
- a label-shuffle null (the same fitter on permuted training labels; mean, 95th percentile, p-value),
- a Hewitt–Liang control task (random labels per entity, same split and fitter): selectivity = task − control,
- an easy→hard column when the data has a difficulty field.
The suggested site is the best *selective* one: among (fitter, site) pairs whose selectivity reaches
`min_selectivity` and whose test AUROC beats both nulls' 95th percentiles, the one with the highest
cross-validated AUROC on the training split (chosen without ranking by the test rows' AUROC).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import torch

from .._io import atomic_write, atomic_write_text, read_json
from ..errors import ProbeError
from ..values import fits_float as _num
from .config import SweepConfig
from .datasets import ProbeSet, control_labels, group_folds, group_split
from .fitters import fit
from .metrics import auroc, balanced_accuracy, best_threshold, bootstrap_auroc
from .read import EMBED, ReadConfig, read_activations, site_names


def _fit_kwargs(method: str, ds: ProbeSet, train: list[int], seed: int, folds: int) -> dict:
    """Extra inputs a fitter needs, re-indexed into the training rows."""
    pos = {r: k for k, r in enumerate(train)}
    kw: dict = {"seed": seed}
    if method in ("lat", "ccs"):
        kw["pairs"] = [(pos[a], pos[b]) for a, b in ds.pairs(train)]
    if method == "logistic":
        kw["folds"] = [
            ([pos[i] for i in a], [pos[i] for i in b]) for a, b in group_folds(ds.groups, train, folds, seed)
        ]
    return kw


def _scores(X: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (X @ W[..., None]).squeeze(-1) + b[:, None]


def random_direction_control(Xtr, ytr, Xte, yte, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Test AUROC of n random unit directions per site, each signed to rank the training positives higher."""
    g = torch.Generator().manual_seed(seed + 104729)
    R = torch.randn(n, Xtr.shape[-1], generator=g)
    R = R / R.norm(dim=1, keepdim=True)
    sign = torch.where(auroc(torch.einsum("lnd,rd->lrn", Xtr, R), ytr) >= 0.5, 1.0, -1.0)
    test = auroc(torch.einsum("lnd,rd->lrn", Xte, R) * sign[..., None], yte)  # [L, n]
    return test.mean(1), torch.quantile(test, 0.95, dim=1)


@dataclass(frozen=True)
class _Held:
    """Activations of every site [L, N, d] cut into the group-disjoint training and held-out rows."""

    names: list[str]
    X: torch.Tensor
    y: torch.Tensor
    train: list[int]
    test: list[int]

    @cached_property
    def Xtr(self) -> torch.Tensor:
        return self.X[:, torch.tensor(self.train)]

    @cached_property
    def Xte(self) -> torch.Tensor:
        return self.X[:, torch.tensor(self.test)]

    @cached_property
    def ytr(self) -> torch.Tensor:
        return self.y[torch.tensor(self.train)]

    @cached_property
    def yte(self) -> torch.Tensor:
        return self.y[torch.tensor(self.test)]


def _both_classes(y: torch.Tensor, rows) -> bool:
    return len(set(y[torch.as_tensor(rows)].tolist())) == 2


def _easy_hard_rows(ds: ProbeSet, h: _Held) -> tuple[list[int], list[int], list[int]] | None:
    """(easy training rows, hard training rows, hard test rows) when the data has both levels in both splits."""
    easy = [i for i in h.train if ds.difficulty[i] == "easy"]
    hard_tr = [i for i in h.train if ds.difficulty[i] == "hard"]
    hard_te = [i for i in h.test if ds.difficulty[i] == "hard"]
    if easy and hard_te and hard_tr and all(_both_classes(h.y, ix) for ix in (easy, hard_te, hard_tr)):
        return easy, hard_tr, hard_te
    return None


def _c(info: dict) -> dict:
    """The penalty a logistic fit chose, reused by the refits it is compared with."""
    return {"C": info["C"]} if "C" in info else {}


def _shuffle_null(method: str, h: _Held, info: dict, cfg: SweepConfig) -> torch.Tensor:
    """Test AUROC of the same fitter on permuted training labels: [L, n_shuffle]."""
    Xtr, ytr, Xte, yte = h.Xtr, h.ytr, h.Xte, h.yte
    g = torch.Generator().manual_seed(cfg.seed + 1)
    nulls = []
    for _ in range(cfg.n_shuffle):
        yp = ytr[torch.randperm(len(ytr), generator=g)]
        Wn, bn, _ = fit(method, Xtr, yp, seed=cfg.seed, **_c(info))
        nulls.append(auroc(_scores(Xte, Wn, bn), yte))
    return torch.stack(nulls, 1)


def _control_task(method: str, h: _Held, kw: dict, ctrl: torch.Tensor | None) -> torch.Tensor:
    """Test AUROC on the control task's labels (random per entity), or NaN when it has one class on a side."""
    if ctrl is None:
        return torch.full((len(h.names),), float("nan"))
    tr, te = torch.tensor(h.train), torch.tensor(h.test)
    Wc, bc, _ = fit(method, h.Xtr, ctrl[tr], **{k: v for k, v in kw.items() if k != "pairs"})
    return auroc(_scores(h.Xte, Wc, bc), ctrl[te])


def _cv_auroc(method: str, ds: ProbeSet, h: _Held, info: dict, cfg: SweepConfig) -> torch.Tensor:
    """Group-wise cross-validated AUROC on the training split (the logistic fitter reports its own): [L]."""
    if "cv_auroc" in info:
        return torch.tensor(info["cv_auroc"], dtype=torch.float64)
    Xtr, ytr = h.Xtr, h.ytr
    cv = torch.zeros(len(h.names), dtype=torch.float64)
    pos = {r: k for k, r in enumerate(h.train)}
    used = 0
    for a, bb in group_folds(ds.groups, h.train, cfg.cv_folds, cfg.seed):
        a_t, b_t = torch.tensor([pos[i] for i in a]), torch.tensor([pos[i] for i in bb])
        if len(set(ytr[b_t].tolist())) < 2 or len(set(ytr[a_t].tolist())) < 2:
            continue
        fkw: dict = {"seed": cfg.seed}
        if method in ("lat", "ccs"):
            ia = {r: k for k, r in enumerate(a)}
            fkw["pairs"] = [(ia[p], ia[q]) for p, q in ds.pairs(a)]
        Wf, bf, _ = fit(method, Xtr[:, a_t], ytr[a_t], **fkw)
        cv += auroc(_scores(Xtr[:, b_t], Wf, bf), ytr[b_t])
        used += 1
    return cv / max(used, 1)


def _easy_to_hard(method: str, h: _Held, info: dict, seed: int, rows) -> dict[str, torch.Tensor]:
    """AUROC on the hard test rows of a fit on the easy training rows, and of one on the hard training rows."""
    if rows is None:
        return {}
    easy, hard_tr, hard_te = rows
    ht = torch.tensor(hard_te)
    out = {}
    for tag, fit_rows in (("easy_to_hard", easy), ("hard_to_hard", hard_tr)):
        rt = torch.tensor(fit_rows)
        We, be, _ = fit(method, h.X[:, rt], h.y[rt], seed=seed, **_c(info))
        out[tag] = auroc(_scores(h.X[:, ht], We, be), h.y[ht])
    return out


def _fitter_rows(method: str, ds: ProbeSet, h: _Held, cfg: SweepConfig, ctrl, eh_rows) -> dict[str, dict]:
    """One fitter at every site: its held-out figures beside the shuffle null and the control task."""
    Xtr, ytr, Xte, yte = h.Xtr, h.ytr, h.Xte, h.yte
    kw = _fit_kwargs(method, ds, h.train, cfg.seed, cfg.cv_folds)
    W, b, info = fit(method, Xtr, ytr, **kw)
    s_tr, s_te = _scores(Xtr, W, b), _scores(Xte, W, b)
    thr = best_threshold(s_tr, ytr)
    test = auroc(s_te, yte)
    lo, hi = bootstrap_auroc(s_te, yte, cfg.n_boot, cfg.seed)
    nulls = _shuffle_null(method, h, info, cfg)
    control = _control_task(method, h, kw, ctrl)
    cv = _cv_auroc(method, ds, h, info, cfg)
    eh = _easy_to_hard(method, h, info, cfg.seed, eh_rows)
    per_site = {}
    for k, name in enumerate(h.names):
        row = {
            "train_auroc": float(auroc(s_tr[k], ytr)),
            "test_auroc": float(test[k]),
            "test_auroc_ci": [float(lo[k]), float(hi[k])],
            "balanced_accuracy": float(balanced_accuracy(s_te[k : k + 1], yte, thr[k : k + 1])[0]),
            "shuffle_mean": float(nulls[k].mean()),
            "shuffle_p95": float(torch.quantile(nulls[k], 0.95)),
            "shuffle_p": float((1 + (nulls[k] >= test[k]).sum()) / (1 + cfg.n_shuffle)),
            "control_auroc": float(control[k]),
            "selectivity": float(test[k] - control[k]),
            "direction_norm": float(W[k].norm()),
        }
        if "C" in info:
            row["C"] = info["C"][k]
        row["cv_auroc"] = float(cv[k])
        row.update({tag: float(v[k]) for tag, v in eh.items()})
        per_site[name] = row
    return per_site


def sweep_arrays(acts: dict[str, torch.Tensor], ds: ProbeSet, cfg: SweepConfig | None = None) -> dict:
    """Every number of the sweep from activations already read ({site: [N, d]}); no model needed."""
    cfg = cfg or SweepConfig()
    names = list(acts)
    split = group_split(ds, cfg.test_fraction, cfg.seed)
    h = _Held(names, torch.stack([acts[n].float() for n in names]), ds.y, split.train, split.test)
    ctrl = torch.tensor(control_labels(ds, cfg.seed))
    ctrl_ok = _both_classes(ctrl, split.train) and _both_classes(ctrl, split.test)
    rnd_mean, rnd_p95 = random_direction_control(h.Xtr, h.ytr, h.Xte, h.yte, cfg.n_random, cfg.seed)
    eh_rows = _easy_hard_rows(ds, h)
    results = {m: _fitter_rows(m, ds, h, cfg, ctrl if ctrl_ok else None, eh_rows) for m in cfg.fitters}
    out = {
        "dataset": ds.name,
        "dataset_sha256": ds.sha256,
        "n_rows": len(ds),
        "n_train": len(split.train),
        "n_test": len(split.test),
        "n_groups": len(set(ds.groups)),
        "n_entities": len(set(ds.entities)),
        "sites": names,
        "config": asdict(cfg),
        "control_task": "random label per entity" if ctrl_ok else "unavailable",
        "random_directions": {n: {"mean": float(rnd_mean[k]), "p95": float(rnd_p95[k])} for k, n in enumerate(names)},
        "results": results,
    }
    out.update(suggest(out, cfg))
    return out


def suggest(out: dict, cfg: SweepConfig) -> dict:
    """The best selective (fitter, site): see the module docstring; flagged when none is selective."""
    rnd = out["random_directions"]
    cands = [(m, n) for m in out["results"] for n in out["sites"] if n != EMBED]
    row = lambda c: out["results"][c[0]][c[1]]  # noqa: E731
    selective = [
        c
        for c in cands
        if row(c)["selectivity"] >= cfg.min_selectivity
        and row(c)["test_auroc"] > max(row(c)["shuffle_p95"], rnd[c[1]]["p95"])
    ]
    pool = selective or cands
    key = (lambda c: row(c)["cv_auroc"]) if selective else (lambda c: row(c)["selectivity"])
    best = max(pool, key=lambda c: key(c) if not math.isnan(key(c)) else -1.0)
    r = row(best)
    return {
        "best_site": best[1],
        "best_fitter": best[0],
        "best_auroc": r["test_auroc"],
        "best_auroc_ci": r["test_auroc_ci"],
        "best_selectivity": r["selectivity"],
        "best_is_selective": bool(selective),
        "selective": [f"{m}@{n}" for m, n in selective],
        "best_rule": (
            f"highest training-split CV AUROC among (fitter, site) with selectivity >= "
            f"{cfg.min_selectivity} and test AUROC above the shuffle and random-direction 95th "
            f"percentiles"
        ),
    }


def sweep(
    lm,
    ds: ProbeSet,
    sites: str | Sequence[str],
    read: ReadConfig | None = None,
    cfg: SweepConfig | None = None,
    *,
    cache=None,
    progress: bool = False,
) -> dict:
    """Read every site (plus the embedding layer) in one pass per batch, then `sweep_arrays`."""
    cfg = cfg or SweepConfig()
    read = read or ReadConfig()
    names = site_names(lm, sites, embed=True)
    group_split(ds, cfg.test_fraction, cfg.seed)  # a too-small dataset fails before any forward pass
    acts = read_activations(lm, ds, names, read, cache=cache, progress=progress)
    out = sweep_arrays(acts, ds, cfg)
    out.update(model=lm.name, read=asdict(read))
    return out


# --------------------------------------------------------------------------- transfer


def transfer(
    acts: dict[str, dict[str, torch.Tensor]],
    sets: dict[str, ProbeSet],
    site: str,
    method: str = "mean",
    seed: int = 0,
    test_fraction: float = 0.25,
) -> dict:
    """Train on A's training split, test on B's held-out split, at one site: AUROC matrix and recovered ratio."""
    names = list(sets)
    splits = {n: group_split(sets[n], test_fraction, seed) for n in names}
    mat: dict = {}
    for a in names:
        tr = torch.tensor(splits[a].train)
        Xa = acts[a][site][tr][None].float()
        W, b, _ = fit(method, Xa, sets[a].y[tr], seed=seed)
        mat[a] = {}
        for bname in names:
            te = torch.tensor(splits[bname].test)
            mat[a][bname] = float(auroc(_scores(acts[bname][site][te][None].float(), W, b)[0], sets[bname].y[te]))
    recovered = {a: {bn: mat[a][bn] / mat[bn][bn] for bn in names} for a in names}
    return {"site": site, "fitter": method, "auroc": mat, "recovered": recovered, "datasets": names}


# --------------------------------------------------------------------------- outputs


def save_json(out: dict, path: str | Path) -> Path:
    return atomic_write_text(path, json.dumps(out, indent=1))


def load_json(path: str | Path) -> dict:
    """A sweep written by `save_json` (`thoughtscope probe sweep --json`), checked for every key the table, the
    verdict and the plot read (`probes.report`, `plot`); anything else is a ProbeError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ProbeError(f"{path} not found: expected a sweep written by `thoughtscope probe sweep --json`")
    out = read_json(path, ProbeError, expect=None)  # _sweep_problem says what a sweep's root must be
    problem = _sweep_problem(out)
    if problem:
        raise ProbeError(f"{path}: {problem}; not a sweep written by `thoughtscope probe sweep --json`")
    return out


def _pair(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_num(x) for x in v)


def _sweep_problem(out) -> str | None:
    """What makes `out` unreadable as a sweep, in words; None when it is one."""
    if not isinstance(out, dict):
        return f"expected a JSON object, got {type(out).__name__}"
    for key, ok, expected in (
        ("dataset", lambda v: isinstance(v, str), "a name"),
        ("n_train", lambda v: _num(v) and not isinstance(v, float), "a row count"),
        ("n_test", lambda v: _num(v) and not isinstance(v, float), "a row count"),
        ("sites", lambda v: isinstance(v, list) and v and all(isinstance(n, str) for n in v), "a list of sites"),
        ("results", lambda v: isinstance(v, dict) and v and all(isinstance(r, dict) for r in v.values()), "fitters"),
        ("random_directions", lambda v: isinstance(v, dict), "an object"),
        ("best_site", lambda v: isinstance(v, str), "a site"),
        ("best_fitter", lambda v: isinstance(v, str), "a fitter"),
        ("best_auroc", _num, "a number"),
        ("best_auroc_ci", _pair, "two numbers"),
        ("best_selectivity", _num, "a number"),
        ("best_is_selective", lambda v: isinstance(v, bool), "true or false"),
        ("model", lambda v: v is None or isinstance(v, str), "a model name"),
    ):
        v = out.get(key)
        if (key != "model" or key in out) and not ok(v):
            return f"{key!r} is {v!r:.60}, expected {expected}"
    if out["best_fitter"] not in out["results"]:
        return f"best_fitter {out['best_fitter']!r:.60} is not one of the results' fitters"
    for n in out["sites"]:
        rd = out["random_directions"].get(n)
        if not isinstance(rd, dict) or not _num(rd.get("p95")):
            return f"random_directions lacks site {n!r:.60} (with its p95)"
        for m, rows in out["results"].items():
            r = rows.get(n)
            if not isinstance(r, dict):
                return f"results[{m!r:.40}] lacks site {n!r:.60}"
            for k in ("test_auroc", "control_auroc", "shuffle_p95", "selectivity"):
                if not _num(r.get(k)):
                    return f"results[{m!r:.40}][{n!r:.40}][{k!r}] is {r.get(k)!r:.40}, expected a number"
            if not _pair(r.get("test_auroc_ci")):
                return f"results[{m!r:.40}][{n!r:.40}]['test_auroc_ci'] is not two numbers"
    return None


def plot(out: dict, path: str | Path) -> Path:
    """Test AUROC per site for every fitter, the primary fitter's CI band and its controls."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = out["sites"]
    xs = list(range(len(names)))
    primary = out["best_fitter"]
    fig, ax = plt.subplots(figsize=(max(7, 0.32 * len(names)), 4.2))
    for k, (method, rows) in enumerate(out["results"].items()):
        c = f"C{k}"
        ax.plot(
            xs,
            [rows[n]["test_auroc"] for n in names],
            marker="o",
            ms=3,
            lw=2 if method == primary else 1,
            c=c,
            label=f"{method} (held-out)",
        )
        ax.plot(
            xs,
            [rows[n]["control_auroc"] for n in names],
            ls="--",
            lw=0.9,
            c=c,
            alpha=0.8,
            label=f"{method} control task",
        )
    rows = out["results"][primary]
    ax.fill_between(
        xs,
        [rows[n]["test_auroc_ci"][0] for n in names],
        [rows[n]["test_auroc_ci"][1] for n in names],
        alpha=0.15,
        color=f"C{list(out['results']).index(primary)}",
        label=f"{primary} 95% CI",
    )
    ax.plot(xs, [rows[n]["shuffle_p95"] for n in names], ls=":", c="black", label="label-shuffle p95")
    ax.plot(xs, [out["random_directions"][n]["p95"] for n in names], ls="-.", c="tab:red", label="random dir p95")
    ax.axhline(0.5, c="lightgrey", lw=0.8)
    if out.get("best_site") in names:
        ax.axvline(names.index(out["best_site"]), c="green", lw=0.8, alpha=0.6)
    ax.set_xticks(xs, [n.replace("resid.", "") for n in names], fontsize=7)
    ax.set_xlabel("site (embed, then resid.L)")
    ax.set_ylabel("AUROC")
    ax.set_ylim(0.3, 1.02)
    flag = "" if out.get("best_is_selective", True) else " (NOT selective: no pair passed the rule)"
    ax.set_title(
        f"{out['dataset']} on {out.get('model', '?')}: suggested {out['best_fitter']} @ {out['best_site']}, "
        f"AUROC {out['best_auroc']:.3f}, selectivity {out['best_selectivity']:+.2f}{flag}",
        fontsize=9,
    )
    ax.legend(fontsize=6.5, ncol=3, loc="lower right")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    finally:
        plt.close(fig)
