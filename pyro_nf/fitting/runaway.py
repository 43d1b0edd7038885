"""A guide running away from an improper or unidentified posterior, told once.

A proper prior makes a proper posterior, so only sites whose prior is improper (Pyro's
`ImproperUniform`) are watched, and a model without
one costs nothing. Where the data do not pin such a site down, the ELBO rewards the guide
for spreading without end: its draws grow by orders of magnitude, and a flow with linear
tails overflows within tens of steps. The guide cannot fit such a posterior, so `fit`
warns, naming the sites.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from pyro import poutine
from pyro.distributions import Distribution, ImproperUniform
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor
from torch.distributions import biject_to

__all__ = ["ImproperPosteriorWarning", "RunawayWatch"]


class ImproperPosteriorWarning(UserWarning):
    """The posterior looks improper or unidentified: the guide's spread runs away.

    Examples
    --------
    >>> issubclass(ImproperPosteriorWarning, UserWarning)
    True
    """


class RunawayWatch:
    """Watches the guide's spread at the sites with improper priors, and warns once.

    Every `every` steps, `draws` draws of the guide give each watched site's spread (the
    largest standard deviation of its elements, in unconstrained coordinates). The first
    check sets each site's reference (at least `floor`); a spread beyond `growth` times
    its reference (or not finite) is a runaway, and `observe` warns with an
    `ImproperPosteriorWarning` naming every site that ran away. A proper posterior the
    guide fits keeps its spread within a few times the start's (the warm start's
    spread, or `floor` for a narrow start such as AutoNormal's). Build it with
    `RunawayWatch.for_guide`, which returns None where no site needs watching.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> from pyro.distributions import constraints
    >>> from pyro.infer.autoguide import AutoNormal, init_to_value
    >>> def model():
    ...     pyro.sample("x", dist.ImproperUniform(constraints.real, (), ()))
    >>> guide = AutoNormal(model, init_loc_fn=init_to_value(values={"x": torch.tensor(0.0)}))
    >>> _ = guide()
    >>> watch = RunawayWatch.for_guide(guide, (), {})
    >>> watch.sites
    {'x': ImproperUniform()}
    >>> watch.observe(step=5)  # the first check: the reference spread
    >>> guide.scales.x = torch.tensor(1e3)  # as if the fit had run away
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     watch.observe(step=10)
    >>> caught[0].category.__name__
    'ImproperPosteriorWarning'
    """

    every: int = 5
    draws: int = 4
    floor: float = 0.5
    growth: float = 20.0

    def __init__(
        self, guide: Callable, args: tuple, kwargs: dict, sites: dict[str, Distribution]
    ) -> None:
        self.guide, self.args, self.kwargs = guide, args, kwargs
        self.sites = sites
        self.reference: dict[str, float] = {}
        self.warned = False
        # A subsampled plate's indices, held fixed over the draws: the spread is then each
        # member's, not that of the members across minibatches.
        self.subsample: dict[str, Tensor] | None = None

    @classmethod
    def for_guide(cls, guide: Callable, args: tuple, kwargs: dict) -> RunawayWatch | None:
        """A watch over the guide's sites with improper priors, or None where there are none
        (or where the guide keeps no prototype trace of the model, as Pyro's autoguides do)."""
        trace = getattr(guide, "prototype_trace", None)
        if trace is None:
            return None
        sites = {
            name: site["fn"]
            for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and _improper(site["fn"])
        }
        return cls(guide, args, kwargs, sites) if sites else None

    def observe(self, step: int) -> None:
        """After step `step`: check every `every` steps, warn once at a runaway."""
        if self.warned or step == 0 or step % self.every:
            return
        with torch.no_grad(), poutine.block():
            spreads = self._spreads([self._draw() for _ in range(self.draws)])
        if not self.reference:
            self.reference = {name: max(s, self.floor) for name, s in spreads.items()}
            return
        runaway = {
            name: s
            for name, s in spreads.items()
            if not s <= self.growth * self.reference[name]  # NaN counts as a runaway
        }
        if runaway:
            self.warned = True
            warnings.warn(self._message(runaway, step), ImproperPosteriorWarning, stacklevel=5)

    def _draw(self) -> poutine.Trace:
        guide = poutine.condition(self.guide, data=self.subsample or {})
        trace = poutine.trace(guide).get_trace(*self.args, **self.kwargs)
        if self.subsample is None:
            self.subsample = _subsample_indices(trace)
        return trace

    def _unconstrained(self, trace: poutine.Trace, name: str) -> Tensor:
        return biject_to(self.sites[name].support).inv(trace.nodes[name]["value"])

    def _spreads(self, traces: list[poutine.Trace]) -> dict[str, float]:
        return {
            name: torch.stack([self._unconstrained(t, name) for t in traces]).std(0).max().item()
            for name in self.sites
        }

    def _message(self, runaway: dict[str, float], step: int) -> str:
        grown = ", ".join(
            f"{name!r} from {self.reference[name]:.3g} to {spread:.3g}"
            for name, spread in runaway.items()
        )
        return (
            "fit: the posterior looks improper or unidentified: by step "
            f"{step} the guide's spread (unconstrained) of the site(s) with an improper prior "
            f"ran away: {grown}. "
            "No guide can fit an improper posterior; give those sites proper priors, or "
            "change the model so the data determine them (two flat parameters entering only "
            "as a + b, say)."
        )


def _subsample_indices(trace: poutine.Trace) -> dict[str, Tensor]:
    """The indices each subsampled plate drew in `trace`, by plate name."""
    return {
        name: site["value"]
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and isinstance(site["fn"], _Subsample)
    }


def _improper(fn: Distribution) -> bool:
    """Whether a prior is improper: Pyro's `ImproperUniform`, wrapped or not."""
    while not isinstance(fn, ImproperUniform) and hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return isinstance(fn, ImproperUniform)
