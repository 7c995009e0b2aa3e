"""The graph page against the real server: a tiny random model and a tiny random transcoder set (block 1's decoder
scaled up so both blocks' features survive pruning), block 1's transcoder being the workbench's SAE with an atlas
(so its features have pages and one has an explanation) while block 0's have neither."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlparse

import pytest
import torch
from fastapi.testclient import TestClient
from helpers import single_thread
from helpers.atlas_fixtures import write_corpus
from helpers.browser import LiveServer, browser, page, shot  # noqa: F401  (fixtures)
from helpers.server_fixtures import ATLAS_CFG
from helpers.transcoder_sets import random_transcoder_set

from thoughtscope.atlas import Atlas, AtlasConfig, build_atlas
from thoughtscope.causal.attribution_graph import build
from thoughtscope.causal.graph_check import FeatureEdit, edited
from thoughtscope.causal.graph_files import to_circuit_tracer_json
from thoughtscope.causal.influence import prune
from thoughtscope.corpus import Corpus
from thoughtscope.display import lone_token_text
from thoughtscope.models import tiny_model
from thoughtscope.sae import SAE, SAEConfig, save_sae
from thoughtscope.server import ServerConfig, Workbench, create_app
from thoughtscope.server.pages_graph import attach_transcoders
from thoughtscope.steer import GenerationConfig, generate

PROMPT = "the cat sat"
LABEL = "a planted explanation of a block-1 feature"


def _feature_ids(graph, layer: int) -> list[tuple[int, str]]:
    """(feature, node id) of the drawn features of one block, most influential first (prune's order kept)."""
    kept = prune(graph)
    out = []
    for i in kept.node_mask[: graph.n_selected].nonzero().flatten().tolist():
        lay, pos, feat = graph.active_features[int(graph.selected_features[i])].tolist()
        if lay == layer:
            out.append((float(kept.cumulative_scores[i]), feat, f"{lay}_{feat}_{pos}"))
    return [(f, nid) for _, f, nid in sorted(out)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("graph-web")
    with single_thread():
        lm = tiny_model("llama", d_model=32, n_layers=2, vocab=256, seed=0)
        ts = random_transcoder_set(2, 32, 32)
        with torch.no_grad():
            ts[1].W_dec.mul_(6.0)
        for tc in ts:
            tc.cfg.model = lm.name
        save_sae(ts[1], root / "tc1")
        corpus = Corpus(str(write_corpus(root / "corpus.txt", n_docs=40)))
        cfg = AtlasConfig(**{**ATLAS_CFG, "n_tokens": 1500})
        path = build_atlas(lm, ts[1], corpus, root / "atlas", cfg, progress=False, sae_path=str(root / "tc1"))
        graph = build(lm, ts, PROMPT)
    explained = _feature_ids(graph, 1)[0][0]
    at = Atlas.open(path)
    at.save_explanation(explained, {"explanation": LABEL, "status": "ok", "explainer": "test", "scorer": "test"})
    wb = Workbench(lm=lm, sae=ts[1], sae_spec=str(root / "tc1"), atlas=at)
    attach_transcoders(wb, ts, [Atlas.open(path)], spec="tiny-set")
    bare = Workbench(lm=lm, sae=SAE.from_config(SAEConfig(arch="topk", d_model=32, n_features=16, k=4, site="resid.1")))
    return {"lm": lm, "ts": ts, "graph": graph, "explained": explained, "wb": wb, "bare": bare, "root": root}


@pytest.fixture(scope="module")
def app(world):
    return create_app(ServerConfig(), world["wb"])


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, base_url="http://127.0.0.1:8765") as c:
        yield c


def test_the_drawn_graph_is_the_pruned_graph_with_explanations_and_pages(client, world):
    d = client.get("/api/graph", params={"prompt": PROMPT}).json()
    want = to_circuit_tracer_json(world["graph"], world["root"] / "want.json", index=False)
    assert sorted(n["id"] for n in d["nodes"]) == sorted(n["node_id"] for n in want["nodes"])
    assert sorted((x["source"], x["target"]) for x in d["links"]) == sorted(
        (x["source"], x["target"]) for x in want["links"]
    )
    assert d["tokens"] == world["graph"].token_strs and d["n_layers"] == 2
    feats = {n["id"]: n for n in d["nodes"] if n["kind"] == "feature"}
    by_layer = {layer: [n for n in feats.values() if n["layer"] == layer] for layer in (0, 1)}
    assert by_layer[0] and by_layer[1]
    for n in by_layer[1]:
        assert n["page"] == f"/features/{n['feature']}" and n["row"] == 2
        assert n["label"] == (LABEL if n["feature"] == world["explained"] else "")
        assert n["contexts"] and all(c["act"] > 0 for c in n["contexts"])
    for n in by_layer[0]:
        assert n["page"] is None and n["label"] == "" and n["contexts"] == [] and n["row"] == 1
    rows = {n["kind"]: n["row"] for n in d["nodes"]}
    assert rows["embedding"] == 0 and rows["logit"] == 3
    tok = world["lm"].tokenizer
    want_tokens = [lone_token_text(tok, int(t)) for t in world["graph"].logit_tokens]
    assert [n["token"] for n in d["nodes"] if n["kind"] == "logit"] == want_tokens
    # a feature's activation and influence are the graph's
    g = world["graph"]
    for n in feats.values():
        a = g.active_features
        hit = ((a[:, 0] == n["layer"]) & (a[:, 1] == n["pos"]) & (a[:, 2] == n["feature"])).nonzero().flatten()
        assert n["activation"] == pytest.approx(float(g.activation_values[hit[0]]))
        assert n["influence"] > 0


def test_a_nodes_top_edges_are_the_strongest_entries_of_its_row_and_column(client, world):
    g = world["graph"]
    feat, nid = _feature_ids(g, 0)[0]
    d = client.get("/api/graph/node", params={"prompt": PROMPT, "node": nid, "kind": "feature"}).json()
    i = g.feature_node(0, int(nid.split("_")[2]), feat)
    strongest_out = float(g.adjacency[:, i][g.adjacency[:, i].abs().argmax()])
    strongest_in = float(g.adjacency[i][g.adjacency[i].abs().argmax()])
    assert d["out"][0]["weight"] == pytest.approx(strongest_out) and d["in"][0]["weight"] == pytest.approx(strongest_in)
    assert [abs(r["weight"]) for r in d["out"]] == sorted((abs(r["weight"]) for r in d["out"]), reverse=True)
    r = client.get("/api/graph/node", params={"prompt": PROMPT, "node": "9_9_9", "kind": "feature"})
    assert r.status_code == 404 and "no feature node" in r.json()["error"]


def test_download_is_circuit_tracers_json_with_the_pins_and_supernodes(client, world):
    g = world["graph"]
    (_, a), (_, b) = _feature_ids(g, 0)[:2]
    r = client.get("/graph/download.json", params={"prompt": PROMPT, "pin": [a, b], "group": f"{a},{b}|two of them"})
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    d = r.json()
    want = to_circuit_tracer_json(g, world["root"] / "want2.json", index=False)
    assert [n["node_id"] for n in d["nodes"]] == [n["node_id"] for n in want["nodes"]]
    assert d["links"] == want["links"] and d["metadata"]["prompt_tokens"] == want["metadata"]["prompt_tokens"]
    assert d["qParams"]["pinnedIds"] == [a, b] and d["qParams"]["supernodes"] == [["two of them", a, b]]
    labelled = [n for n in d["nodes"] if n["clerp"] == LABEL]
    assert len(labelled) == 1 and labelled[0]["layer"] == "1"


def _lanes(text: str) -> dict[str, str]:
    out = {"steered": "", "unsteered": ""}
    for block in text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if lines.get("event") in out:
            out[lines["event"]] += json.loads(lines["data"])["text"]
        assert lines.get("event") != "error", block
    return out


def test_steering_from_the_graph_is_generate_under_the_edit_beside_generate(client, world):
    lm, ts, g = world["lm"], world["ts"], world["graph"]
    feat, nid = _feature_ids(g, 1)[0]
    pos = int(nid.split("_")[2])
    act = float(g.activation_values[g.selected_features[g.feature_node(1, pos, feat)]])
    params = {"prompt": PROMPT, "steer": f"{nid}:x:-8", "seed": 3, "temp": 0.8, "max_new_tokens": 10}
    got = _lanes(client.get("/graph/steer/stream", params=params).text)
    cfg = GenerationConfig(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=3, chat=False)
    plain = generate(lm, [PROMPT], (), cfg)[0].text
    with edited(lm, ts, [FeatureEdit(1, feat, -8 * act, pos=None)]):
        steered = generate(lm, [PROMPT], (), cfg)[0].text
    assert got == {"steered": steered, "unsteered": plain} and steered != plain
    absolute = _lanes(client.get("/graph/steer/stream", params={**params, "steer": f"{nid}:abs:{-8 * act!r}"}).text)
    assert absolute == got


def test_bad_input_is_a_json_error_naming_it(client, world):
    for params, status, needle in (
        ({"prompt": "a" * 80}, 422, "at most 64"),
        ({"prompt": PROMPT, "target": "zz"}, 422, "'zz' is 2 tokens"),
        ({"prompt": PROMPT, "target": ["a"] * 11}, 422, "at most 10"),
        ({"prompt": ""}, 422, "prompt is empty"),
    ):
        r = client.get("/api/graph", params=params)
        assert r.status_code == status and needle in r.json()["error"] and r.json()["status"] == status
    g = world["graph"]
    nid = _feature_ids(g, 0)[0][1]
    active = {tuple(r) for r in g.active_features.tolist()}
    idle = next(f for f in range(32) if (1, 2, f) not in active)
    for steer, needle in (
        ("nonsense", "expected FEATURE_NODE:MODE:VALUE"),
        (f"{nid}:x:1e9", "value must be in"),
        (f"1_{idle}_2:x:2", "not active at position 2"),
        ("5_1_1:abs:1", "block must be in 0..1"),
    ):
        r = client.get("/graph/steer/stream", params={"prompt": PROMPT, "steer": steer})
        assert r.status_code == 422 and needle in r.json()["error"], (steer, r.text)
    bare = TestClient(create_app(ServerConfig(), world["bare"]), base_url="http://127.0.0.1:8765")
    r = bare.get("/api/graph", params={"prompt": PROMPT})
    assert r.status_code == 404 and "--transcoders DIR" in r.json()["error"]
    html = bare.get("/graph", headers={"accept": "text/html"}).text
    assert 'id="no-set"' in html and "--transcoders DIR" in html


def _state(url: str) -> dict:
    return parse_qs(urlparse(url).query)


def test_graph_page_hover_pin_group_reload_steer_and_errors_in_chromium(app, world, page):  # noqa: F811
    g = world["graph"]
    explained_id = next(nid for f, nid in _feature_ids(g, 1) if f == world["explained"])
    (_, a), (_, b) = _feature_ids(g, 0)[:2]
    page_feature, page_id = next((f, nid) for f, nid in _feature_ids(g, 1))
    with LiveServer(app) as site:
        page.goto(f"{site}/graph?prompt={PROMPT.replace(' ', '+')}")
        page.wait_for_selector("body[data-graph=ready]")
        want = to_circuit_tracer_json(g, world["root"] / "drawn.json", index=False)
        assert page.locator("#graph .node").count() == len(want["nodes"])
        assert page.locator("#graph .edge").count() == len(want["links"])
        assert page.locator("#graph text.tok").count() == g.n_pos
        assert page.locator("#graph text.logit-tok").count() == g.n_logits
        # hover: the explanation where the block has one, else "no explanation"; the activation either way
        page.hover(f'#graph .node.feature[data-id="{explained_id}"]')
        assert LABEL in page.inner_text("#graph-tip") and "activation" in page.inner_text("#graph-tip")
        page.hover(f'#graph .node.feature[data-id="{a}"]')
        assert "no explanation" in page.inner_text("#graph-tip")
        # click a feature without a page: its strongest edges
        page.click(f'#graph .node.feature[data-id="{a}"]')
        page.wait_for_selector("#node-panel .edges-out li")
        # pin two nodes, group them, steer one
        for nid in (a, b):
            page.click(f'#graph .node.feature[data-id="{nid}"]', modifiers=["Shift"])
        assert page.locator("#pins li").count() == 2
        page.locator("#pins li .pick").nth(0).check()
        page.locator("#pins li .pick").nth(1).check()
        page.fill("#group-label", "early cat")
        page.click("#group-button")
        page.locator(f'#pins li[data-id="{a}"] .steer-add').click()
        page.fill("#steers .steer-value", "-6")
        st = _state(page.evaluate("location.href"))  # page.url can lag behind history.replaceState
        assert st["pin"] == [a, b] and st["group"] == [f"{a},{b}|early cat"] and st["steer"] == [f"{a}:x:-6"]
        assert page.locator("#subgraph .supernode").count() == 1
        # a reload restores it all
        page.reload()
        page.wait_for_selector("body[data-graph=ready]")
        assert page.locator("#pins li").count() == 2 and "early cat" in page.inner_text("#groups")
        assert page.locator("#subgraph .supernode").count() == 1
        assert page.locator(f'#graph .node.pinned[data-id="{a}"]').count() == 1
        assert page.input_value("#steers .steer-value") == "-6"
        # the download carries the same pins and supernodes
        d = page.request.get(site + page.locator("#download").get_attribute("href")).json()
        assert d["qParams"]["supernodes"] == [["early cat", a, b]]
        # steer: steered beside unsteered from one seed, as the JSON stream gives them
        page.click("#generate")
        page.wait_for_selector("body[data-run=done]")
        assert "done in" in page.inner_text("#run-status")
        q = {"prompt": PROMPT, "steer": f"{a}:x:-6", "seed": 16, "temp": 0.5, "max_new_tokens": 24}
        want = _lanes(page.request.get(f"{site}/graph/steer/stream", params=q).text())
        assert page.text_content("#lane-steered") == want["steered"] != want["unsteered"]
        assert page.text_content("#lane-unsteered") == want["unsteered"]
        shot(page, "graph-page")
        # a feature with a page opens it
        page.click(f'#graph .node.feature[data-id="{page_id}"]')
        page.wait_for_url(f"**/features/{page_feature}")
        # bad input: the error beside the kept prompt
        page.goto(f"{site}/graph?prompt={PROMPT.replace(' ', '+')}&target=zz")
        page.wait_for_selector("body[data-graph=error]")
        assert "'zz' is 2 tokens" in page.inner_text("#graph-error")
        assert page.input_value("input[name=prompt]") == PROMPT
        page.fill("input[name=prompt]", "a" * 80)
        page.fill("input[name=targets]", "")
        page.click("#graph-form button")
        page.wait_for_function("document.querySelector('#graph-error').textContent.includes('at most 64')")
        assert page.input_value("input[name=prompt]") == "a" * 80


def test_serve_loads_a_saved_set_with_its_atlas_and_refuses_ones_that_do_not_fit(world, tmp_path):
    from thoughtscope.errors import AtlasError, SAEError
    from thoughtscope.sae.transcoder_set import save_transcoder_set
    from thoughtscope.server.pages_graph import load_transcoders

    lm, ts = world["lm"], world["ts"]
    folder = save_transcoder_set(ts, tmp_path / "set")  # int8: block 1 still matches the workbench's SAE
    wb = Workbench(lm=lm, sae=ts[1])
    src = load_transcoders(wb, folder, [world["root"] / "atlas"])
    assert wb.graphs is src and sorted(src.atlases) == [1] and src.page_layer == 1 and src.spec == str(folder)
    assert src.labels([(1, world["explained"]), (0, world["explained"])]) == {(1, world["explained"]): LABEL}
    with pytest.raises(AtlasError, match="two atlases for block 1"):
        load_transcoders(wb, folder, [world["root"] / "atlas", world["root"] / "atlas"])
    other = random_transcoder_set(2, 16, 8)
    with pytest.raises(SAEError, match="does not fit"):
        load_transcoders(wb, save_transcoder_set(other, tmp_path / "narrow"))
    block0 = Workbench(lm=lm, sae=ts[0])  # the SAE is block 0's transcoder: block 0's features have the pages
    assert load_transcoders(block0, folder).page_layer == 0
