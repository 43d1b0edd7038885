"""Plain Pyro `SVI` with the default flow guide against `fit()`, on the robust set.

A Pyro user who keeps their own training loop writes `SVI(model, guide, optim, loss)` and
calls `svi.step` a fixed number of times. This benchmark runs, on every model of
`benchmarks/fit_cost.py` (years, correlated, garch, garch200, centred eight schools,
arma), three ways of training `AutoSplineFlow(model)` at its defaults:

- ``snippet``: Adam at the guide's `default_lr`, `Trace_ELBO()`, `--snippet-steps` steps
  (5000): a constant learning rate to the end.
- ``recipe``: the same loop with Pyro's `ClippedAdam` decaying the learning rate
  geometrically from `default_lr` to `--final-lr` times it over `--steps` steps
  (`"lrd": final_lr ** (1 / steps)`), and `--particles` (32) particles a step in one
  pass: `Trace_ELBO(num_particles=32, vectorize_particles=True)` where the model takes a
  particle plate and the guide is not in the structured form, `pyro_nf.VmapTrace_ELBO`
  otherwise (the correlated regression's `x @ beta`, the GARCHs' recursion, nn100's
  structured guide). The `--costly` models, where a particle costs a whole model run (a
  step at 32 over 5 times one at 1: arma's 200 x 200 matrix, garch's 1000-step
  recursion), get `--costly-particles` (4).
- ``fit``: `pyro_nf.fit` at its defaults (`num_steps=5000` an upper bound).

With `--psis-draws N`, each method's row is followed by a ``+psis`` row: the same guide's
summaries reweighted by `pyro_nf.reweighted` (N draws), its time added to the method's.

The methods of one model run one after the other in one process, each timed end to end
(the guide's warm start included), so their times compare. Errors are over every scalar
latent parameter in unconstrained space, against exact moments where they can be computed
(the regressions by `benchmarks.exact_regression`, both GARCHs by quadrature on a grid
whitened by the model's Laplace approximation, `benchmarks.exact_garch`) and against the
cached NUTS chains of `benchmarks.fit_cost` otherwise (schools, arma): the largest
|mean - reference mean| / reference sd and the largest |log(sd / reference sd)|, from
`--num-draws` guide draws.

Usage::

    nice -n 10 python -m benchmarks.fit_cost --nuts-only --models schools arma
    nice -n 5 python -m benchmarks.plain_svi --seeds 0 1 --out benchmarks/results/plain_svi.json
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pyro
import torch
from pyro.distributions.transforms import biject_to
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from torch import Tensor

from benchmarks import exact_garch, exact_hierarchical, exact_regression
from benchmarks.fit_cost import PROBLEMS as ROBUST_PROBLEMS
from benchmarks.fit_cost import ROOT, robust
from pyro_nf import AutoSplineFlow, VmapTrace_ELBO, fit, reweighted
from pyro_nf.laplace import laplace_approximation
from pyro_nf.log_joint import unconstrained_log_joint
from pyro_nf.structured.delegate import structured_part

MEAN_BAR, SD_BAR = 0.1, 0.095
CACHE = ROOT / "benchmarks" / "nuts_cache"


def recipe_optimizer(lr: float, num_steps: int, final_lr: float = 0.01) -> pyro.optim.PyroOptim:
    """Pyro's `ClippedAdam` whose learning rate falls geometrically from `lr` to
    `final_lr * lr` over `num_steps` steps: the recipe's optimiser.

    Examples
    --------
    >>> optim = recipe_optimizer(5e-3, 1000)
    >>> round(optim.pt_optim_args["lrd"] ** 1000, 6)  # the rate's factor at the end
    0.01
    """
    return pyro.optim.ClippedAdam({"lr": lr, "lrd": final_lr ** (1 / num_steps)})


def svi_loop(
    problem: robust.Problem, guide, optim, num_steps: int, elbo: Trace_ELBO | None = None
) -> dict:
    """Train `guide` by `num_steps` steps of Pyro's `SVI` with `elbo` (`Trace_ELBO()`).

    Examples
    --------
    >>> import pyro.distributions as dist
    >>> def model():
    ...     pyro.sample("x", dist.Normal(0.0, 1.0))
    >>> pyro.clear_param_store()
    >>> guide = AutoSplineFlow(model)
    >>> problem = robust.Problem("normal", model, ())
    >>> svi_loop(problem, guide, pyro.optim.Adam({"lr": 1e-2}), 5)["steps"]
    5
    """
    svi = SVI(problem.model, guide, optim, elbo or Trace_ELBO())
    losses = [svi.step(*problem.args) for _ in range(num_steps)]
    return {"steps": num_steps, "final_loss": sum(losses[-100:]) / len(losses[-100:])}


def nn100_problem() -> robust.Problem:
    """The normal-normal hierarchical model, centred, 100 groups (`exact_hierarchical`)."""
    data = exact_hierarchical.simulate(100, seed=0)
    return robust.Problem("nn100", exact_hierarchical.model, tuple(data))


PROBLEMS: dict[str, Callable[[], robust.Problem]] = {**ROBUST_PROBLEMS, "nn100": nn100_problem}


def exact_nn100(problem: robust.Problem) -> dict:
    """Exact means and sds of nn100 in unconstrained space, in `robust.flatten`'s order."""
    moments = exact_hierarchical.exact_moments(exact_hierarchical.Groups(*problem.args))
    names = {"mu": "mu", "tau": "log_tau", "theta": "theta"}  # sorted site -> reference site
    mean = torch.cat([moments.mean[names[n]].reshape(-1) for n in sorted(names)])
    sd = torch.cat([moments.sd[names[n]].reshape(-1) for n in sorted(names)])
    return {"mean": mean, "sd": sd, "source": "exact"}


