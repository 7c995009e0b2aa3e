"""benchmarks/sae_quality.py on tiny synthetic data: every figure the issue names is written, the fronts are
interpolated at the headline L0, a contender that predicts the mean stops the run, and the table script renders the
ground-truth table from the JSON."""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import sae_quality
import torch
from _race import InsaneContender
from _synthetic_contenders import Fitted, Ours

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("f1", "mcc", "uniqueness", "absorption", "explained_variance", "l0", "dead")
TINY = [
    "--quick",
    "--n-true", "256",
    "--d-model", "32",
    "--n-latents", "64",
    "--true-l0", "8",
    "--headline-l0", "6",
    "--targets", "4,6",
    "--batch-size", "256",
    "--steps", "40",
    "--pool-rows", "4096",
    "--eval-rows", "2048",
    "--grid", "4",
    "--search-runs", "3",
]  # fmt: skip


FAST = "thoughtscope-batchtopk,thoughtscope-matryoshka,saelens-batchtopk,saelens-jumprelu"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality") / "quality.json"
    sae_quality.main([*TINY, "--contenders", FAST, "--json", str(out)])
    return json.loads(out.read_text()), out


def check_figures(fig: dict, names: set[str], gen: bool = True) -> None:
    assert set(fig["synthetic"]) == names
    for name, row in fig["synthetic"].items():
        for key in (*METRICS, "shrinkage", "lr", "points", "lr_grid"):
            assert key in row, (name, key)
        assert row["points"] and all("test" in p and "val" in p for p in row["points"])
        assert 0 <= row["f1"] <= 1 and 0 <= row["mcc"] <= 1 and row["explained_variance"] > 0
        if row["bracketed"]:
            assert row["l0"] == pytest.approx(6.0)
        assert row["lr"] in [g["lr"] for g in row["lr_grid"]]
    floor = fig["best_needs_explained_variance"]
    usable = {n: r["f1"] for n, r in fig["synthetic"].items() if r["explained_variance"] >= floor}
    assert sorted(set(fig["synthetic"]) - set(usable)) == fig["not_eligible_for_best"]
    ours = [f for n, f in usable.items() if n.startswith("thoughtscope-")]
    peer = [f for n, f in usable.items() if n.startswith("saelens-")]
    want = max(ours) / max(peer) if ours and peer else None
    assert fig["f1_ours_best_vs_saelens_best"] == (pytest.approx(want) if want is not None else None)
    btk_ratio = fig["synthetic"]["thoughtscope-batchtopk"]["f1"] / fig["synthetic"]["saelens-batchtopk"]["f1"]
    assert fig["f1_ratio_by_arch"]["batchtopk"] == pytest.approx(btk_ratio)
    mat, btk = fig["synthetic"]["thoughtscope-matryoshka"], fig["synthetic"]["thoughtscope-batchtopk"]
    assert fig["matryoshka_minus_batchtopk_f1"] == pytest.approx(mat["f1"] - btk["f1"])
    assert fig["data"]["synthetic"]["true_l0"] == pytest.approx(8, rel=0.1)
    if not gen:
        return
    # SAELens' own generator, the same contenders
    assert set(fig["synthetic_saelens_gen"]) == names
    assert fig["data"]["synthetic_saelens_gen"]["children"] > 0


def test_tiny_run_writes_the_issue_figures(tiny_run):
    fig, _ = tiny_run
    check_figures(fig, set(FAST.split(",")))
    assert "real" not in fig  # --quick leaves the real model out unless --real


@pytest.mark.slow
def test_tiny_run_of_every_contender(tmp_path):
    out = tmp_path / "quality.json"
    # the ReLU-L1 and JumpReLU contenders need more steps than the fast test's to beat the mean
    # (SAELens' generator at this size compares at L0 ~2, below what ReLU-L1 reaches sanely: the fast test covers it)
    sae_quality.main([*TINY, "--steps", "300", "--grid", "1,16", "--no-saelens-gen", "--json", str(out)])
    fig = json.loads(out.read_text())
    names = {f"thoughtscope-{a}" for a in ("relu-l1", "topk", "batchtopk", "jumprelu", "matryoshka")}
    names |= {f"saelens-{a}" for a in ("standard", "topk", "batchtopk", "jumprelu", "matryoshka_batchtopk")}
    check_figures(fig, names | {"sparsify-topk"}, gen=False)


