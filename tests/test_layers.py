"""The house rules, checked on the code itself: arrows point down, one home per rule, short functions, fields
that say their unit. Each test names what broke it and where."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "thoughtscope"


def _layers_script():
    spec = importlib.util.spec_from_file_location("layers_script", ROOT / "scripts" / "layers.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["layers_script"] = mod
    spec.loader.exec_module(mod)
    return mod


def _sources() -> list[tuple[Path, str]]:
    return [(p, p.read_text()) for p in sorted(SRC.rglob("*.py"))]


def test_imports_point_down_the_documented_layers_with_no_cycle():
    layers = _layers_script()
    graph, table = layers.import_graph(), layers.read_layers()
    assert len(table) >= 8 and sum(len(t) for t in graph.values()) > 200  # the graph was really read
    assert layers.check(graph, table) == []


def test_the_layers_checker_catches_a_cycle_and_an_upward_import():
    layers = _layers_script()
    table = [("ground", ["errors"]), ("model", ["models"]), ("cli", ["cli"])]
    graph = {
        "thoughtscope.errors": {"thoughtscope.models"},  # upward
        "thoughtscope.models": {"thoughtscope.errors", "thoughtscope.cli"},  # upward, and a cycle with errors
        "thoughtscope.cli": {"thoughtscope.models"},
    }
    problems = layers.check(graph, table)
    assert any("upward import: thoughtscope.errors" in p for p in problems)
    assert any("import cycle" in p and "thoughtscope.cli" in p for p in problems)


def test_the_layers_picture_in_the_docs_is_the_codes():
    layers = _layers_script()
    text = layers.DOC.read_text()
    fresh = layers._replace_between(text, layers.PICTURE, layers.picture(layers.import_graph(), layers.read_layers()))
    assert fresh == text, "the layers picture is stale: run python3 scripts/layers.py --write"


def test_no_library_module_imports_the_command_line():
    layers = _layers_script()
    graph, table = layers.import_graph(), layers.read_layers()
    bad = [
        (m, t)
        for m, targets in graph.items()
        for t in targets
        if layers.unit_of(m, table) not in ("cli", "__main__") and layers.unit_of(t, table) == "cli"
    ]
    assert bad == []


def test_no_function_in_the_package_is_over_100_lines():
    long = []
    for path, text in _sources():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > 100:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({n} lines)")
    assert long == []


def test_files_are_renamed_into_place_only_by_the_atomic_writer():
    """`_io` is the one atomic writer; the atlas's SQLite file is built by sqlite itself and renamed whole (its
    line says why)."""
    hits = [
        (path.relative_to(SRC), i, line.strip())
        for path, text in _sources()
        if path.name != "_io.py"
        for i, line in enumerate(text.splitlines(), 1)
        if re.search(r"os\.replace\(|\.replace\(tmp", line)
    ]
    assert [(str(p), line) for p, _, line in hits if "sqlite" not in line.lower()] == []
    assert len(hits) <= 1


def test_one_progress_bar():
    users = [str(p.relative_to(SRC)) for p, text in _sources() if "rich.progress" in text]
    assert users == ["progress.py"]


@pytest.mark.parametrize(
    "name, home",
    [
        ("auroc", "stats.py"),
        ("auroc_split", "stats.py"),
        ("bootstrap", "stats.py"),
        ("percentile_ci", "stats.py"),
        ("wilson", "stats.py"),
        ("isotonic", "stats.py"),
        ("pad_id", "models.py"),
        ("torch_dtype", "dtypes.py"),
        ("read_prompts", "documents.py"),
        ("read_json", "_io.py"),
    ],
)
def test_each_rule_is_defined_once(name, home):
    """One definition of each shared rule (a thin caller that names another area's error is not a definition:
    it calls the one home)."""
    defs = []
    for path, text in _sources():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef) and node.name in (name, f"_{name}"):
                body = ast.unparse(node)
                if str(path.relative_to(SRC)) != home and f"{name}(" in body.split(":", 1)[1]:
                    continue  # a wrapper that delegates to the one home
                defs.append(str(path.relative_to(SRC)))
    assert sorted(set(defs)) == [home]


def test_no_hand_written_pad_rule_or_dtype_table():
    pad = re.compile(r"pad_token_id\s+if\s+|pad_token_id\s+or\s+")
    table = re.compile(r"[\"']bf16[\"']\s*:")
    found = [
        f"{p.relative_to(SRC)}:{i}"
        for p, text in _sources()
        for i, line in enumerate(text.splitlines(), 1)
        if (pad.search(line) and p.name != "models.py") or (table.search(line) and p.name != "dtypes.py")
    ]
    assert found == []


def _configs() -> list[type]:
    import thoughtscope.nla.train as nla_train
    import thoughtscope.sae.config as sae_config
    from thoughtscope.atlas.heldout import ExplainConfig
    from thoughtscope.nla.core import NLAConfig
    from thoughtscope.nla.data import DataConfig
    from thoughtscope.plans import AtlasConfig, HarvestConfig, ReadPlan
    from thoughtscope.probes.probe import ProbeConfig
    from thoughtscope.probes.read import ReadConfig
    from thoughtscope.probes.sweep import SweepConfig
    from thoughtscope.sae.config import SAEConfig
    from thoughtscope.server.config import ServerConfig
    from thoughtscope.steer.find import FindConfig
    from thoughtscope.steer.generate import GenerationConfig

    nla_cfg = [v for k, v in vars(nla_train).items() if k.endswith("TrainConfig") and dataclasses.is_dataclass(v)]
    sae_cfg = [v for k, v in vars(sae_config).items() if k.endswith("TrainConfig") and dataclasses.is_dataclass(v)]
    return [
        ReadPlan,
        HarvestConfig,
        AtlasConfig,
        ExplainConfig,
        NLAConfig,
        DataConfig,
        ProbeConfig,
        ReadConfig,
        SweepConfig,
        SAEConfig,
        ServerConfig,
        FindConfig,
        GenerationConfig,
        *nla_cfg,
        *sae_cfg,
    ]


def test_every_config_field_says_what_it_is_and_its_unit():
    from thoughtscope.configdoc import undocumented

    missing = {c.__name__: undocumented(c) for c in _configs()}
    assert {k: v for k, v in missing.items() if v} == {}


def test_config_class_names_are_unique():
    names = [c.__name__ for c in _configs()]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_batch_size_means_rows_per_optimiser_step_in_every_help():
    """`--batch-size` is rows per optimiser step wherever it is a visible option; texts or contexts per forward
    pass have their own names (the old flag is accepted, hidden, with a warning)."""
    import typer.main

    from thoughtscope.cli import app

    def walk(cmd, path):
        if hasattr(cmd, "commands"):  # typer's groups are of its own click copy, so not isinstance click.Group
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*path, name])
        else:
            yield path, cmd

    seen = []
    for path, cmd in walk(typer.main.get_command(app), []):
        for p in cmd.params:
            if "--batch-size" in getattr(p, "opts", ()) and not getattr(p, "hidden", False):
                seen.append((" ".join(path), p.help or ""))
    assert seen, "no command has --batch-size"
    assert all("optimiser step" in h for _, h in seen), seen


def test_no_test_module_imports_another():
    """Shared builders live in tests/helpers/; a test module that other tests import would run its own tests
    again under another name and hide what the helper depends on."""
    tests = ROOT / "tests"
    names = {p.stem for p in tests.glob("test_*.py")}
    bad = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = []
            if isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            bad += [f"{path.relative_to(tests)} imports {m}" for m in mods if m.split(".")[0] in names]
    assert bad == []


def test_command_bodies_stay_thin():
    """The command line parses, calls the library and prints: no command's body (after its signature of options)
    runs past 50 lines; logic that grows goes into the library, where other callers can use it."""
    long = []
    for path in sorted((SRC / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.body:
                n = node.end_lineno - node.body[0].lineno + 1
                if n > 50:
                    long.append(f"cli/{path.name}:{node.lineno} {node.name} ({n} lines)")
    assert long == []
