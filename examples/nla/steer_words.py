"""Steering from words with the shipped NLA: edit an explanation, add AR(edited) − AR(original) while generating.

Runs the same edit through the final AR, the AR as RL left it (before its refit) and the warm-start AR
(trained only on explanations written from text), at several scales, greedy, and counts ocean words in
each continuation. Writes examples/nla/steer_words.json. About a minute on 2 CPU cores:

    python examples/nla/steer_words.py
"""

import json
import re
import sys
from pathlib import Path

from thoughtscope.models import load_model
from thoughtscope.nla import load_nla, steer_from_words

PROMPT = "My favourite animal is the"
ORIGINAL = 'Topic: cats, pets. Next: "cat" / "dog". Context: "My favourite animal is the". Token: the'
EDITED = 'Topic: ocean, fish. Next: "shark" / "whale". Context: "My favourite animal is the". Token: the'
OCEAN = re.compile(
    r"\b(ocean|sea|seas|fish|shark|sharks|whale|whales|dolphin|dolphins|marine|water|underwater|"
    r"swim|swims|coral|reef|octopus|tuna|salmon|deep|blue)\b",
    re.I,
)


def main(out: str = "examples/nla/steer_words.json") -> None:
    lm = load_model("default")
    rows = []
    for which in ("final", "rl", "warm"):
        nla = load_nla("default", lm=lm, which=which)
        for scale in (0.0, 1.0, 4.0, 8.0):
            r = steer_from_words(nla, PROMPT, ORIGINAL, EDITED, strength=scale, max_new_tokens=16)
            text = r["steered"] if scale else r["unsteered"]
            rows.append(
                {
                    "ar": which,
                    "scale": scale,
                    "delta_norm": round(r["delta_norm"], 2),
                    "continuation": text,
                    "ocean_words": len(OCEAN.findall(text)),
                }
            )
            print(f"{which:5s} x{scale:<3g} |Δ|={r['delta_norm']:.1f} ocean={rows[-1]['ocean_words']} {text!r}")
    Path(out).write_text(json.dumps({"prompt": PROMPT, "original": ORIGINAL, "edited": EDITED, "rows": rows}, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
