"""Old names still accepted for one release: one warning text and one rule for a keyword given under both names.

The vocabulary (docs/architecture.md) renamed keywords whose word meant several things (`batch_size` for texts
per pass, `max_tokens` for five limits, `scale`/`value` for a strength); code written before still runs, warned.
"""

from __future__ import annotations

import warnings

from .errors import ThoughtscopeError


def warn_renamed(old: str, new: str, where: str, stacklevel: int = 3) -> None:
    """A DeprecationWarning pointing `stacklevel` frames up: '<where>: 'old' is now 'new''."""
    warnings.warn(
        f"{where}: {old!r} is now {new!r} (the old name still works for now)", DeprecationWarning, stacklevel=stacklevel
    )


def renamed_keyword(
    new_value,
    old_value,
    *,
    new: str,
    old: str,
    where: str,
    default=None,
    error: type[ThoughtscopeError] = ThoughtscopeError,
    stacklevel: int = 4,
):
    """The value of a keyword given under its new name or its old one (with a warning pointing at the caller of
    the function that took it); both at once is `error`; `default` when neither is given."""
    if old_value is not None:
        warn_renamed(old, new, where, stacklevel)
        if new_value is not None:
            raise error(f"{where}: give {new} only ({old} is its old name)")
        return old_value
    return default if new_value is None else new_value
