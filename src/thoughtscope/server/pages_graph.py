"""The graph page: a prompt's attribution graph over the transcoder set named at start, pruned as circuit-tracer
prunes it, drawn by layer × position in the browser, with pinning, supernodes and steering from its feature nodes.

The page's state is its query string (`prompt`, `target` per named target token, `pin` per pinned node id, `group`
as `ID,ID|label` per supernode, `steer` as `ID:MODE:VALUE` per steered feature with MODE `x` (× its activation on
the prompt) or `abs` (activation units), `seed`, `temp`, `max_new_tokens`), so a reload or a copied link restores
it. Node ids are circuit-tracer's (`L_F_P` a feature, `0_L_P` an error, `E_T_P` a token, `<L+1>_T_P` a logit), so
the downloaded JSON and the page name the same nodes. The last few graphs are kept, so hovering, clicking, the
download and steering do not compute a graph again.
"""

from __future__ import annotations

import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from ..causal.attribution_graph import GraphConfig, build
from ..causal.graph_check import FeatureEdit, edited
from ..causal.graph_files import circuit_tracer_links, circuit_tracer_nodes, to_circuit_tracer_json
from ..causal.influence import graph_scores, logit_weights, node_influence, prune
from ..display import lone_token_text, token_texts
from ..errors import ServerError
from ..steer import GenerationConfig, Lane
from .context import cfg_of, float_param, int_param, page, run_model, text_param, wb_of

router = APIRouter()
KEPT_GRAPHS = 4  # graphs kept per server (prompt and targets as the key)
MAX_TARGET_CHARS = 64  # a target is one token: its text is short
STEER_LIMIT = 100.0  # a steered value's reach: ± this many × its activation, or activation units
KINDS = ("feature", "error", "embedding", "logit")
TOP_EDGES = 8  # edges listed each way when a node without a feature page is clicked
NO_SET = (
    "no transcoder set is loaded, so there are no attribution graphs: start the server with --transcoders DIR "
    "(a set written by save_transcoder_set or `thoughtscope transcoders train`, or a circuit-tracer or Gemma Scope "
    "set in a local folder), and --transcoder-atlas DIR for the atlas of any of its layers"
)


@dataclass
class GraphSource:
    """The transcoder set graphs are computed over, the atlases that explain its layers, and recent graphs."""

    transcoders: object  # a TranscoderSet (one transcoder per block of the workbench's model)
    atlases: dict = field(default_factory=dict)  # layer -> Atlas of that layer's transcoder
    spec: str = ""  # where the set came from (shown, and the downloaded JSON's scan)
    page_layer: int | None = None  # the layer whose transcoder is the workbench's SAE: its features have pages
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    kept: OrderedDict = field(default_factory=OrderedDict, repr=False)  # (prompt, targets) -> _Entry

    def labels(self, pairs) -> dict[tuple[int, int], str]:
        """(layer, feature) -> its atlas explanation, for the layers that have an atlas and features it explains."""
        from ..atlas.db import block_labels

        with self.lock:
            return block_labels(self.atlases, pairs)

    def contexts(self, tokenizer, layer: int, feat: int, k: int = 2) -> list[dict]:
        """The feature's top k contexts in its layer's atlas: the text before the peak token, the token, its value."""
        at = self.atlases.get(layer)
        if at is None:
            return []
        with self.lock:
            ex = at.examples(feat, "top", limit=k)
        out = []
        for e in ex:
            texts = token_texts(tokenizer, list(e.tokens))
            p = min(int(e.pos), len(texts) - 1)
            out.append({"before": "".join(texts[max(1, p - 12) : p]), "token": texts[p], "act": float(e.act)})
        return out


@dataclass
class _Entry:
    graph: object  # AttributionGraph
    view: dict | None = None
    ids: dict | None = None  # (node id, kind) -> node index, every node (an error's id can be a feature's too)


def _same_transcoder(sae, tc, layer: int) -> bool:
    """Whether the workbench's SAE is this transcoder (same sites, shape and decoder): its pages are this layer's."""
    cfg = sae.cfg
    if (cfg.site, getattr(cfg, "target_site", None)) != (f"mlp_in.{layer}", f"mlp_out.{layer}"):
        return False
    a, b = sae.W_dec.detach().float().cpu(), tc.W_dec.detach().float().cpu()
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-2, atol=1e-2 * float(b.abs().max() or 1)))


