"""Search by meaning (`atlas.search_concept`): each signal ranks the feature it should, embedding neighbours widen
the query, the CLI's JSON has its shape, bad input gets a clear error, and the web search shows the evidence."""

from __future__ import annotations

import json
import re

import pytest
import torch
from fastapi.testclient import TestClient
from helpers.atlas_fixtures import OUT_CHAR, PLANT, identity_model, planted_sae, token_id
from helpers.letters_atlas import LETTERS_ATLAS, PLANTED, planted_letters_sae, write_letters_corpus
from helpers.server_fixtures import PLANT_LABEL, build_tiny
from typer.testing import CliRunner

from thoughtscope.atlas import Atlas, AtlasConfig, AtlasError, build_atlas, search_concept
from thoughtscope.atlas.search import (
    SIGNALS,
    embedding_neighbours,
    output_scores,
    query_tokens,
    token_index,
    warm_up,
)
from thoughtscope.cli import app
from thoughtscope.corpus import Corpus
from thoughtscope.models import load_model, tiny_model
from thoughtscope.sae import save_sae
from thoughtscope.server import ServerConfig, create_app

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
LETTER = {ch: f for f, ch in PLANTED.items()}


@pytest.fixture(scope="module")
def letters(tmp_path_factory):
    """A model folder, the planted-letters SAE saved beside it, and their atlas (recording both, for the CLI)."""
    d = tmp_path_factory.mktemp("search")
    src = identity_model()
    src.model.save_pretrained(d / "model")
    src.tokenizer.save_pretrained(d / "model")
    lm = load_model(str(d / "model"))
    sae = planted_letters_sae(lm)
    sae.cfg.model = str(d / "model")
    save_sae(sae, d / "sae")
    corpus = Corpus(str(write_letters_corpus(d / "corpus.txt")))
    path = build_atlas(
        lm, sae, corpus, d / "atlas", AtlasConfig(**LETTERS_ATLAS), progress=False, sae_path=str(d / "sae")
    )
    return lm, sae, Atlas.open(path), path.parent


def test_input_side_ranks_the_feature_whose_examples_peak_on_the_token(letters):
    lm, sae, at, _ = letters
    warm_up(lm, sae, at)
    idx = token_index(at)
    assert token_index(at) is idx  # built once per atlas file
    for ch, f in LETTER.items():
        s, contrib = idx.scores(query_tokens(lm.tokenizer, ch))
        assert int(s.argmax()) == f and s[f] > 0.5, ch
        assert token_id(lm, ch) in contrib[f]
    hits = search_concept(lm, sae, at, "q", k=5, templates=False)
    assert hits[0].feature == LETTER["q"] and "q" in hits[0].tokens["tokens"]
    assert hits[0].signals["tokens"] > 0.5 and set(hits[0].signals) == set(SIGNALS)


def test_output_side_ranks_the_feature_whose_decoder_writes_the_token():
    lm = identity_model()
    sae = planted_sae(lm)
    s, writes = output_scores(lm, sae, query_tokens(lm.tokenizer, OUT_CHAR))
    assert int(s.argmax()) == PLANT and s[PLANT] > 0 and sorted(writes) == [PLANT]
    assert OUT_CHAR in writes[PLANT]
    s_other, _ = output_scores(lm, sae, query_tokens(lm.tokenizer, "m"))
    assert s_other[PLANT] == 0  # it writes z, not m


def test_embedding_neighbours_expand_the_query(letters):
    """A model whose embedding puts 'k' right beside 'q': searching 'q' then reaches the feature firing on 'k'."""
    lm_atlas, _, at, _ = letters
    lm = tiny_model("llama", d_model=32, n_layers=2, vocab=256, seed=5)
    q, k = token_id(lm, "q"), token_id(lm, "k")
    with torch.no_grad():
        E = lm.model.get_input_embeddings().weight
        noise = torch.randn(E.shape[1], generator=torch.Generator().manual_seed(0))
        E[k] = E[q] + 0.1 * E[q].norm() * noise / noise.norm()
    qt = query_tokens(lm.tokenizer, "q")
    nb = embedding_neighbours(lm, qt, n_neighbours=3, min_cosine=0.5, min_letters=1)
    assert k in nb and nb[k] > 0.9 and q not in nb
    s, contrib = token_index(at).scores(nb)
    assert int(s.argmax()) == LETTER["k"] and k in contrib[LETTER["k"]]


