#!/usr/bin/env bash
# One GPU check in at most 8 minutes: the GPU's description, the device tests, each benchmark's --quick on the
# device, then the slow tests, written to one JSON.
#
#   scripts/gpu_check.sh [OUT.json]            (default $OUT/gpu_check.json, or ./gpu_check.json without $OUT)
#
# Every step runs under its own timeout and fails soft: its name, command, return code, seconds, status and
# output tail are recorded (a benchmark's own JSON figures too) and the next step runs. The JSON is rewritten
# after every step, so a run cut short keeps what finished. Exit status 1 when any step failed or timed out.
#
# Environment:
#   GPU_CHECK_DEVICE      torch device for the benchmarks (default cuda; cpu runs the same steps on the CPU)
#   GPU_CHECK_ONLY        comma-separated step names to run (default all): env, load_default, kernels, devices,
#                         bench_<name> for each benchmarks/<name>.py that has --quick, slow_tests
#   GPU_CHECK_BUDGET      seconds for the whole run (default 480); each step gets min(its cap, what is left)
#   GPU_CHECK_STEP_TIMEOUT  a cap in seconds that overrides every step's own cap
#   GPU_CHECK_ARGS        more arguments per benchmark, "name=ARGS;name=ARGS" (e.g. "steer=--tiny")
#   GPU_CHECK_BENCHMARKS  the benchmarks folder (default benchmarks/ of this checkout)
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
DEST="${1:-${OUT:-.}/gpu_check.json}"
PY="${PYTHON:-python3}"
export GPU_CHECK_STARTED="${GPU_CHECK_STARTED:-$(date +%s.%N)}"  # the budget counts from here

echo "== nvidia-smi"
if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi || true; else echo "nvidia-smi: not found"; fi
echo "== torch"
"$PY" - <<'PY' || true
import torch
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuda available {torch.cuda.is_available()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}")
PY

exec "$PY" - "$DEST" <<'PY'
import datetime as dt
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEST = Path(sys.argv[1])
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
ONLY = {s.strip() for s in os.environ.get("GPU_CHECK_ONLY", "").split(",") if s.strip()}
BUDGET = float(os.environ.get("GPU_CHECK_BUDGET", "480"))
CAP = os.environ.get("GPU_CHECK_STEP_TIMEOUT")
BENCH = Path(os.environ.get("GPU_CHECK_BENCHMARKS", "benchmarks"))
EXTRA = {}
for item in os.environ.get("GPU_CHECK_ARGS", "").split(";"):
    if "=" in item:
        name, _, rest = item.partition("=")
        EXTRA[name.strip()] = shlex.split(rest)
# seconds each step may take at most (a step also never runs past the whole run's budget)
CAPS = {"env": 30, "load_default": 150, "kernels": 60, "devices": 60, "slow_tests": 240}
SLOW_FLOOR = 120.0  # seconds the earlier steps leave to the slow tests when they are part of the run
BENCH_CAPS = {"sae_train": 90, "nla": 90, "second_model": 120, "soak": 75, "web": 75, "patching": 150, "search": 150, "lens": 120}
NOT_BENCHMARKS = {"run_all", "atlas_explainers"}  # the runner itself; a study that needs an atlas, not --quick
RESERVE = 15.0  # seconds kept back: a timed-out step gets 10 s to exit after SIGTERM, then the JSON is written
STARTED = float(os.environ.get("GPU_CHECK_STARTED") or time.time())


def elapsed() -> float:
    return time.time() - STARTED


def git_commit():
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def env_info() -> dict:
    info = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    try:
        r = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = r.stdout[-4000:] or r.stderr[-1000:]
    except (OSError, subprocess.SubprocessError) as e:
        info["nvidia_smi"] = f"not available: {e}"
    # in a child process, so this one holds no CUDA context while the steps run
    probe = (
        "import json, torch; print(json.dumps({'torch': torch.__version__, 'cuda_build': torch.version.cuda, "
        "'cuda_available': torch.cuda.is_available(), 'gpus': [{'name': p.name, 'memory_gib': "
        "round(p.total_memory / 2**30, 1), 'capability': f'{p.major}.{p.minor}'} for p in "
        "(torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count()))]}))"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"torch could not describe the device: {r.stderr[-1000:]}")
    info |= json.loads(r.stdout.strip().splitlines()[-1])
    return info


def write(result: dict) -> None:
    DEST.parent.mkdir(parents=True, exist_ok=True)
    tmp = DEST.with_name(DEST.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, DEST)


def run(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int | None, str, float]:
    """(return code or None on timeout, output, seconds); the whole process group is killed on timeout."""
    t = time.monotonic()
    with tempfile.TemporaryFile(mode="w+") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, text=True)
        try:
            code = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            code = None
        log.seek(0)
        out = log.read()
    return code, out, time.monotonic() - t


def pytest_summary(out: str) -> dict:
    counts = {}
    for n, what in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)", out[-3000:]):
        counts[what] = int(n)
    return counts


