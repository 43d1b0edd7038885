"""NUTS in a fitted flow guide's base space (NeuTra HMC, Hoffman et al. 2019).

A flow guide maps ``eps ~ N(0, I)`` to its posterior over the model's unconstrained
latent vector (`AutoFlow.get_transform`). Where the guide is good, the model's posterior
pulled back through that map is close to ``N(0, I)``: funnels and correlations gone, so
NUTS needs neither tiny steps nor deep trees. `neutra_mcmc` runs Pyro's `NUTS` on the
model reparametrised by Pyro's `NeuTraReparam`, and maps every draw back to the model's
own coordinates; the MCMC stays exact whatever the guide, which only sets the geometry.
`nuts_mcmc` runs the same sampler on the model as written, with the same outputs, for
comparison.

Both record what ArviZ calls ``sample_stats``: divergences, tree depth, leapfrog steps
(one gradient evaluation each) and step size, per draw. Chains run one after another in
this process: Pyro's parallel chains need a picklable model and guide and a free core per
chain, and draw them one after another with a warning otherwise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import arviz as az
import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.infer import MCMC, NUTS
from pyro.infer.mcmc.util import initialize_model
from pyro.infer.reparam import NeuTraReparam
from torch import Tensor

from pyro_nf.autoguides import AutoFlow
from pyro_nf.dims import site_dims
from pyro_nf.distribution import _detached_parameters
from pyro_nf.fitting.threads import choose_threads, restored_threads
from pyro_nf.saved_state import site_signature
from pyro_nf.structured import AutoStructuredFlow

__all__ = ["MCMCResult", "neutra_mcmc", "nuts_mcmc"]


@dataclass
class MCMCResult:
    """Draws of a NUTS run, in the model's own coordinates, with its diagnostics.

    Attributes
    ----------
    samples : dict of str to Tensor
        Per latent site, all chains' draws stacked, shape
        ``(num_chains * num_samples, *site_shape)``, in the site's support.
    inference_data : arviz.InferenceData
        The same draws as a ``posterior`` group (dimensions under a plate named after
        it), and a ``sample_stats`` group with ``diverging``, ``tree_depth``,
        ``n_steps`` (leapfrog steps, one gradient evaluation each) and ``step_size``
        per draw.
    num_gradient_evaluations : int
        Leapfrog steps over all chains, warm-up included: the sampler's cost.
    seconds : float
        Wall-clock time of the sampling, warm-up included.
    num_threads : int
        Torch's intra-op thread count the chains ran with: the faster of the caller's
        count and one thread, timed on the potential's gradient before sampling (the
        caller's count is restored after).

    Examples
    --------
    >>> import pyro.distributions as dist
    >>> def model():
    ...     pyro.sample("x", dist.Normal(0.0, 1.0))
    >>> result = nuts_mcmc(model, num_samples=20, warmup_steps=20, progress=False, seed=0)
    >>> result.samples["x"].shape, result.inference_data.sample_stats["tree_depth"].shape
    (torch.Size([20]), (1, 20))
    """

    samples: dict[str, Tensor]
    inference_data: az.InferenceData
    num_gradient_evaluations: int
    seconds: float
    num_threads: int


class _RecordingNUTS(NUTS):
    """Pyro's NUTS, recording each transition's tree depth and leapfrog steps.

    Tree depth counts the trajectory doublings, as Stan and NumPyro report it: Pyro's
    top-level ``_build_tree`` calls pass depths 0, 1, ..., so their largest plus one.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.tree_depths: list[int] = []
        self.leapfrog_steps: list[int] = []
        self.step_sizes: list[float] = []
        self._depth = self._steps = 0

    def _build_basetree(self, *args: object, **kwargs: object) -> tuple:
        self._steps += 1
        return super()._build_basetree(*args, **kwargs)

    def _build_tree(
        self,
        z: dict,
        r: dict,
        z_grads: dict,
        log_slice: Tensor,
        direction: int,
        tree_depth: int,
        energy_current: Tensor,
    ) -> tuple:
        self._depth = max(self._depth, tree_depth + 1)
        return super()._build_tree(z, r, z_grads, log_slice, direction, tree_depth, energy_current)

    def sample(self, params: dict) -> dict:
        self._depth = self._steps = 0
        step_size = self.step_size  # the step this transition takes
        params = super().sample(params)
        self.tree_depths.append(self._depth)
        self.leapfrog_steps.append(self._steps)
        self.step_sizes.append(float(step_size))
        return params