@pytest.mark.slow
def test_real_model_figures_for_the_default_and_a_named_sae(tmp_path):
    from thoughtscope.sae.formats import default_sae_path

    out = tmp_path / "quality.json"
    args = [*TINY, "--contenders", "thoughtscope-topk", "--no-saelens-gen", "--real", "--real-tokens", "2048"]
    sae_quality.main([*args, "--real-sae", f"again={default_sae_path()}", "--json", str(out)])
    real = json.loads(out.read_text())["real"]
    assert set(real) == {"default", "again"}
    for row in real.values():
        for key in ("sparse_probing_auc", "absorption", "detection_auroc", "spliced_loss"):
            assert math.isfinite(row[key]), key
    assert real["again"]["spliced_loss"] == pytest.approx(real["default"]["spliced_loss"], rel=1e-4)


def test_front_is_interpolated_in_log_l0_between_the_bracketing_points():
    pts = [
        {"val": {"l0": 10.0, "f1": 0.2, "mcc": 0.5}},
        {"val": {"l0": 40.0, "f1": 0.6, "mcc": 0.7}},
        {"val": {"l0": 100.0, "f1": 0.9, "mcc": 0.9}},
    ]
    at = sae_quality.at_l0(pts, 20.0, "val")
    assert at["bracketed"] and at["between_l0"] == [10.0, 40.0]
    assert at["f1"] == pytest.approx(0.2 + 0.4 * math.log(2) / math.log(4))
    assert at["l0"] == pytest.approx(20.0)
    off = sae_quality.at_l0(pts, 200.0, "val")
    assert not off["bracketed"] and off["f1"] == 0.9 and off["nearest_l0_rel_gap"] == pytest.approx(-0.5)


class _MeanPredictor(Ours):
    """Our TopK, trained normally, then forced to output the training mean for every row (a broken harness)."""

    def fit(self, batches, lr, knob):
        f = super().fit(batches, lr, knob)
        mean = torch.cat(list(batches)).mean(0)
        return Fitted(encode=f.encode, decode=lambda z: mean.expand(z.shape[0], -1), W_dec=f.W_dec)


def test_sanity_rule_refuses_a_contender_that_predicts_the_mean():
    sz = sae_quality.sizes(argparse.Namespace(quick=True))
    sz.update(n_true=256, d_model=32, n_latents=64, true_l0=8.0, pool_rows=4096, eval_rows=2048, search_runs=1)
    sz.update(headline_l0=6.0)
    data = sae_quality.data_ours(sz, 0)
    batches = [data.pool[i * 256 : (i + 1) * 256] for i in range(16)]
    good = sae_quality.best_front(
        Ours("topk", 32, 64, batch_size=256, n_steps=16), batches, data, sz, [6.0], [4.0], print
    )
    assert good["explained_variance"] > 0 and good["l0"] == pytest.approx(6.0)
    with pytest.raises(InsaneContender, match="no better than predicting the mean"):
        sae_quality.best_front(
            _MeanPredictor("topk", 32, 64, batch_size=256, n_steps=16), batches, data, sz, [6.0], [4.0], print
        )


def test_table_script_renders_the_ground_truth_table_from_the_json(tiny_run, tmp_path):
    fig, path = tiny_run
    readme = tmp_path / "README.md"
    readme.write_text(
        "# x\n<!-- benchmark-table:start -->\nold\n<!-- benchmark-table:end -->\n"
        "<!-- quality-table:start -->\nold quality\n<!-- quality-table:end -->\nafter\n"
    )
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark_table.py"), f"sae_quality={path}", "--readme", str(readme)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    text = readme.read_text()
    assert "old quality" not in text and text.endswith("<!-- quality-table:end -->\nafter\n")
    quality = text.split("<!-- quality-table:start -->")[1]
    for name, row in fig["synthetic"].items():
        line = next(ln for ln in quality.splitlines() if f"| thoughtscope's generator | {name} |" in ln)
        assert f"| {row['f1']:.3f} | {row['mcc']:.3f} |" in line
    assert "SAELens' SyntheticModel" in quality
    speed = text.split("<!-- benchmark-table:start -->")[1].split("<!-- benchmark-table:end -->")[0]
    ratio = fig["f1_ours_best_vs_saelens_best"]
    assert "`sae_quality.py --quick`" in speed and f"**{'n/a' if ratio is None else format(ratio, '.2f')}**" in speed


