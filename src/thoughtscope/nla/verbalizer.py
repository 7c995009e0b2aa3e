"""The activation verbalizer (AV): a LoRA copy of the target that reads one vector and writes words.

The vector enters through exactly one token: the marker inside ``<concept>…</concept>``. A forward
hook on the input-embedding module replaces that token's embedding with the vector rescaled to
``injection_scale`` and leaves every other embedding untouched. Doing it in a hook (rather than
building ``inputs_embeds`` by hand) means HF ``generate``, LoRA and the training forward all see
the same injection with no special code path; decode steps with a KV cache (one new token, no
marker) are skipped.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..models import pad_batch, pad_id
from .core import NLAConfig, NLAError, check_vectors

RARE_MARKER_CHARS = [chr(c) for c in range(0x3200, 0x3400)]


def pick_marker(tokenizer) -> tuple[str, int]:
    """A single token that never occurs in text: a rare CJK-compatibility character (as published), else an
    unused added/special token of the tokenizer (SmolLM2 has none of those characters as one token)."""
    for ch in RARE_MARKER_CHARS:
        ids = tokenizer(ch, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and tokenizer.decode(ids) == ch:
            return ch, ids[0]
    reserved = set(tokenizer.all_special_tokens)
    added = getattr(tokenizer, "get_added_vocab", lambda: {})()
    for text, tid in sorted(added.items(), key=lambda kv: -kv[1]):
        if text not in reserved and "im_" not in text:
            return text, tid
    for ch in "\x7f\x1f\x1e\x1d":
        ids = tokenizer(ch, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return ch, ids[0]
    raise NLAError("could not find a single-token marker in this tokenizer: pass marker= explicitly")


def _as_list(x) -> list[int]:
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if x and isinstance(x[0], list):
        x = x[0]
    return list(x)


def prompt_ids(tokenizer, cfg: NLAConfig) -> list[int]:
    """Token ids of the AV prompt: a chat turn with the marker in <concept> tags, ending in the answer's opening tag."""
    user = cfg.av_template.format(marker=cfg.marker)
    if getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + [
            {"role": "user", "content": user}
        ]
        ids = _as_list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
    else:
        text = (f"{cfg.system_prompt}\n" if cfg.system_prompt else "") + f"User: {user}\nAssistant:"
        ids = _as_list(tokenizer(text, add_special_tokens=False))
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id] + ids
    if cfg.response_prefix:
        ids = ids + _as_list(tokenizer(cfg.response_prefix, add_special_tokens=False))
    n = ids.count(cfg.marker_id)
    if n != 1:
        raise NLAError(
            f"the AV prompt contains the marker token id {cfg.marker_id} ({cfg.marker!r}) {n} times; "
            f"expected exactly once (check av_template / marker)"
        )
    return ids


