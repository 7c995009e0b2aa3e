"""Graph files: our own file round trips and refuses newer or damaged files; the circuit-tracer frontend JSON has
its field names and node ids, reads back, and names what a hand-edited file lacks."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from helpers.attribution_graphs import hand_graph, random_graph
from safetensors import safe_open
from safetensors.torch import save_file

from thoughtscope.causal.graph import GRAPH_VERSION
from thoughtscope.causal.graph_files import (
    CT_INDEX,
    from_circuit_tracer_json,
    load_graph,
    save_graph,
    to_circuit_tracer_json,
)
from thoughtscope.causal.influence import prune
from thoughtscope.errors import CausalError

torch.set_num_threads(1)

#: circuit-tracer's frontend models (frontend/graph_models.py), field for field
CT_NODE_FIELDS = [
    "node_id",
    "feature",
    "layer",
    "ctx_idx",
    "feature_type",
    "token_prob",
    "is_target_logit",
    "run_idx",
    "reverse_ctx_idx",
    "jsNodeId",
    "clerp",
    "influence",
    "activation",
]
CT_METADATA_FIELDS = {"slug", "scan", "transcoder_list", "prompt_tokens", "prompt", "node_threshold", "schema_version"}
CT_QPARAMS_FIELDS = {"pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"}


def two_paths():
    """logit <- a (0, pos 1, #3; weight 9) <- token 1; logit <- b (0, pos 0, #4; weight 1) <- token 0."""
    return hand_graph(
        1,
        2,
        [(0, 1, 3), (0, 0, 4)],
        {
            (("f", 0), ("t", 1)): 1.0,
            (("l", 0), ("f", 0)): 9.0,
            (("f", 1), ("t", 0)): 1.0,
            (("l", 0), ("f", 1)): 1.0,
        },
    )


def test_our_graph_file_round_trips(tmp_path):
    g = random_graph(1)
    g.config = {"targets": [1, 2], "seconds": 0.5, "note": "x"}
    g.transcoders = "/some/transcoders"
    path = save_graph(g, tmp_path / "g.safetensors")
    back = load_graph(path)
    for name in ("input_tokens", "logit_tokens", "logit_probabilities", "active_features", "activation_values"):
        assert torch.equal(getattr(back, name), getattr(g, name)), name
    assert torch.equal(back.selected_features, g.selected_features)
    assert torch.equal(back.adjacency, g.adjacency)
    assert (back.prompt, back.token_strs, back.n_layers, back.model) == (g.prompt, g.token_strs, 1 * 3, "tiny-model")
    assert (back.transcoders, back.config, back.version) == (g.transcoders, g.config, GRAPH_VERSION)


def _rewrite_header(path, **changes):
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    info = json.loads(meta["thoughtscope_graph"])
    info.update(changes)
    save_file(tensors, str(path), metadata={"thoughtscope_graph": json.dumps(info)})


def test_a_file_from_a_newer_version_is_refused_naming_both_versions(tmp_path):
    path = save_graph(hand_graph(1, 1, [], {}), tmp_path / "g.safetensors")
    _rewrite_header(path, version=GRAPH_VERSION + 1)
    with pytest.raises(CausalError, match=rf"version {GRAPH_VERSION + 1}.*version {GRAPH_VERSION}") as e:
        load_graph(path)
    assert str(path) in str(e.value)


def test_a_damaged_or_foreign_file_is_refused_naming_it(tmp_path):
    path = save_graph(random_graph(0), tmp_path / "g.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CausalError, match="g.safetensors"):
        load_graph(path)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(CausalError, match="g.safetensors"):
        load_graph(path)
    with pytest.raises(CausalError, match="no such file"):
        load_graph(tmp_path / "missing.safetensors")
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(CausalError, match="not a thoughtscope attribution graph"):
        load_graph(other)


def test_a_header_field_of_the_wrong_kind_or_a_missing_tensor_is_named(tmp_path):
    path = save_graph(hand_graph(1, 1, [], {}), tmp_path / "g.safetensors")
    _rewrite_header(path, n_layers="one")
    with pytest.raises(CausalError, match="'n_layers'"):
        load_graph(path)
    path = save_graph(hand_graph(1, 1, [], {}), tmp_path / "h.safetensors")
    _rewrite_header(path, n_layers=2)  # the adjacency no longer fits the node count
    with pytest.raises(CausalError, match="h.safetensors.*adjacency"):
        load_graph(path)


def test_nothing_is_written_for_an_invalid_graph(tmp_path):
    g = random_graph(0)
    g.config = {"device": torch.device("cpu")}
    with pytest.raises(CausalError, match="JSON"):
        save_graph(g, tmp_path / "a.safetensors")
    g = random_graph(0)
    g.adjacency = g.adjacency[:-1]
    with pytest.raises(CausalError, match="adjacency"):
        save_graph(g, tmp_path / "b.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_circuit_tracer_json_has_its_field_names_and_node_ids(tmp_path):
    g = two_paths()
    data = to_circuit_tracer_json(g, tmp_path / "two-paths.json", labels={(0, 3): "says nine"}, logit_strs=["!"])
    written = json.loads((tmp_path / "two-paths.json").read_text())
    assert written == data
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    assert set(data["metadata"]) >= CT_METADATA_FIELDS
    assert set(data["qParams"]) == CT_QPARAMS_FIELDS
    meta = data["metadata"]
    assert (meta["slug"], meta["scan"], meta["prompt_tokens"], meta["prompt"]) == (
        "two-paths",
        "tiny-model",
        ["w0", "w1"],
        "w0 w1",
    )
    assert (meta["node_threshold"], meta["edge_threshold"], meta["schema_version"]) == (0.8, 0.98, 1)
    assert all(list(n) == CT_NODE_FIELDS for n in data["nodes"])
    by_id = {n["node_id"]: n for n in data["nodes"]}
    # the weak feature b (0_4_0) is pruned; the strong one a, both tokens and the logit (layer n_layers + 1) stay
    assert set(by_id) == {"0_3_1", "E_10_0", "E_11_1", "2_100_1"}
    a = by_id["0_3_1"]
    assert (a["feature"], a["layer"], a["ctx_idx"], a["feature_type"], a["jsNodeId"]) == (
        (0 + 3) * (0 + 3 + 1) // 2 + 3, "0", 1, "cross layer transcoder", "0_3-0",
    )  # fmt: skip
    assert a["clerp"] == "says nine" and a["activation"] == pytest.approx(1.0)
    assert a["influence"] == pytest.approx(0.45) or a["influence"] == pytest.approx(0.9)
    tok = by_id["E_11_1"]
    assert (tok["feature"], tok["layer"], tok["feature_type"], tok["jsNodeId"]) == (1, "E", "embedding", "E_11-1")
    logit = by_id["2_100_1"]
    assert (logit["feature"], logit["feature_type"], logit["jsNodeId"], logit["is_target_logit"]) == (
        100, "logit", "L_100-1", True,
    )  # fmt: skip
    assert logit["clerp"] == 'Output "!" (p=1.000)' and logit["token_prob"] == 1.0 and logit["influence"] is None
    links = {(link["source"], link["target"]): link["weight"] for link in data["links"]}
    assert links == {("E_11_1", "0_3_1"): 1.0, ("0_3_1", "2_100_1"): 9.0}
    assert all(set(link) == {"source", "target", "weight"} for link in data["links"])


def test_error_nodes_carry_circuit_tracers_ids(tmp_path):
    g = hand_graph(2, 2, [], {(("l", 0), ("e", 1, 0)): 1.0})
    data = to_circuit_tracer_json(g, tmp_path / "err.json")
    err = next(n for n in data["nodes"] if n["feature_type"] == "mlp reconstruction error")
    assert (err["node_id"], err["feature"], err["layer"], err["ctx_idx"], err["jsNodeId"]) == (
        "0_1_0",
        -1,
        "1",
        0,
        "1_0-0",
    )
    logit = next(n for n in data["nodes"] if n["feature_type"] == "logit")
    assert logit["node_id"] == "3_100_1"


def test_the_json_reads_back_and_the_index_lists_each_slug_once(tmp_path):
    g = random_graph(2)
    data = to_circuit_tracer_json(g, tmp_path / "r.json", node_threshold=0.9)
    assert from_circuit_tracer_json(tmp_path / "r.json") == data
    to_circuit_tracer_json(g, tmp_path / "r.json", node_threshold=0.7)
    to_circuit_tracer_json(g, tmp_path / "s.json")
    graphs = json.loads((tmp_path / CT_INDEX).read_text())["graphs"]
    assert [(x["slug"], x["node_threshold"]) for x in graphs] == [("r", 0.7), ("s", 0.8)]
    kept = prune(g, 0.7, 0.98)
    back = from_circuit_tracer_json(tmp_path / "r.json")
    assert len([n for n in back["nodes"] if n["feature_type"] == "cross layer transcoder"]) <= int(
        kept.node_mask[: g.n_selected].sum()
    )


def test_reading_fills_the_frontends_defaults(tmp_path):
    path = tmp_path / "min.json"
    node = {"node_id": "E_5_0", "feature": 0, "layer": "E", "ctx_idx": 0, "feature_type": "embedding"}
    meta = {"slug": "min", "scan": "s", "transcoder_list": [], "prompt_tokens": ["a"], "prompt": "a"}
    path.write_text(json.dumps({"metadata": meta, "nodes": [node], "links": []}))
    back = from_circuit_tracer_json(path)
    assert back["nodes"][0]["jsNodeId"] == "E_5_0" and back["nodes"][0]["clerp"] == ""
    assert back["metadata"]["schema_version"] == 1 and back["qParams"]["linkType"] == "both"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: d.pop("links"), "'links'"),
        (lambda d: d["metadata"].pop("prompt_tokens"), "metadata has no field 'prompt_tokens'"),
        (lambda d: d["nodes"][1].pop("ctx_idx"), "node 1 has no field 'ctx_idx'"),
        (lambda d: d["nodes"][0].update(feature="3"), "node 0 field 'feature'"),
        (lambda d: d["links"][0].pop("weight"), "link 0 has no field 'weight'"),
        (lambda d: d["links"][0].update(target="nowhere"), "link 0's target 'nowhere' is not a node"),
    ],
)
def test_a_missing_or_mistyped_field_is_named(tmp_path, damage, message):
    data = to_circuit_tracer_json(two_paths(), tmp_path / "d.json", index=False)
    damage(data)
    (tmp_path / "d.json").write_text(json.dumps(data))
    with pytest.raises(CausalError, match=message):
        from_circuit_tracer_json(tmp_path / "d.json")


