"""The non-finite guard of `fit`: a snapshot of the last finite parameters, restored (and
the failure diagnosed) when a loss, a gradient or an update turns non-finite."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pyro
import torch
from pyro import poutine
from torch import Tensor

__all__ = ["NonFiniteGuard", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """Training met a non-finite loss or gradient; the parameters were restored.

    Attributes
    ----------
    step : int
        Index of the failing step (`step` steps had completed before it).
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
    ):
        super().__init__(message)
        self.step = step
        self.site = site
        self.parameters = parameters
        self.losses = losses


class NonFiniteGuard:
    """Keeps the last finite parameters and turns a non-finite step into a clear error.

    `params` is the caller's (growing) dict of parameters and `losses` its (growing) list
    of completed steps' losses, both read at failure time; `diagnose` is a zero-argument
    callable naming the site whose value or log density is non-finite in a fresh trace
    (see `find_nonfinite_site`), called only on failure.

    Examples
    --------
    >>> x = torch.ones(2, requires_grad=True)
    >>> guard = NonFiniteGuard({"x": x}, [], diagnose=lambda: None)
    >>> (x.sum() * 2).backward()
    >>> guard.check(2.0, step=0)  # finite: a snapshot is taken
    >>> with torch.no_grad():
    ...     _ = x.fill_(float("nan"))
    >>> try:
    ...     guard.check(float("nan"), step=1)
    ... except NonFiniteLossError as error:
    ...     print(error.step, x.tolist())
    1 [1.0, 1.0]
    """

    def __init__(
        self, params: dict[str, Tensor], losses: list[float], diagnose: Callable[[], str | None]
    ):
        self.params = params
        self.losses = losses
        self.diagnose = diagnose
        self.snapshot: list[Tensor] = []

    def check(self, loss: float, step: int) -> None:
        """After the backward pass: snapshot finite parameters, or restore and raise."""
        if math.isfinite(loss) and _grad_sum(list(self.params.values())).isfinite():
            self.snapshot = [p.detach().clone() for p in self.params.values()]
            return
        bad = [
            name
            for name, p in self.params.items()
            if p.grad is not None and not p.grad.isfinite().all()
        ]
        self.restore_if_broken()
        what = f"loss {loss}" if not math.isfinite(loss) else "gradient"
        raise self.error(step, f"non-finite {what}", bad)

    @contextmanager
    def updating(self) -> Iterator[None]:
        """Around an optimiser update: an exception inside it (a Ctrl-C, say) restores the
        snapshot, so no parameter is left half-updated."""
        try:
            yield
        except BaseException:
            self.restore()
            raise

    def evaluation_failed(self, error: Exception, step: int) -> None:
        """A loss evaluation raised: restore and raise our error where the parameters or
        torch's validation show non-finite values; otherwise leave `error` to the caller."""
        finite = self.restore_if_broken()
        if finite and not _is_invalid_value_error(error):
            return
        what = (
            "non-finite parameters"
            if not finite
            else f"invalid values ({str(error).splitlines()[0]})"
        )
        raise self.error(step, what, []) from error

    def restore_if_broken(self) -> bool:
        """Restore the snapshot where a parameter is non-finite; whether all were finite."""
        if all(p.isfinite().all() for p in self.params.values()):
            return True
        self.restore()
        return False

    @torch.no_grad()
    def restore(self) -> None:
        """Set the parameters to the snapshot (those present when it was taken)."""
        for param, saved in zip(self.params.values(), self.snapshot, strict=False):
            param.copy_(saved)

    def error(self, step: int, what: str, bad: list[str]) -> NonFiniteLossError:
        site = self.diagnose()
        where = f" at sample site {site!r}" if site else ""
        grads = f"; non-finite gradients of {', '.join(bad)}" if bad else ""
        return NonFiniteLossError(
            f"fit stopped at step {step}: {what}{where}{grads}. The parameters are restored to "
            f"those of the last finite step ({step} steps completed); consider a smaller lr, "
            "estimator='stl', or checking the model for values that overflow.",
            step=step,
            site=site,
            parameters=bad,
            losses=list(self.losses),
        )


def find_nonfinite_site(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> str | None:
    """Name a sample site with a non-finite value or log density in a fresh trace.

    Examples
    --------
    >>> import pyro.distributions as dist
    >>> def model():
    ...     pyro.sample("x", dist.Normal(0.0, 1.0))
    ...     pyro.factor("bad", torch.tensor(float("inf")))
    >>> def guide():
    ...     pyro.sample("x", dist.Normal(0.0, 1.0))
    >>> find_nonfinite_site(model, guide, (), {})
    'bad'
    """
    try:
        with torch.no_grad(), poutine.block(), pyro.validation_enabled(False):
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
            for trace in (guide_trace, model_trace):
                for name, site in trace.nodes.items():
                    if site["type"] == "sample" and not _finite_site(site):
                        return name
    except Exception:  # noqa: BLE001 - a best-effort diagnosis must not mask the real error
        return None
    return None


def _finite_site(site: dict) -> bool:
    value = torch.as_tensor(site["value"])
    log_prob = torch.as_tensor(site["fn"].log_prob(site["value"]))
    return bool(value.isfinite().all() and log_prob.isfinite().all())


def _grad_sum(params: list[Tensor]) -> Tensor:
    """One reduction whose finiteness is that of every gradient (one sync, not one each)."""
    grads = [p.grad.sum() for p in params if p.grad is not None]
    return torch.stack(grads).sum() if grads else torch.zeros(())


def _is_invalid_value_error(error: Exception) -> bool:
    """Whether `error` is torch's validation error for a NaN or infinite parameter."""
    return isinstance(error, ValueError) and "found invalid values" in str(error)