def end_ids(tokenizer) -> list[int]:
    """Tokens that end an answer: eos and, for chat models, the end-of-turn token."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for t in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(t) if t in tokenizer.get_vocab() else None
        if tid is not None and tid not in ids:
            ids.append(tid)
    return ids


def response_ids(tokenizer, cfg: NLAConfig, explanation: str) -> list[int]:
    """What the AV is trained to write after the prompt: explanation, closing tag, end token."""
    ids = _as_list(tokenizer(explanation + cfg.response_suffix, add_special_tokens=False))
    return ids + end_ids(tokenizer)[:1]


def parse_response(cfg: NLAConfig, text: str) -> tuple[str, bool]:
    """The explanation inside the tags and whether the answer was well formed (closing tag present)."""
    opening = cfg.response_prefix or "<explanation>"
    done = cfg.response_suffix in text
    body = text.split(cfg.response_suffix, 1)[0] if done else text
    body = body.split(opening, 1)[-1].strip()
    return body, done and bool(body)


def lora_targets(model: nn.Module, wanted: Sequence[str]) -> list[str] | str:
    names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    hit = [w for w in wanted if w in names]
    return hit if hit else "all-linear"


def add_lora(model: nn.Module, cfg: NLAConfig):
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model, cfg.lora_targets)
    lc = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=targets, bias="none")
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` while wrapping; the call is peft's, not
        # ours, and the warning would otherwise greet every NLA load.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lc)


class Verbalizer(nn.Module):
    """AV = LoRA copy of the target + an embedding hook that injects one vector per row at the marker."""

    def __init__(self, lm, cfg: NLAConfig, *, lora: bool = True):
        super().__init__()
        self.cfg = cfg.check()
        self.tokenizer = lm.tokenizer
        base = copy.deepcopy(lm.model)
        for p in base.parameters():
            p.requires_grad_(False)
        self.model = add_lora(base, cfg) if lora else base
        self._vectors: torch.Tensor | None = None
        emb = self.model.get_input_embeddings()
        self._handle = emb.register_forward_hook(self._inject)
        self.prompt = prompt_ids(self.tokenizer, cfg)
        self.end_ids = end_ids(self.tokenizer)

    # ------------------------------------------------------------------ injection
    def _inject(self, module, args, output):
        if self._vectors is None:
            return None
        ids = args[0] if args else None
        if ids is None:
            raise NLAError("vector injection needs input_ids (the marker is found by its token id)")
        if ids.shape[1] == 1:  # a cached decode step: the marker was in the prompt
            return None
        mask = ids == self.cfg.marker_id
        counts = mask.sum(1)
        if (counts != 1).any():
            bad = counts.tolist()
            raise NLAError(
                f"each row must contain the marker token {self.cfg.marker!r} (id {self.cfg.marker_id}) "
                f"exactly once; counts per row: {bad}"
            )
        if self._vectors.shape[0] != ids.shape[0]:
            raise NLAError(f"{self._vectors.shape[0]} vectors for a batch of {ids.shape[0]} rows")
        v = self._vectors.to(output.dtype)
        v = v * (self.cfg.injection_scale / v.norm(dim=-1, keepdim=True).clamp_min(1e-8))
        out = output.clone()
        out[mask] = v
        return out

    @contextmanager
    def injecting(self, vectors: torch.Tensor) -> Iterator[None]:
        """Within the block every forward pass of the AV injects these vectors (one per batch row)."""
        if self.cfg.injection_scale <= 0:
            raise NLAError("injection_scale is not set (measure it with `nla data` or set it in the config)")
        self._vectors = check_vectors(vectors, self.cfg.d_model).to(self.device)
        try:
            yield
        finally:
            self._vectors = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ training forward
    def batch(self, explanations: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt + response ids (right padded), attention mask and a mask of the response tokens."""
        rows = [self.prompt + response_ids(self.tokenizer, self.cfg, e) for e in explanations]
        ids, att = pad_batch(rows, pad_id(self.tokenizer))
        resp = torch.zeros_like(ids, dtype=torch.bool)
        for i, r in enumerate(rows):
            resp[i, len(self.prompt) : len(r)] = True
        return ids.to(self.device), att.to(self.device), resp.to(self.device)

    def token_logprobs(self, vectors: torch.Tensor, ids: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        """log p(token_t | tokens_<t, vector) for t ≥ 1; [B, T-1]."""
        with self.injecting(vectors):
            logits = self.model(input_ids=ids, attention_mask=att, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)

    def sft_loss(self, vectors: torch.Tensor, explanations: Sequence[str]) -> torch.Tensor:
        """Cross-entropy on the response tokens with the vector injected."""
        ids, att, resp = self.batch(explanations)
        lp = self.token_logprobs(vectors, ids, att)
        m = resp[:, 1:].float()
        return -(lp * m).sum() / m.sum()

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_ids(
        self,
        vectors: torch.Tensor,
        *,
        samples: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        max_new_tokens: int | None = None,
    ) -> torch.Tensor:
        """Completion token ids [N·samples, ≤ max_new_tokens] (padded with the end id)."""
        v = check_vectors(vectors, self.cfg.d_model).repeat_interleave(samples, 0)
        ids = torch.tensor([self.prompt] * v.shape[0], device=self.device)
        att = torch.ones_like(ids)
        kw = dict(
            do_sample=do_sample,
            max_new_tokens=max_new_tokens or self.cfg.max_new_tokens,
            eos_token_id=self.end_ids,
            pad_token_id=self.end_ids[0] if self.end_ids else 0,
            suppress_tokens=[self.cfg.marker_id],
        )
        if do_sample:
            kw.update(temperature=temperature, top_k=0, top_p=1.0)
        with self.injecting(v):
            out = self.model.generate(input_ids=ids, attention_mask=att, **kw)
        return out[:, ids.shape[1] :]

    def decode(self, completion: torch.Tensor) -> list[tuple[str, bool]]:
        """(explanation, well_formed) per row; truncated answers (no closing tag) are not well formed."""
        res = []
        for row in completion.tolist():
            cut = len(row)
            for j, t in enumerate(row):
                if t in self.end_ids:
                    cut = j
                    break
            text = self.tokenizer.decode(row[:cut], skip_special_tokens=True)
            res.append(parse_response(self.cfg, text))
        return res

    def explain(
        self, vectors: torch.Tensor, *, samples: int = 1, do_sample: bool = False, temperature: float = 1.0
    ) -> list[str]:
        from .rollout import sample_group  # the same ids as generate_ids, with the prompt run once per vector

        comp = sample_group(self, vectors, group=samples, do_sample=do_sample, temperature=temperature)
        return [e for e, _ in self.decode(comp)]

    # ------------------------------------------------------------------ adapters
    def adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model)

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        res = set_peft_model_state_dict(self.model, {k: v.float() for k, v in state.items()})
        unexpected = getattr(res, "unexpected_keys", [])
        if unexpected:
            raise NLAError(f"AV adapter has {len(unexpected)} keys this model does not know, e.g. {unexpected[0]}")

    @contextmanager
    def reference(self) -> Iterator[None]:
        """The frozen starting point for the RL KL term: the AV with its LoRA switched off, or a snapshot."""
        snap = getattr(self, "_ref_state", None)
        if snap is None:
            raise NLAError("no reference AV set: call set_reference() first")
        current = {k: v.detach().clone() for k, v in self.adapter_state().items()}
        self.load_adapter_state(snap)
        try:
            yield
        finally:
            self.load_adapter_state(current)

    def set_reference(self) -> None:
        """Remember the current (warm-started) adapter as the RL reference policy."""
        self._ref_state = {k: v.detach().clone() for k, v in self.adapter_state().items()}
        # the same weights in parameter order, for `rollout.reference_weights` to swap in without a state-dict load
        self._ref_tensors = [p.detach().clone() for p in self.trainable_parameters()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]
