"""Warm-start explanations of NLA rows, written from the *text* (and the target's own next-token prediction),
never from the vector: offline and extractive (`offline_explanation`), or by any OpenAI-compatible chat
endpoint (`llm_explanation`). They teach the AV the format and the AR a first mapping.
"""

from __future__ import annotations

import os
import re
from collections import Counter

from ..llm import HTTPChatClient, LLMError
from ..renamed import warn_renamed
from .core import NLAError

_STOP = set(
    """a an the and or but if of to in on at by for with from as is are was were be been being this that these
those it its it's into than then there here which who whom what when where why how not no yes can could should would
will shall may might must do does did done have has had having you your yours we our ours they them their i me my he him
his she her hers also such only just more most some any each other all both very so too use used using one two may
""".split()
)


def salient_words(text: str, k: int = 2) -> list[str]:
    """Content words a reader of the prefix would be tracking: frequent, long, not stop-words."""
    words = [w.lower() for w in re.findall(r"[A-Za-z][A-Za-z\-]{3,}", text)]
    counts = Counter(w for w in words if w not in _STOP)
    ranked = sorted(counts, key=lambda w: (-counts[w], -len(w), w))
    return ranked[:k]


def _clean(s: str) -> str:
    return s.replace("\n", "\\n").replace("\t", " ").replace('"', "'")


def token_clause(tok_text: str) -> str:
    """The clause that names the current token, as the offline explanation ends: ``Token:`` then the token's
    text with newlines escaped and double quotes turned into single ones, one space between (a token that
    starts with a space keeps just its own). `nla eval`'s `token_only` rung gives the AR this clause alone."""
    tok_disp = _clean(tok_text)
    return "Token:" + (tok_disp if tok_disp.startswith(" ") else " " + tok_disp)


# How each style words the same facts: (lead, separator) for topic words and next tokens, then the last
# clause with the quoted context or, when there is none, the current token alone (always last).
_WORDING = {
    "fields": {
        "topic": ("Topic: ", ", "),
        "next": ("Next: ", " / "),
        "context": 'Context: "{q}". {tail}',
        "token": "{tail}",
    },
    "prose": {
        "topic": ("The text is about ", " and "),
        "next": ("Next it expects ", " or "),
        "context": 'It has just read "{q}" and now reads{tok}',
        "token": "It now reads{tok}",
    },
}


def offline_explanation(
    tokenizer,
    ids: list[int],
    next_ids: list[int],
    *,
    n_words: int = 2,
    quote_tokens: int = 8,
    max_explanation_tokens: int = 40,
    style: str = "fields",
    max_tokens: int | None = None,
) -> str:
    """An extractive explanation from the text and the model's own prediction.

    Layout (``style="fields"``): ``Topic: a, b. Next: "x" / "y". Context: "<last words>". Token:<token>``.
    ``style="prose"`` says the same facts as sentences (``The text is about a and b. Next it expects "x"
    or "y". It has just read "<last words>" and now reads<token>``), so an AV that learns it writes prose
    (`prose.py`) rather than a field template. Either way the current token comes last, so the
    reconstructor's last position sees it after a copy of the recent context; `nla eval` reports the share
    of quoted text and FVE with quotes stripped, so this channel is never mistaken for reading thoughts.
    The explanation is shortened until it is at most `max_explanation_tokens` tokens (`max_tokens`: its old,
    deprecated name).
    """
    if max_tokens is not None:
        warn_renamed("max_tokens", "max_explanation_tokens", "offline_explanation")
        max_explanation_tokens = max_tokens
    if style not in _WORDING:
        raise NLAError(f"explanation style must be one of {', '.join(_WORDING)}, got {style!r}")
    tok_text = tokenizer.decode(ids[-1:])
    prefix_text = tokenizer.decode(ids[:-1])
    quote = tokenizer.decode(ids[-1 - quote_tokens : -1]) if len(ids) > 1 else ""
    # start the quote at a word boundary so it reads as words, not token fragments
    if " " in quote.strip() and not quote.startswith(" "):
        quote = quote[quote.find(" ") :]
    words = salient_words(prefix_text[: max(0, len(prefix_text) - len(quote))], n_words)
    nxt = [_clean(tokenizer.decode([t]).strip()) for t in next_ids]
    nxt = [n for n in nxt if n][:2]
    tail = token_clause(tok_text)

    wording = _WORDING[style]
    tok = tail[len("Token:") :]

    def build(words, nxt, quote):
        parts = []
        if words:
            parts.append(wording["topic"][0] + wording["topic"][1].join(words) + ".")
        if nxt:
            parts.append(wording["next"][0] + wording["next"][1].join(f'"{n}"' for n in nxt) + ".")
        q = _clean(quote).strip()
        parts.append((wording["context"] if q else wording["token"]).format(q=q, tail=tail, tok=tok))
        return " ".join(parts)

    text = build(words, nxt, quote)
    # shorten until it fits the token budget: fewer quoted tokens first, then drop topic / next
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) > max_explanation_tokens:
        if quote_tokens > 3:
            quote_tokens -= 2
            quote = tokenizer.decode(ids[-1 - quote_tokens : -1])
        elif words:
            words = words[:-1]
        elif nxt:
            nxt = nxt[:-1]
        elif quote:
            quote = ""
        else:
            break
        text = build(words, nxt, quote)
    return text


LLM_PROMPT = (
    "Below is the beginning of a text, cut at its last token. In at most {words} words, say what a "
    "reader predicting the next token is tracking: the topic, what comes next, and the last token. "
    "Reply with the explanation only.\n\nTEXT:\n{text}"
)


def llm_explanation(
    text: str,
    *,
    endpoint: str,
    model: str,
    api_key_env: str = "OPENAI_API_KEY",
    max_words: int = 30,
    timeout: float = 60.0,
) -> str:
    """Ask any OpenAI-compatible chat endpoint for a warm-start explanation of a prefix (the shared client,
    thoughtscope.llm; one attempt, as before)."""
    url = endpoint.rstrip("/") + "/chat/completions"
    client = HTTPChatClient(url, model, os.environ.get(api_key_env) or None, timeout=timeout, max_retries=0)
    try:
        return client.call(
            [{"role": "user", "content": LLM_PROMPT.format(words=max_words, text=text)}],
            max_new_tokens=120,
            temperature=1.0,
            parse=lambda reply: " ".join(reply.split()),
        )
    except LLMError as e:
        raise NLAError(f"warm-start endpoint {url} failed: {e}") from e
