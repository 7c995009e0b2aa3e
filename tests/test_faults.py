"""Faults a user's machine throws at a job, on tiny models: a corpus that is not UTF-8, a full disk, a second process
writing the same folder. The rule each test holds a job to: one clear error naming the file (or lock) at fault, what
was there before left byte for byte, nothing half-written left behind, and the same command completing once the
cause is gone. SIGKILL at seeded points of the long jobs is in test_faults_slow.py.

A full disk is a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) in a child process: a write past it fails with
EFBIG exactly as a write to a full disk fails with ENOSPC. Faults injected here: unreadable corpora (3: harvest up
front, harvest mid-corpus, atlas build), 7 disk-full writes (harvest mid-store, atlas checkpoint, atlas database, SAE
save at the end of `sae train`, SAE save, preset save, vector save), 3 second writers (harvest, atlas build, SAE
train) and 1 failed atlas build's lock.
"""

from __future__ import annotations

import json
import queue
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import env_with_tests_on_path
from helpers.faults import PRELUDE, folder_bytes, run_child
from typer.testing import CliRunner

from thoughtscope.atlas import AtlasConfig, build_atlas
from thoughtscope.cli import app
from thoughtscope.corpus import Corpus
from thoughtscope.errors import AtlasError, CorpusError
from thoughtscope.harvest import HarvestConfig, harvest
from thoughtscope.models import LoadedModel, load_model, tiny_model
from thoughtscope.sae import SAE, SAEConfig, load_sae, save_sae
from thoughtscope.store import ActivationStore

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "\n\n\n".join(
    f"Document {i}: the quick brown fox {i} jumps over the lazy dog; numbers {i * 7} and {i * 13}. " * (1 + i % 4)
    for i in range(120)
)
TOKENS = 2048
# 64-token shards of float32 at d_model 32: an 8,320-byte acts file, while the manifest grows ~0.9 KB a shard, so a
# 9,000-byte limit lets the first shards in and fails the manifest of a later one (a disk filling up mid-harvest)
HARVEST_ARGS = ["--site", "resid.1", "--tokens", str(TOKENS), "--ctx-len", "16", "--contexts-per-batch", "4"]
HARVEST_ARGS += ["--shard-tokens", "64", "--quiet"]
HARVEST_CFG = HarvestConfig(n_tokens=TOKENS, ctx_len=16, contexts_per_batch=4, shard_tokens=64)
ATLAS_ARGS = ["--tokens", str(TOKENS), "--ctx-len", "16", "--contexts-per-batch", "4", "--quiet"]
SAE_ARGS = ["--tokens", "1024", "--batch-size", "64", "--expansion", "2", "--k", "4", "--arch", "topk"]
SAE_ARGS += ["--checkpoint-every", "4", "--quiet"]


@dataclass
class World:
    root: Path
    model: Path
    corpus: Path
    sae: Path
    store: Path
    lm: LoadedModel


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    """A tiny llama saved as a folder, a corpus, a random top-k SAE at resid.1 and a finished store (the reference
    harvest of HARVEST_CFG), as the CLI reads them."""
    root = tmp_path_factory.mktemp("faults")
    tiny = tiny_model("llama", n_layers=2, d_model=32)
    tiny.model.save_pretrained(root / "model")
    tiny.tokenizer.save_pretrained(root / "model")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT)
    lm = load_model(str(root / "model"))
    cfg = SAEConfig(arch="topk", d_model=32, n_features=64, k=4, model=lm.name, site="resid.1")
    save_sae(SAE.from_config(cfg, seed=0), root / "sae")
    harvest(lm, Corpus(str(corpus)), ["resid.1"], root / "store", HARVEST_CFG, progress=False)
    return World(root, root / "model", corpus, root / "sae", root / "store", lm)


def squash(text: str) -> str:
    """Text without whitespace: rich wraps a long error line (and folds a long path) at the console's width."""
    return "".join(text.split())


