"""The flow posterior: a diagonal Gaussian pushed through a flow in standardised units.

``z = loc + scale * f(eps)`` with ``eps ~ N(0, I)`` and ``f`` a `FlowStack`.
Sampling returns the log density from the same forward pass, so scoring a guide's own
sample never inverts the flow; any other point is scored through the inverse.

The same map, ``eps -> z``, is a Pyro `Transform` (`FlowTransform`, from
`FlowDistribution.as_transform`): what Pyro's `NeuTraReparam` runs HMC through.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from pyro.distributions import TorchDistribution, constraints
from pyro.distributions.transforms import Transform
from torch import Tensor, nn

from pyro_nf.flows.core import layers_without_inverse

__all__ = ["FlowDistribution", "FlowTransform"]

#: ``flow(x, inverse=False) -> (y, log|det J| of the forward map)``
FlowFn = Callable[..., tuple[Tensor, Tensor]]
#: ``map(x) -> (image, log|det J| of the forward map at the forward map's input)``
MapWithLogDet = Callable[[Tensor], tuple[Tensor, Tensor]]
#: Draws behind the Monte-Carlo ``mean`` and ``variance`` of a flow posterior: their
#: standard errors are 1/64 of the posterior sd and 1/45 of the variance (Gaussian case).
_MOMENT_DRAWS = 4096


def _standard_normal_log_prob(eps: Tensor) -> Tensor:
    return -0.5 * (eps.pow(2).sum(-1) + eps.size(-1) * math.log(2 * math.pi))


@contextmanager
def _detached_parameters(module: nn.Module) -> Iterator[None]:
    """Within the block, every parameter of ``module`` reads as its detached value.

    Each submodule is visited once, so parameters of a network held twice (as Pyro's
    spline layers hold theirs) are swapped and restored exactly once;
    ``torch.func.functional_call`` gets such modules wrong and leaves plain tensors behind.
    """
    saved = []
    for submodule in module.modules():
        for name, param in submodule._parameters.items():
            if param is not None:
                saved.append((submodule, name, param))
                submodule._parameters[name] = param.detach()
    try:
        yield
    finally:
        for submodule, name, param in saved:
            submodule._parameters[name] = param


class ScoresOwnDraws:
    """Mixin: ``rsample`` keeps the log density of its draw, and ``log_prob`` of that very
    tensor returns it, so a guide's own sample is never scored through an inverse.

    Subclasses define ``rsample_and_log_prob`` and ``_log_prob_of`` (any other point).
    """

    _last_sample: tuple[Tensor, Tensor] | None = None

    def rsample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        z, log_q = self.rsample_and_log_prob(sample_shape)
        self._last_sample = (z, log_q)
        return z

    def log_prob(self, value: Tensor) -> Tensor:
        if self._last_sample is not None and value is self._last_sample[0]:
            return self._last_sample[1]
        return self._log_prob_of(value)

    @property
    def mean(self) -> Tensor:
        """Monte-Carlo estimate from 4096 draws (a flow has no closed form); not
        differentiable. Reproducible under `pyro.set_rng_seed`."""
        return self._moment_draws().mean(0)

    @property
    def variance(self) -> Tensor:
        """Monte-Carlo estimate from 4096 draws, as `mean`."""
        return self._moment_draws().var(0)

    @torch.no_grad()
    def _moment_draws(self) -> Tensor:
        return self.rsample_and_log_prob((_MOMENT_DRAWS,))[0]


class FlowDistribution(ScoresOwnDraws, TorchDistribution):
    r"""Law of $z = W(\mu + \sigma \odot f(\varepsilon))$ with $\varepsilon \sim N(0, I)$.

    $W$ is a fixed map ending the construction, the identity by default; a flow guide's
    `pyro_nf.whitening.Whitening` (the Laplace start's affine map), under which the flow
    acts in the coordinates $W$ whitens.

    Parameters
    ----------
    loc : Tensor
        Location $\mu$, shape ``(dim,)``.
    scale : Tensor
        Positive scale $\sigma$, shape ``(dim,)``.
    flow : callable
        ``flow(x, inverse=False) -> (y, log_det)``, e.g. a `FlowStack`.
    batch_shape : sequence of int
        Batch shape (independent copies), as used by vectorised ELBO particles.
    whitening : callable, optional
        $W$, with the same protocol as ``flow`` (default: the identity).

    Examples
    --------
    >>> from pyro_nf.flows import build_flow
    >>> d = FlowDistribution(torch.zeros(2), torch.ones(2), build_flow("planar", 2))
    >>> z = d.rsample((3,))
    >>> d.log_prob(z).shape
    torch.Size([3])
    >>> d.mean.shape, d.variance.shape  # Monte Carlo: a flow has no closed form
    (torch.Size([2]), torch.Size([2]))
    """

    arg_constraints = {
        "loc": constraints.real_vector,
        "scale": constraints.independent(constraints.positive, 1),
    }
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        loc: Tensor,
        scale: Tensor,
        flow: FlowFn,
        batch_shape: Sequence[int] = (),
        validate_args: bool | None = None,
        whitening: FlowFn | None = None,
    ) -> None:
        self.loc = loc
        self.scale = scale
        self.flow = flow
        self.whitening = whitening or _identity
        super().__init__(
            batch_shape=torch.Size(batch_shape),
            event_shape=loc.shape[-1:],
            validate_args=validate_args,
        )

    def rsample_and_log_prob(self, sample_shape: Sequence[int] = ()) -> tuple[Tensor, Tensor]:
        """Draw reparameterised samples and their log densities in one forward pass."""
        shape = self._extended_shape(torch.Size(sample_shape))
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        z, log_det = self.push_forward(eps)
        return z, _standard_normal_log_prob(eps) - log_det

    def push_forward(self, eps: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, log|det dz/deps|)``: the map from base draws ``eps`` to this law's draws.

        Examples
        --------
        >>> from pyro_nf.flows import build_flow
        >>> d = FlowDistribution(torch.zeros(2), 2 * torch.ones(2), build_flow("planar", 2))
        >>> with torch.no_grad():
        ...     z, log_det = d.push_forward(torch.ones(2))
        >>> z.round(decimals=4).tolist(), round(float(log_det), 4)  # the flow starts as identity
        ([2.0, 2.0], 1.3863)
        """
        x, log_det = self.flow(eps)
        z, log_det_whitening = self.whitening(self.loc + self.scale * x)
        return z, log_det + self.scale.log().sum(-1) + log_det_whitening

    def pull_back(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(eps, log|det dz/deps|)``: the inverse of `push_forward`, with the forward
        map's log-determinant at the returned point.

        Examples
        --------
        >>> from pyro_nf.flows import build_flow
        >>> d = FlowDistribution(torch.zeros(2), 2 * torch.ones(2), build_flow("planar", 2))
        >>> with torch.no_grad():
        ...     eps, log_det = d.pull_back(torch.ones(2))
        >>> eps.round(decimals=4).tolist(), round(float(log_det), 4)
        ([0.5, 0.5], 1.3863)
        """
        x, log_det_whitening = self.whitening(z, inverse=True)
        eps, log_det = self.flow((x - self.loc) / self.scale, inverse=True)
        return eps, log_det + self.scale.log().sum(-1) + log_det_whitening

    def as_transform(self) -> FlowTransform:
        """This law's map from ``N(0, I)`` draws, `push_forward`, as a Pyro `Transform`.

        Examples
        --------
        >>> import pyro.distributions as dist
        >>> from pyro_nf.flows import build_flow
        >>> d = FlowDistribution(torch.zeros(2), 2 * torch.ones(2), build_flow("planar", 2))
        >>> law = dist.TransformedDistribution(dist.Normal(0.0, torch.ones(2)).to_event(1),
        ...                                    d.as_transform())
        >>> z = torch.tensor([0.3, -1.2])
        >>> bool(torch.allclose(law.log_prob(z), d.log_prob(z)))
        True
        """
        return FlowTransform(self.push_forward, self.pull_back)

    def _log_prob_of(self, value: Tensor) -> Tensor:
        eps, log_det = self.pull_back(value)
        return _standard_normal_log_prob(eps) - log_det

    def detach_params(self) -> FlowDistribution:
        """The same law with every parameter detached from the autograd graph.

        Its ``log_prob`` is differentiable in the point scored but not in ``loc``,
        ``scale`` or the flow's parameters: what the path-derivative ("sticking the
        landing") gradient estimator needs. It scores points through the flow's inverse.

        Examples
        --------
        >>> from pyro_nf.flows import build_flow
        >>> d = FlowDistribution(torch.zeros(2), torch.ones(2), build_flow("planar", 2))
        >>> d.detach_params().log_prob(d.rsample()).requires_grad
        True
        >>> d.detach_params().log_prob(torch.zeros(2)).requires_grad
        False
        """
        if isinstance(self.flow, nn.Module):
            missing = [type(layer).__name__ for layer in layers_without_inverse(self.flow)]
            if missing:
                raise NotImplementedError(
                    f"the flow layer {', '.join(missing)} has no inverse (no "
                    "inverse_and_log_det), and a law with detached parameters scores points "
                    "through the inverse: estimator='stl' and 'iw' need one; use "
                    "estimator='elbo'"
                )
            module = self.flow

            def flow(x: Tensor, inverse: bool = False) -> tuple[Tensor, Tensor]:
                with _detached_parameters(module):
                    return module(x, inverse=inverse)

        else:  # a plain function: any parameters it closes over are not ours to detach
            flow = self.flow
        return FlowDistribution(
            self.loc.detach(),
            self.scale.detach(),
            flow,
            self.batch_shape,
            self._validate_args,
            self.whitening,  # fixed: buffers, no parameters
        )

    def expand(self, batch_shape: Sequence[int], _instance: object = None) -> FlowDistribution:
        # The flow acts on the last dimension only, so a batch is just a larger sample.
        return FlowDistribution(
            self.loc, self.scale, self.flow, batch_shape, self._validate_args, self.whitening
        )


def _identity(x: Tensor, inverse: bool = False) -> tuple[Tensor, Tensor]:
    return x, x.new_zeros(x.shape[:-1])


class FlowTransform(Transform):
    """A bijection on vectors given by its two maps, each with its log-determinant.

    Lets Pyro (`TransformedDistribution`, `NeuTraReparam`) run a map that computes its
    log-determinant in the same pass, such as a flow posterior's (`FlowDistribution.
    as_transform`) or the non-centring map. The log-determinant of the last pair
    computed, either way, is kept, so that Pyro's call-then-`log_abs_det_jacobian`
    pattern costs one pass; any other pair is recomputed with ``forward``.

    Parameters
    ----------
    forward : callable
        ``forward(x) -> (y, log|det dy/dx|)``.
    inverse : callable
        ``inverse(y) -> (x, log|det dy/dx|)``: the inverse map, and the *forward* map's
        log-determinant at the returned point.
    cache_size : int
        Pyro's transform cache (0 or 1; default 1, which Pyro's inverse needs to score
        the draws it made without inverting).

    Examples
    --------
    >>> double = FlowTransform(
    ...     lambda x: (2 * x, torch.full(x.shape[:-1], 3 * math.log(2))),
    ...     lambda y: (y / 2, torch.full(y.shape[:-1], 3 * math.log(2))),
    ... )
    >>> x = torch.ones(3)
    >>> double(x).tolist(), double.inv(double(x)) is x
    ([2.0, 2.0, 2.0], True)
    >>> round(float(double.log_abs_det_jacobian(x, double(x))), 4)
    2.0794
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, forward: MapWithLogDet, inverse: MapWithLogDet, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)
        self._forward, self._backward = forward, inverse
        self._last: tuple[Tensor, Tensor, Tensor] | None = None  # (x, y, log|det|)

    def with_cache(self, cache_size: int = 1) -> FlowTransform:
        if cache_size == self._cache_size:
            return self
        return FlowTransform(self._forward, self._backward, cache_size)

    def _call(self, x: Tensor) -> Tensor:
        y, log_det = self._forward(x)
        self._last = (x, y, log_det)
        return y

    def _inverse(self, y: Tensor) -> Tensor:
        x, log_det = self._backward(y)
        self._last = (x, y, log_det)
        return x

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """log|det J| of the forward map at ``x``, shape ``x.shape[:-1]``."""
        if self._last is not None and self._last[0] is x and self._last[1] is y:
            return self._last[2]
        return self._forward(x)[1]