def test_cli_json_shape_and_clear_errors(letters, tmp_path):
    _, _, _, folder = letters
    r = runner.invoke(app, ["features", "search", "q", "--atlas", str(folder), "--k", "3", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["query"] == "q" and d["atlas"].endswith("atlas.sqlite") and 1 <= len(d["hits"]) <= 3
    h = d["hits"][0]
    assert set(h) == {"feature", "score", "signals", "tokens", "label"} and set(h["signals"]) == set(SIGNALS)
    assert h["feature"] == LETTER["q"] and h["tokens"]["tokens"] == ["q"]
    assert all(a["score"] >= b["score"] for a, b in zip(d["hits"], d["hits"][1:]))
    text = runner.invoke(app, ["features", "search", "q", "--atlas", str(folder), "--k", "2"], env={"COLUMNS": "200"})
    assert text.exit_code == 0 and text.output.lstrip().startswith(f"{LETTER['q']} ")
    for bad, says in (("", "empty"), ("   \t", "empty"), ("x" * 300, "limit is 200")):
        r = runner.invoke(app, ["features", "search", bad, "--atlas", str(folder)])
        assert r.exit_code == 2 and says in r.output, r.output
    r = runner.invoke(app, ["features", "search", "q", "--atlas", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "no atlas at" in r.output and "nowhere" in r.output


def test_library_refuses_bad_queries(letters):
    lm, sae, at, _ = letters
    for bad in ("", " \n ", None, "y" * 201):
        with pytest.raises(AtlasError, match="query"):
            search_concept(lm, sae, at, bad)
    with pytest.raises(AtlasError, match="k must be"):
        search_concept(lm, sae, at, "q", k=0)


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    wb = build_tiny(tmp_path_factory.mktemp("web-search"), nla=False)
    with TestClient(create_app(ServerConfig(), wb), base_url="http://127.0.0.1:8765") as c:
        yield c


def test_web_search_shows_each_signal_with_its_tokens(web):
    d = web.get("/api/search", params={"q": "queen"}).json()
    top = d["hits"][0]
    assert top["feature"] == PLANT and top["label"] == PLANT_LABEL
    ev = {e["signal"]: e for e in top["evidence"]}
    assert "text" in ev and ev["text"]["tokens"] == ["queen"] and ev["text"]["score"] > 0
    assert "templates" in ev and "q" in ev["templates"]["tokens"]
    page = web.get("/search", params={"mode": "words", "q": "queen"}, headers={"accept": "text/html"}).text
    assert "By meaning" in page and f'href="/features/{PLANT}"' in page
    row = page.split(f'href="/features/{PLANT}"', 1)[1].split("</tr>", 1)[0]
    assert 'data-signal="templates"' in row and 'data-signal="text"' in row and "<code>" in row
    old = web.get("/search", params={"mode": "meaning", "q": "queen"}, headers={"accept": "text/html"})
    assert old.status_code == 200 and f'href="/features/{PLANT}"' in old.text
    for bad in ("", "   "):
        assert web.get("/api/search", params={"q": bad}).status_code == 422
    assert web.get("/api/search", params={"q": "w" * 300}).status_code == 422


def test_home_suggestions_each_find_a_feature(web):
    home = web.get("/", headers={"accept": "text/html"}).text
    words = re.findall(r'href="/search\?mode=words&amp;q=(\w+)"', home)
    assert len(words) >= 3
    for w in words:
        assert web.get("/api/search", params={"q": w}).json()["hits"], w


def test_search_page_in_chromium_shows_the_evidence(web, browser):
    """Typed into the real page (htmx fetches as you type): the hit's row shows each signal and its tokens."""
    from helpers.browser import LiveServer

    with LiveServer(web.app) as url:
        page = browser.new_page()
        page.goto(f"{url}/search?mode=words")
        page.locator("input[name=q]").press_sequentially("queen", delay=30)
        page.wait_for_selector(f"#hits a[href='/features/{PLANT}']")
        row = page.locator("#hits tbody tr").first
        assert row.locator("a").text_content() == f"#{PLANT}"
        assert "q" in row.locator(".ev[data-signal=templates] code").all_text_contents()
        assert "queen" in row.locator(".ev[data-signal=text] code").all_text_contents()
        assert PLANT_LABEL in row.text_content()
        page.close()


def test_an_atlas_without_its_sae_is_searched_by_its_own_signals(tmp_path):
    """An atlas built from an in-memory SAE (no SAE to load): the CLI ranks by its tokens and text, and says so."""
    lm = identity_model()
    corpus = Corpus(str(write_letters_corpus(tmp_path / "corpus.txt", n_docs=120)))
    cfg = AtlasConfig(**{**LETTERS_ATLAS, "n_tokens": 2048, "n_random_contexts": 16})
    build_atlas(lm, planted_letters_sae(lm), corpus, tmp_path / "atlas", cfg, progress=False)
    r = runner.invoke(app, ["features", "search", "x", "--atlas", str(tmp_path / "atlas"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert "records no SAE" in d["note"] and d["hits"][0]["feature"] == LETTER["x"]
    assert all(h["signals"]["templates"] == h["signals"]["output"] == 0 for h in d["hits"])


def test_a_hit_whose_explanation_is_at_or_below_its_control_is_flagged(web):
    wb = web.app.state.wb
    n = (PLANT + 1) % wb.n_features
    rec = {"explanation": 'fires on "zebra"', "status": "ok", "detection_auroc": 0.41, "shuffled_detection_auroc": 0.6}
    with wb.db_lock:
        wb.atlas.save_explanation(n, rec)
    page = web.get("/search", params={"mode": "meaning", "q": "zebra"}, headers={"accept": "text/html"}).text
    row = page.split(f'href="/features/{n}"', 1)[1].split("</tr>", 1)[0]
    assert "at or below its shuffled control" in row
    other = page.split(f'href="/features/{PLANT}"', 1)
    assert len(other) == 1 or "at or below its shuffled control" not in other[1].split("</tr>", 1)[0]
