"""Browser tests: headless Chromium (Debian's, driven by Playwright) against the real server on a loopback port.

Outside CI they skip when Chromium or Playwright is missing; with the CI environment variable set they fail,
so a CI machine without a browser cannot pass silently. Screenshots go to $THOUGHTSCOPE_SCREENSHOTS when set.
"""

from __future__ import annotations

import threading

import pytest
from helpers.browser import LiveServer, shot
from helpers.server_fixtures import PLANT, PLANT_LABEL, shared_tiny

from thoughtscope.server import ServerConfig, create_app

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def site():
    wb = shared_tiny()
    with LiveServer(create_app(ServerConfig(), wb)) as url:
        yield url, wb


def test_search_then_feature_page_with_contexts_and_heatmap(site, page):
    url, _ = site
    page.goto(f"{url}/search?mode=words")
    page.locator("input[name=q]").press_sequentially("queen", delay=30)  # htmx fetches results while typing
    page.wait_for_selector(f"#hits a[href='/features/{PLANT}']")
    assert "q=queen" in page.url
    page.click(f"#hits a[href='/features/{PLANT}']")
    page.wait_for_url(f"**/features/{PLANT}")
    assert page.text_content("#explanation").strip() == PLANT_LABEL
    rows = page.locator("#top-contexts .ctx")
    assert rows.count() > 0
    lit = page.locator("#top-contexts .t.peak")
    assert lit.count() == rows.count() and "rgba(234, 88, 12" in lit.first.get_attribute("style").replace(",", ", ")
    assert page.locator("svg.hist rect").count() > 0


def _generate(page) -> dict[str, str]:
    page.click("#generate")
    page.wait_for_function("document.body.dataset.run === 'done'", timeout=60_000)
    status = page.text_content("#run-status")
    assert status.startswith("done"), status
    out = {k: page.text_content(f"#lane-{k}") for k in ("steered", "unsteered", "baseline")}
    page.evaluate("document.body.dataset.run = ''")
    return out


def test_slider_changes_only_the_steered_column(site, page):
    url, _ = site
    page.goto(f"{url}/steer?prompt=hello&f={PLANT}:clamp:0&seed=5&temp=0.8&max_new_tokens=12&baseline=talk+about+q")
    before = _generate(page)
    assert before["steered"] == before["unsteered"] and before["baseline"]
    page.locator(".slider.feature input[type=range]").fill("95")  # log scale: position 95 = 7.9x max
    assert float(page.input_value(".slider.feature .val")) > 7
    after = _generate(page)
    assert after["unsteered"] == before["unsteered"] and after["baseline"] == before["baseline"]
    assert after["steered"] != after["unsteered"]
    shot(page, "equalizer")


def test_copied_url_restores_the_mixer(site, page, browser):
    url, _ = site
    page.goto(f"{url}/steer")
    page.fill("#add-feature", str(PLANT))
    page.click("#add-button")
    page.locator(".slider.feature .val").fill("3.5")
    page.locator(".slider.feature .val").dispatch_event("change")
    page.select_option(".slider.feature .op", "add")
    page.fill("input[name=strength]", "1.5")
    page.fill("input[name=seed]", "42")
    page.locator("input[name=seed]").dispatch_event("change")
    page.locator(".slider.vector .val").fill("0.75")
    page.locator(".slider.vector .val").dispatch_event("change")
    link = page.url
    assert "f=3%3Aadd%3A3.5" in link and "seed=42" in link and "strength=1.5" in link
    other = browser.new_context().new_page()
    other.goto(link)
    assert other.input_value(".slider.feature .val") == "3.5"
    assert other.input_value(".slider.feature .op") == "add"
    assert other.input_value("input[name=strength]") == "1.5" and other.input_value("input[name=seed]") == "42"
    assert other.input_value(".slider.vector .val") == "0.75"
    assert int(other.input_value(".slider.feature input[type=range]")) == int(
        page.input_value(".slider.feature input[type=range]")
    )
    other.context.close()


def test_analyzer_heatmap_and_token_click(site, page):
    url, _ = site
    page.goto(f"{url}/analyze")
    page.fill("textarea[name=text]", "a quiet queen sat in the sun")
    page.click("#analyze-form button")
    page.wait_for_selector("#heatmap .t")
    tokens = page.locator("#heatmap .t")
    assert tokens.count() > 10
    q = page.locator("#heatmap .t", has_text="q").first
    assert "background" in (q.get_attribute("style") or "")
    q.click()
    panel = page.locator("#token-panel")
    assert f"#{PLANT}" in panel.text_content() and PLANT_LABEL in panel.text_content()
    assert "reconstruction error" in panel.text_content()
    tokens.first.click()  # position 0, the attention sink: no NLA button
    assert "does not explain position 0" in page.text_content("#token-panel")
    assert page.locator("#nla-explain").count() == 0
    q.click()
    page.click("#nla-explain")  # htmx fetches the NLA's reading of the token
    page.wait_for_selector("#nla-panel .nla-reading")
    assert "FVE" in page.text_content("#nla-panel") and "greedy" in page.text_content("#nla-panel")
    shot(page, "analyzer")


