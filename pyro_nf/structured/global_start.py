"""The globals' start: the Laplace approximation of their collapsed posterior.

Where every local plate draws its members as prior times a Gaussian factor, the guide's
conditional ``q(locals | g)`` is Gaussian with a closed-form density, so for any ``g``

    log p(y, g) ~= log p(y, x, g) - log q(x | g)        (x: the conditional's mean)

(exact where the conditional is, as on the normal-normal model at every ``g``). Its mode
and curvature in the globals' unconstrained coordinates (`pyro_nf.laplace`) give the
globals' flow a Laplace start, as `AutoFlow`'s warm start does for a whole model: the flow
learns in the coordinates the approximation whitens, so it only learns the shape and
Adam's steps are in posterior sds; with the locals' factors refreshed at that mode (a
second Laplace pass, for likelihoods whose curvature depends on a global, such as radon's
noise scale). Without it the base starts at ``init_scale`` around the prior's median, and
a spline flow learns a posterior sd many times smaller by squeezing its middle, which
stretches its tails (rare draws hundreds of posterior sds out, seen at 1000 groups).

Not used where a local plate is subsampled (the collapsed density would need every
member) or draws its members by the affine form.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pyro import poutine
from torch import Tensor

from pyro_nf.laplace import LaplaceApproximation, laplace_approximation
from pyro_nf.starts import Start

if TYPE_CHECKING:
    from .guide import AutoStructuredFlow

__all__ = ["collapsed_log_joint", "collapsed_start", "global_values", "laplace_globals"]

logger = logging.getLogger("pyro_nf")

#: The base's initial scale in the coordinates the Laplace approximation whitens: wider
#: than the approximation, as the ELBO's gradients narrow a too-wide guide faster than they
#: widen a too-narrow one (radon's log sigma_b: sd 51% small from 1.0, 47% from 1.5).
START_SCALE = 1.5


def global_values(guide: AutoStructuredFlow, z: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """The global sites' values at the unconstrained vector ``z`` and ``log|det dg/dz|``."""
    values, log_det, start = {}, z.new_zeros(()), 0
    for name, site in guide._global_sites.items():
        transform = guide._global_transforms[name]
        shape = transform.inv(site["value"]).shape
        part = z[start : start + shape.numel()].reshape(shape)
        start += shape.numel()
        values[name] = transform(part)
        log_det = log_det + transform.log_abs_det_jacobian(part, values[name]).sum()
    return values, log_det


def collapsed_log_joint(guide: AutoStructuredFlow, z: Tensor, args: tuple, kwargs: dict) -> Tensor:
    """``log p(y, x, g) - log q(x | g) + log|det dg/dz|`` at the globals ``g(z)`` and the
    locals ``x`` at their conditional mean (every member's base draw at zero)."""
    values, log_det = global_values(guide, z)
    eps = {
        f"_{guide._pyro_name}_{plate.name}_eps": plate.batch_view(
            z.new_zeros(plate.size, plate.dim_total)
        )
        for plate in guide.local_plates.values()
    }
    with poutine.block():
        draw = poutine.condition(guide._draw_locals, data=eps)
        guide_trace = poutine.trace(draw).get_trace(values, args, kwargs)
        model = poutine.replay(poutine.condition(guide._raw_model[0], data=values), guide_trace)
        model_trace = poutine.trace(model).get_trace(*args, **kwargs)
    local_log_q = sum(
        node["fn"].log_prob(node["value"]).sum()
        for name, node in guide_trace.nodes.items()
        if node["type"] == "sample" and name not in values and not _is_subsample(node)
    )
    return model_trace.log_prob_sum() - local_log_q + log_det


def _is_subsample(node: dict) -> bool:
    return type(node["fn"]).__name__ == "_Subsample"


def laplace_globals(
    guide: AutoStructuredFlow, z: Tensor, args: tuple, kwargs: dict
) -> LaplaceApproximation | None:
    """The Laplace approximation of `collapsed_log_joint` from ``z`` (`pyro_nf.laplace`'s
    search); None where it finds no mode with a positive-definite Hessian."""

    def log_density(x: Tensor) -> Tensor:
        return collapsed_log_joint(guide, x, args, kwargs)

    try:
        approx = laplace_approximation(log_density, z.detach(), warn=False)
    except (ValueError, RuntimeError) as error:  # a point outside the model's support
        logger.info("AutoStructuredFlow: no collapsed mode for the globals (%s)", error)
        return None
    if not approx.converged:
        logger.info("AutoStructuredFlow: no collapsed mode for the globals (%s)", approx.reason)
        return None
    return approx


def collapsed_start(z: Tensor, approx: LaplaceApproximation) -> Start:
    """The globals' flow's start at ``approx``, learning in the coordinates it whitens
    (so that Adam's steps are in posterior sds, however narrow the posterior)."""
    return Start(
        loc=z.detach(),
        noncentering=None,
        laplace=approx,
        scale=START_SCALE,
        reason="the Laplace approximation of the collapsed posterior (AutoStructuredFlow)",
    )