def attach_transcoders(wb, transcoders, atlases=(), spec: str = "") -> GraphSource:
    """Serve graphs of `transcoders` (a TranscoderSet fitting wb's model) on the graph page, each layer explained by
    the atlas among `atlases` built on that layer's transcoder (its site is mlp_in.L)."""
    n = len(transcoders)
    if n != wb.lm.n_layers:
        raise ServerError(
            f"the transcoder set has {n} layers and {wb.lm.name} {wb.lm.n_layers} blocks: give one per block"
        )
    from ..atlas.db import atlases_by_block

    by_layer = atlases_by_block(atlases, transcoders)
    page_layer = next((i for i in range(n) if _same_transcoder(wb.sae, transcoders[i], i)), None)
    src = GraphSource(transcoders, by_layer, spec or getattr(transcoders, "source", ""), page_layer)
    wb.graphs = src
    return src


def load_transcoders(wb, folder, atlas_dirs=()) -> GraphSource:
    """What `thoughtscope serve --transcoders DIR [--transcoder-atlas DIR ...]` loads: the set, checked against the
    workbench's model, and its layers' atlases."""
    from ..atlas import Atlas
    from ..sae.transcoder_set import load_transcoder_set

    ts = load_transcoder_set(folder, lm=wb.lm)
    return attach_transcoders(wb, ts, [Atlas.open(a) for a in atlas_dirs], spec=str(folder))


def source_of(wb) -> GraphSource:
    src = wb.graphs
    if src is None:
        raise HTTPException(404, NO_SET)
    return src


# ---------------------------------------------------------------- the request's graph


Targets = Annotated[list[str] | None, Query(description="a target token's text (repeat for several)")]


def graph_query(request: Request, prompt: str | None, target: list[str] | None) -> tuple[str, tuple[str, ...]]:
    """(prompt, named targets) of the query string; the token caps are checked by the graph's build."""
    prompt = text_param(prompt, "prompt", cfg_of(request))
    targets = tuple(t for t in target or () if t != "")
    if len(targets) > GraphConfig.max_logits:
        raise HTTPException(422, f"{len(targets)} targets; a graph takes at most {GraphConfig.max_logits}")
    for t in targets:
        if len(t) > MAX_TARGET_CHARS:
            raise HTTPException(422, f"target {t[:20]!r}… is {len(t)} characters; a target is one token")
    return prompt, targets


def _entry(wb, src: GraphSource, prompt: str, targets: tuple[str, ...]) -> _Entry:
    """The graph of (prompt, targets), computed once while it stays among the last KEPT_GRAPHS."""
    key = (prompt, targets)
    with src.lock:
        if key in src.kept:
            src.kept.move_to_end(key)
            return src.kept[key]
    g = build(wb.lm, src.transcoders, prompt, targets=list(targets) or None, source=src.spec)
    e = _Entry(g)
    with src.lock:
        src.kept[key] = e
        while len(src.kept) > KEPT_GRAPHS:
            src.kept.popitem(last=False)
    return e


def _logit_strs(wb, g) -> list[str]:
    return [lone_token_text(wb.tokenizer, int(t)) for t in g.logit_tokens]


def _all_ids(wb, e: _Entry) -> dict[tuple[str, str], int]:
    if e.ids is None:
        g = e.graph
        every = circuit_tracer_nodes(g, torch.ones(g.n_nodes, dtype=torch.bool), torch.zeros(g.n_nodes),
                                     logit_strs=_logit_strs(wb, g))  # fmt: skip
        e.ids = {(n["node_id"], _kind(n["feature_type"])): i for i, n in every.items()}
    return e.ids


def _kind(feature_type: str) -> str:
    return {"cross layer transcoder": "feature", "mlp reconstruction error": "error"}.get(feature_type, feature_type)


