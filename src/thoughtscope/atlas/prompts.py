"""What the LLM explainer and scorers are asked, and how their answers are read.

The explainer sees a feature's shown examples with the active tokens marked <<like this>> and answers with one
short phrase on an `EXPLANATION:` line; the detection and fuzzing scorers answer a JSON list of probabilities
(`single_messages`: the one-text Yes/No form the local scorer reads as P(Yes)). A malformed answer raises
`MalformedAnswer`, which the HTTP client retries.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence

from ..llm import MalformedAnswer
from .heldout import ExplainConfig, FeatureTask, render, true_marks

EXPLAIN_SYSTEM = (
    "You study the internal features of a language model. You are shown text excerpts in which one "
    "feature is active on the tokens marked <<like this>>. You say in a few words what it responds to."
)


def explain_messages(task: FeatureTask, tokenizer, cfg: ExplainConfig) -> list[dict]:
    lines = []
    for i, e in enumerate(task.shown, 1):
        level = int(round(10 * e.act / task.max_act)) if task.max_act > 0 else 0
        lines.append(f"Example {i} (strength {level}/10): {render(e, tokenizer, cfg, marks=true_marks(e, cfg))}")
    user = (
        "Excerpts where the feature is active (active tokens marked <<like this>>):\n\n"
        + "\n".join(lines)
        + "\n\nWhat does this feature respond to? Look at the marked tokens and the words just before them. "
        "Answer with one short phrase (at most 15 words) on a final line of the form\nEXPLANATION: <phrase>"
    )
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": user}]


def parse_explanation(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        m = re.match(r"(?i)\**explanation\**\s*:\s*(.+)", ln)
        if m:
            lines = [m.group(1)]
            break
    if not lines:
        raise MalformedAnswer("empty explanation")
    # a preamble that announces a list ("This feature responds to the following tokens:") is not the answer
    # by itself: small models put the substance on the next lines, so those are kept with it
    out = lines[0]
    if out.endswith(":") and len(lines) > 1:
        out = out + " " + "; ".join(lines[1:6])
    out = out.strip()
    if len(out) >= 2 and out[0] == out[-1] and out[0] in "\"'":  # the whole answer in quotes
        out = out[1:-1].strip()
    if not out:
        raise MalformedAnswer("empty explanation")
    return out[:300]


def detection_messages(explanation: str, texts: Sequence[str]) -> list[dict]:
    body = "\n".join(f"Text {i}: {t}" for i, t in enumerate(texts, 1))
    user = (
        f'A feature of a language model is described as: "{explanation}".\n'
        f"For each text below, estimate the probability that this feature is active somewhere in it.\n\n{body}\n\n"
        f"Answer with a JSON list of {len(texts)} numbers between 0 and 1, one per text in order, and nothing else."
    )
    return [{"role": "user", "content": user}]


def fuzz_messages(explanation: str, texts: Sequence[str]) -> list[dict]:
    body = "\n".join(f"Text {i}: {t}" for i, t in enumerate(texts, 1))
    user = (
        f'A feature of a language model is described as: "{explanation}".\n'
        f"In each text below some tokens are marked <<like this>>. Either the marks are exactly where the feature is "
        f"active, or they were placed at random. For each text, estimate the probability that the marks are "
        f"correct.\n\n{body}\n\n"
        f"Answer with a JSON list of {len(texts)} numbers between 0 and 1, one per text in order, and nothing else."
    )
    return [{"role": "user", "content": user}]


def single_messages(explanation: str, text: str, kind: str) -> list[dict]:
    """One-example question for the local scorer, answered by P(Yes)."""
    if kind == "detection":
        q = (
            f'A feature of a language model is described as: "{explanation}".\nText: {text}\n'
            f"Is this feature active somewhere in the text? Answer Yes or No."
        )
    else:
        q = (
            f'A feature of a language model is described as: "{explanation}".\nText: {text}\n'
            f"Are the tokens marked <<like this>> the ones this feature responds to? Answer Yes or No."
        )
    return [{"role": "user", "content": q}]


def parse_probabilities(n: int) -> Callable[[str], list[float]]:
    def parse(text: str) -> list[float]:
        for m in re.finditer(r"\[[^\[\]]*\]", text):
            try:
                vals = json.loads(m.group(0))
            except json.JSONDecodeError:
                continue
            if isinstance(vals, list) and len(vals) == n and all(isinstance(v, (int, float)) for v in vals):
                return [min(1.0, max(0.0, float(v))) for v in vals]
        raise MalformedAnswer(f"expected a JSON list of {n} numbers, got {text[:200]!r}")

    return parse
