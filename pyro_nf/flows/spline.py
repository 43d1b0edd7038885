"""Neural spline flow layers (Durkan et al. 2019): monotone rational-quadratic splines.

One kernel (`_rational_quadratic_spline`) and one layer class serve the guides and the
VAE: the spline's parameters come from an autoregressive network of the vector (guides)
or of the vector and the encoder's context (VAE); on one dimension the guides' layer is
the same spline element-wise.

Two tail forms. Durkan et al.'s spline maps `[-bound, bound]` onto itself and is the
identity outside (``tails="identity"``, the VAE's). The guides' default,
``tails="linear"``, also learns each coordinate's output interval and both end
derivatives, and continues linearly past the ends at those slopes. With the interval
fixed, a coordinate whose posterior has one light tail (log tau in eight schools) is
compressed inside the interval and must then climb back to the identity in the last
bin: a ramp of slope near 6 that the ELBO hardly sees (0.3% of draws) but that NUTS in
the flow's base space (NeuTra) does, as divergences (docs/neutra.md).

The default tail bound of 3 is in standardised coordinates (the guide's loc/scale, or
the VAE encoder's, carry the location and size), so it does not cut off mass the way a
bound on raw coordinates does; a wider bound trained worse (docs/choosing.md, "Measured
choices"). The VAE's flow acts on the same standardised base draws, of which `[-3, 3]`
holds 99.7%.

The family's options and their validators live here: `hidden_dims`, `count_bins`
(`check_count_bins`), `bound` and `tails` (`check_tails`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pyro.distributions.torch_transform import TransformModule
from pyro.nn import AutoRegressiveNN, ConditionalAutoRegressiveNN
from torch import Tensor, nn
from torch.distributions import constraints

from pyro_nf.checks import check_int, check_positive, check_sizes

from .core import FlowStack, OnePassTransform, inverse_softplus
from .nn import autoregressive_net, default_hidden_dims
from .registry import FlowSpec, check_min_dim, register_flow

__all__ = [
    "SPLINE_TAILS",
    "RationalQuadraticSpline",
    "RationalQuadraticSplineAutoregressive",
    "check_count_bins",
    "check_tails",
    "spline_flow",
    "spline_layer",
]

#: Floors on every bin's width and height (as fractions of the interval) and on every
#: interior knot derivative, as in Pyro's and Durkan et al.'s implementations.
_MIN_BIN_SIZE = 1e-3
_MIN_DERIVATIVE = 1e-3

#: Default number of bins and tail bound (standardised units; see the module docstring).
COUNT_BINS = 8
BOUND = 3.0
#: The tail forms: Durkan et al.'s identity tails, and linear tails past a learned output
#: interval (see `_rational_quadratic_spline`).
SPLINE_TAILS = ("identity", "linear")
#: A layer's default tail form: Durkan et al.'s.
TAILS = "identity"


def check_count_bins(name: str, value: object) -> int:
    """``value`` as a number of spline bins (an int >= 2), or an error naming ``name``.

    Examples
    --------
    >>> check_count_bins("count_bins", 8)
    8
    """
    # One bin with unit end slopes is the identity map: a spline needs two to bend.
    return check_int(name, value, minimum=2)


def check_tails(name: str, value: object) -> str:
    """``value`` if it is one of `SPLINE_TAILS`, or an error naming ``name``.

    Examples
    --------
    >>> check_tails("tails", "linear")
    'linear'
    >>> check_tails("tails", "flat")
    Traceback (most recent call last):
    ...
    ValueError: tails must be one of ('identity', 'linear'), got 'flat'
    """
    if not isinstance(value, str):
        kind = type(value).__name__
        raise TypeError(f"{name} must be one of {SPLINE_TAILS} (a str), got {value!r} ({kind})")
    if value not in SPLINE_TAILS:
        raise ValueError(f"{name} must be one of {SPLINE_TAILS}, got {value!r}")
    return value


def num_spline_params(count_bins: int, tails: str = "identity") -> int:
    """Raw parameters per coordinate: `K` widths, `K` heights, the knot derivatives
    (`K - 1` interior ones; with linear tails all `K + 1`, and a shift and a log-scale of
    the output interval)."""
    return 3 * count_bins - 1 if tails == "identity" else 3 * count_bins + 3


def _spline_table(raw: Tensor, bound: float, tails: str = "identity") -> Tensor:
    """Knots and knot derivatives from raw parameters `(..., P, D)` (`num_spline_params`).

    Returns shape `(..., 3, K + 1, D)`: the x positions of the knots, their y positions,
    and the derivatives there. With identity tails the y knots span `[-bound, bound]` and
    both end derivatives are 1; with linear tails the y interval is `shift + scale *
    [-bound, bound]` and the end derivatives are learned.
    """
    linear = tails == "linear"
    num_bins = (raw.size(-2) - 3) // 3 if linear else (raw.size(-2) + 1) // 3
    # Widths and heights together, shape (..., 2, K, D): a softmax over each row of K
    # bins, floored, then cumulated and mapped onto [-bound, bound].
    sizes = raw[..., : 2 * num_bins, :].unflatten(-2, (2, num_bins))
    sizes = torch.softmax(sizes, dim=-2) * (1 - _MIN_BIN_SIZE * num_bins) + _MIN_BIN_SIZE
    knots = F.pad(torch.cumsum(sizes, dim=-2), (0, 0, 1, 0)) * (2 * bound) - bound
    if linear:
        derivatives = F.softplus(raw[..., 2 * num_bins : 3 * num_bins + 1, :]) + _MIN_DERIVATIVE
        shift, log_scale = raw[..., 3 * num_bins + 1, :], raw[..., 3 * num_bins + 2, :]
        y_knots = shift.unsqueeze(-2) + log_scale.exp().unsqueeze(-2) * knots[..., 1, :, :]
        knots = torch.stack([knots[..., 0, :, :], y_knots], dim=-3)
    else:
        derivatives = F.pad(
            F.softplus(raw[..., 2 * num_bins :, :]) + _MIN_DERIVATIVE, (0, 0, 1, 1), value=1.0
        )
    return torch.cat([knots, derivatives.unsqueeze(-3)], dim=-3)


def _rational_quadratic_spline(
    x: Tensor, raw: Tensor, bound: float, inverse: bool = False, tails: str = "identity"
) -> tuple[Tensor, Tensor]:
    r"""Monotone rational-quadratic spline (Durkan et al. 2019) on `[-bound, bound]`.

    Acts element-wise on `x` of shape `(..., D)`. With ``tails="identity"`` (Durkan et
    al.) the spline maps the interval onto itself and is the identity outside it, with
    unit slope at both ends so that the map and its slope are continuous there; `raw` of
    shape `(..., 3K - 1, D)` (batch shape that of `x`) holds each coordinate's
    unconstrained parameters: `K` bin widths and `K` bin heights (softmax-normalised)
    then the `K - 1` interior knot derivatives (softplus). With ``tails="linear"`` the
    output interval is `shift + exp(log_scale) * [-bound, bound]` and the map continues
    linearly past each end at that end's derivative; `raw` is `(..., 3K + 3, D)`: the
    widths, the heights, all `K + 1` knot derivatives, then `shift` and `log_scale`.
    All-zero widths, heights (and shift and log-scale) with derivatives
    `softplus^{-1}(1 - 1e-3)` give the identity map (`_identity_spline_params`).

    Returns the output and log|det J| of the *forward* map summed over the last dimension
    (for `inverse=True`, evaluated at the returned point). Inside a bin of width
    $w$, height $h$, slope $s = h / w$ and knot derivatives $d_0, d_1$, with
    $\theta = (x - x_0)/w$:

    $$
    y = y_0 + \frac{h\,(s\theta^2 + d_0\theta(1-\theta))}{s + (d_0 + d_1 - 2s)\,
    \theta(1-\theta)},
    $$

    and the inverse takes the root of the quadratic in $\theta$ in its stable form
    $\theta = 2c / (-b - \sqrt{b^2 - 4ac})$.
    """
    table = _spline_table(raw, bound, tails)
    # The input's axis of the table: x knots forward, y knots for the inverse.
    axis = 1 if inverse else 0
    clamped = torch.clamp(x, table[..., axis, 0, :], table[..., axis, -1, :])
    # Bin index: the number of interior knots (on the input's axis) at or below the input.
    index = (clamped.unsqueeze(-2) >= table[..., axis, 1:-1, :]).sum(-2, keepdim=True)
    index = torch.cat([index, index + 1], dim=-2).unsqueeze(-3).expand_as(table[..., :2, :])
    left, right = table.gather(-2, index).unbind(-2)  # each (..., 3, D)
    x0, y0, d0 = left.unbind(-2)
    x1, y1, d1 = right.unbind(-2)
    width, height = x1 - x0, y1 - y0
    slope = height / width
    curvature = d0 + d1 - 2 * slope
    if inverse:
        dy = clamped - y0
        a = height * (slope - d0) + dy * curvature
        b = height * d0 - dy * curvature
        # c = -slope * dy; b^2 - 4ac > 0 in a bin of a monotone spline.
        theta = 2 * slope * dy / (b + torch.sqrt(b.square() + 4 * a * slope * dy))
    else:
        theta = (clamped - x0) / width
    theta_sq, one_minus = theta.square(), 1 - theta
    theta_1m = theta * one_minus
    denominator = slope + curvature * theta_1m
    if inverse:
        out = x0 + theta * width
    else:
        out = y0 + height * (slope * theta_sq + d0 * theta_1m) / denominator
    # dy/dx = s^2 (d1 θ^2 + 2 s θ(1-θ) + d0 (1-θ)^2) / denominator^2
    slope_numerator = d1 * theta_sq + 2 * slope * theta_1m + d0 * one_minus.square()
    log_slope = torch.log(slope.square() * slope_numerator / denominator.square())
    # Beyond an end the map is linear at that end's knot derivative (for identity tails
    # the identity: the end knots lie on the diagonal with derivative 1).
    above = x > clamped
    end = torch.where(above.unsqueeze(-2), table[..., -1, :], table[..., 0, :])  # (..., 3, D)
    end_x, end_y, end_slope = end.unbind(-2)
    if inverse:
        tail = end_x + (x - end_y) / end_slope
    else:
        tail = end_y + (x - end_x) * end_slope
    is_inside = clamped == x
    out = torch.where(is_inside, out, tail)
    log_det = torch.where(is_inside, log_slope, end_slope.log()).sum(-1)
    return out, log_det


def _identity_spline_params(count_bins: int, dim: int, tails: str = "identity") -> Tensor:
    """Raw spline parameters, shape `(num_spline_params(K, tails), dim)`, of the identity
    map."""
    raw = torch.zeros(num_spline_params(count_bins, tails), dim)
    derivatives = slice(2 * count_bins, 3 * count_bins + (1 if tails == "linear" else -1))
    raw[derivatives] = inverse_softplus(torch.tensor(1 - _MIN_DERIVATIVE))
    return raw


class _RationalQuadraticSplineBase(OnePassTransform, TransformModule):
    """A rational-quadratic spline layer on vectors; subclasses say where the raw
    parameters come from (`_raw`)."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    def __init__(self, dim: int, count_bins: int, bound: float, tails: str) -> None:
        super().__init__(cache_size=1)
        self.dim, self.count_bins, self.bound = dim, count_bins, bound
        self.tails = check_tails("tails", tails)

    def _raw(self, x: Tensor, context: Tensor | None) -> Tensor:
        """Unconstrained parameters for input `x`, shape
        `(*x.shape[:-1], num_spline_params(K, tails), D)`."""
        raise NotImplementedError

    def _spline(self, x: Tensor, raw: Tensor, inverse: bool = False) -> tuple[Tensor, Tensor]:
        return _rational_quadratic_spline(x, raw, self.bound, inverse, self.tails)

    def forward_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """`(y, log|det J|)` in one pass."""
        return self._spline(x, self._raw(x, context))

    def inverse_and_log_det(
        self, y: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """`(x, log|det J| at x)`."""
        return self._spline(y, self._raw(y, context), inverse=True)


class RationalQuadraticSpline(_RationalQuadraticSplineBase):
    """Element-wise rational-quadratic spline (Durkan et al. 2019), one per coordinate.

    Identity outside `[-bound, bound]` and, as built, inside too (equal bins, unit knot
    derivatives). The layer for one-dimensional latents.

    Examples
    --------
    >>> layer = RationalQuadraticSpline(2)
    >>> x = 4 * torch.randn(5, 2)
    >>> y, log_det = layer.forward_and_log_det(x)
    >>> torch.allclose(y, x, atol=1e-5), torch.allclose(log_det, torch.zeros(5), atol=1e-5)
    (True, True)
    """

    def __init__(
        self, dim: int, count_bins: int = COUNT_BINS, bound: float = BOUND, tails: str = TAILS
    ) -> None:
        super().__init__(dim, count_bins, bound, tails)
        self.unnormalized = nn.Parameter(_identity_spline_params(count_bins, dim, tails))

    def _raw(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.unnormalized.expand(*x.shape[:-1], -1, -1)


class RationalQuadraticSplineAutoregressive(_RationalQuadraticSplineBase):
    """Autoregressive rational-quadratic spline layer (Durkan et al. 2019).

    Coordinate `i`'s spline parameters are the outputs of `arn` (a Pyro
    `AutoRegressiveNN` with one parameter block of `3K - 1` rows, or a
    `ConditionalAutoRegressiveNN` that also reads a context) on the coordinates before
    `i` in the network's order. The forward pass takes one network evaluation; the
    inverse takes one per coordinate.

    Examples
    --------
    >>> layer = spline_layer(3, hidden_dims=(16,))
    >>> x = torch.randn(5, 3)
    >>> y, log_det = layer.forward_and_log_det(x)
    >>> torch.allclose(layer.inv(y), x, atol=1e-5)
    True
    """

    autoregressive = True

    def __init__(
        self,
        dim: int,
        arn: AutoRegressiveNN | ConditionalAutoRegressiveNN,
        count_bins: int = COUNT_BINS,
        bound: float = BOUND,
        tails: str = TAILS,
    ) -> None:
        super().__init__(dim, count_bins, bound, tails)
        self.arn = arn

    def _raw(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.arn(x) if context is None else self.arn(x, context)

    def inverse_and_log_det(
        self, y: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """`(x, log|det J| at x)`, in `dim` network passes."""
        # x_i depends on x_<i only through the network, so fixing the coordinates one by
        # one in the network's order recovers x in dim passes; the last one also gives
        # the log-det, and its gradients are exact (the Jacobian of a pass in x is
        # strictly triangular, so the dependence on the zero start vanishes).
        x = torch.zeros_like(y)
        for _ in range(self.dim - 1):
            x, _ = self._spline(y, self._raw(x, context), inverse=True)
        return self._spline(y, self._raw(x, context), inverse=True)


def spline_layer(
    dim: int,
    hidden_dims: Sequence[int],
    count_bins: int = COUNT_BINS,
    bound: float = BOUND,
    reverse: bool = False,
    context_dim: int = 0,
    tails: str = TAILS,
) -> TransformModule:
    """One rational-quadratic spline layer (autoregressive; element-wise on one dimension).

    Starts at the identity (equal bins, unit knot derivatives). With ``tails="identity"``
    it maps `[-bound, bound]` onto itself and is the identity outside; with
    ``tails="linear"`` the output interval and the end slopes are learned too, and the map
    is linear beyond the ends (see the module docstring). `reverse` and `context_dim` as
    in `iaf_layer`.

    The spline is our own one-pass kernel (`_rational_quadratic_spline`) rather than
    Pyro's `SplineAutoregressive`, for two reasons. Speed: Pyro's spline op runs many
    small tensor ops (a comparison search per table, seven gathers, masked blends) forward
    and backward, and it was most of a spline layer's cost; this kernel takes about half
    its time (docs/choosing.md, "Measured choices"). Fidelity: Pyro's default order is the
    rational-*linear* spline (4K - 1 parameters per coordinate, end slopes 0.999), while
    the neural spline flow of Durkan et al. (2019) is rational-quadratic (3K - 1
    parameters, unit end slopes so the map is C1 into the identity tails), which is what
    this computes.

    Examples
    --------
    >>> spline_layer(1, hidden_dims=(8,)).unnormalized.shape
    torch.Size([23, 1])
    """
    if dim == 1 and not context_dim:
        return RationalQuadraticSpline(1, count_bins=count_bins, bound=bound, tails=tails)
    if context_dim:  # an element-wise spline would ignore the context
        check_min_dim("spline", 2, dim)
    num_params = num_spline_params(count_bins, tails)
    net = autoregressive_net(dim, hidden_dims, [num_params], reverse, context_dim)
    with torch.no_grad():  # the output's bias: the identity spline's parameters
        net.layers[-1].bias.view(num_params, dim).copy_(
            _identity_spline_params(count_bins, dim, tails)
        )
    return RationalQuadraticSplineAutoregressive(dim, net, count_bins, bound, tails)


def spline_flow(
    dim: int,
    num_layers: int,
    *,
    context_dim: int = 0,
    hidden_dims: Sequence[int] | None = None,
    count_bins: int = COUNT_BINS,
    bound: float = BOUND,
    tails: str | None = None,
) -> FlowStack:
    """The spline family's builder: `num_layers` of `spline_layer`, alternating the order.

    `hidden_dims` defaults to `default_hidden_dims(dim)`; `tails` to ``"linear"`` for
    plain layers (the guides', see the module docstring) and to Durkan et al.'s
    ``"identity"`` for layers reading a context (the VAE's, with which docs/vae.md's
    results were measured).

    Examples
    --------
    >>> [layer.tails for layer in spline_flow(3, 2).layers]
    ['linear', 'linear']
    >>> spline_flow(3, 1, context_dim=2).layers[0].tails
    'identity'
    """
    hidden_dims = hidden_dims or default_hidden_dims(dim)
    tails = tails or (TAILS if context_dim else "linear")
    return FlowStack(
        [
            spline_layer(dim, hidden_dims, count_bins, bound, i % 2 == 1, context_dim, tails)
            for i in range(num_layers)
        ]
    )


SPLINE = register_flow(
    FlowSpec(
        "spline",
        spline_flow,
        num_layers=2,
        lr=5e-3,
        options={
            "hidden_dims": check_sizes,
            "count_bins": check_count_bins,
            "bound": check_positive,
            "tails": check_tails,
        },
        probe=False,
    )
)