def _row(g, node: dict) -> int:
    """Where a node is drawn: the embeddings at row 0, block L's features and errors at L + 1, logits on top."""
    if node["feature_type"] == "embedding":
        return 0
    if node["feature_type"] == "logit":
        return g.n_layers + 1
    return int(node["layer"]) + 1


def _view_node(wb, src: GraphSource, g, i: int, node: dict, influence, logit_strs: list[str]) -> dict:
    kind = _kind(node["feature_type"])
    out = {"id": node["node_id"], "kind": kind, "row": _row(g, node), "pos": node["ctx_idx"]}
    out["influence"] = float(node["token_prob"]) if kind == "logit" else float(influence[i])
    if kind == "feature":
        layer, feat, _ = (int(x) for x in node["node_id"].split("_"))
        out |= {"layer": layer, "feature": feat, "activation": node["activation"], "label": node["clerp"]}
        has_pages = wb.atlas is not None or getattr(wb, "atlas_build", None) is not None
        out["page"] = f"/features/{feat}" if layer == src.page_layer and has_pages else None
        out["contexts"] = src.contexts(wb.tokenizer, layer, feat)
    elif kind == "error":
        layer = int(node["layer"])
        out |= {"layer": layer, "label": f"what the transcoder of block {layer} misses at position {out['pos']}"}
    elif kind == "embedding":
        out["label"] = f"token {g.token_strs[out['pos']]!r} at position {out['pos']}"
    else:
        out |= {"label": node["clerp"], "token": logit_strs[i - g.logit_start]}
    return out


def _finite(x: float) -> float | None:
    return x if x == x else None  # JSON has no NaN (the replacement score of a graph no source reaches)


def _view(wb, src: GraphSource, prompt: str, targets: tuple[str, ...]) -> dict:
    """The pruned graph as the page draws it (influence.prune defaults, the nodes and links the download has)."""
    e = _entry(wb, src, prompt, targets)
    if e.view is not None:
        return e.view
    g = e.graph
    kept = prune(g)
    influence = node_influence(g.adjacency, logit_weights(g))
    mask = kept.node_mask.cpu()
    pairs = [tuple(int(v) for v in g.active_features[int(g.selected_features[i])][[0, 2]])
             for i in mask[: g.n_selected].nonzero().flatten().tolist()]  # fmt: skip
    logit_strs = _logit_strs(wb, g)
    nodes = circuit_tracer_nodes(g, mask, kept.cumulative_scores.cpu(), labels=src.labels(pairs),
                                 logit_strs=logit_strs)  # fmt: skip
    used, links = circuit_tracer_links(g, nodes, kept.edge_mask.cpu())
    index = {n["node_id"]: i for i, n in nodes.items()}
    replacement, completeness = graph_scores(g)
    e.view = {
        "prompt": g.prompt,
        "targets": list(targets),
        "tokens": list(g.token_strs),
        "n_layers": g.n_layers,
        "nodes": [_view_node(wb, src, g, index[n["node_id"]], n, influence, logit_strs) for n in used],
        "links": links,
        "scores": {"replacement": _finite(replacement), "completeness": _finite(completeness)},
        "counts": {"nodes": len(used), "of_nodes": g.n_nodes, "links": len(links), "active": len(g.active_features)},
        "seconds": round(float(g.config.get("seconds", 0.0)), 3),
        "transcoders": src.spec,
        "explained_layers": sorted(src.atlases),
        "page_layer": src.page_layer,
    }
    return e.view


def _node_edges(wb, src: GraphSource, prompt: str, targets: tuple[str, ...], node_id: str, kind: str) -> dict:
    """A node's strongest direct effects in the whole graph, in (what it reads) and out (what reads it)."""
    e = _entry(wb, src, prompt, targets)
    g, ids = e.graph, _all_ids(wb, e)
    if (node_id, kind) not in ids:
        raise HTTPException(404, f"the graph has no {kind} node {node_id!r}")
    i = ids[(node_id, kind)]
    names = {v: k for k, v in ids.items()}
    drawn = {(n["id"], n["kind"]) for n in _view(wb, src, prompt, targets)["nodes"]}

    def top(weights) -> list[dict]:
        order = weights.abs().argsort(descending=True)[:TOP_EDGES].tolist()
        return [{"id": names[j][0], "kind": names[j][1], "weight": float(weights[j]), "drawn": names[j] in drawn}
                for j in order if float(weights[j]) != 0.0]  # fmt: skip

    out = {"id": node_id, "kind": kind, "in": top(g.adjacency[i].float().cpu()),
           "out": top(g.adjacency[:, i].float().cpu())}  # fmt: skip
    rows = out["in"] + out["out"]
    labels = src.labels([tuple(int(x) for x in r["id"].split("_")[:2]) for r in rows if r["kind"] == "feature"])
    for r in rows:
        r["label"] = labels.get(tuple(int(x) for x in r["id"].split("_")[:2]), "") if r["kind"] == "feature" else ""
    return out