@dataclass
class _Chain:
    samples: dict[str, Tensor]  # as MCMC.get_samples(): (num_samples, *shape), constrained
    stats: dict[str, np.ndarray]  # per draw
    num_gradient_evaluations: int


def _run_chain(
    model: Callable,
    args: tuple,
    kwargs: dict,
    num_samples: int,
    warmup_steps: int,
    progress: bool,
    nuts_options: dict,
) -> _Chain:
    kernel = _RecordingNUTS(model, **nuts_options)
    mcmc = MCMC(
        kernel, num_samples=num_samples, warmup_steps=warmup_steps, disable_progbar=not progress
    )
    mcmc.run(*args, **kwargs)
    diverging = np.zeros(num_samples, dtype=bool)
    diverging[mcmc.diagnostics()["divergences"]["chain 0"]] = True
    draws = slice(warmup_steps, None)
    stats = {
        "diverging": diverging,
        "tree_depth": np.asarray(kernel.tree_depths[draws]),
        "n_steps": np.asarray(kernel.leapfrog_steps[draws]),
        "step_size": np.asarray(kernel.step_sizes[draws]),
    }
    return _Chain(mcmc.get_samples(), stats, sum(kernel.leapfrog_steps))


def _budget(num_samples: int, warmup_steps: int | None, num_chains: int) -> tuple[int, int, int]:
    """``(num_samples, warmup_steps, num_chains)``, checked, warm-up defaulting to
    ``num_samples``."""
    warmup_steps = num_samples if warmup_steps is None else warmup_steps
    for name, value, least in (
        ("num_samples", num_samples, 1),
        ("warmup_steps", warmup_steps, 0),
        ("num_chains", num_chains, 1),
    ):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    return num_samples, warmup_steps, num_chains


def _latent_sites(model: Callable, args: tuple, kwargs: dict) -> dict[str, dict]:
    """The model's latent sample sites, from one run (drawn from the prior)."""
    with poutine.block():
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    return {
        name: site
        for name, site in trace.iter_stochastic_nodes()
        if not site["infer"].get("is_auxiliary")
    }


def _run(
    model: Callable,
    args: tuple,
    kwargs: dict,
    budget: tuple[int, int, int],
    progress: bool,
    seed: int | None,
    nuts_options: dict | None,
    to_model: Callable[[dict], dict[str, Tensor]],
    sites: dict[str, dict],
) -> MCMCResult:
    """Run the chains of ``model`` one after another; ``to_model`` maps each chain's
    draws to the model's sites."""
    num_samples, warmup_steps, num_chains = budget
    chains, start = [], time.perf_counter()
    with restored_threads():
        threads = _choose_threads(model, args, kwargs)
        for chain in range(num_chains):
            if seed is not None:
                pyro.set_rng_seed(seed + chain)
            chains.append(
                _run_chain(
                    model, args, kwargs, num_samples, warmup_steps, progress, nuts_options or {}
                )
            )
    seconds = time.perf_counter() - start
    by_chain = [to_model(chain.samples) for chain in chains]
    samples = {name: torch.cat([draws[name] for draws in by_chain]) for name in by_chain[0]}
    posterior = {
        name: np.stack([draws[name].detach().cpu().numpy() for draws in by_chain])
        for name in by_chain[0]
    }
    stats = {name: np.stack([chain.stats[name] for chain in chains]) for name in chains[0].stats}
    dims = {name: site_dims(name, sites[name], value.ndim - 2) for name, value in posterior.items()}
    idata = az.from_dict(posterior=posterior, sample_stats=stats, dims=dims)
    evaluations = sum(chain.num_gradient_evaluations for chain in chains)
    return MCMCResult(samples, idata, evaluations, seconds, threads)


def _choose_threads(model: Callable, args: tuple, kwargs: dict) -> int:
    """Torch's intra-op thread count for the chains: the faster of the caller's count and
    one thread, timed on the potential's gradient at an initial point (as `fit` times its
    steps)."""
    params, potential, _, _ = initialize_model(model, args, kwargs)

    def gradient() -> None:
        point = {name: value.detach().requires_grad_() for name, value in params.items()}
        torch.autograd.grad(potential(point), list(point.values()))

    return choose_threads(gradient).chosen


