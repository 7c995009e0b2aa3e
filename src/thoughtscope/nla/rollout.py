"""The AV's side of a GRPO step done once per vector instead of once per sample, and only where the loss looks.

In a GRPO step the G samples of one vector share their whole prompt (the vector enters at one marker token),
and the loss reads log-probs of the explanation tokens only. `Verbalizer.generate_ids` and
`Verbalizer.token_logprobs` nevertheless run the prompt G times and the LM head over every prompt position,
twice (reference and policy). Here the prompt runs once per vector, its KV cache is repeated over the group
(differentiably, so the policy gradient still flows through the prompt), and logits are computed on the
explanation tokens only. The numbers are the same as the plain path's (tests compare tokens, log-probs, loss
and gradients on a tiny model); only rounding may differ.

The sampler runs on thoughtscope's lean decoder where the AV's model allows it (`decoding.LeanDecoder`: the
same logits as transformers' forward, LoRA adapter and injection hook included), else on transformers' forward
with its cache. It mirrors HF ``generate``'s sampling step for step (the marker suppressed, temperature, softmax,
one ``torch.multinomial`` over the whole batch, finished rows padded with the end id), so a seed gives the
same tokens as ``generate`` does: ``multinomial`` draws one exponential per vocabulary entry and row whatever
the probabilities, so the random stream stays aligned. Unlike ``generate`` it stops running a row through
the model once the row has ended (its draws are still made, and discarded).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .core import NLAError, check_vectors

# generation settings that would add a logits processor the sampler does not reproduce; with any of these set
# on the model, `sample_group` defers to HF generate
_PROCESSOR_SETTINGS = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": None,
    "bad_words_ids": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "encoder_repetition_penalty": 1.0,
    "exponential_decay_length_penalty": None,
    "sequence_bias": None,
    "begin_suppress_tokens": None,
}


_HEAD_ONLY = ("summary_", "classifier_")


@functools.cache
def _forward_args(cls: type) -> tuple[str, bool]:
    """The name the model's forward uses for the KV cache (transformers 5: `cache`, 4.x: `past_key_values`), and
    whether it can skip the LM head on positions nobody reads (`logits_to_keep`)."""
    params = inspect.signature(cls.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def _hf_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _run(model, ids: torch.Tensor, att: torch.Tensor, cache=None, *, last_only: bool = False):
    """(logits, cache) of a forward that continues `cache` (or starts one)."""
    cache_kw, has_keep = _forward_args(type(_hf_model(model)))
    kw = {cache_kw: cache} if cache is not None else {}
    if last_only and has_keep:
        kw["logits_to_keep"] = 1
    out = model(input_ids=ids, attention_mask=att, use_cache=True, **kw)
    logits = out.logits[:, -1:] if last_only else out.logits
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = out.past_key_values
    return logits, new_cache


def prompt_pass(av, vectors: torch.Tensor, group: int = 1) -> tuple[torch.Tensor, object]:
    """The AV prompt run once per vector: logits at its last position and the KV cache, each repeated `group`
    times per vector (rows v0, v0, …, v1, …, as `repeat_interleave` orders them)."""
    v = check_vectors(vectors, av.cfg.d_model)
    ids = torch.tensor([av.prompt] * v.shape[0], device=av.device)
    with av.injecting(v):
        logits, cache = _run(av.model, ids, torch.ones_like(ids), last_only=True)
    logits = logits[:, -1]
    if group > 1:
        cache.batch_repeat_interleave(group)
        logits = logits.repeat_interleave(group, 0)
    return logits, cache


def unreproduced_settings(av) -> list[str]:
    """Generation settings of the AV's model that would add a logits processor `sample_group` does not
    reproduce (it then defers to HF generate); empty for the models thoughtscope trains NLAs on."""
    gc = getattr(av.model, "generation_config", None)
    if gc is None:
        return []
    return [k for k, default in _PROCESSOR_SETTINGS.items() if getattr(gc, k, None) not in (None, default)]


class _CachedSteps:
    """transformers' forward over a DynamicCache: the prompt once per vector, its cache repeated over the group."""

    def __init__(self, av, vectors, group):
        self.av = av
        self.logits, self.cache = prompt_pass(av, vectors, group)
        B = self.logits.shape[0]
        self.att = torch.ones(B, len(av.prompt), dtype=torch.long, device=self.logits.device)

    def select(self, local: torch.Tensor) -> None:
        self.cache.batch_select_indices(local)
        self.att = self.att[local]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.att = torch.cat([self.att, self.att.new_ones(len(tokens), 1)], 1)
        logits, self.cache = _run(self.av.model, tokens[:, None], self.att, self.cache, last_only=True)
        return logits[:, -1]


class _LeanSteps:
    """The same on thoughtscope's lean decoder (`decoding.LeanDecoder`): the same logits, less work per token."""

    def __init__(self, av, vectors, group, max_new_tokens: int):
        from ..decoding import LeanDecoder

        v = check_vectors(vectors, av.cfg.d_model)
        ids = torch.tensor([av.prompt] * v.shape[0], device=av.device)
        P = ids.shape[1]
        self.dec = LeanDecoder(_hf_model(av.model), ids.shape[0], P + max_new_tokens)
        with av.injecting(v):
            logits = self.dec.prefill(
                ids, torch.ones_like(ids), torch.arange(P, device=ids.device)[None].expand_as(ids)
            )
        if group > 1:
            self.dec.repeat_interleave(group)
            logits = logits.repeat_interleave(group, 0)
        self.logits = logits

    def select(self, local: torch.Tensor) -> None:
        self.dec.select(local)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.dec.step(tokens[:, None])


