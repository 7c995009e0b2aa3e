"""The probe datasets thoughtscope ships: generated from small tables written for the project.

No third-party probe set is safely redistributable (licences unclear or absent), so each set here is built
from tables in ``assets/probe_data`` by a seeded generator. Every row carries a ``group`` (everything about one
entity or number pair, so no entity straddles train and test) and an ``entity`` that recurs across groups (the
unit of the Hewitt–Liang control task: a probe that merely memorises entities scores on the control too).
"""

from __future__ import annotations

import json
import random
from functools import cache

from ..errors import ProbeError
from ..paths import asset
from .datasets import ProbeSet

DATA_DIR = asset("probe_data")

_UNITS = ["", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


@cache
def table(name: str) -> dict:
    path = DATA_DIR / f"{name}.json"
    if not path.is_file():
        raise ProbeError(f"shipped probe table {path} is missing; reinstall thoughtscope")
    return json.loads(path.read_text(encoding="utf-8"))


def number_words(n: int) -> str:
    """21..99 in words ("fifty-three"); the comparisons set avoids multiples of ten."""
    if not 21 <= n <= 99:
        raise ProbeError(f"number_words covers 21..99, got {n}")
    t, u = divmod(n, 10)
    return _TENS[t] + ("-" + _UNITS[u] if u else "")


def comparisons(n: int = 600, seed: int = 0) -> ProbeSet:
    """ "Fifty-three is larger than sixty-one." (51..99, no multiples of ten); half true, both wordings."""
    nums = [k for k in range(51, 100) if k % 10]
    rng = random.Random(seed)
    pairs = sorted({tuple(sorted(rng.sample(nums, 2))) for _ in range(4 * n)})
    rng.shuffle(pairs)
    texts, labels, groups, ents = [], [], [], []
    for a, b in pairs:
        if len(texts) >= n:
            break
        x, y = (a, b) if rng.random() < 0.5 else (b, a)
        for word, truth in (("larger", x > y), ("smaller", x < y)):
            texts.append(f"{number_words(x).capitalize()} is {word} than {number_words(y)}.")
            labels.append(int(truth))
            groups.append(f"{a}-{b}")
            ents.append(str(x))
    return ProbeSet(texts[:n], labels[:n], groups[:n], "comparisons", "generator:comparisons", ents[:n])


def cities(seed: int = 0, negated: bool = False, known_only: bool = False) -> ProbeSet:
    """ "The city of Paris is in France." true, and the same city with a wrong country false.

    ``negated``: "The city of Paris is not in France." (truth flips). ``known_only``: keep the cities whose
    country the default model itself names (field ``model_knows`` in the table, measured by
    ``tag_known_cities``)."""
    rows = table("cities")["cities"]
    if known_only:
        if any("model_knows" not in r for r in rows):
            raise ProbeError(f"{DATA_DIR / 'cities.json'} has no model_knows field; run tag_known_cities first")
        rows = [r for r in rows if r["model_knows"]]
    countries = sorted({r["country"] for r in table("cities")["cities"]})
    rng = random.Random(seed)
    texts, labels, groups, ents, known = [], [], [], [], []
    verb = "is not in" if negated else "is in"
    for r in rows:
        wrong = rng.choice([c for c in countries if c != r["country"]])
        for country, truth in ((r["country"], True), (wrong, False)):
            texts.append(f"The city of {r['city']} {verb} {country}.")
            labels.append(int(truth != negated))
            groups.append(r["city"])
            ents.append(country)
            known.append(r.get("model_knows"))
    name = "cities" + ("_negated" if negated else "") + ("_known" if known_only else "")
    return ProbeSet(texts, labels, groups, name, f"generator:{name}", ents, extra={"model_knows": known})


def translations(seed: int = 0) -> ProbeSet:
    """ "The Spanish word 'perro' means 'dog'." true, and with a wrong English word false."""
    rows = table("es_en")["pairs"]
    rng = random.Random(seed)
    texts, labels, groups, ents = [], [], [], []
    for r in rows:
        wrong = rng.choice([o["english"] for o in rows if o["english"] != r["english"]])
        for en, truth in ((r["english"], 1), (wrong, 0)):
            texts.append(f"The Spanish word '{r['spanish']}' means '{en}'.")
            labels.append(truth)
            groups.append(r["spanish"])
            ents.append(en)
    return ProbeSet(texts, labels, groups, "translations", "generator:translations", ents)


def arithmetic(n: int = 320, seed: int = 0) -> ProbeSet:
    """ "3 + 4 = 7." true or false (off by 1..3); difficulty easy = 1-digit operands, hard = 2-digit.

    Half the rows are easy; there are only 81 one-digit operand pairs, so n is at most 324."""
    if not 8 <= n <= 324:
        raise ProbeError(f"arithmetic: n must be in 8..324 (81 one-digit operand pairs make half the rows), got {n}")
    rng = random.Random(seed)
    texts, labels, groups, ents, diff = [], [], [], [], []
    seen = set()
    while len(texts) < n:
        hard = len(texts) % 4 >= 2
        lo, hi = (10, 99) if hard else (1, 9)
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
        for total, truth in ((a + b, 1), (wrong, 0)):
            texts.append(f"{a} + {b} = {total}.")
            labels.append(truth)
            groups.append(f"{a}+{b}")
            ents.append(str(total))
            diff.append("hard" if hard else "easy")
    return ProbeSet(texts[:n], labels[:n], groups[:n], "arithmetic", "generator:arithmetic", ents[:n], diff[:n])


def sentiment(seed: int = 0) -> ProbeSet:
    """Positive vs negative sentences: easy ones name an adjective, hard ones imply the sentiment without one."""
    t = table("sentiment")
    rng = random.Random(seed)
    texts, labels, groups, ents, diff = [], [], [], [], []
    for subj in t["subjects"]:
        for label, adjs, plain in (
            (1, t["positive_adjectives"], t["positive_plain"]),
            (0, t["negative_adjectives"], t["negative_plain"]),
        ):
            for tmpl in rng.sample(t["adjective_templates"], 2):
                adj = rng.choice(adjs)
                texts.append(tmpl.format(subject=subj, adj=adj))
                ents.append(tmpl)
                diff.append("easy")
            for tmpl in rng.sample(plain, 2):
                texts.append(tmpl.format(subject=subj))
                ents.append(tmpl.split("{")[0])
                diff.append("hard")
            labels += [label] * 4
            groups += [subj] * 4
    return ProbeSet(texts, labels, groups, "sentiment", "generator:sentiment", ents, diff)


PERSONAS = ("an honest", "an untruthful")


def honesty(seed: int = 0, n: int = 200) -> ProbeSet:
    """Instructed persona pairs (RepE style): the same true-statement prefix after an honest or an untruthful
    instruction; label 1 = honest. Each pair is its own group; the entity is the statement's source table."""
    rng = random.Random(seed)
    facts = [(f"The city of {r['city']} is in {r['country']}.", "cities") for r in table("cities")["cities"]]
    facts += [
        (f"The Spanish word '{r['spanish']}' means '{r['english']}'.", "translations") for r in table("es_en")["pairs"]
    ]
    rng.shuffle(facts)
    texts, labels, groups, ents, pids = [], [], [], [], []
    seen: set[str] = set()
    for fact, src in facts:
        if len(seen) >= n:
            break
        words = fact.split()
        prefix = " ".join(words[: rng.randint(4, len(words) - 1)])  # long enough to name the entity
        if prefix in seen:
            continue
        seen.add(prefix)
        k = len(seen) - 1
        for label, persona in ((1, PERSONAS[0]), (0, PERSONAS[1])):
            texts.append(f"Pretend you are {persona} person making statements about the world. {prefix}")
            labels.append(label)
            groups.append(f"fact{k}")
            ents.append(src)
            pids.append(f"fact{k}")
    return ProbeSet(texts, labels, groups, "honesty", "generator:honesty", ents, pair_ids=pids)


BUILTIN = {
    "comparisons": comparisons,
    "cities": cities,
    "cities_negated": lambda: cities(negated=True),
    "cities_known": lambda: cities(known_only=True),
    "translations": translations,
    "arithmetic": arithmetic,
    "sentiment": sentiment,
    "honesty": honesty,
}


def builtin(name: str) -> ProbeSet:
    if name not in BUILTIN:
        raise ProbeError(f"unknown built-in probe dataset {name!r}: expected one of {', '.join(BUILTIN)} or a file")
    return BUILTIN[name]()


def resolve(spec: str) -> ProbeSet:
    """A built-in name, or a .jsonl/.csv file."""
    from .datasets import load_dataset

    return builtin(spec) if spec in BUILTIN else load_dataset(spec)


CITY_PROMPT = "The city of {city} is located in the country of"


def tag_known_cities(lm, max_new_tokens: int = 6, write: bool = False) -> list[bool]:
    """Whether the model's greedy continuation of CITY_PROMPT names the right country, per city in the table."""
    import torch

    from ..models import pad_batch

    rows = table("cities")["cities"]
    known = []
    for i in range(0, len(rows), 16):
        chunk = rows[i : i + 16]
        prompts = [CITY_PROMPT.format(city=r["city"]) for r in chunk]
        ids, mask = lm.tokenize(prompts)
        # left-pad so every prompt ends at the last column
        prompt_ids = [r[: int(n)] for r, n in zip(ids.tolist(), mask.sum(1).tolist())]
        ids_l, mask_l = (t.to(lm.device) for t in pad_batch(prompt_ids, lm.pad_id, left=True))
        width = ids_l.shape[1]
        with torch.no_grad():
            out = lm.model.generate(
                input_ids=ids_l,
                attention_mask=mask_l,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=lm.pad_id,
            )
        for r, seq in zip(chunk, out[:, width:]):
            said = lm.tokenizer.decode(seq, skip_special_tokens=True).lower()
            known.append(r["country"].lower().removeprefix("the ") in said)
    if write:
        t = dict(table("cities"))
        t["cities"] = [dict(r, model_knows=k) for r, k in zip(rows, known)]
        t["model_knows"] = (
            f"greedy continuation of '{CITY_PROMPT}' ({max_new_tokens} tokens) by {lm.name} names the country"
        )
        tmp = DATA_DIR / "cities.json.tmp"
        tmp.write_text(json.dumps(t, indent=0, ensure_ascii=False), encoding="utf-8")
        tmp.replace(DATA_DIR / "cities.json")
        table.cache_clear()
    return known
