"""Held-out evaluation of an NLA against a ladder of baselines.

Scores are FVE with percentile-bootstrap CIs over documents (definitions in `metric.py`).
The AR's output is rescaled to √d before scoring (its norm is not trained); the non-NLA baselines
predict on the normalised scale and are scored as they are, so they may shrink towards μ.

The ladder (each a `baselines` entry, name → FVE):
  mean                 predict μ (0 by construction)
  empty                the AR given an empty explanation (what the template alone carries)
  shuffled             vectors shuffled across rows → AV → AR, scored against the true vectors
  token_mean           per-token-id mean of the training vectors (the explanation "names the token")
  token_only           the AR given only the current token's clause (`Token: <token>`, as the warm-start text
                       ends): what naming the token in words carries through this AR
  ridge_k1/k4/k16      ridge regression from the bag of the last k context tokens (sees the true text)
  oracle               the AR fed the warm-start explanation written from the true text (a ceiling for
                       what the AV could say in this format)
  raw_last16           the untrained truncated target reading the true last 16 tokens (no NLA at all)
  warm_start           round trip through the supervised (warm-start) AV and AR, when they are saved
  rl_before_refit      the final AV's explanations read by the AR as RL left it (before `ar-refit`)
  warm_start_refit     the warm AV's round trip read by the warm AR given the same refit (`ar-refit-warm`,
                       warm_refit_ar.safetensors): the control that separates RL's gain from the refit's
plus the quote analysis (share of quoted spans found verbatim in the context, FVE with quotes stripped), the
prose share of the explanations (`prose.py`), and `rl_vs_warm_start_refit` (paired NLA − warm_start_refit, or
why it is missing).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .._io import atomic_write_text
from .baselines import (
    BASELINE_FILE,
    QUOTE_RE,
    load_baseline_rows,
    quote_analysis,
    raw_context_predict,
    ridge_predict,
    save_baseline_rows,
    strip_quotes,
    token_mean_predict,
)
from .core import NLAError, normalise
from .data import DataConfig, NLARows, harvest_rows
from .metric import bootstrap_ci, fve, fve_parts
from .prose import is_prose, prose_share
from .warm_start import token_clause

__all__ = [
    "BAR_RUNGS",
    "BASELINE_FILE",
    "QUOTE_RE",
    "bootstrap_ci",
    "evaluate_nla",
    "format_table",
    "fve",
    "fve_parts",
    "load_baseline_rows",
    "prose_share",
    "quick_rows",
    "quote_analysis",
    "raw_context_predict",
    "ridge_predict",
    "save_baseline_rows",
    "strip_quotes",
    "token_mean_predict",
]

# rungs the honest bar asks the round trip to beat (everything up to the per-token mean and the regressions)
BAR_RUNGS = ("mean", "empty", "shuffled", "token_mean", "token_only", "ridge_k1", "ridge_k4", "ridge_k16")


# ------------------------------------------------------------------------- the evaluation


def _round_trip(nla, vectors: torch.Tensor) -> list[str]:
    out: list[str] = []
    per_batch = nla.vectors_per_batch(on_cpu=16)
    for i in range(0, vectors.shape[0], per_batch):
        out += nla.explain(vectors[i : i + per_batch])
    return out


def _ar(nla, texts: Sequence[str], allow_empty: bool = False) -> torch.Tensor:
    """AR predictions rescaled to √d (the AR is trained on direction only)."""
    nla.ar.eval()
    safe = [t if (t.strip() or allow_empty) else "" for t in texts]
    return normalise(nla.ar.predict(safe, allow_empty=True, truncate=True))


def random_examples(test: NLARows, expl: Sequence[str], pred: torch.Tensor, tokenizer, *, n: int, seed: int) -> list:
    """`n` held-out rows drawn at random (a fixed seed, never picked by score), in test order: the end of each
    context, the token it ends on, the NLA's explanation, its round-trip cosine and whether it reads as prose."""
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed + 7))[:n].sort().values.tolist()
    cos = torch.nn.functional.cosine_similarity(pred.double(), test.vectors.double(), dim=-1)
    return [
        {
            "row": i,
            "context": test.contexts[i][-120:],
            "token": tokenizer.decode([int(test.token_id[i])]),
            "explanation": expl[i],
            "cos": float(cos[i]),
            "prose": is_prose(expl[i]),
        }
        for i in pick
    ]


def quick_rows(
    lm, *, n_test: int = 48, n_train: int = 400, n_val: int = 48, seed: int = 42, corpus: str = "default", **kw
) -> tuple[NLARows, NLARows, NLARows]:
    """Small held-out (test-split) and training-split rows harvested on the fly, same document split as `nla data`."""

    def get(split: int, n: int) -> NLARows:
        return harvest_rows(lm, DataConfig(corpus=corpus, n_rows=n, seed=seed, only_split=split, **kw), progress=False)

    return get(2, n_test), get(0, n_train), get(1, n_val)


