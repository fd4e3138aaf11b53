"""Checks of hyperparameters at construction, shared by the solvers, adjoints and layers.

Each check returns the value normalised to a plain Python ``int``/``float``/``bool``
(numpy scalars included), so that the frozen option objects stay hashable and compare equal
whatever scalar type built them. Wrong types raise ``TypeError``, values out of range
``ValueError``; both name the owner (a class or layer name) and the field.

Use in a frozen dataclass::

    def __post_init__(self):
        set_field(self, "history", check_int(self, "history", self.history, minimum=1))
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np


def _owner(owner: Any) -> str:
    if isinstance(owner, str):
        return owner
    return owner.__name__ if isinstance(owner, type) else type(owner).__name__


def _scalar(owner, field, value):
    """A concrete 0-d numpy or JAX array as its Python scalar; anything else unchanged."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{_owner(owner)}: {field} is a traced value; options are fixed when the object "
            "is built, so pass a concrete Python number (build it outside jit/grad)."
        )
    if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
        return np.asarray(value).item()
    return value


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def _show(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_int(owner, field: str, value, *, minimum: int | None = None,
              allow_none: bool = False) -> int | None:
    """``value`` as a Python int; accepts Python and numpy integers (and concrete 0-d integer
    arrays), never bools or floats."""
    if value is None and allow_none:
        return None
    value = _scalar(owner, field, value)
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        none = " or None" if allow_none else ""
        hint = ""
        if isinstance(value, numbers.Real) and not _is_bool(value) and float(value).is_integer():
            hint = f"; pass {field}={int(value)}"
        raise TypeError(
            f"{_owner(owner)}: {field} must be an integer{none}, got {_show(value)}{hint}."
        )
    value = int(value)
    if minimum is not None and value < minimum:
        none = " or None" if allow_none else ""
        raise ValueError(f"{_owner(owner)}: {field} must be >= {minimum}{none}, got {value}.")
    return value


def check_float(owner, field: str, value, *, minimum: float | None = None,
                maximum: float | None = None, open_min: bool = False, open_max: bool = False,
                allow_none: bool = False) -> float | None:
    """``value`` as a finite Python float in the given range; accepts ints and numpy/concrete
    0-d arrays, never bools.

    ``open_min``/``open_max`` exclude the bound itself: ``minimum=0, open_min=True`` is
    ``value > 0``.
    """
    if value is None and allow_none:
        return None
    value = _scalar(owner, field, value)
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{_owner(owner)}: {field} must be a real number, got {_show(value)}."
        )
    value = float(value)
    lo = "" if minimum is None else f"{'(' if open_min else '['}{minimum:g}"
    hi = "" if maximum is None else f"{maximum:g}{')' if open_max else ']'}"
    if minimum is not None and maximum is not None:
        where = f"in {lo}, {hi}"
    elif minimum is not None:
        where = f"{'>' if open_min else '>='} {minimum:g}"
    elif maximum is not None:
        where = f"{'<' if open_max else '<='} {maximum:g}"
    else:
        where = "finite"
    bad = not math.isfinite(value)
    if minimum is not None:
        bad |= value <= minimum if open_min else value < minimum
    if maximum is not None:
        bad |= value >= maximum if open_max else value > maximum
    if bad:
        # A range with both ends already says finite.
        finite = "finite and " if (minimum is None) != (maximum is None) else ""
        raise ValueError(f"{_owner(owner)}: {field} must be {finite}{where}, got {value!r}.")
    return value


def check_bool(owner, field: str, value) -> bool:
    """``value`` as a Python bool; accepts ``True``/``False`` and numpy bools only."""
    if not _is_bool(value):
        raise TypeError(
            f"{_owner(owner)}: {field} must be True or False, got {_show(value)}."
        )
    return bool(value)


def check_choice(owner, field: str, value, choices: Iterable):
    """``value`` if it is one of ``choices``."""
    choices = tuple(choices)
    try:
        ok = any(type(value) is type(c) and value == c for c in choices)
    except Exception:  # e.g. an array: ambiguous truth value
        ok = False
    if not ok:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{_owner(owner)}: {field} must be one of {options}, got {value!r}.")
    return value


def check_tolerances(owner, rtol, atol) -> tuple[float, float]:
    """``(rtol, atol)``: finite, non-negative and not both zero."""
    rtol = check_float(owner, "rtol", rtol, minimum=0.0)
    atol = check_float(owner, "atol", atol, minimum=0.0)
    if rtol == 0 and atol == 0:
        raise ValueError(
            f"{_owner(owner)}: rtol and atol are both zero, so no solve could ever succeed; "
            "make one of them positive."
        )
    return rtol, atol


# Steps are counted in int32 on the device, and a fallback solver may double a budget.
MAX_STEPS_LIMIT = 2**29


def check_max_steps(owner, value, field: str = "max_steps", *,
                    allow_none: bool = False) -> int | None:
    """A step budget (``max_steps`` and its kin): an integer in ``[1, MAX_STEPS_LIMIT]``."""
    value = check_int(owner, field, value, minimum=1, allow_none=allow_none)
    if value is not None and value > MAX_STEPS_LIMIT:
        raise ValueError(
            f"{_owner(owner)}: {field}={value} is more steps than a solve can count (at most "
            f"{MAX_STEPS_LIMIT}, counted in int32 on the device); a budget that large never "
            "ends in practice: use a smaller one, and a solver that converges.")
    return value


def check_precision(owner, value, field: str = "precision") -> str | None:
    """A matmul precision for ``jax.default_matmul_precision``: None, one of its names
    (``"highest"``, ``"float32"``, ...) or a ``jax.lax.Precision``; returned as the name."""
    if value is None:
        return None
    if isinstance(value, jax.lax.Precision):
        value = {"DEFAULT": "default", "HIGH": "high", "HIGHEST": "highest"}[value.name]
    try:
        with jax.default_matmul_precision(value):
            pass
    except (ValueError, TypeError):
        raise ValueError(
            f"{_owner(owner)}: {field} must be None, 'default', 'high', 'highest' (or another "
            f"name jax.default_matmul_precision accepts, e.g. 'float32'), got {value!r}."
        ) from None
    return value


def is_hashable(*objs) -> bool:
    """Whether ``objs`` can be static arguments of ``jax.jit`` (a cache key)."""
    try:
        hash(objs)
    except TypeError:
        return False
    return True


def set_field(obj, field: str, value) -> None:
    """Store a normalised value on a frozen dataclass (from its ``__post_init__``)."""
    object.__setattr__(obj, field, value)