def nuts_mcmc(
    model: Callable,
    *args: object,
    num_samples: int = 1000,
    warmup_steps: int | None = None,
    num_chains: int = 1,
    progress: bool = True,
    seed: int | None = None,
    nuts_options: dict | None = None,
    **kwargs: object,
) -> MCMCResult:
    """Pyro's NUTS on ``model`` as written, with the diagnostics of `neutra_mcmc`.

    Parameters
    ----------
    model : callable
        A Pyro model with continuous latent sites.
    *args, **kwargs
        The model's arguments.
    num_samples : int
        Draws kept per chain.
    warmup_steps : int, optional
        Adaptation steps per chain (step size and diagonal mass matrix); default
        ``num_samples``.
    num_chains : int
        Chains, run one after another.
    progress : bool
        Show Pyro's progress bar.
    seed : int, optional
        Chain ``c`` starts from ``pyro.set_rng_seed(seed + c)``; None leaves Pyro's
        random state alone.
    nuts_options : dict, optional
        Options for Pyro's `NUTS` (``target_accept_prob``, ``max_tree_depth``, ...).

    Returns
    -------
    MCMCResult

    Examples
    --------
    >>> import pyro.distributions as dist
    >>> def model():
    ...     pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    >>> result = nuts_mcmc(model, num_samples=50, warmup_steps=50, progress=False, seed=0)
    >>> bool((result.samples["scale"] > 0).all())
    True
    """
    budget = _budget(num_samples, warmup_steps, num_chains)
    sites = _latent_sites(model, args, kwargs)
    return _run(model, args, kwargs, budget, progress, seed, nuts_options, dict, sites)


def _check_guide(guide: object, sites: dict[str, dict]) -> None:
    _check_joint(guide)
    if not isinstance(guide, AutoFlow):
        raise TypeError(
            "neutra_mcmc: guide must be a fitted pyro_nf flow guide (AutoFlow or one of "
            f"its named subclasses, such as AutoSplineFlow), got "
            f"{type(guide).__name__}; for Pyro's own AutoContinuous guides use "
            "pyro.infer.reparam.NeuTraReparam directly"
        )
    if guide.prototype_trace is None:
        raise ValueError(
            f"neutra_mcmc: the {type(guide).__name__} guide was never fitted; fit it first, "
            "e.g. pyro_nf.fit(model, guide, *args)"
        )
    unknown = [name for name, _ in guide.prototype_trace.iter_stochastic_nodes()]
    unknown = [name for name in unknown if name not in sites]
    if unknown:
        raise ValueError(
            f"neutra_mcmc: the guide has latent site(s) {unknown} that the model does not "
            f"sample (the model's latent sites: {sorted(sites)}); pass the model the guide "
            "was fitted to"
        )
    differences = _site_differences(guide, sites)
    if differences:
        raise ValueError(
            f"neutra_mcmc: the guide was fitted to another model ({'; '.join(differences)}): "
            "its draws would be mapped through the supports it was fitted with, not the "
            "model's. Fit the guide to this model first, e.g. pyro_nf.fit(model, guide, *args)"
        )


def _check_joint(guide: object) -> None:
    """Refuse a guide of the structured form: NeuTra needs one flow over every latent site."""
    structure = getattr(guide, "structure", None)
    if not (isinstance(guide, AutoStructuredFlow) or (structure and structure.structured)):
        return
    reason = f" ({structure.reason})" if structure else ""
    raise ValueError(
        f"neutra_mcmc: the {type(guide).__name__} guide is of the structured form{reason}, "
        "a flow on the global latents and per-member parameters on the local ones; NeuTra "
        "needs one flow over every latent site, which only the joint form has. Fit "
        "AutoFlow(model, structured=False) on the model's full data (no subsample_size) "
        "and pass that guide, or sample the model with nuts_mcmc"
    )


def _site_differences(guide: AutoFlow, sites: dict[str, dict]) -> list[str]:
    """How the guide's sites differ from the model's in shape, support or transform."""
    signature = site_signature(guide.prototype_trace.iter_stochastic_nodes())
    theirs = site_signature((name, sites[name]) for name in signature)
    differences = []
    for name, mine in signature.items():
        transforms = [
            _transform_name(biject_to(site["fn"].support))
            for site in (guide.prototype_trace.nodes[name], sites[name])
        ]
        mine["transform"], theirs[name]["transform"] = transforms
        differences += [
            f"site {name!r} {key}: the guide's {mine[key]}, the model's {theirs[name][key]}"
            for key in ("shape", "support", "transform")
            if mine[key] != theirs[name][key]
        ]
    return differences


