"""Run every benchmark and write one JSON: ``python benchmarks/run_all.py --quick --json bench.json``.

Each benchmark runs as its own process (``python benchmarks/<name>.py [--quick] --json …``) so one failing,
or one that stops on its sanity rule, cannot take the others down; its figures, exit status, wall time and the
tail of its output go into the combined JSON, written atomically after every benchmark so an interrupted run
keeps what finished. Benchmarks that are not there (a checkout without them) are listed as absent. Exit status
is non-zero when any benchmark failed. ``scripts/benchmark_table.py`` turns the JSON into the README's table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = (
    "sae_train",
    "sae_quality",
    "sae_choices",
    "harvest",
    "atlas",
    "search",
    "steer",
    "probe",
    "web",
    "nla",
    "soak",
    "patching",
    "attribution",
    "lens",
    "graph",
    "generate",
)


def _git_commit() -> str | None:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], check=False, cwd=HERE, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load,
    }


def takes_device(script: Path) -> bool:
    """Whether a benchmark has the --device flag (its own, or benchmarks/_device.py's)."""
    src = script.read_text(errors="replace")
    return '"--device"' in src or "add_device_arg(" in src


def run_one(name: str, quick: bool, timeout: float, extra: list[str], device: str | None = None) -> dict:
    script = HERE / f"{name}.py"
    if not script.is_file():
        return {"status": "absent", "note": f"{script.name} is not in this checkout"}
    if device is not None and device != "cpu" and not takes_device(script):
        return {"status": "skipped", "note": f"{script.name} has no --device flag: it would run on the CPU"}
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        out = Path(tmp) / "figures.json"
        cmd = [sys.executable, str(script), *(["--quick"] if quick else []), "--json", str(out), *extra]
        if device is not None and takes_device(script):
            cmd += ["--device", device]
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)
            code, log = r.returncode, (r.stdout + r.stderr)
        except subprocess.TimeoutExpired as e:
            code = None
            log = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")) + (
                (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            )
        wall = time.perf_counter() - t0
        figures = json.loads(out.read_text()) if out.is_file() else None
    status = "ok" if code == 0 and figures is not None else ("timeout" if code is None else "failed")
    return {
        "status": status,
        "returncode": code,
        "wall_seconds": wall,
        "quick": quick,
        "command": cmd[1:],
        "figures": figures,
        "log_tail": log[-4000:],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every benchmark's --quick size")
    p.add_argument("--json", type=Path, required=True, help="the combined figures")
    p.add_argument("--only", help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    p.add_argument("--timeout", type=float, default=None, help="seconds per benchmark (default 900 quick, 3600)")
    p.add_argument("--merge", action="store_true", help="keep benchmarks already in --json that this run skips")
    p.add_argument("--device", default=None, help="torch device for every benchmark that takes --device (cuda, ...)")
    p.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="more arguments for one benchmark, e.g. --extra 'sae_train=--archs topk --steps 16'",
    )
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(BENCHMARKS)
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        p.error(f"unknown benchmarks {sorted(unknown)}; expected some of {', '.join(BENCHMARKS)}")
    timeout = args.timeout or (900 if args.quick else 3600)
    old = json.loads(args.json.read_text()) if args.merge and args.json.is_file() else {}
    result = {
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "machine": machine(),
        "device": args.device or "cpu",
        "benchmarks": dict(old.get("benchmarks", {})),
    }
    extra = {}
    for item in args.extra:
        name, _, rest = item.partition("=")
        if name not in BENCHMARKS:
            p.error(f"--extra {item!r}: {name!r} is not one of {', '.join(BENCHMARKS)}")
        extra[name] = shlex.split(rest)
    failed = []
    for name in names:
        print(f"== {name} ({'quick' if args.quick else 'full'})", flush=True)
        res = run_one(name, args.quick, timeout, extra.get(name, []), args.device)
        result["benchmarks"][name] = res
        print(f"   {res['status']} in {res.get('wall_seconds', 0):.0f} s", flush=True)
        if res["status"] in ("failed", "timeout"):
            failed.append(name)
            print(res["log_tail"][-1500:], flush=True)
        result["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, args.json)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
