"""Eight schools (centred parameterisation, the funnel): AutoNormal vs AutoSplineFlow vs NUTS.

Fits both guides with :func:`pyro_nf.fit`, then reports each guide's PSIS k-hat and the
error of its posterior mean and sd of ``tau`` (and the other parameters) in units of the
NUTS posterior sd. The NUTS reference runs on the non-centred model, which has the same
posterior but no funnel (the centred one makes NUTS diverge), with ``theta`` mapped back.

The defaults finish in about a minute on one free CPU core; the study in
docs/diagnostics.md used ``--steps 3000 --nuts-samples 500 --nuts-chains 2
--psis-samples 4000``.

    python examples/eight_schools.py --help
"""

from __future__ import annotations

import argparse
import time

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import AutoNormal

import pyro_nf
from pyro_nf.comparison import compare_to_mcmc
from pyro_nf.diagnostics import psis_khat, to_inference_data

Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


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


def run_nuts(num_samples: int, num_chains: int, seed: int) -> az.InferenceData:
    """NUTS chains (run one after another) on the non-centred model, theta mapped back."""
    chains = []
    for chain in range(num_chains):
        pyro.set_rng_seed(seed + chain)
        mcmc = MCMC(
            NUTS(noncentered, target_accept_prob=0.9),
            num_samples=num_samples,
            warmup_steps=num_samples,
            disable_progbar=True,
        )
        mcmc.run()
        draws = mcmc.get_samples()
        draws["theta"] = draws["mu"][:, None] + draws["tau"][:, None] * draws["eta"]
        chains.append({k: v.numpy() for k, v in draws.items() if k != "eta"})
    posterior = {k: np.stack([c[k] for c in chains]) for k in chains[0]}
    return az.from_dict(posterior=posterior, dims={"theta": ["school"]})


def fit_guide(name: str, steps: int, seed: int, estimator: str) -> tuple:
    pyro.clear_param_store()
    guide = AutoNormal(centered) if name == "AutoNormal" else pyro_nf.AutoSplineFlow(centered)
    result = pyro_nf.fit(
        centered, guide, num_steps=steps, seed=seed, estimator=estimator, progress=False
    )
    return guide, result


def plot(guides: dict, nuts: az.InferenceData, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure written")
        return
    fig, axes = plt.subplots(1, len(guides), figsize=(5 * len(guides), 4), sharey=True)
    ref_theta = nuts.posterior["theta"].values[..., 0].ravel()
    ref_tau = nuts.posterior["tau"].values.ravel()
    for ax, (name, idata) in zip(np.atleast_1d(axes), guides.items(), strict=True):
        ax.scatter(ref_theta, np.log(ref_tau), s=3, alpha=0.3, color="C1", label="NUTS")
        theta = idata.posterior["theta"].values[..., 0].ravel()
        tau = idata.posterior["tau"].values.ravel()
        ax.scatter(theta, np.log(tau), s=3, alpha=0.3, color="C0", label=name)
        ax.set_xlabel("theta[0]")
        ax.set_title(name)
        ax.legend(loc="lower right")
    np.atleast_1d(axes)[0].set_ylabel("log tau")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"figure written to {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="maximum fit() steps per guide")
    parser.add_argument("--nuts-samples", type=int, default=200, help="NUTS draws (and warmup)")
    parser.add_argument("--nuts-chains", type=int, default=1, help="NUTS chains, run in turn")
    parser.add_argument("--psis-samples", type=int, default=2000, help="draws for k-hat")
    parser.add_argument("--estimator", choices=("elbo", "stl"), default="elbo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--png", default="eight_schools.png", help="figure path ('' for none)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    start = time.perf_counter()
    nuts = run_nuts(args.nuts_samples, args.nuts_chains, args.seed)
    summary = az.summary(nuts, var_names=["mu", "tau"])
    print(f"NUTS ({args.nuts_chains} x {args.nuts_samples}, {time.perf_counter() - start:.0f} s):")
    print(summary[["mean", "sd", "ess_bulk", "r_hat"]].to_string())

    draws = {}
    print(f"\n{'guide':<15}{'steps':>6}{'ELBO':>9}{'k-hat':>8}"
          f"{'tau mean err':>14}{'tau sd err':>12}{'max |mean err|':>16}")  # fmt: skip
    for name in ("AutoNormal", "AutoSplineFlow"):
        guide, result = fit_guide(name, args.steps, args.seed, args.estimator)
        khat = psis_khat(centered, guide, num_samples=args.psis_samples)
        draws[name] = to_inference_data(centered, guide, num_samples=4000)
        table = compare_to_mcmc(draws[name], nuts)
        tau = table.loc["tau"]
        print(f"{name:<15}{result.num_steps:>6}{result.elbo:>9.3f}{khat:>8.2f}"
              f"{tau.mean_error:>+14.2f}{tau.sd_error:>+12.2f}"
              f"{table.mean_error.abs().max():>16.2f}")  # fmt: skip
    if args.png:
        plot(draws, nuts, args.png)


if __name__ == "__main__":
    main()
