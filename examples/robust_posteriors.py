"""Flow guides against NUTS on four ill-conditioned posteriors.

Models (all float64):

- ``years``: linear regression with flat priors (N(0, 1000^2)) on intercept and slope and the
  predictor in calendar years (x in 1980..2020): intercept and slope correlate at -0.99998
  and their standard deviations differ by a factor 2000.
- ``correlated``: regression on 25 correlated predictors (equicorrelation 0.9, column
  scales spanning 10^-1.5..10^1.5), N = 5000.
- ``garch``: GARCH(1,1) on 1000 simulated returns; omega > 0, alpha in (0, 1) and
  beta = (1 - alpha) * beta_frac with beta_frac in (0, 1).
- ``schools``: eight schools, centered parametrisation (its reference is drawn from the
  non-centered model, which has the same posterior and samples without divergences).

Each model's reference is one seeded NUTS chain, cached under
``--cache``, run on the model reparametrised by the affine map of its Laplace
approximation (the same posterior; it spares NUTS a long warm-up), for the schools on the
non-centered model. Each guide is fitted by `pyro_nf.fit` with default settings;
the table reports, over all scalar latent parameters in unconstrained space, the largest
|mean - NUTS mean| / NUTS sd and |log(sd / NUTS sd)|, and the wall time of the fit
(warm start included; the setup column is the first step's, which holds it).

Run ``python examples/robust_posteriors.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide import (
    AutoContinuous,
    AutoDiagonalNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.infer.mcmc import MCMC, NUTS
from pyro.ops.stats import effective_sample_size, split_gelman_rubin
from pyro.poutine.util import prune_subsample_sites

from pyro_nf.autoguides import AutoFlow, AutoIAFFlow
from pyro_nf.fitting import fit
from pyro_nf.laplace import laplace_approximation
from pyro_nf.log_joint import unconstrained_log_joint

SCHOOLS_Y = [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
SCHOOLS_SIGMA = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]


@dataclass
class Problem:
    """A model, its data, and how to draw its NUTS reference."""

    name: str
    model: Callable
    args: tuple
    reference_model: Callable | None = None  # same posterior, easier to sample
    to_model_sites: Callable[[dict], dict] | None = None


def years_problem() -> Problem:
    gen = torch.Generator().manual_seed(1)
    x = 1980 + 40 * torch.rand(40, generator=gen)
    y = -40.0 + 0.02 * x + 0.15 * torch.randn(40, generator=gen)

    def model(x, y):
        a = pyro.sample("intercept", dist.Normal(0.0, 1000.0))  # flat on the posterior's scale
        b = pyro.sample("slope", dist.Normal(0.0, 1000.0))
        sigma = pyro.sample("sigma", dist.HalfCauchy(torch.tensor(1.0)))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(a + b * x, sigma), obs=y)

    return Problem("years", model, (x, y))


def correlated_problem(num_data: int = 5000, num_predictors: int = 25) -> Problem:
    gen = torch.Generator().manual_seed(2)
    cov = 0.9 * torch.ones(num_predictors, num_predictors) + 0.1 * torch.eye(num_predictors)
    col_scale = 10 ** torch.linspace(-1.5, 1.5, num_predictors)
    x = torch.randn(num_data, num_predictors, generator=gen) @ torch.linalg.cholesky(cov).T
    x = x * col_scale
    beta = torch.randn(num_predictors, generator=gen) / col_scale
    y = 3.0 + x @ beta + 2.0 * torch.randn(num_data, generator=gen)

    def model(x, y):
        a = pyro.sample("intercept", dist.Normal(0.0, 100.0))
        b = pyro.sample("beta", dist.Normal(0.0, 100.0).expand([x.shape[1]]).to_event(1))
        sigma = pyro.sample("sigma", dist.HalfNormal(10.0))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(a + x @ b, sigma), obs=y)

    return Problem("correlated", model, (x, y))


def _garch_variance(eps: torch.Tensor, omega, alpha, beta, h0: float) -> torch.Tensor:
    """h_t = omega + alpha eps_{t-1}^2 + beta h_{t-1}, h_0 given, as one matrix product."""
    n = eps.shape[-1]
    t = torch.arange(1, n)
    lag = (t[:, None] - 1 - torch.arange(n - 1)[None, :]).clamp_min(0)
    mask = torch.arange(n - 1)[None, :] < t[:, None]
    powers = torch.where(mask, torch.exp(lag * torch.log(beta)), 0.0)
    drive = omega + alpha * eps[:-1].pow(2)
    h = powers @ drive + torch.exp(t * torch.log(beta)) * h0
    return torch.cat([torch.full((1,), h0), h])


def garch_problem(num_data: int = 1000) -> Problem:
    gen = torch.Generator().manual_seed(3)
    omega, alpha, beta, mu = 0.05, 0.1, 0.85, 0.05
    returns, h = [], omega / (1 - alpha - beta)
    eps_prev = 0.0
    for _ in range(num_data):
        h = omega + alpha * eps_prev**2 + beta * h
        eps_prev = math.sqrt(h) * torch.randn(1, generator=gen).item()
        returns.append(mu + eps_prev)
    r = torch.tensor(returns)
    h0 = float(r.var())

    def model(r):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        omega = pyro.sample("omega", dist.HalfNormal(1.0))
        alpha = pyro.sample("alpha", dist.Uniform(0.0, 1.0))
        beta_frac = pyro.sample("beta_frac", dist.Uniform(0.0, 1.0))
        h = _garch_variance(r - mu, omega, alpha, (1 - alpha) * beta_frac, h0)
        with pyro.plate("time", len(r)):
            pyro.sample("r", dist.Normal(mu, h.sqrt()), obs=r)

    return Problem("garch", model, (r,))


def schools_problem() -> Problem:
    y, sigma = torch.tensor(SCHOOLS_Y), torch.tensor(SCHOOLS_SIGMA)

    def centered(y, sigma):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        with pyro.plate("schools", len(y)):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
            pyro.sample("y", dist.Normal(theta, sigma), obs=y)

    def non_centered(y, sigma):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        with pyro.plate("schools", len(y)):
            z = pyro.sample("theta_std", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(mu + tau * z, sigma), obs=y)

    def to_centered(draws: dict) -> dict:
        theta = draws["mu"][:, None] + draws["tau"][:, None] * draws["theta_std"]
        return {"mu": draws["mu"], "tau": draws["tau"], "theta": theta}

    return Problem("schools", centered, (y, sigma), non_centered, to_centered)


PROBLEMS = {
    "years": years_problem,
    "correlated": correlated_problem,
    "garch": garch_problem,
    "schools": schools_problem,
}


def latent_supports(problem: Problem) -> dict:
    trace = prune_subsample_sites(pyro.poutine.trace(problem.model).get_trace(*problem.args))
    return {
        name: site["fn"].support
        for name, site in trace.iter_stochastic_nodes()
        if not site["is_observed"]
    }


def _preconditioned_nuts(problem: Problem, args: argparse.Namespace) -> tuple[MCMC, Callable]:
    """NUTS on w with z = m + L w, (m, L L^T) the Laplace approximation: the same posterior.

    An affine reparametrisation leaves the target exact; it only spares NUTS the long
    warm-up a posterior with correlations near 1 and scales 1000 apart costs it.
    """
    packer = AutoDiagonalNormal(problem.model)
    packer._setup_prototype(*problem.args)
    log_joint = unconstrained_log_joint(packer, *problem.args)
    laplace = laplace_approximation(log_joint, packer._init_loc())
    center, scale_tril = laplace.loc, laplace.scale_tril

    def potential(params: dict) -> torch.Tensor:
        return -log_joint(center + scale_tril @ params["w"])

    # Diagonal adaptation: the whitened posterior is near-isotropic, and a dense estimate
    # from the first short warm-up window (fewer draws than dimensions) is singular.
    kernel = NUTS(potential_fn=potential, target_accept_prob=args.target_accept)
    mcmc = MCMC(
        kernel,
        num_samples=args.num_samples,
        warmup_steps=args.num_warmup,
        initial_params={"w": torch.zeros(len(center))},
    )
    mcmc.run()

    def to_sites(draws: dict) -> dict:
        latent = center + draws["w"] @ scale_tril.T
        return {
            site["name"]: biject_to(site["fn"].support)(value)
            for site, value in packer._unpack_latent(latent)
        }

    return mcmc, to_sites


def nuts_reference(problem: Problem, args: argparse.Namespace) -> dict:
    """Constrained NUTS draws of the model's latent sites, with diagnostics (cached)."""
    path = Path(args.cache) / f"{problem.name}_{args.num_warmup}_{args.num_samples}.pt"
    if path.exists():
        return torch.load(path)
    pyro.set_rng_seed(0)
    start = time.perf_counter()
    if problem.reference_model is None:
        mcmc, to_sites = _preconditioned_nuts(problem, args)
    else:
        kernel = NUTS(
            problem.reference_model,
            full_mass=True,
            max_plate_nesting=1,
            target_accept_prob=args.target_accept,
        )
        mcmc = MCMC(kernel, num_samples=args.num_samples, warmup_steps=args.num_warmup)
        mcmc.run(*problem.args)
        to_sites = problem.to_model_sites
    seconds = time.perf_counter() - start
    draws = to_sites(mcmc.get_samples())
    divergences = int(sum(len(v) for v in mcmc.diagnostics().get("divergences", {}).values()))
    flat = flatten(unconstrain(draws, latent_supports(problem)))
    chains = flat.T.unsqueeze(-1)  # (param, draws, 1): one chain per parameter
    ess = torch.stack([effective_sample_size(c.T, 0, 1) for c in chains]).squeeze(-1)
    rhat = torch.stack([split_gelman_rubin(c.T, 0, 1) for c in chains]).squeeze(-1)
    result = {
        "draws": draws,
        "seconds": seconds,
        "min_ess": float(ess.min()),
        "max_rhat": float(rhat.max()),
        "divergences": divergences,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, path)
    return result


