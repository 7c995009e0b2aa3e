"""Several kinds of explanation per feature: stored and read back, old atlases, search, the output side's words,
the cross-fitted best kind, its own score in the model, the CLI summary, and the feature page's warning."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch
from helpers.atlas_fixtures import OUT_CHAR, PLANT, identity_model, one_thread, token_id
from helpers.letters_atlas import build_letters_atlas
from helpers.word_tokenizer import word_tokenizer
from typer.testing import CliRunner

from thoughtscope.atlas import Atlas, AtlasError
from thoughtscope.atlas.best import cross_fit, halves
from thoughtscope.atlas.output_explain import WordBook, says_text, says_words, token_word
from thoughtscope.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def letters(tmp_path_factory):
    d = tmp_path_factory.mktemp("kinds")
    with one_thread():
        build_letters_atlas(identity_model(), d)
    return d / "atlas"


def _det(labels, probs):
    return {"detection": {"labels": labels, "probs": probs}}


def test_an_atlas_without_kinds_opens_reads_and_searches_as_before(letters, tmp_path):
    # a copy of a freshly built atlas: no explanation_kinds table, as every atlas written before kinds existed
    db = tmp_path / "atlas.sqlite"
    src = sqlite3.connect(letters / "atlas.sqlite")
    dst = sqlite3.connect(db)
    src.backup(dst)
    src.close(), dst.close()
    with Atlas.open(db) as at:
        have = {r[0] for r in at.con.execute("SELECT name FROM sqlite_master")}
        assert "explanation_kinds" not in have
        at.save_explanation(3, {"explanation": 'fires on "queen"', "status": "ok", "detection_auroc": 0.9})
        got = at.explanation_kinds(3)
        assert [k["kind"] for k in got["kinds"]] == ["input"] and got["best"] == "input"
        assert at.explanation_kinds(4) == {**at.explanation_kinds(4), "kinds": [], "best": None}
        assert at.search("queen") == [(3, 'fires on "queen"')]
        assert at.kinds_present() == ["input"]
        have = {r[0] for r in at.con.execute("SELECT name FROM sqlite_master")}
        assert "explanation_kinds" not in have  # reading made nothing


def test_kinds_are_stored_read_back_searched_and_the_best_marked(letters, tmp_path):
    db = tmp_path / "atlas.sqlite"
    src, dst = sqlite3.connect(letters / "atlas.sqlite"), sqlite3.connect(db)
    src.backup(dst)
    src.close(), dst.close()
    with Atlas.open(db) as at:
        labels = [1, 1, 0, 0]
        at.save_explanation(
            5,
            {"explanation": 'fires on "x"', "status": "ok", "detection_auroc": 0.6, "shuffled_detection_auroc": 0.5},
        )
        out = {
            "explanation": 'says "ocean", "waves"',
            "status": "ok",
            "method": "logit-words-v1",
            "detection_auroc": 0.8,
            "shuffled_detection_auroc": 0.9,
            "own_score": 0.75,
            "own_effect": 0.3,
            "details": {"words": ["ocean", "waves"], **_det(labels, [0.9, 0.8, 0.1, 0.2])},
        }
        at.save_explanation_kinds({5: {"output": out}})
        with pytest.raises(AtlasError, match="input-side"):
            at.save_explanation_kinds({5: {"input": out}})
        got = at.explanation_kinds(5)
        kinds = {k["kind"]: k for k in got["kinds"]}
        assert list(kinds) == ["input", "output"] and got["best"] == "output"
        assert kinds["output"]["explanation"] == 'says "ocean", "waves"' and kinds["output"]["own_score"] == 0.75
        assert kinds["output"]["details"]["words"] == ["ocean", "waves"]
        assert kinds["output"]["at_or_below_control"] is True and kinds["input"]["at_or_below_control"] is False
        assert "resid" in got["nla"]["note"] or "no NLA" in got["nla"]["note"]
        # search reads every kind's text, and each feature comes once
        assert at.search("ocean") == [(5, 'says "ocean", "waves"')]
        assert [f for f, _ in at.search("x ocean")] == [5]
        assert at.kinds_present() == ["input", "output"]
        assert set(at.kind_records("output")) == {5}
        # replacing the kind keeps one row and one index entry
        at.save_explanation_kinds({5: {"output": {**out, "explanation": 'says "sea"'}}})
        assert at.search("ocean") == [] and at.search("sea") == [(5, 'says "sea"')]


def test_output_side_words_are_whole_words_never_byte_fragments():
    tok, ids = word_tokenizer()
    book = WordBook(
        {"ocean": 9, "sea": 5, "waves": 4, "misconception": 3, "misconduct": 2, "neanderthal": 2, "the": 50}
    )
    fragment = ids["ä"]  # one byte of a two-byte character: decodes to U+FFFD alone
    assert "\ufffd" in tok.decode([fragment])
    logits = [(fragment, 9.0), (ids["asgow"], 8.0), (ids["'):"], 7.5), (ids["ĠOcean"], 7.0), (ids["ocean"], 6.5)]
    logits += [(ids["Ġocean"], 6.0), (ids["Ġmiscon"], 5.0), (ids["ĠNeander"], 4.0), (ids["Ġsea"], 3.0)]
    words = says_words(tok, logits, book)
    assert words == ["ocean", "misconception", "neanderthal", "sea"]  # variants merged, fragments read as words
    text = says_text(words)
    assert text == 'says "ocean", "misconception", "neanderthal", "sea"'
    assert "\ufffd" not in text and "'):" not in text and "asgow" not in text
    assert token_word(tok, ids["Ġthe"], book) == "the" and token_word(tok, fragment, book) is None
    assert says_words(tok, [(fragment, 1.0), (ids["Ġ("], 0.5)], book) == [] and says_text([]) == ""
    assert says_words(tok, [(ids["Ġsea"], -1.0)], book) == []  # only what the feature promotes


def test_the_best_kind_is_chosen_on_one_half_and_scored_on_the_other():
    labels = [1] * 10 + [0] * 10
    a, b = halves(labels, feature=7, seed=0)
    assert not set(a) & set(b) and sorted(a + b) == list(range(20))
    assert sum(labels[i] for i in a) == 5 and sum(labels[i] for i in b) == 5  # stratified
    assert (a, b) == halves(labels, feature=7, seed=0) and (a, b) != halves(labels, feature=8, seed=0)
    # "output" is perfect on half a and exactly wrong on half b; "input" says nothing (AUROC 0.5 everywhere)
    out = [0.0] * 20
    for i in a:
        out[i] = float(labels[i])
    for i in b:
        out[i] = float(1 - labels[i])
    recs = {
        "input": {"status": "ok", "details": _det(labels, [0.0] * 20), "shuffled_detection_auroc": 0.5},
        "output": {"status": "ok", "details": _det(labels, out), "shuffled_detection_auroc": 0.5},
    }
    cf = cross_fit(recs, feature=7, seed=0)
    # chosen on a (output, 1.0) and read on b (0.0); chosen on b (input, 0.5) and read on a (0.5)
    assert cf["chosen"] == ["output", "input"] and cf["auroc"] == pytest.approx(0.25)
    assert cf["beats_control"] is False
    # picking on the same windows it is read on would have claimed 0.5 or more: the halves are what keeps it honest
    assert cross_fit(recs, feature=7, seed=0, margin=1.0)["chosen"] == ["input", "input"]


def test_cli_summary_reports_each_kind_and_the_cross_fitted_best(letters, tmp_path, monkeypatch):
    monkeypatch.delenv("THOUGHTSCOPE_EXPLAINER_URL", raising=False)
    out = tmp_path / "s.json"
    r = CliRunner().invoke(
        app, ["atlas", "explain", str(letters), "--offline", "--features", "2,5,7,11,13", "--json", str(out)]
    )
    assert r.exit_code == 0, r.output
    s = json.loads(out.read_text())
    for key in (
        "detection_auroc_by_kind",
        "shuffled_auroc_by_kind",
        "best_kind_auroc_mean",
        "best_beats_shuffled_share",
        "best_rule",
        "kinds",
        "nla",
    ):
        assert key in s, key
    assert "input" in s["detection_auroc_by_kind"] and "cross-fit" in s["best_rule"]
    assert s["kinds"]["kinds"]["input"]["features"] == 5 and s["best_kind_auroc_mean"] > 0.5
    assert 0.0 <= s["best_beats_shuffled_share"] <= 1.0
    with Atlas.open(letters) as at:  # byte tokens are never words: each output side is stored as failed, saying why
        rec = at.explanation_kinds(5)["kinds"]
        assert [k["kind"] for k in rec] == ["input", "output"]
        assert rec[1]["status"] == "failed" and "whole word" in rec[1]["error"]
    bad = CliRunner().invoke(app, ["atlas", "explain", str(letters), "--offline", "--kinds", "output", "--sample", "2"])
    assert bad.exit_code != 0 and "kinds" in bad.output


def test_adding_the_feature_raises_its_words_more_than_same_norm_controls(letters, tmp_path):
    from helpers.atlas_fixtures import planted_sae

    from thoughtscope.atlas.output_score import score_output_loaded

    lm = identity_model()
    sae = planted_sae(lm)  # feature PLANT's decoder promotes OUT_CHAR
    z = token_id(lm, OUT_CHAR)
    assert int((sae.W_dec[PLANT] @ lm.unembed.weight.T).argmax()) == z
    db = tmp_path / "atlas.sqlite"
    src, dst = sqlite3.connect(letters / "atlas.sqlite"), sqlite3.connect(db)
    src.backup(dst)
    src.close(), dst.close()
    with Atlas.open(db) as at:
        n = sae.W_dec.shape[0]
        recs = {
            f: {"output": {"status": "ok", "explanation": f'says "{OUT_CHAR}"', "details": {"words": [OUT_CHAR]}}}
            for f in range(min(n, at.n_features))
        }
        at.save_explanation_kinds(recs)
        with torch.no_grad():
            s = score_output_loaded(at, lm, sae, list(recs), batch=8, prompts=("the cat sat", "a dog ran on"))
        got = at.explanation_kinds(PLANT)["kinds"][-1]
    assert s["features"] == len(recs) and s["prompts"] == 2
    assert got["own_method"] == "clamp-logprob-v1" and got["own_score"] == 1.0
    assert got["own_effect"] > got["own_control_effect"]
    assert PLANT in got["details"]["own"]["controls"] and len(got["details"]["own"]["controls"]) == 8


def test_score_line_says_when_there_is_nothing_to_trust():
    from thoughtscope.atlas.cards import score_line

    assert score_line({}) == "no explanation yet (thoughtscope atlas explain)"
    weak = {"explanation": 'fires on "a"', "status": "ok", "detection_auroc": 0.49, "shuffled_detection_auroc": 0.59}
    assert score_line(weak).endswith("at or below its shuffled control: do not trust it")
    good = {"explanation": 'fires on "a"', "detection_auroc": 0.9, "shuffled_detection_auroc": 0.5}
    assert "do not trust" not in score_line(good)
