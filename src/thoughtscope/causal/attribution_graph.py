"""Build an attribution graph: which transcoder features, errors and tokens carried a prompt to its next tokens.

The replacement model (Ameisen et al. 2025, "Circuit tracing"; circuit-tracer): every block's MLP output becomes its
transcoder's active features times their decoder rows, plus an error node (what the transcoder missed), plus the
transcoder's skip path; attention patterns and every norm's scale are frozen at their values on the prompt. The
residual stream is then linear in the token embeddings, the feature writes and the errors, so the direct effect of
a source on a target (a feature's pre-activation, or a logit minus the mean logit) is one backward pass from the
target, dotted with the source's write. Rows are computed for the logits first, then for features in order of their
influence on the logits so far, up to `GraphConfig.max_feature_nodes`; backward passes are batched over targets
(one forward, `is_grads_batched`). Position 0 (BOS, the attention sink) has no feature or error nodes: its MLP outputs
are left out of the graph as circuit-tracer leaves them (or, with `GraphConfig.first_token_mlp`, counted in the first
token's node: everything there depends on that token alone).

Frozen attention and norms are hooks around the model's own modules (the model's eager attention function with the
pattern detached, each norm's output as its input times a detached scale), so any Llama-, Qwen- or Gemma-style
Hugging Face model works; the replacement forward must reproduce the model's logits, which `build` checks.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ..display import token_texts
from ..errors import CausalError
from ..models import LoadedModel, find_final_norm
from ..progress import ProgressBar
from ..sites import Site, capture, mlp_module, mlp_out_module
from .config import GraphConfig
from .graph import AttributionGraph
from .patching import one_token

#: the memory a graph may take without --force: this share of what the machine has available
MEMORY_SHARE = 0.8
#: the rate of the estimate's multiply-add count on 2 CPU cores (fitted to graphs of 10 and 32 tokens with 2,048 feature
#: nodes on the default model: 6 s and 19 s), plus about a second for the forward passes
CPU_MACS_PER_SECOND = 1.8e11


def estimate(
    lm: LoadedModel, transcoders: Sequence, prompt: str, cfg: GraphConfig, *, budget: int | None = None
) -> dict:
    """The memory (MB) and time (s) a graph will take, from its sizes; CausalError when the memory is over
    `budget` bytes (None: no limit; the CLI passes MEMORY_SHARE of what is available unless --force)."""
    n = int(lm.tokenize(prompt)[0].shape[1])
    L, d = len(lm.layers), lm.d_model
    k = max(int(getattr(tc.cfg, "k", 0) or 64) for tc in transcoders)
    active = (n - 1) * L * k
    rows = min(cfg.max_feature_nodes, active) + cfg.max_logits
    cols = active + (L + 1) * n
    attn = sum(p.numel() for b in lm.layers for p in getattr(b, "self_attn", b).parameters())
    macs = rows * n * attn * 2  # value and output maps, forward of the backward pass and its product
    memory = rows * cols * 4 * 3 + cfg.targets_per_batch * n * d * L * 4 * 8 + n * d * L * 4 * 40
    out = {"memory_mb": memory / 2**20, "seconds": 1.0 + macs / CPU_MACS_PER_SECOND, "rows": rows, "active": active}
    if budget is not None and memory > budget:
        raise CausalError(
            f"this graph needs about {memory / 2**20:,.0f} MB ({rows} rows x {cols} sources) and {budget / 2**20:,.0f} "
            "MB may be used; lower max_feature_nodes or the prompt's length, or pass --force"
        )
    return out


@dataclass
class _Replacement:
    """The prompt's pieces of the replacement model: per block, its active features and error."""

    ids: Tensor  # [1, n]
    emb: Tensor  # [n, d] token embeddings as the first block reads them
    errors: list[Tensor]  # per layer [n, d]
    active: Tensor  # [n_active, 3] (layer, pos, feature)
    values: Tensor  # [n_active]
    logits: Tensor  # [V] at the last position
    layer_slices: list[slice] = field(default_factory=list)  # each layer's rows of `active`
    slots: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # per layer, see _slots


def _check_set(lm: LoadedModel, transcoders: Sequence) -> None:
    if len(transcoders) != len(lm.layers):
        raise CausalError(
            f"{len(transcoders)} transcoders for a model with {len(lm.layers)} blocks: give one per block"
        )
    for i, tc in enumerate(transcoders):
        if tc.cfg.d_model != lm.d_model:
            raise CausalError(f"the transcoder of block {i} is {tc.cfg.d_model} wide, the model {lm.d_model}")


