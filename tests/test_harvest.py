"""Harvesting a tiny model into a store: correct rows, resumable after SIGKILL, clear errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from thoughtscope.corpus import Corpus
from thoughtscope.harvest import HarvestConfig, harvest
from thoughtscope.models import Site, capture, load_model, tiny_model
from thoughtscope.store import ActivationStore

TEXT = "\n\n\n".join(
    f"Document {i}: the quick brown fox {i} jumps over the lazy dog; numbers {i * 7} and {i * 13}. " * (1 + i % 5)
    for i in range(400)
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    lm = tiny_model("llama", n_layers=3, d_model=32)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text(TEXT)
    return path


def test_harvest_rows_match_capture(model_dir, corpus_file, tmp_path):
    lm = load_model(str(model_dir))
    cfg = HarvestConfig(n_tokens=1000, ctx_len=16, contexts_per_batch=4, shard_tokens=128)
    stores = harvest(lm, Corpus(str(corpus_file)), ["resid.0", "resid.2"], tmp_path / "acts", cfg, progress=False)
    assert set(stores) == {Site(0), Site(2)}
    st = stores[Site(2)]
    assert len(st) == 1000 and st.d_model == 32 and st.manifest["site"] == "resid.2"
    assert (tmp_path / "acts" / "resid.0" / "manifest.json").is_file()
    first = next(Corpus(str(corpus_file)).batches(lm.tokenizer, 16, 4))
    want = capture(lm, ["resid.2"], first.input_ids)[Site(2)].reshape(-1, 32)
    got = st.tokens(0, 64)
    acts, meta = got if isinstance(got, tuple) else (got, None)
    torch.testing.assert_close(acts.float(), want, rtol=0, atol=0)
    if meta is not None:
        assert meta["token_id"].long().tolist() == first.input_ids.reshape(-1).tolist()
        assert meta["position"].long().tolist() == list(range(16)) * 4


def _cli(model_dir, corpus_file, out, tokens):
    return [
        sys.executable,
        "-m",
        "thoughtscope.cli",
        "harvest",
        "--model",
        str(model_dir),
        "--corpus",
        str(corpus_file),
        "--site",
        "resid.1",
        "--tokens",
        str(tokens),
        "--out",
        str(out),
        "--ctx-len",
        "16",
        "--contexts-per-batch",
        "4",
        "--shard-tokens",
        "256",
        "--quiet",
    ]


def _shard_bytes(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file() and p.name != "manifest.json"}


def test_resume_after_sigkill_is_identical(model_dir, corpus_file, tmp_path):
    tokens = 30_000
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    lm = load_model(str(model_dir))
    cfg = HarvestConfig(n_tokens=tokens, ctx_len=16, contexts_per_batch=4, shard_tokens=256)
    harvest(lm, Corpus(str(corpus_file)), ["resid.1"], ref, cfg, progress=False)

    proc = subprocess.Popen(
        _cli(model_dir, corpus_file, killed, tokens), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    shards = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            shards = len(json.loads((killed / "manifest.json").read_text())["shards"])
        except (OSError, ValueError, KeyError):
            shards = 0
        if shards >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the harvest finished before it could be killed"
    partial = json.loads((killed / "manifest.json").read_text())
    assert not partial.get("complete") and 0 < len(partial["shards"]) < tokens // 256

    # the same harvest again resumes where the killed one stopped
    harvest(lm, Corpus(str(corpus_file)), ["resid.1"], killed, cfg, progress=False)
    a, b = ActivationStore.open(ref), ActivationStore.open(killed)
    assert len(a) == len(b) == tokens
    assert _shard_bytes(ref) == _shard_bytes(killed)
    assert a.manifest["shards"] == b.manifest["shards"]
    # running it a third time returns the finished store untouched
    again = harvest(lm, Corpus(str(corpus_file)), ["resid.1"], killed, cfg, progress=False)
    assert len(again[Site(1)]) == tokens and _shard_bytes(killed) == _shard_bytes(ref)


def test_harvest_errors(model_dir, corpus_file, tmp_path):
    lm = load_model(str(model_dir))
    with pytest.raises(ValueError, match="beyond"):
        harvest(lm, Corpus(str(corpus_file)), ["resid.9"], tmp_path / "a", HarvestConfig(n_tokens=10), progress=False)
    with pytest.raises(
        ValueError, match="shard_tokens must be None or a positive multiple of contexts_per_batch × ctx_len = 64"
    ):
        harvest(
            lm,
            Corpus(str(corpus_file)),
            ["resid.0"],
            tmp_path / "b",
            HarvestConfig(n_tokens=10, ctx_len=16, contexts_per_batch=4, shard_tokens=100),
            progress=False,
        )
    with pytest.raises(ValueError, match="context window"):
        harvest(
            lm,
            Corpus(str(corpus_file)),
            ["resid.0"],
            tmp_path / "c",
            HarvestConfig(n_tokens=10, ctx_len=100_000),
            progress=False,
        )
    with pytest.raises(ValueError, match="HarvestConfig.dtype must be one of float32, float16, bfloat16, got 'int8'"):
        harvest(lm, Corpus(str(corpus_file)), ["resid.0"], tmp_path / "d", HarvestConfig(dtype="int8"), progress=False)


def test_cli_reports_bad_site(model_dir, corpus_file, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "thoughtscope.cli",
            "harvest",
            "--model",
            str(model_dir),
            "--corpus",
            str(corpus_file),
            "--site",
            "mlp.x",
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "cannot parse site 'mlp.x'" in r.stderr


@pytest.mark.slow
def test_harvest_default_model(tmp_path):
    lm = load_model("default")
    st = harvest(
        lm,
        Corpus("default"),
        ["resid.15"],
        tmp_path / "acts",
        HarvestConfig(n_tokens=512, ctx_len=64, contexts_per_batch=4),
        progress=False,
    )[Site(15)]
    assert len(st) == 512 and st.d_model == 576


def test_skip_tokens_starts_later_in_the_corpus(model_dir, corpus_file, tmp_path):
    lm = load_model(str(model_dir))
    full = harvest(
        lm,
        Corpus(str(corpus_file)),
        ["resid.0"],
        tmp_path / "full",
        HarvestConfig(n_tokens=256, ctx_len=16, contexts_per_batch=4),
        progress=False,
    )[Site(0)]
    later = harvest(
        lm,
        Corpus(str(corpus_file)),
        ["resid.0"],
        tmp_path / "later",
        HarvestConfig(n_tokens=128, ctx_len=16, contexts_per_batch=4, skip_tokens=128),
        progress=False,
    )[Site(0)]
    assert torch.equal(full.tokens(128, 256), later.tokens(0, 128))
    with pytest.raises(ValueError, match="HarvestConfig.skip_tokens must be a non-negative multiple"):
        HarvestConfig(ctx_len=16, contexts_per_batch=4, skip_tokens=100).validate()


def test_streamed_activations_are_the_harvested_rows_shuffled_and_resumable(model_dir, corpus_file, tmp_path):
    from thoughtscope.harvest import stream_activations

    lm = load_model(str(model_dir))
    st = harvest(
        lm,
        Corpus(str(corpus_file)),
        ["resid.1"],
        tmp_path / "acts",
        HarvestConfig(n_tokens=480, ctx_len=16, contexts_per_batch=4),
        progress=False,
    )[Site(1)]
    stream = stream_activations(
        lm,
        Corpus(str(corpus_file)),
        "resid.1",
        n_tokens=450,
        batch_size=40,
        ctx_len=16,
        contexts_per_batch=4,
        buffer_tokens=100,
        seed=1,
    )
    got = list(stream(0))
    assert [b.shape for b in got] == [(40, 32)] * 11  # 450 non-BOS rows, the short last batch dropped
    # the same rows as the store minus position 0, in another order
    acts, meta = st.tokens(with_meta=True)
    want = acts[meta["position"] != 0].float()
    rows = torch.cat(got)
    assert not torch.equal(rows, want[:440])
    assert set(map(tuple, rows.tolist())) <= set(map(tuple, want.tolist()))
    # a resumed run skips exactly the batches it had already seen
    assert all(torch.equal(a, b) for a, b in zip(stream(4), got[4:]))


def test_the_old_batch_size_flag_still_sets_contexts_per_pass_with_a_warning(model_dir, corpus_file, tmp_path):
    """`harvest --batch-size` meant contexts per forward pass; it is hidden now, still works for one release, and
    warns; the visible flag is --contexts-per-batch (`--batch-size` means rows per optimiser step elsewhere)."""
    from typer.testing import CliRunner

    from thoughtscope.cli import app

    base = ["harvest", "--model", str(model_dir), "--corpus", str(corpus_file), "--site", "resid.1"]
    base += ["--tokens", "512", "--ctx-len", "16", "--quiet"]
    old = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "old"), "--batch-size", "4"])
    new = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "new"), "--contexts-per-batch", "4"])
    assert old.exit_code == 0 and new.exit_code == 0, (old.output, new.output)
    assert "--batch-size is deprecated" in old.output and "deprecated" not in new.output
    for name in ("old", "new"):
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        assert manifest["extra"]["batch_size"] == 4  # the store's key for contexts per pass (format v1)
    help_text = CliRunner().invoke(app, ["harvest", "--help"], env={"COLUMNS": "240"}).output
    assert "--contexts-per-batch" in help_text and "--batch-size" not in help_text
