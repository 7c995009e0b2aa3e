"""First start in headless Chromium: the banner shows the atlas build's step, percentage and ETA, and follows it
live to the end without a reload; a feature page opened during the build turns into the real one by itself."""

from __future__ import annotations

import pytest
from helpers.browser import LiveServer
from helpers.first_start import Gate, first_start_inputs

from thoughtscope.server import ServerConfig, create_app
from thoughtscope.server.workbench import load_workbench

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    monkeypatch.setenv("THOUGHTSCOPE_HOME", str(tmp_path / "home"))  # a fresh home: no atlas yet
    return first_start_inputs(tmp_path / "in")


def test_the_home_page_shows_the_build_progress_live(inputs, browser):
    gate = Gate()
    wb = load_workbench(**inputs, atlas_in_background=True, on_atlas_progress=gate)
    assert gate.held.wait(30)
    app = create_app(ServerConfig(), wb)
    try:
        with LiveServer(app) as url:
            page = browser.new_page()
            page.goto(url + "/")
            banner = page.locator("#atlas-build")
            assert "Building the feature atlas" in banner.inner_text()
            pct = page.locator(".atlas-percent").inner_text()
            assert pct.endswith("%") and 0 < float(pct[:-1]) < 100
            assert "left" in page.locator(".atlas-eta").inner_text()
            feature = browser.new_page()
            feature.goto(url + "/features/3")
            assert "still being built" in feature.locator("#explanation").inner_text()
            gate.release()
            # without a reload: the banner follows the build to its end, the feature page reloads into the real one
            page.wait_for_function(
                "document.querySelector('#atlas-build').innerText.includes('Feature atlas ready')", timeout=30000
            )
            feature.wait_for_selector("#top-contexts", timeout=30000)
    finally:
        gate.release()
