"""Old names of renamed keywords and attributes, still accepted for a while with a DeprecationWarning.

A slider's or intervention's strength was `value`, `scale` or `factor` in places; it is `strength` everywhere now.
"""

from __future__ import annotations

import functools

from ..errors import SteerError
from ..renamed import renamed_keyword as _renamed_keyword
from ..renamed import warn_renamed


def strength_from(strength, old: dict, where: str, stacklevel: int = 4):
    """The strength given as `strength=` or under an old keyword (value / scale / factor), with a warning
    pointing `stacklevel` frames up (the caller of the public function that took the keyword)."""
    given = {k: v for k, v in old.items() if v is not None}
    for k in given:
        warn_renamed(k, "strength", where, stacklevel=stacklevel)
    if strength is not None and given:
        raise SteerError(f"{where}: give strength only (got strength and {', '.join(given)})")
    return strength if strength is not None else next(iter(given.values()), None)


def renamed_keyword(new_value, old_value, *, new: str, old: str, where: str, default=None):
    """`thoughtscope.renamed.renamed_keyword` with steering's error (both names at once is a SteerError)."""
    return _renamed_keyword(new_value, old_value, new=new, old=old, where=where, default=default, error=SteerError)


def renamed_strength(cls, old: str = "value", position: int = 3):
    """Let `cls(..., <old>=x)` and `obj.<old>` mean `strength` (with a DeprecationWarning): the keyword and
    attribute a class had before strength got one name. `position` is strength's positional index."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kw):
        if old in kw:  # a strength given positionally or as strength= as well is an error
            given = kw.get("strength", args[position] if len(args) > position else None)
            kw["strength"] = strength_from(given, {old: kw.pop(old)}, cls.__name__)
        init(self, *args, **kw)

    cls.__init__ = __init__
    alias(cls, old, lambda e: e.strength, lambda e, v: setattr(e, "strength", v))
    return cls


def alias(cls, old: str, read, write) -> None:
    """`obj.<old>` reads / writes the strength (with a warning): code written before the rename keeps working."""

    def get(self):
        warn_renamed(old, "strength", cls.__name__)
        return read(self)

    def put(self, v):
        warn_renamed(old, "strength", cls.__name__)
        write(self, v)

    setattr(cls, old, property(get, put))
