"""API tests of the web workbench on a tiny model: every route works, every bad input gets the right 4xx,
never a 500."""

from __future__ import annotations

import json
import threading

import pytest
from fastapi.testclient import TestClient
from helpers.server_fixtures import PLANT, PLANT_LABEL, shared_tiny

from thoughtscope.errors import ServerError
from thoughtscope.server import ServerConfig, create_app
from thoughtscope.server.guard import Busy, Gate

pytestmark = pytest.mark.usefixtures("one_thread")
HTML = {"accept": "text/html"}


@pytest.fixture(scope="module")
def wb():
    return shared_tiny()


def client(wb, **cfg) -> TestClient:
    return TestClient(create_app(ServerConfig(**cfg), wb), base_url="http://127.0.0.1:8765")


@pytest.fixture(scope="module")
def c(wb):
    with client(wb) as cl:
        yield cl


def events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


# ----------------------------------------------------------------------------- pages and their content


def test_feature_page_shows_everything_the_atlas_has(c):
    r = c.get(f"/features/{PLANT}", headers=HTML)
    assert r.status_code == 200
    page = r.text
    assert PLANT_LABEL in page and "detection bacc" in page and "0.9" in page
    assert 'id="top-contexts"' in page and "background:rgba(234,88,12" in page  # heatmap of contexts
    assert '<svg class="hist"' in page and "Promotes" in page and "Nearest features" in page
    assert f'href="/steer?f={PLANT}:clamp:2' in page and f'href="/analyze?feature={PLANT}"' in page
    assert "baseline=Talk%20about%20the%20letter%20q%20in%20words" in page  # prompt-only baseline prefilled
    steer = c.get(f"/steer?f={PLANT}:clamp:2", headers=HTML).text
    assert f'value="Talk about {PLANT_LABEL}."' in steer
    d = c.get(f"/api/features/{PLANT}").json()
    assert d["explanation"]["text"] == PLANT_LABEL and d["top"] and d["n_active"] > 0
    assert all(p > 0 for _, p in [(t[0], t[0]) for t in d["top"][0]["tokens"]])


def test_pages_fetch_nothing_from_elsewhere(c):
    import re

    for url in ("/", f"/features/{PLANT}", "/search", "/analyze?text=abc", "/steer", "/nla?text=abc&pos=1", "/compare"):
        page = c.get(url, headers=HTML).text
        refs = re.findall(r'(?:src|href)="([^"]+)"', page)
        assert refs and all(r.startswith(("/", "#", "javascript:")) for r in refs), (url, refs)
    for asset in (
        "htmx.min.js",
        "htmx-ext-sse.min.js",
        "equalizer.js",
        "analyzer.js",
        "style.css",
        "LICENSE-htmx.txt",
        "LICENSE-htmx-ext-sse.txt",
    ):
        r = c.get(f"/static/{asset}")
        assert r.status_code == 200 and "cdn" not in r.text.lower()[:5000].replace("cdn.playwright", "")


def test_random_lands_on_alive_features(c, wb):
    for seed in range(5):
        r = c.get(f"/features/random?seed={seed}", follow_redirects=False)
        assert r.status_code == 303
        n = int(r.headers["location"].rsplit("/", 1)[1])
        assert wb.alive[n]


def test_searches(c):
    r = c.get("/search?mode=words&q=queen", headers=HTML)
    assert r.status_code == 200 and f'href="/features/{PLANT}"' in r.text
    r = c.get("/api/search", params={"text": "a quiet queen"}).json()
    assert r["hits"][0]["feature"] == PLANT and r["hits"][0]["at"] == "q"
    r = c.get(
        "/search",
        params={"mode": "contrast", "prompts": "a quiet queen\nthe quest", "controls": "the sun\nrun"},
        headers=HTML,
    )
    assert r.status_code == 200 and r.text.index(f"#{PLANT}<") < r.text.index("</tbody>")
    assert c.get("/search?mode=words&q=zzzzunknown", headers=HTML).status_code == 200


