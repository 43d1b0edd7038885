"""Correcting a converged flow guide's tails: PSIS-reweighted summaries (`pyro_nf.reweighted`)
against importance-weighted-bound refinements, on the robust set.

The reverse-KL ELBO leaves a guide narrower than the posterior where the posterior has a
long tail (garch200's `beta_frac`, the left tail of log tau in centred eight schools).
After `fit()` at its defaults has converged on `AutoSplineFlow(model)`, this measures,
against the references of `benchmarks.plain_svi` (exact moments where computable, NUTS
otherwise; exact for the normal-normal model with 100 groups, `nn100`,
`benchmarks.exact_hierarchical`):

- ``raw``: moments of `--num-draws` guide draws;
- ``fit``: what `fit()` returns, its `FitResult.reweighted` (the k-hat check's draws,
  PSIS-weighted) where it kept them, else the raw guide's moments (``fit (raw)``);
  its time is inside the fit's (``draw_s`` is the check's);
- ``raw+psis``: the same draws weighted by `pyro_nf.reweighted` (Pareto-smoothed
  importance weights of `log p(x, z) - log q(z)`), with the PSIS k-hat;
- ``raw+psisN``: `reweighted` with N draws for each N of `--more-draws`, `--repeats`
  times on fresh draws (models in `--refine-models`);
- ``iwK`` / ``iwK+psis``: a second `fit(..., estimator="iw", num_particles=K)` call (the
  importance-weighted bound with the DReG gradient) from the converged guide at `--iw-lr`
  times `default_lr`, at most `--iw-steps` steps, then raw and reweighted moments of its
  draws; K = `--iw-particles` with no time bound, and K = `--strong-particles` bounded to
  `--strong-time` times the first fit's time (models in `--refine-models`).

The added time of each correction is reported as a multiple of the first fit's time
(the same process, one after the other).

Usage::

    nice -n 5 python -m benchmarks.tail_correction --seeds 0 --out /tmp/tail.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pyro
import torch

from benchmarks.fit_cost import ROOT
from benchmarks.plain_svi import (
    CACHE,
    MEAN_BAR,
    PROBLEMS,
    SD_BAR,
    _load,
    moment_errors,
    reference,
    robust,
    unconstrained,
)
from pyro_nf import AutoSplineFlow, fit, reweighted


def corrections(
    problem: robust.Problem,
    guide,
    ref: dict,
    args: argparse.Namespace,
    label: str,
    num_draws: int,
    psis_only: bool = False,
) -> list[dict]:
    """Raw and PSIS-reweighted errors of `guide` (rows labelled `label` and
    `label + "+psis"`, or only the latter), with k-hat and the seconds `reweighted` took."""
    start = time.perf_counter()
    posterior = reweighted(problem.model, guide, *problem.args, num_draws=num_draws)
    seconds = time.perf_counter() - start
    draws = unconstrained(problem, posterior.draws)
    raw = moment_errors(draws, ref)
    corrected = moment_errors(draws, ref, posterior.weights.to(draws.dtype))
    base = {"khat": posterior.khat, "psis_ess": posterior.ess, "draw_s": seconds}
    base["num_draws"] = num_draws
    psis = {"correction": f"{label}+psis", "mean_err": corrected[0], "sd_err": corrected[1]}
    rows = [{**psis, **base}]
    if not psis_only:
        rows.insert(0, {"correction": label, "mean_err": raw[0], "sd_err": raw[1], **base})
    return rows


def refine(
    problem: robust.Problem,
    guide,
    args: argparse.Namespace,
    particles: int,
    max_time: float | None,
) -> tuple[float, int]:
    """A second `fit` by the importance-weighted bound from the converged guide: its
    seconds and steps."""
    start = time.perf_counter()
    result = fit(
        problem.model,
        guide,
        *problem.args,
        estimator="iw",
        num_particles=particles,
        lr=args.iw_lr * guide.default_lr,
        num_steps=args.iw_steps,
        max_time=max_time,
        progress=False,
        seed=args.seed,
    )
    return time.perf_counter() - start, result.num_steps


def first_fit(problem: robust.Problem, seed: int, num_steps: int, **options):
    """A fresh default guide fitted by `fit()` at its defaults (and `options`): the guide,
    seconds (the k-hat check included), steps and the `FitResult`."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoSplineFlow(problem.model)
    start = time.perf_counter()
    first = fit(
        problem.model,
        guide,
        *problem.args,
        num_steps=num_steps,
        progress=False,
        seed=seed,
        **options,
    )
    return guide, time.perf_counter() - start, first.num_steps, first


