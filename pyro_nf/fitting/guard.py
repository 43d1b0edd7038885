"""The non-finite guard of `fit`: a snapshot of the last finite parameters, restored (and
the failure diagnosed) when a loss, a gradient or an update turns non-finite.

The guard holds only its snapshot; the parameters it checks and restores, and the losses
it reports, are handed to it by the loop that owns them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from torch import Tensor

__all__ = ["NonFiniteGuard", "NonFiniteLossError", "SiteProblem", "find_nonfinite_site"]


class NonFiniteLossError(RuntimeError):
    """Training met a non-finite loss or gradient; the parameters were restored.

    Attributes
    ----------
    step : int
        Index of the failing step (`step` steps had completed before it; 0: the setup).
    site : str or None
        The sample site whose log density (or value) is non-finite in a fresh trace,
        where that could be told.
    parameters : list of str
        Parameters with non-finite gradients at the failing step.
    losses : list of float
        The losses of the completed steps, as `FitResult.losses` would hold them.

    Examples
    --------
    >>> import pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoNormal
    >>> from pyro_nf import fit
    >>> def model():
    ...     x = pyro.sample("x", dist.Normal(0.0, 1.0))
    ...     pyro.factor("broken", x * float("nan"))
    >>> try:
    ...     fit(model, AutoNormal(model), num_steps=10, progress=False)
    ... except NonFiniteLossError as error:
    ...     print(error.step, error.site)
    0 broken
    """

    def __init__(
        self, message: str, step: int, site: str | None, parameters: list[str], losses: list
    ) -> None:
        super().__init__(message)
        self.step = step
        self.site = site
        self.parameters = parameters
        self.losses = losses


@dataclass(frozen=True)
class SiteProblem:
    """A sample site whose value or log density is not finite, and what is wrong there.

    Examples
    --------
    >>> SiteProblem("y", "observed value", "nan").describe()
    "the observed value of sample site 'y' is nan"
    """

    site: str
    what: str  # "observed value", "value" or "log density"
    value: str  # "nan", "inf" or "-inf"

    def describe(self) -> str:
        """The problem in words."""
        return f"the {self.what} of sample site {self.site!r} is {self.value}"


class NonFiniteGuard:
    """Keeps the last finite parameters and turns a non-finite step into a clear error.

    `diagnose` is a zero-argument callable naming the site whose value or log density
    is non-finite in a fresh trace (see `find_nonfinite_site`), called only on failure;
    `data_notes` describe model arguments that hold non-finite values (found at setup),
    named in an error at the setup step. The parameters and losses are the caller's,
    passed to each call.

    Examples
    --------
    >>> x = torch.ones(2, requires_grad=True)
    >>> guard = NonFiniteGuard(diagnose=lambda: None)
    >>> (x.sum() * 2).backward()
    >>> guard.check(2.0, {"x": x}, step=0, losses=[])  # finite: a snapshot is taken
    >>> with torch.no_grad():
    ...     _ = x.fill_(float("nan"))
    >>> try:
    ...     guard.check(float("nan"), {"x": x}, step=1, losses=[2.0])
    ... except NonFiniteLossError as error:
    ...     print(error.step, x.tolist())
    1 [1.0, 1.0]
    """

    def __init__(
        self, diagnose: Callable[[], SiteProblem | None], data_notes: tuple[str, ...] = ()
    ) -> None:
        self.diagnose = diagnose
        self.data_notes = data_notes
        self.snapshot: dict[str, Tensor] = {}

    def check(self, loss: float, params: dict[str, Tensor], step: int, losses: list) -> None:
        """After the backward pass: snapshot finite parameters, or restore and raise."""
        if math.isfinite(loss) and _grad_sum(list(params.values())).isfinite():
            self.snapshot = {name: p.detach().clone() for name, p in params.items()}
            return
        bad = [
            name for name, p in params.items() if p.grad is not None and not p.grad.isfinite().all()
        ]
        self.restore_if_broken(params)
        what = f"loss {loss}" if not math.isfinite(loss) else "gradient"
        raise self.error(step, f"non-finite {what}", bad, losses)

    @contextmanager
    def updating(self, params: dict[str, Tensor]) -> Iterator[None]:
        """Around an optimiser update: an exception inside it (a Ctrl-C, say) restores the
        snapshot, so no parameter is left half-updated."""
        try:
            yield
        except BaseException:
            self.restore(params)
            raise

    def evaluation_failed(
        self, error: Exception, params: dict[str, Tensor], step: int, losses: list
    ) -> None:
        """A loss evaluation raised: restore and raise our error where the parameters,
        torch's validation or (at the setup) the data show non-finite values; otherwise
        leave `error` to the caller."""
        finite = self.restore_if_broken(params)
        setup_with_bad_data = step == 0 and bool(self.data_notes)
        if finite and not _is_invalid_value_error(error) and not setup_with_bad_data:
            return
        what = (
            "non-finite parameters"
            if not finite
            else f"invalid values ({str(error).splitlines()[0]})"
        )
        raise self.error(step, what, [], losses) from error

    def restore_if_broken(self, params: dict[str, Tensor]) -> bool:
        """Restore the snapshot where a parameter is non-finite; whether all were finite."""
        if all(p.isfinite().all() for p in params.values()):
            return True
        self.restore(params)
        return False

    @torch.no_grad()
    def restore(self, params: dict[str, Tensor]) -> None:
        """Set the parameters to the snapshot (those present when it was taken)."""
        for name, saved in self.snapshot.items():
            if name in params:
                params[name].copy_(saved)

    def error(self, step: int, what: str, bad: list[str], losses: list) -> NonFiniteLossError:
        """The error for a failure at `step`: at the setup, what is wrong with the data or
        the starting point; later, what to change in the fit."""
        problem = self.diagnose()
        site = problem.site if problem else None
        if step == 0 and (self.data_notes or problem):
            message = _setup_message(problem, self.data_notes)
        else:
            where = f" at sample site {site!r}" if site else ""
            grads = f"; non-finite gradients of {', '.join(bad)}" if bad else ""
            message = (
                f"fit stopped at step {step}: {what}{where}{grads}. The parameters are restored "
                f"to those of the last finite step ({step} steps completed); consider a smaller "
                "lr, estimator='stl', or checking the model for values that overflow."
            )
        return NonFiniteLossError(
            message, step=step, site=site, parameters=bad, losses=list(losses)
        )


def _setup_message(problem: SiteProblem | None, data_notes: tuple[str, ...]) -> str:
    """Why the very first evaluation failed, and what to do: a smaller lr cannot help."""
    head = "fit stopped at setup, before any step: "
    found = f" ({problem.describe()})" if problem else ""
    if data_notes:
        return (
            f"{head}the data are not finite: {'; '.join(data_notes)}{found}. Remove those "
            "values, or mask them (e.g. pyro.sample(..., obs_mask=...))."
        )
    if problem.what == "observed value":
        return (
            f"{head}the data are not finite: {problem.describe()}. Remove those values, "
            "or mask them (e.g. pyro.sample(..., obs_mask=...))."
        )
    if problem.what == "log density" and problem.value == "-inf":
        return (
            f"{head}the model's log density is -inf at the guide's starting point "
            f"(sample site {problem.site!r}), where no gradient can move it. Check that "
            "site's distribution and support, or start the guide where the density is "
            "finite (init_loc_fn, e.g. init_to_value)."
        )
    return (
        f"{head}{problem.describe()} at the guide's starting point. Check that site's "
        "distribution and arguments, or start the guide elsewhere (init_loc_fn)."
    )


def find_nonfinite_site(
    model: Callable, guide: Callable, args: tuple, kwargs: dict
) -> SiteProblem | None:
    """The first sample site with a non-finite value or log density in a fresh trace of
    `guide` and of `model` replayed against it, and what is wrong there (None if none is,
    or if the trace itself fails).

    Examples
    --------
    >>> import pyro.distributions as dist
    >>> def model():
    ...     x = pyro.sample("x", dist.Normal(0.0, 1.0))
    ...     pyro.factor("bad", torch.tensor(float("-inf")))
    >>> def guide():
    ...     pyro.sample("x", dist.Normal(0.0, 1.0))
    >>> find_nonfinite_site(model, guide, (), {})
    SiteProblem(site='bad', what='log density', value='-inf')
    """
    try:
        with torch.no_grad(), poutine.block(), pyro.validation_enabled(False):
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
            for trace in (guide_trace, model_trace):
                for name, site in trace.nodes.items():
                    problem = _site_problem(name, site) if site["type"] == "sample" else None
                    if problem is not None:
                        return problem
    except Exception:  # noqa: BLE001 - a best-effort diagnosis must not mask the real error
        return None
    return None


def _site_problem(name: str, site: dict) -> SiteProblem | None:
    value = torch.as_tensor(site["value"])
    what = "observed value" if site["is_observed"] else "value"
    for tensor, label in ((value, what), (torch.as_tensor(site["fn"].log_prob(value)), None)):
        bad = tensor[~tensor.isfinite()]
        if bad.numel():
            return SiteProblem(name, label or "log density", _kind(bad[0].item()))
    return None


def _kind(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _grad_sum(params: list[Tensor]) -> Tensor:
    """One reduction whose finiteness is that of every gradient (one sync, not one each)."""
    grads = [p.grad.sum() for p in params if p.grad is not None]
    return torch.stack(grads).sum() if grads else torch.zeros(())


def _is_invalid_value_error(error: Exception) -> bool:
    """Whether `error` is torch's validation error for a NaN or infinite parameter."""
    return isinstance(error, ValueError) and "found invalid values" in str(error)