def invoke(*args) -> tuple[int, str]:
    """A command run as `thoughtscope` runs it (its output holds stdout and stderr)."""
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert "Traceback" not in output, output
    assert lines and lines[0].startswith("error:"), output
    return " ".join(lines)


# ----------------------------------------------------------------------------- a corpus that is not UTF-8


def test_a_corpus_that_is_not_utf8_leaves_no_store_and_no_atlas(world, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Ein schöner Tag am Meer, the sea.\n".encode("latin-1") * 40)
    for sites, out in ((["resid.1"], tmp_path / "one"), (["resid.0", "resid.1"], tmp_path / "two")):
        with pytest.raises(CorpusError, match="not valid UTF-8 at byte offset"):
            harvest(world.lm, Corpus(str(bad)), sites, out, HARVEST_CFG, progress=False)
        assert not out.exists()
    code, output = invoke("harvest", "--model", world.model, "--corpus", bad, "--out", tmp_path / "cli", *HARVEST_ARGS)
    assert code == 2 and squash("not valid UTF-8") in squash(one_error_line(output))
    assert not (tmp_path / "cli").exists()
    with pytest.raises(CorpusError, match="not valid UTF-8"):
        build_atlas(world.lm, load_sae(world.sae), Corpus(str(bad)), tmp_path / "atlas", AtlasConfig(n_tokens=256))
    assert not (tmp_path / "atlas").exists()


def test_a_bad_file_later_in_a_folder_corpus_leaves_no_empty_store(world, tmp_path):
    """The first file fills the first batch (so the up-front check passes); the second is not UTF-8 and fails the
    harvest before its first shard: the store this call created goes again, lock file and folder too."""
    folder = tmp_path / "docs"
    folder.mkdir()
    # more (short) documents than the corpus tokenises at once (256): the first batch comes before b.txt is read,
    # and all of them together are fewer tokens than the one shard
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": str(i)}) + "\n" for i in range(300)))
    (folder / "b.txt").write_bytes(b"valid start, then \xff\xfe bytes")
    out = tmp_path / "acts"
    cfg = HarvestConfig(n_tokens=TOKENS, ctx_len=16, contexts_per_batch=4, shard_tokens=TOKENS)  # one shard, at the end
    with pytest.raises(CorpusError, match="b.txt: not valid UTF-8"):
        harvest(world.lm, Corpus(str(folder)), ["resid.1"], out, cfg, progress=False)
    assert not out.exists()
    (folder / "b.txt").write_text("valid now " * 400)
    st = harvest(world.lm, Corpus(str(folder)), ["resid.1"], out, cfg, progress=False)
    assert next(iter(st.values())).complete  # and the lock of the failed call was let go at once


# ----------------------------------------------------------------------------- a full disk

# runs in the child: each case under its own file-size limit, the limit lifted again after it
DISK_FULL = r"""
import contextlib, io, json
from helpers.faults import set_fsize
from thoughtscope.cli import main
from thoughtscope.errors import ThoughtscopeError


def cli(argv, limit):
    err = io.StringIO()
    set_fsize(limit)
    try:
        with contextlib.redirect_stderr(err):
            main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    except BaseException as e:  # anything main() lets through would be a traceback: the test reports it
        code = f"uncaught {type(e).__name__}: {e}"
    finally:
        set_fsize(None)
    return {"code": code, "stderr": err.getvalue()}


def call(fn, limit):
    set_fsize(limit)
    try:
        fn()
        return {"error": None}
    except Exception as e:
        return {"error": type(e).__name__, "thoughtscope": isinstance(e, ThoughtscopeError), "message": str(e)}
    finally:
        set_fsize(None)


def full_from(module, name, limit, under=None):
    # the disk fills just as `module.name` starts writing (under `under` only, when given: the plan's probe writes
    # the same kind of file to a temporary folder first, on a disk that still has room)
    real = getattr(module, name)

    def wrapped(*a, **k):
        where = str(a[1] if len(a) > 1 else k.get("path", ""))
        if under is None or where.startswith(under):
            set_fsize(limit)
        return real(*a, **k)

    setattr(module, name, wrapped)
    return real
"""


def test_a_full_disk_gives_one_error_keeps_what_was_there_and_the_same_command_then_completes(world, tmp_path):
    from thoughtscope.steer.presets import Preset, PresetItem
    from thoughtscope.steer.vectors import SteeringVector

    # what is there before: a finished atlas, an SAE and a preset from earlier runs of the same commands
    atlas, atlas_db = tmp_path / "atlas", tmp_path / "atlas" / "atlas.sqlite"
    atlas_cmd = ["atlas", "build", "--sae", world.sae, "--model", world.model, "--corpus", world.corpus, *ATLAS_ARGS]
    assert invoke(*atlas_cmd, "--out", atlas)[0] == 0
    atlas_before = atlas_db.read_bytes()
    trained = tmp_path / "trained"
    sae_cmd = ["sae", "train", "--store", world.store, "--out", trained, *SAE_ARGS]
    assert invoke(*sae_cmd)[0] == 0
    trained_before = folder_bytes(trained)
    sae_dir = tmp_path / "sae"
    shutil.copytree(world.sae, sae_dir)
    sae_before = folder_bytes(sae_dir)
    new_sae = SAE.from_config(load_sae(world.sae).cfg, seed=1)
    preset_path = tmp_path / "p.json"
    item = dict(type="feature", op="clamp", site="resid.1", feature=3, sae=str(sae_dir), unit="max", max_act=1.0)
    Preset("old", [PresetItem(**item, strength=1.0)]).save(preset_path)
    preset_before = preset_path.read_bytes()
    vec_path = tmp_path / "v.safetensors"
    SteeringVector(torch.ones(32), "resid.1", method="test").save(vec_path)
    vec_before = vec_path.read_bytes()

    args = dict(
        harvest=["harvest", "--model", str(world.model), "--corpus", str(world.corpus), "--out", str(tmp_path / "acts")]
        + HARVEST_ARGS,
        atlas=[str(a) for a in (*atlas_cmd, "--out", atlas)],
        sae_train=[str(a) for a in sae_cmd],
        trained=str(trained),
        sae=str(sae_dir),
        sae_cfg=load_sae(world.sae).cfg.to_dict(),
        preset=str(preset_path),
        item=item,
        vector=str(vec_path),
    )
    code = (
        DISK_FULL
        + f"A = {args!r}\n"
        + r"""
import torch
import thoughtscope.atlas.build as build
import thoughtscope.sae.formats as formats
from thoughtscope.sae import SAE, SAEConfig, save_sae
from thoughtscope.steer.presets import Preset, PresetItem
from thoughtscope.steer.vectors import SteeringVector

out = {"harvest": cli(A["harvest"], 9000), "atlas_checkpoint": cli(A["atlas"], 4096)}
real = full_from(build, "write_db", 4096)
out["atlas_db"] = cli(A["atlas"], None)
build.write_db = real
real = full_from(formats, "save_sae", 4096, A["trained"])
out["sae_train"] = cli(A["sae_train"], None)
formats.save_sae = real
sae = SAE.from_config(SAEConfig.from_dict(A["sae_cfg"]), seed=1)
out["sae"] = call(lambda: save_sae(sae, A["sae"]), 4096)
out["preset"] = call(lambda: Preset("new", [PresetItem(**A["item"], strength=2.0)]).save(A["preset"]), 100)
out["vector"] = call(lambda: SteeringVector(torch.zeros(32), "resid.1", method="new").save(A["vector"]), 100)
print(json.dumps(out))
"""
    )
    child = run_child(code, tmp_path / "child")
    assert child.returncode == 0, child.stderr
    res = json.loads(child.stdout.strip().splitlines()[-1])

    # harvest: the disk fills after some shards; those stay committed and byte-identical to a clean harvest
    acts, ref = tmp_path / "acts", world.store
    assert res["harvest"]["code"] == 2, res["harvest"]
    line = one_error_line(res["harvest"]["stderr"])
    assert "could not write" in line and "manifest.json" in line and "the disk is full" in line
    partial = json.loads((acts / "manifest.json").read_text())
    committed = {f for sh in partial["shards"] for f in sh["files"].values()}
    assert 0 < len(partial["shards"]) < TOKENS // 64 and not partial["complete"]
    assert {p.name for p in acts.iterdir()} == committed | {"manifest.json", ".writer.lock"}  # no temp, no stray
    ref_files = folder_bytes(ref)
    assert all((acts / f).read_bytes() == ref_files[f] for f in committed)
    assert partial["shards"] == json.loads((ref / "manifest.json").read_text())["shards"][: len(partial["shards"])]
    # ... and the same command, with room again, finishes the very store a clean run writes
    assert invoke(*args["harvest"])[0] == 0
    done = {k: v for k, v in folder_bytes(acts).items() if k != "manifest.json"}
    assert done == {k: v for k, v in ref_files.items() if k != "manifest.json"}
    assert ActivationStore.open(acts).manifest["shards"] == ActivationStore.open(ref).manifest["shards"]

    # atlas: the checkpoint, then the database itself, cannot be written; the atlas already there is untouched
    for case, name in (("atlas_checkpoint", "build.ckpt"), ("atlas_db", "atlas.sqlite")):
        assert res[case]["code"] == 2, res[case]
        line = one_error_line(res[case]["stderr"])
        assert "could not write" in line and name in line, line
        assert atlas_db.read_bytes() == atlas_before
        assert not [p.name for p in atlas.iterdir() if "partial" in p.name or p.name.startswith(".tmp")]
    assert "the atlas already there was left as it was" in one_error_line(res["atlas_db"]["stderr"])
    assert (atlas / "build.ckpt").is_file()  # the finished pass is kept: the rerun only writes the database
    assert invoke(*args["atlas"])[0] == 0
    assert not (atlas / "build.ckpt").exists()
    assert _atlas_rows(atlas_db) == _atlas_rows_of_bytes(atlas_before, tmp_path / "before.sqlite")

    # sae train: the SAE cannot be saved at the end; the one there stays, and the rerun saves the same SAE (from the
    # finished checkpoint: same weights, same metrics.json) as the clean run that wrote the one there
    assert res["sae_train"]["code"] == 2, res["sae_train"]
    line = one_error_line(res["sae_train"]["stderr"])
    assert "could not write" in line and squash(str(trained)) in squash(line) and "the disk is full" in line, line
    assert {k: v for k, v in folder_bytes(trained).items() if not k.startswith(".checkpoint/")} == trained_before
    assert (trained / ".checkpoint" / "checkpoint.pt").is_file()
    assert invoke(*sae_cmd)[0] == 0
    assert folder_bytes(trained) == trained_before

    # SAE, preset and vector saves: a ThoughtscopeError naming the file, the old one byte for byte
    for case, path, before in (
        ("sae", sae_dir, sae_before),
        ("preset", preset_path, preset_before),
        ("vector", vec_path, vec_before),
    ):
        r = res[case]
        assert r["thoughtscope"] and str(path) in r["message"] and "the disk is full" in r["message"], r
        now = folder_bytes(path) if path.is_dir() else path.read_bytes()
        assert now == before, case
        assert not [p for p in path.parent.iterdir() if p.name.startswith(".") and path.name in p.name]
    save_sae(new_sae, sae_dir)
    assert torch.equal(load_sae(sae_dir).W_dec, new_sae.W_dec)
    Preset("new", [PresetItem(**item, strength=2.0)]).save(preset_path)
    assert json.loads(preset_path.read_text())["name"] == "new"
    SteeringVector(torch.zeros(32), "resid.1", method="new").save(vec_path)
    assert vec_path.read_bytes() != vec_before


def _atlas_rows(path: Path) -> dict:
    """Every table of an atlas but the time it was built at."""
    con = sqlite3.connect(str(path))
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        out = {t: con.execute(f"SELECT * FROM {t}").fetchall() for t in tables if not t.startswith("explanations")}
    finally:
        con.close()
    out["meta"] = [r for r in out.get("meta", []) if r[0] != "created"]
    return out


def _atlas_rows_of_bytes(data: bytes, path: Path) -> dict:
    path.write_bytes(data)
    return _atlas_rows(path)


# ----------------------------------------------------------------------------- two writers of one folder

# runs in the child: the first writer of each folder, held at its first step (its lock taken) until told to go on
HOLDER = r"""
import json, sys, threading
import torch
import thoughtscope.atlas.build as build
import thoughtscope.sae.train as sae_train
from thoughtscope.atlas import AtlasConfig, build_atlas
from thoughtscope.corpus import Corpus
from thoughtscope.harvest import HarvestConfig, harvest
from thoughtscope.models import capture, load_model
from thoughtscope.sae import SAEConfig, load_sae
from thoughtscope.sae.config import TrainConfig
from thoughtscope.sae.run import train_grid

torch.set_num_threads(1)
go = threading.Event()
first = {"harvest", "atlas", "sae"}
said = threading.Lock()  # one line at a time: three threads print at once


def hold(name):
    if name in first:
        first.discard(name)
        with said:
            sys.stdout.write(f"holding {name}\n")
            sys.stdout.flush()
        go.wait()


real_step, real_train_step = build._StreamingPass.step, sae_train.Trainer._train_step
build._StreamingPass.step = lambda self, *a, **k: (hold("atlas"), real_step(self, *a, **k))[1]
sae_train.Trainer._train_step = lambda self, *a, **k: (hold("sae"), real_train_step(self, *a, **k))[1]
errors = {}


def job(name, fn):
    def run():
        try:
            fn()
        except BaseException as e:
            errors[name] = repr(e)
            print("failed", name, repr(e), flush=True)

    t = threading.Thread(target=run)
    t.start()
    return t


cfg = HarvestConfig(n_tokens=A["tokens"], ctx_len=16, contexts_per_batch=4, shard_tokens=64)
lm1, lm2, sae = load_model(A["model"]), load_model(A["model"]), load_sae(A["sae"])  # loading is no thread's job
for lm in (lm1, lm2):  # nor are the imports transformers makes at a model's first forward pass (not thread-safe)
    capture(lm, ["resid.1"], torch.zeros(1, 4, dtype=torch.long))
threads = [
    job("harvest", lambda: harvest(lm1, Corpus(A["corpus"]), ["resid.1"], A["acts"], cfg,
                                   progress=False, on_shard=lambda n: hold("harvest"))),
    job("atlas", lambda: build_atlas(lm2, sae, Corpus(A["corpus"]), A["atlas"],
                                     AtlasConfig(n_tokens=A["tokens"], ctx_len=16, contexts_per_batch=4),
                                     progress=False)),
    job("sae", lambda: train_grid(A["sae_out"], store=A["store"], grid=dict(arch=["topk"], k=[4], expansion=[2],
                                  l1_coeff=[SAEConfig.l1_coeff], l0_coeff=[SAEConfig.l0_coeff]),
                                  train_cfg=TrainConfig(batch_size=64, n_tokens=1024, checkpoint_every=4,
                                                        progress=False))),
]
sys.stdin.readline()
go.set()
for t in threads:
    t.join()
print(json.dumps(errors), flush=True)
"""


def test_a_second_writer_of_the_same_folder_stops_at_once_naming_the_lock(world, tmp_path):
    acts, atlas, sae_out = tmp_path / "acts", tmp_path / "atlas", tmp_path / "sae"
    args = dict(
        model=str(world.model),
        corpus=str(world.corpus),
        sae=str(world.sae),
        store=str(world.store),
        acts=str(acts),
        atlas=str(atlas),
        sae_out=str(sae_out),
        tokens=TOKENS,
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", PRELUDE + f"A = {args!r}\n" + HOLDER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env_with_tests_on_path(), "PYTHONDONTWRITEBYTECODE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x.strip()) for x in proc.stdout], daemon=True)
    reader.start()
    try:
        held = _next_lines(lines, 3, timeout=120)
        assert sorted(held) == ["holding atlas", "holding harvest", "holding sae"], (held, proc.stderr)
        before = {p: folder_bytes(p) for p in (acts, atlas, sae_out)}
        seconds = [
            (
                ["harvest", "--model", world.model, "--corpus", world.corpus, "--out", acts, *HARVEST_ARGS],
                acts / ".writer.lock",
            ),
            (
                ["atlas", "build", "--sae", world.sae, "--model", world.model, "--corpus", world.corpus, *ATLAS_ARGS]
                + ["--out", atlas],
                atlas / ".build.lock",
            ),
            (
                ["sae", "train", "--store", world.store, "--out", sae_out, *SAE_ARGS],
                sae_out / ".checkpoint" / ".train.lock",
            ),
        ]
        for cmd, lock in seconds:
            code, output = invoke(*cmd)
            line = one_error_line(output)
            assert code == 2 and "lock" in line and squash(str(lock)) in squash(line), (cmd[0], line)
        assert {p: folder_bytes(p) for p in (acts, atlas, sae_out)} == before  # the second writers wrote nothing
        proc.stdin.write("go\n")
        proc.stdin.close()
        proc.wait(timeout=180)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rest = _next_lines(lines, 1, timeout=1)
    assert proc.returncode == 0 and rest and json.loads(rest[-1]) == {}, (rest, proc.stderr.read()[-3000:])
    # the first writers finished undisturbed: the store is the one a lone harvest writes
    assert {k: v for k, v in folder_bytes(acts).items() if k != "manifest.json"} == {
        k: v for k, v in folder_bytes(world.store).items() if k != "manifest.json"
    }
    assert ActivationStore.open(acts).complete
    from thoughtscope.atlas import Atlas

    with Atlas.open(atlas) as at:
        assert at.n_features == 64
    assert load_sae(sae_out).cfg.n_features == 64


