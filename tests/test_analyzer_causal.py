"""The analyzer's token panel reads the causal views for the clicked position: what every layer says there (the
lens column, the text read only up to that position) and why the model says its next token (SAE feature
attribution, then checked by ablating the top features on request)."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from helpers.browser import LiveServer, browser, page, shot  # noqa: F401  (fixtures)
from helpers.server_fixtures import build_tiny

from thoughtscope.causal.lens import JacobianLens, lens_column, lens_view
from thoughtscope.causal.residuals import ResidualCache
from thoughtscope.server import ServerConfig, create_app

TEXT = "a quiet queen sat"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return create_app(ServerConfig(), build_tiny(tmp_path_factory.mktemp("causal-analyzer"), nla=False))


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, base_url="http://127.0.0.1:8765") as c:
        yield c


def test_the_lens_column_is_the_grids_column_at_that_position(app):
    lm = app.state.wb.lm
    grid = lens_view(lm, TEXT, k=3)
    for pos in (1, 5, len(grid.tokens) - 1):
        col = lens_column(lm, TEXT, pos, k=3)
        assert col["token"] == grid.tokens[pos] and len(col["layers"]) == lm.n_layers
        for layer in range(lm.n_layers):
            got, want = col["layers"][layer], grid.top[layer][pos]
            assert [t for t, _ in got] == [t for t, _ in want]
            assert [p for _, p in got] == pytest.approx([p for _, p in want], abs=1e-5)
        assert col["model_top1"] == grid.final_top1[pos]


def test_the_jacobian_column_is_the_jacobian_grids_column(app):
    lm = app.state.wb.lm
    g = torch.Generator().manual_seed(1)
    J = torch.eye(lm.d_model) + 0.3 * torch.randn(lm.n_layers, lm.d_model, lm.d_model, generator=g)
    lens = JacobianLens(J, lm.name)
    grid = lens_view(lm, TEXT, lens=lens, k=3)
    col = lens_column(lm, TEXT, 5, lens=lens, k=3, cache=ResidualCache())
    assert col["kind"] == "jacobian" and col["model_top1"] == grid.final_top1[5]
    for layer in range(lm.n_layers):
        assert [t for t, _ in col["layers"][layer]] == [t for t, _ in grid.top[layer][5]]


def test_a_second_position_of_the_same_text_is_read_from_the_cache(app):
    lm = app.state.wb.lm
    calls = []
    hook = lm.layers[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        cache = ResidualCache()
        first = lens_column(lm, TEXT, 6, cache=cache)
        second = lens_column(lm, TEXT, 2, cache=cache)
        assert len(calls) == 1
        for got, pos in ((first, 6), (second, 2)):
            want = lens_column(lm, TEXT, pos)
            assert [[t for t, _ in r] for r in got["layers"]] == [[t for t, _ in r] for r in want["layers"]]
            flat = [p for r in got["layers"] for _, p in r]
            assert flat == pytest.approx([p for r in want["layers"] for _, p in r], abs=1e-5)
        lens_column(lm, TEXT + " down", 2, cache=cache)  # another text: read again
        assert len(calls) == 4
    finally:
        hook.remove()


def test_token_views_answer_for_a_position_and_refuse_bad_input(client, app):
    lm = app.state.wb.lm
    ids, _ = lm.tokenize([TEXT])
    d = client.get("/api/analyze/lens", params={"text": TEXT, "pos": 4}).json()
    with torch.inference_mode():
        want = int(lm.model(ids[:, :5]).logits[0, -1].argmax())
    assert d["position"] == 4 and d["model_top1_id"] == want and len(d["layers"]) == lm.n_layers
    from thoughtscope.server.render import show_lone_token

    assert d["shown"]["layers"] == [[show_lone_token(t) for t, _ in row] for row in d["layers"]]
    assert d["shown"]["model_top1"] == show_lone_token(d["model_top1"])
    w = client.get("/api/analyze/why", params={"text": TEXT, "pos": 4, "target_id": want}).json()
    assert w["features"] and all(f["ablated"] is None for f in w["features"]) and w["spearman"] is None
    checked = client.get("/api/analyze/why", params={"text": TEXT, "pos": 4, "target_id": want, "check": 12}).json()
    measured = [f for f in checked["features"] if f["ablated"] is not None]
    assert measured and [f["feature"] for f in checked["features"]] == [f["feature"] for f in w["features"]]
    for params, needle in (
        ({"text": TEXT, "pos": 99}, "out of range"),
        ({"text": TEXT, "pos": 1, "kind": "tuned"}, "kind must be"),
    ):
        r = client.get("/api/analyze/lens", params=params)
        assert r.status_code == 422 and needle in r.json()["error"]
    r = client.get("/api/analyze/why", params={"text": TEXT, "pos": 1, "target_id": 10**6})
    assert r.status_code == 422 and "out of range" in r.json()["error"]
    r = client.get("/api/analyze/why", params={"text": TEXT, "pos": 1, "target_id": 3, "check": 50})
    assert r.status_code == 422 and "check" in r.json()["error"]


def test_token_panel_reads_each_layer_then_why_then_checks_in_chromium(app, page):  # noqa: F811
    lm = app.state.wb.lm
    with LiveServer(app) as site:
        page.goto(f"{site}/analyze")
        page.fill("textarea[name=text]", TEXT)
        page.click("#analyze-form button")
        page.wait_for_selector("#heatmap .t")
        page.locator("#heatmap .t").nth(4).click()
        page.click("#lens-here")
        page.wait_for_selector("table.lens-column")
        assert page.locator("table.lens-column tr").count() == lm.n_layers
        page.click("#why-here")
        page.wait_for_selector("ul.why-features li")
        assert page.locator(".ablated").count() == 0
        page.click("#why-check")
        page.wait_for_selector(".ablated")
        assert "Spearman" in page.inner_text("#why-panel") or page.locator(".ablated").count() < 3
        shot(page, "analyzer-why-this-token")


def test_the_panel_starts_from_the_analyzers_pass(client, app):
    """After /analyze the token panel's first click runs only the blocks above the SAE's site, and "why" is one
    backward pass through that reading: the same answer as reading the text afresh."""
    from thoughtscope.causal.attribution import attribute

    wb = app.state.wb
    lm = wb.lm
    ids, _ = lm.tokenize([TEXT])
    wb.residual_cache.clear()
    r = client.post("/analyze", data={"text": TEXT}, headers={"accept": "text/html"})
    assert r.status_code == 200
    site = lm.check_site(wb.sae.cfg.site)
    assert wb.residual_cache.held_blocks(lm, ids) == site.layer + 1
    d = client.get("/api/analyze/lens", params={"text": TEXT, "pos": 4}).json()
    w = client.get("/api/analyze/why", params={"text": TEXT, "pos": 4, "target_id": d["model_top1_id"]}).json()
    fresh = attribute(lm, wb.sae, TEXT, d["model_top1_id"], check=0, pos=4)
    top = sorted(fresh.total.items(), key=lambda kv: -abs(kv[1]))[:12]
    assert [f["feature"] for f in w["features"]] == [f for f, _ in top]
    assert [f["attribution"] for f in w["features"]] == pytest.approx([a for _, a in top], rel=1e-4, abs=1e-5)


def test_the_token_panel_benchmark_runs_the_pages_order_on_tiny(tmp_path):
    """benchmarks/web.py --token-panel-only: the analyzer, then the first lens click, another click, why and the
    ablation check, then both views cold; every ratio is written."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from helpers import env_with_tests_on_path

    root = Path(__file__).parent.parent
    out = tmp_path / "tp.json"
    cmd = [sys.executable, str(root / "benchmarks/web.py"), "--tiny", "--quick", "--token-panel-only", "--threads", "1"]
    r = subprocess.run([*cmd, "--json", str(out)], env=env_with_tests_on_path(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    for key in ("lens_column", "lens_column_next", "why", "why_checked", "lens_column_cold", "why_cold"):
        assert res[f"{key}_vs_analyzer"] > 0
