"""Short runs of the model inside the guide, blocked from every outer handler.

`read_plates` reads which members of each local plate this call of the model uses
(its own subsample, the user's indices, or the whole plate), checking the plate's size
and the indices, and the priors of the sites drawn as prior times factor at the guide's
global values; `local_values` maps each member's unconstrained row to the local sites'
values, reading the prior of every non-centred site at the guide's global values (so a
member's spread follows each draw of the population scale). Each run stops once it has
what it needs, before the likelihood. Where a plate's priors read no other local site
(`priors_reading_locals`, once at set-up), the guide maps its rows through the laws
`read_plates` read (`site_value`, as `local_values` does), without the second run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from pyro import poutine
from pyro.distributions.util import sum_rightmost
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor

from pyro_nf.noncentering import _loc_scale_prior
from pyro_nf.summaries import fixed_random_state

from .layout import LocalPlate, LocalSite

__all__ = [
    "Prior",
    "local_values",
    "prior_rows",
    "priors_reading_locals",
    "read_plates",
    "site_value",
]

#: A site's columns of the members' ``(loc, scale, y)`` rows.
MemberRows = tuple[Tensor, Tensor, Tensor]


class Prior(NamedTuple):
    """A non-centred site's prior as `read_plates` read it: its location and scale as
    rows ``(members, size)`` (`prior_rows`), and the law itself, for `site_value`."""

    loc: Tensor
    scale: Tensor
    law: Any


class _Done(Exception):
    """Ends a model run once it has what it needs."""


def check_indices(plate: LocalPlate, indices: Tensor) -> Tensor:
    """Refuse subsample indices outside the plate, naming it.

    Examples
    --------
    >>> import torch
    >>> from pyro_nf.structured.layout import LocalPlate
    >>> check_indices(LocalPlate("g", -1, 3), torch.tensor([0, 2])).tolist()
    [0, 2]
    """
    if torch._C._functorch.is_batchedtensor(indices):
        # Drawn by the model's own plate inside vmap (each particle its own minibatch):
        # in range by construction, and vmap cannot read values back to check them.
        return indices
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= plate.size):
        raise IndexError(
            f"plate {plate.name!r}: subsample indices must lie in [0, {plate.size}), got "
            f"{int(indices.min())}..{int(indices.max())}; pass indices of members of the "
            "plate the guide was set up on"
        )
    return indices


def check_size(plate: LocalPlate, size: int) -> None:
    """Refuse a plate whose size differs from the one the guide was set up on."""
    if size != plate.size:
        raise ValueError(
            f"plate {plate.name!r} has {size} members in this call of the model but "
            f"{plate.size} when the guide was set up; the guide holds parameters for each "
            "member, so build a new guide for the new plate (or keep the plate's size and "
            "subsample it)"
        )


class _ReadPlates(Messenger):
    """Record each local plate's subsample (or give it the known indices) and the prior of
    each site asked for; give every latent site a placeholder."""

    def __init__(
        self,
        plates: dict[str, LocalPlate],
        placeholders: dict[str, Callable],
        given: dict[str, Tensor],
        prior_sites: dict[str, LocalSite],
    ) -> None:
        super().__init__()
        self.plates, self.placeholders = plates, placeholders
        self.given, self.prior_sites = given, prior_sites
        self.indices: dict[str, Tensor] = {}
        self.priors: dict[str, Prior] = {}

    def _done(self) -> bool:
        return len(self.indices) == len(self.plates) and len(self.priors) == len(self.prior_sites)

    def _pyro_sample(self, msg: dict) -> None:
        name = msg["name"]
        if isinstance(msg["fn"], _Subsample) and name in self.plates:
            plate = self.plates[name]
            check_size(plate, msg["fn"].size)
            if name in self.given:
                msg["value"] = self.given[name]
            elif msg["value"] is None:
                msg["value"] = msg["fn"].sample()
            self.indices[name] = check_indices(plate, msg["value"])
        elif name in self.placeholders and not msg["is_observed"]:
            if name in self.prior_sites:
                fn = msg["fn"]
                self.priors[name] = Prior(*prior_rows(self.prior_sites[name], fn), fn)
            msg["value"] = self.placeholders[name](msg)
        else:
            return
        if self._done():
            raise _Done


def prior_rows(site: LocalSite, fn: Any) -> tuple[Tensor, Tensor]:
    """A non-centred site's prior location and scale, as rows ``(members, size)``."""
    prior = _loc_scale_prior(fn)
    shape = fn.shape()
    return (
        site.pack(torch.broadcast_to(prior.loc, shape)),
        site.pack(torch.broadcast_to(prior.scale, shape)),
    )


def read_plates(
    model: Callable,
    plates: dict[str, LocalPlate],
    placeholders: dict[str, Callable],
    args: tuple,
    kwargs: dict,
    given: dict[str, Tensor] | None = None,
    prior_sites: dict[str, LocalSite] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Prior]]:
    """The members of each local plate that this call of the model uses, and the priors
    of the sites asked for at this run's values.

    Parameters
    ----------
    model : callable
        The model (without initialisation handlers).
    plates : dict
        The local plates by name.
    placeholders : dict
        Site name -> ``f(msg) -> value`` for the latent sites met before the run ends.
    args, kwargs
        The model's arguments.
    given : dict, optional
        Plate name -> indices already known (the user's plates): used, not drawn.
    prior_sites : dict, optional
        Non-centred site name -> its `LocalSite`: the sites whose location-scale prior
        to record.

    Returns
    -------
    indices : dict
        Plate name -> index tensor (the given indices, the model's own subsample, drawn
        here as the model would, or ``arange`` of the whole plate).
    priors : dict
        Site name -> its prior's ``(loc, scale)`` as rows ``(members, size)``.
    """
    reader = _ReadPlates(plates, placeholders, given or {}, prior_sites or {})
    with poutine.block(), reader:
        try:
            model(*args, **kwargs)
        except _Done:
            pass
    missing = sorted(set(plates) - set(reader.indices))
    if missing:
        raise ValueError(
            f"the model did not open the plate(s) {missing} that the guide was set up on; "
            "call the guide with the model's own arguments"
        )
    missing = sorted(set(prior_sites or {}) - set(reader.priors))
    if missing:
        raise ValueError(f"the model did not sample the local site(s) {missing} in this call")
    return reader.indices, reader.priors


