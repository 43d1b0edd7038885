"""Argument validators shared by the package: each names the argument, the value and what is
accepted, so that bad input fails where it is given rather than deep inside torch.

Integers must be integers (not bools, not floats such as 2.0); numbers must be real and
finite (not strings, not bools).
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["check_int", "check_positive", "check_probabilities", "check_sizes"]


def _is_bool(value: object) -> bool:
    if torch.is_tensor(value):
        return value.dtype == torch.bool
    return isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy.bool_


def _as_int(value: object) -> int | None:
    """``value`` as an int where it is one (int, numpy or 0-d torch integer), else None."""
    if _is_bool(value) or (torch.is_tensor(value) and value.dtype.is_floating_point):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _range_text(minimum: float | None, maximum: float | None) -> str:
    if maximum is None:
        return f">= {minimum}"
    if minimum is None:
        return f"<= {maximum}"
    return f"between {minimum} and {maximum}"


def check_int(
    name: str, value: object, minimum: int | None = None, maximum: int | None = None
) -> int:
    """``value`` as an int, or a TypeError/ValueError naming ``name`` and what is accepted.

    Parameters
    ----------
    name : str
        The argument's name, for the message.
    value : object
        What was given: an int (a numpy or 0-d torch integer also), not a bool or a float.
    minimum, maximum : int, optional
        Inclusive bounds.

    Returns
    -------
    int

    Examples
    --------
    >>> check_int("num_layers", 3, minimum=1)
    3
    >>> check_int("num_layers", True, minimum=1)
    Traceback (most recent call last):
    ...
    TypeError: num_layers must be an int >= 1, got True (bool)
    """
    number = _as_int(value)
    unbounded = minimum is None and maximum is None
    accepted = "an int" + ("" if unbounded else " " + _range_text(minimum, maximum))
    if number is None:
        raise TypeError(f"{name} must be {accepted}, got {value!r} ({type(value).__name__})")
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise ValueError(f"{name} must be {accepted}, got {number}")
    return number


def check_positive(name: str, value: object, maximum: float | None = None) -> float:
    """``value`` as a finite float > 0 (and <= ``maximum``), or an error naming ``name``.

    Parameters
    ----------
    name : str
        The argument's name, for the message.
    value : object
        A real number (a numpy scalar or 0-d tensor also), not a bool or a string.
    maximum : float, optional
        Inclusive upper bound.

    Returns
    -------
    float

    Examples
    --------
    >>> check_positive("init_scale", 0.1)
    0.1
    >>> check_positive("bound", -1)
    Traceback (most recent call last):
    ...
    ValueError: bound must be a finite number > 0, got -1
    """
    accepted = "a finite number > 0" + ("" if maximum is None else f" and <= {maximum:g}")
    is_scalar_tensor = torch.is_tensor(value) and value.dim() == 0
    if _is_bool(value) or not (isinstance(value, numbers.Real) or is_scalar_tensor):
        raise TypeError(f"{name} must be {accepted}, got {value!r} ({type(value).__name__})")
    number = float(value)
    if not (math.isfinite(number) and number > 0) or (maximum is not None and number > maximum):
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    return number


def check_sizes(name: str, value: object) -> tuple[int, ...]:
    """A non-empty sequence of positive ints (layer widths), as a tuple, or an error.

    Examples
    --------
    >>> check_sizes("hidden_dims", [32, 32])
    (32, 32)
    >>> check_sizes("hidden_dims", "32")
    Traceback (most recent call last):
    ...
    TypeError: hidden_dims must be a non-empty sequence of ints >= 1, e.g. (32, 32), got '32' (str)
    """
    accepted = "a non-empty sequence of ints >= 1, e.g. (32, 32)"
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, Tensor)):
        raise TypeError(f"{name} must be {accepted}, got {value!r} ({type(value).__name__})")
    sizes = [_as_int(size) for size in value]
    if None in sizes:
        raise TypeError(f"{name} must be {accepted}, got {value!r}")
    if not sizes or min(sizes) < 1:
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    return tuple(sizes)


def check_probabilities(name: str, value: object) -> Tensor:
    """A 1-D float64 tensor of probabilities in [0, 1], or an error naming ``name``.

    Parameters
    ----------
    name : str
        The argument's name, for the message.
    value : object
        A sequence of numbers or a 1-D tensor (not a string, not NaN).

    Examples
    --------
    >>> check_probabilities("quantiles", [0.05, 0.5, 0.95])
    tensor([0.0500, 0.5000, 0.9500], dtype=torch.float64)
    >>> check_probabilities("quantiles", [float("nan")])
    Traceback (most recent call last):
    ...
    ValueError: quantiles must be a 1-D sequence of numbers in [0, 1], got [nan]
    """
    accepted = "a 1-D sequence of numbers in [0, 1]"
    if isinstance(value, (str, bytes)) or _is_bool(value):
        raise TypeError(f"{name} must be {accepted}, got {value!r} ({type(value).__name__})")
    try:
        probs = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"{name} must be {accepted}, got {value!r} ({type(value).__name__})"
        ) from None
    inside = (probs >= 0) & (probs <= 1)  # False for NaN
    if probs.dim() != 1 or probs.numel() == 0 or not bool(inside.all()):
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    return probs
