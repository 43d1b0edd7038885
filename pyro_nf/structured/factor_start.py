"""The members' Gaussian factors at set-up: a Laplace approximation of each member's
likelihood, for every member of a plate at once, in O(members).

At the initial globals, each member's log likelihood ``ell_j(x_j)`` (the log joint minus
the local sites' own prior terms) is expanded around the mode of its conditional
posterior (found by a few block-Newton steps from the prior's location): the factor's
precision is ``-Hessian`` and its precision-times-mean ``-H x + gradient``. The members are
conditionally independent, so the Hessian is block diagonal: one Hessian-vector product
per coordinate of a member's row, with the one-hot vector on that coordinate for every
member at once, gives every block. For a likelihood Gaussian in ``x_j`` this is exact
(and the same at every point), so the guide starts at the exact conditional given the
globals; otherwise it is the usual Laplace start, which training refines.

Subsampled plates are read in chunks of the model's own subsample size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor

from .layout import LocalPlate
from .model_runs import prior_rows

__all__ = ["NEWTON_STEPS", "curvature_coordinates", "laplace_factors"]

#: Block-Newton steps towards each member's conditional mode (one is exact for a
#: likelihood Gaussian in the member's values).
NEWTON_STEPS = 3

#: Smallest eigenvalue of a factor's precision, relative to the prior's precision (a
#: member without data, or with a likelihood convex there, gets a nearly flat factor).
MIN_PRECISION = 1e-4


class _MemberRun(Messenger):
    """Run the model at given globals on some members, with the plate's sites at given
    rows; collect the sites' priors."""

    def __init__(
        self, plate: LocalPlate, members: Tensor, rows: Tensor, values: dict[str, Any]
    ) -> None:
        super().__init__()
        self.plate, self.members, self.rows, self.values = plate, members, rows, values
        self.sites = {site.name: site for site in plate.sites}
        self.priors: dict[str, tuple[Tensor, Tensor]] = {}

    def _pyro_sample(self, msg: dict) -> None:
        name = msg["name"]
        if isinstance(msg["fn"], _Subsample):
            if name == self.plate.name:
                msg["value"] = self.members
        elif name in self.sites:
            site = self.sites[name]
            self.priors[name] = prior_rows(site, msg["fn"])
            msg["value"] = site.unpack(self.rows[:, self.plate.columns[name]])
        elif name in self.values and not msg["is_observed"]:
            msg["value"] = self.values[name](msg)


def _log_likelihood(
    model: Callable, run: _MemberRun, args: tuple, kwargs: dict
) -> tuple[Tensor, Tensor, Tensor]:
    """Sum of every site's log density but the plate's local sites' (unscaled: one
    member's own terms), and the members' prior rows ``(loc, scale)``."""
    with poutine.block():
        trace = poutine.trace(run(model)).get_trace(*args, **kwargs)
    total = run.rows.new_zeros(())
    for name, node in trace.nodes.items():
        if node["type"] != "sample" or name in run.sites or isinstance(node["fn"], _Subsample):
            continue
        log_prob = node["fn"].log_prob(node["value"])
        if node["mask"] is not None:
            log_prob = log_prob.masked_fill(~node["mask"], 0.0)
        total = total + log_prob.sum()
    names = [site.name for site in run.plate.sites]
    loc = torch.cat([run.priors[name][0] for name in names], dim=-1)
    scale = torch.cat([run.priors[name][1] for name in names], dim=-1)
    return total, loc.detach(), scale.detach()


