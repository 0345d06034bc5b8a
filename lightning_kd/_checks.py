"""Type checks of settings that Python would otherwise coerce silently (``bool("no")`` is True)."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np


def check_bool(value: Any, setting: str) -> bool:
    """``value`` if it is a bool (or numpy's), else a TypeError naming ``setting``.

    A string such as ``"no"`` or ``"false"`` is truthy: accepting it would switch the option *on*.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"Expected `{setting}` to be True or False, but got {value!r} ({type(value).__name__}).")


def check_number(value: Any, setting: str) -> float:
    """``float(value)`` for a real number (numpy's included), else a TypeError naming ``setting`` (a bool or a string too)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"Expected `{setting}` to be a number, but got {value!r} ({type(value).__name__}).")
    return float(value)
