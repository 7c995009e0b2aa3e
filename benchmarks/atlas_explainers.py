"""Offline explainer against the local LLM explainer, on the same random features and the same held-out contexts.

Arms (all scored by the same lexical scorer, `LexicalScorer`, on the same held-out split of each feature):

  offline     the token / n-gram explainer (`explain_offline`), no model
  llm         the atlas's own model as explainer (`LocalChatClient`, the 135M default for the default atlas)
  shuffled    each arm's explanations given to other features (seeded derangement): chance, measured

Features: a uniform random sample of alive features (seeded), optionally disjoint from the samples other seeds
draw (`--exclude-seeds 0,1`: a test sample that shares no feature with the samples changes were tuned on). The
LLM arm runs
on a copy of the atlas (`<out>/llm/atlas.sqlite`) so the original keeps its offline explanations; it is
resumable (rerun the same command) and stops starting new features after `--deadline` (UTC, HH:MM), so
the sample it reaches is reported as such. Per-feature differences (offline - llm) are paired on the
features both arms explained; CIs are percentile bootstraps over features.

    python benchmarks/atlas_explainers.py --atlas atlas/ --n 200 --out runs/explainers [--deadline 21:00]
    python benchmarks/atlas_explainers.py --atlas atlas/ --n 200 --seed 2026 --exclude-seeds 0,1 --out runs/test
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path

from thoughtscope.atlas import Atlas, ExplainConfig, LexicalScorer, LocalChatClient, explain_atlas, explain_offline
from thoughtscope.atlas.cards import load_tokenizer
from thoughtscope.atlas.heldout import prepare
from thoughtscope.atlas.scoring import derangement, detection_items, lexical_detection, mean_ci


def _copy_db(src: Path, dst: Path) -> None:
    """A consistent copy of an atlas database (SQLite's backup API: pending WAL pages included)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Atlas.open(src) as at:
        target = sqlite3.connect(str(dst))
        at.con.backup(target)
        target.close()


def _past(deadline: str | None) -> bool:
    if not deadline:
        return False
    hh, mm = (int(x) for x in deadline.split(":"))
    now = datetime.now(timezone.utc)
    return (now.hour, now.minute) >= (hh, mm)


def sample_features(at: Atlas, n: int, seed: int, exclude_seeds: list[int]) -> list[int]:
    """n random alive features (seeded), none of them in the n-feature samples of `exclude_seeds`."""
    excluded = {f for s in exclude_seeds for f in at.random_features(n, seed=s, alive_only=True)}
    ids = [int(r[0]) for r in at.con.execute("SELECT id FROM features WHERE n_active > 0 ORDER BY id")]
    pool = [f for f in ids if f not in excluded]
    return sorted(random.Random(seed).sample(pool, min(n, len(pool))))


def _rows(path: Path, features: list[int]) -> dict[int, dict]:
    with Atlas.open(path) as at:
        return {f: at.explanation(f) for f in features if (at.explanation(f) or {}).get("status") == "ok"}


def _arm(rows: dict[int, dict], feats: list[int]) -> dict:
    out = {"n": len(feats)}
    for k in ("detection_auroc", "detection_bacc", "shuffled_detection_auroc", "shuffled_detection_bacc"):
        out[k] = mean_ci([rows[f].get(k) for f in feats if f in rows])
    return out


def _rescore(expl: dict[int, str], items: dict, seed: int) -> dict[int, dict]:
    """Detection scores of each explanation on its feature's held-out windows, and of a deranged one."""
    out = {f: {"explanation": e} for f, e in expl.items()}
    perm = derangement(sorted(expl), seed + 1)
    for f, e in expl.items():
        d = lexical_detection(e, *items[f])
        out[f].update(detection_auroc=d["auroc"], detection_bacc=d["bacc"])
        if f in perm:
            d = lexical_detection(expl[perm[f]], *items[f])
            out[f].update(shuffled_detection_auroc=d["auroc"], shuffled_detection_bacc=d["bacc"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--atlas", required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--deadline", default=None, help="UTC HH:MM after which the LLM arm starts no new feature")
    ap.add_argument("--chunk", type=int, default=5, help="LLM features per resumable step")
    ap.add_argument("--skip-llm", action="store_true", help="no new LLM features (those already done are still scored)")
    ap.add_argument("--exclude-seeds", default="", help="comma-separated seeds whose samples the sample avoids")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for the LLM arm")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(args.atlas)
    cfg = ExplainConfig(seed=args.seed, fuzz=False)
    with Atlas.open(src) as at:
        exclude = [int(x) for x in args.exclude_seeds.split(",") if x.strip()]
        feats = (
            sample_features(at, args.n, args.seed, exclude)
            if exclude
            else at.random_features(args.n, seed=args.seed, alive_only=True)
        )
        tok = load_tokenizer(at)
        spec = (at.meta.get("model_source") or {}).get("spec") or at.meta.get("model")

    # offline arm: on a copy too, so the sample's control is a derangement within the sample, like the LLM arm's
    off_db = out / "offline" / "atlas.sqlite"
    _copy_db(src, off_db)
    t0 = time.perf_counter()
    off_summary = explain_offline(off_db, tokenizer=tok, features=feats, config=cfg, overwrite=True, progress=False)
    off_seconds = time.perf_counter() - t0
    off = _rows(off_db, feats)

    llm_db = out / "llm" / "atlas.sqlite"
    llm_info: dict = {}
    if not args.skip_llm:
        if not llm_db.is_file():
            _copy_db(src, llm_db)
            con = sqlite3.connect(str(llm_db))
            with con:
                con.execute("DELETE FROM explanations")
            con.close()
        import torch

        from thoughtscope.models import load_model

        if args.threads:
            torch.set_num_threads(args.threads)
        lm = load_model(spec)
        client = LocalChatClient(lm)
        seconds, done_here = 0.0, 0
        order = list(feats)
        random.Random(args.seed).shuffle(order)  # a deadline cuts a random subset, not the lowest ids
        for s in range(0, len(order), args.chunk):
            if _past(args.deadline):
                llm_info["stopped_at_deadline"] = args.deadline
                break
            t1 = time.perf_counter()
            r = explain_atlas(
                llm_db,
                client,
                LexicalScorer(),
                tokenizer=lm.tokenizer,
                features=order[s : s + args.chunk],
                config=cfg,
                progress=False,
                control=False,
            )
            if r["requested"]:
                seconds += time.perf_counter() - t1
                done_here += r["requested"]
                print(
                    f"llm arm: {min(len(order), s + args.chunk)}/{len(order)} features, "
                    f"{seconds / max(1, done_here):.1f} s/feature this run",
                    flush=True,
                )
        llm_info.update(
            seconds_this_run=round(seconds, 1),
            features_this_run=done_here,
            seconds_per_feature_this_run=round(seconds / done_here, 2) if done_here else None,
        )
    llm = _rows(llm_db, feats) if llm_db.is_file() else {}
    both = [f for f in feats if f in off and f in llm]
    # every score again, in memory, with the scorer as it is now and one shared split: both arms are judged on
    # exactly the same held-out windows, each with its own derangement control
    with Atlas.open(src) as at:
        items = {f: detection_items(prepare(at, f, cfg), tok, cfg) for f in feats}
    off = _rescore({f: off[f]["explanation"] for f in off}, items, args.seed)
    llm = _rescore({f: llm[f]["explanation"] for f in llm}, items, args.seed)

    paired = {}
    for k in ("detection_auroc", "detection_bacc"):
        d = [off[f][k] - llm[f][k] for f in both if off[f].get(k) is not None and llm[f].get(k) is not None]
        paired[f"offline_minus_llm_{k}"] = mean_ci(d)
    result = {
        "atlas": str(src),
        "seed": args.seed,
        "exclude_seeds": exclude,
        "n_sampled": len(feats),
        "config": cfg.__dict__,
        "offline": {
            "all": _arm(off, feats),
            "on_llm_features": _arm(off, both),
            "seconds": round(off_seconds, 2),
            "summary": off_summary,
        },
        "llm": {"explainer": f"local:{spec}", "on_llm_features": _arm(llm, both), **llm_info},
        "paired_on_llm_features": paired,
        "n_llm_features": len(both),
        "examples": [
            {
                "feature": f,
                "offline": off[f]["explanation"],
                "llm": llm.get(f, {}).get("explanation"),
                "offline_auroc": off[f]["detection_auroc"],
                "llm_auroc": llm.get(f, {}).get("detection_auroc"),
            }
            for f in feats[:12]
            if f in off
        ],
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = out / "result.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, path)
    print(json.dumps({k: result[k] for k in ("n_sampled", "n_llm_features", "paired_on_llm_features")}, indent=1))
    print(json.dumps({"offline": result["offline"]["all"], "llm": result["llm"]["on_llm_features"]}, indent=1))


if __name__ == "__main__":
    main()