def test_table_script_renders_the_real_model_rows(tiny_run, tmp_path):
    fig, _ = tiny_run
    real = {
        "sparse_probing_auc": 0.757,
        "sparse_probing_auc_by_k": {"1": 0.651, "2": 0.716, "5": 0.819, "20": 0.844},
        "sparse_probing_auc_residual": 0.725,
        "sparse_probing_auc_residual_full": 0.874,
        "absorption": 0.505,
        "absorption_centered": 0.349,
        "detection_auroc": 0.679,
        "detection_auroc_shuffled": 0.489,
        "spliced_loss": 4.379,
        "loss_clean": 4.13,
        "loss_recovered": 0.979,
        "loss_recovered_vs_mean": 0.962,
    }
    path = tmp_path / "with_real.json"
    path.write_text(json.dumps({**fig, "real": {"default": real, "other": {**real, "absorption": None}}}))
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark_table.py"), f"sae_quality={path}"],
        check=True,
        capture_output=True,
        text=True,
    )
    row = next(ln for ln in r.stdout.splitlines() if ln.startswith("| default |"))
    assert "0.757 (0.651 / 0.716 / 0.819 / 0.844) | 0.725 / 0.874 | 0.505 (0.349) | 0.679 (0.489)" in row
    assert "4.379 (4.130; 98% / 96%)" in row
    assert "| n/a (0.349) |" in next(ln for ln in r.stdout.splitlines() if ln.startswith("| other |"))


def test_quality_only_leaves_the_speed_table_alone_and_renders_every_run(tiny_run, tmp_path):
    fig, path = tiny_run
    readme = tmp_path / "README.md"
    readme.write_text(
        "<!-- benchmark-table:start -->\nspeed rows\n<!-- benchmark-table:end -->\n"
        "<!-- quality-table:start -->\nold\n<!-- quality-table:end -->\n"
    )
    script = str(ROOT / "scripts" / "benchmark_table.py")
    args = [sys.executable, script, f"sae_quality={path}", f"sae_quality={path}", "--readme", str(readme)]
    subprocess.run([*args, "--quality-only"], check=True)
    text = readme.read_text()
    assert "speed rows" in text and "\nold\n" not in text
    assert text.count("| data | contender | F1 |") == 2
    (tmp_path / "bare.md").write_text("no markers\n")
    r = subprocess.run([*args[:-1], str(tmp_path / "bare.md"), "--quality-only"], capture_output=True, text=True)
    assert r.returncode == 2 and "markers" in r.stderr


def _row(f1: float, grid: dict[float, float], chosen: float) -> dict:
    """A contender's row as best_front writes it: test figures at the chosen lr and every lr's validation F1."""
    return {
        "f1": f1,
        "explained_variance": 0.7,
        "lr": chosen * 1e-3,
        "lr_multiplier": chosen,
        "lr_grid": [{"lr_multiplier": m, "lr": m * 1e-3, "val_f1_at_l0": v, "sane": True} for m, v in grid.items()],
    }


def _run(grid: str, rows: dict, **extra) -> dict:
    sizes = {"n_true": 64, "d_model": 8, "grid": grid}
    return {"sizes": sizes, "data": {"synthetic": {"seed": 0}}, "synthetic": rows, "wall_seconds": 1.0, **extra}


def test_merge_keeps_each_contenders_best_lr_across_runs():
    a = _run(
        "1,4",
        {
            "thoughtscope-batchtopk": _row(0.5, {1: 0.40, 4: 0.50}, 4),
            "saelens-batchtopk": _row(0.6, {1: 0.55, 4: 0.61}, 4),
        },
        real={"default": {"spliced_loss": 4.0}},
    )
    b = _run(
        "16",
        {
            "thoughtscope-batchtopk": _row(0.7, {16: 0.66}, 16),  # the wider grid wins for ours
            "saelens-batchtopk": _row(0.3, {16: 0.30}, 16),  # and loses for theirs
            "thoughtscope-matryoshka": _row(0.8, {16: 0.79}, 16),
        },
        skipped={"insane": {"sparsify-topk": "diverged"}},
    )
    fig = sae_quality.merge([a, b], ["a.json", "b.json"])
    rows = fig["synthetic"]
    assert rows["thoughtscope-batchtopk"]["f1"] == 0.7 and rows["thoughtscope-batchtopk"]["lr_multiplier"] == 16
    assert rows["saelens-batchtopk"]["f1"] == 0.6 and rows["saelens-batchtopk"]["lr_multiplier"] == 4
    assert [g["lr_multiplier"] for g in rows["saelens-batchtopk"]["lr_grid"]] == [1, 4, 16]
    assert fig["sizes"]["grid"] == "1,4,16" and fig["real"] == a["real"] and fig["wall_seconds"] == 2.0
    assert fig["skipped"] == {"insane": {"sparsify-topk": "diverged"}}  # what a later run left out is kept
    assert fig["f1_ours_best_vs_saelens_best"] == pytest.approx(0.8 / 0.6)
    assert fig["matryoshka_minus_batchtopk_f1"] == pytest.approx(0.1)