def test_analyzer_and_compare(c):
    r = c.post("/analyze", data={"text": "a quiet queen", "view": "features"}, headers=HTML)
    assert r.status_code == 200 and 'id="heatmap"' in r.text and 'id="detail"' in r.text
    detail = json.loads(r.text.split('id="detail">', 1)[1].split("</script>", 1)[0])
    q = [i for i, t in enumerate(detail) if t["top"] and t["top"][0][0] == PLANT]
    assert q and detail[q[0]]["top"][0][3] == PLANT_LABEL  # the token's features carry explanations
    assert c.get("/analyze", params={"text": "a quiet queen", "view": "error"}, headers=HTML).status_code == 200
    a = c.post("/api/analyze", json={"text": "a quiet queen", "features": [PLANT]}).json()
    assert len(a["tokens"]) == len(a["recon_error"]) and max(a["chosen"][str(PLANT)]) > 0
    r = c.get("/compare", params={"a": "a quiet queen", "b": "a calm king"}, headers=HTML)
    assert r.status_code == 200 and f'href="/features/{PLANT}"' in r.text


def test_text_from_requests_and_atlas_cannot_inject_markup(c, wb):
    evil = "</script><script>alert(1)</script><b>x</b>"
    with wb.db_lock:
        old = wb.atlas.explanation(PLANT)
    wb.atlas.save_explanation(PLANT, {**old, "explanation": evil})
    try:
        for r in (
            c.post("/analyze", data={"text": f"q {evil}"}, headers=HTML),
            c.get(f"/features/{PLANT}", headers=HTML),
            c.get("/search", params={"q": "alert"}, headers=HTML),
            c.get("/compare", params={"a": evil, "b": "q"}, headers=HTML),
            c.get("/features/99999", headers={**HTML, "x": evil}),
        ):
            assert "<script>alert" not in r.text and "<b>x</b>" not in r.text
        detail = c.post("/analyze", data={"text": "a quiet q"}, headers=HTML).text
        payload = json.loads(detail.split('id="detail">', 1)[1].split("</script>", 1)[0])
        assert any(evil == row[3] for tok in payload for row in tok["top"])  # intact once parsed
    finally:
        wb.atlas.save_explanation(PLANT, old)


def test_stream_lanes_same_seed_and_steering_changes_only_the_steered_lane(c):
    def run(f: str) -> dict[str, str]:
        r = c.get(f"/steer/stream?prompt=hello&seed=3&temp=0.8&max=10&baseline=talk+about+q{f}")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        ev = events(r.text)
        assert ev[0][0] == "start" and ev[-1][0] == "end"
        out: dict[str, str] = {}
        for name, d in ev[1:-1]:
            out[name] = out.get(name, "") + d["text"]
        return out

    off, on = run(""), run(f"&f={PLANT}:clamp:8")
    assert set(on) == {"steered", "unsteered", "baseline"}
    assert off["steered"] == off["unsteered"] and on["unsteered"] == off["unsteered"]
    assert on["steered"] != on["unsteered"] and on["baseline"] == off["baseline"]


def test_presets_roundtrip_load_and_vectors(c):
    r = c.get(f"/steer/preset.json?f={PLANT}:clamp:4&v=tilt.0:1&strength=0.5&name=mine")
    assert r.status_code == 200 and "mine.json" in r.headers["content-disposition"]
    p = r.json()
    assert p["format"] == "thoughtscope-preset-2" and p["interventions"][0]["strength"] == 2.0  # master folded in
    back = c.post("/steer/preset", json={**p, "interventions": p["interventions"][:1]}).json()
    assert f"f={PLANT}%3Aclamp%3A2&" in back["url"]
    r = c.get("/steer/load?name=tilt", follow_redirects=False)
    assert r.status_code == 303 and "v=tilt.0%3A0.5" in r.headers["location"]
    # tilt clamps the feature to 3 x its own max_act 40 = 120: on the slider that is 120 / the stored max 50
    assert f"f={PLANT}%3Aclamp%3A2.4&" in r.headers["location"]
    page = c.get(r.headers["location"], headers=HTML)
    assert page.status_code == 200 and 'data-key="tilt.0"' in page.text and f'data-feature="{PLANT}"' in page.text


