"""Radon's five globals with the counties' intercepts and slopes integrated out, exactly.

Given the globals, county j's intercept and slope are Gaussian a priori and its homes' log
radon is Gaussian and linear in them, so they integrate out in closed form::

    y_j ~ Normal(X_j (mu_a, mu_b), sigma_y^2 I + X_j diag(sigma_a^2, sigma_b^2) X_j^T)

with ``X_j`` the county's rows ``(1, floor_i)``. `collapsed_model` is the radon model
(`benchmarks.radon.model`) written so: its posterior is the five globals' posterior of the
full model, a target on which a flow's fit of the globals alone is judged against the
same NUTS reference (`benchmarks.radon.load_reference`), whatever a guide does for the
counties. Each county enters through six sums of its homes (`county_sums`), and the 2 x 2
algebra is written out (Woodbury's identity and the matrix determinant lemma).

`main` fits `AutoSplineFlow` to it at each particle count and seed given (``None``:
`fit`'s own choice) and scores the globals from 20,000 draws::

    python -m benchmarks.radon_collapsed --particles 0 256 --seeds 1 3 --out /tmp/c.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import pyro
import torch
from torch import Tensor

from benchmarks import radon
from benchmarks.exact_hierarchical import score
from pyro_nf import AutoSplineFlow, fit, reweighted

__all__ = ["collapsed_log_likelihood", "collapsed_model", "county_sums", "fit_and_score"]


def county_sums(data: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per county (shape ``(85,)``): homes ``n``, and the sums of ``x``, ``x^2``, ``y``,
    ``x y`` and ``y^2`` over its homes (``x`` the floor, ``y`` the log radon).

    Examples
    --------
    >>> sums = county_sums(radon.load_radon())
    >>> int(sums["n"].sum()), sums["y"].shape
    (919, torch.Size([85]))
    """
    county, y = data["county"], data["log_radon"]
    x = data["floor"].to(y.dtype)

    def per_county(values: Tensor) -> Tensor:
        return torch.zeros(radon.NUM_COUNTIES, dtype=y.dtype).index_add_(0, county, values)

    terms = {"n": torch.ones_like(y), "x": x, "xx": x * x, "y": y, "xy": x * y, "yy": y * y}
    return {name: per_county(values) for name, values in terms.items()}


def collapsed_log_likelihood(
    sums: dict[str, Tensor],
    mu_a: Tensor,
    mu_b: Tensor,
    sigma_a: Tensor,
    sigma_b: Tensor,
    sigma_y: Tensor,
) -> Tensor:
    """``log p(y | globals)`` summed over the counties, the intercepts and slopes
    integrated out; the globals of any (common) batch shape, which the result takes.

    Examples
    --------
    >>> sums = county_sums(radon.load_radon())
    >>> one = torch.tensor(1.0, dtype=torch.float64)
    >>> collapsed_log_likelihood(sums, one, -one, one, one, one).shape
    torch.Size([])
    """
    n, sx, sxx, sy, sxy, syy = (sums[k] for k in ("n", "x", "xx", "y", "xy", "yy"))
    mu_a, mu_b, sigma_a, sigma_b, sigma_y = (
        t.unsqueeze(-1) for t in (mu_a, mu_b, sigma_a, sigma_b, sigma_y)
    )
    var_a, var_b, var_y = sigma_a.square(), sigma_b.square(), sigma_y.square()
    # A = diag(var_a, var_b)^-1 + X^T X / var_y, per county.
    a11, a12, a22 = 1 / var_a + n / var_y, sx / var_y, 1 / var_b + sxx / var_y
    det = a11 * a22 - a12.square()
    # r = y - X mu: X^T r and r^T r from the sums.
    b1 = (sy - n * mu_a - sx * mu_b) / var_y
    b2 = (sxy - sx * mu_a - sxx * mu_b) / var_y
    rr = syy - 2 * (mu_a * sy + mu_b * sxy) + n * mu_a**2 + 2 * sx * mu_a * mu_b + sxx * mu_b**2
    quadratic = rr / var_y - (a22 * b1.square() - 2 * a12 * b1 * b2 + a11 * b2.square()) / det
    log_det = n * var_y.log() + var_a.log() + var_b.log() + det.log()
    return (-0.5 * (quadratic + log_det + n * math.log(2 * math.pi))).sum(-1)


def collapsed_model(data: dict[str, Tensor]) -> None:
    """`benchmarks.radon.model` with the counties integrated out: the five globals, then
    one factor, `collapsed_log_likelihood`.

    Examples
    --------
    >>> trace = pyro.poutine.trace(collapsed_model).get_trace(radon.load_radon())
    >>> [name for name, site in trace.nodes.items() if site["type"] == "sample"]
    ['mu_a', 'mu_b', 'sigma_a', 'sigma_b', 'sigma_y', 'counties']
    """
    values = radon.model_globals(data["log_radon"].dtype)
    pyro.factor("counties", collapsed_log_likelihood(county_sums(data), *values))


def fit_and_score(
    particles: int | None, seed: int, draws: int = 20_000, num_steps: int | None = None
) -> dict:
    """One `fit` of `AutoSplineFlow` to `collapsed_model` at ``particles`` (None: fit's
    choice), ``seed`` and ``num_steps`` (None: fit's limit); its time, steps, k-hat and
    each global's errors (``draws`` draws) against the NUTS reference."""
    data = radon.load_radon()
    pyro.clear_param_store()
    guide = AutoSplineFlow(collapsed_model)
    begun = time.perf_counter()
    result = fit(
        collapsed_model,
        guide,
        data,
        num_particles=particles,
        seed=seed,
        num_steps=num_steps,
        progress=False,
    )
    seconds = time.perf_counter() - begun
    pyro.set_rng_seed(123)
    posterior = reweighted(collapsed_model, guide, data, num_draws=draws)
    errors = score(posterior.draws, radon.load_reference(), list(radon.GLOBALS))
    return {
        "particles": result.num_particles,
        "seed": seed,
        "wall_s": seconds,
        "steps": result.num_steps,
        "khat": posterior.khat,
        "errors": errors,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--particles", type=int, nargs="+", default=[0, 256], help="0: fit's")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--draws", type=int, default=20_000, help="behind each moment")
    parser.add_argument("--num-steps", type=int, default=None, help="fit's step limit")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = []
    print("| particles | seed | wall s | steps | k-hat | " + " | ".join(radon.GLOBALS) + " |")
    for particles in args.particles:
        for seed in args.seeds:
            row = fit_and_score(particles or None, seed, args.draws, args.num_steps)
            rows.append(row)
            cells = [
                f"{e['mean_error']:+.3f} / {e['log_sd_ratio']:+.3f}"
                for e in (row["errors"][name] for name in radon.GLOBALS)
            ]
            head = f"| {row['particles']} | {seed} | {row['wall_s']:.1f} | {row['steps']} | "
            print(head + f"{row['khat']:.2f} | " + " | ".join(cells) + " |", flush=True)
    if args.out:
        with open(args.out, "w") as file:
            json.dump(rows, file, indent=1)


if __name__ == "__main__":
    main()
