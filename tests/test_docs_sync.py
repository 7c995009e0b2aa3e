"""The documentation says what the code does: the offline explainer's method name and where the first start caches
its atlas are read from the code's own constants and checked against every page under docs/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from thoughtscope.atlas.cue_search import OFFLINE
from thoughtscope.paths import home

DOCS = Path(__file__).resolve().parents[1] / "docs"
# words that mark a line as speaking of an earlier version on purpose (a comparison table, old atlases)
EARLIER = re.compile(r"older|previous|earlier|before|^\| v\d", re.IGNORECASE)


def doc_lines():
    for path in sorted(DOCS.glob("*.md")):
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            yield path.name, i, line


def test_offline_method_named_in_the_docs_is_the_one_the_code_writes():
    family = OFFLINE.rsplit("-v", 1)[0]  # "offline-tokens"
    named = [(f, i, line) for f, i, line in doc_lines() if re.search(re.escape(family) + r"-v\d+", line)]
    assert any(OFFLINE in line for f, _, line in named if f == "web.md"), "docs/web.md does not name " + OFFLINE
    assert any(OFFLINE in line for f, _, line in named if f == "atlas.md"), "docs/atlas.md does not name " + OFFLINE
    stale = [
        f"{f}:{i}: {line.strip()}"
        for f, i, line in named
        if any(v != OFFLINE for v in re.findall(re.escape(family) + r"-v\d+", line)) and not EARLIER.search(line)
    ]
    assert not stale, f"the code writes {OFFLINE}; these lines name another version as if it were current: {stale}"


def test_atlas_cache_folder_in_the_docs_is_where_the_first_start_writes(tmp_path, monkeypatch):
    from helpers.atlas_fixtures import identity_model, planted_sae

    from thoughtscope.server.workbench import default_atlas_dir

    monkeypatch.setenv("THOUGHTSCOPE_HOME", str(tmp_path))
    folder = default_atlas_dir(planted_sae(identity_model()))
    sub = folder.parent.relative_to(tmp_path).as_posix()  # "atlases": the fingerprint folder sits inside it
    text = (DOCS / "web.md").read_text(encoding="utf-8")
    assert f"$THOUGHTSCOPE_HOME/{sub}/" in text, f"docs/web.md does not say the atlas is cached in {sub}/ of the home"
    monkeypatch.delenv("THOUGHTSCOPE_HOME")
    assert home() == Path.home() / ".cache" / "thoughtscope"  # what "~/.cache/thoughtscope" in the docs means


@pytest.mark.parametrize("prefix", ["~/.cache/thoughtscope/"])
def test_every_cache_path_in_the_docs_names_the_home_variable(prefix):
    """A path under the default home is only right while $THOUGHTSCOPE_HOME is unset: the docs say so beside it."""
    pages = {p.name: p.read_text(encoding="utf-8").splitlines() for p in sorted(DOCS.glob("*.md"))}
    bare = []
    for name, lines in pages.items():
        for i, line in enumerate(lines):
            near = " ".join(lines[max(0, i - 1) : i + 2])
            if prefix in line and "THOUGHTSCOPE_HOME" not in near:
                bare.append(f"{name}:{i + 1}: {line.strip()}")
    assert not bare, f"cache paths without $THOUGHTSCOPE_HOME beside them: {bare}"
