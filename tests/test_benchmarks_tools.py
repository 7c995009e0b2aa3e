"""run_all.py tolerates missing benchmarks and keeps a failing one's exit status; the README table is generated from
a run's JSON between markers, leaving the rest of the file alone."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_all_lists_absent_benchmarks_and_fails_on_a_failing_one(tmp_path, monkeypatch):
    import run_all  # benchmarks/ is on the test path (pyproject: pythonpath)

    assert run_all.run_one("no_such_benchmark", True, 10, [])["status"] == "absent"
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "ok.py").write_text(
        "import json,sys\njson.dump({'quick': True, 'x_ratio': 2.0}, open(sys.argv[-1], 'w'))\n"
    )
    (bench / "bad.py").write_text("raise SystemExit('sanity rule: FVU >= 1')\n")
    monkeypatch.setattr(run_all, "HERE", bench)
    ok, bad = run_all.run_one("ok", True, 60, []), run_all.run_one("bad", True, 60, [])
    assert ok["status"] == "ok" and ok["figures"] == {"quick": True, "x_ratio": 2.0}
    assert bad["status"] == "failed" and bad["returncode"] == 1 and "sanity rule" in bad["log_tail"]


def test_table_is_written_between_the_readme_markers(tmp_path):
    run = {
        "started_at": "2026-12-01T20:00:00+00:00",
        "commit": "0123456789abcdef",
        "machine": {"cpus": 2, "torch": "2.13", "load_average_at_start": [12.0, 11.0, 10.0]},
        "benchmarks": {
            "harvest": {
                "status": "ok",
                "quick": True,
                "figures": {"ratio_vs_bare_forward": 1.21, "ratio_vs_full_forward": 2.7},
            },
            "probe": {"status": "absent"},
            "web": {"status": "timeout", "returncode": None},
        },
    }
    (tmp_path / "run.json").write_text(json.dumps(run))
    readme = tmp_path / "README.md"
    readme.write_text(
        "# x\n\nbefore\n<!-- benchmark-table:start -->\nold row 8.7x\n<!-- benchmark-table:end -->\nafter\n"
    )
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "benchmark_table.py"),
            str(tmp_path / "run.json"),
            "--readme",
            str(readme),
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n<!-- benchmark-table:start -->\n") and text.endswith("-->\nafter\n")
    assert "old row" not in text and "`harvest.py --quick`" in text and "**1.21**" in text
    assert "**timeout**" in text and "probe" not in text.split("- `")[0]
    assert "load average at start 12.0, 11.0, 10.0" in text
