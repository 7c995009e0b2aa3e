"""Benchmark harness on a tiny model: the data builder (cached store, exclusion rule, document split) and the race's
rules (one FVU definition, the sanity rule that rejects a contender no better than the mean, turn-taking)."""

import json

import _data
import pytest
import torch
from _contenders import Ours
from _race import Curve, InsaneContender, check_sane, evaluate, run_turns

from thoughtscope.corpus import Corpus
from thoughtscope.models import tiny_model
from thoughtscope.store import StoreWriter

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = [{"text": f"Document {i}: the fox {i} jumps over {i * 7} lazy dogs. " * (2 + i % 4)} for i in range(300)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    corpus.write_text("\n".join(json.dumps(d) for d in DOCS))
    return tiny_model("llama", n_layers=2, d_model=32), Corpus(str(corpus))


def test_store_is_built_once_under_the_given_home_and_reused(tiny, tmp_path, monkeypatch):
    lm, corpus = tiny
    monkeypatch.setenv("THOUGHTSCOPE_HOME", str(tmp_path / "home"))
    assert _data.bench_home() == tmp_path / "home" / "bench"
    st = _data.ensure_store(4096, site="resid.1", lm=lm, corpus=corpus, ctx_len=16, batch_size=4, progress=False)
    assert st.complete and len(st) == 4096 and st.path.is_relative_to(tmp_path / "home" / "bench")
    # a second call reuses the finished store without a model (no harvest, same files)
    again = _data.ensure_store(4096, site="resid.1", model=lm.name, ctx_len=16, progress=False)
    assert again.path == st.path and again.manifest["shards"] == st.manifest["shards"]


def test_rows_follow_the_product_rule_and_split_at_documents(tiny, tmp_path):
    lm, corpus = tiny
    st = _data.ensure_store(
        8192, site="resid.1", lm=lm, corpus=corpus, ctx_len=16, batch_size=4, root=tmp_path, progress=False
    )
    rows = _data.split_rows(st)
    acts, meta = st.tokens(with_meta=True)
    norms = acts.float().norm(dim=1)
    keep = (meta["position"] != 0) & (norms <= 10 * st.median_norm)
    want = acts[keep].float()
    got = torch.cat([rows.train, rows.val, rows.test])
    assert torch.equal(got, want) and rows.info["excluded_rows"] == int((~keep).sum())
    docs = meta["doc_id"][keep]
    a, b = rows.train.shape[0], rows.train.shape[0] + rows.val.shape[0]
    split_docs = [set(docs[:a].tolist()), set(docs[a:b].tolist()), set(docs[b:].tolist())]
    assert all(s for s in split_docs)
    assert not (split_docs[0] & split_docs[1] or split_docs[1] & split_docs[2] or split_docs[0] & split_docs[2])


def test_outlier_rows_are_excluded(tmp_path):
    g = torch.Generator().manual_seed(0)
    n, d = 512, 8
    acts = torch.randn(n, d, generator=g)
    acts[::16] *= 1000  # position 0 of every 16-token context: a sink
    acts[7] *= 50  # a sink elsewhere (norm far above 10x the median)
    meta = {
        "doc_id": torch.arange(n) // 40,
        "position": torch.arange(n) % 16,
        "token_id": torch.zeros(n, dtype=torch.long),
    }
    w = StoreWriter(tmp_path / "s", model="m", site="resid.0", d_model=d, shard_tokens=128)
    w.add(acts, meta)
    rows = _data.split_rows(w.finish())
    kept = torch.cat([rows.train, rows.val, rows.test])
    assert kept.shape[0] == n - n // 16 - 1
    assert float(kept.norm(dim=1).max()) < 10 * float(acts.norm(dim=1).median())


def test_batches_are_the_same_sequence_for_everyone(tmp_path):
    train = torch.randn(100, 4)
    a, b = _data.ShuffledBatches(train, 32, 7, seed=3), _data.ShuffledBatches(train, 32, 7, seed=3)
    assert len(a) == 7 and a.epochs == pytest.approx(7 * 32 / 100)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    first_epoch = torch.cat([a[i] for i in range(3)])
    assert torch.unique(first_epoch, dim=0).shape[0] == 96  # an epoch never repeats a row


def test_sanity_rule_rejects_a_contender_that_outputs_the_mean(tiny, tmp_path):
    lm, corpus = tiny
    st = _data.ensure_store(
        8192, site="resid.1", lm=lm, corpus=corpus, ctx_len=16, batch_size=4, root=tmp_path, progress=False
    )
    rows = _data.split_rows(st)
    batches = _data.ShuffledBatches(rows.train, 256, 12)
    c = Ours("topk", 32, 64, k=4, batch_size=256, n_steps=12)
    _, baton = run_turns({"thoughtscope": lambda bt: c.fit(bt.feed("thoughtscope", batches), 3e-3)})
    assert len(baton.segments["thoughtscope"]) == 12 and baton.busy["thoughtscope"] > 0
    trained = evaluate(c.current(), rows.test)
    assert trained["fvu"] < 1 and trained["l0"] == pytest.approx(4, abs=0.5)
    check_sane("thoughtscope", trained)

    with torch.no_grad():  # the same contender forced to predict the training mean for every row
        c.final.W_dec.zero_()
        c.final.b_dec.copy_(rows.train.mean(0))
    forced = evaluate(c.current(), rows.test)
    assert forced["fvu"] >= 1
    with pytest.raises(InsaneContender, match="no better than predicting the mean"):
        check_sane("thoughtscope", forced)
    with pytest.raises(InsaneContender, match="dead share"):
        check_sane("x", {"fvu": 0.5, "dead_frac": 0.6})


def test_curve_time_to_reach():
    c = Curve()
    for step, sec, fvu in ((1, 1.0, 0.9), (2, 2.0, 0.5), (3, 3.0, 0.3)):
        c.add(step, sec, fvu)
    assert c.seconds_to_reach(0.7) == pytest.approx(1.5)
    assert c.seconds_to_reach(0.1) is None
    assert c.fvu_at_seconds(2.5) == pytest.approx(0.4) and c.fvu_at_seconds(0.5) is None


def test_soak_quick_path_runs_on_a_fresh_tiny_workbench(tmp_path):
    """benchmarks/soak.py --quick (shortened here): the real server on loopback under the mixed load writes every
    figure, sees no 5xx, and every stream the client left mid-way was stopped by the server."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(script), "--quick", "--seconds", "4", "--concurrency", "4", "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    for key in ("requests", "errors_5xx", "p50_ms", "p99_ms", "rss_growth_mb", "streams_cancelled_cleanly"):
        assert key in res, key
    assert res["requests"] > 20 and res["errors_5xx"] == 0 and res["errors"] == 0, res["first_errors"]
    assert res["streams_cancelled"] > 0 and res["streams_cancelled_cleanly"] == res["streams_cancelled"]
    assert res["generation_threads_left"] == 0 and res["model_jobs_left"] == 0
    assert 0 < res["p50_ms"] <= res["p99_ms"]


@pytest.mark.slow
def test_choices_benchmark_trains_each_way_on_the_same_rows(tmp_path, monkeypatch):
    """benchmarks/sae_choices.py end to end on a small store of the embedded model (harvested here): its default
    choice (decoder norms) and a TrainConfig one."""
    import sae_choices

    monkeypatch.setattr(_data, "bench_home", lambda: tmp_path / "bench")  # a store of its own, the shared corpus
    out = tmp_path / "dn.json"
    args = [
        "--store-tokens",
        "8192",
        "--expansion",
        "2",
        "--batch-size",
        "256",
        "--steps",
        "12",
        "--loss-tokens",
        "256",
    ]
    fig = sae_choices.main([*args, "--json", str(out)])
    assert json.loads(out.read_text())["fvu_free_minus_unit"] == pytest.approx(fig["fvu_free_minus_unit"])
    free, unit = fig["real"]["free"], fig["real"]["unit"]
    for r in (free, unit):
        assert 0 < r["fvu"] < 1 and r["l0"] == pytest.approx(32) and r["spliced_loss"] > r["loss_clean"]
    assert free["fvu"] != unit["fvu"]  # two different trainings, not one reported twice
    assert fig["fvu_free_minus_unit"] == pytest.approx(free["fvu"] - unit["fvu"])
    # a TrainConfig choice, three ways (a bare "mean" is also a reference condition's name in the spliced loss);
    # zero would fail the sanity rule here: 12 steps cannot move b_dec to the residual stream's offset
    fig = sae_choices.main([*args, "--choice", "b_dec_init=mean,geometric_median", "--k", "16"])
    assert fig["choice"] == "b_dec_init" and set(fig["real"]) == {"mean", "geometric_median"}
    mean, median = fig["real"]["mean"], fig["real"]["geometric_median"]
    assert mean["l0"] == pytest.approx(16) and mean["fvu"] != median["fvu"]
    gap = mean["spliced_loss"] - median["spliced_loss"]
    assert fig["spliced_loss_mean_minus_geometric_median"] == pytest.approx(gap)


def test_choices_benchmark_refuses_a_choice_it_cannot_make():
    import sae_choices

    for bad in ("decoder_norm", "decoder_norm=free", "colour=red,blue", "n_features=8,16", "decay_frac=0.2,none"):
        with pytest.raises(SystemExit, match="--choice"):
            sae_choices.parse_choice(bad)
    assert sae_choices.parse_choice("decay_frac=0.2,0") == ("decay_frac", "train", [0.2, 0.0])
    assert sae_choices.parse_choice("k_aux=64,128") == ("k_aux", "sae", [64, 128])
