"""Which layers and positions carry the answer: activation patching, and attribution patching as its fast estimate.

Denoising convention: the model reads the *corrupted* prompt, and one activation (the residual stream after block
L, or block L's attention or MLP output, at position p) is replaced by its value on the *clean* prompt. The effect
on the metric (the logit of a target token minus that of another, at the last position) is normalised so the
corrupted run is 0 and the clean run is 1. Attribution patching estimates every cell at once, to first order:
(clean − corrupted activation) · ∂metric/∂activation on the corrupted run, one forward and one backward pass.
Both maps come out side by side with their Spearman correlation, so the estimate is always shown with how well it
agreed with the real thing on this prompt pair.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..display import lone_token_text, token_texts
from ..errors import CausalError
from ..models import LoadedModel
from ..stats import spearman

STREAMS = ("resid", "attn", "mlp")


def stream_module(lm: LoadedModel, stream: str, layer: int) -> torch.nn.Module:
    """The module whose output is `stream` at block `layer`: the block itself (resid), its attention or its MLP."""
    if stream not in STREAMS:
        raise CausalError(f"stream must be one of {', '.join(STREAMS)}, got {stream!r}")
    if not 0 <= layer < lm.n_layers:
        raise CausalError(f"layer {layer} is out of range: {lm.name} has blocks 0..{lm.n_layers - 1}")
    blk = lm.layers[layer]
    if stream == "resid":
        return blk
    names = ("mlp",) if stream == "mlp" else ("self_attn", "attn", "attention")
    mod = next((getattr(blk, n) for n in names if isinstance(getattr(blk, n, None), torch.nn.Module)), None)
    if mod is None:
        raise CausalError(f"{lm.name}: block {layer} has no {stream} module named {' or '.join(names)}")
    return mod


def _out(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with(output, new: torch.Tensor):
    return (new, *output[1:]) if isinstance(output, tuple) else new


def one_token(lm: LoadedModel, text: str | int, what: str = "target") -> int:
    """The id of `text` as one token, or CausalError naming the tokens it splits into (and a fix when one exists);
    an int is taken as a token id (a byte token has no text of its own to name it by)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if not 0 <= text < lm.vocab_size:
            raise CausalError(f"{what} id {text} is out of range: the vocabulary has {lm.vocab_size} tokens")
        return text
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) == 1:
        return int(ids[0])
    pieces = [lone_token_text(lm.tokenizer, i) for i in ids]
    hint = ""
    if not text.startswith(" ") and len(lm.tokenizer(" " + text, add_special_tokens=False)["input_ids"]) == 1:
        hint = f"; {' ' + text!r} (with its leading space) is one token"
    raise CausalError(f"{what} {text!r} is {len(ids)} tokens {pieces}, not one{hint}")


@dataclass
class PatchPair:
    """A clean and a corrupted prompt of the same length in tokens, and what the metric compares."""

    clean: str
    corrupt: str
    target: str
    against: str | None = None