def _recipe_rows(nla, quick: bool, n_test: int | None, say) -> tuple[NLARows, NLARows, NLARows, dict]:
    """Held-out rows harvested with the NLA's own data recipe (and split), and training rows for the baselines:
    those shipped with the NLA when it has them, else harvested too."""
    lm = nla.lm
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
    seed, corpus = recipe.get("seed", 42), recipe.get("corpus", "default")
    shipped = Path(nla.path) / BASELINE_FILE if nla.path is not None else None
    if shipped is not None and shipped.is_file():
        # the training rows shipped with the NLA fit the baselines: only the held-out rows are harvested
        train, val = load_baseline_rows(shipped)
        test = harvest_rows(lm, DataConfig(n_rows=n, seed=seed, only_split=2, corpus=corpus, **dc), progress=False)
    else:
        test, train, val = quick_rows(
            lm, n_test=n, n_train=400 if quick else 2000, n_val=48, seed=seed, corpus=corpus, **dc
        )
    data_desc = {
        "source": "test split harvested on the fly with the NLA's data recipe",
        "recipe": dc,
        "baseline_rows": "shipped with the NLA" if shipped is not None and shipped.is_file() else "harvested",
    }
    return test, train, val, data_desc


def _dataset_rows(nla, data, quick: bool, n_test: int | None) -> tuple[NLARows, NLARows, NLARows, dict]:
    """The test split of an `nla data` folder (or rows in memory), its train and val splits for the baselines."""
    rows = data if isinstance(data, NLARows) else NLARows.load(data)
    if rows.meta.get("site") not in (None, nla.cfg.site):
        raise NLAError(f"dataset site {rows.meta.get('site')} differs from the NLA's site {nla.cfg.site}")
    test, train, val = rows.subset("test"), rows.subset("train"), rows.subset("val")
    n = n_test or (48 if quick else len(test))
    test = test.subset(torch.arange(min(n, len(test))))
    return test, train, val, {"source": str(data) if not isinstance(data, NLARows) else "in-memory"}


def _header(nla, test: NLARows, train: NLARows, data_desc: dict) -> dict:
    return {
        "n_test": len(test),
        "n_train_baselines": len(train),
        "n_docs_test": int(test.doc_id.unique().numel()),
        "site": nla.cfg.site,
        "model": nla.cfg.model,
        "warm_start": nla.cfg.warm_start,
        "data": data_desc,
        "definition": "FVE = 1 - MSE/Var on vectors rescaled to sqrt(d); "
        "Var = 1 - |mean unit direction|^2 of the test set; 95% CI: bootstrap over documents",
    }


def _nla_round_trip(nla, test: NLARows, res: dict, *, n_boot: int, seed: int, n_examples: int, say):
    """The NLA's own round trip on the held-out vectors: its explanations and (√d-scaled) reconstructions, with
    FVE, its CI, random examples and the mean explanation length recorded in `res`."""
    gold, groups = test.vectors, test.doc_id
    say(f"round trip on {len(test)} held-out vectors")
    expl = _round_trip(nla, gold)
    pred = _ar(nla, expl)
    parts = fve_parts(pred, gold, renormalise=False)
    res.update(fve=parts["fve"], var=parts["var"], mse=parts["mse"])
    res["fve_ci"] = list(bootstrap_ci(pred, gold, groups, n_boot=n_boot, seed=seed, renormalise=False))
    res["examples"] = random_examples(test, expl, pred, nla.lm.tokenizer, n=n_examples, seed=seed)
    res["mean_explanation_tokens"] = sum(len(nla.lm.tokenizer(e)["input_ids"]) for e in expl) / len(expl)
    return expl, pred


def _text_rungs(nla, test: NLARows, train: NLARows, val: NLARows, preds: dict, *, seed: int, say) -> dict:
    """The rungs that need no other NLA weights (mean … raw_last16) into `preds`; the ridge λ chosen per k."""
    gold, tokenizer = test.vectors, nla.lm.tokenizer
    preds["mean"] = normalise(gold.double()).mean(0).expand_as(gold).float()
    say("baselines: empty, shuffled")
    preds["empty"] = _ar(nla, [""] * len(test), allow_empty=True)
    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed + 1))
    preds["shuffled"] = _ar(nla, _round_trip(nla, gold[perm]))
    say("baselines: token mean, ridge")
    preds["token_mean"] = token_mean_predict(train.token_id, train.vectors, test.token_id)
    preds["token_only"] = _ar(nla, [token_clause(tokenizer.decode([int(t)])) for t in test.token_id])
    ridge_lambda = {}
    for k in (1, 4, 16):
        preds[f"ridge_k{k}"], ridge_lambda[k] = ridge_predict(
            train.context_ids, train.vectors, test.context_ids, k, val_ctx=val.context_ids, val_vec=val.vectors
        )
    say("baselines: oracle text")
    preds["oracle"] = _ar(nla, test.explanations)
    preds["raw_last16"] = normalise(raw_context_predict(nla, test))
    return ridge_lambda


