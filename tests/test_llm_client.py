"""The one LLM client (thoughtscope.llm) as the NLA data builder uses it: a real HTTP server on localhost records
what arrives, so the request (URL, key, temperature, length) and the error path are checked, not assumed."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import thoughtscope.atlas as atlas
import thoughtscope.atlas.explain as explain
from thoughtscope.llm import HTTPChatClient, LLMError
from thoughtscope.nla.core import NLAError
from thoughtscope.nla.data import llm_explanation


@pytest.fixture()
def server():
    seen: list[dict] = []
    plan: list[int] = []  # status codes to answer with, in order; 200 (with an answer) once empty

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            code = plan.pop(0) if plan else 200
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            if code == 200:
                answer = "  The topic is\nPython   imports;\tnext: a name  "
                self.wfile.write(json.dumps({"choices": [{"message": {"content": answer}}]}).encode())

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", seen, plan
    srv.shutdown()


def test_atlas_and_nla_share_one_client():
    assert atlas.HTTPChatClient is explain.HTTPChatClient is HTTPChatClient
    assert not hasattr(explain, "urllib")  # no second HTTP path in the auto-interp code


def test_nla_warm_start_request_and_answer(server, monkeypatch):
    base, seen, _ = server
    monkeypatch.setenv("MY_KEY", "sk-nla")
    out = llm_explanation(
        "import os\nimport", endpoint=base + "/v1/", model="m-nla", api_key_env="MY_KEY", max_words=12
    )
    assert out == "The topic is Python imports; next: a name"  # whitespace collapsed, as before
    (req,) = seen
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-nla"
    assert req["body"]["model"] == "m-nla" and req["body"]["temperature"] == 1.0 and req["body"]["max_tokens"] == 120
    prompt = req["body"]["messages"][0]["content"]
    assert "at most 12 words" in prompt and prompt.endswith("import os\nimport")
    monkeypatch.delenv("MY_KEY")
    llm_explanation("x", endpoint=base + "/v1", model="m", api_key_env="MY_KEY")
    assert seen[-1]["auth"] is None  # no key set: no Authorization header


def test_nla_failure_is_one_attempt_and_names_the_endpoint(server):
    base, seen, plan = server
    plan += [503, 200]
    with pytest.raises(
        NLAError, match=r"warm-start endpoint http://127\.0\.0\.1:\d+/v1/chat/completions failed.*HTTP 503"
    ):
        llm_explanation("x", endpoint=base + "/v1", model="m")
    assert len(seen) == 1  # not retried (the NLA builder's behaviour)
    with pytest.raises(NLAError, match="cannot reach"):
        llm_explanation("x", endpoint="http://127.0.0.1:9/v1", model="m", timeout=0.5)


def test_client_retries_and_url_forms(server):
    base, seen, plan = server
    plan += [500, 429]
    c = HTTPChatClient(base, "m", backoff=0.0)  # no /v1: the standard path is added
    assert c.call([{"role": "user", "content": "hi"}]).startswith("  The topic")
    assert [r["path"] for r in seen] == ["/v1/chat/completions"] * 3 and c.usage["retries"] == 2
    assert HTTPChatClient(base + "/v1/chat/completions", "m").url == base + "/v1/chat/completions"
    with pytest.raises(LLMError, match="no endpoint URL"):
        HTTPChatClient("", "m")
