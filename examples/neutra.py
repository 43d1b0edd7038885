"""NeuTra NUTS vs plain NUTS on Neal's funnel (10-D) and the centred eight schools.

For each model and seed: fit the default spline guide with `pyro_nf.fit`, run NUTS in
its base space (`pyro_nf.neutra_mcmc`, at each `--target-accept`) and plain NUTS on the
model as written (`pyro_nf.nuts_mcmc`, Pyro's defaults) with the same number of
iterations, and compare divergences, the error of the posterior means and sds against
the exact posterior (the funnel's marginals; for eight schools, moments integrated over
tau, where the rest is conjugate) with their Monte-Carlo standard errors, bulk ESS per
gradient evaluation and per second (guide training included for NeuTra) and R-hat, from
ArviZ. The eight-schools model is the one of examples/eight_schools.py.

The defaults are a smoke run of seconds; the eight-schools table in docs/neutra.md came
from (``--fit-steps 5000`` is `pyro_nf.fit`'s own cap: the fits stop as converged; the
funnel's table from ``--models funnel --fit-steps 1500 --target-accept 0.8 --seeds 0 1``
without ``--full-mass``)

    python examples/neutra.py --models schools --fit-steps 5000 --warmup 300 \\
        --samples 600 --chains 2 --target-accept 0.9 --full-mass --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from eight_schools import SIGMA, Y, centered  # the model of examples/eight_schools.py

import pyro_nf
from pyro_nf.diagnostics import psis_khat
from pyro_nf.fitting.estimators import ESTIMATORS

#: Exact marginals of the funnel: v ~ N(0, 3), and x_i with mean 0 and variance E[e^v].
FUNNEL_X_SD = math.exp(9 / 4)
#: The priors of `eight_schools.centered`: mu ~ N(0, 5), tau ~ HalfCauchy(5).
MU_SD, TAU_SCALE = 5.0, 5.0


def funnel(dim: int = 9) -> None:
    """Neal's funnel in 10 dimensions: v and nine x_i ~ N(0, e^(v/2))."""
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    pyro.sample("x", dist.Normal(torch.zeros(dim), (v / 2).exp()).to_event(1))