@torch.no_grad()
def _replacement(lm: LoadedModel, transcoders: Sequence, ids: Tensor) -> _Replacement:
    """Each block's transcoder on the clean pass: active features (position 0 left out) and the error nodes."""
    L = len(lm.layers)
    sites = [Site(i, "mlp_in") for i in range(L)] + [Site(i, "mlp_out") for i in range(L)]
    got = capture(lm, sites, ids)
    emb = lm.model.get_input_embeddings()(ids)[0].float()
    errors, rows, vals, slices = [], [], [], []
    for i, tc in enumerate(transcoders):
        x, y = got[Site(i, "mlp_in")][0].float(), got[Site(i, "mlp_out")][0].float()
        f = tc.encode(x)
        f[0] = 0
        recon = f @ tc.W_dec + tc.b_dec
        skip = tc.skip(x)
        errors.append(y - recon - (0 if skip is None else skip))
        pos, feat = f.nonzero(as_tuple=True)
        start = sum(len(r) for r in rows)
        rows.append(torch.stack([torch.full_like(pos, i), pos, feat], 1))
        vals.append(f[pos, feat])
        slices.append(slice(start, start + len(pos)))
    logits = lm.model(ids).logits[0, -1].float()
    active, values = torch.cat(rows), torch.cat(vals)
    slots = [_slots(active[s], values[s], tc, ids.shape[1], s.start) for s, tc in zip(slices, transcoders)]
    return _Replacement(ids, emb, errors, active, values, logits, slices, slots)


def _slots(active: Tensor, values: Tensor, tc, n: int, start: int) -> tuple[Tensor, Tensor]:
    """One block's active features by position: [n, k] their rows of `active` (-1 pads positions with fewer) and
    [n, k, d] their writes (activation x decoder row, zero for pads), so a batch of gradients meets them in one bmm."""
    pos = active[:, 1]
    counts = torch.bincount(pos, minlength=n)
    k = max(1, int(counts.max()) if len(pos) else 1)
    slot = torch.full((n, k), -1, dtype=torch.long)
    write = torch.zeros(n, k, tc.W_dec.shape[1])
    order = torch.argsort(pos, stable=True)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(pos)) - first[pos[order]]
    slot[pos[order], rank] = start + order
    write[pos[order], rank] = values[order, None] * tc.W_dec[active[order, 2]].detach().float()
    return slot, write


def _norm_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")]


class Frozen:
    """The attention patterns and norm scales of one pass, recorded (the first pass inside `frozen_model`) and then
    replayed: a graph's backward passes see the patterns as constants, and a linear check replays the clean pass's
    patterns and scales on an edited one."""

    def __init__(self):
        self.scales: dict[int, Tensor] = {}  # id(norm module) -> output / (centred) input
        self.patterns: list[Tensor] = []  # attention weights in call order (one per block)
        self.replaying = False
        self._next = 0

    def replay(self) -> Frozen:
        self.replaying, self._next = True, 0
        return self

    def norm_hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """The norm's output as its (for LayerNorm, centred) input times a detached scale, plus its bias."""
        x = args[0]
        bias = module.bias if isinstance(module, nn.LayerNorm) and module.bias is not None else 0
        if isinstance(module, nn.LayerNorm):
            x = x - x.mean(-1, keepdim=True)
        if not self.replaying:
            self.scales[id(module)] = ((output - bias) / x.where(x != 0, torch.ones_like(x))).detach()
        return x * self.scales[id(module)] + bias

    def attention(self, original):
        """The model's eager attention with the pattern taken without gradient (or replayed): linear in the values."""

        def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
            if self.replaying:
                weights = self.patterns[self._next]
                self._next += 1
            else:
                with torch.no_grad():
                    _, weights = original(module, query, key, value, attention_mask, scaling=scaling, dropout=0.0,
                                          **kwargs)  # fmt: skip
                self.patterns.append(weights)
            groups = query.shape[1] // value.shape[1]
            v = value.repeat_interleave(groups, dim=1) if groups > 1 else value
            return torch.matmul(weights.to(v.dtype), v).transpose(1, 2).contiguous(), weights

        return attend


