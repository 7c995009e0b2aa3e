"""Write src/thoughtscope/assets/causal_pairs.json: the clean/corrupted prompt pairs the causal checks use.

Three families written for this package: indirect object ("When Mary and John went to the store, John gave a drink
to" -> Mary, corrupted by naming the other person as the giver), factual recall (a country's capital, corrupted by
another country) and one-digit addition (corrupted by another addend). Candidates come from templates; a pair is
kept when both prompts have the same number of tokens, the target and the alternative are one token each, and the
default model prefers the target on the clean prompt and the alternative on the corrupted one (the checks measure
how the model does a task it does). Every fourth kept pair of each family (by a fixed shuffle) is held out: tuning
never reads it. Run once: `python scripts/causal_pairs.py`.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import torch

from thoughtscope.models import load_model

NAMES = ["Mary", "John", "Tom", "Anna", "James", "Sarah", "David", "Emma", "Paul", "Lisa", "Mark", "Kate"]
PLACES = ["store", "park", "school", "beach", "office", "market"]
OBJECTS = ["drink", "book", "ball", "gift", "letter", "key"]
CAPITALS = {
    "France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo",
    "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens", "England": "London", "Austria": "Vienna",
    "Ireland": "Dublin", "Portugal": "Lisbon", "Norway": "Oslo", "Peru": "Lima", "Cuba": "Havana",
    "Poland": "Warsaw", "Kenya": "Nairobi", "Canada": "Ottawa", "Sweden": "Stockholm", "Denmark": "Copenhagen",
}  # fmt: skip
CAPITAL_TEMPLATES = ["The capital of {c} is", "The capital city of {c} is the city of", "{c}'s capital is"]


def candidates(rng: random.Random):
    for a, b in itertools.permutations(NAMES, 2):
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        base = "When {a} and {b} went to the {p}, {g} gave a {o} to"
        yield (
            "indirect_object",
            base.format(a=a, b=b, p=place, o=obj, g=b),
            base.format(a=a, b=b, p=place, o=obj, g=a),
            " " + a,
            " " + b,
        )
    for (c1, k1), (c2, k2) in itertools.permutations(CAPITALS.items(), 2):
        t = rng.choice(CAPITAL_TEMPLATES)
        yield "factual_recall", t.format(c=c1), t.format(c=c2), " " + k1, " " + k2
    for a, b, b2 in itertools.product(range(1, 9), range(1, 9), range(1, 9)):
        if b != b2 and a + b < 10 and a + b2 < 10:
            yield "arithmetic", f"{a} + {b} = ", f"{a} + {b2} = ", str(a + b), str(a + b2)


def main() -> None:
    rng = random.Random(2026)
    lm = load_model("default")
    tok = lm.tokenizer
    one = lambda s: len(tok(s, add_special_tokens=False)["input_ids"]) == 1  # noqa: E731
    kept: dict[str, list[dict]] = {}
    cands = list(candidates(rng))
    rng.shuffle(cands)
    for fam, clean, corrupt, target, against in cands:
        if len(kept.get(fam, [])) >= 40 or not (one(target) and one(against)):
            continue
        a, _ = lm.tokenize([clean])
        b, _ = lm.tokenize([corrupt])
        if a.shape != b.shape:
            continue
        t, o = (tok(s, add_special_tokens=False)["input_ids"][0] for s in (target, against))
        with torch.inference_mode():
            la, lb = (lm.model(x).logits[0, -1] for x in (a, b))
        if la[t] > la[o] and lb[o] > lb[t]:
            kept.setdefault(fam, []).append({"clean": clean, "corrupt": corrupt, "target": target, "against": against})
    out = {"about": __doc__.split("\n\n")[1].replace("\n", " "), "families": {}}
    for fam, pairs in kept.items():
        for i, p in enumerate(pairs):
            p["split"] = "heldout" if i % 4 == 3 else "tuning"
        out["families"][fam] = pairs
        print(fam, len(pairs), sum(p["split"] == "heldout" for p in pairs), "held out")
    path = Path(__file__).resolve().parents[1] / "src/thoughtscope/assets/causal_pairs.json"
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
