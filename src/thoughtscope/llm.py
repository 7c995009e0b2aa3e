"""The one chat client of the package: any OpenAI-compatible endpoint, or the local target model.

Used by auto-interpretability (atlas/explain.py: LLM explainers and scorers) and by the NLA data builder
(nla/data.py: warm-start explanations). It lives at the top of the package, next to the other shared plumbing,
because both of those rooms call it and neither should import the other.

HTTP: `/v1/chat/completions` over the standard library's urllib (no extra dependency), safe to call from
several threads, with retries and exponential back-off on timeouts, 429, 5xx and malformed answers
(honouring Retry-After); `max_retries=0` makes a single attempt. Local: the target model's chat template and
greedy decoding; as a scorer it reads P("Yes") against P("No") directly, which gives AUROC without sampling.
Failures raise `LLMError` (a `ThoughtscopeError`) whose message names the URL and what went wrong.
"""

from __future__ import annotations

__all__ = [
    "ENV_KEY",
    "ENV_MODEL",
    "ENV_SCORER_MODEL",
    "ENV_SCORER_URL",
    "ENV_URL",
    "HTTPChatClient",
    "LLMError",
    "LocalChatClient",
    "MalformedAnswer",
    "client_from_env",
]

import contextlib
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from .errors import LLMError, ThoughtscopeError  # noqa: F401  (re-exported: their old home)

ENV_URL = "THOUGHTSCOPE_EXPLAINER_URL"
ENV_MODEL = "THOUGHTSCOPE_EXPLAINER_MODEL"
ENV_KEY = "OPENAI_API_KEY"
ENV_SCORER_URL = "THOUGHTSCOPE_SCORER_URL"
ENV_SCORER_MODEL = "THOUGHTSCOPE_SCORER_MODEL"


def _answer_cap(max_new_tokens: int, max_tokens: int | None) -> int:
    """`max_tokens` is the deprecated name of `max_new_tokens` (tokens in the answer) in `call`."""
    if max_tokens is None:
        return max_new_tokens
    import warnings

    warnings.warn("call(max_tokens=...) is deprecated; use max_new_tokens=...", DeprecationWarning, stacklevel=3)
    return max_tokens


class MalformedAnswer(ValueError):
    """An answer that parsed as HTTP but not as what the prompt asked for; retried like a server error."""


# --------------------------------------------------------------------------- clients


