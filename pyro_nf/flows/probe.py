"""A short check of a user's flow where it is given, before it trains on anything.

A layer that changes the dimension, returns an unsummed log-det, gets the log-det's sign
wrong or has an inverse that does not invert would otherwise fail deep inside torch or
Pyro, or train to a confidently wrong posterior. `probe_flow` runs each layer of a
freshly built stack on a few random points, in float64 on a copy whose parameters are
moved off their (often identity) start, where a wrong log-det shows, and raises one error
naming the layer and what is wrong.
"""

from __future__ import annotations

import copy
import itertools

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor, nn
from torch.autograd.functional import jacobian

from .core import FlowLayer, FlowStack, _layer_has_inverse, _layer_pass

__all__ = ["probe_flow"]

#: Random points each layer is run on.
PROBE_POINTS = 3
#: The autograd Jacobian is compared up to this dimension (dim backward passes a point).
JACOBIAN_MAX_DIM = 16
#: Spread of the noise added to the copy's parameters: off an identity start, small
#: enough to keep a layer's parametrisation in its usual range.
PARAMETER_NOISE = 0.1
#: Tolerance of the float64 comparisons (absolute and relative).
TOLERANCE = 1e-5


def probe_flow(flow: FlowStack, dim: int, *, context_dim: int = 0, name: str = "flow") -> None:
    """Check that every layer of `flow` is a bijection of `dim`-vectors with its log-det.

    On `PROBE_POINTS` standard-normal points (and contexts), layer by layer, in float64
    on a copy with perturbed parameters: the layer is a protocol layer or a Pyro
    `TransformModule`; it returns `(y, log_det)`, `y` of the input's shape and `log_det`
    of its batch shape, both finite; up to 16 dimensions, `log_det` equals the log|det|
    of the autograd Jacobian; where it has an inverse, the inverse returns the input and
    the forward map's log-det. The flow itself and the global random state are left as
    they were.

    Parameters
    ----------
    flow : FlowStack
        The stack to check.
    dim : int
        Dimension of the vectors.
    context_dim : int
        Size of the context the layers read (0: none).
    name : str
        The flow's name, for the messages.

    Raises
    ------
    TypeError
        A layer of the wrong kind, or a method returning the wrong kind of object.
    ValueError
        A layer that computes the wrong thing: the message names the layer and what.

    Examples
    --------
    >>> from pyro_nf.flows import InvertiblePlanar
    >>> probe_flow(FlowStack([InvertiblePlanar(3)]), 3)
    >>> class Doubling(torch.nn.Module):  # y = 2 x, the log-det's sign flipped
    ...     def forward_and_log_det(self, x):
    ...         return 2 * x, -x.size(-1) * x.new_full(x.shape[:-1], 2.0).log()
    >>> probe_flow(FlowStack([Doubling()]), 3)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: layer 0 (Doubling) of flow 'flow': its log-det -2.079 ... sign flipped?)...
    """
    _check_layer_kinds(flow, name)
    generator = torch.Generator().manual_seed(0)  # on the CPU: the caller's stream untouched
    probe = _perturbed_float64_copy(flow, generator)
    tensors = itertools.chain(probe.parameters(), probe.buffers())
    device = next(tensors, torch.empty(0)).device  # where the builder put the layers
    x = torch.randn(PROBE_POINTS, dim, dtype=torch.float64, generator=generator).to(device)
    context = None
    if context_dim:
        shape = (PROBE_POINTS, context_dim)
        context = torch.randn(shape, dtype=torch.float64, generator=generator).to(device)
    for index, layer in enumerate(probe.layers):
        where = f"layer {index} ({type(layer).__name__}) of flow {name!r}"
        x = _probe_layer(layer, x, context, where)


def _check_layer_kinds(flow: FlowStack, name: str) -> None:
    for index, layer in enumerate(flow.layers):
        if not isinstance(layer, FlowLayer | TransformModule):
            raise TypeError(
                f"layer {index} of flow {name!r} is a {type(layer).__name__}; a flow layer "
                "has forward_and_log_det(x) -> (y, log_det) (and inverse_and_log_det where "
                "it has an inverse) or is a Pyro TransformModule"
            )