def test_merge_with_replace_takes_a_rerun_contender_from_the_later_run_only(tmp_path):
    a = _run(
        "1,4",
        {
            "thoughtscope-matryoshka": _row(0.7, {1: 0.60, 4: 0.70}, 4),  # before a change to its code
            "saelens-matryoshka_batchtopk": _row(0.71, {1: 0.6, 4: 0.71}, 4),
        },
        real={"default": {"spliced_loss": 4.0}},
    )
    b = _run("1,16", {"thoughtscope-matryoshka": _row(0.65, {1: 0.62, 16: 0.64}, 16)})  # after it: lower
    plain = sae_quality.merge([a, b], ["a.json", "b.json"])
    assert plain["synthetic"]["thoughtscope-matryoshka"]["f1"] == 0.7  # the best of both: not what ships
    fig = sae_quality.merge([a, b], ["a.json", "b.json"], replace=True)
    rows = fig["synthetic"]
    assert rows["thoughtscope-matryoshka"]["f1"] == 0.65
    assert [g["lr_multiplier"] for g in rows["thoughtscope-matryoshka"]["lr_grid"]] == [1, 16]
    assert rows["saelens-matryoshka_batchtopk"]["f1"] == 0.71 and fig["real"] == a["real"]
    assert fig["replaced"] == {"thoughtscope-matryoshka": "b.json"} and fig["sizes"]["grid"] == "1,4,16"
    assert fig["f1_ours_best_vs_saelens_best"] == pytest.approx(0.65 / 0.71)
    with pytest.raises(SystemExit):  # --replace means nothing without --merge
        sae_quality.main(["--replace", "--json", str(tmp_path / "x.json")])


def test_seeds_retrain_the_headline_points_and_merge_beside_the_grid_search(tmp_path):
    """--seeds re-trains the points the L0 figures are read from with other weight seeds (same data): the first seed's
    figures stay the row's, the mean joins them; a seeds-only run at the chosen lr merges into the grid search's row,
    and the best-against-best ratio is given on the seed means too."""
    out = tmp_path / "seeds.json"
    args = [*TINY, "--targets", "6", "--no-saelens-gen", "--contenders", "thoughtscope-batchtopk,saelens-batchtopk"]
    fig = sae_quality.main([*args, "--seeds", "3", "--json", str(out)])
    plain = sae_quality.main(args)
    for name, row in fig["synthetic"].items():
        assert row["seeds"] == [0, 1, 2] and len(row["f1_by_seed"]) == 3
        assert row["f1_by_seed"][0] == row["f1"] == plain["synthetic"][name]["f1"]  # seed 0 is the plain run
        assert len(set(row["f1_by_seed"])) > 1  # other initial weights, other dictionaries
        assert row["f1_seed_mean"] == pytest.approx(sum(row["f1_by_seed"]) / 3)
        assert row["f1_seed_sd"] > 0
    ours, theirs = fig["synthetic"]["thoughtscope-batchtopk"], fig["synthetic"]["saelens-batchtopk"]
    if fig["f1_ours_best_vs_saelens_best"] is not None:
        want = ours["f1_seed_mean"] / theirs["f1_seed_mean"]
        assert fig["f1_ours_best_vs_saelens_best_seed_mean"] == pytest.approx(want)
    merged = sae_quality.merge([plain, fig], ["grid.json", "seeds.json"])
    for name in fig["synthetic"]:
        assert merged["synthetic"][name]["f1_by_seed"] == fig["synthetic"][name]["f1_by_seed"]
    table = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark_table.py"), f"sae_quality={out}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    mean = fig["synthetic"]["saelens-batchtopk"]["f1_seed_mean"]
    assert f"(mean of 3 seeds {mean:.3f} ± " in table
    at16 = {
        n: {**r, "lr_multiplier": 16, "lr_grid": [{**g, "lr_multiplier": 16} for g in r["lr_grid"]]}
        for n, r in fig["synthetic"].items()
    }
    moved = {**fig, "synthetic": at16}
    apart = sae_quality.merge([plain, moved], ["grid.json", "other.json"])  # seeds of another lr are not lent
    assert all(r["lr_multiplier"] == 16 or "f1_by_seed" not in r for r in apart["synthetic"].values())