def _refit_missing(folder: Path | None, warm: bool) -> str | None:
    """Why the warm-start-given-the-same-refit rung cannot be read from the NLA folder (None: it can)."""
    from .bundle import WARM_AR_FILE, WARM_AV_FILE, WARM_REFIT_AR_FILE

    make = f"thoughtscope nla train --nla {folder or 'NLA_FOLDER'} --data DATA --stage ar-refit-warm"
    if not warm:
        return "warm rungs switched off (warm=False)"
    if folder is None:
        return f"the NLA has no folder to hold {WARM_REFIT_AR_FILE}"
    if not (folder / WARM_AV_FILE).is_file() or not (folder / WARM_AR_FILE).is_file():
        return f"no warm start ({WARM_AV_FILE}, {WARM_AR_FILE}) in the NLA folder to refit"
    if not (folder / WARM_REFIT_AR_FILE).is_file():
        return (
            f"{WARM_REFIT_AR_FILE} not in the NLA folder; make it with: {make} "
            "(DATA: the `nla data` folder the NLA was trained on)"
        )
    return None


def _saved_rungs(nla, gold: torch.Tensor, expl: list[str], preds: dict, *, warm: bool, say):
    """The rungs read from the NLA folder's other weights (warm start, its refit control, the AR before the
    refit) into `preds`; (the warm AV's explanations or None, why the refit control is missing or None)."""
    from .bundle import NLA, RL_AR_FILE, WARM_AV_FILE

    lm = nla.lm
    folder = Path(nla.path) if nla.path is not None else None
    warm_expl: list[str] | None = None
    if warm and folder is not None and (folder / WARM_AV_FILE).is_file():
        say("warm-start round trip")
        warm_nla = NLA.load(folder, lm=lm, which="warm")
        warm_expl = _round_trip(warm_nla, gold)
        preds["warm_start"] = _ar(warm_nla, warm_expl)
        del warm_nla
    # the control: the warm AV's explanations read by the warm AR given the same refit as the final one
    refit_missing = _refit_missing(folder, warm)
    if refit_missing is None:
        say("the warm start given the same refit")
        refit_nla = NLA.load(folder, lm=lm, which="warm_refit")
        preds["warm_start_refit"] = _ar(refit_nla, warm_expl)
        del refit_nla
    if folder is not None and (folder / RL_AR_FILE).is_file():
        say("the AR before its refit, on the same explanations")
        rl_nla = NLA.load(folder, lm=lm, which="rl")
        preds["rl_before_refit"] = _ar(rl_nla, expl)
        del rl_nla
    return warm_expl, refit_missing


def _compared_rungs(nla, gold: torch.Tensor, preds: dict, compare: dict[str, object], say) -> None:
    """Other NLAs' round trips on the same held-out vectors, as extra rungs in `preds`."""
    from .bundle import NLA

    for name, other in compare.items():
        if name in preds:
            raise NLAError(f"comparison name {name!r} is already a rung of the ladder; pick another")
        say(f"round trip through {name}")
        other = other if isinstance(other, NLA) else NLA.load(other, lm=nla.lm)
        if other.cfg.site != nla.cfg.site or other.cfg.model != nla.cfg.model:
            raise NLAError(
                f"{name} reads {other.cfg.model} at {other.cfg.site}; this NLA reads {nla.cfg.model} at {nla.cfg.site}"
            )
        preds[name] = _ar(other, _round_trip(other, gold))
        del other


def _rung_scores(res: dict, preds: dict, test: NLARows, *, n_boot: int, seed: int) -> None:
    """Every rung's FVE and its CI, into `res`."""
    gold, groups = test.vectors, test.doc_id
    res["baselines"] = {k: fve(p, gold, renormalise=False) for k, p in preds.items() if k != "nla"}
    res["baselines_ci"] = {
        k: list(bootstrap_ci(p, gold, groups, n_boot=n_boot, seed=seed, renormalise=False))
        for k, p in preds.items()
        if k != "nla"
    }


