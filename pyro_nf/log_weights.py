"""Log importance weights ``log p(x, z) - log q(z)`` of many guide draws: the one drawer.

`LogWeights` runs a model and a guide once (the `Prototype`: plate nesting, and what
`full_data_problem` reads), then draws weights in passes, batched the first way that works
(`pyro_nf.batching.choose_batching`: a particle plate, ``torch.func.vmap``, one draw at a
time), decided by the first pass and kept; the same passes carry the draws of chosen sites
where asked. `pyro_nf.diagnostics` (``psis_khat``, ``log_evidence``), `fit`'s k-hat
(`pyro_nf.fitting.trust`) and `pyro_nf.reweighted` all draw through it. It imports no
ArviZ, so `fit` pays nothing for it.

The particle plate sits left of every batch dimension a site has, declared by a plate or
not: a model that leaves its data's dimension undeclared (``Normal(mu, 1)`` observed at a
vector, no plate) gets weights summed over that dimension, rather than the data
broadcast against the draws wherever their counts agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from pyro_nf.batching import Batching, choose_batching, vmap_draws
from pyro_nf.checks import check_int
from pyro_nf.log_joint import subsampled_plates

__all__ = ["VMAP_PASS", "LogWeights", "Prototype", "full_data_problem", "passes"]

#: Most draws in one vmap pass: a vmapped draw is a whole model run, holding whatever the
#: model holds per draw.
VMAP_PASS = 256

_PARTICLES = "_pyro_nf_draws"

#: One pass: each draw's log weight, shape ``(count,)``, and each chosen site's draws, shape
#: ``(count, *site_shape)``.
_Pass = tuple[Tensor, dict[str, Tensor]]


def passes(count: int, size: int | None) -> list[int]:
    """The sizes of the passes ``count`` draws are taken in, ``size`` at a time (None: all
    at once).

    Examples
    --------
    >>> passes(10, 4), passes(3, None)
    ([4, 4, 2], [3])
    """
    size = count if size is None else size
    return [min(size, count - start) for start in range(0, count, size)]


class Prototype(NamedTuple):
    """One guide run and the model replayed against it, subsample sites kept (read by
    `full_data_problem`); made by `Prototype.trace`.

    Examples
    --------
    >>> import pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoNormal
    >>> def model(y):  # y's dimension in no plate
    ...     pyro.sample("y", dist.Normal(pyro.sample("mu", dist.Normal(0.0, 1.0)), 1.0), obs=y)
    >>> prototype = Prototype.trace(model, AutoNormal(model), (torch.zeros(3),), {})
    >>> prototype.plate_nesting(), prototype.batch_rank()
    (0, 1)
    """

    guide: Trace
    model: Trace

    @staticmethod
    def trace(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> Prototype:
        """Run the guide once and the model against it, outside any handler and gradient."""
        with torch.no_grad(), poutine.block():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            replayed = poutine.replay(model, trace=guide_trace)
            return Prototype(guide_trace, poutine.trace(replayed).get_trace(*args, **kwargs))

    def _traces(self) -> tuple[Trace, Trace]:
        return prune_subsample_sites(self.guide), prune_subsample_sites(self.model)

    def plate_nesting(self) -> int:
        """How many plate dimensions the model and guide declare (Pyro's max_plate_nesting)."""
        dims = [
            frame.dim
            for trace in self._traces()
            for site in trace.nodes.values()
            if site["type"] == "sample"  # observed sites too
            for frame in site["cond_indep_stack"]
            if frame.vectorized
        ]
        return -min(dims, default=0)

    def batch_rank(self) -> int:
        """How many batch dimensions a site's log density has at most, declared by plates
        or not: a particle plate left of them all meets no dimension of the data."""
        ranks = [
            _batch_rank(site)
            for trace in self._traces()
            for site in trace.nodes.values()
            if site["type"] == "sample"
        ]
        return max([self.plate_nesting(), *ranks])


def _batch_rank(site: dict) -> int:
    """The number of dimensions of a site's log density, read from shapes alone."""
    fn, value = site["fn"], site["value"]
    shapes = [fn.batch_shape, value.shape[: value.dim() - len(fn.event_shape)]]
    shapes += [factor.shape for factor in (site["scale"], site["mask"]) if torch.is_tensor(factor)]
    return len(torch.broadcast_shapes(*shapes))


def full_data_problem(trace: Trace, purpose: str, latent_only: bool = False) -> str | None:
    """Why draws of this model trace would mislead ``purpose``: a subsampled plate (only one
    holding a latent site where ``latent_only``), named with what to pass instead; None
    where every plate is whole.

    Examples
    --------
    >>> import pyro.distributions as dist
    >>> def model():
    ...     with pyro.plate("data", 100, subsample_size=10):
    ...         pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.zeros(10))
    >>> print(full_data_problem(poutine.trace(model).get_trace(), "psis_khat"))
    ... # doctest: +NORMALIZE_WHITESPACE
    psis_khat: the model subsamples the plate 'data' (10 of 100 per call), so the importance
    weights would be those of a rescaled minibatch, not of log p(x, z). Pass the model's
    full data: arguments under which it draws no subsample (e.g. batch_size=None), or a
    version of the model without subsample_size
    >>> full_data_problem(poutine.trace(model).get_trace(), "x", latent_only=True) is None
    True
    """
    if latent_only:
        trace = trace.copy()
        for name in [name for name, site in trace.nodes.items() if site.get("is_observed")]:
            trace.remove_node(name)
    plates = subsampled_plates(trace)
    if not plates:
        return None
    name, (size, full_size) = next(iter(plates.items()))
    what = (
        "each draw would hold other members of it"
        if latent_only
        else "the importance weights would be those of a rescaled minibatch, not of log p(x, z)"
    )
    return (
        f"{purpose}: the model subsamples the plate {name!r} ({size} of {full_size} per "
        f"call), so {what}. Pass the model's full data: arguments under which it draws no "
        "subsample (e.g. batch_size=None), or a version of the model without "
        "subsample_size"
    )


class LogWeights:
    """``log p(x, z) - log q(z)`` for many draws ``z ~ q`` of a guide, in bounded passes,
    with the draws of chosen sites where asked (`draws_and_log_weights`).

    Made once per model, guide and arguments: the prototype run and the plate nesting
    are taken at construction, the batching (particle plate, vmap, loop) by the first
    call's first pass, and kept for every later pass and call. In the particle plate,
    Pyro's checks hold every site's shape to its plates (validation on, as by default),
    and a site whose log density is not one per draw sends the probe to the next way.

    Parameters
    ----------
    model, guide, args, kwargs
        A Pyro model, a guide and their arguments.
    purpose : str
        What the weights are for, in the log of the batching choice
        (``"psis_khat"``, say).
    pass_size : int, optional
        Most draws per pass (bounds memory); default all of a call's draws at once.
    vmap_pass_size : int, optional
        Most draws per vmapped pass, where that is the way (default `VMAP_PASS`); None
        for `pass_size` alone (a caller whose calls are bounded already).

    Attributes
    ----------
    prototype : Prototype
        The model and guide run once.
    way : Batching or None
        How the draws are batched; None until the first call.

    Examples
    --------
    >>> import pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoNormal
    >>> def model():  # the guide is the posterior: every weight is log p(x) = 0
    ...     pyro.sample("x", dist.Normal(0.0, 1.0))
    >>> pyro.clear_param_store()
    >>> log_weights = LogWeights(model, AutoNormal(model, init_scale=1.0), (), {})
    >>> log_w = log_weights(7)
    >>> log_weights.way, log_w.shape, bool(log_w.abs().max() < 1e-5)
    (<Batching.PLATE: 'plate'>, torch.Size([7]), True)
    >>> draws, log_w = log_weights.draws_and_log_weights(5, ["x"])
    >>> draws["x"].shape, log_w.shape
    (torch.Size([5]), torch.Size([5]))
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
        *,
        purpose: str = "log weights",
        pass_size: int | None = None,
        vmap_pass_size: int | None = VMAP_PASS,
    ) -> None:
        self.run = (model, guide, args, kwargs)
        self.purpose = purpose
        self.pass_size = _pass_size("pass_size", pass_size)
        self.vmap_pass_size = _pass_size("vmap_pass_size", vmap_pass_size)
        self.prototype = Prototype.trace(model, guide, args, kwargs)
        self.way: Batching | None = None
        self._nesting = self.prototype.plate_nesting()
        self._rank = self.prototype.batch_rank()

    def __call__(self, count: int) -> Tensor:
        """``count`` log weights, shape ``(count,)``, detached."""
        return self.draws_and_log_weights(count, ())[1]

    @torch.no_grad()
    def draws_and_log_weights(
        self, count: int, sites: Sequence[str]
    ) -> tuple[dict[str, Tensor], Tensor]:
        """``count`` draws of the model's sample sites ``sites`` (each ``(count, *shape)``,
        constrained, as the model sees them) and their log weights (``(count,)``), from the
        same runs, detached; a ValueError naming ``sites`` for a name the model lacks."""
        sizes = passes(check_int("count", count, minimum=1), self.pass_size)
        shapes = _site_shapes(self.prototype.model, sites)
        if self.way is None:
            first, *sizes = sizes
            self.way, chunk = choose_batching(
                lambda way: self._pass(way, first, shapes), purpose=self.purpose
            )
            chunks = [chunk]
        else:
            chunks = []
        chunks += [self._pass(self.way, size, shapes) for size in sizes]
        log_w, draws = _concatenate(chunks)
        return {name: value.detach() for name, value in draws.items()}, log_w.detach()

    def _pass(self, way: Batching, count: int, shapes: dict[str, tuple[int, ...]]) -> _Pass:
        """``count`` log weights and draws of the sites of ``shapes``, batched ``way``."""
        if way is Batching.PLATE:
            return self._plated(count, shapes)
        if way is Batching.VMAP:
            return _concatenate(
                [
                    vmap_draws(lambda _: self._one(None, shapes), n)
                    for n in passes(count, self.vmap_pass_size)
                ]
            )
        elbo = Trace_ELBO(max_plate_nesting=self._nesting)
        draws = [self._one(elbo, shapes) for _ in range(count)]
        return torch.stack([log_w for log_w, _ in draws]), {
            name: torch.stack([values[name] for _, values in draws]) for name in shapes
        }

    def _one(self, elbo: Trace_ELBO | None, shapes: dict[str, tuple[int, ...]]) -> _Pass:
        """One draw's log weight and values, its sites' shapes checked against ``elbo``'s
        nesting; without one (under vmap, where Pyro's checks are off), from the traces
        alone, each site's log density summed and not kept (Trace_ELBO keeps every
        datum's: on a regression of 5000 data, 40% more page faults and 20-30% more time)."""
        if elbo is None:
            guide_trace, model_trace = Prototype.trace(*self.run)
        else:
            model_trace, guide_trace = elbo._get_trace(*self.run)
        log_w = model_trace.log_prob_sum() - guide_trace.log_prob_sum()
        return log_w, {name: model_trace.nodes[name]["value"] for name in shapes}

    def _plated(self, count: int, shapes: dict[str, tuple[int, ...]]) -> _Pass:
        """``count`` log weights and draws in one run of model and guide in a particle
        plate, left of every batch dimension."""
        model, guide, args, kwargs = self.run
        plate = pyro.plate(_PARTICLES, count, dim=-self._rank - 1)
        elbo = Trace_ELBO(max_plate_nesting=self._rank + 1)
        model_trace, guide_trace = elbo._get_trace(plate(model), plate(guide), args, kwargs)
        log_w = _per_draw(model_trace, count, self._rank + 1) - _per_draw(
            guide_trace, count, self._rank + 1
        )
        return log_w, {
            name: _each_draw(model_trace.nodes[name]["value"], count, shape)
            for name, shape in shapes.items()
        }


def _pass_size(name: str, size: int | None) -> int | None:
    return None if size is None else check_int(name, size, minimum=1)


def _site_shapes(trace: Trace, sites: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Each of ``sites``' value shape in a model trace; a ValueError naming ``sites`` where
    one is not a sample site of it."""
    if isinstance(sites, str):
        raise TypeError(f"sites must be a sequence of site names, got the string {sites!r}")
    nodes = prune_subsample_sites(trace).nodes
    known = [name for name, site in nodes.items() if site["type"] == "sample"]
    unknown = [name for name in sites if name not in known]
    if unknown:
        raise ValueError(f"sites: {unknown} are not sample sites of the model (it has {known})")
    return {name: tuple(nodes[name]["value"].shape) for name in sites}


def _each_draw(value: Tensor, count: int, shape: tuple[int, ...]) -> Tensor:
    """A site's value in a particle plate as ``(count, *shape)``: the plate's dimension
    first, the size-1 dimensions between it and the site's own dropped, a value that does
    not vary with the draw (a deterministic site of the data) repeated."""
    full = (count, *shape)
    if value.numel() < math.prod(full):
        value = value.expand(full)
    return value.reshape(full)


def _concatenate(chunks: Sequence[_Pass]) -> _Pass:
    """Passes joined along the draws."""
    log_w = torch.cat([log_w for log_w, _ in chunks])
    names = chunks[0][1]
    return log_w, {name: torch.cat([draws[name] for _, draws in chunks]) for name in names}


def _per_draw(trace: Trace, count: int, rank: int) -> Tensor:
    """Each draw's summed log density in a trace run in a particle plate of ``count`` at
    dimension ``-rank``, shape ``(count,)``; a ValueError where a site's is not one per
    draw (a model that broadcasts draws against its own dimensions)."""
    sums = []
    for name, site in trace.nodes.items():
        if site["type"] != "sample":
            continue
        log_prob = site["log_prob"]
        if log_prob.shape[:1] != (count,) or log_prob.dim() != rank:
            raise ValueError(
                f"site {name!r} has a log density of shape {tuple(log_prob.shape)} in a "
                f"plate of {count} draws at dimension {-rank}: not one per draw"
            )
        sums.append(log_prob.reshape(count, -1).sum(-1))
    return sum(sums[1:], start=sums[0])  # sites may differ in dtype