def _transform_name(transform: object) -> str:
    """``"ExpTransform"``, or a composition's parts in order (``"A then B"``)."""
    parts = getattr(transform, "parts", None)
    if parts is None:
        return type(transform).__name__
    return " then ".join(_transform_name(part) for part in parts) or "identity"


def _from_base(guide: AutoFlow) -> Callable[[dict], dict]:
    """Map a chain's draws of the shared base latent to the guide's sites, constrained."""
    transform = guide.get_transform()
    names = [name for name, _ in guide.prototype_trace.iter_stochastic_nodes()]
    latent_name = f"{names[0]}_shared_latent"  # as NeuTraReparam names it

    @torch.no_grad()
    def to_model(samples: dict) -> dict[str, Tensor]:
        result = {name: value for name, value in samples.items() if name != latent_name}
        z, start = transform(samples[latent_name]), 0
        for name in names:
            site = guide.prototype_trace.nodes[name]
            shape = guide._unconstrained_shapes[name]
            size = math.prod(shape)
            unconstrained = z[..., start : start + size].reshape(*z.shape[:-1], *shape)
            result[name] = biject_to(site["fn"].support)(unconstrained)
            start += size
        return result

    return to_model


def neutra_mcmc(
    model: Callable,
    guide: AutoFlow,
    *args: object,
    num_samples: int = 1000,
    warmup_steps: int | None = None,
    num_chains: int = 1,
    progress: bool = True,
    seed: int | None = None,
    nuts_options: dict | None = None,
    **kwargs: object,
) -> MCMCResult:
    """NUTS in a fitted flow guide's base space (NeuTra), draws in the model's coordinates.

    Runs Pyro's `NUTS` on ``model`` reparametrised by Pyro's `NeuTraReparam(guide)`: the
    chain moves ``eps``, the guide's `get_transform` maps it to the model's unconstrained
    latent vector, and the model's density is pulled back with the map's log-determinant.
    The draws are exact for the model whatever the guide (the map only changes the
    geometry NUTS sees), and the better the guide, the closer that geometry to ``N(0, I)``:
    fewer divergences, larger steps, shallower trees. The guide's parameters are held
    fixed (detached: the gradient graph is the chain's position only). In non-centred
    coordinates the map reads the model's prior parameters at ``*args, **kwargs``.
    Pyro's NUTS settings are kept (diagonal mass matrix, target acceptance 0.8): with
    the default spline guide they leave NUTS nearly free of divergences on funnels and
    centred eight schools, where plain NUTS diverges (docs/neutra.md).
    ``nuts_options={"jit_compile": True, "ignore_jit_warnings": True}`` compiles the
    potential, a large part of the cost of a gradient there. The guide is checked
    against the model first: every site it covers must have the same shape, support and
    transform there.

    Parameters
    ----------
    model : callable
        The Pyro model the guide was fitted to.
    guide : AutoFlow
        A fitted pyro_nf flow guide (any family, any coordinates or warm start), of the
        joint form: a guide that took the structured form (`AutoFlow.structure`) has no
        flow over every latent site, and is refused with what to do instead.
    *args, **kwargs
        The model's arguments.
    num_samples, warmup_steps, num_chains, progress, seed, nuts_options
        As in `nuts_mcmc`.

    Returns
    -------
    MCMCResult
        Draws of every latent site of the model (those the guide covers mapped from the
        base space; any others, sampled by NUTS directly, as they are).

    Examples
    --------
    >>> import pyro.distributions as dist
    >>> from pyro_nf import AutoPlanarFlow, fit
    >>> def model():
    ...     pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    >>> guide = AutoPlanarFlow(model)
    >>> _ = fit(model, guide, num_steps=20, progress=False, seed=0)
    >>> result = neutra_mcmc(model, guide, num_samples=50, warmup_steps=50, progress=False,
    ...                      seed=0)
    >>> bool((result.samples["scale"] > 0).all())
    True
    >>> result.inference_data.sample_stats["diverging"].shape
    (1, 50)
    """
    budget = _budget(num_samples, warmup_steps, num_chains)
    sites = _latent_sites(model, args, kwargs)
    _check_guide(guide, sites)
    reparametrised = NeuTraReparam(guide).reparam(model)
    # The guide is a constant for NUTS: its parameters detached, each gradient of the
    # potential is taken through the chain's position only.
    with _detached_parameters(guide), guide.model_arguments(*args, **kwargs):
        to_model = _from_base(guide)
        return _run(
            reparametrised, args, kwargs, budget, progress, seed, nuts_options, to_model, sites
        )
