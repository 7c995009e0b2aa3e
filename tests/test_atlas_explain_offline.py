"""The offline explainer and the lexical scorer on a tiny atlas whose features fire on known letters."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from helpers.letters_atlas import CFG, PLANTED

from thoughtscope.atlas import (
    Atlas,
    ExplainConfig,
    LexicalScorer,
    explain_atlas,
    explain_offline,
    parse_cues,
)
from thoughtscope.atlas.heldout import ExplainerError, prepare, random_context_halves, span
from thoughtscope.atlas.scoring import auroc, derangement, mean_ci


def _copy(path: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, dest / path.name)
    return dest / path.name


def test_offline_explainer_names_planted_tokens_and_beats_the_shuffled_control(planted):
    lm, path, d = planted
    p = _copy(path, d / "run1")
    s = explain_offline(p, tokenizer=lm.tokenizer, features=sorted(PLANTED), config=CFG, progress=False)
    assert s["ok"] == len(PLANTED) and s["method"] == "offline-tokens-v2"
    with Atlas.open(p) as at:
        for f, ch in PLANTED.items():
            ex = at.explanation(f)
            fires = ex["explanation"].split(";")[0]
            assert fires.startswith("fires on") and f'"{ch}"' in fires, ex["explanation"]
            assert ex["method"] == "offline-tokens-v2" and ex["scorer_method"] == "lexical-v2"
            assert ex["detection_auroc"] >= 0.95 and ex["detection_bacc"] >= 0.9, (f, ex["explanation"])
            assert ex["details"]["n_pos"] >= 8 and ex["details"]["n_neg"] >= 8
    assert s["detection_auroc_mean"] >= 0.95
    assert 0.3 <= s["shuffled_auroc_mean"] <= 0.7  # another letter's explanation: chance
    assert s["detection_auroc_mean"] - s["shuffled_auroc_mean"] >= 0.3


def test_scores_are_reproducible_with_a_seed(planted):
    lm, path, d = planted

    def run(name, seed):
        p = _copy(path, d / name)
        explain_offline(
            p,
            tokenizer=lm.tokenizer,
            features=sorted(PLANTED),
            config=ExplainConfig(**{**CFG.__dict__, "seed": seed}),
            progress=False,
        )
        with Atlas.open(p) as at:
            return {
                f: (
                    at.explanation(f)["explanation"],
                    at.explanation(f)["detection_auroc"],
                    at.explanation(f)["shuffled_detection_auroc"],
                    at.explanation(f)["details"]["heldout_contexts"],
                )
                for f in PLANTED
            }

    a, b, c = run("seed0a", 0), run("seed0b", 0), run("seed1", 1)
    assert a == b
    assert any(a[f][3] != c[f][3] for f in PLANTED)  # another seed draws other held-out contexts
    assert all(f'"{PLANTED[f]}"' in c[f][0] for f in PLANTED)


def test_heldout_contexts_never_overlap_the_explanations_own(planted):
    lm, path, d = planted
    with Atlas.open(path) as at:
        background, scoring = random_context_halves(at)
        assert background and scoring and not set(background) & set(scoring)
        for f in range(at.n_features):
            if at.feature(f).dead:
                continue
            for seed in (0, 1):
                task = prepare(at, f, ExplainConfig(**{**CFG.__dict__, "seed": seed}))
                assert not task.shown_contexts() & task.heldout_contexts()
                assert not set(background) & task.heldout_contexts()
                assert all(e.act > 0 for e in task.pos)
                for e in task.neg:  # silent: the feature is zero on every shown token of a negative window
                    acts = at.random_activations(f).get(e.ctx, {})
                    lo, hi = span(e, CFG)
                    assert not any(lo <= p <= hi and a > 0 for p, a in acts.items())


def test_lexical_scorer_reads_only_the_text():
    cues = parse_cues('fires on "warnings", "simplefilter"; context "import"; promotes "(", "always"; suppresses "x"')
    by = {c.text: c for c in cues}
    assert list(by) == ["warnings", "simplefilter", "import", "(", "always"]
    assert by["warnings"].weight == 1.0 and by["simplefilter"].weight < 1.0 and by["("].weight == 0.25
    assert by["warnings"].main and not by["("].main and "x" not in by
    words = {c.text for c in parse_cues("The feature responds to words about Python programming.")}
    assert words == {"python", "programming"}
    sc = LexicalScorer()
    scores, active = sc.predict('fires on "warn"; promotes "("', ["import warnings", "f(x)", "nothing here"])
    assert scores[0] > scores[1] > scores[2] == 0.0 and active == [True, False, False]
    s2, _ = sc.predict("python code", ["I wrote Python", "a pythonic way", "cython"])
    assert s2[0] > 0 and s2[1] > 0 and s2[2] == 0  # unquoted words match at a word start only
    s3, a3 = sc.predict('fires on "x"; in Cyrillic text', ["привет мир", "hello world", "x"])
    assert s3[0] > 0 and s3[1] == 0 and a3 == [True, False, True]  # a kind of character, not the word


def test_llm_preamble_keeps_the_list_that_follows():
    from thoughtscope.atlas.explain import parse_explanation

    assert (
        parse_explanation('This feature responds to the following tokens:\n- "warn"\n- "filter"')
        == 'This feature responds to the following tokens: - "warn"; - "filter"'
    )
    assert parse_explanation('"the letter q"') == "the letter q"
    assert parse_explanation("Sure.\nEXPLANATION: Python warnings") == "Python warnings"


def test_metrics_and_control_helpers():
    assert auroc([1, 1, 0, 0], [2.0, 0.0, 0.0, 0.0]) == pytest.approx(0.75)
    perm = derangement(list(range(10)), seed=0)
    assert sorted(perm) == sorted(perm.values()) == list(range(10)) and all(k != v for k, v in perm.items())
    assert derangement([4], seed=0) == {}
    ci = mean_ci([0.5, 0.6, 0.7, 0.8], seed=0)
    assert ci["n"] == 4 and ci["mean"] == pytest.approx(0.65) and ci["ci"][0] <= 0.65 <= ci["ci"][1]


def test_any_explanation_scored_lexically_with_its_control(planted):
    """An LLM's or a person's explanations go through the same scorer (explain_atlas with a LexicalScorer)."""
    lm, path, d = planted
    p = _copy(path, d / "given")
    given = {f: f"the letter '{ch}' inside words" for f, ch in PLANTED.items()}
    s = explain_atlas(p, None, LexicalScorer(), tokenizer=lm.tokenizer, given=given, config=CFG, progress=False)
    assert s["ok"] == len(PLANTED) and s["control_scored"] == len(PLANTED)
    with Atlas.open(p) as at:
        for f in PLANTED:
            ex = at.explanation(f)
            assert ex["method"] == "given" and ex["scorer_method"] == "lexical-v2"
            assert ex["detection_auroc"] >= 0.95 and ex["shuffled_detection_auroc"] is not None
    assert s["selected"]["detection_auroc_mean"] > s["selected"]["shuffled_auroc_mean"] + 0.3


def test_llm_explanations_are_kept_unless_overwrite(planted):
    lm, path, d = planted
    p = _copy(path, d / "keep")
    f0 = sorted(PLANTED)[0]
    explain_atlas(
        p, None, LexicalScorer(), tokenizer=lm.tokenizer, given={f0: "hand-written"}, config=CFG, progress=False
    )
    explain_offline(p, tokenizer=lm.tokenizer, features=sorted(PLANTED), config=CFG, progress=False)
    with Atlas.open(p) as at:
        assert at.explanation(f0)["explanation"] == "hand-written"
    explain_offline(p, tokenizer=lm.tokenizer, features=sorted(PLANTED), config=CFG, overwrite=True, progress=False)
    with Atlas.open(p) as at:
        assert at.explanation(f0)["method"] == "offline-tokens-v2"
        assert at.search(PLANTED[f0])[0][0] == f0  # search by explanation text finds the offline one


def test_an_atlas_from_before_the_method_columns_still_opens(planted):
    lm, path, d = planted
    p = _copy(path, d / "old")
    con = sqlite3.connect(str(p))
    with con:  # the explanations table as schema version 1 first shipped it, with one stored row
        con.execute("DROP TABLE explanations")
        con.execute(
            "CREATE TABLE explanations (feature INTEGER PRIMARY KEY, explanation TEXT, status TEXT NOT NULL, "
            "error TEXT, explainer TEXT, scorer TEXT, detection_bacc REAL, detection_auroc REAL, "
            "fuzz_bacc REAL, fuzz_auroc REAL, details TEXT, seconds REAL, created REAL)"
        )
        con.execute(
            "INSERT INTO explanations (feature, explanation, status, explainer, detection_auroc) "
            "VALUES (2, 'old words', 'ok', 'local:m', 0.5)"
        )
    con.close()
    with Atlas.open(p) as at:
        ex = at.explanation(2)
        assert ex["explanation"] == "old words" and ex["method"] is None and ex["shuffled_detection_auroc"] is None
        assert at.scores([2])[0]["detection_auroc"] == 0.5
    explain_offline(p, tokenizer=lm.tokenizer, features=[5], config=CFG, progress=False)
    with Atlas.open(p) as at:
        assert at.explanation(5)["method"] == "offline-tokens-v2" and at.explanation(2)["explanation"] == "old words"


def test_worker_processes_give_the_same_records_as_one_process(planted):
    lm, path, d = planted

    def run(name, workers):
        p = _copy(path, d / name)
        s = explain_offline(
            p, tokenizer=lm.tokenizer, features=None, config=CFG, progress=False, workers=workers, overwrite=True
        )
        with Atlas.open(p) as at:
            recs = {f: at.explanation(f) for f in range(at.n_features)}
        for r in recs.values():
            if r:
                r.pop("created"), r.pop("seconds")
        return s, recs

    s1, one = run("workers1", 1)
    s2, two = run("workers2", 2)
    assert s1["ok"] >= len(PLANTED) and s1["ok"] == s2["ok"]
    assert one == two  # explanations, scores, held-out contexts, control pairs: identical
    assert {k: v for k, v in s1.items() if k != "seconds"} == {k: v for k, v in s2.items() if k != "seconds"}
    with pytest.raises(ExplainerError, match="workers must be >= 1"):
        explain_offline(path, tokenizer=lm.tokenizer, features=[5], config=CFG, progress=False, workers=0)
