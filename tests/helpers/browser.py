"""Headless Chromium against the real server: a live uvicorn server on a loopback port, the browser fixture, and
screenshots to $THOUGHTSCOPE_SCREENSHOTS when set (test_web, test_web_default, the atlas report's browser test).

Outside CI the browser tests skip when Chromium or Playwright is missing; with the CI environment variable set they
fail, so a CI machine without a browser cannot pass silently.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("THOUGHTSCOPE_CHROMIUM", "/usr/bin/chromium")


def _missing(why: str):
    if os.environ.get("CI"):
        pytest.fail(f"browser tests need {why} (CI is set, so this is a failure, not a skip): run setup.sh")
    pytest.skip(f"browser tests need {why}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving an app in a thread on a free loopback port (the way `thoughtscope serve` runs it)."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                return f"http://127.0.0.1:{self.port}"
            time.sleep(0.01)
        raise RuntimeError("the test server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def shot(page, name: str) -> None:
    out = os.environ.get("THOUGHTSCOPE_SCREENSHOTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(out) / f"{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        _missing(f"Chromium at {CHROMIUM}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package (pip install playwright==1.65.2)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture()
def page(browser):
    """A fresh page at a desktop size; the test fails if the page raised a JavaScript error."""
    ctx = browser.new_context(viewport={"width": 1360, "height": 900})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    ctx.close()
    assert not errors, f"JavaScript errors: {errors}"