def run_snippet(problem: robust.Problem, guide, args: argparse.Namespace) -> dict:
    """The README's loop: Adam at `guide.default_lr`, `Trace_ELBO()`, a fixed count."""
    optim = pyro.optim.Adam({"lr": guide.default_lr})
    return svi_loop(problem, guide, optim, args.snippet_steps)


def takes_particle_plate(problem: robust.Problem) -> bool:
    """Whether Pyro's `Trace_ELBO(vectorize_particles=True)` runs on the model (it does
    where the model broadcasts over a leading particle dimension; `x @ beta` does not).

    Examples
    --------
    >>> import pyro.distributions as dist
    >>> def model():
    ...     pyro.sample("x", dist.Normal(0.0, 1.0))
    >>> takes_particle_plate(robust.Problem("normal", model, ()))
    True
    """
    elbo = Trace_ELBO(num_particles=2, vectorize_particles=True)
    with pyro.poutine.block(), pyro.get_param_store().scope():
        try:
            elbo.loss(problem.model, AutoNormal(problem.model), *problem.args)
        except (RuntimeError, ValueError, IndexError):
            return False
    return True


def run_recipe(problem: robust.Problem, guide, args: argparse.Namespace) -> dict:
    """The recipe: `ClippedAdam` from `guide.default_lr` down to `final_lr` times it, and
    `args.recipe_particles` particles where more than one: in a particle plate where the
    model takes one and the guide is not in the structured form, else by vmap."""
    guide(*problem.args)  # the guide's form and its rate are set at its first call
    optim = recipe_optimizer(guide.default_lr, args.steps, args.final_lr)
    particles = args.recipe_particles
    plate = args.recipe_plate and structured_part(guide) is None
    if particles == 1:
        elbo = Trace_ELBO()
    elif plate:
        elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True)
    else:
        elbo = VmapTrace_ELBO(num_particles=particles)
    details = svi_loop(problem, guide, optim, args.steps, elbo)
    return {**details, "particles": particles}


def run_fit(problem: robust.Problem, guide, args: argparse.Namespace) -> dict:
    """`pyro_nf.fit` at its defaults."""
    result = fit(
        problem.model,
        guide,
        *problem.args,
        num_steps=args.fit_steps,
        progress=False,
        seed=args.seed,
    )
    return {
        "steps": result.num_steps,
        "final_loss": -result.elbo,
        "particles": result.num_particles,
        "stop_reason": result.stop_reason,
    }


METHODS: dict[str, Callable[[robust.Problem, object, argparse.Namespace], dict]] = {
    "snippet": run_snippet,
    "recipe": run_recipe,
    "fit": run_fit,
}