def test_bad_export_arguments_write_nothing(tmp_path):
    g = two_paths()
    with pytest.raises(CausalError, match="<slug>.json"):
        to_circuit_tracer_json(g, tmp_path / "a.json", slug="b")
    with pytest.raises(CausalError, match="logit_strs"):
        to_circuit_tracer_json(g, tmp_path / "a.json", logit_strs=["x", "y"])
    g.model = ""
    with pytest.raises(CausalError, match="scan"):
        to_circuit_tracer_json(g, tmp_path / "a.json")
    (tmp_path / CT_INDEX).write_text("{not json")
    with pytest.raises(CausalError, match=CT_INDEX):
        to_circuit_tracer_json(two_paths(), tmp_path / "a.json")
    assert [p.name for p in tmp_path.iterdir()] == [CT_INDEX]


@pytest.mark.slow
def test_matches_circuit_tracers_own_graph_files_on_random_graphs(tmp_path):
    """Run where circuit-tracer imports (e.g. /work/venv-ct/bin/python -m pytest -m slow this file)."""
    ct = pytest.importorskip("circuit_tracer.graph")
    from circuit_tracer.attribution.targets import LogitTarget

    cgf = importlib.import_module("circuit_tracer.utils.create_graph_files")
    from circuit_tracer.utils.tl_nnsight_mapping import UnifiedConfig

    class Tokens:  # circuit-tracer decodes prompt tokens with a tokenizer; ours are the graph's own strings
        def __init__(self, g):
            self.text = dict(zip(g.input_tokens.tolist(), g.token_strs, strict=True))

        def decode(self, t):
            return self.text[int(t)]

    for seed in range(4):
        g = random_graph(seed, n_layers=3, n_pos=5, n_features=25)
        cfg = UnifiedConfig(g.n_layers, 8, 2, 4, 16, 1000, "tok", "tiny", "Tiny")
        targets = [LogitTarget(f"t{int(t)}", int(t)) for t in g.logit_tokens]
        theirs = ct.Graph(
            g.prompt, g.input_tokens, g.active_features, g.adjacency, cfg, g.selected_features,
            g.activation_values, targets, g.logit_probabilities, scan="tiny",
        )  # fmt: skip
        mask, edges, scores = ct.prune_graph(theirs, 0.8, 0.98)
        nodes = cgf.create_nodes(theirs, mask, None, scores)
        used, links = cgf.create_used_nodes_and_edges(theirs, nodes, edges)
        ref = json.loads(cgf.build_model(theirs, used, links, "x", "tiny", 0.8, Tokens(g)).model_dump_json())
        names = [t.token_str for t in targets]
        ours = to_circuit_tracer_json(g, tmp_path / "x.json", scan="tiny", logit_strs=names, index=False)
        assert ours["nodes"] == ref["nodes"] and len(ref["nodes"]) > 10
        assert ours["links"] == ref["links"] and len(ref["links"]) > 10
        assert ours["qParams"] == ref["qParams"]
        assert {k: v for k, v in ours["metadata"].items() if k != "edge_threshold"} == ref["metadata"]
