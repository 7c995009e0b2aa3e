"""Explainer and scorer clients against a real OpenAI-compatible HTTP server on localhost (scripted answers)."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers.atlas_fixtures import (
    PLANT,
    PLANT_CHAR,
    identity_model,
    one_thread,
    planted_sae,
    write_corpus,
)

from thoughtscope.atlas import (
    Atlas,
    AtlasConfig,
    ExplainConfig,
    HTTPChatClient,
    LocalChatClient,
    auroc,
    balanced_accuracy,
    build_atlas,
    explain_atlas,
)
from thoughtscope.atlas.explain import client_from_env
from thoughtscope.corpus import Corpus
from thoughtscope.llm import LLMError


class Script:
    """What the fake server does: a queue of failures to inject, then answers that 'read' the explanation."""

    def __init__(self):
        self.failures: list[str] = []
        self.requests = 0
        self.inflight = 0
        self.max_inflight = 0
        self.delay = 0.0
        self.lock = threading.Lock()


def _answer(prompt: str) -> str:
    if "EXPLANATION:" in prompt:  # explainer: name the most frequently marked token
        marked = Counter(re.findall(r"<<(.+?)>>", prompt))
        tok = marked.most_common(1)[0][0] if marked else "?"
        return f"Looking at the marks...\nEXPLANATION: the letter {tok}"
    m = re.search(r'described as: "the letter (.)"', prompt)
    letter = m.group(1) if m else None
    texts = re.findall(r"^Text \d+: (.*)$", prompt, flags=re.M)
    if "placed at random" in prompt:  # fuzzing: are all marked tokens the letter?
        probs = [
            1.0 if (marks := re.findall(r"<<(.+?)>>", t)) and all(x == letter for x in marks) else 0.0 for t in texts
        ]
    else:  # detection: does the text contain the letter?
        probs = [1.0 if letter and letter in t else 0.0 for t in texts]
    return "Here you go: " + json.dumps(probs)


def make_server(script: Script):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            n = int(self.headers.get("Content-Length", 0))
            req = json.loads(self.rfile.read(n))
            with script.lock:
                script.requests += 1
                script.inflight += 1
                script.max_inflight = max(script.max_inflight, script.inflight)
                fail = script.failures.pop(0) if script.failures else None
            try:
                self._serve(req, fail)
            finally:
                with script.lock:
                    script.inflight -= 1

        def _serve(self, req, fail):
            time.sleep(script.delay)
            assert self.path == "/v1/chat/completions"
            if fail == "500":
                self.send_response(500), self.end_headers(), self.wfile.write(b"boom")
                return
            if fail == "429":
                self.send_response(429), self.send_header("Retry-After", "0"), self.end_headers()
                return
            if fail == "timeout":
                time.sleep(1.5)
            if fail == "malformed":
                body = b"{not json"
            elif fail == "badlist":
                body = json.dumps({"choices": [{"message": {"content": "I think [1, 0"}}]}).encode()
            else:
                content = _answer(req["messages"][-1]["content"])
                body = json.dumps(
                    {
                        "choices": [{"message": {"role": "assistant", "content": content}}],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 5},
                    }
                ).encode()
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("explain")
    with one_thread():
        lm = identity_model()
        sae = planted_sae(lm)
        corpus = Corpus(str(write_corpus(d / "corpus.txt", n_docs=200)))
        cfg = AtlasConfig(
            n_tokens=8000,
            ctx_len=32,
            contexts_per_batch=8,
            top_k=12,
            n_bins=5,
            per_bin=4,
            window_left=8,
            window_right=3,
            n_random_contexts=250,
        )
        path = build_atlas(lm, sae, corpus, d / "atlas", cfg, progress=False)
        script = Script()
        srv = make_server(script)
        url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
        yield lm, path, script, url
    srv.shutdown()


def client(url, **kw):
    kw.setdefault("timeout", 0.8)
    kw.setdefault("max_retries", 4)
    return HTTPChatClient(url, "scripted", "sk-test", backoff=0.01, **kw)


XCFG = ExplainConfig(show_left=6, show_right=2, n_top=6, n_quantile=5, n_score_pos=10, n_score_neg=10, concurrency=3)


def test_metrics():
    assert balanced_accuracy([1, 1, 0, 0], [0.9, 0.2, 0.1, 0.1]) == 0.75
    assert auroc([1, 1, 0, 0], [0.9, 0.1, 0.2, 0.1]) == pytest.approx(0.625)
    assert auroc([1, 0], [0.5, 0.5]) == 0.5 and auroc([1, 1], [0.1, 0.2]) is None


def test_explain_and_score_planted_feature(env):
    lm, path, script, url = env
    c = client(url)
    s = explain_atlas(path, c, c, tokenizer=lm.tokenizer, features=[PLANT], config=XCFG, progress=False)
    assert s["ok"] == 1 and s["failed"] == 0
    with Atlas.open(path) as at:
        ex = at.explanation(PLANT)
        assert ex["explanation"] == f"the letter {PLANT_CHAR}" and ex["explainer"] == c.name
        assert ex["method"] == "llm" and ex["scorer_method"] == "llm-detection"
        assert ex["detection_bacc"] == pytest.approx(1.0) and ex["detection_auroc"] == pytest.approx(1.0)
        assert ex["fuzz_bacc"] == pytest.approx(1.0)
        d = ex["details"]
        assert d["n_pos"] == 10 and d["n_neg"] == 10
        assert at.search("letter q") == [(PLANT, "the letter q")]
    # a wrong explanation scores chance
    s = explain_atlas(
        path, None, c, tokenizer=lm.tokenizer, given={PLANT: "the letter x"}, config=XCFG, resume=False, progress=False
    )
    with Atlas.open(path) as at:
        ex = at.explanation(PLANT)
        assert ex["detection_bacc"] == pytest.approx(0.5) and ex["detection_auroc"] == pytest.approx(0.5)


def test_retries_on_500_429_timeout_and_malformed(env):
    lm, path, script, url = env
    c = client(url)
    script.failures = ["500", "429", "timeout", "malformed"]
    out = c.call([{"role": "user", "content": "Text 1: aqa\nTell me"}])
    assert "Here you go" in out and c.usage["retries"] == 4
    from thoughtscope.atlas.explain import parse_probabilities

    script.failures = ["badlist", "malformed"]
    assert c.call(
        [{"role": "user", "content": 'described as: "the letter q"\nText 1: aqa'}], parse=parse_probabilities(1)
    ) == [1.0]
    script.failures = ["500"] * 3
    with pytest.raises(LLMError, match="HTTP 500.*gave up after 3 attempts"):
        client(url, max_retries=2).call([{"role": "user", "content": "hi"}])
    script.failures = []
    dead = HTTPChatClient("http://127.0.0.1:9", "m", timeout=0.2, backoff=0.0, max_retries=1)
    with pytest.raises(LLMError, match="cannot reach"):
        dead.call([{"role": "user", "content": "hi"}])


def test_failures_are_recorded_and_resume_skips_done(env):
    lm, path, script, url = env
    with Atlas.open(path) as at:
        feats = at.random_features(4, seed=3)
    feats = sorted(set(feats) | {PLANT})
    c = client(url, max_retries=1)
    # sequential run: the first feature's explainer call fails twice (= all attempts), the rest succeed
    script.failures = ["500", "500"]
    s = explain_atlas(
        path,
        c,
        c,
        tokenizer=lm.tokenizer,
        features=feats,
        config=ExplainConfig(concurrency=1),
        resume=False,
        progress=False,
    )
    assert s["failed"] == 1 and s["ok"] == len(feats) - 1
    with Atlas.open(path) as at:
        assert at.explanation(feats[0])["status"] == "failed" and "HTTP 500" in at.explanation(feats[0])["error"]
        assert at.explained("ok") >= set(feats[1:])
    before = script.requests
    s = explain_atlas(path, c, c, tokenizer=lm.tokenizer, features=feats, config=XCFG, progress=False, control=False)
    assert s["requested"] == 1 and s["ok"] == 1  # only the failed one was redone
    assert script.requests - before <= 4
    s = explain_atlas(path, c, c, tokenizer=lm.tokenizer, features=feats, config=XCFG, progress=False)
    assert s["requested"] == 0 and s["control_scored"] == 1  # the control for the one explained since
    before = script.requests
    s = explain_atlas(path, c, c, tokenizer=lm.tokenizer, features=feats, config=XCFG, progress=False)
    assert s["control_scored"] == 0 and script.requests == before  # ... which resumes like the rest


def test_estimate_and_env(env, monkeypatch):
    from thoughtscope.atlas import estimate

    lm, path, script, url = env
    with Atlas.open(path) as at:
        e = estimate(at, [PLANT] * 100, lm.tokenizer, XCFG, concurrency=4, usd_per_mtok=1.0)
    assert e["features"] == 100 and e["prompt_tokens"] > 100 * 50 and e["requests"] >= 300 and e["usd"] > 0
    monkeypatch.setenv("THOUGHTSCOPE_EXPLAINER_URL", url)
    monkeypatch.setenv("THOUGHTSCOPE_EXPLAINER_MODEL", "m1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    c = client_from_env()
    assert isinstance(c, HTTPChatClient) and c.model == "m1" and c.api_key == "sk-x"
    monkeypatch.delenv("THOUGHTSCOPE_EXPLAINER_URL")
    assert isinstance(client_from_env(lm=lm), LocalChatClient)
    with pytest.raises(LLMError, match="no explainer endpoint"):
        client_from_env()


def test_offline_local_explainer_runs(env):
    lm, path, script, url = env
    local = LocalChatClient(lm)
    with one_thread():
        p = local.yes_probability([{"role": "user", "content": "Is q a letter? Answer Yes or No."}])
        assert 0.0 < p < 1.0
        cfg = ExplainConfig(n_top=3, n_quantile=2, n_score_pos=4, n_score_neg=4, explain_max_new_tokens=8, fuzz=False)
        s = explain_atlas(
            path, local, local, tokenizer=lm.tokenizer, features=[PLANT], config=cfg, resume=False, progress=False
        )
    assert s["ok"] + s["failed"] == 1
    with Atlas.open(path) as at:
        ex = at.explanation(PLANT)
        assert ex["explainer"] == f"local:{lm.name}"
        if ex["status"] == "ok":
            assert ex["detection_auroc"] is None or 0.0 <= ex["detection_auroc"] <= 1.0


def test_concurrency_limit(env):
    lm, path, script, url = env
    with Atlas.open(path) as at:
        feats = at.random_features(6, seed=5)
    deadline = time.time() + 5
    while script.inflight and time.time() < deadline:  # let requests left over by earlier tests finish
        time.sleep(0.05)
    script.max_inflight, script.delay = 0, 0.05
    try:
        s = explain_atlas(
            path,
            client(url, timeout=10),
            client(url, timeout=10),
            tokenizer=lm.tokenizer,
            features=feats,
            config=ExplainConfig(concurrency=2, fuzz=False),
            resume=False,
            progress=False,
        )
    finally:
        script.delay = 0.0
    assert s["ok"] == len(feats)
    assert 1 <= script.max_inflight <= 2