def unconstrain(draws: dict, supports: dict) -> dict:
    return {name: biject_to(supports[name]).inv(draws[name]) for name in supports}


def flatten(draws: dict) -> torch.Tensor:
    """(num_draws, num_scalar_parameters), sites in sorted order."""
    return torch.cat([draws[name].reshape(len(draws[name]), -1) for name in sorted(draws)], -1)


@torch.no_grad()
def guide_draws(guide, supports: dict, num_draws: int, args: tuple = ()) -> dict:
    """Unconstrained draws of each latent site from a fitted AutoContinuous/AutoNormal
    (`args`: the model's, which a guide in non-centred coordinates reads its priors at)."""
    if isinstance(guide, AutoContinuous):
        # Sliced by hand: Pyro's _unpack_latent cannot put a sample dimension left of
        # plate dimensions (it fails on plated sites such as the schools' theta).
        latent = guide.get_posterior(*args).rsample((num_draws,))
        draws, start = {}, 0
        for name, shape in guide._unconstrained_shapes.items():
            size = math.prod(shape)
            draws[name] = latent[:, start : start + size].reshape(num_draws, *shape)
            start += size
        return draws
    draws = {}
    for name in supports:
        loc, scale = guide._get_loc_and_scale(name)
        draws[name] = loc + scale * torch.randn((num_draws, *loc.shape))
    return draws


