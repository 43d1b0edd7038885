"""Benchmark pyro_nf's flow guides against Pyro's built-in guides: KL gap and speed.

For every target and guide: train with the same optimizer, step budget, particles, seed
and learning-rate schedule shape; then estimate ``KL(q‖p) = log Z − ELBO`` from fresh
draws (with its standard error) and PSIS k-hat, and record the median seconds per SVI
step. Each of our default flow guides is trained step-for-step interleaved with Pyro's
AutoNormalizingFlow built from the same kind and number of layers (and the spline pair
with AutoNormal), so their time ratio is measured under the same machine load.

Usage::

    python -m benchmarks.guides                # full run (about 30 min on 2 cores)
    python -m benchmarks.guides --quick        # smoke run (under 3 min)
    python -m benchmarks.guides --targets u1 u2 --guides spline AutoNormal pyro-spline
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import pyro
import torch
from tqdm.auto import tqdm

from benchmarks.evaluate import (
    draw_from_guide,
    kl_estimate,
    log_mean_exp,
    moment_errors,
    nuts_eight_schools,
)
from benchmarks.guide_specs import GUIDES, GuideSpec, get_guide_spec
from benchmarks.report import (
    check_bars,
    format_table,
    plot_samples,
    speed_ratios,
    summarize,
    summarize_ratios,
)
from benchmarks.targets import TARGETS, EnergyTarget, Target, get_target
from benchmarks.train import Fit, TrainConfig, train_interleaved
from pyro_nf.importance import khat_from_log_weights

__all__ = ["add_bench_parser", "main", "run_benchmark"]

QUICK_TARGETS = ("u1", "funnel", "eight_schools")
NUM_PLOT_SAMPLES = 4000


def _groups(specs: Sequence[GuideSpec]) -> list[list[GuideSpec]]:
    """Interleaving groups: each of our default guides with its Pyro counterpart."""
    by_name = {spec.name: spec for spec in specs}
    groups, placed = [], set()
    for spec in specs:
        if spec.counterpart in by_name:
            group = [spec, by_name[spec.counterpart]]
            if spec.name == "spline" and "AutoNormal" in by_name:
                group.append(by_name["AutoNormal"])
            groups.append(group)
            placed.update(member.name for member in group)
    groups += [[spec] for spec in specs if spec.name not in placed]
    return groups


def _evaluate(fit: Fit, target: Target, num_draws: int, reference) -> dict:
    draws = draw_from_guide(target.model, fit.guide, num_draws, target.max_plate_nesting)
    row = {
        "target": target.name,
        "guide": fit.spec.name,
        "ours": fit.spec.ours,
        "group": None,
        "lr": fit.lr,
        "num_params": sum(p.numel() for p in fit.guide.parameters()),
        "sec_per_step": fit.median_step_seconds,
        "skipped_steps": fit.skipped_steps,
        "elbo": float(draws.log_weights.double().mean()),
        "khat": khat_from_log_weights(draws.log_weights),
        "log_z_is": log_mean_exp(draws.log_weights),
    }
    if target.log_z is not None:
        row["kl"], row["kl_se"] = kl_estimate(draws.log_weights, target.log_z)
    if reference is not None:
        row.update(moment_errors(draws.values, reference))
    if isinstance(target, EnergyTarget) and target.dim == 2:
        row["samples"] = draws.values["z"][:NUM_PLOT_SAMPLES].tolist()
    return row


def _fill_estimated_kl(rows: list[dict]) -> None:
    """Without a known log Z, KL ≈ max over guides of the IS estimate of log Z − ELBO.

    Each guide's ``log mean w`` underestimates log Z in expectation, so these KLs are
    lower bounds; differences between guides are exact (ELBO differences).
    """
    log_z = max(row["log_z_is"] for row in rows)
    for row in rows:
        row["kl"] = log_z - row["elbo"]
        row["kl_se"] = None
        row["kl_is_estimate"] = True


def run_benchmark(
    target_names: Sequence[str],
    guide_names: Sequence[str],
    config: TrainConfig,
    num_draws: int,
    nuts_samples: int,
    out_dir: Path,
    progress: bool = True,
    num_seeds: int = 1,
) -> dict:
    """Train and evaluate every (target, guide) pair; return the results as a dict.

    With ``num_seeds > 1`` every pair is trained and evaluated once per seed
    (``config.seed``, ``config.seed + 1``, ...); ``rows`` holds every run and ``summary``
    the median over seeds (see :func:`benchmarks.report.summarize`).
    """
    targets = [get_target(name) for name in target_names]
    specs = [get_guide_spec(name) for name in guide_names]
    seeds = [config.seed + offset for offset in range(num_seeds)]
    rows = []
    started = time.perf_counter()
    bar = tqdm(total=len(targets) * len(specs) * num_seeds, disable=not progress, desc="benchmark")
    # Module-local parameters: several guides of one class train side by side without
    # sharing entries of Pyro's global parameter store.
    with pyro.settings.context(module_local_params=True):
        for target in targets:
            reference = None
            if target.log_z is None:
                bar.set_postfix_str(f"{target.name}: NUTS reference")
                reference = nuts_eight_schools(
                    nuts_samples, nuts_samples // 2 + 100, config.seed, out_dir
                )
            for seed in seeds:
                seed_config = dataclasses.replace(config, seed=seed)
                target_rows = []
                for group_index, group in enumerate(_groups(specs)):
                    names = "+".join(spec.name for spec in group)
                    bar.set_postfix_str(f"{target.name}: {names} (seed {seed})")
                    fits = train_interleaved(
                        group,
                        target.model,
                        target.init_loc_fn,
                        target.max_plate_nesting,
                        seed_config,
                    )
                    for fit in fits:
                        pyro.set_rng_seed(seed + 1)
                        row = _evaluate(fit, target, num_draws, reference)
                        row["group"], row["seed"] = group_index, seed
                        target_rows.append(row)
                        bar.update()
                if target.log_z is None:
                    _fill_estimated_kl(target_rows)
                rows += target_rows
    bar.close()
    ratios = speed_ratios(rows)
    return {
        "config": {
            **vars(config),
            "num_seeds": num_seeds,
            "num_draws": num_draws,
            "nuts_samples": nuts_samples,
        },
        "log_z": {target.name: target.log_z for target in targets},
        "seconds": time.perf_counter() - started,
        "rows": rows,
        "speed_ratios": ratios,
        "summary": summarize(rows),
        "summary_speed_ratios": summarize_ratios(ratios),
    }


def _parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--quick", action="store_true", help="small smoke run (< 3 min)")
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"), help="output dir")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="seeds per (target, guide): seed, seed+1, ...; tables and bars use the "
        "median over seeds (default 1)",
    )
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS), help="default: all")
    parser.add_argument("--guides", nargs="+", choices=list(GUIDES), help="default: all")
    parser.add_argument("--steps", type=int, help="SVI steps per guide (default 1000; quick 50)")
    parser.add_argument("--particles", type=int, default=8, help="ELBO particles per step")
    parser.add_argument("--draws", type=int, help="draws for the KL (default 10000; quick 2000)")
    parser.add_argument(
        "--nuts-samples", type=int, help="NUTS draws for eight schools (default 4000; quick 400)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add a ``bench`` subcommand (dispatching to :func:`main`) to a CLI's subparsers."""
    parser = _parser(subparsers.add_parser("bench", help=__doc__.splitlines()[0]))
    parser.set_defaults(func=lambda args: _run(args))
    return parser


def _run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    if args.quick:
        targets = args.targets or QUICK_TARGETS
        steps, draws, nuts_samples = args.steps or 50, args.draws or 2000, 400
    else:
        targets = args.targets or list(TARGETS)
        steps, draws, nuts_samples = args.steps or 1000, args.draws or 10000, 4000
    nuts_samples = args.nuts_samples or nuts_samples
    config = TrainConfig(num_steps=steps, num_particles=args.particles, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    results = run_benchmark(
        targets,
        args.guides or list(GUIDES),
        config,
        draws,
        nuts_samples,
        args.out,
        progress=not args.no_progress,
        num_seeds=args.seeds,
    )
    results["bars"] = check_bars(results["summary"], results["summary_speed_ratios"])
    print(format_table(results))
    figure = plot_samples(results["summary"], args.out / "guides.png")
    for row in results["rows"] + results["summary"]:
        row.pop("samples", None)
    (args.out / "guides.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out / 'guides.json'}" + (f" and {figure}" if figure else ""))
    return results


def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry point; returns the results dict."""
    parser = _parser(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    return _run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
