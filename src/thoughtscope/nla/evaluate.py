"""Held-out evaluation of an NLA against a ladder of baselines.

FVE (fraction of variance explained), as published: rescale every vector to norm √d, then

    FVE = 1 − MSE(p̂, ĝ) / Var,   MSE = mean over rows and coordinates of (p̂ − ĝ)²,
    Var = mean over rows and coordinates of (ĝ − μ)² = 1 − ‖μ̄‖²,

where μ is the mean of the normalised gold vectors *of the evaluated set* (not re-normalised) and μ̄ = μ/√d
is the mean unit direction. Predicting μ gives FVE = 0 exactly; a perfect reconstruction gives 1.
The AR's output is rescaled to √d before scoring (its norm is not trained); the non-NLA baselines
predict on the normalised scale and are scored as they are, so they may shrink towards μ.
Confidence intervals are percentile bootstraps over *documents* (rows of one document are correlated),
recomputing μ and Var inside every resample.

The ladder (each a `baselines` entry, name → FVE):
  mean                 predict μ (0 by construction)
  empty                the AR given an empty explanation (what the template alone carries)
  shuffled             vectors shuffled across rows → AV → AR, scored against the true vectors
  token_mean           per-token-id mean of the training vectors (the explanation "names the token")
  ridge_k1/k4/k16      ridge regression from the bag of the last k context tokens (sees the true text)
  oracle               the AR fed the warm-start explanation written from the true text (a ceiling for
                       what the AV could say in this format)
  raw_last16           the untrained truncated target reading the true last 16 tokens (no NLA at all)
  warm_start           round trip through the supervised (warm-start) AV and AR, when they are saved
  rl_before_refit      the final AV's explanations read by the AR as RL left it (before `ar-refit`)
plus the quote analysis: share of quoted spans found verbatim in the context, FVE with quotes stripped.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .._io import atomic_write_text
from .core import NLAError, normalise
from .data import DataConfig, NLARows, harvest_rows

QUOTE_RE = re.compile(r'"([^"]{2,})"')


# ------------------------------------------------------------------------- metric


def fve_parts(
    pred: torch.Tensor, gold: torch.Tensor, *, renormalise: bool = True, mu: torch.Tensor | None = None
) -> dict:
    """FVE, MSE and Var (definitions in the module docstring) for one set.

    renormalise=True rescales the prediction to √d too (right for the AR, whose output norm is not
    trained); baselines that already predict on the normalised scale pass False, which lets them shrink
    towards μ (the MSE-optimal thing to do) — so "predict μ" scores exactly 0. mu: use this mean (on the
    normalised scale, e.g. a larger set's) instead of the mean of `gold`.
    """
    g = normalise(gold.double())
    p = normalise(pred.double()) if renormalise else pred.double()
    mu = g.mean(0) if mu is None else mu.double()
    var = float((g - mu).pow(2).mean())
    mse = float((p - g).pow(2).mean())
    return {
        "fve": 1 - mse / var if var > 0 else float("nan"),
        "mse": mse,
        "var": var,
        "mu_sq_unit": float(mu.pow(2).sum() / g.shape[-1]),
    }


def fve(pred: torch.Tensor, gold: torch.Tensor, *, renormalise: bool = True, mu: torch.Tensor | None = None) -> float:
    return fve_parts(pred, gold, renormalise=renormalise, mu=mu)["fve"]


def bootstrap_ci(
    pred: torch.Tensor,
    gold: torch.Tensor,
    groups: torch.Tensor | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    renormalise: bool = True,
    minus: torch.Tensor | None = None,
) -> tuple[float, float]:
    """Percentile CI of FVE, resampling groups (documents) with replacement; μ and Var recomputed each time.

    With `minus` (another prediction, on the same scale as `pred`), the CI of FVE(pred) − FVE(minus) on the
    same resampled documents: a paired comparison, much tighter than comparing two separate CIs because
    both predictions see the same hard and easy documents.
    """
    g = normalise(gold.double())
    p = normalise(pred.double()) if renormalise else pred.double()
    n = g.shape[0]
    groups = torch.arange(n) if groups is None else torch.as_tensor(groups)
    uniq, inv = torch.unique(groups, return_inverse=True)
    members = [torch.nonzero(inv == i).flatten() for i in range(len(uniq))]
    gen = torch.Generator().manual_seed(seed)
    err = (p - g).pow(2).mean(-1)  # per-row MSE
    if minus is not None:
        q = normalise(minus.double()) if renormalise else minus.double()
        err_ref = (q - g).pow(2).mean(-1)
    vals = []
    for _ in range(n_boot):
        pick = torch.randint(len(members), (len(members),), generator=gen)
        idx = torch.cat([members[i] for i in pick.tolist()])
        gg = g[idx]
        var = float((gg - gg.mean(0)).pow(2).mean())
        if var > 0:
            if minus is None:
                vals.append(1 - float(err[idx].mean()) / var)
            else:
                vals.append(float(err_ref[idx].mean() - err[idx].mean()) / var)
    vals = torch.tensor(vals)
    return float(vals.quantile(alpha / 2)), float(vals.quantile(1 - alpha / 2))


# rungs the honest bar asks the round trip to beat (everything up to the per-token mean and the regressions)
BAR_RUNGS = ("mean", "empty", "shuffled", "token_mean", "ridge_k1", "ridge_k4", "ridge_k16")


# ------------------------------------------------------------------------- baselines without an NLA


def token_mean_predict(train_tok: torch.Tensor, train_vec: torch.Tensor, test_tok: torch.Tensor) -> torch.Tensor:
    """Mean normalised training vector of each token id; the global mean for unseen ids."""
    tv = normalise(train_vec.double())
    glob = tv.mean(0)
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    for t, v in zip(train_tok.tolist(), tv):
        sums[t] = sums.get(t, 0) + v
        counts[t] = counts.get(t, 0) + 1
    return torch.stack([sums[t] / counts[t] if t in sums else glob for t in test_tok.tolist()]).float()


def _bag(ctx: torch.Tensor, k: int, vocab: dict[int, int]) -> torch.Tensor:
    X = torch.zeros(ctx.shape[0], len(vocab) + 1, dtype=torch.float64)
    X[:, -1] = 1.0  # intercept
    for i, row in enumerate(ctx[:, -k:].tolist()):
        for t in row:
            j = vocab.get(t)
            if t >= 0 and j is not None:
                X[i, j] += 1.0
    return X


def ridge_predict(
    train_ctx: torch.Tensor,
    train_vec: torch.Tensor,
    test_ctx: torch.Tensor,
    k: int,
    *,
    val_ctx: torch.Tensor | None = None,
    val_vec: torch.Tensor | None = None,
    lambdas: Sequence[float] = (0.1, 1.0, 10.0, 100.0),
) -> tuple[torch.Tensor, float]:
    """Ridge regression from the bag of the last k context tokens to the normalised vector.

    Solved in the dual (n_train × n_train), since the bag vocabulary is larger than the training set;
    λ is picked on the validation rows when given.
    """
    vocab: dict[int, int] = {}
    for t in train_ctx[:, -k:].flatten().tolist():
        if t >= 0 and t not in vocab:
            vocab[t] = len(vocab)
    X = _bag(train_ctx, k, vocab)
    Y = normalise(train_vec.double())
    K = X @ X.T
    eye = torch.eye(K.shape[0], dtype=torch.float64)

    def fit(lam):
        alpha = torch.linalg.solve(K + lam * eye, Y)
        return X.T @ alpha  # primal weights [V+1, d]

    best = lambdas[len(lambdas) // 2]
    if val_ctx is not None and val_vec is not None and len(val_ctx):
        Xv = _bag(val_ctx, k, vocab)
        scores = {lam: fve(Xv @ fit(lam), val_vec, renormalise=False) for lam in lambdas}
        best = max(scores, key=scores.get)
    W = fit(best)
    return (_bag(test_ctx, k, vocab) @ W).float(), best


def strip_quotes(text: str) -> str:
    return QUOTE_RE.sub('""', text)


def quote_analysis(explanations: Sequence[str], contexts: Sequence[str]) -> dict:
    """How many quoted spans the explanations contain and what share occurs verbatim in the context."""
    n, hits = 0, 0
    for e, c in zip(explanations, contexts):
        for q in QUOTE_RE.findall(e):
            n += 1
            q_norm = q.replace("\\n", "\n")
            hits += q_norm in c or q_norm.strip() in c
    return {
        "n_quotes": n,
        "quotes_per_explanation": n / max(1, len(explanations)),
        "quote_verbatim_share": hits / n if n else float("nan"),
    }


# ------------------------------------------------------------------------- the evaluation


def _round_trip(nla, vectors: torch.Tensor, batch: int = 16) -> list[str]:
    out: list[str] = []
    for i in range(0, vectors.shape[0], batch):
        out += nla.explain(vectors[i : i + batch])
    return out


def _ar(nla, texts: Sequence[str], allow_empty: bool = False) -> torch.Tensor:
    """AR predictions rescaled to √d (the AR is trained on direction only)."""
    nla.ar.eval()
    safe = [t if (t.strip() or allow_empty) else "" for t in texts]
    return normalise(nla.ar.predict(safe, allow_empty=True, truncate=True))


def quick_rows(
    lm, *, n_test: int = 48, n_train: int = 400, n_val: int = 48, seed: int = 42, corpus: str = "default", **kw
) -> tuple[NLARows, NLARows, NLARows]:
    """Small held-out (test-split) and training-split rows harvested on the fly, same document split as `nla data`."""

    def get(split: int, n: int) -> NLARows:
        return harvest_rows(lm, DataConfig(corpus=corpus, n_rows=n, seed=seed, only_split=split, **kw), progress=False)

    return get(2, n_test), get(0, n_train), get(1, n_val)


def evaluate_nla(
    nla="default",
    data: str | os.PathLike | NLARows | None = None,
    *,
    quick: bool = True,
    n_test: int | None = None,
    json_path: str | os.PathLike | None = None,
    lm=None,
    seed: int = 0,
    n_boot: int = 1000,
    warm: bool = True,
    progress: bool = True,
    compare: dict[str, object] | None = None,
) -> dict:
    """`thoughtscope nla eval`: held-out FVE with a bootstrap CI and the baseline ladder.

    nla: an NLA object, a folder, or "default" (the shipped NLA). data: an `nla data` folder (its test
    split is evaluated, its train/val splits fit the baselines); without it, rows are harvested on the
    fly from the default corpus with the same document split. quick: a small test set (48 rows) so the
    whole evaluation runs in a few minutes on 2 CPU cores. Writes JSON to json_path when given.
    compare: other NLAs (name → folder or NLA, same target model) whose round trips on the same held-out
    vectors become extra rungs, with paired CIs — e.g. a checkpoint, or a warm start given the same refit.
    """
    from .bundle import NLA, RL_AR_FILE, WARM_AV_FILE
    from .explain import load_nla

    t0 = time.time()
    say = (lambda m: print(f"[nla eval {time.time() - t0:5.0f}s] {m}", flush=True)) if progress else (lambda m: None)
    if not isinstance(nla, NLA):
        nla = load_nla(nla, lm=lm)
    lm = nla.lm
    if data is None:
        say("harvesting held-out and training rows")
        n = n_test or (48 if quick else 200)
        recipe = nla.cfg.extra.get("data_config", {})
        dc = {
            k: recipe[k]
            for k in ("min_position", "max_position", "positions_per_doc", "ascii_only", "max_explanation_tokens")
            if k in recipe
        }
        if "split" in recipe:
            dc["split"] = tuple(recipe["split"])
        shipped = Path(nla.path) / BASELINE_FILE if nla.path is not None else None
        if shipped is not None and shipped.is_file():
            # the training rows shipped with the NLA fit the baselines: only the held-out rows are harvested
            train, val = load_baseline_rows(shipped)
            test = harvest_rows(
                lm,
                DataConfig(
                    n_rows=n, seed=recipe.get("seed", 42), only_split=2, corpus=recipe.get("corpus", "default"), **dc
                ),
                progress=False,
            )
        else:
            test, train, val = quick_rows(
                lm,
                n_test=n,
                n_train=400 if quick else 2000,
                n_val=48,
                seed=recipe.get("seed", 42),
                corpus=recipe.get("corpus", "default"),
                **dc,
            )
        data_desc = {
            "source": "test split harvested on the fly with the NLA's data recipe",
            "recipe": dc,
            "baseline_rows": "shipped with the NLA" if shipped is not None and shipped.is_file() else "harvested",
        }
    else:
        rows = data if isinstance(data, NLARows) else NLARows.load(data)
        if rows.meta.get("site") not in (None, nla.cfg.site):
            raise NLAError(f"dataset site {rows.meta.get('site')} differs from the NLA's site {nla.cfg.site}")
        test, train, val = rows.subset("test"), rows.subset("train"), rows.subset("val")
        n = n_test or (48 if quick else len(test))
        test = test.subset(torch.arange(min(n, len(test))))
        data_desc = {"source": str(data) if not isinstance(data, NLARows) else "in-memory"}
    if len(test) == 0 or len(train) == 0:
        raise NLAError("evaluation needs test rows and training rows (for the baselines)")
    gold, groups = test.vectors, test.doc_id
    res: dict = {
        "n_test": len(test),
        "n_train_baselines": len(train),
        "n_docs_test": int(groups.unique().numel()),
        "site": nla.cfg.site,
        "model": nla.cfg.model,
        "warm_start": nla.cfg.warm_start,
        "data": data_desc,
        "definition": "FVE = 1 - MSE/Var on vectors rescaled to sqrt(d); "
        "Var = 1 - |mean unit direction|^2 of the test set; 95% CI: bootstrap over documents",
    }
    preds: dict[str, torch.Tensor] = {}

    say(f"round trip on {len(test)} held-out vectors")
    expl = _round_trip(nla, gold)
    preds["nla"] = _ar(nla, expl)
    parts = fve_parts(preds["nla"], gold, renormalise=False)
    res.update(fve=parts["fve"], var=parts["var"], mse=parts["mse"])
    res["fve_ci"] = list(bootstrap_ci(preds["nla"], gold, groups, n_boot=n_boot, seed=seed, renormalise=False))
    res["examples"] = [{"context": c[-120:], "explanation": e} for c, e in zip(test.contexts[:5], expl[:5])]
    res["mean_explanation_tokens"] = sum(len(lm.tokenizer(e)["input_ids"]) for e in expl) / len(expl)

    preds["mean"] = normalise(gold.double()).mean(0).expand_as(gold).float()
    say("baselines: empty, shuffled")
    preds["empty"] = _ar(nla, [""] * len(test), allow_empty=True)
    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed + 1))
    preds["shuffled"] = _ar(nla, _round_trip(nla, gold[perm]))
    say("baselines: token mean, ridge")
    preds["token_mean"] = token_mean_predict(train.token_id, train.vectors, test.token_id)
    ridge_lambda = {}
    for k in (1, 4, 16):
        preds[f"ridge_k{k}"], ridge_lambda[k] = ridge_predict(
            train.context_ids, train.vectors, test.context_ids, k, val_ctx=val.context_ids, val_vec=val.vectors
        )
    say("baselines: oracle text")
    preds["oracle"] = _ar(nla, test.explanations)
    preds["raw_last16"] = normalise(raw_context_predict(nla, test))
    if warm and nla.path is not None and (Path(nla.path) / WARM_AV_FILE).is_file():
        say("warm-start round trip")
        warm_nla = NLA.load(nla.path, lm=lm, which="warm")
        preds["warm_start"] = _ar(warm_nla, _round_trip(warm_nla, gold))
        del warm_nla
    if nla.path is not None and (Path(nla.path) / RL_AR_FILE).is_file():
        say("the AR before its refit, on the same explanations")
        rl_nla = NLA.load(nla.path, lm=lm, which="rl")
        preds["rl_before_refit"] = _ar(rl_nla, expl)
        del rl_nla
    for name, other in (compare or {}).items():
        if name in preds:
            raise NLAError(f"comparison name {name!r} is already a rung of the ladder; pick another")
        say(f"round trip through {name}")
        other = other if isinstance(other, NLA) else NLA.load(other, lm=lm)
        if other.cfg.site != nla.cfg.site or other.cfg.model != nla.cfg.model:
            raise NLAError(
                f"{name} reads {other.cfg.model} at {other.cfg.site}; this NLA reads {nla.cfg.model} at {nla.cfg.site}"
            )
        preds[name] = _ar(other, _round_trip(other, gold))
        del other
    res["baselines"] = {k: fve(p, gold, renormalise=False) for k, p in preds.items() if k != "nla"}
    res["baselines_ci"] = {
        k: list(bootstrap_ci(p, gold, groups, n_boot=n_boot, seed=seed, renormalise=False))
        for k, p in preds.items()
        if k != "nla"
    }
    res["ridge_lambda"] = ridge_lambda

    def paired(a: str, b: str) -> dict:
        """FVE(a) − FVE(b) with its CI, both scored on the same resampled documents."""
        fa = res["fve"] if a == "nla" else res["baselines"][a]
        return {
            "diff": fa - res["baselines"][b],
            "ci": list(
                bootstrap_ci(preds[a], gold, groups, n_boot=n_boot, seed=seed, renormalise=False, minus=preds[b])
            ),
        }

    res["nla_minus_baseline"] = {k: paired("nla", k) for k in preds if k != "nla"}
    beats = {k: res["nla_minus_baseline"][k]["ci"][0] > 0 for k in BAR_RUNGS if k in res["nla_minus_baseline"]}
    warm_gap = res["nla_minus_baseline"].get("warm_start")
    res["bar"] = {
        "beats_outside_paired_ci": beats,
        "beats_outside_baseline_ci": {k: res["fve"] > res["baselines_ci"][k][1] for k in beats},
        "rl_beats_warm_start": warm_gap["diff"] > 0 if warm_gap else None,
        "rl_beats_warm_start_outside_paired_ci": warm_gap["ci"][0] > 0 if warm_gap else None,
    }
    if "rl_before_refit" in preds and "warm_start" in preds:
        # the RL stage on its own, both sides without a refit: its gain over the warm start on the same documents
        res["rl_before_refit_minus_warm_start"] = paired("rl_before_refit", "warm_start")
        res["bar"]["rl_stage_beats_warm_start_outside_paired_ci"] = res["rl_before_refit_minus_warm_start"]["ci"][0] > 0
    say("quote analysis")
    qa = quote_analysis(expl, test.contexts)
    res.update(qa)
    res["fve_quotes_stripped"] = fve(
        _ar(nla, [strip_quotes(e) for e in expl], allow_empty=True), gold, renormalise=False
    )
    res["oracle_quote_verbatim_share"] = quote_analysis(test.explanations, test.contexts)["quote_verbatim_share"]
    res["seconds"] = round(time.time() - t0, 1)
    if json_path:
        atomic_write_text(Path(json_path), json.dumps(res, indent=2, default=float))
    say(f"FVE {res['fve']:.3f} [{res['fve_ci'][0]:.3f}, {res['fve_ci'][1]:.3f}]")
    return res


BASELINE_FILE = "baseline_rows.safetensors"


def save_baseline_rows(rows: NLARows, path: str | os.PathLike) -> None:
    """Keep what the baselines need from the training and validation rows (normalised vectors in fp16)."""
    from .._io import atomic_save_tensors

    keep = (rows.split == 0) | (rows.split == 1)
    atomic_save_tensors(
        {
            "vectors": normalise(rows.vectors[keep]).half(),
            "token_id": rows.token_id[keep],
            "context_ids": rows.context_ids[keep],
            "split": rows.split[keep],
        },
        Path(path),
    )


def load_baseline_rows(path: str | os.PathLike) -> tuple[NLARows, NLARows]:
    from safetensors.torch import load_file

    t = load_file(str(path))
    n = t["vectors"].shape[0]
    rows = NLARows(
        t["vectors"].float(),
        torch.full((n,), -1),
        torch.zeros(n, dtype=torch.long),
        t["token_id"],
        t["split"],
        t["context_ids"],
        [""] * n,
        [""] * n,
        {},
    )
    return rows.subset("train"), rows.subset("val")


def raw_context_predict(nla, rows: NLARows, k: int = 16) -> torch.Tensor:
    """The target itself (truncated, identity head, no training) reading only the last k true tokens."""
    from thoughtscope.models import capture

    lm = nla.lm
    bos = lm.tokenizer.bos_token_id
    out = []
    for ctx in rows.context_ids[:, -k:].tolist():
        ids = ([bos] if bos is not None else []) + [t for t in ctx if t >= 0]
        x = torch.tensor([ids], device=lm.device)
        h = next(iter(capture(lm, nla.cfg.site, x).values()))
        out.append(h[0, -1].float().cpu())
    return torch.stack(out)


def format_table(res: dict) -> str:
    """A markdown table of the ladder, for docs and the CLI."""
    lines = ["| rung | FVE | 95% CI | NLA − rung, paired 95% CI |", "|---|---|---|---|"]
    ci = res.get("baselines_ci", {})
    diff = res.get("nla_minus_baseline", {})
    order = [
        "mean",
        "empty",
        "shuffled",
        "token_mean",
        "ridge_k1",
        "ridge_k4",
        "ridge_k16",
        "warm_start",
        "rl_before_refit",
        "oracle",
        "raw_last16",
    ]
    for k in order + [k for k in res.get("baselines", {}) if k not in order]:
        if k in res.get("baselines", {}):
            lo, hi = ci.get(k, (math.nan, math.nan))
            d = diff.get(k)
            dcol = f"{d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" if d else ""
            lines.append(f"| {k} | {res['baselines'][k]:.3f} | [{lo:.3f}, {hi:.3f}] | {dcol} |")
    lines.append(f"| **NLA round trip** | **{res['fve']:.3f}** | [{res['fve_ci'][0]:.3f}, {res['fve_ci'][1]:.3f}] | |")
    return "\n".join(lines)
