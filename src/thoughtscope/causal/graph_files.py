"""Attribution graphs on disk: our own file (safetensors tensors with a JSON header, no pickle, so any file is safe to
open), and the pruned graph JSON that circuit-tracer's frontend draws.

The frontend file follows circuit-tracer's create_graph_files and frontend/graph_models.py field for field: node ids
``{layer}_{feature}_{pos}`` (features), ``0_{layer}_{pos}`` (errors), ``E_{token id}_{pos}`` (tokens) and
``{n_layers + 1}_{token id}_{pos}`` (logits), each node's ``influence`` its cumulative influence share, links with
``source``/``target``/``weight`` (the direct effect). One difference: a kept edge whose weight is exactly zero is
not written (at a threshold of 1.0 circuit-tracer would list every pair of nodes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_save_tensors, atomic_write_json, read_json
from ..errors import CausalError
from ..values import is_int, is_number
from .graph import GRAPH_VERSION, AttributionGraph
from .influence import prune

#: what our graph file says it is, in its safetensors header
GRAPH_FORMAT = "thoughtscope-attribution-graph"
_HEADER_KEY = "thoughtscope_graph"
#: tensors of the graph file and whether each holds integer indices
_TENSORS = {
    "input_tokens": True,
    "logit_tokens": True,
    "logit_probabilities": False,
    "active_features": True,
    "activation_values": False,
    "selected_features": True,
    "adjacency": False,
}
#: the frontend's schema version (circuit-tracer's Metadata.schema_version)
CT_SCHEMA_VERSION = 1
#: the index of graphs circuit-tracer's local server lists, beside the graph files
CT_INDEX = "graph-metadata.json"


def save_graph(graph: AttributionGraph, path: str | os.PathLike) -> Path:
    """Write `graph` to one safetensors file (written whole or not at all; nothing is written if it is invalid)."""
    graph.check()
    info = {
        "format": GRAPH_FORMAT,
        "version": GRAPH_VERSION,
        "prompt": graph.prompt,
        "token_strs": list(graph.token_strs),
        "n_layers": int(graph.n_layers),
        "model": graph.model,
        "transcoders": graph.transcoders,
        "config": graph.config,
    }
    try:
        header = json.dumps(info, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise CausalError(
            f"graph config cannot be written as JSON ({e}); expected plain numbers, strings, lists"
        ) from e
    tensors = {name: getattr(graph, name) for name in _TENSORS}
    return atomic_save_tensors(tensors, path, metadata={_HEADER_KEY: header})


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    if not path.is_file():
        raise CausalError(f"cannot read graph file {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except OSError as e:
        raise CausalError(f"cannot read graph file {path}: {e.strerror or e}") from None
    except Exception as e:  # safetensors' own error for a damaged or foreign file
        raise CausalError(f"{path}: not a readable graph file (damaged or another format: {e})") from None


def _header(path: Path, meta: dict[str, str]) -> dict[str, Any]:
    if _HEADER_KEY not in meta:
        raise CausalError(f"{path}: not a thoughtscope attribution graph (its header has no {_HEADER_KEY!r} entry)")
    try:
        info = json.loads(meta[_HEADER_KEY])
    except ValueError as e:
        raise CausalError(f"{path}: damaged graph header ({e})") from None
    if not isinstance(info, dict) or info.get("format") != GRAPH_FORMAT:
        raise CausalError(f"{path}: not a thoughtscope attribution graph (expected format {GRAPH_FORMAT!r})")
    version = info.get("version")
    if not is_int(version) or version < 1:
        raise CausalError(f"{path}: graph file version {version!r} is not a positive integer")
    if version > GRAPH_VERSION:
        raise CausalError(
            f"{path} is a graph file of version {version}, newer than this thoughtscope reads (version "
            f"{GRAPH_VERSION}); upgrade thoughtscope to read it"
        )
    expected = {"prompt": str, "token_strs": list, "n_layers": int, "model": str, "transcoders": str, "config": dict}
    for key, kind in expected.items():
        value = info.get(key)
        if value is None:
            raise CausalError(f"{path}: graph header has no {key!r}")
        if not isinstance(value, kind) or (kind is int and not is_int(value)):
            raise CausalError(f"{path}: graph header {key!r} is a {type(value).__name__}, expected {kind.__name__}")
    if not all(isinstance(s, str) for s in info["token_strs"]):
        raise CausalError(f"{path}: graph header 'token_strs' must be a list of strings")
    return info


def load_graph(path: str | os.PathLike) -> AttributionGraph:
    """Read a graph written by save_graph (any earlier version); a damaged file or a newer version is refused."""
    path = Path(path)
    meta, tensors = _read_safetensors(path)
    info = _header(path, meta)
    for name, integer in _TENSORS.items():
        if name not in tensors:
            raise CausalError(f"{path}: graph file has no tensor {name!r}")
        t = tensors[name]
        if integer and (t.dtype.is_floating_point or t.dtype == torch.bool):
            raise CausalError(f"{path}: graph tensor {name!r} is {t.dtype}, expected integer indices")
        if not integer and not t.dtype.is_floating_point:
            raise CausalError(f"{path}: graph tensor {name!r} is {t.dtype}, expected floating point")
    graph = AttributionGraph(
        prompt=info["prompt"],
        token_strs=info["token_strs"],
        n_layers=info["n_layers"],
        model=info["model"],
        transcoders=info["transcoders"],
        config=info["config"],
        version=info["version"],
        **{name: tensors[name] for name in _TENSORS},
    )
    try:
        graph.check()
    except CausalError as e:
        raise CausalError(f"{path}: {e}") from None
    return graph


# ---- circuit-tracer's frontend JSON ----


def cantor_pairing(x: int, y: int) -> int:
    """One integer for a (layer, feature) pair: the frontend's `feature` field of a feature node."""
    return (x + y) * (x + y + 1) // 2 + y


