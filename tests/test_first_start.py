"""First start without --atlas: the workbench serves as soon as the model and SAE are loaded, the atlas is built
in the background (its progress and ETA on every page), and attached when ready; a failed or killed build is shown
or resumed, never a crash. Tiny model, tiny atlas; the build is held mid-way through `on_atlas_progress`."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from helpers.browser import LiveServer
from helpers.first_start import Gate, first_start_inputs, wait_until

from thoughtscope.server import ServerConfig, create_app
from thoughtscope.server.workbench import default_atlas_dir, load_workbench

pytestmark = pytest.mark.usefixtures("one_thread")
HTML = {"accept": "text/html"}
TEXT = "the quick queen sat quietly on a mat"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return first_start_inputs(tmp_path_factory.mktemp("in"))


@pytest.fixture
def inputs(made, tmp_path, monkeypatch):
    monkeypatch.setenv("THOUGHTSCOPE_HOME", str(tmp_path / "home"))  # a fresh home: no atlas yet
    return dict(made)


def _with_nla(wb) -> None:
    from thoughtscope.nla import NLA, config_for

    wb.nla = NLA(wb.lm, config_for(wb.lm, site="resid.1", injection_scale=6.0, lora_rank=4, max_new_tokens=4))


# one request per route (and a few per page with modes); {n} is a feature id. Routes not listed here are still
# requested, with no parameters, by test_every_route_answers_during_the_build.
SAMPLES = {
    "/": [""],
    "/features/{n}": [""],
    "/api/features/{n}": [""],
    "/features/random": ["?seed=1"],
    "/search": ["", "?mode=words&q=queen", "?mode=text&text=quick+queen", "?mode=contrast&prompts=queen&controls=cat"],
    "/api/search": ["?q=queen", "?text=quick+queen"],
    "/analyze": ["", f"?text={TEXT}", "?feature=3"],
    "/compare": ["", "?a=quick+queen&b=the+cat"],
    "/steer": ["", "?f=3:clamp:2"],
    "/steer/stream": ["?prompt=hi&max_new_tokens=3&f=3:clamp:2"],
    "/steer/preset.json": ["?f=3:clamp:2"],
    "/steer/load": ["?name=none"],
    "/nla": ["", f"?text={TEXT}&pos=2"],
    "/nla/token": [f"?text={TEXT}&pos=2"],
}
BODIES = {
    ("POST", "/analyze"): {"data": {"text": TEXT}},
    ("POST", "/api/analyze"): {"json": {"text": TEXT}},
    ("POST", "/steer/preset"): {"content": b'{"format": "thoughtscope-preset-1", "interventions": []}'},
}


def _routes(app) -> list[tuple[str, str]]:
    """Every (method, path) the app serves, from its OpenAPI schema (routers included)."""
    return [(m.upper(), path) for path, ops in app.openapi()["paths"].items() for m in ops]


def _request(c: httpx.Client, method: str, url: str, **kw):
    """Status and body (of a status stream, which runs as long as the build: its first event)."""
    with c.stream(method, url, headers=kw.pop("headers", HTML), **kw) as r:
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            body = ""
            for line in r.iter_lines():
                body += line + "\n"
                if url.startswith("/status/") and not line and body.strip():
                    break
        else:
            body = r.read().decode("utf-8", "replace")
    return r.status_code, body


def _sweep(app, url: str) -> dict:
    got = {}
    with httpx.Client(base_url=url, timeout=30) as c:
        for method, path in _routes(app):
            for q in SAMPLES.get(path, [""]) if method == "GET" else [""]:
                target = path.replace("{n}", "3") + q
                status, body = _request(c, method, target, **BODIES.get((method, path), {}))
                got[(method, target)] = (status, body)
    return got


def test_every_route_answers_during_the_build_then_the_atlas_attaches(inputs):
    gate = Gate()
    t0 = time.perf_counter()
    wb = load_workbench(**inputs, atlas_in_background=True, on_atlas_progress=gate)
    assert wb.atlas is None and wb.atlas_pending and time.perf_counter() - t0 < 20
    _with_nla(wb)
    app = create_app(ServerConfig(), wb)
    assert gate.held.wait(30), wb.atlas_build.to_dict()
    try:
        with LiveServer(app) as url:
            got = _sweep(app, url)
            st = httpx.get(f"{url}/api/status").json()["atlas"]
    finally:
        gate.release()
    assert not [k for k, (s, _) in got.items() if s >= 500 and s != 503], {k: v[0] for k, v in got.items()}
    # what needs no atlas works now: the analyzer with its features, steering, the NLA view, search by text
    status, body = got[("POST", "/analyze")]
    assert status == 200 and "/features/3" in body, body[:2000]
    assert got[("POST", "/api/analyze")][0] == 200 and json.loads(got[("POST", "/api/analyze")][1])["tokens"]
    assert "event: steered" in got[("GET", "/steer/stream?prompt=hi&max_new_tokens=3&f=3:clamp:2")][1]
    assert got[("GET", f"/nla?text={TEXT}&pos=2")][0] == 200
    assert got[("GET", "/search?mode=text&text=quick+queen")][0] == 200
    # the feature page says what is being built, how far, and shows what the decoder writes
    status, body = got[("GET", "/features/3")]
    assert status == 200 and "still being built" in body and 'id="logit-effects"' in body, body[:3000]
    assert "reading text through the model and the SAE" in body and "%" in body and "left" in body
    status, body = got[("GET", "/api/features/3")]
    d = json.loads(body)
    assert status == 503 and d["atlas"]["step"] == 1 and 0 < d["atlas"]["percent"] < 100 and d["logits_pos"]
    assert "still being built" in d["error"]
    # the status: stage, percentage and ETA from the build's own progress; the banner on the home page
    assert st["stage"] and 0 < st["percent"] < 100 and st["eta_s"] is not None and st["unit"] == "tokens"
    status, body = got[("GET", "/")]
    assert status == 200 and 'id="atlas-build"' in body and 'sse-connect="/status/atlas/stream"' in body
    assert f"{st['percent']:.0f}%" in body
    assert "event: status" in got[("GET", "/status/atlas/stream")][1]
    # released: the atlas is attached without a restart, explanations follow, the banner goes
    assert wait_until(lambda: wb.atlas_build.finished, 60), wb.atlas_build.to_dict()
    assert wb.atlas_build.error is None and wb.atlas is not None and not wb.atlas_pending
    assert any(wb.label(i) for i in range(wb.n_features))
    assert (default_atlas_dir(wb.sae) / "atlas.sqlite").is_file()
    with LiveServer(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        r = c.get("/features/3", headers=HTML)
        assert r.status_code == 200 and 'id="top-contexts"' in r.text and "still being built" not in r.text
        assert c.get("/api/features/3").json()["top"]
        assert 'id="atlas-build"' not in c.get("/", headers=HTML).text
        assert c.get("/api/search?q=q").status_code == 200
        assert "ready" in c.get("/status/atlas/stream").text


def test_a_failed_build_shows_its_error_and_the_rest_works(inputs):
    def fail(job):
        if job.step == 1 and job.done > 0:
            raise OSError("disk on fire")

    wb = load_workbench(**inputs, atlas_in_background=True, on_atlas_progress=fail)
    assert wait_until(lambda: wb.atlas_build.finished), wb.atlas_build.to_dict()
    assert wb.atlas is None and "disk on fire" in wb.atlas_build.error
    _with_nla(wb)
    app = create_app(ServerConfig(), wb)
    with LiveServer(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        got = _sweep(app, url)
        assert not [k for k, (s, _) in got.items() if s >= 500 and s != 503], {k: v[0] for k, v in got.items()}
        r = c.get("/features/3", headers=HTML)
        assert r.status_code == 200 and "could not be built" in r.text and "disk on fire" in r.text
        r = c.get("/api/features/3")
        assert r.status_code == 503 and "disk on fire" in r.json()["error"] and r.json()["logits_neg"]
        home = c.get("/", headers=HTML).text
        assert "could not be built" in home and "disk on fire" in home
        assert "disk on fire" in c.get("/api/status").json()["atlas"]["error"]
        assert c.post("/api/analyze", json={"text": TEXT}).status_code == 200
        assert c.get(f"/analyze?text={TEXT}", headers=HTML).status_code == 200


def test_a_start_after_the_atlas_was_built_serves_it_at_once(inputs):
    first = load_workbench(**inputs)  # the old way: build before returning (`serve --wait-for-atlas`)
    assert first.atlas is not None and first.atlas_build is None
    n = len(first.atlas.explained("ok"))
    first.atlas.close()
    again = load_workbench(**inputs, atlas_in_background=True)
    assert again.atlas is not None and again.atlas_build is None  # nothing left to build: no banner, no thread
    assert len(again.atlas.explained("ok")) == n


def test_the_eta_is_the_rest_of_the_step_at_its_rate_so_far():
    from pathlib import Path

    from thoughtscope.server.atlas_job import AtlasBuild, eta_words

    job = AtlasBuild(Path("atlas"))
    t0 = time.perf_counter()
    job.begin(1, "reading", 1000, "tokens")
    assert job.eta_s() is None and job.percent == 0.0  # no rate yet
    time.sleep(0.3)
    job.update(250)
    eta = job.eta_s()
    assert job.percent == 25.0 and 0.85 <= eta <= 3 * (time.perf_counter() - t0) + 0.01
    assert eta_words(75) == "about 1 min 15 s left" and eta_words(2) == "a few seconds left" and not eta_words(None)
    job.finished = True
    assert job.eta_s() is None
