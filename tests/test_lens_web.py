"""The lens page in headless Chromium against the real server: a layer x position grid of the lens's top tokens,
clicking a token tracks its rank across layers; the JSON route and bad input."""

from __future__ import annotations

import pytest
from helpers.browser import LiveServer
from helpers.server_fixtures import shared_tiny

from thoughtscope.server import ServerConfig, create_app

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def site():
    wb = shared_tiny()
    with LiveServer(create_app(ServerConfig(), wb)) as url:
        yield url, wb


def test_grid_has_every_layer_and_a_click_tracks_the_token(site, page):
    url, wb = site
    page.goto(f"{url}/lens?text=hello+there")
    rows = page.locator("#lens-grid tbody tr")
    assert rows.count() == wb.lm.n_layers
    assert page.locator("#lens-grid thead th.t").count() == len(wb.lm.tokenize("hello there")[0][0])
    assert rows.first.get_attribute("data-layer") == str(wb.lm.n_layers - 1)  # the last layer on top
    assert "Jacobian" not in page.inner_text("#lens-form")  # no lens was fitted for the tiny model
    cell = page.locator("#lens-grid tbody tr").nth(1).locator("td.cell a").first
    cell.click()
    page.wait_for_selector("#lens-grid td.rank")
    assert "track=" in page.url
    ranks = [int(t) for t in page.locator("#lens-grid td.rank").all_inner_texts()]
    assert len(ranks) == wb.lm.n_layers and all(r >= 1 for r in ranks)


def test_json_route_and_bad_input(site):
    import httpx

    url, wb = site
    d = httpx.get(f"{url}/api/lens", params={"text": "hello there", "track": "e"}).json()
    assert d["kind"] == "logit" and len(d["top"]) == wb.lm.n_layers and d["agreement"][-1] == 1.0
    assert len(d["track"]["rank"]) == wb.lm.n_layers
    r = httpx.get(f"{url}/api/lens", params={"text": "hello", "kind": "jacobian"})
    assert r.status_code == 422 and "no Jacobian lens is fitted" in r.text
    r = httpx.get(f"{url}/api/lens", params={"text": "hello", "track": "ee"})
    assert r.status_code == 422 and "2 tokens" in r.text
    r = httpx.get(f"{url}/api/lens", params={"text": "hello", "kind": "tuned"})
    assert r.status_code == 422


def test_why_this_token_credits_features_checked_by_ablation(site, page):
    url, wb = site
    page.goto(f"{url}/lens?text=hello+there")
    page.click("#why-link")
    page.wait_for_selector("#why tbody tr")
    rows = page.locator("#why tbody tr")
    assert 0 < rows.count() <= 12
    assert "Spearman" in page.inner_text("#why")
    import httpx

    d = httpx.get(f"{url}/api/attribute", params={"text": "hello there", "target": "e"}).json()
    assert d["site"] == str(wb.sae.cfg.site) and d["features"] and "ablated" in d["features"][0]