def _paired_scores(res: dict, preds: dict, test: NLARows, refit_missing: str | None, *, n_boot: int, seed: int):
    """The NLA's paired differences with each rung, RL's gains over the warm start, and the honest bar, into `res`."""
    from .bundle import WARM_REFIT_AR_FILE

    gold, groups = test.vectors, test.doc_id

    def paired(a: str, b: str) -> dict:
        """FVE(a) − FVE(b) with its CI, both scored on the same resampled documents."""
        fa = res["fve"] if a == "nla" else res["baselines"][a]
        ci = bootstrap_ci(preds[a], gold, groups, n_boot=n_boot, seed=seed, renormalise=False, minus=preds[b])
        return {"diff": fa - res["baselines"][b], "ci": list(ci)}

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
    if "warm_start_refit" in preds:  # from the bundle file, or a --compare rung of that name
        res["rl_vs_warm_start_refit"] = paired("nla", "warm_start_refit")
        res["rl_vs_warm_start_refit"]["from"] = WARM_REFIT_AR_FILE if refit_missing is None else "compare"
        res["bar"]["rl_beats_warm_start_refit_outside_paired_ci"] = res["rl_vs_warm_start_refit"]["ci"][0] > 0
    else:
        res["rl_vs_warm_start_refit"] = {"diff": None, "ci": None, "missing": refit_missing}
        res["bar"]["rl_beats_warm_start_refit_outside_paired_ci"] = None


def _words_analysis(res: dict, nla, test: NLARows, expl: list[str], warm_expl: list[str] | None, say) -> None:
    """How the explanations read: prose shares, quoted spans found verbatim in the context, FVE without quotes."""
    res["prose_share"] = prose_share(expl)
    res["oracle_prose_share"] = prose_share(test.explanations)
    if warm_expl is not None:
        res["warm_start_prose_share"] = prose_share(warm_expl)
    say("quote analysis")
    res.update(quote_analysis(expl, test.contexts))
    stripped = _ar(nla, [strip_quotes(e) for e in expl], allow_empty=True)
    res["fve_quotes_stripped"] = fve(stripped, test.vectors, renormalise=False)
    res["oracle_quote_verbatim_share"] = quote_analysis(test.explanations, test.contexts)["quote_verbatim_share"]


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
    n_examples: int = 20,
) -> dict:
    """`thoughtscope nla eval`: held-out FVE with a bootstrap CI and the baseline ladder.

    nla: an NLA object, a folder, or "default" (the shipped NLA). data: an `nla data` folder (its test
    split is evaluated, its train/val splits fit the baselines); without it, rows are harvested on the
    fly from the default corpus with the same document split. quick: a small test set (48 rows) so the
    whole evaluation runs in a few minutes on 2 CPU cores. Writes JSON to json_path when given.
    compare: other NLAs (name → folder or NLA, same target model) whose round trips on the same held-out
    vectors become extra rungs, with paired CIs — e.g. a checkpoint or an ablation. `examples`: n_examples
    held-out rows drawn at random (not chosen), for a reader to judge the explanations. The warm start given
    the same refit is the `warm_start_refit` rung when the folder holds warm_refit_ar.safetensors.
    """
    from .bundle import NLA
    from .explain import load_nla

    t0 = time.time()
    say = (lambda m: print(f"[nla eval {time.time() - t0:5.0f}s] {m}", flush=True)) if progress else (lambda m: None)
    if not isinstance(nla, NLA):
        nla = load_nla(nla, lm=lm)
    if data is None:
        test, train, val, data_desc = _recipe_rows(nla, quick, n_test, say)
    else:
        test, train, val, data_desc = _dataset_rows(nla, data, quick, n_test)
    if len(test) == 0 or len(train) == 0:
        raise NLAError("evaluation needs test rows and training rows (for the baselines)")
    res = _header(nla, test, train, data_desc)
    preds: dict[str, torch.Tensor] = {}
    expl, preds["nla"] = _nla_round_trip(nla, test, res, n_boot=n_boot, seed=seed, n_examples=n_examples, say=say)
    ridge_lambda = _text_rungs(nla, test, train, val, preds, seed=seed, say=say)
    warm_expl, refit_missing = _saved_rungs(nla, test.vectors, expl, preds, warm=warm, say=say)
    _compared_rungs(nla, test.vectors, preds, compare or {}, say)
    _rung_scores(res, preds, test, n_boot=n_boot, seed=seed)
    res["ridge_lambda"] = ridge_lambda
    _paired_scores(res, preds, test, refit_missing, n_boot=n_boot, seed=seed)
    _words_analysis(res, nla, test, expl, warm_expl, say)
    res["seconds"] = round(time.time() - t0, 1)
    if json_path:
        atomic_write_text(Path(json_path), json.dumps(res, indent=2, default=float))
    say(f"FVE {res['fve']:.3f} [{res['fve_ci'][0]:.3f}, {res['fve_ci'][1]:.3f}]")
    return res


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
        "token_only",
        "ridge_k1",
        "ridge_k4",
        "ridge_k16",
        "warm_start",
        "rl_before_refit",
        "warm_start_refit",
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
