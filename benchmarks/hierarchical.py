"""Normal-normal hierarchical model at J groups: AutoStructuredFlow against AutoNormal,
both against the exact posterior.

The model: ``mu ~ N(0, 5^2)``, ``tau ~ HalfNormal(2)``, ``a_j ~ N(mu, tau^2)`` and each
group's mean of ``n_j`` observations (1 to 5, noise sd 1) ``ybar_j ~ N(a_j, 1 / n_j)``.
Given ``tau`` the rest is Gaussian, so the exact posterior is a one-dimensional mixture
over ``log tau``, integrated on a fine grid: the mean and sd of ``mu``, ``log tau`` and every
``a_j``. Errors are in posterior sds (means) and as |log sd ratio| (sds); for the groups,
the 95th percentile over groups. Both guides are fitted by `pyro_nf.fit` at its defaults,
same seed; above ``--full-batch-max`` groups the plate is subsampled (minibatches of
``--batch-size``).

Usage::

    python -m benchmarks.hierarchical                        # J = 100, 1000, 10000, 100000
    python -m benchmarks.hierarchical --groups 100 1000 --seed 1
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoNormal
from torch import Tensor

from pyro_nf import fit
from pyro_nf.structured import AutoStructuredFlow

RESULTS = Path(__file__).parent / "results"
PRIOR_MU_SD, PRIOR_TAU_SCALE = 5.0, 2.0


def model(ybar: Tensor, se: Tensor, batch_size: int | None = None) -> None:
    """The normal-normal model on the groups' means ``ybar`` with standard errors ``se``."""
    mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_MU_SD))
    tau = pyro.sample("tau", dist.HalfNormal(PRIOR_TAU_SCALE))
    with pyro.plate("groups", len(ybar), subsample_size=batch_size) as j:
        a = pyro.sample("a", dist.Normal(mu, tau))
        pyro.sample("ybar", dist.Normal(a, se[j]), obs=ybar[j])


def simulate(num_groups: int, seed: int) -> tuple[Tensor, Tensor]:
    """Group means and standard errors: ``mu = 1``, ``tau = 0.5``, 1-5 draws a group."""
    generator = torch.Generator().manual_seed(seed)
    n = torch.randint(1, 6, (num_groups,), generator=generator).double()
    a = 1.0 + 0.5 * torch.randn(num_groups, generator=generator, dtype=torch.float64)
    se = n.rsqrt()
    ybar = a + se * torch.randn(num_groups, generator=generator, dtype=torch.float64)
    return ybar.float(), se.float()


def _given_tau(y: Tensor, s2: Tensor, log_tau: Tensor) -> tuple[Tensor, ...]:
    """For each ``log tau`` of a chunk of the grid: the log evidence (up to a constant),
    the posterior precision and mean of ``mu``, and each group's mean and variance."""
    tau2 = (2 * log_tau).exp().unsqueeze(-1)  # (chunk, 1)
    v = tau2 + s2  # marginal variance of ybar_j given mu, tau
    precision = PRIOR_MU_SD**-2 + (1 / v).sum(-1)
    m = (y / v).sum(-1) / precision
    log_evidence = (
        -0.5 * (v.log() + y**2 / v).sum(-1)
        + 0.5 * m**2 * precision
        - 0.5 * precision.log()
        - math.log(PRIOR_MU_SD)
    )
    tau = log_tau.exp()
    log_w = log_evidence + dist.HalfNormal(PRIOR_TAU_SCALE).log_prob(tau) + log_tau
    shrink = 1 / (1 / tau2 + 1 / s2)  # Var(a_j | mu, tau)
    a_mean = shrink * (m.unsqueeze(-1) / tau2 + y / s2)
    a_var = shrink + (shrink / tau2) ** 2 / precision.unsqueeze(-1)
    return log_w, precision, m, a_mean, a_var


def exact_moments(
    ybar: Tensor, se: Tensor, num_grid: int = 8001, chunk: int = 200
) -> dict[str, Tensor]:
    """Exact posterior means and sds of ``mu``, ``log tau`` and each ``a_j``: a grid over
    ``log tau`` in chunks (memory stays at ``chunk`` x J whatever the grid).

    Examples
    --------
    >>> ybar, se = simulate(50, 0)
    >>> moments = exact_moments(ybar, se)
    >>> moments["a_mean"].shape, bool(moments["log_tau_sd"] > 0)
    (torch.Size([50]), True)
    """
    y, s2 = ybar.double(), se.double() ** 2
    grid = torch.linspace(-20.0, 3.0, num_grid, dtype=torch.float64).split(chunk)
    log_w = torch.cat([_given_tau(y, s2, log_tau)[0] for log_tau in grid])
    w = (log_w - log_w.logsumexp(0)).exp()
    if float(w[0] + w[-1]) > 1e-6:
        raise RuntimeError("the log tau grid misses posterior mass; widen it")
    sums = torch.zeros(4, dtype=torch.float64)  # E mu, E mu^2, E log tau, E log tau^2
    a_first, a_second = torch.zeros_like(y), torch.zeros_like(y)
    for log_tau, weights in zip(grid, w.split(chunk), strict=True):
        _, precision, m, a_mean, a_var = _given_tau(y, s2, log_tau)
        sums += torch.stack(
            [
                (weights * m).sum(),
                (weights * (1 / precision + m**2)).sum(),
                (weights * log_tau).sum(),
                (weights * log_tau**2).sum(),
            ]
        )
        a_first += weights @ a_mean
        a_second += weights @ (a_var + a_mean**2)
    return {
        "mu_mean": sums[0],
        "mu_sd": (sums[1] - sums[0] ** 2).sqrt(),
        "log_tau_mean": sums[2],
        "log_tau_sd": (sums[3] - sums[2] ** 2).sqrt(),
        "a_mean": a_first,
        "a_sd": (a_second - a_first**2).sqrt(),
    }


