"""Fuzzing the web workbench (issue #32): schemathesis over the app's own OpenAPI schema, hypothesis over the preset
upload.

1. Every operation of ``/api/openapi.json``, with the inputs schemathesis derives from the schema (valid and
   invalid: wrong types, boundary values, odd unicode, missing parameters), on the tiny workbench: never a 5xx,
   never past the time bound, and every 4xx is ``{"error": message, "status": code}`` with a message a person can
   read (no traceback, not empty, not a wall of text). Generation stays bounded: max_new_tokens is capped at 6.
2. ``POST /steer/preset`` (a preset JSON a user uploads) with the mutations of helpers.mutate (missing and extra
   keys, wrong types, NaN/Inf, huge numbers, deep nesting, lone surrogates, truncation, flipped bytes, invalid
   UTF-8, empty bodies): a 200 whose mixer URL opens, or a 4xx with a readable message; never a write to the
   workbench's folders.

Examples per operation follow the hypothesis profile (conftest: "ci" 25, derandomized; HYPOTHESIS_PROFILE=long).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from helpers.mutate import call_bounded, json_bytes_mutations, snapshot
from helpers.server_fixtures import shared_tiny
from hypothesis import event, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from thoughtscope.server import ServerConfig, create_app

pytestmark = pytest.mark.usefixtures("one_thread")

ORIGIN = "http://127.0.0.1:8765"  # a host the Guard accepts (schemathesis' own "testserver" is refused with 400)
# small caps so that every generated request stays cheap; the queue is large so the fuzz never sees a 429
FUZZ_CONFIG = dict(max_new_tokens=6, default_new_tokens=4, deadline_s=20.0, queue_size=64)
MAX_SECONDS = 10.0  # one request's time bound


@pytest.fixture(scope="module")
def app():
    return create_app(ServerConfig(**FUZZ_CONFIG), shared_tiny())


@pytest.fixture(scope="module")
def api(app):
    config = schemathesis.Config.from_dict(
        {
            "seed": 32,
            "generation": {
                "max-examples": settings.default.max_examples,
                "deterministic": True,
                "database": "none",
                "mode": "all",
            },
        }
    )
    return schemathesis.openapi.from_asgi("/api/openapi.json", app, config=config, headers={"host": "127.0.0.1:8765"})


schema = schemathesis.pytest.from_fixture("api")


def readable_error(ctx, response, case) -> None:
    """A 4xx answers with {"error": message, "status": code}: a sentence, not a traceback or an empty string."""
    if not 400 <= response.status_code < 500:
        return
    body = json.loads(response.content)
    msg = body.get("error")
    assert isinstance(msg, str) and 3 <= len(msg) <= 4000, f"unreadable error message {msg!r}"
    assert "Traceback" not in msg and body.get("status") == response.status_code, body


def in_time(ctx, response, case) -> None:
    assert response.elapsed <= MAX_SECONDS, f"{case.operation.label} took {response.elapsed:.1f} s"


@pytest.mark.timeout(120)
@schema.parametrize()
def test_every_operation_answers_without_5xx_and_4xx_are_readable(case):
    case.call_and_validate(base_url=ORIGIN, checks=[not_a_server_error, readable_error, in_time])


def _routes(routes):
    """Every route, with the routers the app includes opened up (the static files' mount left out)."""
    from starlette.routing import Mount

    for r in routes:
        inner = getattr(r, "original_router", None)
        if inner is not None:
            yield from _routes(inner.routes)
        elif not isinstance(r, Mount):
            yield r


def test_the_schema_covers_every_route(api, app):
    """Every route the app serves (but the static files and the schema itself) is in the schema it publishes, so
    the fuzz above reaches all of them."""
    served = {(m, r.path) for r in _routes(app.routes) if r.include_in_schema for m in r.methods - {"HEAD"}}
    published = {(op.method.upper(), op.path) for op in (o.ok() for o in api.get_all_operations())}
    assert served == published, (served - published, published - served)
    assert len(published) >= 19


# ----------------------------------------------------------------------------- the preset upload


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, base_url=ORIGIN) as c:
        yield c


@pytest.fixture(scope="module")
def valid_presets(client):
    """Presets the upload accepts: one downloaded from the mixer (a feature clamp and an ablation) and the start
    preset "tilt" (an inline vector and a feature item)."""
    wb = shared_tiny()
    down = client.get("/steer/preset.json?f=3:clamp:4&f=5:ablate&where=generated&name=mine").json()
    out = [json.dumps(down).encode(), json.dumps(wb.presets["tilt"].to_dict()).encode()]
    for body in out:
        assert client.post("/steer/preset", content=body).status_code == 200
    return out


@given(which=st.integers(0, 1), mutation=json_bytes_mutations())
def test_preset_upload_never_crashes_and_writes_nothing(client, valid_presets, which, mutation):
    root = Path(shared_tiny().sae_spec).parent
    before = {d: snapshot(root / d) for d in ("presets", "sae")}
    body = mutation(valid_presets[which])
    ok, r = call_bounded(
        lambda: client.post("/steer/preset", content=body, headers={"content-type": "application/json"}),
        timeout=MAX_SECONDS,
    )
    assert ok, r
    event(f"status {r.status_code}")
    assert r.status_code in (200, 413, 422), (r.status_code, r.text[:400])
    if r.status_code == 200:
        url = r.json()["url"]
        assert url.startswith("/steer?")
        page = client.get(url)  # the mixer the preset set opens
        assert page.status_code == 200, (url, page.text[:400])
    else:
        msg = r.json()["error"]
        assert isinstance(msg, str) and msg and "Traceback" not in msg
    assert {d: snapshot(root / d) for d in ("presets", "sae")} == before


def test_a_preset_beyond_the_sliders_reach_opens_a_mixer_at_their_ends(client):
    """Strengths a slider cannot show (a vector at 1e300, a feature at -1e300) are set to the slider's end, so
    the mixer URL the upload answers with opens instead of failing its own bounds check."""
    p = shared_tiny().presets["tilt"].to_dict()
    p["interventions"][0]["strength"] = 1e300
    p["interventions"][1]["strength"] = -1e300
    r = client.post("/steer/preset", content=json.dumps(p))
    assert r.status_code == 200, r.text
    url = r.json()["url"]
    assert "v=tilt.0%3A2&" in url and "f=3%3Aclamp%3A-10&" in url, url
    assert client.get(url).status_code == 200
