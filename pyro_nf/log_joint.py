"""The log joint of a guide's model as a function of its unconstrained latent vector.

What the Laplace search and the warm start score: ``log p(data, T(z)) + log|det dT/dz|``
for the guide's packed unconstrained vector ``z``, one draw or a batch. Building it means
reading through the messengers Pyro's autoguides wrap a model in (the ``InitMessenger``
of `AutoContinuous`, the ``poutine.block`` of an ``AutoGuideList`` part).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.poutine.block_messenger import BlockMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from pyro_nf.batching import Batching, choose_batching
from pyro_nf.layout import LatentLayout

__all__ = ["LogJoint", "model_without_init", "subsampled_plates", "unconstrained_log_joint"]


def _unwrap(model: Callable, messenger_type: type) -> tuple[Messenger | None, Callable]:
    """``(messenger, fn)`` if ``model`` is ``messenger(fn)`` for a messenger of this type,
    else ``(None, model)``."""
    wrapped = getattr(model, "func", None)
    if (
        isinstance(wrapped, functools.partial)
        and len(wrapped.args) == 2
        and isinstance(wrapped.args[0], messenger_type)
    ):
        return wrapped.args[0], wrapped.args[1]
    return None, model


def model_without_init(guide: AutoContinuous) -> Callable:
    """The guide's model without the ``InitMessenger`` that AutoContinuous wraps it in.

    That messenger sits inside any handler put around ``guide.model``, so it calls the
    initialisation strategy at every site of every run, even of conditioned sites: with
    `init_to_median`, prior draws that cost time and advance Pyro's random state.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoLowRankMultivariateNormal
    >>> model = lambda: pyro.sample("x", dist.Normal(0.0, 1.0))
    >>> model_without_init(AutoLowRankMultivariateNormal(model)) is model
    True
    """
    return _unwrap(guide.model, InitMessenger)[1]


def _peel(guide: AutoContinuous) -> tuple[Messenger | None, list[Messenger], Callable]:
    """The guide's ``InitMessenger``, the ``poutine.block`` layers (outermost first) around
    the model, and the model inside them."""
    init, inner = _unwrap(guide.model, InitMessenger)
    blocks = []
    while (found := _unwrap(inner, BlockMessenger))[0] is not None:
        blocks.append(found[0])
        inner = found[1]
    return init, blocks, inner


def _wrapped(inner: Callable, blocks: list[Messenger], values: dict[str, Tensor]) -> Callable:
    """``inner`` conditioned on ``values``, inside the same blocks."""
    model = poutine.condition(inner, values) if values else inner
    for block in reversed(blocks):
        model = block(model)
    return model


def subsampled_plates(trace: Trace) -> dict[str, tuple[int, int]]:
    """Each subsampled plate's name, with its subsample size and full size.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> def model():
    ...     with pyro.plate("data", 100, subsample_size=10):
    ...         pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.zeros(10))
    >>> subsampled_plates(pyro.poutine.trace(model).get_trace())
    {'data': (10, 100)}
    """
    return {
        frame.name: (frame.size, frame.full_size)
        for site in trace.nodes.values()
        for frame in site.get("cond_indep_stack", ())
        if frame.full_size is not None and frame.size != frame.full_size
    }


class LogJoint:
    """The log joint of a guide's model as a function of its unconstrained latent vector.

    ``log p(data, T(z)) + log|det dT/dz|`` with ``T`` the map from the guide's packed
    unconstrained vector to the model's constrained sites (the density of ``z`` whose
    mode is the MAP in unconstrained space). Built by `unconstrained_log_joint`.

    A batch of draws, shape ``(num_draws, dim)``, is scored in one run of the model,
    mapped over the draws by ``torch.func.vmap``; a model that vmap cannot batch (one
    with control flow on its values, or ``.item()``) is run once per draw instead. Which
    way is decided once, on two rows of the first batch (`pyro_nf.batching.choose_batching`).

    Attributes
    ----------
    batching : Batching or None
        ``Batching.VMAP`` or ``Batching.LOOP`` (None until the first batch).
    subsampled : dict
        Each subsampled plate's name, with its subsample size and its full size.
    stochastic : bool
        Whether two runs at one point disagree (a plate that subsamples at random): such
        a log joint has no fixed mode.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoDiagonalNormal
    >>> def model():
    ...     with pyro.plate("groups", 3):
    ...         pyro.sample("s", dist.LogNormal(0.0, 1.0))
    >>> guide = AutoDiagonalNormal(model)
    >>> guide._setup_prototype()
    >>> log_joint = unconstrained_log_joint(guide)
    >>> log_joint(torch.zeros(4, 3)).shape, log_joint.batching.value, log_joint.stochastic
    (torch.Size([4]), 'vmap', False)
    """

    def __init__(self, guide: AutoContinuous, args: tuple, kwargs: dict) -> None:
        self.layout = LatentLayout(guide)
        self.args, self.kwargs = args, kwargs
        self.batching: Batching | None = None
        # One run of the whole model (the guide's prototype has only its latent sites):
        # the plates of observed sites too, and the values of the sites other guides cover.
        init, blocks, inner = _peel(guide)
        with poutine.block():
            trace = poutine.trace(init(inner) if init else inner).get_trace(*args, **kwargs)
        # Inside an AutoGuideList a part's model is poutine.block(model, hide=...): the
        # hidden sites, which other parts guide, would be drawn from the prior at every run
        # and make the log joint random. They are held at init_loc_fn's values, drawn once.
        own = set(guide.prototype_trace.stochastic_nodes)
        held = {
            name: site["value"].detach()
            for name, site in prune_subsample_sites(trace).iter_stochastic_nodes()
            if name not in own
        }
        self._model = _wrapped(inner, blocks, held)
        # Pyro refuses a plate's full index set where it was given a subsample size, so a
        # model that draws its subsample at random keeps a random log joint: say so.
        self.subsampled = subsampled_plates(trace)
        point = guide._init_loc().detach()
        self.stochastic = bool(self.subsampled) and bool(self(point) != self(point))

    def __call__(self, z: Tensor) -> Tensor:
        """The log joint at ``z``, shape ``(dim,)`` (a scalar) or ``(num_draws, dim)``."""
        if z.dim() == 1:
            return self._one(z)
        if self.batching is None:
            self.batching = choose_batching(
                lambda way: self._probe(way, z[[0, -1]]),
                ways=(Batching.VMAP, Batching.LOOP),
                purpose="the unconstrained log joint",
            )[0]
        if self.batching is Batching.VMAP:
            return self._batched(z)
        return torch.stack([self._one(row) for row in z])

    def _probe(self, way: Batching, rows: Tensor) -> None:
        """Whether ``way`` scores ``rows`` as one draw at a time does (a ValueError if not)."""
        if way is Batching.LOOP:
            return
        batched = self._batched(rows)
        looped = torch.stack([self._one(row) for row in rows])
        if batched.shape != looped.shape or not torch.allclose(
            batched, looped, rtol=1e-4, atol=1e-4, equal_nan=True
        ):
            raise ValueError("vmap's values differ from those of one draw at a time")

    def _batched(self, z: Tensor) -> Tensor:
        # torch.func.vmap runs the model once for the whole batch and, unlike a plate over
        # the draws, leaves the model's own shapes alone: a model written for one draw
        # (``x @ beta``) vectorises as it is (timings in docs/robust.md).
        return torch.func.vmap(self._one, randomness="same")(z)

    def _one(self, z: Tensor) -> Tensor:
        values, log_jacobian = {}, z.new_zeros(())
        for name, unconstrained_value in self.layout.unpack(z):
            transform = self.layout.transforms[name]
            if transform is None:  # the real line: value as is, zero log-det
                values[name] = unconstrained_value
                continue
            value = values[name] = transform(unconstrained_value)
            log_jacobian = (
                log_jacobian + transform.log_abs_det_jacobian(unconstrained_value, value).sum()
            )
        # Unvalidated: the prototype run validated the model; here the search's own points
        # (and validation's NaN checks are control flow that vmap cannot batch).
        with poutine.block(), pyro.validation_enabled(False):
            trace = poutine.trace(poutine.condition(self._model, values)).get_trace(
                *self.args, **self.kwargs
            )
            return trace.log_prob_sum() + log_jacobian


def unconstrained_log_joint(guide: AutoContinuous, *args: Any, **kwargs: Any) -> LogJoint:
    """The log joint of ``guide``'s model as a function of its unconstrained latent vector.

    ``log p(data, T(z)) + log|det dT/dz|`` with ``T`` the map from the guide's packed
    unconstrained vector to the model's constrained sites; see `LogJoint`, which also
    scores whole batches of draws in one model run. Latent sites that other guides cover
    (the hidden sites of a ``poutine.block``-ed model in an ``AutoGuideList``) are held
    fixed.

    Parameters
    ----------
    guide : AutoContinuous
        A guide whose prototype is set up (it has been called once, or
        ``guide._setup_prototype(*args, **kwargs)`` has run).
    *args, **kwargs
        The model's arguments.

    Returns
    -------
    LogJoint
        ``log_joint(z)``: a scalar for ``z`` of shape ``(guide.latent_dim,)``, shape
        ``(num_draws,)`` for ``z`` of shape ``(num_draws, guide.latent_dim)``.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoDiagonalNormal
    >>> def model():
    ...     pyro.sample("s", dist.LogNormal(0.0, 1.0))
    >>> guide = AutoDiagonalNormal(model)
    >>> guide._setup_prototype()
    >>> log_joint = unconstrained_log_joint(guide)
    >>> round(float(log_joint(torch.zeros(1))), 4)  # the N(0, 1) density of log s at 0
    -0.9189
    """
    if guide.prototype_trace is None:
        raise ValueError("guide has no prototype yet: call it once with the model's arguments")
    return LogJoint(guide, args, kwargs)