def _next_lines(q: queue.Queue, n: int, timeout: float) -> list[str]:
    """The next n lines the child printed (a line starting 'failed' counts), waiting at most `timeout` seconds."""
    lines, deadline = [], time.time() + timeout
    while len(lines) < n and time.time() < deadline:
        try:
            lines.append(q.get(timeout=max(0.1, deadline - time.time())))
        except queue.Empty:
            break
    return lines


def test_a_failed_atlas_build_lets_go_of_its_lock_and_removes_the_folder_it_made(world, tmp_path, monkeypatch):
    import thoughtscope.atlas.build as build

    sae, corpus, out = load_sae(world.sae), Corpus(str(world.corpus)), tmp_path / "new" / "atlas"
    cfg = AtlasConfig(n_tokens=256, ctx_len=16, contexts_per_batch=4)
    with pytest.raises(AtlasError, match="no text left to read after skip_tokens=6400000"):
        build_atlas(world.lm, sae, corpus, out, AtlasConfig(n_tokens=256, skip_tokens=64 * 10**5), progress=False)
    assert not (tmp_path / "new").exists()

    def broken(self, *a, **k):
        raise RuntimeError("the first forward pass failed")

    monkeypatch.setattr(build._StreamingPass, "step", broken)
    with pytest.raises(RuntimeError, match="first forward pass"):
        build_atlas(world.lm, sae, corpus, out, cfg, progress=False)
    assert not (tmp_path / "new").exists()  # the folders it made, and its lock file, are gone
    monkeypatch.undo()
    assert build_atlas(world.lm, sae, corpus, out, cfg, progress=False).is_file()  # nothing holds the lock