def schools_moments(num_points: int = 20001) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Exact posterior means and sds of eight schools' mu, tau and theta.

    Given tau the model is conjugate: mu | tau, y is normal, and so is theta | mu, tau, y;
    p(tau | y) is known up to a constant, so every moment is a one-dimensional integral
    over log tau (a grid from 1e-6 to 1e4; 2001 points already agree to 4 digits). A
    Monte-Carlo reference of the size this study can afford would carry errors near the
    0.1 sd the runs are checked against.
    """
    y, sigma = Y.double(), SIGMA.double()
    log_tau = torch.linspace(math.log(1e-6), math.log(1e4), num_points, dtype=torch.float64)
    tau = log_tau.exp()
    var_y = sigma**2 + tau[:, None] ** 2  # y_j | mu, tau has variance sigma_j^2 + tau^2
    var_mu = 1 / (1 / MU_SD**2 + (1 / var_y).sum(-1))
    mean_mu = var_mu * (y / var_y).sum(-1)
    marginal = dist.MultivariateNormal(torch.zeros_like(y), torch.diag_embed(var_y) + MU_SD**2)
    prior = dist.HalfCauchy(torch.tensor(TAU_SCALE, dtype=torch.float64)).log_prob(tau)
    log_weight = marginal.log_prob(y) + prior + log_tau  # + log tau: the grid is in log tau
    weight = (log_weight - log_weight.max()).exp()
    weight = weight / weight.sum()
    shrink = sigma**2 / var_y  # theta_j | mu, tau, y: mean (1 - b) y_j + b mu, b = this
    mean_theta = (1 - shrink) * y + shrink * mean_mu[:, None]
    var_theta = sigma**2 * tau[:, None] ** 2 / var_y + shrink**2 * var_mu[:, None]
    conditional = {
        "mu": (mean_mu, var_mu),
        "tau": (tau, torch.zeros_like(tau)),
        "theta": (mean_theta, var_theta),
    }
    moments = {}
    for name, (mean, var) in conditional.items():
        w = weight.reshape(-1, *[1] * (mean.ndim - 1))
        total_mean = (w * mean).sum(0)
        total_var = (w * (var + mean**2)).sum(0) - total_mean**2  # law of total variance
        moments[name] = (total_mean.numpy(), total_var.sqrt().numpy())
    return moments


FUNNEL_MOMENTS = {
    "v": (np.zeros(()), np.full((), 3.0)),
    "x": (np.zeros(9), np.full(9, FUNNEL_X_SD)),
}


def errors(idata: az.InferenceData, moments: dict, sd_checked: tuple[str, ...]) -> dict:
    """Largest |mean error| (in posterior sds) and |sd error| (relative) against exact
    moments, and the largest Monte-Carlo standard errors of those estimates (ArviZ's
    MCSE, same units): an error is resolved only where it is well above its MCSE."""
    mcse_mean, mcse_sd = az.mcse(idata, method="mean"), az.mcse(idata, method="sd")
    worst = dict.fromkeys(("mean_error", "sd_error", "mean_mcse", "sd_mcse"), 0.0)
    for name, (mean, sd) in moments.items():
        draws = idata.posterior[name].values
        draws = draws.reshape(-1, *draws.shape[2:])
        worst["mean_error"] = max(worst["mean_error"], np.abs((draws.mean(0) - mean) / sd).max())
        worst["mean_mcse"] = max(worst["mean_mcse"], (mcse_mean[name].values / sd).max())
        if name in sd_checked:
            sd_error = np.abs(draws.std(0, ddof=1) / sd - 1).max()
            worst["sd_error"] = max(worst["sd_error"], sd_error)
            worst["sd_mcse"] = max(worst["sd_mcse"], (mcse_sd[name].values / sd).max())
    return {key: float(value) for key, value in worst.items()}


def summarise(result: pyro_nf.MCMCResult, seconds: float, moments: dict, sd_checked) -> dict:
    """One table row: divergences, errors, min bulk ESS per gradient and per second."""
    idata = result.inference_data
    ess = float(az.ess(idata, method="bulk").to_array().min())
    return {
        "divergences": int(idata.sample_stats["diverging"].sum()),
        **errors(idata, moments, sd_checked),
        "min_ess_bulk": ess,
        "ess_per_1000_grads": 1000 * ess / result.num_gradient_evaluations,
        "ess_per_second": ess / seconds,
        "max_rhat": float(az.rhat(idata).to_array().max()),
        "mean_tree_depth": float(idata.sample_stats["tree_depth"].mean()),
        "gradients": result.num_gradient_evaluations,
        "seconds": seconds,
    }


def run_model(name: str, args: argparse.Namespace, seed: int) -> Iterator[tuple[str, dict]]:
    """Fit the default spline guide, then NeuTra NUTS (at each target acceptance) and
    plain NUTS (at Pyro's defaults, and with `--plain-matched` at NeuTra's settings too),
    same budget; yield each row when it is done."""
    model, moments, sd_checked = MODELS[name]
    budget = dict(
        num_samples=args.samples,
        warmup_steps=args.warmup,
        num_chains=args.chains,
        seed=seed,
        progress=False,
    )
    pyro.clear_param_store()
    start = time.perf_counter()
    guide = pyro_nf.AutoSplineFlow(model)
    fitted = pyro_nf.fit(
        model, guide, num_steps=args.fit_steps, seed=seed, estimator=args.estimator, progress=False
    )
    fit_seconds = time.perf_counter() - start
    fit_info = {"fit_seconds": fit_seconds, "fit_steps": fitted.num_steps, "elbo": fitted.elbo}
    fit_info["fit_stop"] = fitted.stop_reason
    fit_info["start"] = guide.start.label
    fit_info["khat"] = psis_khat(model, guide, num_samples=2000)  # the guide's own quality
    jit = {"jit_compile": True, "ignore_jit_warnings": True} if args.jit else {}
    for target in args.target_accept:
        options = {"max_tree_depth": args.max_tree_depth, "target_accept_prob": target, **jit}
        options["full_mass"] = args.full_mass
        neutra = pyro_nf.neutra_mcmc(model, guide, **budget, nuts_options=options)
        row = summarise(neutra, fit_seconds + neutra.seconds, moments, sd_checked)
        mass = "dense" if args.full_mass else "diagonal"
        yield f"{name} seed {seed} NeuTra NUTS {target} {mass}", {**row, **fit_info}
    settings = [(0.8, False)]  # Pyro's defaults
    if args.plain_matched:
        settings += [(target, args.full_mass) for target in args.target_accept]
    for target, full_mass in dict.fromkeys(settings):
        options = {"max_tree_depth": args.max_tree_depth, "target_accept_prob": target, **jit}
        plain = pyro_nf.nuts_mcmc(model, **budget, nuts_options={**options, "full_mass": full_mass})
        mass = "dense" if full_mass else "diagonal"
        row = summarise(plain, plain.seconds, moments, sd_checked)
        yield f"{name} seed {seed} plain NUTS {target} {mass}", row


#: Per model: the model, its exact moments, the variables whose sd is checked. The sd
#: of the funnel's x_i is not: its sample estimate has a relative standard error of
#: about 150 / sqrt(draws) (x_i's kurtosis is huge), so no run of this size can check it.
MODELS = {
    "funnel": (funnel, FUNNEL_MOMENTS, ("v",)),
    "schools": (centered, schools_moments(), ("mu", "tau", "theta")),
}
COLUMNS = (
    ("divergences", "div", "d"),
    ("mean_error", "mean err (sd)", ".3f"),
    ("mean_mcse", "its MCSE", ".3f"),
    ("sd_error", "sd err", ".3f"),
    ("sd_mcse", "its MCSE", ".3f"),
    ("min_ess_bulk", "min bulk ESS", ".0f"),
    ("ess_per_1000_grads", "ESS / 1000 grads", ".2f"),
    ("ess_per_second", "ESS / s", ".3f"),
    ("max_rhat", "max R-hat", ".3f"),
    ("mean_tree_depth", "tree depth", ".2f"),
)


def print_table(rows: dict) -> None:
    print("| run | " + " | ".join(title for _, title, _ in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for label, row in rows.items():
        cells = " | ".join(format(row[key], spec) for key, _, spec in COLUMNS)
        print(f"| {label} | {cells} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fit-steps", type=int, default=100, help="most fit() steps")
    parser.add_argument("--warmup", type=int, default=20, help="NUTS warm-up per chain")
    parser.add_argument("--samples", type=int, default=20, help="NUTS draws per chain")
    parser.add_argument("--chains", type=int, default=2, help="chains, run in turn")
    parser.add_argument(
        "--estimator", choices=ESTIMATORS, default="elbo", help="fit()'s objective for the guide"
    )
    parser.add_argument("--max-tree-depth", type=int, default=10, help="NUTS's, as Pyro's")
    parser.add_argument(
        "--target-accept", type=float, nargs="+", default=[0.8], help="NeuTra NUTS's, each"
    )
    parser.add_argument(
        "--full-mass", action="store_true", help="dense mass matrix for NeuTra NUTS"
    )
    parser.add_argument(
        "--plain-matched",
        action="store_true",
        help="also run plain NUTS at NeuTra's settings (besides Pyro's defaults)",
    )
    parser.add_argument(
        "--jit", action="store_true", help="compile the potential (Pyro's jit_compile), both NUTS"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--json", default="", help="write the rows to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = {}
    for seed in args.seeds:
        for name in args.models:
            for label, row in run_model(name, args, seed):
                rows[label] = row
                if args.json:  # after every row: a long run keeps what it has done
                    with open(args.json, "w") as file:
                        json.dump(rows, file, indent=1)
    print_table(rows)


if __name__ == "__main__":
    main()
