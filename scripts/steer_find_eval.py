"""`steer find` on the evaluation set: 8 everyday concepts, 24 neutral questions written for it.

    python scripts/steer_find_eval.py --out examples/steering/find            # all concepts, resumable
    python scripts/steer_find_eval.py --only rain,fire --out /tmp/find         # a subset

Each concept (examples/steering/concepts/NAME.json: keywords, texts with it) runs the same search as
`thoughtscope steer find NAME --prompts ... --keywords ... --questions examples/steering/questions.txt`
on the default model and SAE. Writes NAME.json (the whole search), NAME.preset.json (the winner) and
summary.json (per concept: best handle, its concept rate and perplexity ratio measured on fresh seeds
after the search, the search seed's own figures, the prompt-only baseline; the count of concepts at
>= 50 % within 2x perplexity on the fresh seeds). A concept whose
NAME.json exists is skipped unless --force, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def summarise(out: Path, names: list[str]) -> dict:
    rows = []
    for name in names:
        f = out / f"{name}.json"
        if not f.is_file():
            continue
        r = json.loads(f.read_text())
        b = r["best"] or {}
        search = b.get("search") or {}
        rows.append(
            {
                "concept": name,
                "best_kind": b.get("kind"),
                "best_id": b.get("id"),
                "strength": b.get("strength"),
                "unit": b.get("unit"),
                "concept_rate": b.get("concept_rate", 0.0),
                "concept_rate_ci": b.get("concept_rate_ci"),
                "perplexity_ratio": b.get("perplexity_ratio"),
                "looping": b.get("looping"),
                "measured_on": b.get("measured_on"),
                "n_answers": (b.get("confirmation") or {}).get("n_answers"),
                "seeds_within_bound": _within_bound(b.get("confirmation"), r["config"].get("ppl_bound", 2.0)),
                "stepped_down_from": (b.get("stepped_down_from") or {}).get("strength"),
                "search_rate": search.get("concept_rate"),
                "search_ppl_ratio": search.get("perplexity_ratio"),
                "unsteered_rate": r["baseline"]["concept_rate"],
                "prompt_only_rate": r["prompt_only"]["concept_rate"],
                "prompt_only_ppl_ratio": r["prompt_only"]["perplexity_ratio"],
                "n_handles": len(r["handles"]),
                "dropped_at_screening": sum(h["status"].startswith("dropped") for h in r["handles"]),
                "seconds": r["seconds"],
            }
        )
    passed = [x for x in rows if x["concept_rate"] >= 0.5 and (x["perplexity_ratio"] or 9) <= 2.0]
    return {
        "n_concepts": len(rows),
        "n_pass": len(passed),
        "target": ">= 50 % concept rate at <= 2x perplexity",
        "rows": rows,
    }


def _within_bound(conf: dict | None, bound: float) -> float | None:
    """Share of the fresh seeds whose perplexity ratio stays within the bound (runs before the field existed too)."""
    if not conf:
        return None
    if "within_bound_share" in conf:
        return conf["within_bound_share"]
    seeds = conf.get("per_seed") or []
    return sum(x["perplexity_ratio"] <= bound for x in seeds) / len(seeds) if seeds else None


def _share(r: dict) -> str:
    if r.get("seeds_within_bound") is None:
        return ""
    down = f" (stepped down from {r['stepped_down_from']:g})" if r.get("stepped_down_from") else ""
    return f"{100 * r['seeds_within_bound']:.0f} %{down}"


def markdown(summary: dict) -> str:
    """The per-concept table for docs/steering.md and the README."""
    lines = [
        "| concept | best handle | strength | concept rate, fresh seeds (95 % CI) | x perplexity | fresh seeds within "
        "2x | looping | search seed (x ppl) | unsteered | prompt-only (x ppl) | candidates (dropped at screening) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        ok = r["concept_rate"] >= 0.5 and (r["perplexity_ratio"] or 9) <= 2.0
        rate = f"{100 * r['concept_rate']:.0f} %"
        ci = r.get("concept_rate_ci")
        ci = f" ({100 * ci[0]:.0f}-{100 * ci[1]:.0f})" if ci else ""
        search = (
            f"{100 * r['search_rate']:.0f} % ({r['search_ppl_ratio']:.2f})" if r.get("search_rate") is not None else ""
        )
        lines.append(
            f"| {r['concept']} | {r['best_id'] or 'none within 2x'} | "
            f"{'' if r['strength'] is None else format(r['strength'], 'g')} {r['unit'] or ''} | "
            f"{'**' + rate + '**' if ok else rate}{ci} | "
            f"{'' if r['perplexity_ratio'] is None else format(r['perplexity_ratio'], '.2f')} | "
            f"{_share(r)} | "
            f"{'' if r.get('looping') is None else format(100 * r['looping'], '.0f') + ' %'} | "
            f"{search} | {100 * r['unsteered_rate']:.0f} % | {100 * r['prompt_only_rate']:.0f} % "
            f"({r['prompt_only_ppl_ratio']:.2f}) | {r['n_handles']} ({r['dropped_at_screening']}) |"
        )
    lines.append(
        f"\n{summary['n_pass']} of {summary['n_concepts']} concepts reach {summary['target']} on the fresh seeds."
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", type=Path, default=ROOT / "examples/steering/concepts")
    ap.add_argument("--questions", type=Path, default=ROOT / "examples/steering/questions.txt")
    ap.add_argument("--out", type=Path, default=ROOT / "examples/steering/find")
    ap.add_argument("--only", default="", help="comma-separated concept names")
    ap.add_argument("--model", default="default")
    ap.add_argument("--sae", default="default")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--markdown", action="store_true", help="only print the table of an existing run")
    args = ap.parse_args(argv)

    import torch

    from thoughtscope.models import load_model
    from thoughtscope.sae import load_sae
    from thoughtscope.steer.find import Concept, FindConfig, find_handle, save_preset

    if args.threads:
        torch.set_num_threads(args.threads)
    names = sorted(p.stem for p in args.concepts.glob("*.json"))
    if args.only:
        want = [x.strip() for x in args.only.split(",") if x.strip()]
        missing = sorted(set(want) - set(names))
        if missing:
            print(f"no concept file for {missing} in {args.concepts}", file=sys.stderr)
            return 2
        names = want
    if args.markdown:
        print(markdown(summarise(args.out, names)))
        return 0
    questions = [q.strip() for q in args.questions.read_text().splitlines() if q.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    lm = load_model(args.model)
    sae = load_sae(args.sae).eval().requires_grad_(False)
    for name in names:
        if (args.out / f"{name}.json").is_file() and not args.force:
            continue
        t = time.perf_counter()
        concept = Concept.load(args.concepts / f"{name}.json")
        res = find_handle(lm, sae, concept, questions=questions, config=FindConfig())
        res.save(args.out / f"{name}.json")
        if res.best is not None:
            save_preset(res, sae, args.out / f"{name}.preset.json")
        b = res.best or {}
        print(
            f"{name}: best {b.get('id')} at {b.get('strength')} -> {b.get('concept_rate')} "
            f"at {b.get('perplexity_ratio')}x ppl; prompt-only {res.prompt_only['concept_rate']} "
            f"({time.perf_counter() - t:.0f} s)",
            flush=True,
        )
    summary = summarise(args.out, sorted(p.stem for p in args.concepts.glob("*.json")))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
