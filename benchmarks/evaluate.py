"""Accuracy measures: ELBO draws, KL(q‖p), PSIS k-hat, moments against a NUTS reference."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import sum_rightmost
from pyro.infer import MCMC, NUTS
from torch import Tensor

from benchmarks.targets import SCHOOLS_SIGMA, SCHOOLS_Y

__all__ = [
    "Draws",
    "draw_from_guide",
    "kl_estimate",
    "moment_errors",
    "nuts_eight_schools",
]


@dataclass
class Draws:
    """Fresh draws from a guide, scored under the guide and the model.

    Attributes
    ----------
    log_weights : Tensor
        ``log p(x, z) - log q(z)`` per draw (unnormalised ``p``), shape ``(num,)``.
    values : dict of str to Tensor
        Each latent site's constrained value, with the draw as leading dimension.
    """

    log_weights: Tensor
    values: dict[str, Tensor]


def _per_draw(trace, num: int, nesting: int) -> Tensor:
    total = torch.zeros(num)
    for site in trace.nodes.values():
        if site["type"] == "sample":
            total = total + sum_rightmost(site["log_prob"], nesting).detach()
    return total


@torch.no_grad()
def draw_from_guide(model: Callable, guide: Callable, num: int, max_plate_nesting: int) -> Draws:
    """Draw ``num`` joint samples from ``guide`` in one vectorised pass and score them.

    The guide is scored by its own ``log_prob`` (as Trace_ELBO does), the model by
    replaying it on the guide's values, both under one plate of ``num`` draws placed left
    of the model's plates.
    """
    with pyro.plate("_draws", num, dim=-(max_plate_nesting + 1)):
        guide_trace = poutine.trace(guide).get_trace()
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace()
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    log_q = _per_draw(guide_trace, num, max_plate_nesting)
    log_p = _per_draw(model_trace, num, max_plate_nesting)
    values = {
        name: site["value"].detach()
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
    }
    return Draws(log_p - log_q, values)


def kl_estimate(log_weights: Tensor, log_z: float) -> tuple[float, float]:
    """``KL(q‖p) = log Z - E_q[log w]`` and its Monte-Carlo standard error.

    Examples
    --------
    >>> kl_estimate(torch.tensor([1.0, 1.0, 1.0]), log_z=1.5)
    (0.5, 0.0)
    """
    weights = log_weights.double()
    elbo = float(weights.mean())
    se = float(weights.std() / math.sqrt(weights.numel())) if weights.numel() > 1 else math.nan
    return log_z - elbo, se


def log_mean_exp(log_weights: Tensor) -> float:
    """``log mean exp(log_weights)``: the importance-sampling estimate of ``log Z``."""
    weights = log_weights.double()
    return float(torch.logsumexp(weights, 0) - math.log(weights.numel()))


def moment_errors(values: dict[str, Tensor], reference: dict[str, Tensor]) -> dict[str, float]:
    """Largest mean error and largest relative sd error over all scalar parameters.

    Mean errors are in units of the reference posterior sd; sd errors are
    ``|sd_q / sd_ref - 1|``.
    """
    mean_errors, sd_errors = [], []
    for name, ref in reference.items():
        ours = values[name].reshape(values[name].shape[0], -1).double()
        ref = ref.reshape(ref.shape[0], -1).double()
        ref_sd = ref.std(0)
        mean_errors.append(((ours.mean(0) - ref.mean(0)).abs() / ref_sd).max())
        sd_errors.append((ours.std(0) / ref_sd - 1).abs().max())
    return {
        "max_mean_error_sd": float(torch.stack(mean_errors).max()),
        "max_sd_rel_error": float(torch.stack(sd_errors).max()),
    }


def _eight_schools_noncentered() -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", 8):
        theta_std = pyro.sample("theta_std", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * theta_std)
        pyro.sample("y", dist.Normal(theta, SCHOOLS_SIGMA), obs=SCHOOLS_Y)


def nuts_eight_schools(
    num_samples: int, warmup_steps: int, seed: int, cache_dir: Path | None = None
) -> dict[str, Tensor]:
    """Reference posterior draws of eight schools (``mu``, ``tau``, ``theta``) by NUTS.

    NUTS runs on the non-centered parametrisation, which it samples without divergences,
    and the draws are mapped to the centered parameters (the same posterior). Draws are
    cached in ``cache_dir`` keyed by the settings.
    """
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"nuts_eight_schools_{num_samples}_{warmup_steps}_{seed}.pt"
        if cache.exists():
            return torch.load(cache)
    pyro.set_rng_seed(seed)
    kernel = NUTS(_eight_schools_noncentered, target_accept_prob=0.9)
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps, disable_progbar=True)
    mcmc.run()
    samples = mcmc.get_samples()
    draws = {name: samples[name] for name in ("mu", "tau")}
    draws["theta"] = samples["mu"][:, None] + samples["tau"][:, None] * samples["theta_std"]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(draws, cache)
    return draws