def autonormal_moments(guide: AutoNormal) -> dict:
    """AutoNormal's exact means and sds (its ``tau`` is log-normal: ``log tau`` Gaussian).

    Read from its parameters: its plates are its prototype's, so under subsampling its
    draws hold one minibatch of groups, never all of them.
    """
    with torch.no_grad():
        loc = {name: getattr(guide.locs, name).double() for name in ("mu", "tau", "a")}
        scale = {name: getattr(guide.scales, name).double() for name in ("mu", "tau", "a")}
    return {
        "mu_mean": loc["mu"],
        "mu_sd": scale["mu"],
        "log_tau_mean": loc["tau"],
        "log_tau_sd": scale["tau"],
        "a_mean": loc["a"],
        "a_sd": scale["a"],
    }


def guide_moments(guide: object, ybar: Tensor, se: Tensor, num_samples: int) -> dict:
    """Monte-Carlo means and sds of the guide's ``mu``, ``log tau`` and every ``a_j``."""
    if isinstance(guide, AutoNormal):
        return autonormal_moments(guide)
    with torch.no_grad():
        pyro.set_rng_seed(123)
        draws = Predictive(
            model, guide=guide, num_samples=num_samples, return_sites=["mu", "tau", "a"]
        )(ybar, se, None)
    mu, log_tau, a = draws["mu"].double(), draws["tau"].double().log(), draws["a"].double()
    a = a.reshape(num_samples, -1)
    return {
        "mu_mean": mu.mean(),
        "mu_sd": mu.std(),
        "log_tau_mean": log_tau.mean(),
        "log_tau_sd": log_tau.std(),
        "a_mean": a.mean(0),
        "a_sd": a.std(0),
    }


def errors(approx: dict, exact: dict) -> dict[str, float]:
    """Mean errors in exact posterior sds and sd errors as |log ratio|."""
    result = {}
    for name in ("mu", "log_tau", "a"):
        mean_error = ((approx[f"{name}_mean"] - exact[f"{name}_mean"]) / exact[f"{name}_sd"]).abs()
        sd_error = (approx[f"{name}_sd"] / exact[f"{name}_sd"]).log().abs()
        if name == "a":
            result["a_mean_p95"] = float(mean_error.quantile(0.95))
            result["a_sd_p95"] = float(sd_error.quantile(0.95))
        else:
            result[f"{name}_mean"] = float(mean_error)
            result[f"{name}_sd"] = float(sd_error)
    return result


def run_one(name: str, num_groups: int, batch_size: int | None, seed: int, samples: int) -> dict:
    """Fit one guide at defaults and measure it."""
    ybar, se = simulate(num_groups, seed)
    pyro.clear_param_store()
    guide = AutoStructuredFlow(model) if name == "structured" else AutoNormal(model)
    start = time.perf_counter()
    result = fit(model, guide, ybar, se, batch_size, progress=False, seed=seed)
    wall = time.perf_counter() - start
    params = sum(p.numel() for p in pyro.get_param_store().values())
    approx = guide_moments(guide, ybar, se, samples)
    row = {
        "guide": name,
        "groups": num_groups,
        "batch_size": batch_size,
        "wall_s": wall,
        "steps": result.num_steps,
        "params": params,
        "nan": not math.isfinite(result.elbo),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    row.update(errors(approx, exact_moments(ybar, se)))
    return row


COLUMNS = (
    ("guide", "{:>10}"),
    ("groups", "{:>7}"),
    ("batch_size", "{:>6}"),
    ("wall_s", "{:>7.1f}"),
    ("steps", "{:>6}"),
    ("params", "{:>7}"),
    ("mu_mean", "{:>7.3f}"),
    ("mu_sd", "{:>6.3f}"),
    ("log_tau_mean", "{:>7.3f}"),
    ("log_tau_sd", "{:>6.3f}"),
    ("a_mean_p95", "{:>7.3f}"),
    ("a_sd_p95", "{:>6.3f}"),
)


def format_row(row: dict) -> str:
    """One table row (markdown)."""
    cells = [fmt.format(row[key] if row[key] is not None else "-") for key, fmt in COLUMNS]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, nargs="+", default=[100, 1000, 10000, 100000])
    parser.add_argument("--full-batch-max", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=1000, help="draws behind each moment")
    parser.add_argument("--guides", nargs="+", default=["structured", "autonormal"])
    parser.add_argument("--out", type=Path, default=RESULTS / "hierarchical.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| " + " | ".join(key for key, _ in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    rows = []
    for num_groups in args.groups:
        batch = args.batch_size if num_groups > args.full_batch_max else None
        for name in args.guides:
            rows.append(run_one(name, num_groups, batch, args.seed, args.samples))
            print(format_row(rows[-1]), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=1))  # after each row: a crash keeps them


if __name__ == "__main__":
    main()
