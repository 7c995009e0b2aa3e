"""`atlas explain --offline`, the offline default, and the places that show an explanation with its score."""

from __future__ import annotations

import json

import pytest
from helpers.atlas_fixtures import identity_model, one_thread
from helpers.letters_atlas import PLANTED, build_letters_atlas
from typer.testing import CliRunner

from thoughtscope.atlas import Atlas
from thoughtscope.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def atlas_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("explain-cli")
    with one_thread():
        build_letters_atlas(identity_model(), d)
    return d


def _ok(args, **kw):
    r = runner.invoke(app, [str(a) for a in args], **kw)
    assert r.exit_code == 0, r.output
    return r


def test_offline_explain_writes_the_json_summary(atlas_dir, monkeypatch):
    monkeypatch.delenv("THOUGHTSCOPE_EXPLAINER_URL", raising=False)
    out = atlas_dir / "summary.json"
    _ok(["atlas", "explain", atlas_dir / "atlas", "--offline", "--sample", 10, "--json", out])
    s = json.loads(out.read_text())
    assert s["method"] == "offline-tokens-v2" and s["requested"] == 10
    for key in ("detection_auroc_mean", "shuffled_auroc_mean", "detection_bacc_mean", "detection_auroc_ci"):
        assert key in s
    assert s["detection_auroc_mean"] > s["shuffled_auroc_mean"]


def test_no_endpoint_means_offline_for_the_whole_atlas(atlas_dir, monkeypatch):
    monkeypatch.delenv("THOUGHTSCOPE_EXPLAINER_URL", raising=False)
    _ok(["atlas", "explain", atlas_dir / "atlas"])
    with Atlas.open(atlas_dir / "atlas") as at:
        alive = {f for f in range(at.n_features) if not at.feature(f).dead}
        assert at.explained("ok") == alive
        assert {at.explanation(f)["method"] for f in alive} == {"offline-tokens-v2"}


def test_search_show_and_report_show_score_and_method(atlas_dir, monkeypatch):
    monkeypatch.delenv("THOUGHTSCOPE_EXPLAINER_URL", raising=False)
    _ok(["atlas", "explain", atlas_dir / "atlas", "--offline", "--features", ",".join(map(str, PLANTED))])
    r = _ok(["feature", "search", "q", "--atlas", atlas_dir / "atlas"], env={"COLUMNS": "200"})
    assert r.output.lstrip().startswith("2 ") and "detection AUROC" in r.output and "offline-tokens-v2" in r.output
    r = _ok(["feature", "show", 2, "--atlas", atlas_dir / "atlas"], env={"COLUMNS": "200"})
    assert 'fires on "q"' in r.output and "shuffled control" in r.output and "lexical-v2" in r.output
    _ok(["atlas", "report", atlas_dir / "atlas", "--cards", 3])
    page = (atlas_dir / "atlas" / "report.html").read_text()
    assert "shuffled control" in page and "offline-tokens-v2" in page


def test_bad_options_fail_with_one_line(atlas_dir):
    r = runner.invoke(app, ["atlas", "explain", str(atlas_dir / "atlas"), "--offline", "--scorer", "llm"])
    assert r.exit_code == 2 and "lexical" in r.output
    r = runner.invoke(app, ["atlas", "explain", str(atlas_dir / "missing"), "--offline"])
    assert r.exit_code == 2 and "missing" in r.output


def test_build_help_names_contexts_per_batch_and_hides_the_old_flag():
    r = _ok(["atlas", "build", "--help"], env={"COLUMNS": "200"})
    assert "--contexts-per-batch" in r.output and "Contexts per forward pass" in r.output
    assert "--batch-size" not in r.output


def test_explain_config_old_answer_cap_names_still_work():
    from thoughtscope.atlas import ExplainConfig

    with pytest.warns(DeprecationWarning, match="max_new_tokens"):
        cfg = ExplainConfig(explain_max_tokens=8, score_max_tokens=9)
    assert (cfg.explain_max_new_tokens, cfg.score_max_new_tokens) == (8, 9)
    assert "explain_max_tokens" not in vars(ExplainConfig())


def test_unknown_scorer_fails_with_one_line(atlas_dir):
    r = runner.invoke(app, ["atlas", "explain", str(atlas_dir / "atlas"), "--scorer", "magic"])
    assert r.exit_code == 2 and "auto, lexical or llm" in r.output
