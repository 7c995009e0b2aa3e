"""The report as a person sees it: rendered in headless Chromium, its contexts read as words, not token ids."""

from __future__ import annotations

import html
import os
import re
import shutil
from pathlib import Path

import pytest
from helpers.atlas_fixtures import identity_model, one_thread
from helpers.letters_atlas import build_letters_atlas
from typer.testing import CliRunner

from thoughtscope.atlas import Atlas
from thoughtscope.atlas.cards import load_tokenizer
from thoughtscope.cli import app

CHROMIUM = os.environ.get("THOUGHTSCOPE_CHROMIUM", "/usr/bin/chromium")


def _chromium_or_skip() -> str:
    """The browser, or a skip on a developer machine without it; under CI (env CI set) a missing one fails."""
    have = Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        have = False
    if not have:
        msg = f"headless Chromium ({CHROMIUM}) and the playwright package are needed for the report screenshot test"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI is set: this test may not be skipped)")
        pytest.skip(msg)
    return CHROMIUM


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    d = tmp_path_factory.mktemp("report-browser")
    with one_thread():
        lm = identity_model()
        build_letters_atlas(lm, d, n_tokens=8192, top_k=12, per_bin=4, n_random_contexts=128)
    runner = CliRunner()
    for args in (
        ["atlas", "explain", str(d / "atlas"), "--offline"],
        ["atlas", "report", str(d / "atlas"), "--cards", "4"],
    ):
        r = runner.invoke(app, args, env={"THOUGHTSCOPE_EXPLAINER_URL": ""})
        assert r.exit_code == 0, r.output
    return d / "atlas"


def _known_words(atlas_dir: Path) -> list[str]:
    """Words (3+ letters) of the top context of the first random card, decoded from the database directly."""
    with Atlas.open(atlas_dir) as at:
        tok = load_tokenizer(at)
        n = at.random_features(4, seed=0, alive_only=True)[0]
        ex = at.examples(n, "top", limit=1)[0]
        text = tok.decode(ex.tokens[max(1, ex.pos - 6) : ex.pos + 1])
    return [w for w in re.findall(r"[a-z]{3,}", text)]


def test_report_html_has_decoded_text_not_ids(report):
    page = (report / "report.html").read_text()
    assert not re.search(r"\[\d+\] \[\d+\]", page)  # no runs of token ids
    words = _known_words(report)
    text = html.unescape(re.sub(r"<[^>]+>", "", page))  # what a reader sees: one span per token, tags dropped
    assert words and all(w in text for w in words)


def test_report_screenshot_in_headless_chromium(report, tmp_path):
    exe = _chromium_or_skip()
    from playwright.sync_api import sync_playwright

    words = _known_words(report)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto((report / "report.html").resolve().as_uri())
            page.wait_for_load_state("load")
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            body = page.inner_text("body")
            images = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert images and all(w > 0 for w in images)  # the embedded plots decode
    flat = re.sub(r"\s+", " ", body)
    assert all(w in flat for w in words), (words, flat[:500])  # the known context reads as words on screen
    assert "detection AUROC" in body and "offline-tokens-v2" in body
