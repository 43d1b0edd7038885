"""The model's arguments scanned for non-finite values, so that bad data are named.

Scanning runs no model: a model may hold NaN on purpose (missing values it masks), so a
non-finite argument is only noted here, and named by `fit` if the setup step then fails.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

__all__ = ["nonfinite_arguments"]


def nonfinite_arguments(model: Callable, args: tuple, kwargs: dict) -> tuple[str, ...]:
    """One note per model argument (or tensor inside a list, tuple or dict argument) that
    holds NaN or infinite values, naming it by the model's parameter name where the
    signature tells it.

    Examples
    --------
    >>> def model(x, y=None):
    ...     pass
    >>> nonfinite_arguments(model, (torch.ones(3),), {"y": torch.tensor([1.0, float("nan")])})
    ("argument 'y' holds 1 NaN (first at index (1,))",)
    """
    notes = []
    for label, value in _labelled_arguments(model, args, kwargs):
        for path, tensor in _tensors(label, value):
            note = _describe(path, tensor)
            if note:
                notes.append(note)
    return tuple(notes)


def _labelled_arguments(model: Callable, args: tuple, kwargs: dict) -> list[tuple[str, object]]:
    try:
        bound = inspect.signature(model).bind(*args, **kwargs)
    except (TypeError, ValueError):  # no signature, or one these arguments do not fit
        return [(f"args[{i}]", a) for i, a in enumerate(args)] + list(kwargs.items())
    return list(bound.arguments.items())


def _tensors(label: str, value: object, depth: int = 0) -> Iterator[tuple[str, Tensor]]:
    if torch.is_tensor(value):
        yield label, value
    elif depth < 2 and isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(f"{label}[{i}]", item, depth + 1)
    elif depth < 2 and isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(f"{label}[{key!r}]", item, depth + 1)


def _describe(label: str, tensor: Tensor) -> str | None:
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return None
    with torch.no_grad():
        bad = ~tensor.isfinite()
        if not bad.any():
            return None
        nans = int(tensor.isnan().sum())
        counts = [f"{nans} NaN"] if nans else []
        if int(bad.sum()) > nans:
            counts.append(f"{int(bad.sum()) - nans} infinite")
        first = tuple(int(i) for i in bad.nonzero()[0])
    name = label if label.startswith("args[") else f"'{label}'"
    return f"argument {name} holds {' and '.join(counts)} (first at index {first})"
