"""The atlas and feature commands end to end on a tiny model with a small SAE: what they print and write is
checked against the atlas and the library, not just their exit codes."""

import json
import sqlite3

import pytest
from typer.testing import CliRunner

from thoughtscope.cli import app
from thoughtscope.models import tiny_model
from thoughtscope.plans import AtlasConfig
from thoughtscope.sae import SAEConfig, build_sae, save_sae

runner = CliRunner()
TEXT = "\n\n\n".join(
    f"Line {i}: def f(x): return x * {i}. The sun sets over the sea {i} times. " * 3 for i in range(200)
)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("atlas-cli")
    lm = tiny_model("llama", n_layers=2, d_model=32)
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    sae = build_sae(SAEConfig(arch="topk", k=4, d_model=32, n_features=64, model=str(root / "model"), site="resid.1"))
    save_sae(sae, root / "sae")
    (root / "docs.txt").write_text(TEXT)
    (root / "code.txt").write_text("def g(y): return y\ndef h(z): return z + 1\n")
    (root / "prose.txt").write_text("The sun sets.\nThe sea is calm.\n")
    return root


def _ok(args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def _flat(text: str) -> str:
    """Output without whitespace and box borders: rich wraps long lines at the terminal width, inside panels."""
    return "".join(c for c in "".join(text.split()) if not "\u2500" <= c <= "\u257f")


@pytest.fixture(scope="module")
def built(root):
    """`atlas build` with the old option name --batch-size (still accepted) and the config's other defaults."""
    r = _ok(
        [
            "atlas",
            "build",
            "--sae",
            root / "sae",
            "--corpus",
            root / "docs.txt",
            "--tokens",
            2048,
            "--ctx-len",
            32,
            "--batch-size",
            8,
            "--out",
            root / "atlas",
            "--quiet",
        ]
    )
    return root / "atlas", r


def test_build_writes_what_was_asked(root, built):
    atlas, r = built
    db = atlas / "atlas.sqlite"
    assert _flat(f"wrote {db}") in _flat(r.output)
    con = sqlite3.connect(db)
    meta = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}
    assert meta["n_contexts"] == 2048 // 32 and meta["ctx_len"] == 32 and meta["n_features"] == 64
    assert meta["config"]["contexts_per_batch"] == 8 and meta["config"]["n_tokens"] == 2048
    assert meta["config"]["top_k"] == AtlasConfig.top_k  # unset options come from the config
    assert meta["sae_path"] == str((root / "sae").resolve()) and meta["site"] == "resid.1"
    assert con.execute("SELECT COUNT(*) FROM features").fetchone()[0] == 64
    most = con.execute("SELECT MAX(n) FROM (SELECT COUNT(*) AS n FROM examples WHERE kind='top' GROUP BY feature)")
    assert most.fetchone()[0] == AtlasConfig.top_k


def test_cards_show_the_atlas_values(built):
    from thoughtscope.atlas import Atlas

    atlas, _ = built
    with Atlas.open(atlas) as at:
        picks = at.random_features(2, seed=0)
        alive = [i for i in range(at.n_features) if not at.feature(i).dead]
        shown = at.feature(alive[0])
        top = at.examples(alive[0], "top", limit=3)
    out = _flat(_ok(["feature", "random", "--atlas", atlas, "--n", 2, "--seed", 0]).output)
    assert all(f"#{i}" in out for i in picks)
    out = _flat(_ok(["feature", "show", alive[0], "--atlas", atlas]).output)
    assert f"#{alive[0]}" in out
    assert (
        _flat(
            f"density {shown.density:.2e} max {shown.max_act:.3g} mean {shown.mean_act:.3g} "
            f"active on {shown.n_active:,} tokens"
        )
        in out
    )
    assert all(f"{e.act:.3g}" in out for e in top)


def test_top_and_contrast_print_the_library_results(root, built):
    from thoughtscope.atlas import contrast, open_with_model, top_features_for_text

    atlas, _ = built
    at, lm, sae = open_with_model(atlas)
    text = "def f(x): return x"
    per_token = top_features_for_text(lm, sae, text, k=5)["tokens"]
    out = _flat(_ok(["feature", "top", "--text", text, "--atlas", atlas]).output)
    for tf in per_token:
        assert _flat(", ".join(f"{n} ({a:.2f})" for n, a in tf.features)) in out

    def lines(p):
        return [s.strip() for s in p.read_text().splitlines() if s.strip()]

    rows = contrast(lm, sae, lines(root / "code.txt"), lines(root / "prose.txt"), k=5, atlas=at)
    out = _flat(
        _ok(
            [
                "feature",
                "contrast",
                "--prompts",
                root / "code.txt",
                "--controls",
                root / "prose.txt",
                "--atlas",
                atlas,
                "--k",
                5,
            ]
        ).output
    )
    cells = [f"{r['feature']}{r['score']:.3f}{r['prompt_mean']:.3f}" for r in rows]
    assert all(c in out for c in cells)
    assert [out.index(c) for c in cells] == sorted(out.index(c) for c in cells)  # best first
    at.close()


def test_report_counts_alive_and_dead(built):
    from thoughtscope.atlas import Atlas

    atlas, _ = built
    _ok(["atlas", "report", atlas, "--cards", 2])
    page = (atlas / "report.html").read_text()
    with Atlas.open(atlas) as at:
        n_dead = sum(at.feature(i).dead for i in range(at.n_features))
    assert f"{64 - n_dead} / {n_dead}" in page
    assert "Random features (2," in page


def test_errors(root, built):
    atlas, _ = built
    r = runner.invoke(app, ["feature", "show", "99999", "--atlas", str(atlas)])
    assert r.exit_code == 2 and "99999" in r.output
    r = runner.invoke(app, ["feature", "show", "1", "--atlas", str(root / "missing")])
    assert r.exit_code == 2 and "missing" in r.output
    r = runner.invoke(app, ["atlas", "build", "--sae", str(root / "sae"), "--out", str(root / "bad"), "--ctx-len", "1"])
    assert r.exit_code == 2 and _flat("AtlasConfig.ctx_len must be an int >= 2, got 1") in _flat(r.output)