def laplace_draws(problem: robust.Problem, num_draws: int = 4000, widen: float = 1.5) -> Tensor:
    """Draws of the model's Laplace approximation, its covariance widened by `widen**2`,
    flattened in `robust.flatten`'s order: a rough estimate to lay a grid out from."""
    packer = AutoDiagonalNormal(problem.model)
    packer._setup_prototype(*problem.args)
    log_joint = unconstrained_log_joint(packer, *problem.args)
    laplace = laplace_approximation(log_joint, packer._init_loc())
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(num_draws, len(laplace.loc), generator=gen, dtype=laplace.loc.dtype)
    latent = laplace.loc + widen * noise @ laplace.scale_tril.T
    sites = {site["name"]: value for site, value in packer._unpack_latent(latent)}
    return robust.flatten(sites)


def reference(name: str, problem: robust.Problem, args: argparse.Namespace) -> dict:
    """Reference means and sds in unconstrained space (`mean`, `sd`) and their `source`:
    exact moments for the regressions and the GARCHs (cached), the NUTS chain otherwise."""
    if name == "nn100":
        return exact_nn100(problem)
    if name in exact_regression.REGRESSIONS:
        mean, sd = exact_regression.problem_moments(name, problem)
        return {"mean": mean, "sd": sd, "source": "exact"}
    if name in ("garch", "garch200"):
        path = Path(args.cache) / f"{name}_exact.pt"
        if not path.exists():
            moments = exact_garch.problem_moments(problem, laplace_draws(problem))
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(moments, path)
        mean, sd = torch.load(path)
        return {"mean": mean, "sd": sd, "source": "exact"}
    nuts = robust.nuts_reference(problem, args)
    draws = robust.flatten(robust.unconstrain(nuts["draws"], robust.latent_supports(problem)))
    return {"mean": draws.mean(0), "sd": draws.std(0), "source": "NUTS"}


def moment_errors(draws: Tensor, ref: dict, weights: Tensor | None = None) -> tuple[float, float]:
    """Largest |mean - ref mean| / ref sd and largest |log(sd / ref sd)| of `draws` (one row
    each), weighted by the normalised `weights` where given.

    Examples
    --------
    >>> draws = torch.tensor([[0.0], [2.0]])
    >>> moment_errors(draws, {"mean": torch.tensor([1.0]), "sd": torch.tensor([1.0])})
    (0.0, 0.0)
    """
    if weights is None:
        weights = torch.full((len(draws),), 1.0 / len(draws), dtype=draws.dtype)
    mean = weights @ draws
    sd = (weights @ (draws - mean) ** 2).sqrt()
    mean_err = ((mean - ref["mean"]).abs() / ref["sd"]).max().item()
    return mean_err, (sd / ref["sd"]).log().abs().max().item()


def unconstrained(problem: robust.Problem, draws: dict[str, Tensor]) -> Tensor:
    """Draws of every latent site in unconstrained space, flattened in `robust.flatten`'s
    order.

    Examples
    --------
    >>> import pyro.distributions as dist
    >>> def model():
    ...     pyro.sample("s", dist.LogNormal(0.0, 1.0))
    >>> unconstrained(robust.Problem("s", model, ()), {"s": torch.ones(3)}).tolist()
    [[0.0], [0.0], [0.0]]
    """
    supports = robust.latent_supports(problem)
    values = {name: biject_to(supports[name]).inv(draws[name]) for name in supports}
    return robust.flatten(values)


def reweighted_row(problem: robust.Problem, guide, ref: dict, row: dict, num_draws: int) -> dict:
    """`row` for `guide`'s summaries reweighted by `pyro_nf.reweighted` (`num_draws` draws):
    its errors, k-hat, and the method's time plus the reweighting's."""
    start = time.perf_counter()
    posterior = reweighted(problem.model, guide, *problem.args, num_draws=num_draws)
    seconds = time.perf_counter() - start
    draws = unconstrained(problem, posterior.draws)
    mean_err, sd_err = moment_errors(draws, ref, posterior.weights.to(draws.dtype))
    return {
        **row,
        "method": f"{row['method']}+psis",
        "mean_err": mean_err,
        "sd_err": sd_err,
        "seconds": row["seconds"] + seconds,
        "khat": posterior.khat,
        "psis_ess": posterior.ess,
        "load": _load(),
    }


