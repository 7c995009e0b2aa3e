"""The plan before a long run (tiny models): its disk arithmetic matches what the run writes, its memory terms add
up, --plan writes nothing, a run over the available memory is refused unless forced; steer find keeps a budget."""

import math
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from thoughtscope import estimates
from thoughtscope.cli import app
from thoughtscope.corpus import Corpus
from thoughtscope.errors import HarvestError, ThoughtscopeError
from thoughtscope.estimates import Estimate, harvest_estimate, sae_estimate
from thoughtscope.harvest import harvest
from thoughtscope.models import load_model, tiny_model
from thoughtscope.plans import HarvestConfig
from thoughtscope.sae.config import TrainConfig
from thoughtscope.sae.run import train_grid
from thoughtscope.steer.find import FindConfig, Handle, _fit_budget, _worst_work, find_handle
from thoughtscope.steer.handles import Concept

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "\n\n\n".join(
    f"Document {i}: the quick brown fox {i} jumps over the lazy dog; numbers {i * 7} and {i * 13}. " * (1 + i % 5)
    for i in range(300)
)
GRID = dict(arch=["topk"], k=[4], expansion=[4], l1_coeff=[5.0], l0_coeff=[1.0])
runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    lm = tiny_model("llama", n_layers=3, d_model=32)
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    (root / "docs.txt").write_text(TEXT)
    return root


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _harvest_args(files, out, *extra):
    return [
        "harvest", "--model", str(files / "model"), "--site", "resid.1", "--corpus", str(files / "docs.txt"),
        "--tokens", "2048", "--ctx-len", "16", "--contexts-per-batch", "4", "--shard-tokens", "512",
        "--out", str(out), "--quiet", *extra,
    ]  # fmt: skip


def test_harvest_disk_estimate_is_what_harvest_writes_and_memory_terms_add_up(files, tmp_path):
    lm = load_model(str(files / "model"))
    cfg = HarvestConfig(n_tokens=3000, ctx_len=16, contexts_per_batch=4, shard_tokens=512)
    corpus = Corpus(str(files / "docs.txt"))
    est = harvest_estimate(lm, corpus, ["resid.0", "resid.2"], cfg, available=10**12)
    assert not any(tmp_path.iterdir())  # the probe ran in a temporary folder
    harvest(lm, corpus, ["resid.0", "resid.2"], tmp_path / "acts", cfg, progress=False)
    written = _bytes(tmp_path / "acts")
    assert abs(est.disk_bytes - written) / written < 0.03, (est.disk_bytes, written)
    # the acts alone: tokens × width × 4 bytes × sites is most of it
    assert est.disk_bytes > 3000 * 32 * 4 * 2
    assert est.memory_bytes == sum(est.memory.values())
    weights = sum(p.numel() * 4 for p in lm.model.parameters()) + sum(
        b.numel() * b.element_size() for b in lm.model.buffers()
    )
    assert est.memory["model weights"] == weights
    assert est.memory["store shards in flight"] == 2 * 2 * 512 * (32 * 4 + 20)
    # the probe's own peak RSS is inside the estimate: measured rest + the probe's terms
    assert est.memory_bytes >= estimates.peak_rss() * 0.5
    assert est.seconds > 0 and "forward batch" in est.timing
    assert est.to_dict()["memory_bytes"] == est.memory_bytes


def test_sae_estimate_counts_parameters_adam_and_the_folder_it_saves(files, tmp_path):
    lm = load_model(str(files / "model"))
    cfg = HarvestConfig(n_tokens=3000, ctx_len=16, contexts_per_batch=4, shard_tokens=512)
    harvest(lm, Corpus(str(files / "docs.txt")), ["resid.2"], tmp_path / "acts", cfg, progress=False)
    tc = TrainConfig(batch_size=256, n_tokens=2048, progress=False)
    est = sae_estimate(store=tmp_path / "acts", grid=GRID, train_cfg=tc, available=10**12)
    params = 2 * 128 * 32 + 128 + 32
    assert est.memory["SAE parameters"] == params * 4
    assert est.memory["Adam moments"] == 2 * params * 4
    assert est.memory_bytes == sum(est.memory.values())
    runs, _ = train_grid(tmp_path / "sae", store=tmp_path / "acts", grid=GRID, train_cfg=tc)
    assert sum(p.numel() for p in runs[0].sae.parameters()) == params
    folder = est.disk["SAE folder(s) (1)"]
    assert abs(folder - _bytes(tmp_path / "sae")) / _bytes(tmp_path / "sae") < 0.05
    assert "8 steps" in est.timing  # 2048 tokens / 256 rows per step
    # the held-out spliced loss after training loads the store's recorded model and times one batch of it
    with_loss = sae_estimate(store=tmp_path / "acts", grid=GRID, train_cfg=tc, loss_tokens=2048)
    assert "held-out spliced loss" in with_loss.timing and "× 2" in with_loss.timing
    assert with_loss.memory["model weights (loaded after training)"] > 0 and with_loss.seconds > est.seconds * 0.5
    on_the_fly = sae_estimate(
        model=str(files / "model"), site="resid.1", corpus=str(files / "docs.txt"), grid=GRID, train_cfg=tc, lm=lm
    )
    assert on_the_fly.memory["on-the-fly shuffle buffer"] == 65_536 * 32 * 4
    assert on_the_fly.memory["model weights"] > 0