def _steps(av, vectors, group, max_new_tokens: int):
    """The lean decoder where the AV's model allows it (its LoRA adapter and injection hook included; eval mode,
    as a GRPO step samples), else transformers' forward."""
    from ..decoding import lean_reason

    if lean_reason(_hf_model(av.model), max_len=len(av.prompt) + max_new_tokens) is None:
        return _LeanSteps(av, vectors, group, max_new_tokens)
    return _CachedSteps(av, vectors, group)


def _sample(av, vectors, group, do_sample, temperature, max_new_tokens):
    n_new = max_new_tokens or av.cfg.max_new_tokens
    run = _steps(av, vectors, group, n_new)
    logits = run.logits
    B, dev = logits.shape[0], logits.device
    pad = av.end_ids[0] if av.end_ids else 0
    ends = torch.tensor(av.end_ids, device=dev)
    unfinished = torch.ones(B, dtype=torch.long, device=dev)
    rows = torch.arange(B, device=dev)  # the rows still decoding, whose logits `logits` holds
    out = []
    for t in range(n_new):
        live = logits.float().clone()
        live[:, av.cfg.marker_id] = -float("inf")
        if len(rows) < B:
            # a finished row draws from a placeholder distribution and its draw is replaced by the pad below:
            # the random stream is consumed for every row, as generate does, so the live rows' draws match
            scores = live.new_zeros(B, live.shape[1])
            scores[rows] = live
        else:
            scores = live
        if do_sample:
            if temperature != 1.0:
                scores = scores / temperature
            nxt = torch.multinomial(torch.softmax(scores, -1), num_samples=1).squeeze(1)
        else:
            nxt = scores.argmax(-1)
        nxt = nxt * unfinished + pad * (1 - unfinished)
        out.append(nxt)
        unfinished = unfinished & ~torch.isin(nxt, ends)
        if t == n_new - 1 or not bool(unfinished.any()):
            break
        keep = unfinished[rows].bool()
        if not bool(keep.all()):  # drop finished rows from the forward passes (and their cache)
            local = keep.nonzero().squeeze(1)
            run.select(local)
            rows = rows[local]
        logits = run.step(nxt[rows])
    return torch.stack(out, 1)


@torch.no_grad()
def sample_group(
    av,
    vectors: torch.Tensor,
    *,
    group: int = 1,
    do_sample: bool = True,
    temperature: float = 1.0,
    max_new_tokens: int | None = None,
) -> torch.Tensor:
    """Completion ids [N·group, ≤ max_new_tokens], padded with the end id: what `av.generate_ids(vectors,
    samples=group, …)` returns for the same seed, with the prompt run once per vector."""
    if unreproduced_settings(av):
        return av.generate_ids(
            vectors, samples=group, do_sample=do_sample, temperature=temperature, max_new_tokens=max_new_tokens
        )
    return _sample(av, vectors, group, do_sample, temperature, max_new_tokens)


def dropout_free(module: torch.nn.Module) -> bool:
    """True when train and eval mode compute the same function (no dropout module or config rate above 0)."""
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in module.modules()):
        return False
    for m in module.modules():
        conf = getattr(m, "config", None)
        if hasattr(conf, "to_dict"):
            for k, v in conf.to_dict().items():
                if k.startswith(_HEAD_ONLY):  # dropouts of classification heads a causal LM never runs
                    continue
                if ("dropout" in k or "pdrop" in k) and isinstance(v, (int, float)) and v > 0:
                    return False
    return True


def valid_mask(av, comp: torch.Tensor) -> torch.Tensor:
    """True on each completion's tokens up to and including its first end token."""
    is_end = torch.isin(comp, torch.tensor(av.end_ids, device=comp.device)).long()
    return (is_end.cumsum(1) - is_end) == 0


def completion_logprobs(av, vectors: torch.Tensor, comp: torch.Tensor, valid: torch.Tensor, group: int) -> torch.Tensor:
    """log p(comp_t | prompt, comp_<t, vector) [N·group, L]: `token_logprobs` on prompt + completion, read at the
    completion's positions, with the prompt run once per vector and the LM head only on those positions."""
    first, cache = prompt_pass(av, vectors, group)
    comp = comp.to(first.device)
    lp = [torch.log_softmax(first.float(), -1).gather(-1, comp[:, :1])]
    if comp.shape[1] > 1:
        prompt = torch.ones(comp.shape[0], len(av.prompt), dtype=torch.long, device=comp.device)
        att = torch.cat([prompt, valid[:, :-1].long().to(comp.device)], 1)
        rest, _ = _run(av.model, comp[:, :-1], att, cache)
        lp.append(torch.log_softmax(rest.float(), -1).gather(-1, comp[:, 1:, None]).squeeze(-1))
    return torch.cat(lp, 1)


@contextmanager
def reference_weights(av) -> Iterator[None]:
    """`av.reference()` by swapping the trainable tensors instead of reloading peft state dicts: the same
    weights, without walking the model's state dict twice per step."""
    ref = getattr(av, "_ref_tensors", None)
    if ref is None:
        raise NLAError("no reference AV set: call set_reference() first")
    params = av.trainable_parameters()
    # swapped, not copied: nothing is allocated and the parameters' version counters do not move
    current = [p.data for p in params]
    for p, r in zip(params, ref):
        p.data = r
    try:
        yield
    finally:
        for p, c in zip(params, current):
            p.data = c
