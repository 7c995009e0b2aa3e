"""Fault injection for tests/test_faults*.py: a thoughtscope job runs in a child Python process that SIGKILLs itself
at the k-th event of one kind, or writes under a file-size limit (a full disk, as that process sees it).

Events a child counts, and can be killed at (just before the event happens):

- ``replace``: an ``os.replace`` into the child's working folder, i.e. a file of the job about to be committed (every
  atomic write renames into place);
- ``tick``: a progress-bar update (the jobs' compute loops: a batch, a step, a feature, a screened strength);
- ``sql``: an SQLite statement (inside the atlas's write transactions, and its reads).

The child writes how many events of each kind it saw to a JSON file when it ends without being killed, so a test
runs a job once uninterrupted, then picks seeded kill points among the events that run really had.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from helpers import env_with_tests_on_path

KILL_ENV = "THOUGHTSCOPE_FAULT_KILL"  # "<event>:<k>"
COUNTS_ENV = "THOUGHTSCOPE_FAULT_COUNTS"  # where the child writes its event counts at a normal exit
FSIZE_ENV = "THOUGHTSCOPE_FAULT_FSIZE"  # bytes: the child's file-size limit from its start
EVENTS = ("replace", "tick", "sql")

PRELUDE = "import helpers.faults as _faults\n_faults.install()\n"

_counts: Counter = Counter()
_replaced: list[str] = []  # the names files were renamed to, in order (which commit the k-th "replace" is)


def set_fsize(limit: int | None) -> None:
    """This process's file-size limit (RLIMIT_FSIZE soft limit): a write that would make a file bigger than `limit`
    bytes fails with EFBIG (SIGXFSZ is ignored), as a write to a full disk fails. None lifts it again."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard if limit is None else int(limit), hard))


def install() -> None:
    """In the child: count events, kill at the one named in $THOUGHTSCOPE_FAULT_KILL, apply $THOUGHTSCOPE_FAULT_FSIZE,
    and write the counts to $THOUGHTSCOPE_FAULT_COUNTS at exit."""
    import atexit
    import signal
    import sqlite3

    spec = os.environ.get(KILL_ENV)
    target = None
    if spec:
        kind, k = spec.split(":")
        target = (kind, int(k))

    def event(kind: str) -> None:
        _counts[kind] += 1
        if target is not None and target == (kind, _counts[kind]):
            os.kill(os.getpid(), signal.SIGKILL)

    real_replace = os.replace
    root = os.path.realpath(os.getcwd()) + os.sep  # the job's folder: a rename elsewhere (a cache) is no commit

    def replace(src, dst, **kw):
        if os.path.realpath(os.fspath(dst)).startswith(root):
            _replaced.append(os.fspath(dst))
            event("replace")
        return real_replace(src, dst, **kw)

    os.replace = replace

    from thoughtscope.progress import ProgressBar

    real_update = ProgressBar.update

    def update(self, completed=None, *, info=None):
        event("tick")
        return real_update(self, completed, info=info)

    ProgressBar.update = update

    real_connect = sqlite3.connect

    def connect(*args, **kwargs):
        con = real_connect(*args, **kwargs)
        con.set_trace_callback(lambda _stmt: event("sql"))
        return con

    sqlite3.connect = connect

    out = os.environ.get(COUNTS_ENV)
    if out:
        atexit.register(lambda: Path(out).write_text(json.dumps({**_counts, "replaced": _replaced})))
    if os.environ.get(FSIZE_ENV):
        set_fsize(int(os.environ[FSIZE_ENV]))


@dataclass
class Child:
    """What a child run left: its exit code (negative: the signal that ended it), output, event counts and the
    destinations of its renames in order (`counts["replaced"]`)."""

    returncode: int
    stdout: str
    stderr: str
    counts: dict = field(default_factory=dict)

    @property
    def killed(self) -> bool:
        return self.returncode == -9

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def run_child(
    code: str,
    workdir: Path,
    *,
    kill: str | None = None,
    fsize: int | None = None,
    timeout: float = 300,
    env: dict | None = None,
) -> Child:
    """Run `code` in a child Python (tests/ on its path, the fault hooks installed first) in `workdir`."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    counts_file = workdir / f".fault-counts-{os.getpid()}-{id(code)}.json"
    counts_file.unlink(missing_ok=True)
    child_env = {
        **env_with_tests_on_path(),
        "PYTHONDONTWRITEBYTECODE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "400",  # one error line stays one line
        COUNTS_ENV: str(counts_file),
        **(env or {}),
    }
    child_env.pop(KILL_ENV, None)
    child_env.pop(FSIZE_ENV, None)
    if kill:
        child_env[KILL_ENV] = kill
    if fsize is not None:
        child_env[FSIZE_ENV] = str(fsize)
    r = subprocess.run(
        [sys.executable, "-c", PRELUDE + code],
        cwd=workdir,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    counts = json.loads(counts_file.read_text()) if counts_file.is_file() else {}
    counts_file.unlink(missing_ok=True)
    return Child(r.returncode, r.stdout, r.stderr, counts)


def kill_points(counts: dict, seed: int, per_kind: int = 1, kinds=EVENTS) -> list[str]:
    """Seeded kill points ("<event>:<k>") among the events an uninterrupted run had: `per_kind` of each kind seen
    (without repeats), in a fixed order."""
    import random

    rng = random.Random(seed)
    out = []
    for kind in kinds:
        n = int(counts.get(kind, 0))
        if n:
            out += [f"{kind}:{k}" for k in sorted(rng.sample(range(1, n + 1), min(per_kind, n)))]
    return out


def folder_bytes(path: Path, *, skip=(".lock",)) -> dict[str, bytes]:
    """Every file under `path` (relative name -> bytes), lock files left out: what "byte-identical" compares."""
    path = Path(path)
    return {
        p.relative_to(path).as_posix(): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and not p.name.endswith(skip)
    }