def _perturbed_float64_copy(flow: FlowStack, generator: torch.Generator) -> FlowStack:
    probe = copy.deepcopy(flow).double()
    with torch.no_grad():
        for parameter in probe.parameters():
            noise = torch.randn(parameter.shape, dtype=parameter.dtype, generator=generator)
            parameter.add_(PARAMETER_NOISE * noise.to(parameter.device))
    return probe


def _probe_layer(layer: nn.Module, x: Tensor, context: Tensor | None, where: str) -> Tensor:
    """Check one layer at the points `x`; return its output there."""
    with torch.no_grad():
        y, log_det = _checked_pass(layer, x, context, where, inverse=False)
    if x.size(-1) <= JACOBIAN_MAX_DIM:
        _check_jacobian(layer, x, context, log_det, where)
    if _layer_has_inverse(layer):
        _check_inverse(layer, x, y, context, log_det, where)
    return y


def _checked_pass(
    layer: nn.Module, x: Tensor, context: Tensor | None, where: str, inverse: bool
) -> tuple[Tensor, Tensor]:
    method = "inverse_and_log_det" if inverse else "forward_and_log_det"
    out = _layer_pass(layer, x, context, inverse)
    if not (isinstance(out, tuple | list) and len(out) == 2 and all(map(torch.is_tensor, out))):
        kind = f"a {len(out)}-tuple" if isinstance(out, tuple | list) else type(out).__name__
        raise TypeError(f"{where}: {method} must return a pair (y, log_det) of tensors, got {kind}")
    y, log_det = out
    if y.shape != x.shape:
        raise ValueError(
            f"{where}: {method} maps a {tuple(x.shape)} input to shape {tuple(y.shape)}; a "
            f"flow layer is a bijection of {x.size(-1)}-vectors, so it keeps the shape"
        )
    if log_det.shape != x.shape[:-1]:
        raise ValueError(
            f"{where}: {method} returned a log-det of shape {tuple(log_det.shape)} for a "
            f"{tuple(x.shape)} input; it must be log|det J| summed over the last dimension, "
            f"one per point: shape {tuple(x.shape[:-1])}"
        )
    if not (torch.isfinite(y).all() and torch.isfinite(log_det).all()):
        raise ValueError(f"{where}: {method} returned non-finite values at N(0, I) points")
    return y, log_det


def _check_jacobian(
    layer: nn.Module, x: Tensor, context: Tensor | None, log_det: Tensor, where: str
) -> None:
    for i in range(len(x)):
        point_context = None if context is None else context[i : i + 1]

        def one_point(v: Tensor, c: Tensor | None = point_context) -> Tensor:
            return _layer_pass(layer, v.unsqueeze(0), c, inverse=False)[0].squeeze(0)

        expected = torch.linalg.slogdet(jacobian(one_point, x[i]))[1]
        got = log_det[i]
        if not torch.isclose(got, expected, rtol=TOLERANCE, atol=TOLERANCE):
            flipped = torch.isclose(-got, expected, rtol=TOLERANCE, atol=TOLERANCE)
            hint = " (its negative: is the sign flipped?)" if flipped else ""
            raise ValueError(
                f"{where}: its log-det {got.item():.4g} at a random point differs from "
                f"log|det J| of the autograd Jacobian there, {expected.item():.4g}{hint}; a "
                "wrong log-det trains the flow to a wrong posterior"
            )


def _check_inverse(
    layer: nn.Module, x: Tensor, y: Tensor, context: Tensor | None, log_det: Tensor, where: str
) -> None:
    with torch.no_grad():
        x_back, log_det_back = _checked_pass(layer, y.clone(), context, where, inverse=True)
    error = (x_back - x).abs().max().item()
    if not torch.allclose(x_back, x, rtol=TOLERANCE, atol=TOLERANCE):
        raise ValueError(
            f"{where}: inverse_and_log_det does not invert forward_and_log_det: "
            f"max |inverse(forward(x)) - x| = {error:.3g} at random points"
        )
    if not torch.allclose(log_det_back, log_det, rtol=TOLERANCE, atol=TOLERANCE):
        raise ValueError(
            f"{where}: inverse_and_log_det must return the forward map's log-det at the "
            f"point it returns; it gave {log_det_back[0].item():.4g} where the forward pass "
            f"gave {log_det[0].item():.4g}"
        )
