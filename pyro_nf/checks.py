"""Argument validators shared by the package: each names the argument, the value and what is
accepted, so that bad input fails where it is given rather than deep inside torch.

One rule for the error's type everywhere: a TypeError for a value of the wrong kind (a
string, a bool or a float where an int is expected), a ValueError for a value of the right
kind outside what is accepted. Integers must be integers (not bools, not floats such as
2.0); numbers must be real and finite (not strings, not bools). A flow family's own
options are checked by validators in its file (`pyro_nf.flows.FlowSpec.options`).
"""

from __future__ import annotations

import math
import numbers
import operator
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "LARGE_FLOW_PARAMETERS",
    "MAX_FLOW_LAYERS",
    "check_int",
    "check_positive",
    "check_probabilities",
    "check_sizes",
    "warn_if_large",
]

#: Most flow layers accepted: each layer is its own module, and its Python overhead is paid
#: on every step (about 2 s a step at this many planar layers; docs/choosing.md).
MAX_FLOW_LAYERS = 1000

#: Flows with more parameters than this are built with a warning: 10M float32
#: parameters are 40 MB, about 160 MB with their gradients and Adam's two moments, and
#: every step reads and writes all of them.
LARGE_FLOW_PARAMETERS = 10_000_000


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
    bounds = [f">= {minimum}"] if minimum is not None else []
    bounds += [f"<= {maximum}"] if maximum is not None else []
    return " and ".join(bounds)


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
    TypeError: num_layers must be >= 1 (an int), got True (bool)
    """
    number = _as_int(value)
    bounds = _range_text(minimum, maximum)
    accepted = f"{bounds} (an int)" if bounds else "an int"
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
    ValueError: bound must be > 0 (a finite number), got -1
    """
    accepted = "> 0" + ("" if maximum is None else f" and <= {maximum:g}") + " (a finite number)"
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


def warn_if_large(flow: nn.Module, spec: Any, dim: int) -> int:
    """Warn when ``flow`` has more than `LARGE_FLOW_PARAMETERS` parameters; return the count.

    The warning names the count and how to reduce it.

    Examples
    --------
    >>> warn_if_large(nn.Linear(3, 3), None, 3)
    12
    """
    count = sum(parameter.numel() for parameter in flow.parameters())
    if count <= LARGE_FLOW_PARAMETERS:
        return count
    options = getattr(spec, "options", ())
    ways = ["fewer layers (num_layers=1)"]
    if "hidden_dims" in options:
        ways.append("narrower networks (hidden_dims=(64, 64), say)")
    if "count_bins" in options:
        ways.append("fewer spline bins (count_bins=4)")
    warnings.warn(
        f"the {getattr(spec, 'name', 'flow')!r} flow on {dim} dimensions has {count:,} "
        f"parameters (more than {LARGE_FLOW_PARAMETERS:,}; {4 * count / 1e6:,.0f} MB in "
        "float32, about 4x that with gradients and Adam's moments), and every step pays for "
        f"all of them. Reduce it with {', '.join(ways)}, or use flow='planar' or 'radial' "
        "(O(dim) parameters a layer) or Pyro's AutoLowRankMultivariateNormal",
        UserWarning,
        stacklevel=3,
    )
    return count
