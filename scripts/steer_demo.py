"""Steering demonstrations on the default model (issue 5, points 6a and 6b), one command each.

    python scripts/steer_demo.py concept --concept auto --json out/concept.json   # 6a
    python scripts/steer_demo.py suppress --concept music --json out/suppress.json  # 6b (after 6a)

`--concept auto` tries the built-in concepts in turn and stops at the first that passes (>= 60 % of
answers to the 20 neutral questions mention it, perplexity <= 2x unsteered). `--tiny` runs the same
code on a tiny random model and a random SAE (a smoke test; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _load(args):
    from thoughtscope.models import load_model, tiny_model
    from thoughtscope.sae import SAE, SAEConfig, load_sae
    from thoughtscope.steer.presets import default_sae_path

    if args.tiny:
        lm = tiny_model("llama", d_model=64, n_layers=2)
        sae = SAE.from_config(SAEConfig(arch="topk", d_model=64, n_features=256, k=16, site="resid.0"), seed=0)
        return lm, sae.eval(), "resid.0"
    lm = load_model(args.model)
    sae = load_sae(args.sae or default_sae_path()).eval().requires_grad_(False)
    return lm, sae, args.site or sae.cfg.site or "resid.15"


def main(argv=None) -> int:
    from thoughtscope.demo.steer import CONCEPTS, concept_demo, suppression_demo
    from thoughtscope.steer import GenerationConfig
    from thoughtscope.steer.calibrate import DEFAULT_SWEEP_CONFIG, NEUTRAL_PROMPTS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["concept", "suppress"])
    ap.add_argument("--concept", default="auto", help=f"auto or one of {', '.join(CONCEPTS)}")
    ap.add_argument("--model", default="default")
    ap.add_argument("--sae", default=None, help="SAE folder (default: the shipped default SAE)")
    ap.add_argument("--site", default=None)
    ap.add_argument("--feature", type=int, default=None, help="suppress: feature id (default: from --from-json)")
    ap.add_argument("--max-act", type=float, default=None)
    ap.add_argument("--from-json", default=None, help="suppress: the concept demo's JSON, to reuse its feature")
    ap.add_argument("--multiples", default="0,2,4,6,8,10")
    ap.add_argument("--max-new-tokens", type=int, default=DEFAULT_SWEEP_CONFIG["max_new_tokens"])
    ap.add_argument(
        "--features", default="", help="concept: comma-separated feature ids to sweep (from the search's top 10)"
    )
    ap.add_argument("--candidates", type=int, default=3, help="concept: how many top contrastive features to sweep")
    ap.add_argument("--combine", action="store_true", help="concept: clamp all --features together as one candidate")
    ap.add_argument(
        "--positions",
        default="all",
        choices=["all", "prompt", "generated"],
        help="concept: where the clamp applies (generated: the answer's tokens only)",
    )
    ap.add_argument("--plot", default=None, help="concept: PNG of the best sweep")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm, sae, site = _load(args)
    cfg = GenerationConfig(**{**DEFAULT_SWEEP_CONFIG, "max_new_tokens": args.max_new_tokens})
    prompts = NEUTRAL_PROMPTS[:4] if args.tiny else NEUTRAL_PROMPTS
    if args.which == "concept":
        names = list(CONCEPTS) if args.concept == "auto" else [args.concept]
        results = []
        for name in names:
            r = concept_demo(
                lm,
                sae,
                site,
                CONCEPTS[name],
                multiples=[float(x) for x in args.multiples.split(",")],
                config=cfg,
                prompts=prompts,
                candidates=1 if args.tiny else args.candidates,
                features=[int(x) for x in args.features.split(",") if x],
                plot=args.plot,
                combine=args.combine,
                positions=args.positions,
            )
            results.append(r)
            b = r["best"]
            print(
                f"[{name}] "
                + (
                    f"feature {b['feature']} at {b['suggested_multiple']}x max: "
                    f"{100 * b['concept_rate']:.0f}% mention it (unsteered "
                    f"{100 * b['baseline']['concept_rate']:.0f}%), perplexity {b['ppl_ratio']:.2f}x"
                    if b
                    else "no strength within the perplexity bound"
                )
                + ("  PASS" if r["passed"] else "")
            )
            if r["passed"]:
                for c in r.get("side_by_side", []):
                    print(f"\nQ: {c['prompt']}\n  unsteered: {c['unsteered']!r}\n  steered:   {c['steered']!r}")
                break
        out = {"results": results, "passed": any(r["passed"] for r in results)}
    else:
        if args.from_json:
            prev = json.loads(Path(args.from_json).read_text())
            good = [r for r in prev["results"] if r["best"]]
            if not good:
                print("the concept demo found no usable feature", file=sys.stderr)
                return 1
            r = next((r for r in good if r["passed"]), good[-1])
            name, feat, mx = r["concept"], r["best"]["feature"], r["best"]["max_act"]
        else:
            name = "music" if args.concept == "auto" else args.concept
            feat, mx = args.feature, args.max_act
            if feat is None or mx is None:
                print("give --feature and --max-act, or --from-json", file=sys.stderr)
                return 2
        out = suppression_demo(lm, sae, site, CONCEPTS[name], feat, mx, config=cfg)
        print(
            f"[{name}] feature {feat}: mention rate {100 * out['before']['mention_rate']:.0f}% -> "
            f"{100 * out['clamp']['mention_rate']:.0f}% (clamp {out['clamp']['multiple_of_max']}x max), "
            f"{100 * out['project_out']['mention_rate']:.0f}% (decoder direction projected out), "
            f"on {out['n_prompts']} prompts that evoke it"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
