"""What the warm-start label's wording costs the reconstructor: the field layout against the same facts as prose.

    python scripts/nla_label_style.py --out /tmp/label_style            # about 12 minutes on 2 cores
    python scripts/nla_label_style.py --out /tmp/label_style --steps 20 # a quick look

Builds the default NLA's rows twice with the same vectors (`nla data --warm-start offline` and
`--warm-start prose`), trains the reconstructor's supervised stage (`nla train --stage ar-sft`, the shipped
recipe's steps) on each, and scores both on the validation split's warm-start text: FVE of each, and the
paired difference with a 95 % bootstrap CI over documents (`metric.bootstrap_ci`). Also the share of labels
that read as prose (`nla.prose`). Writes OUT/label_style.json. Each step resumes from what OUT holds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STYLES = {"fields": "offline", "prose": "prose"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=115, help="ar-sft steps (115: what the shipped AR-SFT reached)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    from thoughtscope.models import load_model
    from thoughtscope.nla.bundle import NLA
    from thoughtscope.nla.data import DataConfig, NLARows, harvest_rows
    from thoughtscope.nla.metric import bootstrap_ci, fve, normalise
    from thoughtscope.nla.prose import prose_share
    from thoughtscope.nla.recipe import DEFAULT_RECIPE, stage_settings
    from thoughtscope.nla.train import NLATrainConfig, train_stage

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model("default")
    data_kwargs = dict(DEFAULT_RECIPE["data"])
    steps = args.steps
    stage = {**stage_settings("ar-sft", steps=steps), "time_budget_s": None}  # equal steps for both, not equal time
    preds, shares, gold, docs = {}, {}, None, None
    for style, warm in STYLES.items():
        data_dir, nla_dir = args.out / f"data_{style}", args.out / f"nla_{style}"
        if not (data_dir / "rows.jsonl").is_file():
            harvest_rows(lm, DataConfig(**{**data_kwargs, "warm_start": warm})).save(data_dir)
        rows = NLARows.load(data_dir)
        shares[style] = prose_share(rows.explanations)
        train_stage(nla_dir, data_dir, NLATrainConfig(**stage), lm=lm)
        val = rows.subset("val")
        if gold is not None and not torch.equal(gold, val.vectors):
            raise SystemExit("the two datasets hold different vectors: they must differ only in their labels")
        gold, docs = val.vectors, val.doc_id
        with torch.no_grad():
            preds[style] = normalise(NLA.load(nla_dir, lm=lm).reconstruct(val.explanations, truncate=True)).float()
    res = {
        "ar_sft_steps": steps,
        "n_val_vectors": len(gold),
        "n_val_documents": int(docs.unique().numel()),
        "fve": {s: fve(p, gold, renormalise=False) for s, p in preds.items()},
        "prose_share": shares,
        "prose_minus_fields": {
            "diff": fve(preds["prose"], gold, renormalise=False) - fve(preds["fields"], gold, renormalise=False),
            "ci": list(bootstrap_ci(preds["prose"], gold, docs, renormalise=False, minus=preds["fields"])),
        },
    }
    (args.out / "label_style.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