# ---------------------------------------------------------------- routes


@router.get("/graph")
def graph_page(request: Request):
    """The page; the graph itself is fetched from /api/graph by the page's script, so a bad prompt or target is
    shown beside the kept form instead of replacing the page."""
    wb, cfg = wb_of(request), cfg_of(request)
    src = wb.graphs
    qp = request.query_params
    ctx = {
        "prompt": qp.get("prompt", ""),
        "targets": " ".join(repr(t) if t.strip() != t else t for t in qp.getlist("target")),
        "src": src,
        "no_set": NO_SET,
        "max_tokens": GraphConfig.max_tokens,
        "max_new_tokens": cfg.max_new_tokens,
        "default_new_tokens": min(24, cfg.max_new_tokens),
    }
    return page(request, "graph.html", nav="graph", **ctx)


@router.get("/api/graph")
async def graph_json(request: Request, prompt: str | None = None, target: Targets = None):
    """The pruned graph: nodes (id, kind, row, pos, influence, label, activation, feature page) and links."""
    wb = wb_of(request)
    src = source_of(wb)
    prompt, targets = graph_query(request, prompt, target)
    return await run_model(request, _view, wb, src, prompt, targets)


@router.get("/api/graph/node")
async def graph_node_json(
    request: Request, node: str, kind: str = "feature", prompt: str | None = None, target: Targets = None
):
    """A node's strongest edges both ways in the whole graph (drawn or pruned), for a node without a feature page."""
    wb = wb_of(request)
    src = source_of(wb)
    if kind not in KINDS:
        raise HTTPException(422, f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    prompt, targets = graph_query(request, prompt, target)
    return await run_model(request, _node_edges, wb, src, prompt, targets, node, kind)


def _pins_and_groups(request: Request) -> tuple[list[str], list[list[str]]]:
    """pinnedIds and supernodes (circuit-tracer's [label, id, id ...]) from the page's state."""
    qp = request.query_params
    pins = [p for p in qp.getlist("pin") if p]
    groups = []
    for raw in qp.getlist("group"):
        ids, _, label = raw.partition("|")
        members = [i for i in ids.split(",") if i]
        if not members:
            raise HTTPException(422, f"group {raw!r}: expected ID,ID|label")
        groups.append([label or "group", *members])
    return pins, groups


def _download(wb, src: GraphSource, prompt: str, targets, pins, groups) -> dict:
    view = _view(wb, src, prompt, targets)
    g = _entry(wb, src, prompt, targets).graph
    labels = {(n["layer"], n["feature"]): n["label"] for n in view["nodes"] if n["kind"] == "feature" and n["label"]}
    with tempfile.TemporaryDirectory(prefix="thoughtscope-graph-") as tmp:
        data = to_circuit_tracer_json(g, Path(tmp) / "thoughtscope-graph.json", labels=labels,
                                      scan=src.spec or g.model, logit_strs=_logit_strs(wb, g), index=False)  # fmt: skip
    data["qParams"]["pinnedIds"] = pins
    data["qParams"]["supernodes"] = groups
    return data


@router.get("/graph/download.json")
async def graph_download(request: Request, prompt: str | None = None, target: Targets = None):
    """The drawn graph as circuit-tracer's frontend JSON, with the page's pinned nodes and supernodes."""
    wb = wb_of(request)
    src = source_of(wb)
    prompt, targets = graph_query(request, prompt, target)
    pins, groups = _pins_and_groups(request)
    data = await run_model(request, _download, wb, src, prompt, targets, pins, groups)
    return JSONResponse(data, headers={"content-disposition": 'attachment; filename="thoughtscope-graph.json"'})


# ---------------------------------------------------------------- steering from the graph


class _EditSteerer:
    """A lane's steering as `stream_lanes` uses it: the feature edits applied around each of the lane's passes."""

    def __init__(self, lm, transcoders, edits):
        self.lm, self.transcoders, self.edits = lm, transcoders, edits

    def active(self, **_where):
        return edited(self.lm, self.transcoders, self.edits)


@dataclass
class _SteerRun:
    """What the generation stream reports (the shape pages_steer's event stream reads)."""

    seed: int
    max_new_tokens: int
    url: str

    def query(self) -> str:
        return self.url


def _steer_edit(raw: str, g, ts) -> FeatureEdit:
    """`L_F_P:MODE:VALUE` -> the edit setting feature F of block L to VALUE (× its activation at position P on the
    prompt, MODE x; activation units, MODE abs) at every position, generated ones included."""
    node, mode, value = (raw.split(":") + ["", ""])[:3]
    parts = node.split("_")
    if len(parts) != 3 or not all(p.isdigit() for p in parts) or mode not in ("x", "abs"):
        raise HTTPException(
            422, f"steer {raw!r}: expected FEATURE_NODE:MODE:VALUE, a feature node id L_F_P and MODE x or abs"
        )
    layer = int_param(parts[0], f"steer {raw!r}: block", 0, g.n_layers - 1)
    feat = int_param(parts[1], f"steer {raw!r}: feature", 0, ts[layer].cfg.n_features - 1)
    pos = int_param(parts[2], f"steer {raw!r}: position", 0, g.n_pos - 1)
    v = float_param(value, f"steer {raw!r}: value", -STEER_LIMIT, STEER_LIMIT)
    if mode == "x":
        a = g.active_features
        hit = ((a[:, 0] == layer) & (a[:, 1] == pos) & (a[:, 2] == feat)).nonzero().flatten()
        if not len(hit):
            raise HTTPException(
                422,
                f"steer {raw!r}: feature {feat} of block {layer} is not active at position {pos} of this prompt, "
                "so × its activation is 0; give an absolute value (abs)",
            )
        v *= float(g.activation_values[hit[0]])
    return FeatureEdit(layer, feat, v, pos=None)


@router.get("/graph/steer/stream")
async def graph_steer_stream(request: Request, prompt: str | None = None, target: Targets = None):
    """Steered (the picked features set) beside unsteered, from one seed, continuing the prompt as written: the
    equalizer's event stream (`start`, `steered` / `unsteered` {text, done}, `end` or `error`)."""
    from .pages_steer import lanes_stream

    wb, cfg = wb_of(request), cfg_of(request)
    src = source_of(wb)
    prompt, targets = graph_query(request, prompt, target)
    qp = request.query_params
    raws = qp.getlist("steer")
    if not raws:
        raise HTTPException(422, "pick at least one feature node to steer (steer=L_F_P:MODE:VALUE)")
    if len(raws) > cfg.max_sliders:
        raise HTTPException(422, f"{len(raws)} steered features; the limit is {cfg.max_sliders}")
    seed = int_param(qp.get("seed", 16), "seed", 0, 2**31 - 1)
    temp = float_param(qp.get("temp", 0.5), "temp", 0, 2)
    new = int_param(qp.get("max_new_tokens", min(24, cfg.max_new_tokens)), "max_new_tokens", 1, cfg.max_new_tokens)
    g = (await run_model(request, _entry, wb, src, prompt, targets)).graph
    edits = [_steer_edit(raw, g, src.transcoders) for raw in raws]
    lanes = [Lane("steered", steerer=_EditSteerer(wb.lm, src.transcoders, edits)), Lane("unsteered")]
    gen = GenerationConfig(max_new_tokens=new, temperature=temp, top_p=0.9, seed=seed, chat=False)
    return lanes_stream(request, _SteerRun(seed, new, str(request.url.query)), lanes, prompt, gen)