def test_a_web_slider_at_1x_max_is_the_librarys_clamp_at_1x_max(c, wb):
    """One "× max": a web slider on feature n at 1 × max clamps to the same absolute activation as
    `clamp(sae, n, 1, unit="max")` in the library (the max stored with the SAE), never the atlas's max."""
    from thoughtscope.steer import GenerationConfig, clamp, generate

    lib = clamp(wb.sae, PLANT, 1, unit="max")
    item = c.get(f"/steer/preset.json?f={PLANT}:clamp:1").json()["interventions"][0]
    assert item["unit"] == "max" and item["strength"] * item["max_act"] == pytest.approx(lib.target)
    assert lib.target == pytest.approx(float(wb.sae.feature_stats.max_act[PLANT]))
    assert lib.target != pytest.approx(float(wb.atlas_max[PLANT]))  # the atlas's max is shown, not used
    ev = events(c.get(f"/steer/stream?prompt=hello&seed=3&temp=0.8&max_new_tokens=10&f={PLANT}:clamp:1").text)
    steered = "".join(d["text"] for name, d in ev if name == "steered")
    cfg = GenerationConfig(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=3)
    assert steered == generate(wb.lm, ["hello"], [lib], cfg)[0].text  # the column is the library's clamp
    page = c.get(f"/steer?f={PLANT}:clamp:1", headers=HTML).text
    assert "stored with the SAE" in page and "50" in page and "(shown, never used to scale)" in page
    feature = c.get(f"/features/{PLANT}", headers=HTML).text
    assert 'id="slider-max">50<' in feature and "max activation in this atlas" in feature


def test_an_sae_without_stored_maxima_gets_raw_sliders_and_says_so(wb):
    from helpers.atlas_fixtures import planted_sae

    from thoughtscope.server import Workbench

    bare = Workbench(lm=wb.lm, sae=planted_sae(wb.lm), atlas=None)  # no feature_stats
    assert bare.slider_unit == "raw" and any("no feature maxima" in n for n in bare.notes)
    with client(bare) as cl:
        item = cl.get(f"/steer/preset.json?f={PLANT}:clamp:8").json()["interventions"][0]
        assert item["unit"] == "raw" and item["strength"] == 8.0 and "max_act" not in item
        page = cl.get(f"/steer?f={PLANT}:clamp:8", headers=HTML).text
        assert "raw activation units" in page and "× max" not in page.split('id="sliders"')[1].split("</div>")[0]
        assert "no feature maxima" in cl.get("/", headers=HTML).text


def test_a_whole_preset_as_one_slider(c, wb):
    assert set(wb.preset_ivs) == {"tilt", "q-calibrated"} and len(wb.preset_ivs["tilt"]) == 2
    page = c.get("/steer?p=tilt:1.5", headers=HTML).text
    assert 'data-preset="tilt"' in page and 'value="1.5"' in page

    def steered(q: str) -> str:
        ev = events(c.get(f"/steer/stream?prompt=hello&seed=3&temp=0.8&max=8{q}").text)
        return "".join(d["text"] for name, d in ev if name == "steered")

    assert steered("&p=tilt:0") == steered("")
    assert steered("&p=tilt:2") != steered("")
    assert steered("&p=tilt:2") == steered("&p=tilt:1&strength=2")  # the master strength multiplies them too
    assert steered("&p=tilt:2") == steered("&p=tilt:1&gain=2")  # its name in links made before the rename


def test_calibration_curve_beside_the_slider_and_on_the_feature_page(c, wb):
    assert PLANT in wb.sweeps and "q-calibrated" in wb.presets
    page = c.get(f"/steer?f={PLANT}:clamp:2", headers=HTML).text
    # the sweep ran at 0-4 x the preset's max_act 40; along the slider (x the stored max 50) that is 0-3.2
    assert '<span class="calib"' in page and "<polyline" in page and "3.2: rate 1.00, ppl ×2.20" in page
    assert "Steering calibration" in c.get(f"/features/{PLANT}", headers=HTML).text