def guide_draws(problem: robust.Problem, guide, num_draws: int) -> Tensor:
    """Unconstrained draws of every latent site, flattened in `robust.flatten`'s order:
    from the joint flow directly, from a structured guide through `Predictive` (it has no
    joint posterior to draw from)."""
    supports = robust.latent_supports(problem)
    if structured_part(guide) is None:
        return robust.flatten(robust.guide_draws(guide, supports, num_draws, problem.args))
    predictive = Predictive(problem.model, guide=guide, num_samples=num_draws)
    with torch.no_grad():
        draws = predictive(*problem.args)
    return unconstrained(problem, {name: draws[name] for name in supports})


def run_method(
    problem: robust.Problem, method: str, ref: dict, args: argparse.Namespace
) -> tuple[dict, object]:
    """Fit a fresh default guide by `method` (seeded); its errors, time and the guide."""
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    guide = AutoSplineFlow(problem.model)
    start = time.perf_counter()
    details = METHODS[method](problem, guide, args)
    seconds = time.perf_counter() - start
    mean_err, sd_err = moment_errors(guide_draws(problem, guide, args.num_draws), ref)
    row = {
        "model": problem.name,
        "method": method,
        "seed": args.seed,
        "mean_err": mean_err,
        "sd_err": sd_err,
        "seconds": seconds,
        "reference": ref["source"],
        "load": _load(),
        **details,
    }
    print(json.dumps(row), flush=True)
    return row, guide


def _load() -> float:
    """The one-minute load average (what shares the cores), NaN where unknown."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return math.nan


COLUMNS: dict[str, Callable[[dict], str]] = {
    "model": lambda r: r["model"],
    "method": lambda r: r["method"],
    "seed": lambda r: str(r["seed"]),
    "max mean err (sd)": lambda r: f"{r['mean_err']:.3f}",
    "max abs log sd ratio": lambda r: f"{r['sd_err']:.3f}",
    "bars met": lambda r: "yes" if r["mean_err"] < MEAN_BAR and r["sd_err"] < SD_BAR else "no",
    "steps": lambda r: str(r["steps"]),
    "time (s)": lambda r: f"{r['seconds']:.1f}",
    "load": lambda r: f"{r['load']:.1f}",
}


def argument_parser() -> argparse.ArgumentParser:
    """The options: models, seeds, methods, the recipe's steps and final rate, references."""
    parser = robust.argument_parser(__doc__.split("\n\n")[0], PROBLEMS, str(CACHE))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--steps", type=int, default=3000, help="the recipe's steps")
    parser.add_argument("--final-lr", type=float, default=0.01, help="the recipe's last rate")
    parser.add_argument("--particles", type=int, default=32, help="the recipe's particles")
    parser.add_argument(
        "--costly",
        nargs="*",
        default=["arma", "garch"],
        help="models where a particle costs a model run: --costly-particles for them",
    )
    parser.add_argument("--costly-particles", type=int, default=4)
    parser.add_argument("--snippet-steps", type=int, default=5000)
    parser.add_argument("--fit-steps", type=int, default=5000, help="fit's num_steps")
    parser.add_argument(
        "--psis-draws", type=int, default=0, help="add each method reweighted (0: none)"
    )
    parser.set_defaults(num_draws=10000)
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    """Run every method on every model and seed; print the table, write the JSON."""
    args = argument_parser().parse_args(argv)
    torch.set_default_dtype(torch.float64)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    rows = []
    for name in args.models:
        problem = PROBLEMS[name]()
        ref = reference(name, problem, args)
        args.recipe_plate = takes_particle_plate(problem)
        costly = name in args.costly
        args.recipe_particles = args.costly_particles if costly else args.particles
        for seed in args.seeds:
            for method in args.methods:
                args.seed = seed
                row, guide = run_method(problem, method, ref, args)
                rows.append(row)
                if args.psis_draws:
                    rows.append(reweighted_row(problem, guide, ref, row, args.psis_draws))
                    print(json.dumps(rows[-1]), flush=True)
    print(robust.markdown_table(rows, COLUMNS))
    if args.out:
        keys = ("steps", "final_lr", "particles", "snippet_steps")
        settings = {k: getattr(args, k) for k in keys}
        out = {"commit": commit, "threads": torch.get_num_threads(), **settings, "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