GUIDES: dict[str, Callable] = {
    "AutoNormal": AutoNormal,
    "AutoMultivariateNormal": AutoMultivariateNormal,
    "AutoFlow (no warm start)": lambda model: AutoFlow(model, warm_start=None),
    "AutoFlow (model's coordinates)": lambda model: AutoFlow(model, noncentered=False),
    "AutoFlow (default)": AutoFlow,
    "AutoIAFFlow (default)": AutoIAFFlow,
}


def errors(problem: Problem, guide, reference: dict, num_draws: int) -> tuple[float, float]:
    """Largest |mean - NUTS mean| / NUTS sd and largest |log(sd / NUTS sd)| over all scalar
    latent parameters, in unconstrained space, from `num_draws` draws of the fitted guide
    (against the reference's `mean` and `sd` instead where it has them: exact moments)."""
    supports = latent_supports(problem)
    ref = flatten(unconstrain(reference["draws"], supports))
    draws = flatten(guide_draws(guide, supports, num_draws, problem.args))
    ref_mean, ref_sd = reference.get("mean", ref.mean(0)), reference.get("sd", ref.std(0))
    mean_err = ((draws.mean(0) - ref_mean).abs() / ref_sd).max().item()
    return mean_err, (draws.std(0) / ref_sd).log().abs().max().item()


