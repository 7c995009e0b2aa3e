"""Config fields document themselves: the string under a dataclass field is its help, unit included.

    @dataclass
    class HarvestConfig:
        contexts_per_batch: int = 16
        \"\"\"Contexts per forward pass.\"\"\"

The CLI takes each option's help from here (`field_help`), so a flag and the field it sets say the same thing,
and a test checks that every field of every config has one. Read from the source with `ast`, torch-free.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from functools import cache

from .errors import ThoughtscopeError


@cache
def _own_docs(cls: type) -> dict[str, str]:
    """The field docstrings written in the body of `cls` itself (not its bases)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # pragma: no cover - classes made at run time
        return {}
    node = ast.parse(source).body[0]
    docs: dict[str, str] = {}
    body = getattr(node, "body", [])
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """Every documented field of a dataclass, its bases' included (a subclass's own text wins)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        out.update(_own_docs(klass))
    return out


def field_help(cls: type, name: str, extra: str = "") -> str:
    """The help text of one field, for a CLI option; `extra` is appended (e.g. an old flag's name)."""
    names = {f.name for f in dataclasses.fields(cls)}
    if name not in names:
        raise ThoughtscopeError(f"{cls.__name__} has no field {name!r}")
    doc = field_docs(cls).get(name)
    if not doc:
        raise ThoughtscopeError(f"{cls.__name__}.{name} has no docstring: document the field (with its unit)")
    return f"{doc} {extra}".strip()


def undocumented(cls: type) -> list[str]:
    """The fields of a dataclass that have no docstring (a test keeps this empty for every config)."""
    docs = field_docs(cls)
    return [f.name for f in dataclasses.fields(cls) if f.init and not docs.get(f.name)]