@contextlib.contextmanager
def frozen_model(lm: LoadedModel, frozen: Frozen | None = None) -> Iterator[Frozen]:
    """Attention patterns and norm scales frozen while inside (eager attention, its module's function wrapped):
    taken from the pass that runs inside, or replayed from `frozen` (a recorded `Frozen`, see Frozen.replay)."""
    model = lm.model
    fz = frozen or Frozen()
    attn_modules = {type(getattr(block, "self_attn", block)).__module__ for block in lm.layers}
    patched = []
    for name in attn_modules:
        mod = sys.modules.get(name)
        fn = getattr(mod, "eager_attention_forward", None)
        if fn is None:
            raise CausalError(
                f"{type(model).__name__}: no eager attention function in {name}; attribution graphs freeze attention "
                "patterns through it (Llama, Qwen, Gemma and most Hugging Face models have one)"
            )
        patched.append((mod, fn))
        mod.eager_attention_forward = fz.attention(fn)
    configs = [c for c in {id(x): x for x in [model.config, getattr(model.config, "text_config", None)]}.values() if c]
    old_impl = [c._attn_implementation for c in configs]
    handles = [m.register_forward_hook(fz.norm_hook) for m in _norm_modules(model)]
    try:
        for c in configs:
            c._attn_implementation = "eager"
        yield fz
    finally:
        for h in handles:
            h.remove()
        for c, impl in zip(configs, old_impl):
            c._attn_implementation = impl
        for mod, fn in patched:
            mod.eager_attention_forward = fn


@dataclass
class _Traced:
    """The replacement forward's autograd graph: leaves (embeddings, each block's write) and the reads."""

    emb: Tensor  # leaf [1, n, d]
    writes: list[Tensor]  # leaves [1, n, d]: each block's features + bias + error
    reads: list[Tensor]  # [1, n, d]: each block's MLP input (what its transcoder reads)
    final: Tensor  # [1, n, d]: the final norm's output
    logits: Tensor  # [V] at the last position


def _trace(lm: LoadedModel, transcoders: Sequence, rep: _Replacement) -> _Traced:
    """Run the replacement model with gradients from the leaves; its logits must equal the model's."""
    model, L = lm.model, len(lm.layers)
    dt = next(model.parameters()).dtype
    emb = rep.emb[None].to(dt).clone().requires_grad_(True)
    writes = []
    for i, tc in enumerate(transcoders):
        s = rep.layer_slices[i]
        pos, feat, val = rep.active[s, 1], rep.active[s, 2], rep.values[s]
        w = rep.errors[i] + tc.b_dec
        w = w.index_add(0, pos, val[:, None] * tc.W_dec[feat].float())
        writes.append(w[None].to(dt).detach().requires_grad_(True))
    reads: list[Tensor] = [None] * L  # type: ignore[list-item]
    final: list[Tensor] = []
    norm = find_final_norm(model)
    if norm is None:
        raise CausalError(f"{type(model).__name__}: no final norm found before the unembedding")
    with frozen_model(lm):  # the frozen norms' hooks first: the hooks below see (and replace) their outputs
        handles = [model.get_input_embeddings().register_forward_hook(lambda m, a, o: emb)]
        for i in range(L):
            block = lm.layers[i]

            def read(m, args, i=i):
                reads[i] = args[0]

            def write(m, args, out, i=i):
                skip = transcoders[i].skip(reads[i].float())
                return writes[i] if skip is None else writes[i] + skip.to(dt)

            handles.append(mlp_module(block, i).register_forward_pre_hook(read))
            handles.append(mlp_out_module(block, i).register_forward_hook(write))
        handles.append(norm.register_forward_hook(lambda m, a, o: final.append(o)))
        try:
            logits = model(rep.ids).logits[0, -1].float()
        finally:
            for h in handles:
                h.remove()
    gap = float((logits.detach() - rep.logits).abs().max())
    if gap > 1e-3 * max(1.0, float(rep.logits.abs().max())):
        raise CausalError(
            f"the replacement model's logits differ from the model's by {gap:.3g}: its attention or norms are not the "
            "kind attribution graphs can freeze"
        )
    return _Traced(emb, writes, reads, final[-1], logits)


@dataclass
class _Target:
    """One row of the graph: where its gradient enters (a block's MLP input, or the final norm's output, layer L),
    at which position, along which vector."""

    layer: int
    pos: int
    vector: Tensor  # [d]


