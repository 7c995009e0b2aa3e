"""The feature page shows every kind of explanation with its scores, marks the best, says why there is no NLA
reading, and warns on a kind that scores at or below its shuffled control (API and headless Chromium)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from helpers.browser import LiveServer, shot
from helpers.server_fixtures import PLANT, PLANT_LABEL, build_tiny

from thoughtscope.server import ServerConfig, create_app

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def wb(tmp_path_factory):
    w = build_tiny(tmp_path_factory.mktemp("kinds-web"), nla=False)
    # the input side scores below its control (as #664 did: 0.2 against 1.0); the output side beats its own
    w.atlas.save_explanation(
        PLANT,
        {
            "explanation": PLANT_LABEL,
            "status": "ok",
            "method": "offline-tokens-v2",
            "detection_auroc": 0.2,
            "shuffled_detection_auroc": 1.0,
        },
    )
    w.atlas.save_explanation_kinds(
        {
            PLANT: {
                "output": {
                    "explanation": 'says "zebra", "zoo"',
                    "status": "ok",
                    "method": "logit-words-v1",
                    "detection_auroc": 0.7,
                    "shuffled_detection_auroc": 0.5,
                    "own_method": "clamp-logprob-v1",
                    "own_score": 0.9,
                    "own_effect": 0.4,
                    "own_control_effect": 0.01,
                }
            }
        }
    )
    return w


def test_feature_json_lists_kinds_best_and_warning(wb):
    c = TestClient(create_app(ServerConfig(), wb), base_url="http://127.0.0.1:8765")
    ex = c.get(f"/api/features/{PLANT}").json()["explanation"]
    assert ex["text"] == PLANT_LABEL and ex["best"] == "output"
    kinds = {k["kind"]: k for k in ex["kinds"]}
    assert list(kinds) == ["input", "output"]
    assert kinds["input"]["warn"] and "0.20 vs 1.00" in kinds["input"]["warn"] and not kinds["output"]["warn"]
    assert kinds["output"]["best"] and not kinds["input"]["best"]
    assert dict(map(tuple, kinds["output"]["scores"]))["own_score"] == 0.9
    assert "NLA" in ex["nla"]
    # a feature with no explanation of any kind has none
    other = next(n for n in range(wb.atlas.n_features) if n != PLANT and wb.atlas.explanation(n) is None)
    assert c.get(f"/api/features/{other}").json()["explanation"] is None


def test_feature_page_in_chromium_marks_best_and_warns(wb, browser):
    with LiveServer(create_app(ServerConfig(), wb)) as url:
        ctx = browser.new_context(viewport={"width": 1360, "height": 900})
        page = ctx.new_page()
        page.goto(f"{url}/features/{PLANT}")
        rows = page.locator("#explanation-kinds .kind")
        assert rows.count() == 2
        best = page.locator("#explanation-kinds .kind[data-best=true]")
        assert best.count() == 1 and best.get_attribute("data-kind") == "output"
        assert 'says "zebra", "zoo"' in best.text_content() and "best" in best.text_content()
        warn = page.locator("#explanation-kinds .kind[data-kind=input] .kind-warning")
        assert warn.is_visible() and "shuffled control" in warn.text_content()
        assert page.locator("#explanation-kinds .kind[data-kind=output] .kind-warning").count() == 0
        assert page.locator("#nla-note").is_visible()
        shot(page, "feature-kinds")
        ctx.close()
