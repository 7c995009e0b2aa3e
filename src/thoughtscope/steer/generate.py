"""Seeded, batched, streaming generation with a KV cache, steered or not.

Our own sampling loop (rather than `model.generate`) because the steering hooks must know which columns
of each forward pass are prompt and which are generated: with a KV cache every pass after the first
sees only the new token, so the loop tells the `Steerer` the cache length before each pass. Prompts are
left-padded, so every prompt ends at the same column and "generated" simply means column ≥ prompt width.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..models import LoadedModel, pad_batch
from .config import GenerationConfig, _check_finite  # noqa: F401  (GenerationConfig: re-exported)
from .interventions import Steerer, SteerError

Prompt = "str | list[dict]"  # a user message, or a whole chat as [{"role": ..., "content": ...}, ...]


@dataclass
class Generation:
    prompt: str | list[dict]
    text: str
    token_ids: list[int]
    prompt_ids: list[int] = field(repr=False, default_factory=list)


@dataclass
class TokenEvent:
    """One streamed token: row of the batch, its id, the new text it adds, and whether the row is done."""

    row: int
    token_id: int
    text: str
    done: bool


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(lm: LoadedModel, prompt, *, chat: bool | None = None, system: str | None = None) -> list[int]:
    """Token ids of one prompt: through the chat template when wanted and available, else BOS + text."""
    tok = lm.tokenizer
    use_chat = has_chat_template(tok) if chat is None else chat
    if use_chat and not has_chat_template(tok):
        raise SteerError(f"chat mode asked for, but the tokenizer of {lm.name} has no chat template")
    if use_chat:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": system}] + messages
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tok(text, add_special_tokens=False)["input_ids"])
    if not isinstance(prompt, str):
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in prompt) + "\nassistant:"
    ids = list(tok(prompt, add_special_tokens=False)["input_ids"])
    if tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
        ids = [tok.bos_token_id] + ids
    return ids


def encode_prompts(lm: LoadedModel, prompts: Sequence, config: GenerationConfig):
    """Left-padded ids, attention mask and position ids [B, P]; checks the context window first."""
    if isinstance(prompts, str) or not len(prompts):
        raise SteerError("prompts must be a non-empty list of strings (or chats)")
    rows = [format_prompt(lm, p, chat=config.chat, system=config.system) for p in prompts]
    for i, r in enumerate(rows):
        if len(r) + config.max_new_tokens > lm.max_context:
            raise SteerError(
                f"prompt {i} has {len(r)} tokens; with max_new_tokens={config.max_new_tokens} that exceeds the "
                f"context window of {lm.name} ({lm.max_context} tokens): shorten the prompt or lower max_new_tokens"
            )
    ids, mask = pad_batch(rows, lm.pad_id, left=True)
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    dev = lm.device
    return ids.to(dev), mask.to(dev), pos.to(dev), rows


def eos_ids(lm: LoadedModel) -> set[int]:
    out = set()
    for src in (getattr(lm.model, "generation_config", None), lm.tokenizer):
        e = getattr(src, "eos_token_id", None)
        if isinstance(e, int):
            out.add(e)
        elif isinstance(e, (list, tuple)):
            out.update(int(x) for x in e)
    return out


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """Next token per row: greedy at temperature 0, else nucleus sampling with the given generator."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        keep = (sp.cumsum(-1) - sp) < top_p  # always keeps the most likely token
        sp = sp * keep
        choice = torch.multinomial(sp / sp.sum(-1, keepdim=True), 1, generator=gen)
        return si.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


_LOGITS_KW: dict[type, bool] = {}