def fit_summaries(problem: robust.Problem, result, ref: dict, raw: dict) -> dict:
    """The row of what `fit()` itself returns: its `FitResult.reweighted` summaries where it
    kept them, else the raw guide's (the ``raw`` row's errors)."""
    posterior = result.reweighted
    label = "fit" if posterior is not None else "fit (raw)"
    row = {"correction": label, "draw_s": result.khat_time, "kept": posterior is not None}
    if posterior is None:  # the raw guide's errors; the check's own k-hat and draws
        khat = float("nan") if result.khat is None else result.khat
        row.update(khat=khat, psis_ess=float("nan"), num_draws=result.num_khat_samples)
        return {**raw, **row}
    draws = unconstrained(problem, posterior.draws)
    mean_err, sd_err = moment_errors(draws, ref, posterior.weights.to(draws.dtype))
    row.update(mean_err=mean_err, sd_err=sd_err, khat=posterior.khat, psis_ess=posterior.ess)
    return {**row, "num_draws": posterior.num_draws}


def study(name: str, ref: dict, args: argparse.Namespace) -> list[dict]:
    """The default fit of one model and seed, then its corrections; one row per correction."""
    problem = PROBLEMS[name]()
    guide, fit_s, fit_steps, result = first_fit(problem, args.seed, args.fit_steps)
    state = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    rows = corrections(problem, guide, ref, args, "raw", args.num_draws)
    rows.append(fit_summaries(problem, result, ref, rows[0]))
    refined = name in args.refine_models
    for count in args.more_draws if refined else []:
        for repeat in range(args.repeats):  # fresh draws of the same guide
            more = corrections(problem, guide, ref, args, "raw", count, psis_only=True)
            more[0].update(correction=f"raw+psis{count}", repeat=repeat)
            rows += more
    runs = []
    if name in args.iw_models:
        runs.append((args.iw_particles, None))
    if refined and args.strong_particles:
        runs.append((args.strong_particles, args.strong_time * fit_s))
    for particles, max_time in runs:
        with torch.no_grad():  # each refinement starts from the converged guide
            for key, value in state.items():
                pyro.get_param_store()[key].copy_(value)
        iw_s, iw_steps = refine(problem, guide, args, particles, max_time)
        iw_rows = corrections(problem, guide, ref, args, f"iw{particles}", args.num_draws)
        for row in iw_rows:
            row.update(iw_s=iw_s, iw_steps=iw_steps)
        rows += iw_rows
    for row in rows:
        added = row["draw_s"] * ("psis" in row["correction"]) + row.get("iw_s", 0.0)
        row.setdefault("khat_s", result.khat_time)
        row.update(
            model=name,
            seed=args.seed,
            fit_s=fit_s,
            fit_steps=fit_steps,
            added_s=added,
            added_ratio=added / fit_s,
            bars=row["mean_err"] < MEAN_BAR and row["sd_err"] < SD_BAR,
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
    "bars": lambda r: "yes" if r["bars"] else "no",
    "k-hat": lambda r: f"{r['khat']:.2f}",
    "PSIS ESS": lambda r: f"{r['psis_ess']:.0f} / {r['num_draws']}",
    "fit (s)": lambda r: f"{r['fit_s']:.1f}",
    "added (x fit)": lambda r: f"{r['added_ratio']:.2f}",
    "check (s)": lambda r: f"{r['khat_s']:.1f}",
    "load": lambda r: f"{r['load']:.1f}",
}


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the study on every model and seed; print the table, write the JSON."""
    parser = robust.argument_parser(__doc__.split("\n\n")[0], PROBLEMS, str(CACHE))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--iw-lr", type=float, default=0.1, help="times default_lr")
    parser.add_argument("--iw-particles", type=int, default=8)
    parser.add_argument("--iw-steps", type=int, default=1000)
    parser.add_argument("--iw-models", nargs="*", default=["garch200"])
    parser.add_argument("--refine-models", nargs="*", default=["garch200"])
    parser.add_argument("--strong-particles", type=int, default=32, help="0: no such run")
    parser.add_argument("--strong-time", type=float, default=1.0, help="times the first fit")
    parser.add_argument("--more-draws", type=int, nargs="*", default=[16000])
    parser.add_argument("--repeats", type=int, default=1, help="of each --more-draws row")
    parser.add_argument("--fit-steps", type=int, default=5000, help="the first fit's bound")
    parser.set_defaults(num_draws=4000)
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    rows = []
    for name in args.models:
        problem = PROBLEMS[name]()
        ref = reference(name, problem, args)
        for seed in args.seeds:
            args.seed = seed
            rows += study(name, ref, args)
    print(robust.markdown_table(rows, COLUMNS))
    if args.out:
        keys = ("num_draws", "more_draws", "iw_lr", "iw_particles", "iw_steps")
        keys += ("strong_particles", "strong_time")
        out = {"commit": commit, "threads": torch.get_num_threads()}
        out.update({k: getattr(args, k) for k in keys}, rows=rows)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
