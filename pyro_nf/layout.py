"""How an autoguide's packed latent vector splits into its sites, computed once.

Pyro's ``AutoContinuous._unpack_latent`` recomputes every site's size, event dimensions
and broadcast shape on each call, the last with ``torch.broadcast_shapes`` (a Python
reference implementation; its cost is in docs/benchmarks.md); a guide unpacks on every
SVI step, and the non-centring map once more; its ``forward`` looks each site's support
transform up on every call. `LatentLayout` computes the sizes, event dimensions and
support transforms when the guide is set up and each batch shape's view shapes once, and
returns the same views and site laws as Pyro's methods.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.transforms import (
    ComposeTransform,
    IndependentTransform,
    Transform,
    biject_to,
)
from pyro.distributions.util import sum_rightmost
from pyro.poutine import Trace
from torch import Tensor

__all__ = ["LatentLayout", "plate_nesting"]

#: Batch shapes whose view shapes are kept (a guide sees few: one per particle count).
_MAX_BATCH_SHAPES = 64


class LatentLayout:
    """The sites of a guide's packed latent vector: name, size and view shape of each.

    Parameters
    ----------
    guide : AutoContinuous
        A guide whose prototype is set up.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoDiagonalNormal
    >>> def model():
    ...     pyro.sample("a", dist.Normal(0.0, 1.0))
    ...     pyro.sample("b", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    >>> guide = AutoDiagonalNormal(model)
    >>> guide._setup_prototype()
    >>> layout = LatentLayout(guide)
    >>> [(name, tuple(value.shape)) for name, value in layout.unpack(torch.zeros(5, 3))]
    [('a', (5,)), ('b', (5, 2))]
    >>> layout.delta("b", torch.zeros(2)).event_shape
    torch.Size([2])
    """

    def __init__(self, guide: object) -> None:
        self.sites = {name: site for name, site in guide.prototype_trace.iter_stochastic_nodes()}
        self.sizes = {name: math.prod(guide._unconstrained_shapes[name]) for name in self.sites}
        # Per site: unconstrained shape and the event dims it adds, as Pyro computes them.
        self._layout = {
            name: (
                guide._unconstrained_shapes[name],
                site["fn"].event_dim
                + len(guide._unconstrained_shapes[name])
                - len(site["value"].shape),
            )
            for name, site in self.sites.items()
        }
        # Each site's map from the real line onto its support; None for the identity.
        self.transforms: dict[str, Transform | None] = {
            name: None if _is_identity(transform) else transform
            for name, site in self.sites.items()
            for transform in (biject_to(site["fn"].support),)
        }
        # Dimensions the latent sites' plates take (a batch goes left of them).
        self.plate_nesting = plate_nesting(guide.prototype_trace)
        self._shapes: dict[torch.Size, dict[str, torch.Size]] = {}

    def unpack(self, latent: Tensor) -> Iterator[tuple[str, Tensor]]:
        """``(name, unconstrained value)`` per site, shaped as Pyro's ``_unpack_latent``
        shapes them."""
        batch_shape, start = latent.shape[:-1], 0
        shapes = self._shapes.get(batch_shape)
        if shapes is None:
            if len(self._shapes) >= _MAX_BATCH_SHAPES:
                self._shapes.clear()
            shapes = self._shapes[batch_shape] = {
                name: torch.broadcast_shapes(shape, batch_shape + (1,) * event_dim)
                for name, (shape, event_dim) in self._layout.items()
            }
        for name, size in self.sizes.items():
            yield name, latent[..., start : start + size].view(shapes[name])
            start += size

    def constrain(self, name: str, unconstrained_value: Tensor) -> Tensor:
        """Site ``name``'s value in its support (the identity on the real line)."""
        transform = self.transforms[name]
        return unconstrained_value if transform is None else transform(unconstrained_value)

    def constrain_all(self, latent: Tensor) -> dict[str, Tensor]:
        """Every site's value in its support, from a packed latent vector."""
        return {name: self.constrain(name, value) for name, value in self.unpack(latent)}

    def delta(self, name: str, unconstrained_value: Tensor) -> dist.Delta:
        """The law an AutoContinuous guide samples site ``name`` from: a point mass at its
        value in its support, with the support transform's log-density (none under a
        False mask), as Pyro's ``AutoContinuous.forward`` builds it.

        Not validated: the value is the guide's own draw (a Delta does not check it) and
        the log-density our own transform's, which a loss would show as NaN.
        """
        event_dim = self.sites[name]["fn"].event_dim
        transform = self.transforms[name]
        value, log_density = unconstrained_value, 0.0
        if transform is not None:
            value = transform(unconstrained_value)
            if poutine.get_mask() is not False:
                log_density = transform.inv.log_abs_det_jacobian(value, unconstrained_value)
                log_density = sum_rightmost(
                    log_density, log_density.dim() - value.dim() + event_dim
                )
        return dist.Delta(value, log_density=log_density, event_dim=event_dim, validate_args=False)


def plate_nesting(trace: Trace) -> int:
    """How many dimensions, counted from the right, the vectorised plates of a trace take.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> from pyro import poutine
    >>> def model():
    ...     with pyro.plate("a", 2, dim=-2):
    ...         pyro.sample("x", dist.Normal(0.0, 1.0))
    >>> plate_nesting(poutine.trace(model).get_trace())
    2
    """
    return max(
        (
            -frame.dim
            for site in trace.nodes.values()
            for frame in site.get("cond_indep_stack", ())
            if frame.vectorized
        ),
        default=0,
    )


def _is_identity(transform: Transform) -> bool:
    """Whether ``transform`` is the identity (``biject_to`` of the real line or vectors)."""
    while isinstance(transform, IndependentTransform):
        transform = transform.base_transform
    return isinstance(transform, ComposeTransform) and not transform.parts
