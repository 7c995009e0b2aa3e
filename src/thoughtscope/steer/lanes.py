"""Several answers to one prompt generated in lockstep from the same seed: steered, unsteered, prompt-only baseline.

`generate`'s iterator keeps its steering hooks installed between tokens, so two of them cannot be
interleaved (the unsteered pass would run under the steered hooks). Here every lane has its own KV cache
and its own seeded generator, and a lane's hooks are installed only around that lane's forward pass.
Each lane therefore produces exactly what `generate(lm, [prompt], its_interventions, its_config)` does,
token for token, while a viewer sees all lanes grow side by side. Lanes advance in the order given, so
the first lane's first token arrives after one prefill, as with plain `generate`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..models import LoadedModel
from .generate import (
    GenerationConfig,
    TokenEvent,
    _stepper,
    eos_ids,
    format_prompt,
    has_chat_template,
    sample,
)
from .interventions import Steerer, SteerError


@dataclass
class Lane:
    """One column: a name, its interventions and (optionally) its own system prompt (put before the prompt text
    when the model has no chat template)."""

    name: str
    interventions: Sequence = ()
    system: str | None = None
    steerer: Steerer | None = field(default=None, repr=False)


def stream_lanes(
    lm: LoadedModel,
    prompt,
    lanes: Sequence[Lane],
    config: GenerationConfig | None = None,
    *,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[tuple[str, TokenEvent]]:
    """Yield (lane name, TokenEvent) as every lane grows by one token per round; same seed in every lane.

    Everything is validated when this is called (interventions, prompts, context window), before any
    forward pass; `should_stop`, checked between tokens, ends all lanes early (a deadline, a closed page).
    """
    config = config or GenerationConfig()
    if not lanes:
        raise SteerError("give at least one lane")
    names = [ln.name for ln in lanes]
    if len(set(names)) != len(names):
        raise SteerError(f"lane names must differ, got {names}")
    states = []
    for ln in lanes:
        steerer = ln.steerer if ln.steerer is not None else Steerer(lm, ln.interventions)
        system = ln.system if ln.system else config.system
        chat = has_chat_template(lm.tokenizer) if config.chat is None else config.chat
        lane_prompt = prompt
        if system and not chat and isinstance(prompt, str):  # no chat template: the instruction goes before the text
            lane_prompt = f"{system}\n\n{prompt}"
        row = format_prompt(lm, lane_prompt, chat=config.chat, system=system)
        if len(row) + config.max_new_tokens > lm.max_context:
            raise SteerError(
                f"the prompt of lane {ln.name!r} has {len(row)} tokens; with max_new_tokens="
                f"{config.max_new_tokens} that exceeds the context window of {lm.name} "
                f"({lm.max_context} tokens)"
            )
        states.append(_LaneState(lm, ln.name, row, steerer, config))
    return _rounds(states, config, should_stop)


class _LaneState:
    def __init__(self, lm: LoadedModel, name: str, row: list[int], steerer: Steerer, config: GenerationConfig):
        dev = lm.device
        self.lm, self.name, self.steerer = lm, name, steerer
        self.P = len(row)
        self.ids = torch.tensor([row], dtype=torch.long, device=dev)
        self.gen = torch.Generator(device=dev).manual_seed(int(config.seed))
        self.forward = None  # made on the first step, with this lane's hooks installed (they decide the path)
        self.out: list[int] = []
        self.text = ""
        self.done = False

    def step(self, i: int, config: GenerationConfig, stops: set[int]) -> TokenEvent:
        lm = self.lm
        with self.steerer.active(prompt_len=self.P, offset=0 if i == 0 else self.P + i - 1):
            if self.forward is None:
                pos = torch.arange(self.P, device=self.ids.device)[None]
                self.forward = _stepper(lm, config, self.ids, torch.ones_like(self.ids), pos)
            logits = self.forward(i)
        t = int(sample(logits, config.temperature, config.top_p, self.gen)[0])
        stop = t in stops
        last = i == config.max_new_tokens - 1
        if not stop:
            self.out.append(t)
        new_text = lm.tokenizer.decode(self.out, skip_special_tokens=True)
        finished = stop or last
        if new_text.endswith("\ufffd") and not finished:
            delta = ""  # an incomplete UTF-8 character: held back until its last byte arrives
        else:
            delta, self.text = new_text[len(self.text) :], new_text
        self.done = finished
        self.forward.next_ids = torch.tensor([[t]], dtype=torch.long, device=self.ids.device)
        return TokenEvent(0, t, delta, finished)


def _rounds(states: list[_LaneState], config: GenerationConfig, should_stop) -> Iterator[tuple[str, TokenEvent]]:
    stops = eos_ids(states[0].lm) if config.stop_at_eos else set()
    with torch.inference_mode():
        for i in range(config.max_new_tokens):
            for st in states:
                if st.done:
                    continue
                if should_stop is not None and should_stop():
                    return
                yield st.name, st.step(i, config, stops)
            if all(st.done for st in states):
                return
