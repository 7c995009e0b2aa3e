"""Every page that shows a feature's explanation as a label warns when it scores at or below its shuffled control
(the feature page and the meaning search did; the analyzer, its token panel, compare, search by text and contrast,
and the lens page's why-list now do too)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from helpers.atlas_fixtures import PLANT
from helpers.browser import LiveServer, browser, page, shot  # noqa: F401  (fixtures)
from helpers.server_fixtures import build_tiny

from thoughtscope.server import ServerConfig, create_app

WARN = "at or below its shuffled control"
HTML = {"accept": "text/html"}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    wb = build_tiny(tmp_path_factory.mktemp("trust"), nla=False)
    rec = {"explanation": 'fires on "queen"', "status": "ok", "detection_auroc": 0.4, "shuffled_detection_auroc": 0.6}
    with wb.db_lock:
        wb.atlas.save_explanation(PLANT, rec)
    return create_app(ServerConfig(), wb)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, base_url="http://127.0.0.1:8765") as c:
        yield c


def test_the_rule_is_the_atlas_rule_and_follows_a_rescore(app):
    wb = app.state.wb
    assert wb.distrusted([PLANT, PLANT + 1]) == {PLANT}
    rec = {"explanation": 'fires on "queen"', "status": "ok", "detection_auroc": 0.9, "shuffled_detection_auroc": 0.6}
    with wb.db_lock:
        wb.atlas.save_explanation(PLANT + 1, rec)
    assert wb.distrusted([PLANT, PLANT + 1]) == {PLANT}
    rows = wb.with_labels([{"feature": PLANT}, {"feature": PLANT + 1}])
    assert [r["below_control"] for r in rows] == [True, False] and rows[1]["label"] == 'fires on "queen"'


def test_analyzer_marks_the_label_in_its_header_peaks_and_token_detail(client):
    html = client.get("/analyze", params={"text": "a quiet queen", "feature": PLANT}, headers=HTML).text
    assert WARN in html.split(f'Feature <a href="/features/{PLANT}">', 1)[1].split("</h", 1)[0]
    assert WARN in html.split('id="peaks"', 1)[1].split("</section>", 1)[0]
    detail = json.loads(html.split('id="detail">', 1)[1].split("</script>", 1)[0])
    flags = {row[0]: row[4] for d in detail for row in d["top"]}
    assert flags[PLANT] is True and not any(v for f, v in flags.items() if f != PLANT)


def test_compare_and_search_by_text_mark_it(client):
    html = client.get("/compare", params={"a": "a quiet queen", "b": "a calm lake"}, headers=HTML).text
    row = html.split(f'href="/features/{PLANT}"', 1)[1].split("</tr>", 1)[0]
    assert WARN in row
    html = client.get("/search", params={"mode": "text", "text": "a quiet queen"}, headers=HTML).text
    row = html.split(f'href="/features/{PLANT}"', 1)[1].split("</tr>", 1)[0]
    assert WARN in row


def test_token_panel_shows_the_warning_in_chromium(app, page):  # noqa: F811
    with LiveServer(app) as site:
        page.goto(f"{site}/analyze")
        page.fill("textarea[name=text]", "a quiet queen")
        page.click("#analyze-form button")
        page.wait_for_selector("#heatmap .t")
        page.locator("#heatmap .t", has_text="q").first.click()
        panel = page.locator("#token-panel")
        item = panel.locator("li", has=page.locator(f'a[href="/features/{PLANT}"]')).first
        assert WARN in item.inner_text()
        assert panel.locator(".below-control").count() == 1
        shot(page, "analyzer-below-control")
