"""Chinese, Polish and emoji in a real headless Chromium: feature contexts, analyzer tokens and peaks show every
character once, whole, highlighted on all of its tokens; no "·" and no "\ufffd" where the text is valid UTF-8.

The tiny model reads bytes (every byte a token) and its features are planted on bytes *inside* characters
(helpers/unicode_site.py), the case where decoding tokens one by one shows fragments.
"""

from __future__ import annotations

import pytest
from helpers.browser import LiveServer, shot
from helpers.unicode_site import CHINESE, EMOJI, PLANTS, POLISH, SAMPLE, shared_unicode

from thoughtscope.server import ServerConfig, create_app

pytestmark = pytest.mark.usefixtures("one_thread")

BROKEN = ("·", "\ufffd")


@pytest.fixture(scope="module")
def site():
    wb = shared_unicode()
    with LiveServer(create_app(ServerConfig(), wb)) as url:
        yield url


def visible_pieces(where, selector: str) -> list[dict]:
    return where.locator(selector).evaluate_all(
        "els => els.map(e => ({text: e.innerText, pos: e.dataset.pos, peak: e.classList.contains('peak'),"
        " style: e.getAttribute('style') || ''}))",
    )


@pytest.mark.parametrize("feature", sorted(PLANTS))
def test_feature_contexts_show_whole_characters(site, page, feature):
    byte, chars = PLANTS[feature]
    page.goto(f"{site}/features/{feature}")
    contexts = page.locator("#top-contexts .ctx")
    pieces = [visible_pieces(contexts.nth(i), ".t") for i in range(contexts.count())]
    peaks = [p for c in pieces for p in c if p["peak"]]
    assert peaks and len(peaks) == contexts.count()
    for c in pieces:
        texts = [p["text"] for p in c]
        assert not any(b in t for t in texts for b in BROKEN), texts
        # a context cut from the corpus mid-character holds only part of it, at its first or last positions
        cut = [p for p in c if p["text"] == "…"]
        assert all(p is c[0] or p is c[-1] for p in cut), texts
    for p in peaks:
        if p["text"] == "…":
            continue
        assert bytes([byte]) in p["text"].encode(), p  # the whole character around the byte the feature fires on
        assert "rgba(234, 88, 12" in p["style"].replace(",", ", ")  # lit as a whole
        if feature != 6:  # the emoji feature's pieces may carry a joined sequence
            assert p["text"] in chars, p
    whole = [p for p in peaks if p["text"] != "…"]
    assert len(whole) >= len(peaks) - 2 and all(len(p["pos"].split(",")) >= 2 for p in whole)
    shot(page, f"unicode-feature-{feature}")


def test_analyzer_shows_whole_characters_and_lights_them(site, page):
    page.goto(f"{site}/analyze")
    page.fill("textarea[name=text]", SAMPLE)
    page.click("#analyze-form button")
    page.wait_for_selector("#heatmap .t")
    text = page.inner_text("#heatmap")
    for part in (CHINESE, POLISH, *EMOJI.split()):
        assert part in text, part
    assert not any(b in text for b in BROKEN), text
    peaks = page.inner_text("#peaks")
    assert not any(b in peaks for b in BROKEN) and "中" in peaks, peaks
    zhong = page.locator("#heatmap .t", has_text="中").first
    assert zhong.inner_text() == "中" and len(zhong.get_attribute("data-positions").split(",")) == 3
    zhong.click()
    panel = page.locator("#token-panel")
    assert "one character over 3 tokens" in panel.inner_text() and "#5" in panel.inner_text()
    panel.locator(".piece-tokens button").first.click()  # the first byte of 中: its own features
    assert "position 1" in panel.inner_text()
    shot(page, "unicode-analyzer")


def test_colouring_by_a_feature_lights_the_whole_character(site, page):
    from urllib.parse import quote

    page.goto(f"{site}/analyze?feature=7&text={quote(POLISH)}")
    page.wait_for_selector("#heatmap .t")
    lit = [p for p in visible_pieces(page, "#heatmap .t") if "rgba(234" in p["style"]]
    texts = {p["text"] for p in lit if "rgba(234, 88, 12, 0.9" in p["style"].replace(",", ", ")}
    assert texts and texts <= PLANTS[7][1] and set("łśźżń") & set(POLISH) <= texts


def test_atlas_cards_and_report_show_whole_characters():
    """The terminal card and the HTML report of the same contexts: the peak is the whole character, lit."""
    import re

    from rich.console import Console

    from thoughtscope.atlas.cards import feature_card
    from thoughtscope.atlas.report import _ctx_html

    wb = shared_unicode()
    console = Console(record=True, width=160)
    console.print(feature_card(wb.atlas, 5, wb.tokenizer))
    card = console.export_text()
    assert "·" not in card and "中" in card
    for e in wb.atlas.examples(5, "top", limit=8):
        peak = re.findall(r'class="peak"[^>]*title="([^"]*)">([^<]*)<', _ctx_html(e, wb.tokenizer, 40.0))
        assert len(peak) == 1, peak
        tip, text = peak[0]
        assert text in PLANTS[5][1] and "3 tokens" in tip, peak
