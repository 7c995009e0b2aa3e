"""The web workbench under faults (issue #32), against the real server on a loopback port where it matters:

- a client that goes away in the middle of a generation stream stops the generation: its worker thread ends, its
  place at the gate is given back, no lane state stays in memory;
- 20 generation requests at once: those over the queue limit get an HTTP 429 before any event, never a 200
  carrying an error event;
- a request field that names a file on the server is refused, and the file is never opened;
- the refusals the guard writes itself (host, origin) escape the header values they quote.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers.browser import LiveServer
from helpers.server_fixtures import PLANT, shared_tiny

from thoughtscope.server import ServerConfig, create_app
from thoughtscope.server.pages_steer import generation_threads

pytestmark = pytest.mark.usefixtures("one_thread")
HTML = {"accept": "text/html"}


def lane_states() -> int:
    """Live per-lane generation states (each holds a KV cache): what a generation left behind would keep."""
    from thoughtscope.steer.lanes import _LaneState

    gc.collect()
    return sum(type(o) is _LaneState for o in gc.get_objects())


def wait_for(pred, timeout: float = 15.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def sse_events(text: str) -> list[str]:
    return [ln.split(": ", 1)[1] for ln in text.splitlines() if ln.startswith("event: ")]


@pytest.mark.timeout(90)
def test_a_client_leaving_mid_stream_stops_the_generation(caplog):
    caplog.set_level(logging.INFO, logger="thoughtscope.server")
    live = LiveServer(create_app(ServerConfig(max_new_tokens=240), shared_tiny()))
    threads0, lanes0 = generation_threads(), lane_states()
    with live as url, httpx.Client(base_url=url, timeout=30) as c:
        n_new = 240 - 16  # the longest the tiny model's context allows after the prompt: ~450 lane tokens
        for seed in range(3):
            with socket.create_connection(("127.0.0.1", live.port), timeout=30) as s:
                s.sendall(
                    f"GET /steer/stream?prompt=hello&max_new_tokens={n_new}&seed={seed} HTTP/1.1\r\n"
                    f"Host: 127.0.0.1:{live.port}\r\nAccept: text/event-stream\r\n\r\n".encode()
                )
                got = b""
                while b"event: steered" not in got:
                    chunk = s.recv(4096)
                    assert chunk, got
                    got += chunk
                assert got.startswith(b"HTTP/1.1 200"), got[:200]
            # the socket is closed here, a few tokens into the answers

        def settled():
            st = c.get("/api/status").json()
            return st["streams"].get("client gone") == 3 and st["model_jobs"] == 0 and st["generation_threads"] == 0

        assert wait_for(settled), c.get("/api/status").json()
        assert generation_threads() == threads0 and lane_states() <= lanes0
        stops = [r for r in caplog.records if "the client went away" in r.getMessage()]
        assert len(stops) == 3 and all(r.args[0] < r.args[1] for r in stops), [r.getMessage() for r in stops]
        # the server goes on serving: a whole stream afterwards ends normally
        r = c.get("/steer/stream", params={"prompt": "hello", "max_new_tokens": 8})
        assert r.status_code == 200 and sse_events(r.text)[-1] == "end"
        assert c.get("/api/status").json()["streams"] == {"client gone": 3, "completed": 1}


def _stream(url: str, seed: int) -> tuple[int, str, dict]:
    q = {"prompt": "hi", "max_new_tokens": 24, "seed": seed}
    with httpx.Client(timeout=60) as c, c.stream("GET", f"{url}/steer/stream", params=q) as r:
        return r.status_code, r.read().decode(), dict(r.headers)


def _check_answers(answers) -> tuple[int, int]:
    """Every answer is a whole stream (start ... end, no error event) or a 429 with a readable message."""
    ok = busy = 0
    for status, body, headers in answers:
        if status == 429:
            busy += 1
            assert headers["retry-after"] == "2" and "busy" in json.loads(body)["error"]
        else:
            ok += 1
            ev = sse_events(body)
            assert status == 200 and ev[0] == "start" and ev[-1] == "end" and "error" not in ev, (status, body[:300])
    return ok, busy


@pytest.mark.timeout(120)
def test_twenty_concurrent_generations_over_the_limit_get_http_429():
    wb = shared_tiny()
    # the model held by another job: of 20 arriving together, queue_size (8) wait and 12 are refused with a 429
    app = create_app(ServerConfig(queue_size=8), wb)
    gate, live = app.state.gate, LiveServer(app)
    with live as url, ThreadPoolExecutor(20) as pool:
        loop = live.server.servers[0].get_loop()
        hold, held = threading.Event(), threading.Event()

        async def occupy():
            async with gate.slot():
                held.set()
                while not hold.is_set():
                    await asyncio.sleep(0.01)

        job = asyncio.run_coroutine_threadsafe(occupy(), loop)
        assert held.wait(10)
        futures = [pool.submit(_stream, url, i) for i in range(20)]
        wait_for(lambda: sum(f.done() for f in futures) >= 12, 20)
        assert gate.admitted == 9  # the held job and 8 waiting
        hold.set()
        job.result(10)
        ok, busy = _check_answers([f.result(60) for f in futures])
        assert (ok, busy) == (8, 12)
        assert wait_for(lambda: gate.admitted == 0 and generation_threads() == 0)
    # the trial as it was run: 20 at once on a fresh server; every refusal is an HTTP 429
    with LiveServer(create_app(ServerConfig(), wb)) as url, ThreadPoolExecutor(20) as pool:
        ok, busy = _check_answers(list(pool.map(lambda i: _stream(url, i), range(20))))
        assert ok + busy == 20 and ok >= 9  # the first 9 are always admitted (1 running + queue_size 8)


# ----------------------------------------------------------------------------- fields that name files

OPENED: list[str] = []
MARK = "ts-file-named-by-a-request"


def _audit(event: str, args) -> None:
    if event == "open" and MARK in str(args[0]):
        OPENED.append(str(args[0]))


@pytest.fixture(scope="module")
def planted_files(tmp_path_factory):
    """Files and a folder a request might name (an SAE folder, a vector), watched by an audit hook on open()."""
    root = tmp_path_factory.mktemp(MARK)
    (root / "vector.safetensors").write_bytes(b"\0" * 64)
    (root / "sae").mkdir()
    (root / "sae" / "cfg.json").write_text("{}")
    sys.addaudithook(_audit)  # hooks cannot be removed; this one only records paths carrying MARK
    return root


def _preset(item: dict) -> bytes:
    return json.dumps({"format": "thoughtscope-preset-2", "name": "x", "interventions": [item]}).encode()


def test_fields_that_name_a_file_are_refused_and_never_opened(planted_files):
    wb, root = shared_tiny(), planted_files
    vec, sae = str(root / "vector.safetensors"), str(root / "sae")
    feature = {"type": "feature", "op": "clamp", "site": "resid.1", "feature": PLANT, "strength": 1.0}
    uploads = [
        {"type": "vector", "op": "add", "site": "resid.1", "vector": vec, "strength": 1.0},
        {"type": "vector", "op": "add", "site": "resid.1", "vector": "../" * 8 + vec.lstrip("/"), "strength": 1.0},
        {**feature, "sae": sae},
        {**feature, "sae": "default"},  # the shipped SAE, not the one this workbench serves
        {**feature, "sae": str(Path(wb.sae_spec) / ".." / ".." / MARK)},
    ]
    with TestClient(create_app(ServerConfig(), wb), base_url="http://127.0.0.1:8765") as c:
        for item in uploads:
            r = c.post("/steer/preset", content=_preset(item), headers={"content-type": "application/json"})
            assert r.status_code == 422, (item, r.text)
            assert "never opens a file a request names" in r.json()["error"]
        ok = c.post("/steer/preset", content=_preset({**feature, "sae": wb.sae_spec}))
        assert ok.status_code == 200  # the SAE this workbench serves, named as its own presets name it
        for url, status in (
            (f"/steer?v={vec}:1", 422),
            (f"/steer?p={vec}:1", 422),
            (f"/steer/load?name={vec}", 404),
            (f"/steer/preset.json?name={vec}", 422),
            (f"/features/{vec}", 404),
            (f"/static/..%2f..%2f..%2f{vec}", 404),
            (f"/static/{'../' * 12}{vec}", 404),
        ):
            r = c.get(url)
            assert r.status_code == status, (url, r.status_code, r.text[:300])
    assert OPENED == []
    assert sorted(p.name for p in root.rglob("*")) == ["cfg.json", "sae", "vector.safetensors"]


# ----------------------------------------------------------------------------- escaping of the guard's own pages


def test_refusal_pages_escape_what_they_quote():
    """The guard's own pages quote the host and origin headers; the error page quotes parameters: all escaped."""
    evil = "<script>alert(1)</script>"
    img = "<img src=x onerror=alert(1)>"  # no slash: it stays one path segment
    with TestClient(create_app(ServerConfig(), shared_tiny()), base_url="http://127.0.0.1:8765") as c:
        for headers, status in (({"host": f"{evil}:8765"}, 400), ({"origin": f"http://{evil}"}, 403)):
            r = c.get("/", headers={**HTML, **headers})
            assert r.status_code == status and "&lt;script&gt;" in r.text and "<script>" not in r.text, r.text
        for url in (f"/features/{img}", f"/analyze?text=abc&view={img}", f"/steer?f={img}", f"/steer/load?name={img}"):
            r = c.get(url, headers=HTML)
            assert 400 <= r.status_code < 500 and "&lt;img src=x" in r.text and img not in r.text, (url, r.text)


def test_an_uploaded_preset_nested_too_deeply_is_a_422_not_a_500():
    """json.loads raises RecursionError (not a ValueError) on deep nesting; the upload reads through
    documents.parse_json, so it is a readable 422."""
    from fastapi.testclient import TestClient
    from helpers.server_fixtures import shared_tiny

    from thoughtscope.server import ServerConfig, create_app

    client = TestClient(create_app(ServerConfig(), shared_tiny()), base_url="http://127.0.0.1:8765")
    body = "[" * 20_000 + "]" * 20_000  # 40 KB: under the upload limit, far past the parser's depth
    r = client.post("/steer/preset", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.text, (r.status_code, r.text[:200])