def _forward(lm: LoadedModel, ids, mask, pos, past):
    """One cached forward pass returning only the last column's logits (the vocab projection is costly)."""
    cls = type(lm.model)
    kw = dict(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    kw[_cache_kw(cls)] = past
    if _LOGITS_KW.get(cls, True):
        try:
            out = lm.model(**kw, logits_to_keep=1)
            _LOGITS_KW[cls] = True
            return out.logits[:, -1], _cache_of(out)
        except TypeError:
            _LOGITS_KW[cls] = False
    out = lm.model(**kw)
    return out.logits[:, -1], _cache_of(out)


_CACHE_KW: dict[type, str] = {}


def _cache_kw(cls: type) -> str:
    """The KV-cache argument's name: `cache` in recent transformers, `past_key_values` before (now deprecated)."""
    if cls not in _CACHE_KW:
        import inspect

        _CACHE_KW[cls] = "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"
    return _CACHE_KW[cls]


def _cache_of(out):
    if "cache" in out:
        return out["cache"]
    return out.past_key_values


class _TransformersSteps:
    """Called with step n, the next logits [B, V]; `next_ids` [B, 1] is what the previous step sampled. This one
    runs the model's own forward with transformers' cache (any architecture, any hooks)."""

    def __init__(self, lm: LoadedModel, ids, mask, pos):
        self.lm, self.ids, self.mask, self.pos, self.past = lm, ids, mask, pos, None

    def __call__(self, step: int) -> torch.Tensor:
        if step:
            B = self.ids.shape[0]
            self.ids, self.pos = self.next_ids, self.pos[:, -1:] + 1
            self.mask = torch.cat([self.mask, torch.ones((B, 1), dtype=self.mask.dtype, device=self.mask.device)], 1)
        logits, self.past = _forward(self.lm, self.ids, self.mask, self.pos, self.past)
        return logits


class _LeanSteps:
    """thoughtscope's decode loop (`decoding.LeanDecoder`): the same tokens, less work per step."""

    def __init__(self, decoder, ids, mask, pos):
        self.decoder, self.ids, self.mask, self.pos = decoder, ids, mask, pos

    def __call__(self, step: int) -> torch.Tensor:
        if step == 0:
            return self.decoder.prefill(self.ids, self.mask, self.pos)
        return self.decoder.step(self.next_ids)


def _stepper(lm: LoadedModel, config: GenerationConfig, ids, mask, pos) -> _TransformersSteps | _LeanSteps:
    """The lean loop where the model and the hooks now installed allow it (decoder "auto"), else transformers'."""
    if config.decoder != "transformers":
        from ..decoding import LeanDecoder, lean_reason

        max_len = ids.shape[1] + config.max_new_tokens
        reason = lean_reason(lm.model, max_len=max_len)
        if reason is None:
            dec = LeanDecoder(lm.model, ids.shape[0], max_len, precision=config.weights)
            return _LeanSteps(dec, ids, mask, pos)
        if config.weights != "exact":
            raise SteerError(
                f"weights={config.weights!r} need the lean decoder, which cannot run {lm.name}: {reason} "
                "(use weights='exact')"
            )
        if config.decoder == "lean":
            raise SteerError(f"the lean decoder cannot run {lm.name}: {reason} (use decoder='transformers')")
    return _TransformersSteps(lm, ids, mask, pos)


class _Run:
    """One generation run: iterate for TokenEvents; afterwards `out_ids` / `rows` hold the result."""

    def __init__(self, lm: LoadedModel, prompts: Sequence, steerer: Steerer, config: GenerationConfig):
        self.lm, self.steerer, self.config = lm, steerer, config
        self.prompts = list(prompts) if not isinstance(prompts, str) else prompts
        # Everything is validated here, before the first forward pass.
        self.ids, self.mask, self.pos, self.rows = encode_prompts(lm, self.prompts, config)
        self.out_ids: list[list[int]] = [[] for _ in self.rows]

    def __iter__(self) -> Iterator[TokenEvent]:
        lm, config, steerer = self.lm, self.config, self.steerer
        ids, mask, pos = self.ids, self.mask, self.pos
        B, P = ids.shape
        gen = torch.Generator(device=lm.device).manual_seed(int(config.seed))
        stops = eos_ids(lm) if config.stop_at_eos else set()
        stop_t = torch.tensor(sorted(stops) or [-1], device=lm.device)
        done = torch.zeros(B, dtype=torch.bool, device=lm.device)
        texts = [""] * B
        pad = lm.pad_id
        with torch.inference_mode(), steerer.active(prompt_len=P, offset=0):
            forward = _stepper(lm, config, ids, mask, pos)
            for step in range(config.max_new_tokens):
                steerer.ctx.offset = 0 if step == 0 else P + step - 1
                logits = forward(step)
                nxt = sample(logits, config.temperature, config.top_p, gen)
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                is_stop = torch.isin(nxt, stop_t) & ~done
                last = step == config.max_new_tokens - 1
                for b, (t, stop, was_done) in enumerate(zip(nxt.tolist(), is_stop.tolist(), done.tolist())):
                    if was_done:
                        continue
                    if not stop:
                        self.out_ids[b].append(t)
                    new_text = lm.tokenizer.decode(self.out_ids[b], skip_special_tokens=True)
                    finished = stop or last
                    if new_text.endswith("\ufffd") and not finished:
                        delta = ""  # an incomplete UTF-8 character: hold it back until its last byte arrives
                    else:
                        delta, texts[b] = new_text[len(texts[b]) :], new_text
                    yield TokenEvent(b, t, delta, finished)
                done = done | is_stop
                if bool(done.all()):
                    break
                forward.next_ids = nxt[:, None]

    def results(self) -> list[Generation]:
        tok = self.lm.tokenizer
        return [
            Generation(p, tok.decode(o, skip_special_tokens=True), o, r)
            for p, o, r in zip(self.prompts, self.out_ids, self.rows)
        ]


def stream(
    lm: LoadedModel,
    prompts: Sequence,
    interventions: Sequence = (),
    config: GenerationConfig | None = None,
    *,
    steerer: Steerer | None = None,
) -> Iterator[TokenEvent]:
    """Yield a TokenEvent per row and step (for a terminal or a server-sent-events stream).

    Prompts, interventions and the context window are checked when this is called, before any forward pass.
    """
    steerer = steerer if steerer is not None else Steerer(lm, interventions)
    return iter(_Run(lm, prompts, steerer, config or GenerationConfig()))


def generate(
    lm: LoadedModel,
    prompts: Sequence,
    interventions: Sequence = (),
    config: GenerationConfig | None = None,
    *,
    on_token: Callable[[TokenEvent], None] | None = None,
    steerer: Steerer | None = None,
) -> list[Generation]:
    """Generate for a batch of prompts (seeded); on_token, if given, sees every TokenEvent as it is produced."""
    steerer = steerer if steerer is not None else Steerer(lm, interventions)
    run = _Run(lm, prompts, steerer, config or GenerationConfig())
    for ev in run:
        if on_token is not None:
            on_token(ev)
    return run.results()


@dataclass
class Comparison:
    prompt: str | list[dict]
    unsteered: str
    steered: str


def compare(
    lm: LoadedModel,
    prompts: Sequence,
    interventions: Sequence,
    config: GenerationConfig | None = None,
    *,
    on_token: Callable[[str, TokenEvent], None] | None = None,
) -> list[Comparison]:
    """Unsteered and steered answers from the same seed, so the only difference is the intervention."""
    config = config or GenerationConfig()
    steerer = Steerer(lm, interventions)  # validate before generating anything
    _Run(lm, prompts, steerer, config)  # checks prompts / context window too
    cb = (lambda tag: lambda ev: on_token(tag, ev)) if on_token else (lambda tag: None)
    base = generate(lm, prompts, (), config, on_token=cb("unsteered"))
    steered = generate(lm, prompts, config=config, steerer=steerer, on_token=cb("steered"))
    return [Comparison(b.prompt, b.text, s.text) for b, s in zip(base, steered)]
