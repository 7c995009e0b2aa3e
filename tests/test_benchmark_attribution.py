"""benchmarks/attribution.py runs end to end on a tiny model and writes the key its issue names."""

from __future__ import annotations

import json

import attribution  # benchmarks/ is on the test path (pyproject)


def test_attribution_benchmark_tiny_writes_its_keys(tmp_path):
    out = tmp_path / "a.json"
    assert attribution.main(["--tiny", "--json", str(out), "--check", "8"]) == 0
    d = json.loads(out.read_text())
    assert -1 <= d["attribution_spearman"] <= 1 and len(d["attribution_spearman_ci"]) == 2
    assert len(d["prompts"]) == 3 and all(p["n_checked"] == 8 for p in d["prompts"])
