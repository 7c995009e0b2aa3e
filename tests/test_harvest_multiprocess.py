"""`torchrun --nproc_per_node 2 -m thoughtscope harvest ...` (2 gloo processes) writes the store one process writes,
byte for byte, and resumes a store left unfinished."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from thoughtscope.corpus import Corpus
from thoughtscope.harvest import HarvestConfig, harvest
from thoughtscope.models import load_model, tiny_model
from thoughtscope.store import ActivationStore

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "\n\n\n".join(
    f"Document {i}: the quick brown fox {i} jumps over {i * 13} lazy dogs. " * (1 + i % 5) for i in range(500)
)
TOKENS, CTX, BATCH, SHARD = 3000, 16, 4, 256  # 3000 is not a whole number of batches: the last round is partial


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    lm = tiny_model("llama", n_layers=3, d_model=32)
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    (root / "docs.txt").write_text(TEXT)
    return root


def _single(root: Path, out: Path, sites, on_shard=None):
    lm = load_model(str(root / "model"))
    cfg = HarvestConfig(n_tokens=TOKENS, ctx_len=CTX, contexts_per_batch=BATCH, shard_tokens=SHARD)
    return harvest(lm, Corpus(str(root / "docs.txt")), sites, out, cfg, progress=False, on_shard=on_shard)


def _torchrun(root: Path, out: Path, sites: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "thoughtscope",
        "harvest",
        "--model",
        str(root / "model"),
        "--corpus",
        str(root / "docs.txt"),
        "--site",
        sites,
        "--tokens",
        str(TOKENS),
        "--out",
        str(out),
        "--ctx-len",
        str(CTX),
        "--contexts-per-batch",
        str(BATCH),
        "--shard-tokens",
        str(SHARD),
        "--quiet",
    ]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _files(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file() and p.suffix == ".npy"}


def test_two_processes_write_the_single_process_store(setup, tmp_path):
    ref = _single(setup, tmp_path / "one", ["resid.0", "resid.2"])
    _torchrun(setup, tmp_path / "two", "resid.0,resid.2")
    for site in ("resid.0", "resid.2"):
        a, b = ActivationStore.open(tmp_path / "one" / site), ActivationStore.open(tmp_path / "two" / site)
        assert b.complete and len(a) == len(b) == TOKENS
        assert a.manifest["shards"] == b.manifest["shards"]  # same files, same sha256
        assert _files(tmp_path / "one" / site) == _files(tmp_path / "two" / site)
        assert a.stats == b.stats
    assert len(ref) == 2


def test_two_processes_resume_an_unfinished_store(setup, tmp_path):
    _single(setup, tmp_path / "ref", ["resid.1"])

    class Stop(Exception):
        pass

    def stop_after_three(tokens_done):
        if tokens_done >= 3 * SHARD:
            raise Stop

    with pytest.raises(Stop):
        _single(setup, tmp_path / "partial", ["resid.1"], on_shard=stop_after_three)
    partial = ActivationStore.open(tmp_path / "partial")
    assert not partial.complete and len(partial) == 3 * SHARD
    _torchrun(setup, tmp_path / "partial", "resid.1")
    a, b = ActivationStore.open(tmp_path / "ref"), ActivationStore.open(tmp_path / "partial")
    assert b.complete and a.manifest["shards"] == b.manifest["shards"]
    assert _files(tmp_path / "ref") == _files(tmp_path / "partial")
    # a third run (2 processes) returns the finished store untouched
    _torchrun(setup, tmp_path / "partial", "resid.1")
    assert _files(tmp_path / "partial") == _files(tmp_path / "ref")