def _gradient_and_blocks(
    model: Callable,
    plate: LocalPlate,
    members: Tensor,
    rows: Tensor,
    values: dict,
    args: tuple,
    kwargs: dict,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The members' log-likelihood gradients ``(members, d)`` and Hessian blocks
    ``(members, d, d)`` at ``rows``, and their prior rows."""
    with torch.enable_grad():
        rows = rows.detach().requires_grad_(True)
        run = _MemberRun(plate, members, rows, values)
        total, loc, scale = _log_likelihood(model, run, args, kwargs)
        if not total.requires_grad:  # no likelihood term reads the members
            zeros = torch.zeros_like(rows)
            return zeros, zeros.unsqueeze(-1).expand(-1, -1, rows.shape[-1]), loc, scale
        (gradient,) = torch.autograd.grad(total, rows, create_graph=True)
        columns = []
        for k in range(rows.shape[-1]):
            if not gradient.requires_grad:  # linear in the members' values
                columns.append(torch.zeros_like(rows))
                continue
            (column,) = torch.autograd.grad(
                gradient[:, k].sum(), rows, retain_graph=True, allow_unused=True
            )
            columns.append(torch.zeros_like(rows) if column is None else column)
    hessian = torch.stack(columns, dim=-1)
    return gradient.detach(), hessian.detach(), loc, scale


def _clamped_precision(hessian: Tensor, prior_scale: Tensor) -> Tensor:
    """``-hessian``, symmetrised, its eigenvalues floored at `MIN_PRECISION` times the
    smallest prior precision of the member."""
    precision = -(hessian + hessian.mT) / 2
    values, vectors = torch.linalg.eigh(precision)
    floor = MIN_PRECISION / prior_scale.square().amax(-1, keepdim=True)
    values = torch.maximum(values, floor)
    return (vectors * values.unsqueeze(-2)) @ vectors.mT


def _member_factors(
    model: Callable,
    plate: LocalPlate,
    members: Tensor,
    values: dict,
    args: tuple,
    kwargs: dict,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """The members' factors: precision ``(members, d, d)`` and precision-times-mean."""
    rows = torch.zeros(len(members), plate.dim_total, dtype=dtype)
    with torch.no_grad():  # the prior's location: the first point
        run = _MemberRun(plate, members, rows, values)
        _, loc, scale = _log_likelihood(model, run, args, kwargs)
    rows = loc
    for _ in range(NEWTON_STEPS):
        gradient, hessian, loc, scale = _gradient_and_blocks(
            model, plate, members, rows, values, args, kwargs
        )
        precision = _clamped_precision(hessian, scale)
        prior_precision = torch.diag_embed(scale.square().reciprocal())
        step_gradient = gradient - (rows - loc) / scale.square()
        step = torch.linalg.solve(precision + prior_precision, step_gradient.unsqueeze(-1))
        rows = rows + step.squeeze(-1)
    gradient, hessian, loc, scale = _gradient_and_blocks(
        model, plate, members, rows, values, args, kwargs
    )
    precision = _clamped_precision(hessian, scale)
    shift = (precision @ rows.unsqueeze(-1)).squeeze(-1) + gradient
    return precision, shift


def laplace_factors(
    model: Callable,
    plate: LocalPlate,
    chunk_size: int,
    values: dict[str, Callable],
    args: tuple,
    kwargs: dict,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Every member's Gaussian factor, from the Laplace approximation of its likelihood.

    Parameters
    ----------
    model : callable
        The model (without initialisation handlers).
    plate : LocalPlate
        A plate whose sites are all non-centred with a Normal prior.
    chunk_size : int
        Members per model run (the model's own subsample size for the plate).
    values : dict
        Site name -> ``f(msg) -> value`` for the other latent sites (the globals at their
        initial values).
    args, kwargs
        The model's arguments.
    dtype : torch.dtype, optional
        The members' values' dtype (default torch's).

    Returns
    -------
    precision, shift : Tensor
        Shapes ``(plate.size, d, d)`` and ``(plate.size, d)``: each factor's precision and
        precision times mean.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> from pyro.distributions.transforms import biject_to
    >>> from pyro.distributions import constraints
    >>> from pyro_nf.structured.layout import LocalSite
    >>> y = torch.tensor([1.0, 2.0, 3.0])
    >>> def model():
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    ...     with pyro.plate("g", 3):
    ...         a = pyro.sample("a", dist.Normal(mu, 1.0))
    ...         pyro.sample("y", dist.Normal(a, 0.5), obs=y)
    >>> plate = LocalPlate("g", -1, 3, [LocalSite("a", biject_to(constraints.real), 0, -1,
    ...                                           (), True)])
    >>> globals_at = {"mu": lambda msg: torch.zeros(())}
    >>> precision, shift = laplace_factors(model, plate, 3, globals_at, (), {})
    >>> precision.flatten().tolist(), (shift / precision.flatten(1)).flatten().tolist()
    ([4.0, 4.0, 4.0], [1.0, 2.0, 3.0])
    """
    precisions, shifts = [], []
    for start in range(0, plate.size, chunk_size):
        members = torch.arange(start, start + chunk_size) % plate.size
        precision, shift = _member_factors(
            model, plate, members, values, args, kwargs, dtype or torch.get_default_dtype()
        )
        precisions.append(precision)
        shifts.append(shift)
    size = plate.size
    return torch.cat(precisions)[:size], torch.cat(shifts)[:size]


def curvature_coordinates(
    precision_at: Callable[[Tensor], Tensor], z: Tensor, step: float = 0.5, rtol: float = 1e-3
) -> Tensor:
    """Which coordinates of the globals' unconstrained ``z`` the members' factor precisions
    depend on: ``precision_at(z)`` against ``precision_at`` with one coordinate moved by
    ``step``, the same within ``rtol`` of each value or of the largest; a boolean per
    coordinate (true for a noise scale, such as ``log sigma`` in ``y ~ Normal(a_j,
    sigma)``; false for a Gaussian likelihood's location parameters, or the members' own
    prior's).

    Examples
    --------
    >>> # precision n / sigma^2, z = (mu, log sigma): only log sigma moves it
    >>> curvature_coordinates(lambda z: 3.0 * (-2 * z[1]).exp().reshape(1, 1, 1),
    ...                       torch.zeros(2)).tolist()
    [False, True]
    """
    base = precision_at(z)
    # Relative to the largest precision too: a member whose data do not identify a
    # direction has its precision there floored at a fraction of its prior's
    # (`MIN_PRECISION`), which moves with the prior's scale but does not matter.
    atol = rtol * float(base.abs().max())
    moved = []
    for k in range(z.numel()):
        shifted = z.clone()
        shifted[k] += step
        moved.append(not torch.allclose(precision_at(shifted), base, rtol=rtol, atol=atol))
    return torch.tensor(moved, dtype=torch.bool)