def benchmarks() -> list[tuple[str, Path]]:
    out = []
    for f in sorted(BENCH.glob("*.py")):
        if f.stem.startswith("_") or f.stem in NOT_BENCHMARKS:
            continue
        if '"--quick"' in f.read_text(errors="replace"):
            out.append((f.stem, f))
    return out


def steps() -> list[dict]:
    py = sys.executable
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"]
    cap = CAPS
    load = f"from thoughtscope.models import load_model; print(load_model('default', device={DEVICE!r}))"
    todo = [
        {"name": "env", "kind": "env", "cap": CAPS["env"], "command": ["nvidia-smi", "+ torch.cuda"]},
        # a fresh machine converts the embedded default model once (cached after): paid here, not by a benchmark
        {"name": "load_default", "kind": "cmd", "cap": CAPS["load_default"], "command": [py, "-c", load]},
        # the sparse kernels' tests run every case on CUDA too when a GPU is present
        {"name": "kernels", "kind": "pytest", "cap": cap["kernels"], "command": [*pytest, "tests/test_sae_kernels.py"]},
        {"name": "devices", "kind": "pytest", "cap": cap["devices"], "command": [*pytest, "tests/test_devices.py"]},
    ]
    for name, f in benchmarks():
        src = f.read_text(errors="replace")
        cmd = [py, str(f), "--quick", *EXTRA.get(name, [])]
        step = {"name": f"bench_{name}", "kind": "bench", "cap": BENCH_CAPS.get(name, 60), "command": cmd}
        if '"--device"' in src or "add_device_arg(" in src:
            cmd += ["--device", DEVICE]
        elif DEVICE != "cpu":
            step["skip"] = f"{f.name} has no --device flag: it would run on the CPU"
        todo.append(step)
    todo.append(
        {
            "name": "slow_tests",
            "kind": "pytest",
            "cap": CAPS["slow_tests"],
            "command": pytest + ["-m", "slow", "--timeout", "150"],
        }
    )
    return [s for s in todo if not ONLY or s["name"] in ONLY]


def main() -> int:
    result = {
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": DEVICE,
        "budget_s": BUDGET,
        "steps": [],
    }
    env = {**os.environ, "THOUGHTSCOPE_TEST_DEVICE": DEVICE, "PYTHONUNBUFFERED": "1"}
    plan = steps()
    slow_later = any(s["name"] == "slow_tests" for s in plan)
    for s in plan:
        left = BUDGET - elapsed() - RESERVE - (SLOW_FLOOR if slow_later and s["name"] != "slow_tests" else 0)
        timeout = min(float(CAP) if CAP else s["cap"], left)
        rec = {"name": s["name"], "command": shlex.join(s["command"]), "timeout_s": round(max(timeout, 0), 1)}
        if "skip" in s or timeout < 1:
            rec |= {"status": "skipped", "returncode": None, "seconds": 0.0}
            rec["reason"] = s.get("skip", "the run's time budget is spent")
        elif s["kind"] == "env":
            t = time.monotonic()
            try:
                result["env"] = env_info()
                rec |= {"status": "ok", "returncode": 0}
            except Exception as e:  # fail soft: recorded, the next step runs
                rec |= {"status": "failed", "returncode": 1, "log_tail": f"{type(e).__name__}: {e}"}
            rec["seconds"] = round(time.monotonic() - t, 2)
        else:
            with tempfile.TemporaryDirectory(prefix=f"gpu-check-{s['name']}-") as tmp:
                cmd = list(s["command"])
                fig = Path(tmp) / "figures.json"
                if s["kind"] == "bench":
                    cmd += ["--json", str(fig)]
                    rec["command"] = shlex.join(cmd)
                print(f"== {s['name']} (up to {timeout:.0f} s): {rec['command']}", flush=True)
                code, out, secs = run(cmd, timeout, env)
                rec |= {"returncode": 124 if code is None else code, "seconds": round(secs, 2)}
                rec["status"] = "timeout" if code is None else ("ok" if code == 0 else "failed")
                rec["log_tail"] = out[-4000:]
                if s["kind"] == "pytest":
                    rec["tests"] = pytest_summary(out)
                if s["kind"] == "bench":
                    try:
                        rec["figures"] = json.loads(fig.read_text()) if fig.is_file() else None
                    except ValueError as e:
                        rec["figures"] = None
                        rec["figures_error"] = str(e)
                    if rec["status"] == "ok" and rec["figures"] is None:
                        rec["status"] = "failed"  # a benchmark that wrote no figures did not finish its job
        print(f"   {rec['name']}: {rec['status']} in {rec['seconds']:.1f} s", flush=True)
        result["steps"].append(rec)
        result["elapsed_s"] = round(elapsed(), 1)
        write(result)
    bad = [r["name"] for r in result["steps"] if r["status"] in ("failed", "timeout")]
    result |= {
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed(), 1),
        "failed": bad,
        "ok": not bad,
    }
    write(result)
    print(f"wrote {DEST}: {len(result['steps'])} steps, failed: {', '.join(bad) or 'none'}", flush=True)
    return 1 if bad else 0


sys.exit(main())
PY