def _rows(
    tr: _Traced, rep: _Replacement, transcoders: Sequence, targets: list[_Target], first_token_mlp: bool
) -> Tensor:
    """Direct effects on each target (rows) of every source: [len(targets), n_active + L * n + n] with columns
    (active features, error nodes layer-major, token embeddings), from one batched backward pass."""
    L = len(tr.writes)
    layers = sorted({t.layer for t in targets})
    outs = [tr.final if layer == L else tr.reads[layer] for layer in layers]
    g = {layer: torch.zeros(len(targets), *o.shape, dtype=o.dtype) for layer, o in zip(layers, outs)}
    for b, t in enumerate(targets):
        g[t.layer][b, 0, t.pos] = t.vector.to(g[t.layer].dtype)
    leaves = [tr.emb] + tr.writes[: max(layers)]
    grads = torch.autograd.grad(
        outs, leaves, [g[layer] for layer in layers], retain_graph=True, is_grads_batched=True, allow_unused=True
    )
    n = tr.emb.shape[1]
    B = len(targets)
    n_active = len(rep.active)
    row = torch.zeros(B, n_active + L * n + n)
    ge = grads[0]
    if ge is not None:
        row[:, n_active + L * n :] = (ge[:, 0].float() * rep.emb).sum(-1)
    for i, gw in enumerate(grads[1:]):
        if gw is None:
            continue
        gw = gw[:, 0].float()  # [B, n, d]
        err = (gw * rep.errors[i]).sum(-1)  # [B, n]
        if first_token_mlp:  # position 0 depends on the first token alone: part of its node
            row[:, n_active + L * n] += err[:, 0]
        err[:, 0] = 0
        row[:, n_active + i * n : n_active + (i + 1) * n] = err
        s = rep.layer_slices[i]
        if s.stop > s.start:  # each active feature's write (value x decoder row) against its position's gradient
            slot, write = rep.slots[i]  # [n, k] rows of `active` (-1: none), [n, k, d]
            eff = torch.bmm(write, gw.transpose(0, 1).transpose(1, 2))  # [n, k, B]
            keep = slot >= 0
            row[:, slot[keep]] = eff[keep].T
    return row


def _targets(lm: LoadedModel, rep: _Replacement, named, cfg: GraphConfig) -> tuple[Tensor, Tensor]:
    """(token ids, probabilities) of the target logits: the named tokens, else the most likely next tokens up to
    cfg.logit_probability in total, at most cfg.max_logits."""
    probs = rep.logits.softmax(-1)
    if named:
        ids = torch.tensor([one_token(lm, t) if isinstance(t, str) else int(t) for t in named])
        vocab = probs.numel()
        bad = [int(t) for t in ids if not 0 <= int(t) < vocab]
        if bad:
            raise CausalError(f"target token ids {bad} are outside the vocabulary (0-{vocab - 1})")
        return ids, probs[ids]
    p, ids = probs.sort(descending=True)
    keep = int((p.cumsum(0) < cfg.logit_probability).sum()) + 1
    keep = max(1, min(keep, cfg.max_logits))
    return ids[:keep], p[:keep]


def _logit_vectors(lm: LoadedModel, ids: Tensor) -> Tensor:
    """Each target's unembedding row minus the mean row: the direction of its logit minus the mean logit."""
    W = lm.model.get_output_embeddings().weight.detach().float()
    return W[ids] - W.mean(0)


def _influence(rows: Tensor, row_source: Tensor, weights: Tensor) -> Tensor:
    """Influence of every source column on the weighted target rows, through the rows computed so far: the
    row-normalised absolute effects summed along all paths (a DAG: it ends within the number of layers)."""
    A = rows.abs()
    A = A / A.sum(1, keepdim=True).clamp_min(1e-12)
    has_row = row_source >= 0
    w = weights.clone()
    total = torch.zeros(rows.shape[1])
    for _ in range(rows.shape[0] + 1):
        flow = w @ A
        if not bool(flow.any()):
            break
        total += flow
        w = torch.zeros_like(w)
        w[has_row] = flow[row_source[has_row]]
    return total


def _feature_targets(rep: _Replacement, transcoders: Sequence, idx: list[int]) -> list[_Target]:
    out = []
    for j in idx:
        layer, pos, feat = (int(v) for v in rep.active[j])
        out.append(_Target(layer, pos, transcoders[layer].enc[feat].detach().float()))
    return out


