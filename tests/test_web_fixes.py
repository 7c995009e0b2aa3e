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


# ----------------------------------------------------------------------------- the analyzer's limit and its link


def test_analyzer_text_over_the_limit_stays_in_the_form_with_the_limit(site, page):
    text = "a quiet queen sat in the sun. " * 7000  # 210,000 characters: the trial's 200 KB paste
    page.goto(f"{site}/analyze")
    page.fill("#analyze-form textarea", text)
    page.click("#analyze-form button")
    page.wait_for_selector("#analyze-error:not([hidden])", timeout=5000)
    msg = page.text_content("#analyze-error")
    assert "210,000 characters" in msg and "the limit is 8,000" in msg, msg
    assert urlsplit(page.url).path == "/analyze"
    assert page.eval_on_selector("#analyze-form textarea", "t => t.value") == text
    assert "8,000 characters" in page.text_content("#text-limit")  # the limit is on the page before any error


def test_analyzer_refusals_are_styled_pages_and_keep_what_fits(site):
    big = "a quiet queen " * 15000  # over the 64 KiB body limit: refused before it is read
    r = httpx.post(f"{site}/analyze", data={"text": big}, headers=HTML)
    assert r.status_code == 413
    assert "/static/style.css" in r.text and "error-card" in r.text and "8,000 characters" in r.text, r.text[:400]
    long = "a quiet queen " * 700  # 9,800 characters: read, over the text limit, sent back in the form
    r = httpx.post(f"{site}/analyze", data={"text": long, "view": "error"}, headers=HTML)
    assert r.status_code == 422 and "9,800 characters; the limit is 8,000" in r.text
    assert f">{long}</textarea>" in r.text and '<option value="error" selected' in r.text


def test_analysis_gets_a_shareable_address(site, page):
    page.goto(f"{site}/analyze")
    page.fill("#analyze-form textarea", "a quiet queen read a book")
    page.fill("#analyze-form input[name=feature]", str(PLANT))
    page.click("#analyze-form button")  # a POST: the address bar then holds the GET link of this result
    page.wait_for_url("**/analyze?text=*")
    q = _query(page)
    assert (q["text"], q["feature"], q["view"]) == ("a quiet queen read a book", str(PLANT), "features")
    shown = page.inner_html("#heatmap")
    page.goto(page.url)  # the link opened again (a copy sent to someone) shows the same result
    assert page.inner_html("#heatmap") == shown and page.input_value("#analyze-form textarea") == q["text"]


def test_no_link_above_the_address_limit(wb):
    from fastapi.testclient import TestClient

    with TestClient(create_app(ServerConfig(max_query_chars=300), wb), base_url="http://127.0.0.1:8765") as c:
        r = c.post("/analyze", data={"text": "é" * 100}, headers=HTML)  # 600 characters percent-encoded
        assert r.status_code == 200 and 'id="heatmap"' in r.text
        assert "No link to this result" in r.text and "over the limit of 300" in r.text
        assert "replaceState" not in r.text
        r = c.post("/analyze", data={"text": "é" * 10}, headers=HTML)
        assert 'id="share-link" href="/analyze?text=%C3%A9%C3%A9' in r.text


# ----------------------------------------------------------------------------- the NLA page's steering

CHAT = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


@pytest.fixture()
def chat_model(wb):
    """The tiny model's tokenizer with a chat template (as SmolLM2's has), taken off again afterwards."""
    tok = wb.lm.tokenizer
    before = getattr(tok, "chat_template", None)
    tok.chat_template = CHAT
    yield wb.lm
    tok.chat_template = before


def test_nla_steer_reads_a_chat_prompt_through_the_chat_template(site, chat_model):
    """The trial: "Tell me a short story." gave an empty unsteered column on SmolLM2, read as raw text (the model
    ends a bare instruction at once). Its unsteered answer is now the equalizer's: the prompt as a user turn."""
    from html import unescape

    from thoughtscope.steer import GenerationConfig, generate

    prompt = "Tell me a short story."
    q = {"prompt": prompt, "original": "the letter q", "edited": "the letter z", "strength": "1"}
    r = httpx.get(f"{site}/nla", params=q, headers=HTML)
    assert r.status_code == 200, r.text[:300]
    shown = unescape(r.text.split('id="nla-unsteered">', 1)[1].split("</pre>", 1)[0])
    cfg = {"max_new_tokens": min(32, ServerConfig().max_new_tokens), "temperature": 0.0, "seed": 0}
    chat = generate(chat_model, [prompt], (), GenerationConfig(**cfg))[0].text
    raw = generate(chat_model, [prompt], (), GenerationConfig(**cfg, chat=False))[0].text
    assert chat != raw  # the two readings differ on this model, so the check below can tell them apart
    assert shown == chat