def test_probe_scores_per_token_in_the_analyzer(wb, tmp_path):
    probe_mod = pytest.importorskip("thoughtscope.probes.probe")
    import torch

    from thoughtscope.server.workbench import load_probes

    lm = wb.lm
    q = lm.model.get_input_embeddings().weight[lm.tokenizer.convert_tokens_to_ids("q")].detach()
    cfg = probe_mod.ProbeConfig(model=lm.name, site="resid.1", d_model=lm.d_model, dataset="q-detector")
    probe_mod.Probe(q / q.norm(), 0.0, 0.5 * float(q.norm()), cfg).save(tmp_path / "qprobe")
    probes = load_probes(lm, [tmp_path / "qprobe"])
    saved, wb.probes = wb.probes, probes
    try:
        with client(wb) as cl:
            a = cl.post("/api/analyze", json={"text": "a quiet cat"}).json()
            page = cl.post("/analyze", data={"text": "a quiet cat"}, headers=HTML).text
    finally:
        wb.probes = saved
    scores = a["probes"]["qprobe"]
    qi = a["tokens"].index("q")
    assert len(scores) == len(a["tokens"]) and scores[qi] == max(scores)
    assert scores[qi] == pytest.approx(float(q.norm()), rel=1e-4)  # resid.1 of the identity model is the embedding
    detail = json.loads(page.split('id="detail">', 1)[1].split("</script>", 1)[0])
    assert detail[qi]["probes"] == [["qprobe", pytest.approx(scores[qi]), True]]
    assert torch.isfinite(torch.tensor(scores)).all()


def test_serve_command_refuses_an_open_host_without_token(capsys):
    from thoughtscope.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--host", "0.0.0.0", "--port", "9"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--token" in err and "Traceback" not in err
    for flags in (["--atlas", "/no/such/atlas"], ["--probe", "/no/such/probe"], ["--sae", "/no/such/sae"]):
        with pytest.raises(SystemExit) as e:
            main(["serve", *flags])
        assert e.value.code == 2 and "no such folder" in capsys.readouterr().err


def test_nla_view_and_token_fragment(c):
    r = c.get("/nla", params={"text": "a quiet queen", "pos": 3}, headers=HTML)
    assert r.status_code == 200 and r.text.count('class="pill">FVE ') == 1 and "oracle" not in r.text  # greedy only
    r = c.get("/nla", params={"text": "a quiet queen", "pos": 3, "samples": 2}, headers=HTML)
    # the greedy explanation keeps the one FVE; the samples are numbered and the true-vector pick says it is an oracle
    assert r.status_code == 200 and r.text.count('class="pill">FVE ') == 1
    assert r.text.count('class="pill">sample ') == 2 and "<b>oracle</b>" in r.text and "not the NLA" in r.text
    assert 'title="position 0: the attention sink' in r.text and "pos=0&amp;" not in r.text
    assert c.get("/nla/token", params={"text": "abc", "pos": 0}, headers=HTML).status_code == 422
    r = c.get(
        "/nla",
        params={"text": "abc", "pos": 2, "original": "a river", "edited": "a stone", "prompt": "hi", "strength": 5},
        headers=HTML,
    )
    assert r.status_code == 200 and 'id="nla-steered"' in r.text
    r = c.get("/nla/token", params={"text": "abc", "pos": 1}, headers=HTML)
    assert r.status_code == 200 and "FVE" in r.text


# ----------------------------------------------------------------------------- bad input -> the right 4xx


@pytest.mark.parametrize(
    "url,status",
    [
        ("/features/99999", 404),
        ("/features/-1", 404),
        ("/features/abc", 404),
        ("/api/features/24", 404),
        ("/steer/load?name=nope", 404),
        ("/nosuchpage", 404),
        ("/steer?f=3:boost:1", 422),
        ("/steer?f=3:clamp:11", 422),
        ("/steer?f=3:clamp:nan", 422),
        ("/steer?f=x:clamp", 422),
        ("/steer?f=999:clamp:1", 422),
        ("/steer?v=../../etc/passwd:1", 422),
        ("/steer/stream?max_new_tokens=100000", 422),
        ("/steer/stream?max=100000", 422),
        ("/steer/stream?seed=-4", 422),
        ("/steer/stream?temp=9", 422),
        ("/steer/stream?strength=inf", 422),
        ("/steer/stream?gain=inf", 422),
        ("/steer/stream?prompt=", 422),
        ("/steer/preset.json?name=../x", 422),
        ("/analyze?text=abc&feature=77", 422),
        ("/analyze?text=abc&view=zzz", 422),
        ("/analyze?text=User:+hi&chat=1", 422),
        ("/analyze?text=abc&chat=maybe", 422),
        ("/search?mode=nope", 422),
        ("/search?mode=words&q=", 422),
        ("/compare?a=abc", 422),
        ("/nla?text=abc&pos=99", 422),
        ("/nla/token?text=abc", 422),
        ("/api/search", 422),
        ("/steer?p=nope:1", 422),
        ("/steer?p=tilt:-1", 422),
        ("/steer?p=tilt", 422),
    ],
)
def test_bad_inputs_get_the_right_status(c, url, status):
    r = c.get(url)
    assert r.status_code == status, r.text
    assert "error" in r.json()


