"""A bounded loopback load test on the tiny workbench: 210 mixed requests (analyzer pages and three-lane streams),
8 at a time, in three rounds: no errors, latency printed, and the process's memory does not grow between rounds."""

from __future__ import annotations

import pytest
from helpers.server_fixtures import shared_tiny
from web import Live, load_test

from thoughtscope.server import ServerConfig, create_app

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mixed_load_without_errors_or_memory_growth():
    wb = shared_tiny()
    with Live(create_app(ServerConfig(queue_size=8), wb)) as url:
        res = load_test(url, "a quiet queen sat in the sun and read a book", n=70, conc=8, rounds=3, n_new=6)
    rounds = res["load_rounds"]
    for r in rounds:
        print(f"p50 {r['p50_s']:.3f} s  p99 {r['p99_s']:.3f} s  RSS {r['rss_mb']:.0f} MB")
        assert r["errors"] == 0, r["first_errors"]
    assert rounds[2]["rss_mb"] - rounds[1]["rss_mb"] < 25, [r["rss_mb"] for r in rounds]