def test_random_button_lands_on_an_alive_feature(site, page):
    url, wb = site
    page.goto(f"{url}/")
    for _ in range(3):
        page.click("#random-feature")
        page.wait_for_url("**/features/*")
        n = int(page.url.rsplit("/", 1)[1])
        assert wb.alive[n] and page.locator("#top-contexts .ctx").count() > 0
    shot(page, "feature")


def test_building_page_turns_into_the_workbench(site, browser):
    """First start: the page follows the loader over server-sent events and reloads itself when it is ready."""
    _, wb = site
    go = threading.Event()

    def loader(status):
        status.set("building the atlas", "tiny test atlas")
        go.wait(30)
        return wb

    with LiveServer(create_app(ServerConfig(), loader=loader)) as url:
        pg = browser.new_page()
        pg.goto(f"{url}/")
        assert "Getting the workbench ready" in pg.text_content("h1")
        pg.wait_for_selector("#status >> text=building the atlas")
        go.set()
        pg.wait_for_selector("text=Feature explorer", timeout=20_000)
        assert pg.url.rstrip("/") == url
        pg.close()


def test_markup_in_corpus_explanations_and_texts_renders_as_text(browser, tmp_path):
    """Planted HTML and <script> in the atlas corpus (feature contexts), in an explanation (feature page, search,
    analyzer token panel, equalizer) and in an analyzed text: shown literally, never run, never an element."""
    import random

    from helpers.atlas_fixtures import Q_WORDS, WORDS
    from helpers.server_fixtures import ATLAS_CFG

    from thoughtscope.atlas import Atlas, AtlasConfig, build_atlas
    from thoughtscope.corpus import Corpus
    from thoughtscope.server import Workbench

    tiny = shared_tiny()
    label = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2"> the letter q'
    text = "a <script>window.__pwned=3</script> quiet <img src=x onerror=window.__pwned=4> queen"
    rng = random.Random(0)
    words = WORDS + [w.replace("q", "<b>q</b>") for w in Q_WORDS]  # every q of the corpus inside markup
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 30))) for _ in range(100)]
    (tmp_path / "corpus.txt").write_text("\n\n\n".join(docs))
    atlas = build_atlas(
        tiny.lm,
        tiny.sae,
        Corpus(str(tmp_path / "corpus.txt")),
        tmp_path / "atlas",
        AtlasConfig(**ATLAS_CFG),
        progress=False,
    )
    at = Atlas.open(atlas)
    at.save_explanation(PLANT, {"explanation": label, "status": "ok", "explainer": "test", "scorer": "test"})
    wb = Workbench(lm=tiny.lm, sae=tiny.sae, sae_spec=tiny.sae_spec, atlas=at)
    ctx = browser.new_context()
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("dialog", lambda d: errors.append(f"dialog {d.message}"))

    def clean(where: str) -> None:
        """Nothing ran, and no element came from the planted text (the page's own JSON scripts aside)."""
        assert pg.evaluate("window.__pwned") is None, where
        planted = "[...document.scripts].filter((s) => s.type !== 'application/json' && s.text.includes('__pwned'))"
        planted += ".length"
        assert pg.evaluate(planted) == 0, where
        assert pg.locator("img[src=x], .toks b, #heatmap b, #heatmap script").count() == 0, where

    with LiveServer(create_app(ServerConfig(), wb)) as url:
        pg.goto(f"{url}/features/{PLANT}")
        assert pg.text_content("#explanation").strip() == label
        contexts = pg.text_content("#top-contexts")
        assert "<b>q</b" in contexts  # the corpus markup, shown as its characters
        clean("feature page")
        pg.goto(f"{url}/search?mode=words&q=letter")
        assert label in pg.text_content("#hits")
        clean("search")
        pg.goto(f"{url}/analyze")
        pg.fill("textarea[name=text]", text)
        pg.click("#analyze-form button")
        pg.wait_for_selector("#heatmap .t")
        assert text in pg.text_content("#heatmap").replace("·", "")
        pg.locator("#heatmap .t", has_text="q").first.click()
        assert label in pg.text_content("#token-panel")
        clean("analyzer")
        pg.goto(f"{url}/steer?f={PLANT}:clamp:2&prompt=" + text.replace("&", "%26"))
        assert label[:60] in pg.text_content("#sliders") and pg.input_value("textarea[name=prompt]") == text
        clean("equalizer")
    ctx.close()
    at.close()
    assert not errors, errors
