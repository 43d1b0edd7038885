"""Correcting a converged flow guide's tails: PSIS-reweighted moments against a short
importance-weighted-bound refinement, on the robust set.

The reverse-KL ELBO leaves a guide narrower than the posterior where the posterior has a
long tail (garch200's `beta_frac`, the left tail of log tau in centred eight schools).
After `fit()` at its defaults has converged on `AutoSplineFlow(model)`, this measures,
against the references of `benchmarks.plain_svi` (exact moments where computable, NUTS
otherwise):

- ``raw``: moments of `--num-draws` guide draws;
- ``psis``: the same draws reweighted by Pareto-smoothed importance weights
  (`arviz.psislw` of `log p(x, z) - log q(z)`), with the PSIS k-hat;
- ``iw``: a second `fit(..., estimator="iw", num_particles=8)` call from the converged
  guide at `--iw-lr` times `default_lr`, then raw moments of its draws (and k-hat);
- ``iw+psis``: the refined guide's draws reweighted as in ``psis``.

The added time of each correction is reported as a multiple of the first fit's time
(the same process, one after the other).

Usage::

    nice -n 5 python -m benchmarks.tail_correction --seeds 0 --out /tmp/tail.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import arviz
import pyro
import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from torch import Tensor

from benchmarks.fit_cost import PROBLEMS
from benchmarks.plain_svi import CACHE, _load, moment_errors, reference, robust
from pyro_nf import AutoSplineFlow, fit
from pyro_nf.fitting.estimators import vmap_draws


def weighted_draws(
    problem: robust.Problem, guide, num_draws: int, chunk: int = 64
) -> tuple[Tensor, Tensor]:
    """`num_draws` guide draws of every latent site in unconstrained space, flattened in
    `robust.flatten`'s order, with their log importance weights `log p(x, z) - log q(z)`,
    batched by `torch.func.vmap`, `chunk` draws a pass.

    Examples
    --------
    >>> import pyro.distributions as dist
    >>> def model():
    ...     pyro.sample("x", dist.Normal(0.0, 1.0))
    >>> pyro.clear_param_store()
    >>> guide = AutoSplineFlow(model, init_scale=1.0, warm_start=None)
    >>> log_w, draws = weighted_draws(robust.Problem("normal", model, ()), guide, 10)
    >>> log_w.shape, draws.shape
    (torch.Size([10]), torch.Size([10, 1]))
    """
    supports = robust.latent_supports(problem)
    guide(*problem.args)  # parameters are made outside vmap

    def one(_: Tensor) -> tuple[Tensor, Tensor]:
        guide_trace = poutine.trace(guide).get_trace(*problem.args)
        replayed = poutine.replay(problem.model, trace=guide_trace)
        model_trace = poutine.trace(replayed).get_trace(*problem.args)
        log_w = model_trace.log_prob_sum() - guide_trace.log_prob_sum()
        values = [
            biject_to(supports[name]).inv(model_trace.nodes[name]["value"]).reshape(-1)
            for name in sorted(supports)
        ]
        return log_w, torch.cat(values)

    log_ws, draws = [], []
    with torch.no_grad():
        for begin in range(0, num_draws, chunk):
            log_w, values = vmap_draws(one, min(chunk, num_draws - begin))
            log_ws.append(log_w)
            draws.append(values)
    return torch.cat(log_ws), torch.cat(draws)


def psis_weights(log_w: Tensor) -> tuple[Tensor, float]:
    """Normalised Pareto-smoothed importance weights and the PSIS k-hat.

    Examples
    --------
    >>> gen = torch.Generator().manual_seed(0)
    >>> weights, khat = psis_weights(0.1 * torch.randn(1000, generator=gen))
    >>> round(float(weights.sum()), 6), khat < 0.5
    (1.0, True)
    """
    smoothed, khat = arviz.psislw(log_w.numpy().copy())
    return torch.as_tensor(smoothed).exp(), float(khat)


def corrections(
    problem: robust.Problem, guide, ref: dict, args: argparse.Namespace, label: str
) -> list[dict]:
    """Raw and PSIS-reweighted errors of `guide` (rows labelled `label` and
    `label + "+psis"`), with k-hat and the seconds the draws and weights took."""
    start = time.perf_counter()
    log_w, draws = weighted_draws(problem, guide, args.num_draws, args.chunk)
    weights, khat = psis_weights(log_w)
    seconds = time.perf_counter() - start
    raw = moment_errors(draws, ref)
    corrected = moment_errors(draws, ref, weights)
    ess = float(1.0 / (weights**2).sum())
    base = {"khat": khat, "psis_ess": ess, "draw_s": seconds}
    return [
        {"correction": label, "mean_err": raw[0], "sd_err": raw[1], **base},
        {"correction": f"{label}+psis", "mean_err": corrected[0], "sd_err": corrected[1], **base},
    ]


def study(name: str, ref: dict, args: argparse.Namespace) -> list[dict]:
    """The default fit of one model and seed, then its corrections; one row per correction."""
    problem = PROBLEMS[name]()
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    guide = AutoSplineFlow(problem.model)
    start = time.perf_counter()
    first = fit(
        problem.model,
        guide,
        *problem.args,
        num_steps=args.fit_steps,
        progress=False,
        seed=args.seed,
    )
    fit_s = time.perf_counter() - start
    rows = corrections(problem, guide, ref, args, "raw")
    start = time.perf_counter()
    second = fit(
        problem.model,
        guide,
        *problem.args,
        estimator="iw",
        num_particles=args.iw_particles,
        lr=args.iw_lr * guide.default_lr,
        num_steps=args.iw_steps,
        progress=False,
        seed=args.seed,
    )
    iw_s = time.perf_counter() - start
    iw_rows = corrections(problem, guide, ref, args, "iw")
    for row in iw_rows:
        row.update(iw_s=iw_s, iw_steps=second.num_steps)
    rows += iw_rows
    for row in rows:
        added = row["draw_s"] * row["correction"].endswith("psis") + row.get("iw_s", 0.0)
        row.update(
            model=name,
            seed=args.seed,
            fit_s=fit_s,
            fit_steps=first.num_steps,
            added_s=added,
            added_ratio=added / fit_s,
            load=_load(),
        )
        print(json.dumps(row), flush=True)
    return rows


COLUMNS: dict[str, Callable[[dict], str]] = {
    "model": lambda r: r["model"],
    "seed": lambda r: str(r["seed"]),
    "guide": lambda r: r["correction"],
    "max mean err (sd)": lambda r: f"{r['mean_err']:.3f}",
    "max abs log sd ratio": lambda r: f"{r['sd_err']:.3f}",
    "k-hat": lambda r: f"{r['khat']:.2f}",
    "PSIS ESS": lambda r: f"{r['psis_ess']:.0f}",
    "fit (s)": lambda r: f"{r['fit_s']:.1f}",
    "added (x fit)": lambda r: f"{r['added_ratio']:.2f}",
}


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the study on every model and seed; print the table, write the JSON."""
    parser = robust.argument_parser(__doc__.split("\n\n")[0], PROBLEMS, str(CACHE))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--iw-lr", type=float, default=0.1, help="times default_lr")
    parser.add_argument("--iw-particles", type=int, default=8)
    parser.add_argument("--iw-steps", type=int, default=1000)
    parser.add_argument("--fit-steps", type=int, default=5000, help="the first fit's bound")
    parser.add_argument("--chunk", type=int, default=32, help="draws per vmap pass")
    parser.set_defaults(num_draws=4000)
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    rows = []
    for name in args.models:
        ref = reference(name, PROBLEMS[name](), args)
        for seed in args.seeds:
            args.seed = seed
            rows += study(name, ref, args)
    print(robust.markdown_table(rows, COLUMNS))
    if args.out:
        settings = {k: getattr(args, k) for k in ("num_draws", "iw_lr", "iw_particles", "iw_steps")}
        out = {"threads": torch.get_num_threads(), **settings, "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