def test_merge_refuses_runs_of_other_data_or_a_section_twice():
    a = _run("1", {"thoughtscope-topk": _row(0.5, {1: 0.5}, 1)}, real={"x": {}})
    other = {**_run("4", {}), "sizes": {"n_true": 128, "d_model": 8, "grid": "4"}}
    with pytest.raises(sae_quality.MergeError, match="only the grid may differ"):
        sae_quality.merge([a, other], ["a.json", "other.json"])
    with pytest.raises(sae_quality.MergeError, match="real is in both"):
        sae_quality.merge([a, a], ["a.json", "again.json"])


def test_an_insane_contender_fails_the_run_but_keeps_the_others_figures(tmp_path, monkeypatch):
    def two(d, m, *, batch_size, n_steps, seed=0, ours_changed=None):
        kw = {"batch_size": batch_size, "n_steps": n_steps, "seed": seed}
        mean = _MeanPredictor("topk", d, m, **kw)
        mean.tool = "meanpredictor"
        return [Ours("topk", d, m, **kw), mean], {}

    monkeypatch.setattr(sae_quality, "all_contenders", two)
    out = tmp_path / "q.json"
    with pytest.raises(InsaneContender, match="meanpredictor-topk.*the other figures are written"):
        sae_quality.main([*TINY, "--grid", "4", "--targets", "6", "--no-saelens-gen", "--json", str(out)])
    fig = json.loads(out.read_text())
    assert set(fig["synthetic"]) == {"thoughtscope-topk"} and fig["synthetic"]["thoughtscope-topk"]["f1"] > 0
    assert "no better than predicting the mean" in fig["skipped"]["insane"]["meanpredictor-topk"]


def test_merge_on_the_command_line_names_a_bad_file(tmp_path, capsys):
    good = tmp_path / "a.json"
    good.write_text(json.dumps(_run("1", {"thoughtscope-topk": _row(0.5, {1: 0.5}, 1)})))
    other = tmp_path / "b.json"
    other.write_text(json.dumps({"generator": "something else"}))
    for files, said in (
        ([good, tmp_path / "missing.json"], "missing.json"),
        ([good, other], "not the --json output of sae_quality.py"),
    ):
        with pytest.raises(SystemExit) as e:
            sae_quality.main(["--merge", *map(str, files)])
        assert e.value.code == 2 and said in capsys.readouterr().err


def test_ours_setting_trains_our_contenders_with_a_changed_default_and_records_it(tmp_path):
    changed = {"b_dec_init": "zero", "decay_frac": 0.0}
    tiny = [*TINY, "--contenders", "thoughtscope-topk", "--no-saelens-gen"]
    fig = sae_quality.main([*tiny, "--ours-setting", "b_dec_init=zero", "--ours-setting", "decay_frac=0"])
    plain = sae_quality.main(tiny)
    row, base = fig["synthetic"]["thoughtscope-topk"], plain["synthetic"]["thoughtscope-topk"]
    assert row["settings"]["changed_from_defaults"] == changed and "changed_from_defaults" not in base["settings"]
    assert row["explained_variance"] != base["explained_variance"]  # trained differently, not only labelled
    ours = Ours("topk", 32, 64, changed={"k_aux": 8, "grad_clip": 0.5}, batch_size=64, n_steps=4)
    assert ours.config(6).k_aux == 8 and ours.train_changed == {"grad_clip": 0.5}
    assert fig["ours_changed_from_defaults"] == changed and "ours_changed_from_defaults" not in plain
    for bad in ("colour=red", "n_features=12", "decay_frac=soon", "b_dec_init"):
        with pytest.raises(SystemExit):
            sae_quality.main([*tiny, "--json", str(tmp_path / "bad.json"), "--ours-setting", bad])
        assert not (tmp_path / "bad.json").exists()
