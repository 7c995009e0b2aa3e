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


@pytest.fixture(scope="module")
def mixing_site():
    """A random tiny Llama, whose last position reads the earlier ones (the shared fixture's model is built for
    planted features and does not), with a random SAE: enough for the patching page."""
    from thoughtscope.models import tiny_model
    from thoughtscope.sae import SAE, SAEConfig
    from thoughtscope.server.workbench import Workbench

    lm = tiny_model("llama", n_layers=3, seed=11)
    sae = SAE.from_config(SAEConfig(d_model=lm.d_model, n_features=32, arch="topk", k=4, site="resid.1"), seed=0)
    wb = Workbench(lm=lm, sae=sae.eval().requires_grad_(False))
    with LiveServer(create_app(ServerConfig(), wb)) as url:
        yield url, wb


def test_patching_page_maps_a_pair_and_a_click_shows_the_patched_run(mixing_site, page):
    url, wb = mixing_site
    page.goto(f"{url}/patch")
    page.fill("input[name=clean]", "ab cd ef")
    page.fill("input[name=corrupt]", "ab cx ef")
    page.fill("input[name=target]", "q")
    page.fill("input[name=against]", "z")
    page.click("#patch-form button")
    page.wait_for_selector("#patch-grid")
    assert page.locator("#patch-grid tbody tr").count() == wb.lm.n_layers
    assert -1 <= float(page.inner_text("#spearman")) <= 1
    top_last = page.locator("#patch-grid tbody tr").first.locator("td.cell").last
    assert float(top_last.inner_text()) == pytest.approx(1.0, abs=0.01)  # last block, last position: the clean run
    top_last.locator("a").click()
    page.wait_for_selector("#patch-cell")
    cols = page.locator("#patch-cell tbody tr").first.locator("td").all_inner_texts()
    assert len(cols) == 3 and cols[0] == cols[2]  # patching the final residual gives the clean run's next tokens


def test_patching_page_refuses_prompts_that_do_not_align(mixing_site):
    import httpx

    url, _ = mixing_site
    r = httpx.get(f"{url}/patch", params={"clean": "ab cd", "corrupt": "ab cdd", "target": "q"})
    assert r.status_code == 422 and "same number of tokens" in r.text


def test_a_lone_whitespace_token_is_never_an_empty_cell():
    from thoughtscope.server.render import show_lone_token

    assert [show_lone_token(t) for t in (" ", "\xa0", "  ")] == ["␣", "⍽", "␣␣"]
    assert show_lone_token(" Paris") == " Paris" and show_lone_token("\n") == "⏎"
