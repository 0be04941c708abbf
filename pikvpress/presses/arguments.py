"""Argument checks the presses share: each raises ``ValueError`` naming the argument and what is allowed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def check_number(name: str, value: Any, low: float, high: float, *, high_open: bool = True) -> None:
    """``value`` a real number in ``[low, high)`` (``[low, high]`` when not ``high_open``)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and low <= value
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        raise ValueError(f"{name} must be in [{low}, {high}{')' if high_open else ']'}, got {value!r}")


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
