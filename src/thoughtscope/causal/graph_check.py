"""Check an attribution graph against the model: set transcoder features in the real model and measure the logits.

An edit sets one feature of one block to a value (0 ablates it) by adding (value - its activation) times its decoder
row to what that block's MLP writes, so the rest of the MLP's output, error included, stays as the model computes it.
Two modes, both reported by `prompt_check`:

* free: every other block runs as usual (later features respond to the edit through the real MLPs);
* frozen: every block's MLP output is held at its clean value except for the edits, so only the direct paths
  (residual stream and attention, with the model's real attention and norms) carry the edit: the graph's edges;
* linear (a check of the graph itself): frozen, and attention patterns and norm scales frozen too, where an
  ablation moves a logit by exactly its edge.

`prompt_check` and `summarise` ask two questions on prompts no test or tuning saw: does ablating the features the graph
says push the target up the most (by total effect through the graph when the other MLPs are free, by direct effect
when they are held) lower the target logit more than ablating as many random active features of the same blocks
(paired, with a bootstrap interval), and do the graph's direct effects on the target logit predict the measured
frozen-mode effects (Pearson and Spearman over features)?
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import CausalError
from ..models import LoadedModel
from ..sites import Site, capture, mlp_module, mlp_out_module
from ..stats import mean_ci, pearson, spearman
from .graph import AttributionGraph


@dataclass(frozen=True)
class FeatureEdit:
    """Set feature `feature` of block `layer` to `value` (activation units) at position `pos` (None: everywhere)."""

    layer: int
    feature: int
    value: float = 0.0
    pos: int | None = None


@contextlib.contextmanager
def edited(
    lm: LoadedModel, transcoders: Sequence, edits: Sequence[FeatureEdit], *, frozen: Sequence[Tensor] | None = None
) -> Iterator[None]:
    """Inside, the model runs with `edits` applied to its MLP outputs; with `frozen` (`clean_mlp_outputs`) every
    block writes its clean output (its skip path following its input) plus the edits' changes. Works during
    generation too (an edit with pos None applies to every new position)."""
    by_layer: dict[int, list[FeatureEdit]] = {}
    for e in edits:
        if not 0 <= e.layer < len(lm.layers):
            raise CausalError(f"feature edit at block {e.layer}: the model has blocks 0-{len(lm.layers) - 1}")
        if not 0 <= e.feature < transcoders[e.layer].cfg.n_features:
            raise CausalError(
                f"feature {e.feature} of block {e.layer}: its transcoder has {transcoders[e.layer].cfg.n_features}"
            )
        by_layer.setdefault(e.layer, []).append(e)
    reads: dict[int, Tensor] = {}
    handles = []

    def write(layer: int):
        def hook(_m, _a, out):
            base = out
            if frozen is not None:  # the clean write; the skip path (linear, an edge of the graph) follows the input
                skip = transcoders[layer].skip(reads[layer].float())
                base = frozen[layer].to(out.dtype) + (0 if skip is None else skip.to(out.dtype))
            if layer not in by_layer:
                return base
            tc = transcoders[layer]
            f = tc.encode(reads[layer].float())
            delta = torch.zeros_like(base, dtype=torch.float32)
            for e in by_layer[layer]:
                change = e.value - f[..., e.feature]  # [B, n]
                if e.pos is not None:
                    keep = torch.zeros_like(change)
                    keep[..., e.pos] = 1
                    change = change * keep
                delta += change[..., None] * tc.W_dec[e.feature].float()
            return base + delta.to(out.dtype)

        return hook

    for layer in set(by_layer) | (set(range(len(lm.layers))) if frozen is not None else set()):
        block = lm.layers[layer]
        handles.append(
            mlp_module(block, layer).register_forward_pre_hook(lambda m, a, i=layer: reads.__setitem__(i, a[0]))
        )
        handles.append(mlp_out_module(block, layer).register_forward_hook(write(layer)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def last_logits(lm: LoadedModel, ids: Tensor, transcoders=None, edits=(), frozen=None, *, linear=False) -> Tensor:
    """The logits at the last position, with `edits` applied (see `edited`). `linear` also freezes attention
    patterns and norm scales at their clean values: the graph's own linear model, where a feature's ablation moves
    a logit by exactly its edge."""
    if not edits and frozen is None:
        return lm.model(ids).logits[:, -1].float()
    with contextlib.ExitStack() as stack:
        if linear:
            from .attribution_graph import frozen_model

            with frozen_model(lm) as fz:  # the clean pass's patterns and scales, replayed on the edited pass
                lm.model(ids)
            stack.enter_context(frozen_model(lm, fz.replay()))
        stack.enter_context(edited(lm, transcoders, edits, frozen=frozen))
        return lm.model(ids).logits[:, -1].float()


@torch.no_grad()
def clean_mlp_outputs(lm: LoadedModel, ids: Tensor, transcoders: Sequence) -> list[Tensor]:
    """Each block's clean MLP output less its transcoder's skip path: what `edited(frozen=...)` holds fixed."""
    L = len(lm.layers)
    got = capture(lm, [Site(i, s) for i in range(L) for s in ("mlp_in", "mlp_out")], ids)
    out = []
    for i in range(L):
        skip = transcoders[i].skip(got[Site(i, "mlp_in")].float())
        y = got[Site(i, "mlp_out")]
        out.append(y if skip is None else y - skip.to(y.dtype))
    return out


def _demeaned(logits: Tensor, token: int) -> float:
    return float(logits[0, token] - logits[0].mean())


def total_effects(graph: AttributionGraph, target: int = 0) -> Tensor:
    """Each selected feature's signed effect on logit `target` if it were removed, through the graph's edges
    (linearised: a change to a feature's pre-activation passes to its activation): t = d + (t / a) E, with d the
    direct effects on the logit, a the activations and E the feature-to-feature edges."""
    n = graph.n_selected
    direct = graph.adjacency[graph.logit_node(target), :n].double()
    E = graph.adjacency[:n, :n].double()
    a = graph.activation_values[graph.selected_features].double().clamp_min(1e-12)
    total = direct.clone()
    for _ in range(graph.n_layers + 1):  # edges only run up the blocks: exact after as many rounds
        total = direct + (total / a) @ E
    return total.float()


def top_features(graph: AttributionGraph, k: int, *, direct: bool = False) -> list[int]:
    """The k selected features (rows of graph.active_features) that push the first target up the most: by total
    effect through the graph (`total_effects`), or by direct effect alone (`direct`: what an ablation with the other
    MLPs held fixed can move)."""
    n = graph.n_selected
    eff = graph.adjacency[graph.logit_node(0), :n] if direct else total_effects(graph)
    order = eff.argsort(descending=True)[:k]
    return [int(graph.selected_features[i]) for i in order]


def random_like(graph: AttributionGraph, chosen: Sequence[int], rng: random.Random) -> list[int]:
    """As many active features as `chosen`, drawn at random from the same blocks (position 0 has none), none of
    them in `chosen`."""
    out = []
    layers = graph.active_features[:, 0]
    for j in chosen:
        pool = [int(i) for i in (layers == graph.active_features[j, 0]).nonzero().flatten() if int(i) not in chosen]
        pool = [i for i in pool if i not in out]
        if not pool:
            raise CausalError(f"block {int(graph.active_features[j, 0])} has no other active feature to draw")
        out.append(rng.choice(pool))
    return out


def _ablations(graph: AttributionGraph, rows: Sequence[int]) -> list[FeatureEdit]:
    return [FeatureEdit(int(graph.active_features[j, 0]), int(graph.active_features[j, 2]), 0.0,
                        int(graph.active_features[j, 1])) for j in rows]  # fmt: skip


def prompt_check(lm: LoadedModel, transcoders: Sequence, graph: AttributionGraph, *, k: int = 5, seed: int = 0,
                 n_direct: int = 30) -> dict:  # fmt: skip
    """One prompt's numbers: the target logit's drop when the top-k features are ablated and when k random ones of
    the same blocks are (free and frozen), and predicted vs measured direct effects of up to n_direct features."""
    ids = graph.input_tokens[None].to(lm.device)
    target = int(graph.logit_tokens[0])
    clean = _demeaned(last_logits(lm, ids), target)
    frozen = clean_mlp_outputs(lm, ids, transcoders)
    out: dict = {"prompt": graph.prompt, "target": target, "clean_logit": clean}
    for mode, fr in (("free", None), ("frozen", frozen)):
        top = top_features(graph, k, direct=mode == "frozen")
        rand = random_like(graph, top, random.Random(seed))
        out[f"top_{mode}"], out[f"random_{mode}"] = top, rand
        for name, rows in (("top", top), ("random", rand)):
            logit = _demeaned(last_logits(lm, ids, transcoders, _ablations(graph, rows), fr), target)
            out[f"drop_{name}_{mode}"] = clean - logit
    predicted, measured, linear = [], [], []
    tgt_row = graph.logit_node(0)
    for i in range(min(n_direct, graph.n_selected)):
        edit = _ablations(graph, [int(graph.selected_features[i])])
        predicted.append(float(graph.adjacency[tgt_row, i]))
        measured.append(clean - _demeaned(last_logits(lm, ids, transcoders, edit, frozen), target))
        linear.append(clean - _demeaned(last_logits(lm, ids, transcoders, edit, frozen, linear=True), target))
    out["direct_predicted"], out["direct_measured"], out["direct_measured_linear"] = predicted, measured, linear
    return out


def summarise(rows: Sequence[dict]) -> dict:
    """The check over prompts: mean paired differences (top minus random drop) with 95 % bootstrap intervals per
    mode, and the correlation of predicted with measured direct effects pooled over prompts."""
    out: dict = {"n_prompts": len(rows)}
    for mode in ("free", "frozen"):
        diff = [r[f"drop_top_{mode}"] - r[f"drop_random_{mode}"] for r in rows]
        ci = mean_ci(diff)
        out[f"top_minus_random_{mode}"] = ci
        out[f"passes_{mode}"] = bool(ci["ci"] is not None and ci["ci"][0] > 0)
    pred = [p for r in rows for p in r["direct_predicted"]]
    meas = [m for r in rows for m in r["direct_measured"]]
    out["direct_pearson"], out["direct_spearman"], out["direct_n"] = (
        pearson(pred, meas),
        spearman(pred, meas),
        len(pred),
    )
    return out
