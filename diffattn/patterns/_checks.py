"""Argument validation shared by the pattern library: every error names the argument, the bad
value and what is allowed."""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

from ..errors import UserError


def check_positive_int(name: str, value: Any, *, allow_zero: bool = False) -> int:
    """Return ``value`` as an int if it is an integer > 0 (>= 0 with ``allow_zero``), else raise
    :class:`UserError`. Bools are refused (``True`` is not a size); numpy integers are accepted."""
    bound = ">= 0" if allow_zero else ">= 1"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UserError(f"{name} must be an int {bound}, got {value!r} ({type(value).__name__})")
    if value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"{name} must be an int {bound}, got {value}")
    return int(value)


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is a finite int or float (not a bool, a tensor or a string).

    Example:
        >>> is_finite_number(0.5), is_finite_number(True), is_finite_number(float("nan"))
        (True, False, False)
    """
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_given_positive_ints(values: dict[str, Any]) -> None:
    """:func:`check_positive_int` on every ``{name: value}`` that is given (None: not given, a
    default applies), e.g. command-line flags.

    Example:
        >>> check_given_positive_ints({"--steps": 4, "--height": None})
        >>> check_given_positive_ints({"--steps": 0})
        Traceback (most recent call last):
        diffattn.errors.UserError: --steps must be an int >= 1, got 0
    """
    for name, value in values.items():
        if value is not None:
            check_positive_int(name, value)


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> Any:
    if value not in allowed:
        raise UserError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")
    return value


def check_per_axis(name: str, value: Any, kind: type, *, allow_none: bool = False) -> tuple:
    """Normalise a scalar or a 3-tuple (t, h, w) of ``kind`` to a 3-tuple."""
    if isinstance(value, (list, tuple)):
        if len(value) != 3:
            raise UserError(f"{name} must be a single value or a (t, h, w) tuple of 3, got {value!r}")
        items = tuple(value)
    else:
        items = (value, value, value)
    checked = []
    for axis, item in zip("thw", items):
        if item is None and allow_none:
            checked.append(None)
        elif kind is bool:
            if not isinstance(item, bool):
                raise UserError(f"{name}[{axis}] must be a bool, got {item!r} ({type(item).__name__})")
            checked.append(item)
        else:
            checked.append(check_positive_int(f"{name}[{axis}]", item))
    return tuple(checked)


def check_block_size(name: str, value: Any, allowed: Sequence[int] = (16, 32, 64, 128, 256)) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value not in allowed:
        raise UserError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")
    return int(value)