class HTTPChatClient:
    """Minimal OpenAI-compatible chat client over urllib, safe to call from several threads."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not base_url:
            raise LLMError(
                f"no endpoint URL (got {base_url!r}): give the base URL of an OpenAI-compatible server, "
                f"e.g. http://127.0.0.1:8080/v1 for a llama.cpp server"
            )
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/chat/completions"):
            self.url = self.base_url
        elif self.base_url.endswith("/v1"):
            self.url = self.base_url + "/chat/completions"
        else:
            self.url = self.base_url + "/v1/chat/completions"
        self.model = model or "default"
        self.api_key = api_key
        self.timeout, self.max_retries, self.backoff, self.max_backoff = timeout, max_retries, backoff, max_backoff
        self.sleep = sleep
        self.name = f"{self.model}@{self.base_url}"
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0, "retries": 0}
        self.concurrent = True

    def _post(self, payload: dict) -> dict:
        data = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            body = r.read()
        try:
            return json.loads(body)
        except json.JSONDecodeError as e:
            raise MalformedAnswer(f"response is not JSON ({e.msg}): {body[:200]!r}") from None

    def call(
        self,
        messages: list[dict],
        *,
        max_new_tokens: int = 200,
        temperature: float = 0.0,
        parse: Callable[[str], Any] | None = None,
        max_tokens: int | None = None,
    ) -> Any:
        """POST a chat request; retry transient failures (and answers `parse` rejects) with back-off.
        `max_new_tokens` caps the answer (the API's `max_tokens`; that keyword is its deprecated name here)."""
        max_new_tokens = _answer_cap(max_new_tokens, max_tokens)
        payload = {"model": self.model, "messages": messages, "max_tokens": max_new_tokens, "temperature": temperature}
        last = ""
        for attempt in range(self.max_retries + 1):
            wait = min(self.max_backoff, self.backoff * (2**attempt))
            try:
                self.usage["requests"] += 1
                out = self._post(payload)
                try:
                    text = out["choices"][0]["message"]["content"]
                except (KeyError, IndexError, TypeError):
                    raise MalformedAnswer(f"no choices[0].message.content in {str(out)[:200]}") from None
                if not isinstance(text, str):
                    raise MalformedAnswer(f"message content is {type(text).__name__}, not text")
                u = out.get("usage") or {}
                self.usage["prompt_tokens"] += int(u.get("prompt_tokens") or 0)
                self.usage["completion_tokens"] += int(u.get("completion_tokens") or 0)
                return parse(text) if parse is not None else text
            except urllib.error.HTTPError as e:
                body = e.read()[:300].decode("utf-8", "replace") if hasattr(e, "read") else ""
                last = f"HTTP {e.code} from {self.url}: {body}"
                if e.code != 429 and e.code < 500:
                    raise LLMError(last + " (not retried: fix the request, model name or key)") from None
                ra = e.headers.get("Retry-After") if e.headers else None
                if ra:
                    with contextlib.suppress(ValueError):  # a date instead of seconds: keep our own backoff
                        wait = min(self.max_backoff, max(wait, float(ra)))
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                reason = getattr(e, "reason", e)
                last = f"cannot reach {self.url}: {type(reason).__name__}: {reason}"
            except MalformedAnswer as e:
                last = f"malformed answer: {e}"
            if attempt < self.max_retries:
                self.usage["retries"] += 1
                self.sleep(wait)
        raise LLMError(f"{last} (gave up after {self.max_retries + 1} attempts)")


class LocalChatClient:
    """The target model itself as explainer/scorer: chat template + greedy decoding, offline.

    Small models (135M parameters) write poor explanations; the scores make that visible.
    """

    def __init__(self, lm, *, max_context: int | None = None):
        self.lm = lm
        self.name = f"local:{lm.name}"
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0, "retries": 0}
        self.concurrent = False
        self.max_context = max_context or min(getattr(lm, "max_context", 2048), 2048)
        self._yes = self._first_id(["Yes", " Yes"])
        self._no = self._first_id(["No", " No"])

    def _first_id(self, options: Sequence[str]) -> int:
        tok = self.lm.tokenizer
        for o in options:
            ids = tok(o, add_special_tokens=False)["input_ids"]
            if ids:
                return int(ids[0])
        raise LLMError(f"the tokenizer of {self.lm.name} cannot encode {options[0]!r}")

    def _prompt_ids(self, messages: list[dict]):
        import torch

        tok = self.lm.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
            if not isinstance(ids, torch.Tensor):  # newer transformers return a BatchEncoding
                ids = ids["input_ids"]
        else:  # tiny test models have no template: a plain transcript
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        ids = ids[:, -self.max_context + 64 :]
        return ids.to(self.lm.device)

    def call(
        self,
        messages: list[dict],
        *,
        max_new_tokens: int = 200,
        temperature: float = 0.0,
        parse: Callable[[str], Any] | None = None,
        max_tokens: int | None = None,
    ) -> Any:
        import torch

        max_new_tokens = _answer_cap(max_new_tokens, max_tokens)

        ids = self._prompt_ids(messages)
        tok = self.lm.tokenizer
        with torch.no_grad():
            out = self.lm.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.lm.pad_id,
            )
        new = out[0, ids.shape[1] :]
        self.usage["requests"] += 1
        self.usage["prompt_tokens"] += int(ids.shape[1])
        self.usage["completion_tokens"] += int(new.numel())
        text = tok.decode(new, skip_special_tokens=True)
        return parse(text) if parse is not None else text

    def yes_probability(self, messages: list[dict]) -> float:
        """P(Yes) / (P(Yes) + P(No)) for the first answer token: a graded prediction, so AUROC is direct."""
        import torch

        ids = self._prompt_ids(messages)
        with torch.no_grad():
            logits = self.lm.model(input_ids=ids, use_cache=False).logits[0, -1].float()
        self.usage["requests"] += 1
        self.usage["prompt_tokens"] += int(ids.shape[1])
        two = torch.stack([logits[self._yes], logits[self._no]]).softmax(0)
        return float(two[0])


def client_from_env(
    url: str | None = None, model: str | None = None, api_key: str | None = None, *, scorer: bool = False, lm=None, **kw
):
    """An HTTP client from flags or environment; the local model when neither names a URL and `lm` is given."""
    url = url or (os.environ.get(ENV_SCORER_URL) if scorer else None) or os.environ.get(ENV_URL)
    model = model or (os.environ.get(ENV_SCORER_MODEL) if scorer else None) or os.environ.get(ENV_MODEL)
    if url in (None, "", "local"):
        if lm is None:
            raise LLMError(f"no explainer endpoint: pass --explainer-url / set ${ENV_URL}, or use the local model")
        return LocalChatClient(lm)
    return HTTPChatClient(url, model or "default", api_key or os.environ.get(ENV_KEY), **kw)
