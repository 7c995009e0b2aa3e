"""Kinds of text the lexical scorer recognises (languages, scripts, code, layout), clause splitting, and the
offline explainer's use of the background text: it learns only from contexts that are never held out."""

from __future__ import annotations

import pytest
from helpers.letters_atlas import CFG, PLANTED

from thoughtscope.atlas import Atlas, LexicalScorer, parse_cues
from thoughtscope.atlas.heldout import ExplainConfig, prepare, random_context_halves
from thoughtscope.atlas.kinds import KINDS, is_kind, language_evidence, present, strength
from thoughtscope.atlas.offline_explain import OfflineExplainer, OfflineOptions
from thoughtscope.atlas.scoring import auroc, clauses

SAMPLES = {
    "german": "wenn die Daten nicht mehr auf dem Server sind, kann man sie über das Netz holen",
    "french": "il est possible de configurer le réseau pour que les paquets soient dans une archive",
    "spanish": "el sistema considera que la hora está en tiempo universal y no hay más",
    "italian": "questo file non è della configurazione che si trova nella cartella del sistema",
    "english": "the package is installed when the system has been configured for this use",
    "polish": "nie jest to proste, ale może być przez to łatwiejsze dla użytkownika",
}


@pytest.mark.parametrize("lang", sorted(SAMPLES))
def test_each_language_is_recognised_and_no_other(lang):
    text = SAMPLES[lang].lower()
    assert present(lang, text), (lang, language_evidence(text))
    others = [o for o in SAMPLES if o != lang and present(o, text)]
    assert not others, (lang, others, language_evidence(text))


def test_scripts_code_and_layout():
    assert present("cyrillic", "это простой текст") and not present("cyrillic", "plain text")
    assert present("cjk", "这是一个测试") and not present("cjk", "это")
    assert present("code", "if (x == 1) { y_val = f(a, b); }") and not present("code", SAMPLES["english"])
    assert present("line-breaks", "one⏎two") and not present("line-breaks", "one two")
    assert present("paths", "see /etc/apt/sources.list") and not present("paths", "see the list")
    assert present("digits", "version 3") and not present("digits", "version three")
    # graded: more of the kind, a higher strength
    assert strength("cyrillic", "это текст") > strength("cyrillic", "the text ё") > 0.0
    assert all(0.0 <= strength(k, SAMPLES["german"]) <= 1.0 for k in KINDS)
    with pytest.raises(KeyError):
        strength("klingon", "text")


def test_clauses_split_outside_quotes_only():
    assert clauses('fires on "; cd", "x"; context "a"\nin German text') == [
        'fires on "; cd", "x"',
        ' context "a"',
        "in German text",
    ]
    cues = {c.text: c for c in parse_cues('fires on "; cd"; in German or Polish text; with code; promotes "x"')}
    assert cues["; cd"].literal and cues["; cd"].main
    assert cues["german"].kind and cues["polish"].kind and cues["code"].kind
    assert cues["german"].weight > cues["polish"].weight  # the second cue of a clause weighs less
    assert not cues["x"].main and cues["x"].weight < cues["german"].weight
    assert is_kind("german") and not is_kind("cat")


def test_scorer_reads_a_kind_and_its_control_does_not():
    german = [SAMPLES["german"], "das ist nicht der Fall, aber es wird bei uns gemacht", "ich bin mit dem Zug gefahren"]
    other = [SAMPLES["english"], SAMPLES["spanish"], "это простой текст", SAMPLES["italian"]]
    labels = [1] * len(german) + [0] * len(other)
    sc = LexicalScorer()
    s, active = sc.predict("in German text", german + other)
    assert auroc(labels, s) == 1.0 and active == [bool(y) for y in labels]
    s, _ = sc.predict("in Cyrillic text", german + other)  # another feature's explanation: no better than chance
    assert auroc(labels, s) <= 0.5


def test_explainer_learns_only_from_text_that_is_never_held_out(planted):  # noqa: F811
    lm, path, _ = planted
    with Atlas.open(path) as at:
        background, _scoring = random_context_halves(at)
        ex = OfflineExplainer(at, lm.tokenizer, CFG)
        n_with = 0
        for f in PLANTED:
            wins = ex._background_examples(f, 100)
            n_with += bool(wins)
            for seed in (0, 1):
                task = prepare(at, f, ExplainConfig(**{**CFG.__dict__, "seed": seed}))
                held = task.heldout_contexts()
                for toks, lo, hi, marks, pos in wins:
                    ctx = next(c for c in background if ex.bg_tokens[c] is toks)
                    assert ctx not in held
                    assert lo <= pos <= hi and pos in marks
                    assert at.random_activations(f)[ctx][pos] > 0
        assert n_with == len(PLANTED)  # every planted letter occurs in the background text


def test_planted_letter_named_with_and_without_background_examples(planted):  # noqa: F811
    lm, path, _ = planted
    with Atlas.open(path) as at:
        f = next(iter(PLANTED))
        task = prepare(at, f, CFG)
        with_bg = OfflineExplainer(at, lm.tokenizer, CFG).explain(task)
        without = OfflineExplainer(at, lm.tokenizer, CFG, OfflineOptions(background_examples=0)).explain(task)
        for text in (with_bg, without):
            assert f'"{PLANTED[f]}"' in text.split(";")[0], text
    with pytest.raises(Exception, match="OfflineOptions"):
        OfflineOptions(max_fire=0)


def test_an_earlier_offline_version_is_replaced_without_overwrite(planted, tmp_path):  # noqa: F811
    import shutil
    import sqlite3

    from thoughtscope.atlas import explain_offline

    lm, path, _ = planted
    p = tmp_path / path.name
    shutil.copy(path, p)
    feats = sorted(PLANTED)
    explain_offline(p, tokenizer=lm.tokenizer, features=feats, config=CFG, progress=False)
    con = sqlite3.connect(str(p))
    with con:  # as an atlas explained by the first offline version would hold them
        con.execute("UPDATE explanations SET method='offline-tokens-v1', explanation='fires on \"zzz\"'")
    con.close()
    s = explain_offline(p, tokenizer=lm.tokenizer, features=feats, config=CFG, progress=False)
    assert s["ok"] == len(feats)
    with Atlas.open(p) as at:
        assert {at.explanation(f)["method"] for f in feats} == {"offline-tokens-v2"}
        assert all('"zzz"' not in at.explanation(f)["explanation"] for f in feats)


def test_predicted_active_from_three_quarters_of_the_heaviest_main_cue():
    sc = LexicalScorer()
    _, active = sc.predict(
        'fires on "alpha", "beta", "gamma"; promotes "delta"', ["x alpha", "x beta", "beta gamma", "x delta", "nothing"]
    )
    assert active == [True, False, True, False, False]  # 1.0; 0.67; 0.67 + 0.5; 0.25 (promotes); 0
    _, active = sc.predict("legal contracts", ["a legal text", "contracts only", "neither"])
    assert active == [True, False, False]  # unquoted words weigh half: the rule is relative
    _, active = sc.predict('promotes "x"', ["x"])
    assert active == [False]  # no main clause: never predicted active
