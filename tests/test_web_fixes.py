"""What the trial of issue #28 found in the web workbench, each checked in headless Chromium or over HTTP against
the real server: the steer page's prompt-only baseline (plain words, refreshed by Load preset, the prompt and seed
kept by Open preset file), the analyzer's size limit (shown in the page, the text kept) and its shareable link,
and the NLA page's steering of a chat prompt (read through the chat template, as the equalizer reads it)."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from helpers.browser import LiveServer
from helpers.server_fixtures import PLANT, PLANT_LABEL, build_tiny

from thoughtscope.server import ServerConfig, create_app

pytestmark = pytest.mark.usefixtures("one_thread")
GLYPHS = 5  # a feature whose cue explanation quotes tokens as the pages display them
GLYPH_LABEL = 'fires on "⏎", "   ", "⏎⏎    ocean", "wave⏎"; in English text; promotes "⏎"'
HTML = {"accept": "text/html"}


@pytest.fixture(scope="module")
def wb(tmp_path_factory):
    wb = build_tiny(tmp_path_factory.mktemp("web-fixes"))
    wb.atlas.save_explanation(
        GLYPHS, {"explanation": GLYPH_LABEL, "status": "ok", "explainer": "test", "scorer": "test"}
    )
    return wb


@pytest.fixture(scope="module")
def site(wb):
    with LiveServer(create_app(ServerConfig(), wb)) as url:
        yield url


@pytest.fixture()
def page(browser):
    ctx = browser.new_context(viewport={"width": 1360, "height": 900})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    ctx.close()
    assert not errors, f"JavaScript errors: {errors}"


def _query(page) -> dict:
    return {k: v[-1] for k, v in parse_qs(urlsplit(page.url).query).items()}


# ----------------------------------------------------------------------------- the equalizer's baseline


def test_baseline_is_plain_words_and_follows_a_loaded_preset(site, page):
    page.goto(f"{site}/steer?f={GLYPHS}:clamp:2")
    assert page.input_value("#baseline") == "Talk about ocean, wave."  # no ⏎, no run of spaces, no empty cue
    page.select_option("#load-preset", "q-calibrated")
    page.wait_for_url(f"**/steer?*f={PLANT}*")
    assert page.input_value("#baseline") == f"Talk about {PLANT_LABEL}."  # the preset's feature, not the old one
    # a baseline the user wrote stays through Load preset
    page.fill("#baseline", "Answer in one word.")
    page.dispatch_event("#baseline", "input")
    page.select_option("#load-preset", "tilt")
    page.wait_for_url("**/steer?*v=tilt*")
    assert page.input_value("#baseline") == "Answer in one word."


def test_open_preset_file_keeps_the_prompt_seed_and_own_baseline(site, wb, page, tmp_path):
    preset = {
        "format": "thoughtscope-preset-2",
        "name": "mine",
        "interventions": [
            {"type": "feature", "op": "clamp", "site": "resid.1", "sae": wb.sae_spec, "feature": PLANT, "strength": 1.5}
        ],
    }
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(preset))
    page.goto(f"{site}/steer?f={GLYPHS}:clamp:2")
    page.fill("#prompt", "Say something about the sea.")
    page.fill("input[name=seed]", "7")
    page.fill("input[name=temp]", "0.9")
    page.dispatch_event("input[name=temp]", "change")
    page.set_input_files("#upload-preset", str(path))
    page.wait_for_url(f"**/steer?*f={PLANT}*")
    q = _query(page)
    assert (q["prompt"], q["seed"], q["temp"]) == ("Say something about the sea.", "7", "0.9")
    assert page.input_value("#prompt") == "Say something about the sea." and page.input_value("input[name=seed]") == "7"
    assert page.input_value("#baseline") == f"Talk about {PLANT_LABEL}."  # filled in for the uploaded feature


def test_preset_upload_api_keeps_the_query_mixer(site, wb):
    body = json.dumps(
        {
            "format": "thoughtscope-preset-2",
            "name": "x",
            "interventions": [
                {"type": "feature", "op": "clamp", "site": "resid.1", "sae": wb.sae_spec, "feature": PLANT}
            ],
        }
    )
    q = urlencode({"prompt": "Keep me.", "seed": 11, "baseline": "Be terse.", "f": f"{GLYPHS}:clamp:2"})
    r = httpx.post(f"{site}/steer/preset?{q}", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    got = {k: v[-1] for k, v in parse_qs(urlsplit(r.json()["url"]).query).items()}
    assert (got["prompt"], got["seed"], got["baseline"]) == ("Keep me.", "11", "Be terse.")
    assert got["f"].startswith(f"{PLANT}:clamp:")