def fit_row(
    problem: Problem, label: str, make_guide: Callable, reference: dict, args: argparse.Namespace
) -> dict:
    """Fit one guide by `fit` at its defaults (seeded); its errors and its cost, printed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    guide = make_guide(problem.model)
    start = time.perf_counter()
    result = fit(problem.model, guide, *problem.args, progress=False, seed=args.seed)
    seconds = time.perf_counter() - start
    mean_err, sd_err = errors(problem, guide, reference, args.num_draws)
    chosen = getattr(guide, "start", None)
    row = {
        "model": problem.name,
        "guide": label,
        "mean_err": mean_err,
        "sd_err": sd_err,
        "seconds": seconds,
        "setup_s": result.setup_time,
        "steps": result.num_steps,
        "particles": result.num_particles,
        "particle_schedule": result.particle_schedule,
        "stop_reason": result.stop_reason,
        "start": chosen.label if chosen is not None else None,
    }
    print(json.dumps(row), flush=True)
    return row


#: The table's columns: header, and how a row's cell is written.
COLUMNS: dict[str, Callable[[dict], str]] = {
    "model": lambda r: r["model"],
    "guide": lambda r: r["guide"],
    "max mean err (sd)": lambda r: f"{r['mean_err']:.3f}",
    "max abs log sd ratio": lambda r: f"{r['sd_err']:.3f}",
    "steps": lambda r: str(r["steps"]),
    "particles": lambda r: str(r["particles"]),
    "stop": lambda r: r["stop_reason"],
    "time (s)": lambda r: f"{r['seconds']:.1f}",
    "setup (s)": lambda r: f"{r['setup_s']:.1f}",
}


def markdown_table(rows: list[dict], columns: dict[str, Callable[[dict], str]] = COLUMNS) -> str:
    """The rows as a Markdown table, one column per entry of `columns`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r) for cell in columns.values()) + " |" for r in rows]
    return "\n".join(lines)


def argument_parser(description: str, problems: dict, cache: str) -> argparse.ArgumentParser:
    """The options of this example and of `benchmarks/fit_cost.py`: models, NUTS, fits."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", nargs="+", choices=list(problems), default=list(problems))
    parser.add_argument("--num-warmup", type=int, default=1000)
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--target-accept", type=float, default=0.9)
    parser.add_argument("--num-draws", type=int, default=20000, help="guide draws per fit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=cache, help="NUTS draws cache")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--nuts-only", action="store_true", help="only draw the references")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__doc__.split("\n\n")[0], PROBLEMS, "/tmp/pyro_nf_nuts")
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    rows = []
    for name in args.models:
        problem = PROBLEMS[name]()
        reference = nuts_reference(problem, args)
        summary = {k: v for k, v in reference.items() if k != "draws"}
        print(json.dumps({"model": name, "nuts": summary}), flush=True)
        if not args.nuts_only:
            rows += [fit_row(problem, *item, reference, args) for item in GUIDES.items()]
    if rows:
        print(markdown_table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
