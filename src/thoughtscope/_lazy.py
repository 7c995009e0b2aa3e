"""Packages whose names load on first use (PEP 562), so importing a torch-free config module of a package (what the
CLI reads its defaults and help from) does not run the package's torch-importing modules.

    from .._lazy import lazy_names
    __getattr__, __dir__ = lazy_names(__name__, {"sweep": "sweep", "FeatureScore": "..features"})

A public name that is also a submodule's name (`probes.sweep`, `steer.generate`) stays the function, as when the
package imported every name eagerly: importing the submodule would otherwise rebind the package's attribute.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from collections.abc import Callable
from typing import Any


def lazy_names(
    package: str, where: dict[str, str], *, renamed: dict[str, str] | None = None
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(__getattr__, __dir__) for `package`: `where` maps each public name to its module (relative, e.g. "sweep" or
    "..features"); `renamed` maps old names to new ones, which still resolve with a DeprecationWarning."""
    renamed = renamed or {}

    def module_of(name: str) -> str:
        target = where[name]
        return target if target.startswith(".") else f".{target}"

    def getattr_(name: str) -> Any:
        if name in renamed:
            warnings.warn(f"{package}.{name} is deprecated: use {renamed[name]}", DeprecationWarning, stacklevel=2)
            return getattr_(renamed[name])
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module_of(name), package), name)
        setattr(sys.modules[package], name, value)
        return value

    def dir_() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    class _Package(types.ModuleType):
        def __setattr__(self, name: str, value: Any) -> None:
            if name in where and isinstance(value, types.ModuleType):
                return  # a public name never becomes the submodule of the same name; __getattr__ gives the name
            super().__setattr__(name, value)

    sys.modules[package].__class__ = _Package
    return getattr_, dir_
