"""NeuTra NUTS vs plain NUTS on Neal's funnel (10-D) and the centred eight schools.

For each model and seed: fit the default spline guide with `pyro_nf.fit`, run NUTS in
its base space (`pyro_nf.neutra_mcmc`) and plain NUTS on the model as written
(`pyro_nf.nuts_mcmc`) with the same number of iterations, and compare divergences, the
error of the posterior means and sds against a reference (the funnel's exact marginals;
for eight schools a long plain NUTS run on the non-centred model), bulk ESS per gradient
evaluation and per second (guide training included for NeuTra) and R-hat, from ArviZ.

The defaults are a smoke run of seconds; the table in docs/neutra.md came from

    python examples/neutra.py --fit-steps 1500 --warmup 200 --samples 300 --chains 2 \\
        --seeds 0 1 --reference-samples 1000 --json neutra.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import torch

import pyro_nf
from pyro_nf.diagnostics import compare_to_mcmc

Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
#: Exact marginals of the funnel: v ~ N(0, 3), and x_i with mean 0 and variance E[e^v].
FUNNEL_X_SD = math.exp(9 / 4)


def funnel(dim: int = 9) -> None:
    """Neal's funnel in 10 dimensions: v and nine x_i ~ N(0, e^(v/2))."""
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    pyro.sample("x", dist.Normal(torch.zeros(dim), (v / 2).exp()).to_event(1))


def centered(y: torch.Tensor = Y, sigma: torch.Tensor = SIGMA) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def noncentered(y: torch.Tensor = Y, sigma: torch.Tensor = SIGMA) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(y)):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu + tau * eta, sigma), obs=y)


def schools_reference(num_samples: int) -> dict[str, np.ndarray]:
    """Plain NUTS on the non-centred model (no funnel), theta mapped back."""
    result = pyro_nf.nuts_mcmc(
        noncentered, num_samples=num_samples, num_chains=2, seed=100, progress=False
    )
    draws = {name: value.numpy() for name, value in result.samples.items()}
    draws["theta"] = draws["mu"][:, None] + draws["tau"][:, None] * draws.pop("eta")
    return draws


def funnel_errors(idata: az.InferenceData) -> tuple[float, float]:
    """Largest |mean error| (v and every x_i) and |sd error| (v) against the exact law.

    The sd of x_i is left out: its sample estimate has a relative standard error of
    about 150 / sqrt(draws) (x_i's kurtosis is huge), so no run of this size can
    check it.
    """
    v = idata.posterior["v"].values.ravel()
    x = idata.posterior["x"].values.reshape(-1, 9)
    mean_error = max(abs(v.mean()) / 3.0, float(np.abs(x.mean(0)).max()) / FUNNEL_X_SD)
    return float(mean_error), float(abs(v.std(ddof=1) - 3.0) / 3.0)


def schools_errors(idata: az.InferenceData, reference: dict) -> tuple[float, float]:
    table = compare_to_mcmc(idata, reference)
    return float(table.mean_error.abs().max()), float(table.sd_error.abs().max())


def summarise(result: pyro_nf.MCMCResult, seconds: float, errors: tuple) -> dict:
    """One table row: divergences, errors, min bulk ESS per gradient and per second."""
    idata = result.inference_data
    ess = float(az.ess(idata, method="bulk").to_array().min())
    return {
        "divergences": int(idata.sample_stats["diverging"].sum()),
        "mean_error": errors[0],
        "sd_error": errors[1],
        "min_ess_bulk": ess,
        "ess_per_1000_grads": 1000 * ess / result.num_gradient_evaluations,
        "ess_per_second": ess / seconds,
        "max_rhat": float(az.rhat(idata).to_array().max()),
        "mean_tree_depth": float(idata.sample_stats["tree_depth"].mean()),
        "seconds": seconds,
    }


def run_model(name: str, model, args: argparse.Namespace, seed: int, errors) -> dict:
    """Fit the default spline guide, then NeuTra NUTS and plain NUTS, same budget."""
    budget = dict(
        num_samples=args.samples,
        warmup_steps=args.warmup,
        num_chains=args.chains,
        seed=seed,
        progress=False,
        nuts_options={"max_tree_depth": args.max_tree_depth},
    )
    pyro.clear_param_store()
    start = time.perf_counter()
    guide = pyro_nf.AutoSplineFlow(model)
    pyro_nf.fit(model, guide, num_steps=args.fit_steps, seed=seed, progress=False)
    fit_seconds = time.perf_counter() - start
    neutra = pyro_nf.neutra_mcmc(model, guide, **budget)
    plain = pyro_nf.nuts_mcmc(model, **budget)
    rows = {
        "NeuTra NUTS": summarise(
            neutra, fit_seconds + neutra.seconds, errors(neutra.inference_data)
        ),
        "plain NUTS": summarise(plain, plain.seconds, errors(plain.inference_data)),
    }
    rows["NeuTra NUTS"]["fit_seconds"] = fit_seconds
    return {f"{name} seed {seed} {method}": row for method, row in rows.items()}


COLUMNS = (
    ("divergences", "div", "d"),
    ("mean_error", "mean err (sd)", ".3f"),
    ("sd_error", "sd err", ".3f"),
    ("min_ess_bulk", "min bulk ESS", ".0f"),
    ("ess_per_1000_grads", "ESS / 1000 grads", ".2f"),
    ("ess_per_second", "ESS / s", ".2f"),
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
    parser.add_argument("--max-tree-depth", type=int, default=10, help="NUTS's, as Pyro's")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--reference-samples", type=int, default=100, help="per chain")
    parser.add_argument("--models", nargs="+", default=["funnel", "schools"])
    parser.add_argument("--json", default="", help="write the rows to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    errors = {"funnel": (funnel, funnel_errors)}
    if "schools" in args.models:
        reference = schools_reference(args.reference_samples)
        errors["schools"] = (centered, lambda idata: schools_errors(idata, reference))
    rows = {}
    for seed in args.seeds:
        for name in args.models:
            model, error_fn = errors[name]
            rows.update(run_model(name, model, args, seed, error_fn))
            if args.json:  # after every model: a long run keeps what it has done
                with open(args.json, "w") as file:
                    json.dump(rows, file, indent=1)
    print_table(rows)


if __name__ == "__main__":
    main()