def _node(node_id: str, feature: int, layer: str, ctx_idx: int, feature_type: str, js_id: str, **extra) -> dict:
    """A node with every field circuit-tracer's Node has, in its order."""
    node = {
        "node_id": node_id,
        "feature": feature,
        "layer": layer,
        "ctx_idx": ctx_idx,
        "feature_type": feature_type,
        "token_prob": 0.0,
        "is_target_logit": False,
        "run_idx": 0,
        "reverse_ctx_idx": 0,
        "jsNodeId": js_id,
        "clerp": "",
        "influence": None,
        "activation": None,
    }
    node.update(extra)
    return node


def circuit_tracer_nodes(
    graph: AttributionGraph,
    node_mask: torch.Tensor,
    cumulative_scores: torch.Tensor,
    *,
    labels: dict[tuple[int, int], str] | None = None,
    logit_strs: list[str] | None = None,
) -> dict[int, dict]:
    """The frontend's node for each kept node index, in node order (circuit-tracer's create_nodes)."""
    labels = labels or {}
    nodes: dict[int, dict] = {}
    n_layers, n_pos = graph.n_layers, graph.n_pos
    for i in node_mask.nonzero().flatten().tolist():
        influence = float(cumulative_scores[i])
        if i < graph.error_start:
            row = int(graph.selected_features[i])
            layer, pos, feat = graph.active_features[row].tolist()
            nodes[i] = _node(
                f"{layer}_{feat}_{pos}", cantor_pairing(layer, feat), str(layer), pos, "cross layer transcoder",
                f"{layer}_{feat}-0", clerp=labels.get((layer, feat)) or "", influence=influence,
                activation=float(graph.activation_values[row]),
            )  # fmt: skip
        elif i < graph.token_start:
            layer, pos = divmod(i - graph.error_start, n_pos)
            nodes[i] = _node(
                f"0_{layer}_{pos}", -1, str(layer), pos, "mlp reconstruction error", f"{layer}_{pos}-0",
                influence=influence,
            )  # fmt: skip
        elif i < graph.logit_start:
            pos = i - graph.token_start
            tok = int(graph.input_tokens[pos])
            nodes[i] = _node(f"E_{tok}_{pos}", pos, "E", pos, "embedding", f"E_{tok}-{pos}", influence=influence)
        else:
            k = i - graph.logit_start
            tok, prob = int(graph.logit_tokens[k]), float(graph.logit_probabilities[k])
            text = logit_strs[k] if logit_strs is not None else str(tok)
            layer = str(n_layers + 1)
            nodes[i] = _node(
                f"{layer}_{tok}_{n_pos - 1}", tok, layer, n_pos - 1, "logit", f"L_{tok}-{n_pos - 1}",
                token_prob=prob, is_target_logit=k == 0, clerp=f'Output "{text}" (p={prob:.3f})',
            )  # fmt: skip
    return nodes