class _LocalValues(Messenger):
    """Fix the globals and the plates' subsamples; map each local row to its site's value."""

    def __init__(
        self, values: dict, indices: dict, rows: dict[str, tuple[LocalSite, MemberRows]]
    ) -> None:
        super().__init__()
        self.values, self.indices, self.rows = values, indices, rows
        self.outputs: dict[str, tuple[Tensor, Tensor]] = {}

    def _pyro_sample(self, msg: dict) -> None:
        name = msg["name"]
        if isinstance(msg["fn"], _Subsample):
            msg["value"] = self.indices.get(name, msg["value"])
        elif name in self.rows:
            site, rows = self.rows[name]
            value, log_density = site_value(site, msg["fn"], rows)
            self.outputs[name] = value, log_density
            msg["value"] = value
            if len(self.outputs) == len(self.rows):
                raise _Done
        elif name in self.values:
            msg["value"] = self.values[name]


def site_value(site: LocalSite, fn: Any, rows: MemberRows) -> tuple[Tensor, Tensor]:
    """The site's value and the guide's log-density term ``-log|d value / d y|``, its
    law in the model ``fn``.

    The member's unconstrained value is ``u = loc + scale * y``; a non-centred site's
    value is ``prior.loc + prior.scale * u`` with the prior's parameters at this run's
    values (so its spread follows the population scale's draw), any other site's is
    ``u`` mapped to its support.
    """
    loc, scale, y = (site.unpack(part) for part in rows)
    unconstrained = loc + scale * y
    log_scale = sum_rightmost(scale.log(), site.transform.domain.event_dim)
    if site.noncentred:
        prior = _loc_scale_prior(fn)
        value = prior.loc + prior.scale * unconstrained
        log_det = sum_rightmost(prior.scale.log().expand(value.shape), site.event_dim)
        return value, -log_det - log_scale
    value = site.transform(unconstrained)
    log_det = site.transform.log_abs_det_jacobian(unconstrained, value)
    log_det = sum_rightmost(log_det, log_det.dim() - value.dim() + site.event_dim)
    return value, -log_det - log_scale


def priors_reading_locals(
    model: Callable, values: dict, local: set[str], asked: set[str], args: tuple, kwargs: dict
) -> set[str]:
    """The sites of ``asked`` whose location-scale prior depends on another site of
    ``local``: one model run with every latent site at ``values``, the local sites' as
    leaves of autograd (random draws made in a forked random stream, which is left as it
    was).

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> def model():
    ...     a = pyro.sample("a", dist.Normal(0.0, 1.0))
    ...     pyro.sample("b", dist.Normal(a, 1.0))
    >>> values = {"a": torch.tensor(0.5), "b": torch.tensor(1.0)}
    >>> sorted(priors_reading_locals(model, values, {"a", "b"}, {"a", "b"}, (), {}))
    ['b']
    """
    leaves = {
        name: value.detach().clone().requires_grad_(name in local) for name, value in values.items()
    }
    with fixed_random_state(), torch.enable_grad(), poutine.block():
        trace = poutine.trace(poutine.condition(model, data=leaves)).get_trace(*args, **kwargs)
    found = set()
    for name in asked:
        prior = _loc_scale_prior(trace.nodes[name]["fn"])
        outputs = [t.sum() for t in (prior.loc, prior.scale) if t.requires_grad]
        others = [leaves[other] for other in sorted(local) if other != name]
        if outputs and others:
            grads = torch.autograd.grad(outputs, others, allow_unused=True, retain_graph=True)
            if any(grad is not None for grad in grads):
                found.add(name)
    return found


def local_values(
    model: Callable,
    global_values: dict,
    indices: dict,
    rows: dict[str, tuple[LocalSite, MemberRows]],
    args: tuple,
    kwargs: dict,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Each local site's value and log-density term, from its members' rows.

    Parameters
    ----------
    model : callable
        The model (without initialisation handlers).
    global_values : dict
        The guide's values of the global sites.
    indices : dict
        Plate name -> the members drawn (as `find_subsamples` returns).
    rows : dict
        Local site name -> (its `LocalSite`, the members' ``(loc, scale, y)`` rows: their
        parameters and the shared flow's output).
    args, kwargs
        The model's arguments.

    Returns
    -------
    dict
        Site name -> ``(value, log_density)``: with ``u = loc + scale * y``, a
        non-centred site's value is ``prior.loc + prior.scale * u`` at this run's values,
        another's is ``u`` mapped to its support; ``log_density`` is
        ``-log|d value / d y|`` summed over the site's event dimensions.
    """
    runner = _LocalValues(global_values, indices, rows)
    with poutine.block(), runner:
        try:
            model(*args, **kwargs)
        except _Done:
            pass
    if len(runner.outputs) != len(rows):
        missing = sorted(set(rows) - set(runner.outputs))
        raise ValueError(f"the model did not sample the local site(s) {missing} in this call")
    return runner.outputs