def _compute_rows(
    tr, rep, transcoders, targets: list[_Target], cfg: GraphConfig, per_batch: int | None = None
) -> Tensor:
    """Rows for `targets`, `per_batch` at a time, in order of their layer (a batch then spans few layers)."""
    order = sorted(range(len(targets)), key=lambda i: (targets[i].layer, targets[i].pos))
    rows = torch.zeros(len(targets), len(rep.active) + (len(transcoders) + 1) * rep.ids.shape[1])
    per_batch = per_batch or cfg.targets_per_batch
    for s in range(0, len(order), per_batch):
        idx = order[s : s + per_batch]
        rows[idx] = _rows(tr, rep, transcoders, [targets[i] for i in idx], cfg.first_token_mlp)
    return rows


def build(
    lm: LoadedModel,
    transcoders: Sequence,
    prompt: str,
    *,
    targets: Sequence[str | int] | None = None,
    cfg: GraphConfig | None = None,
    progress: bool = False,
    source: str = "",
) -> AttributionGraph:
    """The attribution graph of `prompt` towards `targets` (named tokens, or the likely next tokens by default),
    over one transcoder per block of `lm`. See the module docstring for the method."""
    cfg = cfg or GraphConfig()
    t0 = time.perf_counter()
    _check_set(lm, transcoders)
    ids = lm.tokenize(prompt)[0][:1]
    n = ids.shape[1]
    if n > cfg.max_tokens:
        raise CausalError(f"the prompt is {n} tokens; graphs take at most {cfg.max_tokens} (GraphConfig.max_tokens)")
    rep = _replacement(lm, transcoders, ids)
    logit_ids, logit_p = _targets(lm, rep, targets, cfg)
    tr = _trace(lm, transcoders, rep)
    L, n_active = len(transcoders), len(rep.active)
    logit_rows = _compute_rows(tr, rep, transcoders, [_Target(L, n - 1, v) for v in _logit_vectors(lm, logit_ids)], cfg)
    chosen: list[int] = []
    feature_rows: list[Tensor] = []
    budget = min(cfg.max_feature_nodes, n_active)
    weights_logits = logit_p / logit_p.sum()
    with ProgressBar("graph", budget, unit="features", enabled=progress) as bar:
        while len(chosen) < budget:
            rows = torch.cat([logit_rows, *feature_rows])
            row_source = torch.tensor([-1] * len(logit_ids) + chosen, dtype=torch.long)
            w = torch.cat([weights_logits, torch.zeros(len(chosen))])
            infl = _influence(rows, row_source, w)[:n_active]
            if chosen:
                infl[torch.tensor(chosen)] = -1
            take = min(cfg.targets_per_batch, budget - len(chosen))
            nxt = infl.topk(take).indices.tolist()
            feature_rows.append(_compute_rows(tr, rep, transcoders, _feature_targets(rep, transcoders, nxt), cfg, take))
            chosen += nxt
            bar.update(len(chosen))
    return _assemble(lm, rep, prompt, chosen, feature_rows, logit_rows, logit_ids, logit_p, cfg, t0, source)


def _assemble(lm, rep, prompt, chosen, feature_rows, logit_rows, logit_ids, logit_p, cfg, t0, source):
    L, n = len(rep.errors), rep.ids.shape[1]
    n_active, n_sel = len(rep.active), len(chosen)
    sel = torch.tensor(chosen, dtype=torch.long)
    cols = torch.cat([sel, torch.arange(n_active, n_active + L * n + n)])  # selected features, errors, tokens
    n_nodes = n_sel + L * n + n + len(logit_ids)
    adj = torch.zeros(n_nodes, n_nodes)
    if n_sel:
        adj[:n_sel, : len(cols)] = torch.cat(feature_rows)[:, cols]
    adj[n_nodes - len(logit_ids) :, : len(cols)] = logit_rows[:, cols]
    graph = AttributionGraph(
        prompt=prompt,
        input_tokens=rep.ids[0].cpu(),
        token_strs=token_texts(lm.tokenizer, rep.ids[0].tolist()),
        logit_tokens=logit_ids.cpu(),
        logit_probabilities=logit_p.cpu(),
        active_features=rep.active.cpu(),
        activation_values=rep.values.cpu(),
        selected_features=sel,
        adjacency=adj,
        n_layers=L,
        model=lm.name,
        transcoders=source,
        config={**asdict(cfg), "seconds": time.perf_counter() - t0, "n_active": n_active},
    )
    graph.check()
    return graph