def test_plan_writes_nothing_and_a_run_over_the_available_memory_is_refused_unless_forced(files, tmp_path, monkeypatch):
    out = tmp_path / "acts"
    r = runner.invoke(app, _harvest_args(files, out, "--plan"))
    assert r.exit_code == 0, r.output
    assert "plan for harvest" in r.output and "peak memory" in r.output
    assert not out.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setenv(estimates.ENV_AVAILABLE, "1M")
    r = runner.invoke(app, _harvest_args(files, out))
    assert r.exit_code == 2
    said = " ".join(r.output.split())  # the console wraps long lines
    assert "would need" in said and "1.0 MB is available" in said and "--force" in said
    assert not out.exists()
    r = runner.invoke(app, _harvest_args(files, out, "--force"))
    assert r.exit_code == 0, r.output
    assert (out / "manifest.json").is_file()


def test_check_and_available_memory():
    est = Estimate("harvest", {"a": 600, "b": 400}, {}, 1.0, "measured", available=999)
    assert est.memory_bytes == 1000 and not est.fits
    with pytest.raises(HarvestError, match="1000 B of memory.*999 B is available"):
        est.check()
    est.check(force=True)
    Estimate("harvest", {"a": 10}, {}, 1.0, "", available=10).check()


def test_available_memory_reads_the_override_and_refuses_a_bad_one(monkeypatch):
    monkeypatch.setenv(estimates.ENV_AVAILABLE, "2G")
    assert estimates.available_memory() == 2 * 1024**3
    monkeypatch.setenv(estimates.ENV_AVAILABLE, "512")
    assert estimates.available_memory() == 512
    monkeypatch.setenv(estimates.ENV_AVAILABLE, "lots")
    with pytest.raises(ThoughtscopeError, match="THOUGHTSCOPE_MEMORY_AVAILABLE"):
        estimates.available_memory()
    monkeypatch.delenv(estimates.ENV_AVAILABLE)
    assert estimates.available_memory() > 0


# ----------------------------------------------------------------------------- steer find's budget

QUESTIONS = ["hello there", "what is up", "tell me more", "how are you", "good day", "nice to see"]


def _handles() -> list[Handle]:
    def feature(f, rank):
        return Handle("feature", f"feature:{f}", "resid.1", [1.0, 2.0, 4.0, 8.0], feature=f, found_by=rank)

    return [
        *(feature(f, {"input_contrast": {"rank": f + 1}}) for f in range(4)),
        *(feature(10 + f, {"output_effect": {"rank": f + 1}}) for f in range(4)),
        *(Handle("caa", f"caa:{s}", s, [0.08, 0.12, 0.17, 0.24]) for s in ("resid.0", "resid.1")),
        Handle("logit", "logit:resid.1", "resid.1", [0.08, 0.12, 0.17, 0.24]),
    ]


def test_budget_cuts_least_harmful_first_until_the_search_fits():
    cfg, hs = FindConfig(), _handles()
    full = _worst_work(hs, QUESTIONS, cfg)
    rate = 0.01  # seconds per answer token
    kept_cfg, q, kept, cuts, predicted = _fit_budget(hs, QUESTIONS, cfg, rate * full * 10, rate)
    assert cuts == [] and kept_cfg == cfg and len(kept) == len(hs) and q == QUESTIONS
    one = _worst_work(hs, QUESTIONS, FindConfig(answers_per_question=1))
    assert full - one == _worst_work(hs, QUESTIONS, FindConfig(answers_per_question=3)) - full  # calibration's share
    kept_cfg, q, kept, cuts, predicted = _fit_budget(hs, QUESTIONS, cfg, rate * one, rate)
    assert cuts == ["1 answer per calibration question"] and kept_cfg.answers_per_question == 1
    no_pair = _worst_work(hs, QUESTIONS, FindConfig(pair_grid=(), answers_per_question=1))
    kept_cfg, q, kept, cuts, predicted = _fit_budget(hs, QUESTIONS, cfg, rate * no_pair, rate)
    assert cuts == ["1 answer per calibration question", "no CAA + logit pair"] and kept_cfg.pair_grid == ()
    assert predicted <= rate * no_pair
    budget = rate * full / 8
    kept_cfg, q, kept, cuts, predicted = _fit_budget(hs, QUESTIONS, cfg, budget, rate)
    assert predicted <= budget and math.isclose(predicted, rate * _worst_work(kept, q, kept_cfg))
    assert len(cuts) > 4 and "3-point screening grids" in cuts
    assert all(len(h.grid) <= 3 for h in kept)
    kept_cfg, q, kept, cuts, predicted = _fit_budget(hs, QUESTIONS, cfg, 1e-9, rate)
    assert "the budget cannot be kept" in cuts[-1] and kept_cfg.max_new_tokens == 16 and len(q) == 3
    assert len([h for h in kept if h.kind == "caa"]) == 1 and len(kept) == 4  # one of each kind and ranking


