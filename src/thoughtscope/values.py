"""What a value read from a user's file may be, checked before it is used: one copy of the rules every reader
applies (a bool is not an int, and 10**400 is an int no float can hold)."""

from __future__ import annotations

import math
from typing import Any


def is_int(v: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fits_float(v: Any) -> bool:
    """A number a float holds (NaN and infinities included; an int beyond any float is not)."""
    if not is_number(v):
        return False
    try:
        float(v)
    except OverflowError:
        return False
    return True


def is_finite(v: Any) -> bool:
    """A number that is finite as a float."""
    return fits_float(v) and math.isfinite(v)