@pytest.mark.slow
def test_nla_steer_answers_a_chat_prompt_on_the_default_model():
    """The trial's case on SmolLM2 with the shipped NLA: the unsteered column of "Tell me a short story." was
    empty (the bare instruction read as raw text ends at once)."""
    from fastapi.testclient import TestClient

    from thoughtscope.models import load_model
    from thoughtscope.nla import load_nla
    from thoughtscope.sae import load_sae
    from thoughtscope.server import Workbench

    lm = load_model("default")
    wb = Workbench(lm=lm, sae=load_sae("default"), sae_spec="default", nla=load_nla("default", lm=lm))
    q = {"prompt": "Tell me a short story.", "original": "Topic: weather", "edited": "Topic: ocean", "strength": "1"}
    with TestClient(create_app(ServerConfig(), wb), base_url="http://127.0.0.1:8765") as c:
        r = c.get("/nla", params=q, headers=HTML)
    assert r.status_code == 200, r.text[:300]
    unsteered = r.text.split('id="nla-unsteered">', 1)[1].split("</pre>", 1)[0]
    assert len(unsteered.split()) >= 5, unsteered  # an answer, not an empty column


# ----------------------------------------------------------------------------- over capacity: 429 before any answer


def _request(url: str, i: int) -> tuple[str, int, str, dict]:
    """Even i: a generation stream; odd i: the analyzer's form, as a browser posts it."""
    with httpx.Client(timeout=60) as c:
        if i % 2:
            text = f"a quiet queen number {i}"
            r = c.post(f"{url}/analyze", data={"text": text}, headers=HTML)
            return "analyze", r.status_code, r.text, dict(r.headers)
        q = {"prompt": "hi", "max_new_tokens": 8, "seed": i}
        with c.stream("GET", f"{url}/steer/stream", params=q) as r:
            return "stream", r.status_code, r.read().decode(), dict(r.headers)


@pytest.mark.timeout(120)
def test_twenty_concurrent_model_requests_over_the_queue_get_429_with_retry_after(wb):
    """Real concurrent requests against the real server while the model is held: 8 wait and then answer whole
    (a stream from start to end with no error event, an analysis), the other 12 get a 429 with Retry-After before
    any event; a refused analyzer form comes back with its text."""
    import asyncio
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    app = create_app(ServerConfig(queue_size=8), wb)
    gate, live = app.state.gate, LiveServer(app)
    with live as url, ThreadPoolExecutor(20) as pool:
        hold, held = threading.Event(), threading.Event()

        async def occupy():
            async with gate.slot():
                held.set()
                while not hold.is_set():
                    await asyncio.sleep(0.01)

        job = asyncio.run_coroutine_threadsafe(occupy(), live.server.servers[0].get_loop())
        assert held.wait(10)
        futures = [pool.submit(_request, url, i) for i in range(20)]
        end = time.monotonic() + 30
        while sum(f.done() for f in futures) < 12 and time.monotonic() < end:
            time.sleep(0.02)
        assert gate.admitted == 9  # the held job and 8 waiting
        hold.set()
        job.result(10)
        answers = [f.result(60) for f in futures]
    busy = [a for a in answers if a[1] == 429]
    done = [a for a in answers if a[1] == 200]
    assert (len(done), len(busy)) == (8, 12), [a[:2] for a in answers]
    for kind, _, body, headers in busy:
        assert headers["retry-after"] == "2" and "busy" in body
        assert kind == "stream" or "a quiet queen number" in body.split("</textarea>")[0]  # the text is kept
    for kind, _, body, _ in done:
        events = [ln[7:] for ln in body.splitlines() if ln.startswith("event: ")]
        assert (kind == "analyze" and 'id="heatmap"' in body) or (events[0] == "start" and events[-1] == "end")
        assert "error" not in events
