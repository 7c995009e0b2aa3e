"""The workbench on the embedded defaults in a real browser (slow): every page works on SmolLM2 with the shipped
SAE, NLA and the first-start atlas. The documentation's screenshots come from this test:

    THOUGHTSCOPE_SCREENSHOTS=docs/img python3 -m pytest -q -m slow tests/test_web_default.py
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

import pytest
from helpers.browser import LiveServer, shot

from thoughtscope.server import ServerConfig, create_app, load_workbench

pytestmark = pytest.mark.slow
SKY = 3448  # the shipped steering example's feature (sky: sun, moon, stars, clouds), see docs/steering.md
TEXT = (
    "User: Can you help me fix this?\n\ndef mean(xs):\n    return sum(xs) / len(xs)\n\nAssistant: Sure. The "
    "function fails on an empty list, because len(xs) is zero. The sky was clear and the stars were out."
)


@pytest.fixture(scope="module")
def site():
    wb = load_workbench(nla="default", progress=False)
    with LiveServer(create_app(ServerConfig(max_new_tokens=64), wb)) as url:
        yield url, wb


@pytest.fixture()
def page(browser):  # noqa: F811
    ctx = browser.new_context(viewport={"width": 1360, "height": 860}, device_scale_factor=1)
    pg = ctx.new_page()
    yield pg
    ctx.close()


def test_home_feature_and_search(site, page):
    url, wb = site
    page.goto(f"{url}/")
    assert wb.lm.name in page.text_content("header")
    shot(page, "home")
    page.goto(f"{url}/search?mode=words&q=sky")
    assert page.locator("#hits tbody tr").count() > 0
    shot(page, "search")
    page.goto(f"{url}/features/{SKY}")
    assert page.locator("#top-contexts .ctx").count() > 0 and page.locator("svg.hist rect").count() > 0
    shot(page, "feature")


def test_analyzer_click_and_nla(site, page):
    url, _ = site
    page.goto(f"{url}/analyze")
    page.fill("textarea[name=text]", TEXT)
    page.click("#analyze-form button")
    page.wait_for_selector("#heatmap .t")
    page.locator("#heatmap .t", has_text="stars").first.click()
    assert page.locator("#token-panel .token-features li").count() > 0
    page.click("#nla-explain")
    page.wait_for_selector("#nla-panel .nla-reading", timeout=120_000)
    shot(page, "analyzer")
    page.goto(
        f"{url}/compare?a={quote('The stars and the moon lit the night sky.')}&b="
        f"{quote('The printer and the scanner sat on the desk.')}"
    )
    assert page.locator("#diff tbody tr").count() > 0
    shot(page, "compare")


def test_equalizer_streams_three_columns(site, page):
    url, _ = site
    page.goto(
        f"{url}/steer?prompt={quote('Tell me about your weekend.')}&f={SKY}:clamp:2&max_new_tokens=40&seed=16&temp=0.5"
        f"&where=generated&baseline={quote('Talk about the sky, the sun, the moon and the stars.')}"
    )
    page.click("#generate")
    page.wait_for_function("document.body.dataset.run === 'done'", timeout=180_000)
    lanes = {k: page.text_content(f"#lane-{k}") for k in ("steered", "unsteered", "baseline")}
    assert all(lanes.values()) and lanes["steered"] != lanes["unsteered"], lanes
    shot(page, "equalizer")


def test_nla_view(site, page):
    url, _ = site
    page.goto(f"{url}/nla?text={quote('The cat sat on the warm windowsill in the sun')}&pos=-1&samples=3")
    assert page.locator("#nla-result .samples li").count() == 3
    assert page.locator("#nla-result .samples li.best", has_text="oracle").count() == 1
    assert "FVE" in page.text_content("#nla-result .nla-reading")
    shot(page, "nla")


def test_analyzer_says_what_each_layer_reads_and_why_the_next_token(site, page):
    """The token panel's causal views on the default model: the Jacobian lens column at the last token of a
    factual prompt ends on the model's answer, and the features credited with it are checked by ablation."""
    url, _ = site
    page.goto(f"{url}/analyze")
    page.fill("textarea[name=text]", "The Eiffel Tower is in the city of")
    page.click("#analyze-form button")
    page.wait_for_selector("#heatmap .t")
    page.locator("#heatmap .t").last.click()
    page.check("#lens-jacobian")
    page.click("#lens-here")
    page.wait_for_selector("table.lens-column")
    assert page.locator("table.lens-column tr").count() == 30
    cells = page.locator("table.lens-column code").all_inner_texts()
    assert len(cells) == 90 and all(c.strip() for c in cells)  # a token of spaces shows as ␣, never a blank cell
    assert "Paris" in page.inner_text("#causal-panel p")
    page.click("#why-here")
    page.wait_for_selector("ul.why-features li")
    page.click("#why-check")
    page.wait_for_selector(".ablated", timeout=120_000)
    assert "Spearman" in page.inner_text("#why-panel")
    out = os.environ.get("THOUGHTSCOPE_SCREENSHOTS")
    if out:  # the two panels side by side: the lens column and the credited features
        from PIL import Image

        parts = []
        for sel in ("#causal-panel table.lens-column", "#why-panel"):
            path = Path(out) / f".{sel[1:6]}.png"
            page.locator(sel).screenshot(path=str(path))
            parts.append(Image.open(path).convert("RGB"))
            path.unlink()
        both = Image.new("RGB", (sum(p.width for p in parts) + 24, max(p.height for p in parts)), "white")
        both.paste(parts[0], (0, 0))
        both.paste(parts[1], (parts[0].width + 24, 0))
        both.save(Path(out) / "analyzer-why.png")


def test_graph_page_on_the_shipped_transcoders(site, page):
    from thoughtscope.sae.transcoder_set import default_transcoders_path
    from thoughtscope.server.pages_graph import load_transcoders

    url, wb = site
    if not default_transcoders_path().is_dir():
        pytest.skip("the shipped transcoder set is not installed")
    load_transcoders(wb, "default")
    prompt = quote("The Eiffel Tower is in the city of")
    view = page.request.get(f"{url}/api/graph?prompt={prompt}").json()
    top = max((n for n in view["nodes"] if n["kind"] == "feature"), key=lambda n: n["influence"])["id"]
    page.goto(f"{url}/graph?prompt={prompt}&pin={top}&steer={top}:x:0")  # the strongest feature pinned and ablated
    page.wait_for_selector("body[data-graph=ready]", timeout=180_000)
    assert page.locator("#graph .node").count() > 10 and page.locator("#graph text.tok").count() == 10
    assert "Paris" in (page.text_content("#graph") or "") and "default" in page.inner_text("main")
    page.click("#generate")
    page.wait_for_selector("body[data-run=done]", timeout=120_000)
    assert page.text_content("#lane-steered") and page.text_content("#lane-unsteered")
    shot(page, "graph")