def circuit_tracer_links(
    graph: AttributionGraph, nodes: dict[int, dict], edge_mask: torch.Tensor
) -> tuple[list[dict], list[dict]]:
    """(used nodes, links): kept edges between kept nodes with their direct effect (zero weights left out), then the
    nodes with a link, and every token and logit (circuit-tracer's create_used_nodes_and_edges)."""
    targets, sources = edge_mask.to(graph.adjacency.device).nonzero(as_tuple=True)
    weights = graph.adjacency[targets, sources].float().tolist()
    links = [
        {"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": w}
        for t, s, w in zip(targets.tolist(), sources.tolist(), weights, strict=True)
        if s in nodes and t in nodes and w != 0.0
    ]
    linked = {link["source"] for link in links} | {link["target"] for link in links}
    used = [n for n in nodes.values() if n["node_id"] in linked or n["feature_type"] in ("embedding", "logit")]
    return used, links


def _index_entry(index_path: Path, metadata: dict) -> dict:
    index = read_json(index_path, CausalError) if index_path.exists() else {"graphs": []}
    graphs = index.get("graphs")
    if not isinstance(graphs, list):
        raise CausalError(f"{index_path}: expected a 'graphs' list (circuit-tracer's graph index)")
    index["graphs"] = [g for g in graphs if not (isinstance(g, dict) and g.get("slug") == metadata["slug"])]
    index["graphs"].append(metadata)
    return index


def to_circuit_tracer_json(
    graph: AttributionGraph,
    path: str | os.PathLike,
    *,
    labels: dict[tuple[int, int], str] | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    slug: str | None = None,
    scan: str | None = None,
    logit_strs: list[str] | None = None,
    index: bool = True,
) -> dict:
    """Prune `graph` (influence.prune) and write the JSON circuit-tracer's frontend draws to `path` (``<slug>.json``;
    the frontend finds a graph by its slug). `labels` name features, (layer, feature) -> text; `scan` names the
    transcoder set (default: the graph's model); `logit_strs` are the target tokens' text (default: their ids).
    With `index`, the graph is also listed in graph-metadata.json beside it, which circuit-tracer's local server
    reads. Returns what was written."""
    path = Path(path)
    slug = path.stem if slug is None else slug
    if path.suffix != ".json" or path.stem != slug:
        raise CausalError(f"circuit-tracer graph file must be named <slug>.json, got {path.name} for slug {slug!r}")
    scan = graph.model if scan is None else scan
    if not scan:
        raise CausalError("a circuit-tracer graph needs a scan (the transcoder set's name); pass scan=")
    if logit_strs is not None and len(logit_strs) != graph.n_logits:
        raise CausalError(f"logit_strs has {len(logit_strs)} entries for {graph.n_logits} logit targets")
    graph.check()
    kept = prune(graph, node_threshold, edge_threshold)
    nodes = circuit_tracer_nodes(
        graph, kept.node_mask.cpu(), kept.cumulative_scores.cpu(), labels=labels, logit_strs=logit_strs
    )
    used, links = circuit_tracer_links(graph, nodes, kept.edge_mask.cpu())
    metadata = {
        "slug": slug,
        "scan": scan,
        "transcoder_list": [],
        "prompt_tokens": list(graph.token_strs),
        "prompt": graph.prompt,
        "node_threshold": node_threshold,
        "schema_version": CT_SCHEMA_VERSION,
        "edge_threshold": edge_threshold,
    }
    q_params = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    data = {"metadata": metadata, "qParams": q_params, "nodes": used, "links": links}
    entry = _index_entry(path.parent / CT_INDEX, metadata) if index else None
    atomic_write_json(path, data)
    if entry is not None:
        atomic_write_json(path.parent / CT_INDEX, entry)
    return data