def test_caps_on_body_text_and_tokens(wb, c):
    big = "a" * (70 * 1024)
    assert (
        c.post(
            "/api/analyze", content=json.dumps({"text": big}), headers={"content-type": "application/json"}
        ).status_code
        == 413
    )

    def chunks():
        for _ in range(40):
            yield b"x" * 4096

    assert c.post("/steer/preset", content=chunks()).status_code == 413  # no content-length: counted as it comes
    r = c.post("/api/analyze", json={"text": "a" * 9000})
    assert r.status_code == 422 and "8,000" in r.json()["error"]
    with client(wb, max_prompt_tokens=8) as small:
        for url in (
            "/api/search?text=abcdefghijkl",
            "/steer/stream?prompt=abcdefghijklmnop",
            "/nla?text=abcdefghijkl&pos=1",
        ):
            r = small.get(url)
            assert r.status_code == 422 and "limit is 8" in r.json()["error"], url
        assert small.post("/api/analyze", json={"text": "abcdefghijkl"}).status_code == 422
    assert c.get("/search?q=" + "a" * 20000).status_code == 414
    assert c.post("/api/analyze", json={"text": "abc", "k": 0}).status_code == 422
    assert c.post("/analyze", json={"text": "abc"}).status_code == 415  # the page takes a form
    assert (
        c.post(
            "/analyze", content=b"text=\xff\xfe", headers={"content-type": "application/x-www-form-urlencoded"}
        ).status_code
        == 422
    )
    assert c.post("/api/analyze", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422


@pytest.mark.parametrize(
    "body",
    [
        b"{nope",
        b"[]",
        b'{"interventions": 3}',
        b'{"interventions": [{"type": "feature", "op": "melt", "site": "resid.1"}]}',
        (b'{"interventions": [{"type": "vector", "op": "add", "site": "resid.1", "vector": "/etc/passwd"}]}'),
        (b'{"interventions": [{"type": "feature", "op": "scale", "site": "resid.1", "sae": "default", "feature": 3}]}'),
    ],
)
def test_malformed_presets_are_422(c, body):
    r = c.post("/steer/preset", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text


def test_host_origin_token_and_no_cors(wb, c):
    assert c.get("/", headers={"host": "evil.example:8765"}).status_code == 400
    assert c.get("/", headers={"sec-fetch-site": "cross-site", "sec-fetch-mode": "cors"}).status_code == 403
    assert c.get("/", headers={"origin": "http://evil.example"}).status_code == 403
    r = c.get("/", headers={"origin": "http://127.0.0.1:8765", **HTML})
    assert r.status_code == 200 and not any(k.startswith("access-control") for k in r.headers)
    assert (
        c.options(
            "/api/analyze", headers={"origin": "http://evil.example", "access-control-request-method": "POST"}
        ).status_code
        == 403
    )
    with pytest.raises(ServerError, match="--token"):
        ServerConfig(host="0.0.0.0")
    with pytest.raises(ServerError, match="8 characters"):
        ServerConfig(host="0.0.0.0", token="short")
    with client(wb, host="192.0.2.7", token="s3cret-token") as t:
        assert t.get("/api/status", headers={"host": "evil.example"}).status_code == 400
        t.headers["host"] = "192.0.2.7:8765"  # the bound address is a fine host ...
        assert t.get("/api/status").status_code == 401  # ... but a token is required
        assert t.get("/api/status", headers={"authorization": "Bearer wrong-token"}).status_code == 401
        assert t.get("/api/status", headers={"authorization": "Bearer s3cret-token"}).status_code == 200
        r = t.get("/features/3?token=s3cret-token", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/features/3"
        assert "thoughtscope_token=s3cret-token" in r.headers["set-cookie"]
        t.cookies.set("thoughtscope_token", "s3cret-token")  # the cookie the redirect set, sent back
        assert t.get("/api/status").status_code == 200


def test_queue_full_answers_429_and_deadline_ends_a_stream(wb):
    with client(wb, queue_size=1) as cl:
        gate = cl.app.state.gate
        hold, started = threading.Event(), threading.Event()

        async def occupy():
            async with gate.slot():
                started.set()
                while not hold.is_set():
                    import asyncio

                    await asyncio.sleep(0.01)

        async def wait_behind():
            async with gate.slot():
                pass

        cl.portal.start_task_soon(occupy)
        assert started.wait(10)
        cl.portal.start_task_soon(wait_behind)
        import time

        for _ in range(200):
            if gate.waiting:
                break
            time.sleep(0.01)
        assert gate.full()
        r = cl.get("/steer/stream?max=4")
        assert r.status_code == 429 and r.headers["retry-after"] == "2"
        assert cl.post("/api/analyze", json={"text": "abc"}).status_code == 429
        assert cl.get("/features/3").status_code == 200  # reading the atlas never waits
        hold.set()
        for _ in range(200):
            if not gate.full() and not gate.waiting:
                break
            time.sleep(0.01)
        assert cl.post("/api/analyze", json={"text": "abc"}).status_code == 200
    with client(wb, deadline_s=1e-6) as cl:
        ev = events(cl.get("/steer/stream?max=64").text)
        assert ev[-1][0] == "error" and "deadline" in ev[-1][1]["message"]


def test_gate_alone():
    import asyncio

    async def go():
        g = Gate(queue_size=1)
        release = asyncio.Event()

        async def hold():
            async with g.slot():
                await release.wait()

        t1 = asyncio.create_task(hold())
        await asyncio.sleep(0)
        t2 = asyncio.create_task(hold())
        await asyncio.sleep(0)
        with pytest.raises(Busy):
            async with g.slot():
                pass
        release.set()
        await asyncio.gather(t1, t2)
        async with g.slot():
            return True

    assert asyncio.run(go())


def test_building_page_until_the_loader_returns(wb):
    go = threading.Event()

    def loader(status):
        status.set("building the atlas", "tiny")
        go.wait(20)
        return wb

    with TestClient(create_app(ServerConfig(), loader=loader), base_url="http://127.0.0.1") as cl:
        r = cl.get("/", headers=HTML)
        assert r.status_code == 503 and "Getting the workbench ready" in r.text and "building the atlas" in r.text
        assert 'sse-connect="/status/stream"' in r.text
        assert cl.get("/api/features/3").json()["stage"] == "building the atlas"
        go.set()
        for _ in range(200):
            if cl.get("/api/status").json()["ready"]:
                break
            threading.Event().wait(0.02)
        assert cl.get("/", headers=HTML).status_code == 200
        assert "event: ready" in cl.get("/status/stream").text


def test_never_a_500_on_garbage(c):
    junk = ["", "-", "0x10", "1e999", "%00", "\u202e", "<script>", "9" * 40, "3:clamp:1:9", "::", "nan"]
    paths = [
        "/features/{}",
        "/steer?f={}",
        "/steer?v={}",
        "/steer/stream?max_new_tokens={}&prompt={}",
        "/analyze?text={}&feature={}",
        "/search?mode=text&text={}",
        "/compare?a={}&b={}",
        "/nla?text={}&pos={}",
        "/steer/load?name={}",
        "/steer/preset.json?name={}&f={}",
        "/features/random?seed={}",
    ]
    for p in paths:
        for j in junk:
            r = c.get(p.format(j, j), headers=HTML)
            assert r.status_code < 500, (p, j, r.status_code, r.text[:300])
