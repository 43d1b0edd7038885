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

A subsampled plate is read in chunks of the model's own subsample size, each chunk's
terms counted once per member (Pyro's plate scaling undone): one model run per chunk per
evaluation. Not used where a plate draws its members by the affine form, nor where more
than one local plate is subsampled.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
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

#: The same on a subsampled plate: the minibatches' noise in the globals' gradient hides
#: the few nats a too-wide guide costs (J = 100,000 in minibatches of 1000: mu's sd 18%
#: wide at the stop from 1.5), and with that many members the approximation is close.
SUBSAMPLED_START_SCALE = 1.0


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


def collapsed_log_joint(
    guide: AutoStructuredFlow,
    z: Tensor,
    args: tuple,
    kwargs: dict,
    chunk_size: int | None = None,
) -> Tensor:
    """``log p(y, x, g) - log q(x | g) + log|det dg/dz|`` at the globals ``g(z)`` and the
    locals ``x`` at their conditional mean (every member's base draw at zero).

    With ``chunk_size``, the one local plate's members are read ``chunk_size`` at a time
    (the model's own subsample size, for a subsampled plate), each chunk's terms unscaled
    (Pyro's plate scaling undone) and counted once per member, the other terms once.
    """
    values, log_det = global_values(guide, z)
    if chunk_size is None:
        return _chunk_terms(guide, z, values, args, kwargs, None) + log_det
    (plate,) = guide.local_plates.values()
    total = log_det
    for start in range(0, plate.size, chunk_size):
        members = torch.arange(start, start + chunk_size) % plate.size
        weight = (torch.arange(start, start + chunk_size) < plate.size).to(z.dtype)
        chunk = (plate.name, members, weight, start == 0)
        total = total + _chunk_terms(guide, z, values, args, kwargs, chunk)
    return total


def _chunk_terms(
    guide: AutoStructuredFlow,
    z: Tensor,
    values: dict[str, Tensor],
    args: tuple,
    kwargs: dict,
    chunk: tuple[str, Tensor, Tensor, bool] | None,
) -> Tensor:
    """``log p(y, x, g) - log q(x | g)`` over the whole plates (``chunk`` None), or over a
    chunk ``(plate name, members, their weights, whether to count the terms outside the
    plate)``."""
    members = {} if chunk is None else {chunk[0]: chunk[1]}
    eps = {
        f"_{guide._pyro_name}_{plate.name}_eps": plate.batch_view(
            z.new_zeros(len(members.get(plate.name, range(plate.size))), plate.dim_total)
        )
        for plate in guide.local_plates.values()
    }
    with poutine.block():
        draw = poutine.condition(guide._draw_locals, data=eps)
        given = None if chunk is None else members
        plates = None if chunk is None else guide._model_plates()
        guide_trace = poutine.trace(draw).get_trace(values, args, kwargs, plates, given)
        model = poutine.replay(poutine.condition(guide._raw_model[0], data=values), guide_trace)
        model_trace = poutine.trace(model).get_trace(*args, **kwargs)
    if chunk is None:
        local_log_q = sum(
            node["fn"].log_prob(node["value"]).sum()
            for name, node in guide_trace.nodes.items()
            if node["type"] == "sample" and name not in values and not _is_subsample(node)
        )
        return model_trace.log_prob_sum() - local_log_q
    total = z.new_zeros(())
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        for name, node in trace.nodes.items():
            if node["type"] != "sample" or _is_subsample(node):
                continue
            if sign < 0 and name in values:
                continue
            total = total + sign * _weighted_log_prob(node, *chunk)
    return total


def _weighted_log_prob(
    node: dict, plate_name: str, members: Tensor, weight: Tensor, outside: bool
) -> Tensor:
    """A site's log density summed over a chunk's members, each counted ``weight`` times,
    without the chunk's plate scaling; a site outside the plate only where ``outside``."""
    log_prob = node["fn"].log_prob(node["value"])
    if node["mask"] is not None:
        log_prob = torch.where(node["mask"], log_prob, log_prob.new_zeros(()))
    frame = next((f for f in node["cond_indep_stack"] if f.name == plate_name), None)
    if frame is None:
        return log_prob.sum() * node["scale"] if outside else log_prob.new_zeros(())
    # Undo the plate's subsample scaling (full size / subsample size); keep the others'.
    scale = node["scale"] * frame.size / (frame.full_size or frame.size)
    if log_prob.dim() < -frame.dim or log_prob.shape[frame.dim] != len(members):
        raise ValueError(
            f"AutoStructuredFlow: site {node['name']!r} in plate {plate_name!r} has log "
            f"density shape {tuple(log_prob.shape)}, not one value per member"
        )
    shape = (len(members),) + (1,) * (-frame.dim - 1)
    return (log_prob * weight.reshape(shape)).sum() * scale


def _is_subsample(node: dict) -> bool:
    return type(node["fn"]).__name__ == "_Subsample"


def laplace_globals(
    guide: AutoStructuredFlow, z: Tensor, args: tuple, kwargs: dict, chunk_size: int | None = None
) -> LaplaceApproximation | None:
    """The Laplace approximation of `collapsed_log_joint` from ``z`` (`pyro_nf.laplace`'s
    search, in float64), in ``z``'s dtype; None where it finds no mode with a
    positive-definite Hessian."""

    def log_density(x: Tensor) -> Tensor:
        return collapsed_log_joint(guide, x, args, kwargs, chunk_size)

    try:
        # float64: at 100,000 members float32's rounding of the log joint (about 1e5
        # nats) defeats the line search (no mode found; found in float64, 12 iterations).
        approx = laplace_approximation(log_density, z.detach().double(), warn=False)
    # A point outside the model's support, or a singular curvature: no mode. Any other
    # error is a fault to be seen, not a start to be skipped silently.
    except (ValueError, torch.linalg.LinAlgError) as error:
        logger.info("AutoStructuredFlow: no collapsed mode for the globals (%s)", error)
        return None
    if not approx.converged:
        logger.info("AutoStructuredFlow: no collapsed mode for the globals (%s)", approx.reason)
        return None
    tril = None if approx.scale_tril is None else approx.scale_tril.to(z.dtype)
    return replace(
        approx, loc=approx.loc.to(z.dtype), scale=approx.scale.to(z.dtype), scale_tril=tril
    )


def collapsed_start(z: Tensor, approx: LaplaceApproximation, subsampled: bool = False) -> Start:
    """The globals' flow's start at ``approx``, learning in the coordinates it whitens
    (so that Adam's steps are in posterior sds, however narrow the posterior)."""
    return Start(
        loc=z.detach(),
        noncentering=None,
        laplace=approx,
        scale=SUBSAMPLED_START_SCALE if subsampled else START_SCALE,
        reason="the Laplace approximation of the collapsed posterior (AutoStructuredFlow)",
    )