@dataclass
class PatchResult:
    tokens: list[str]  # the corrupted prompt's tokens (columns of every map)
    clean_tokens: list[str]
    clean_metric: float
    corrupt_metric: float
    patched: dict[str, torch.Tensor] = field(default_factory=dict)  # stream -> [layers, T], normalised
    attributed: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def spearman(self, stream: str) -> float:
        return spearman(self.patched[stream].flatten(), self.attributed[stream].flatten())

    def top_cells(self, stream: str = "resid", n: int = 5) -> list[tuple[int, int, float, float]]:
        """(layer, position, patched, attributed) of the n cells that patching moved most."""
        p = self.patched[stream]
        flat = p.abs().flatten().topk(min(n, p.numel())).indices
        return [
            (
                int(i // p.shape[1]),
                int(i % p.shape[1]),
                float(p.flatten()[i]),
                float(self.attributed[stream].flatten()[i]),
            )
            for i in flat
        ]

    def to_dict(self) -> dict:
        out = {
            "tokens": self.tokens,
            "clean_tokens": self.clean_tokens,
            "clean_metric": self.clean_metric,
            "corrupt_metric": self.corrupt_metric,
            "convention": "denoising: clean activation patched into the corrupted run; 0 = corrupted, 1 = clean",
            "seconds": self.seconds,
        }
        for s in self.patched:
            out[s] = {
                "activation_patching": self.patched[s].tolist(),
                "attribution_patching": self.attributed[s].tolist(),
                "spearman": self.spearman(s),
            }
        if "resid" in self.patched:
            out["atp_spearman"] = self.spearman("resid")
        if self.seconds.get("attribution"):
            out["atp_speedup"] = self.seconds["activation"] / self.seconds["attribution"]
        return out


def _encode_pair(lm: LoadedModel, pair: PatchPair) -> tuple[torch.Tensor, torch.Tensor]:
    clean, _ = lm.tokenize([pair.clean])
    corrupt, _ = lm.tokenize([pair.corrupt])
    if clean.shape[1] != corrupt.shape[1]:
        show = lambda ids: [lone_token_text(lm.tokenizer, i) for i in ids[0].tolist()]  # noqa: E731
        raise CausalError(
            f"the clean and corrupted prompts must have the same number of tokens to be patched position by "
            f"position: clean {clean.shape[1]} {show(clean)}, corrupted {corrupt.shape[1]} {show(corrupt)}"
        )
    return clean, corrupt


def _metric_fn(lm: LoadedModel, pair: PatchPair):
    t = one_token(lm, pair.target, "target")
    a = one_token(lm, pair.against, "--against token") if pair.against else None

    def metric(last_logits: torch.Tensor) -> torch.Tensor:  # [B, V] -> [B]
        m = last_logits[:, t].float()
        return m - last_logits[:, a].float() if a is not None else m

    return metric


def _last_logits(lm: LoadedModel, ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    kw = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": ids}
    try:
        out = lm.model(**kw, use_cache=False, logits_to_keep=1)
    except TypeError:
        out = lm.model(**kw, use_cache=False)
    return out.logits[:, -1]


def _run_capturing(lm: LoadedModel, ids: torch.Tensor, streams: Sequence[str], *, grad: bool):
    """(last logits, {(stream, layer): activation [1, T, d]}) for one prompt, with the graph kept when `grad`."""
    acts: dict[tuple[str, int], torch.Tensor] = {}
    handles = []

    def keep(key):
        def hook(_m, _a, output):
            acts[key] = _out(output)

        return hook

    for s in streams:
        for layer in range(lm.n_layers):
            handles.append(stream_module(lm, s, layer).register_forward_hook(keep((s, layer))))
    try:
        if grad:
            with torch.enable_grad():
                emb = lm.model.get_input_embeddings()(ids).detach().requires_grad_(True)
                logits = _last_logits(lm, ids, emb)
        else:
            with torch.inference_mode():
                logits = _last_logits(lm, ids)
    finally:
        for h in handles:
            h.remove()
    return logits, acts


def attribution_patching(lm: LoadedModel, pair: PatchPair, streams: Sequence[str] = STREAMS) -> PatchResult:
    """Every cell's first-order effect from one clean forward and one corrupted forward + backward."""
    clean, corrupt = _encode_pair(lm, pair)
    metric = _metric_fn(lm, pair)
    t0 = time.perf_counter()
    clean_logits, clean_acts = _run_capturing(lm, clean, streams, grad=False)
    corrupt_logits, acts = _run_capturing(lm, corrupt, streams, grad=True)
    keys = list(acts)
    m = metric(corrupt_logits).sum()
    grads = torch.autograd.grad(m, [acts[k] for k in keys], allow_unused=True)
    c, r = float(metric(clean_logits)), float(m.detach())
    denom = _denominator(c, r)
    res = PatchResult(_pieces(lm, corrupt), _pieces(lm, clean), c, r)
    for s in streams:
        rows = []
        for layer in range(lm.n_layers):
            k = (s, layer)
            g = grads[keys.index(k)]
            diff = (clean_acts[k].float() - acts[k].detach().float())[0]
            rows.append((diff * g[0].float()).sum(-1) if g is not None else torch.zeros(diff.shape[0]))
        res.attributed[s] = torch.stack(rows).detach().cpu() / denom
    res.seconds["attribution"] = time.perf_counter() - t0
    return res


def _denominator(clean: float, corrupt: float) -> float:
    if abs(clean - corrupt) < 1e-6:
        raise CausalError(
            f"the clean and corrupted prompts give the same metric ({clean:.4g}): nothing to attribute; choose a "
            f"corruption that changes the answer, or another target"
        )
    return clean - corrupt


def _pieces(lm: LoadedModel, ids: torch.Tensor) -> list[str]:
    return token_texts(lm.tokenizer, ids[0].tolist())  # whole characters, on the last token of each


def activation_patching(
    lm: LoadedModel, pair: PatchPair, streams: Sequence[str] = STREAMS, *, rows_per_pass: int = 64
) -> PatchResult:
    """Every (stream, layer, position) patched for real: the corrupted prompt run once per cell, cells batched.

    Positions before the first token where the prompts differ are skipped: there the clean and corrupted
    activations are equal (the model is causal), so patching them changes nothing and their effect is 0 exactly.
    """
    clean, corrupt = _encode_pair(lm, pair)
    metric = _metric_fn(lm, pair)
    t0 = time.perf_counter()
    clean_logits, clean_acts = _run_capturing(lm, clean, streams, grad=False)
    with torch.inference_mode():
        base = float(metric(_last_logits(lm, corrupt)))
    c = float(metric(clean_logits))
    denom = _denominator(c, base)
    T = corrupt.shape[1]
    differ = (clean[0] != corrupt[0]).nonzero()
    first = int(differ[0]) if len(differ) else T
    res = PatchResult(_pieces(lm, corrupt), _pieces(lm, clean), c, base)
    for s in streams:
        grid = torch.zeros(lm.n_layers, T)
        for layer in range(lm.n_layers):
            for chunk in torch.arange(first, T).split(rows_per_pass):
                vals = _patched_metrics(lm, s, layer, corrupt, clean_acts[(s, layer)][0], chunk, metric)
                grid[layer, chunk] = (vals - base) / denom
        res.patched[s] = grid
    res.seconds["activation"] = time.perf_counter() - t0
    return res


def _patched_metrics(lm, stream, layer, ids, clean_act, positions, metric) -> torch.Tensor:
    """The metric with row r's activation at `positions[r]` replaced by the clean one, one row per position."""
    R = len(positions)
    rows = torch.arange(R)

    def hook(_m, _a, output):
        h = _out(output).clone()
        h[rows, positions] = clean_act[positions].to(h.dtype)
        return _with(output, h)

    handle = stream_module(lm, stream, layer).register_forward_hook(hook)
    try:
        with torch.inference_mode():
            return metric(_last_logits(lm, ids.expand(R, -1))).float().cpu()
    finally:
        handle.remove()


def patch(lm: LoadedModel, pair: PatchPair, streams: Sequence[str] = STREAMS) -> PatchResult:
    """Activation patching and attribution patching of one pair, in one result (maps, Spearman, timings)."""
    act = activation_patching(lm, pair, streams)
    atp = attribution_patching(lm, pair, streams)
    act.attributed = atp.attributed
    act.seconds.update(atp.seconds)
    return act


def patched_next_tokens(
    lm: LoadedModel, pair: PatchPair, stream: str, layer: int, pos: int, k: int = 5
) -> dict[str, list[tuple[str, float]]]:
    """The next-token top-k of the clean run, the corrupted run, and the corrupted run with one cell patched."""
    clean, corrupt = _encode_pair(lm, pair)
    if not 0 <= pos < corrupt.shape[1]:
        raise CausalError(f"position {pos} is out of range: the prompts have {corrupt.shape[1]} tokens")
    _, acts = _run_capturing(lm, clean, [stream], grad=False)
    ident = lambda logits: logits  # noqa: E731
    with torch.inference_mode():
        runs = {"clean": _last_logits(lm, clean), "corrupted": _last_logits(lm, corrupt)}
    runs["patched"] = _patched_metrics(lm, stream, layer, corrupt, acts[(stream, layer)][0], torch.tensor([pos]), ident)
    out = {}
    for name, logits in runs.items():
        p = torch.softmax(logits[0].float(), -1)
        v, i = p.topk(k)
        out[name] = [(lone_token_text(lm.tokenizer, int(t)), float(x)) for t, x in zip(i, v)]
    return out