#: fields the frontend requires of each part, and the defaults of the optional ones (circuit-tracer's models)
_CT_METADATA = {"slug": str, "scan": str, "transcoder_list": list, "prompt_tokens": list, "prompt": str}
_CT_METADATA_DEFAULTS = {"node_threshold": None, "schema_version": 1}
_CT_NODE = {"node_id": str, "feature": int, "layer": str, "ctx_idx": int, "feature_type": str}
_CT_NODE_DEFAULTS = {
    "token_prob": 0.0,
    "is_target_logit": False,
    "run_idx": 0,
    "reverse_ctx_idx": 0,
    "clerp": "",
    "influence": None,
    "activation": None,
}
_CT_LINK = {"source": str, "target": str, "weight": float}


def _fields(path: Path, what: str, value: Any, required: dict[str, type]) -> dict:
    if not isinstance(value, dict):
        raise CausalError(f"{path}: {what} is a {type(value).__name__}, expected a JSON object")
    for key, kind in required.items():
        if key not in value:
            raise CausalError(f"{path}: {what} has no field {key!r}")
        v = value[key]
        ok = is_int(v) if kind is int else is_number(v) if kind is float else isinstance(v, kind)
        if not ok:
            raise CausalError(f"{path}: {what} field {key!r} is {v!r}, expected {kind.__name__}")
    return value


def from_circuit_tracer_json(path: str | os.PathLike) -> dict:
    """Read a circuit-tracer graph JSON: {"metadata", "qParams", "nodes", "links"}, optional node fields filled with
    the frontend's defaults; a missing or mistyped field, or a link to a node that is not there, is named."""
    path = Path(path)
    data = read_json(path, CausalError)
    for key in ("metadata", "nodes", "links"):
        if key not in data:
            raise CausalError(f"{path}: no {key!r} (expected a circuit-tracer graph with metadata, nodes and links)")
    metadata = {**_CT_METADATA_DEFAULTS, **_fields(path, "metadata", data["metadata"], _CT_METADATA)}
    if not isinstance(data["nodes"], list) or not isinstance(data["links"], list):
        raise CausalError(f"{path}: 'nodes' and 'links' must be JSON lists")
    nodes = []
    for i, raw in enumerate(data["nodes"]):
        node = _fields(path, f"node {i}", raw, _CT_NODE)
        nodes.append({**_CT_NODE_DEFAULTS, "jsNodeId": node["node_id"], **node})
    ids = {n["node_id"] for n in nodes}
    links = []
    for i, raw in enumerate(data["links"]):
        link = _fields(path, f"link {i}", raw, _CT_LINK)
        for end in ("source", "target"):
            if link[end] not in ids:
                raise CausalError(f"{path}: link {i}'s {end} {link[end]!r} is not a node of the graph")
        links.append(link)
    q_params = data.get("qParams") or {
        "pinnedIds": [],
        "supernodes": [],
        "linkType": "both",
        "clickedId": "",
        "sg_pos": "",
    }
    return {"metadata": metadata, "qParams": q_params, "nodes": nodes, "links": links}