def test_budget_fits_a_per_generation_overhead_once_sizes_differ():
    from thoughtscope.steer.find import _Budget

    b = _Budget(1.0, time.perf_counter())
    b.measured(0.5 + 0.01 * 144, 144)
    assert b.per_call == 0 and math.isclose(b.rate, (0.5 + 1.44) / 144)  # one size: no overhead can be told apart
    b.measured(0.5 + 0.01 * 48, 48)
    assert math.isclose(b.rate, 0.01) and math.isclose(b.per_call, 0.5)
    assert math.isclose(b.seconds(100, 3), 1.0 + 1.5)
    assert b.describe()["seconds_per_generation"] == 0.5


def test_find_handle_keeps_a_budget_on_a_tiny_model():
    lm = tiny_model("llama", d_model=64, n_layers=2)
    concept = Concept("zebra", keywords=["zebra"], prompts=["a zebra ran", "zebra stripes"], controls=["a cat sat"])
    cfg = FindConfig(
        n_features=0, n_screen=2, screen_tokens=4, max_new_tokens=6, temperature=0.0, confirm_seeds=1,
        caa_sites=["resid.0", "resid.1"],
    )  # fmt: skip
    t = time.perf_counter()
    res = find_handle(lm, None, concept, questions=QUESTIONS, config=cfg, progress=False, minutes=1e-4)
    took = time.perf_counter() - t
    budget = res.config["budget"]
    assert budget["minutes"] == 1e-4 and budget["seconds_per_answer_token"] > 0
    assert budget["cuts"][0] == "no CAA + logit pair" and any("cannot be kept" in c for c in budget["cuts"])
    assert res.config["confirm_seeds"] == 0 and len(res.questions) == 2
    assert any(h["status"].startswith("not screened: cut") for h in res.handles)
    # a generous budget cuts nothing and runs the search as configured
    roomy = find_handle(lm, None, concept, questions=QUESTIONS, config=cfg, progress=False, minutes=60)
    assert roomy.config["budget"]["cuts"] == [] and roomy.config["confirm_seeds"] == 1
    assert took < 60 and torch.get_num_threads() >= 1


# ----------------------------------------------------------------------------- atlas build and NLA training
def test_atlas_plan_counts_the_reservoirs_and_writes_nothing(files, tmp_path):
    from thoughtscope.estimates import atlas_estimate
    from thoughtscope.plans import AtlasConfig
    from thoughtscope.sae import SAE, SAEConfig, save_sae

    sae = SAE.from_config(SAEConfig(arch="topk", d_model=32, n_features=64, k=4, site="resid.1"), seed=0)
    save_sae(sae, tmp_path / "sae")
    cfg = AtlasConfig(n_tokens=4096, ctx_len=16, contexts_per_batch=4)
    est = atlas_estimate(tmp_path / "sae", cfg, model=str(files / "model"), corpus=str(files / "docs.txt"))
    n_hist = len(cfg.hist_edges()) - 1
    per_feature = 20 + 8 * n_hist + cfg.top_k * (12 + 2 * cfg.window) + cfg.reservoir * (16 + 2 * cfg.window)
    assert est.memory["feature reservoirs and windows"] == 64 * per_feature
    assert est.memory["context token ids (2 copies at a checkpoint)"] == 2 * 4096 * 4
    assert est.memory_bytes == sum(est.memory.values()) and est.seconds > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # the probe's folder is gone
    out = tmp_path / "atlas"
    args = ["atlas", "build", "--sae", str(tmp_path / "sae"), "--model", str(files / "model"), "--corpus"]
    args += [str(files / "docs.txt"), "--tokens", "4096", "--ctx-len", "16", "--out", str(out), "--plan"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "plan for atlas build" in r.output and not out.exists()


def test_nla_plan_times_real_steps_in_a_copy_and_leaves_the_folder_alone(files, tmp_path):
    import json as _json

    from thoughtscope.estimates import nla_estimate
    from thoughtscope.nla.config import DataConfig
    from thoughtscope.nla.data import harvest_rows

    words = "alpha beta gamma delta apple river stone cloud music paper".split()
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text(
        "\n".join(_json.dumps({"text": " ".join(words[(i * 7 + j) % 10] for j in range(16))}) for i in range(40))
    )
    lm = load_model(str(files / "model"))
    data = DataConfig(corpus=str(corpus), site="resid.1", n_rows=40, positions_per_doc=1, max_position=70)
    harvest_rows(lm, data, progress=False).save(tmp_path / "rows")
    nla = tmp_path / "nla"
    est = nla_estimate(nla, tmp_path / "rows", "ar-sft", probe_s=1.0, steps=10, batch_size=4, eval_every=0)
    assert not nla.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "rows"]
    assert "step(s) of batch 4 measured" in est.timing and "× 10 steps" in est.timing
    assert est.disk_bytes > 0 and est.memory["NLA models (verbalizer and reconstructor)"] > 0
    assert est.memory_bytes == sum(est.memory.values())
