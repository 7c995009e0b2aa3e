"""One path from a text to its SAE features (`features.features_on_texts`), with one position-0 rule.

The library (`features_on_text`, `token_features`, `top_features_at`), the analyzer (`analyze_text`,
`compare_texts`), the atlas's text query and the CLI (`features at`) give the same features and values for the
same text; position 0 is excluded exactly when the SAE's config says so (docs/atlas.md: "excluded when the
SAE's config says so (the default)"). `features contrast` reads prompt files with `documents.read_prompts`.
"""

from __future__ import annotations

import dataclasses
import json
import types

import pytest
import torch
from typer.testing import CliRunner

from thoughtscope.analyzer import AnalyzerError, analyze_text, compare_texts
from thoughtscope.cli import app
from thoughtscope.errors import FeatureError
from thoughtscope.features import (
    contrast_features,
    excludes_position_0,
    features_on_text,
    features_on_texts,
    token_features,
    top_features_at,
)
from thoughtscope.models import load_model, tiny_model
from thoughtscope.sae import SAEConfig, build_sae, load_sae, save_sae

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
TEXT = "the cat sat on the mat"
N_FEATURES = 64


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny random model and a tiny top-k SAE at resid.1, saved where the CLI can load them."""
    root = tmp_path_factory.mktemp("features_on_text")
    lm = tiny_model("llama", n_layers=2, d_model=32, seed=1)
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    cfg = SAEConfig(arch="topk", d_model=32, n_features=N_FEATURES, k=6, model=str(root / "model"), site="resid.1")
    save_sae(build_sae(cfg), root / "sae")
    return root


@pytest.fixture(scope="module")
def lm_sae(root):
    return load_model(str(root / "model")), load_sae(root / "sae")


def _with_exclude_bos(sae, value: bool):
    other = load_sae(sae.source_dir)
    other.cfg = dataclasses.replace(sae.cfg, exclude_bos=value)
    return other


def _ok(args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def test_library_analyzer_and_atlas_give_the_same_features(lm_sae):
    lm, sae = lm_sae
    tf = features_on_text(lm, sae, TEXT)
    assert tf.token_ids == lm.tokenize(TEXT)[0][0].tolist()  # the model's own tokenisation, BOS first
    assert tf.excluded == [0] and tf.kept == list(range(1, len(tf.token_ids)))
    acts = tf.acts.cpu()
    assert bool((acts[1:] > 0).any())

    ((tok_acts, tok_ids),) = token_features(lm, sae, None, [TEXT])
    torch.testing.assert_close(tok_acts, acts[1:], rtol=0, atol=0)
    assert tok_ids.tolist() == tf.token_ids[1:]

    a = analyze_text(lm, sae, TEXT, k=N_FEATURES, features=list(range(N_FEATURES)))
    assert a.token_ids == tf.token_ids and a.excluded == tf.excluded
    torch.testing.assert_close(torch.tensor([a.chosen[n] for n in range(N_FEATURES)]).T, acts, rtol=0, atol=0)
    for p, row in enumerate(a.top):
        assert row == [(n, float(acts[p, n])) for n in acts[p].argsort(descending=True).tolist() if acts[p, n] > 0]

    for i in range(len(tf.token_ids) - 1):  # top_features_at counts the text's own tokens (BOS not counted)
        _, top = top_features_at(lm, sae, None, TEXT, i, top=N_FEATURES)
        assert dict(top) == {n: float(acts[i + 1, n]) for n in range(N_FEATURES) if acts[i + 1, n] > 0}

    other = "a dog ran far away"
    rows = compare_texts(lm, sae, TEXT, other, k=N_FEATURES)
    peak_b = features_on_text(lm, sae, other).acts.max(0).values.cpu()
    assert rows and all(r["peak_a"] == float(acts[:, r["feature"]].max()) for r in rows)
    assert all(r["peak_b"] == float(peak_b[r["feature"]]) for r in rows)

    from thoughtscope.atlas import top_features_for_text

    card = top_features_for_text(lm, sae, TEXT, k=N_FEATURES)
    assert [t.token_id for t in card["tokens"]] == tf.token_ids
    assert [t.features for t in card["tokens"]] == a.top


def test_the_cli_prints_the_same_features(root, lm_sae):
    lm, sae = lm_sae
    acts = features_on_text(lm, sae, TEXT).acts.cpu()
    for index in ("-1", "0", "3"):
        out = _ok(["features", "at", TEXT, "--token", index, "--sae", root / "sae", "--model", root / "model"]).output
        want_piece, want = top_features_at(lm, sae, None, TEXT, int(index), top=10)
        assert out.splitlines()[0] == f"token {want_piece!r}:"
        shown = [(int(f), float(v)) for f, v in (line.split() for line in out.splitlines()[1:] if line.strip())]
        assert [f for f, _ in shown] == [f for f, _ in want]
        pos = int(index) % (acts.shape[0] - 1) + 1
        assert [v for _, v in shown] == [pytest.approx(float(acts[pos, f]), abs=1e-3) for f, _ in shown]


def test_position_0_follows_the_sae_config(lm_sae):
    lm, sae = lm_sae
    default = {f.name: f.default for f in dataclasses.fields(SAEConfig)}["exclude_bos"]
    assert default is True and sae.cfg.exclude_bos is True  # the default: excluded
    assert excludes_position_0(sae) and excludes_position_0(types.SimpleNamespace(cfg=types.SimpleNamespace()))

    excl = features_on_text(lm, sae, TEXT)
    assert excl.excluded == [0] and float(excl.acts[0].abs().sum()) == 0.0
    assert float(excl.encoded[0].abs().sum()) > 0  # the SAE's code exists there; it is not read as firing
    assert analyze_text(lm, sae, TEXT).top[0] == []
    assert len(token_features(lm, sae, None, [TEXT])[0][1]) == len(excl.token_ids) - 1

    reads = _with_exclude_bos(sae, False)
    assert not excludes_position_0(reads)
    incl = features_on_text(lm, reads, TEXT)
    assert incl.excluded == [] and incl.kept == list(range(len(incl.token_ids)))
    torch.testing.assert_close(incl.acts, incl.encoded.float(), rtol=0, atol=0)
    torch.testing.assert_close(incl.acts[1:], excl.acts[1:], rtol=0, atol=0)
    a = analyze_text(lm, reads, TEXT, features=[0])
    assert a.excluded == [] and a.chosen[0][0] == float(incl.acts[0, 0])
    assert len(token_features(lm, reads, None, [TEXT])[0][1]) == len(incl.token_ids)
    _, top = top_features_at(lm, reads, None, TEXT, 0, top=N_FEATURES)
    assert dict(top) == {n: float(incl.acts[1, n]) for n in range(N_FEATURES) if incl.acts[1, n] > 0}


def test_without_a_bos_position_0_is_the_first_token_and_follows_the_same_rule(root):
    lm = load_model(str(root / "model"))
    lm.tokenizer.bos_token = None
    sae = load_sae(root / "sae")
    tf = features_on_text(lm, sae, TEXT)
    assert tf.token_ids == lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"] and tf.excluded == [0]
    assert float(tf.acts[0].abs().sum()) == 0.0
    with pytest.raises(FeatureError, match="position 0"):
        top_features_at(lm, sae, None, TEXT, 0)
    assert top_features_at(lm, sae, None, TEXT, 1)[0] == TEXT[1]


def test_batches_give_what_one_text_at_a_time_gives(lm_sae):
    lm, sae = lm_sae
    texts = [TEXT, "a", "the quick brown fox jumps", "zz top", "on and on and on"]
    batched = list(features_on_texts(lm, sae, texts, texts_per_batch=3))
    assert len(batched) == len(texts)
    for t, b in zip(texts, batched):
        one = features_on_text(lm, sae, t)
        assert b.token_ids == one.token_ids and b.excluded == one.excluded
        torch.testing.assert_close(b.acts, one.acts, rtol=1e-4, atol=1e-5)
    with pytest.warns(DeprecationWarning, match="texts_per_batch"):
        old = token_features(lm, sae, None, texts, contexts_per_batch=2)
    assert [ids.tolist() for _, ids in old] == [b.token_ids[1:] for b in batched]


def test_length_limits_and_bad_texts(lm_sae):
    lm, sae = lm_sae
    with pytest.raises(FeatureError, match="text has 5 tokens; the limit is 4"):
        features_on_text(lm, sae, "abcd", max_text_tokens=4)  # BOS counts: the model reads it
    with pytest.raises(FeatureError, match="text 1 has"):
        list(features_on_texts(lm, sae, ["a", "b" * 300]))
    with pytest.raises(FeatureError, match="text 1 is empty"):
        features_on_texts(lm, sae, ["a", "  "])
    with pytest.raises(FeatureError, match="texts_per_batch"):
        features_on_texts(lm, sae, ["a"], texts_per_batch=0)
    with pytest.raises(AnalyzerError, match="limit is 4"):
        analyze_text(lm, sae, "abcdefgh", max_text_tokens=4)
    with pytest.raises(AnalyzerError, match="limit is 4"):
        compare_texts(lm, sae, "ab", "abcdefgh", max_text_tokens=4)
    with pytest.warns(DeprecationWarning, match="max_text_tokens"):
        old = analyze_text(lm, sae, TEXT, max_tokens=64)
    assert old.top == analyze_text(lm, sae, TEXT, max_text_tokens=64).top


PROMPTS = ["the cat sat on the mat", "a cat and a hat", "my cat naps", "cats purr softly"]
CONTROLS = ["numbers: 1 2 3 4", "zz yy xx", "the stock fell", "rain on the road"]


def test_features_contrast_reads_a_json_list_of_prompts(root, lm_sae, tmp_path):
    lm, sae = lm_sae
    (tmp_path / "prompts.json").write_text(json.dumps(PROMPTS, indent=1))
    (tmp_path / "controls.txt").write_text("\n".join(CONTROLS) + "\n")
    args = ["--sae", root / "sae", "--model", root / "model", "--top", 5]
    out = _ok(
        ["features", "contrast", "--prompts", tmp_path / "prompts.json", "--controls", tmp_path / "controls.txt", *args]
    ).output
    shown = [line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│")]
    want = contrast_features(lm, sae, None, PROMPTS, CONTROLS, top=5)
    assert shown and shown == [str(s.feature) for s in want]  # the list's items, not the file's JSON lines
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    as_lines = _ok(
        ["features", "contrast", "--prompts", tmp_path / "prompts.txt", "--controls", tmp_path / "controls.txt", *args]
    ).output
    assert as_lines == out
    (tmp_path / "bad.json").write_text('{"text": "not a list"}')
    r = runner.invoke(
        app,
        ["features", "contrast", "--prompts", str(tmp_path / "bad.json"), "--controls", str(tmp_path / "controls.txt")]
        + [str(a) for a in args],
    )
    assert r.exit_code == 2 and "expected a JSON list of prompts" in r.output


def test_features_random_accepts_short_n(tmp_path):
    import typer

    cmd = typer.main.get_command(app).commands["features"].commands["random"]
    assert {"-n", "--n"} <= set(next(p for p in cmd.params if p.name == "n").opts)
    r = runner.invoke(app, ["features", "random", "--atlas", str(tmp_path / "none"), "-n", "5"])
    assert "No such option" not in r.output and str(tmp_path / "none") in r.output.replace("\n", "")


def test_a_character_split_over_byte_tokens_is_named_whole(lm_sae):
    """ł is two byte tokens for the byte tokenizer: asked by index or by substring, the answer names ł, not a
    fragment; the per-token list gives the character on its last token."""
    from thoughtscope.atlas.query import top_features_for_text
    from thoughtscope.features import top_features_at

    lm, sae = lm_sae
    assert len(lm.tokenizer("ł", add_special_tokens=False)["input_ids"]) == 2
    token, _ = top_features_at(lm, sae, "resid.1", "abł", token=-1)
    assert token == "ł"
    assert top_features_at(lm, sae, "resid.1", "abłcd", token="ł")[0] == "ł"
    texts = [t.token for t in top_features_for_text(lm, sae, "abł")["tokens"]]
    assert "".join(texts).endswith("abł") and "\ufffd" not in "".join(texts)
