"""Hierarchical models: AutoStructuredFlow against AutoNormal, both against the posterior.

Two problems, both fitted by `pyro_nf.fit` at its defaults, same seed, for each guide:

- the normal-normal model of `benchmarks.exact_hierarchical` (``model``, ``simulate``)
  at J groups, scored against its exact moments (``exact_moments``); above
  ``--full-batch-max`` groups the plate is subsampled in minibatches of ``--batch-size``;
- the radon model of `benchmarks.radon` (centred varying intercepts and slopes, 85
  counties), scored against its NUTS reference (``load_reference``).

Each row runs in a fresh process, so its peak memory is its own: the growth of the
process's peak resident set size (``resource.getrusage(...).ru_maxrss``) over the fit,
measured from just before it. Errors are those of
`benchmarks.exact_hierarchical.score`: the mean error in posterior sds and the log sd ratio
(signed for the globals; the 95th percentile over members of their absolute values for a
site with one value per group), from ``--samples`` draws of every member (by default
`DRAWS`: 20,000 on radon, whose ``log sigma_b`` is skewed). The structured guide's come
from `pyro_nf.reweighted` on the full plate (vectorised), which also weights them towards
the posterior: the row's ``corrected`` errors are those of its weighted moments, the
summaries `fit` offers as ``FitResult.reweighted``, with their ``khat``. AutoNormal's come
from its parameters, which hold every member, where its draws under a subsampled plate
would hold one minibatch.

Usage::

    python -m benchmarks.hierarchical            # J = 100, 1000, 10000, 100000; radon
    python -m benchmarks.hierarchical --groups 100 1000 --seeds 0 1 --no-radon
    pyro-nf bench hierarchical --groups 100      # the same, from a source checkout

Writes ``--out`` (``benchmarks/results/hierarchical.json``) after every row and prints a
table per problem and the bars met.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import resource
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer.autoguide import AutoNormal
from torch import Tensor
from torch.distributions import biject_to

from benchmarks import exact_hierarchical, radon
from benchmarks.exact_hierarchical import Groups, Moments, exact_moments, score, simulate
from pyro_nf import NonFiniteLossError, Reweighted, fit, reweighted
from pyro_nf.structured import AutoStructuredFlow

__all__ = ["Case", "bars", "format_table", "guide_draws", "main", "run_case"]

RESULTS = Path(__file__).parent / "results"

#: The guides compared, by name.
GUIDES: dict[str, Callable[[Callable], Any]] = {
    "structured": AutoStructuredFlow,
    "autonormal": AutoNormal,
}

#: Scored sites of each problem: its globals, then its per-group sites.
SITES = {"normal": ("mu", "log_tau", "theta"), "radon": (*radon.GLOBALS, *radon.LOCALS)}

#: Draws behind each moment, by problem: radon's ``log sigma_b`` has a long lower tail,
#: whose sd 1000 draws of one guide put at +0.021 and 20,000 at -0.083 (the bar is 0.095).
DRAWS = {"normal": 4000, "radon": 20_000}

#: At most this many values of a per-group site drawn at once (draws x groups), and per
#: vectorised pass of the drawer.
MAX_VALUES, MAX_BATCH_VALUES = 10**8, 10**7

#: The bars: mean within 0.1 posterior sd, sd within 10%, at most this times AutoNormal's time.
MEAN_BAR, SD_BAR, TIME_BAR = 0.1, math.log(1.1), 2.0


@dataclass(frozen=True)
class Case:
    """One fit to measure: a guide on a problem (``"normal"`` at ``groups`` groups, or
    ``"radon"``), ``num_steps=None`` for `fit`'s default budget."""

    guide: str
    problem: str = "normal"
    groups: int = radon.NUM_COUNTIES
    batch_size: int | None = None
    seed: int = 0
    samples: int | None = None
    num_steps: int | None = None

    @property
    def draws(self) -> int:
        """Draws behind each moment: ``samples``, or the problem's `DRAWS` (fewer where
        the groups are so many that they would pass `MAX_VALUES`, at least 1000)."""
        if self.samples is not None:
            return self.samples
        return min(DRAWS[self.problem], max(1000, MAX_VALUES // self.groups))


def _problem(case: Case) -> tuple[Callable, tuple, Callable[[], Moments]]:
    """The model, its arguments for `fit` (float32) and the reference moments (deferred)."""
    if case.problem == "radon":
        data = {k: v.float() if v.is_floating_point() else v for k, v in radon.load_radon().items()}
        return radon.model, (data,), radon.load_reference
    exact = simulate(case.groups, case.seed)  # float64, for the exact moments
    data = Groups(exact.ybar.float(), exact.num_obs.float(), exact.sigma)
    return exact_hierarchical.model, (*data, case.batch_size), lambda: exact_moments(exact)


def _autonormal_draws(guide: AutoNormal, num_samples: int) -> dict[str, Tensor]:
    """Draws of every latent site from AutoNormal's parameters (all members of a plate)."""
    draws = {}
    with torch.no_grad():
        for name, site in guide.prototype_trace.iter_stochastic_nodes():
            loc, scale = getattr(guide.locs, name), getattr(guide.scales, name)
            noise = torch.randn(num_samples, *loc.shape, dtype=loc.dtype)
            draws[name] = biject_to(site["fn"].support)(loc + scale * noise)
    return draws


def guide_draws(
    guide: Any, model: Callable, args: tuple, num_samples: int, batch_size: int = 1000
) -> tuple[dict[str, Tensor], Reweighted | None]:
    """``num_samples`` draws of every latent site, every member of each plate (the model
    runs on ``args``, with the full plate), and for a guide other than AutoNormal the
    `pyro_nf.Reweighted` that holds them with their importance weights (drawn
    ``batch_size`` at a time).

    Examples
    --------
    >>> data = simulate(30)
    >>> guide = AutoStructuredFlow(exact_hierarchical.model)
    >>> _ = fit(exact_hierarchical.model, guide, *data, 10, num_steps=3, progress=False)
    >>> draws, posterior = guide_draws(guide, exact_hierarchical.model, data, 50)
    >>> draws["theta"].shape, posterior.num_draws
    (torch.Size([50, 30]), 50)
    """
    pyro.set_rng_seed(123)
    if isinstance(guide, AutoNormal):
        return _autonormal_draws(guide, num_samples), None
    posterior = reweighted(model, guide, *args, num_draws=num_samples, batch_size=batch_size)
    return posterior.draws, posterior


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_case(case: Case) -> dict[str, Any]:
    """Fit one guide at `fit`'s defaults and measure it: a row of the table.

    Examples
    --------
    >>> row = run_case(Case("autonormal", groups=20, samples=50, num_steps=5))
    >>> row["params"], sorted(row["errors"])
    (44, ['log_tau', 'mu', 'theta'])
    """
    torch.set_num_threads(1)
    model, args, reference = _problem(case)
    pyro.clear_param_store()
    guide = GUIDES[case.guide](model)
    budget = {} if case.num_steps is None else {"num_steps": case.num_steps}
    before = _peak_mb()
    start = time.perf_counter()
    try:
        result = fit(model, guide, *args, progress=False, seed=case.seed, **budget)
    except NonFiniteLossError:
        result = None
    row: dict[str, Any] = asdict(case)
    row.update(
        wall_s=time.perf_counter() - start,
        peak_mb=_peak_mb() - before,
        nan=result is None or not math.isfinite(result.elbo),
        steps=None if result is None else result.num_steps,
        stop_reason=None if result is None else result.stop_reason,
        params=sum(p.numel() for p in pyro.get_param_store().values()),
        errors=None,
        corrected=None,
        khat=None,
    )
    if result is not None:
        full_plate = args[:-1] + (None,) if case.problem == "normal" else args
        batch_size = max(1, min(1000, MAX_BATCH_VALUES // case.groups))
        draws, posterior = guide_draws(guide, model, full_plate, case.draws, batch_size)
        sites, moments = list(SITES[case.problem]), reference()
        row["samples"] = case.draws
        row["errors"] = score(draws, moments, sites)
        if posterior is not None:
            row["corrected"] = score(draws, moments, sites, weights=posterior.weights)
            row["khat"] = posterior.khat
    return row


def _cell(errors: dict[str, Any] | None, site: str) -> str:
    if errors is None:
        return "NaN"
    return f"{errors[site]['mean_error']:+.3f} / {errors[site]['log_sd_ratio']:+.3f}"


def format_table(rows: Sequence[dict[str, Any]], problem: str, key: str = "errors") -> str:
    """A markdown table of one problem's rows: one cell per scored site, "mean error in sds
    / log sd ratio" (for per-group sites the 95th percentiles of their absolute values),
    of the guide's draws (``key="errors"``) or of their weighted moments (``"corrected"``,
    the rows that have them), and the weights' k-hat.

    Examples
    --------
    >>> row = {"guide": "autonormal", "problem": "normal", "groups": 10, "batch_size": None,
    ...        "seed": 0, "wall_s": 1.0, "steps": 9, "params": 24, "peak_mb": 2.0,
    ...        "errors": None, "khat": None}
    >>> print(format_table([row], "normal").splitlines()[-1])
    | autonormal | 10 | - | 0 | 1.0 | 9 | 24 | 2 | - | NaN | NaN | NaN |
    """
    sites = SITES[problem]
    head = ["guide", "J", "minibatch", "seed", "wall s", "steps", "params", "peak MB", "k-hat"]
    head += sites
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if row["problem"] != problem or (key != "errors" and row.get(key) is None):
            continue
        khat = "-" if row.get("khat") is None else f"{row['khat']:.2f}"
        cells = [row["guide"], row["groups"], row["batch_size"] or "-", row["seed"]]
        cells += [f"{row['wall_s']:.1f}", row["steps"], row["params"], f"{row['peak_mb']:.0f}"]
        cells += [khat, *(_cell(row[key], site) for site in sites)]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def _accurate(errors: dict[str, float]) -> bool:
    return abs(errors["mean_error"]) <= MEAN_BAR and abs(errors["log_sd_ratio"]) <= SD_BAR


def bars(rows: Sequence[dict[str, Any]]) -> dict[str, bool]:
    """Which bars the structured guide meets, fit by fit: globals and 95% of the groups
    within 0.1 sd in mean and 10% in sd, at most 2x AutoNormal's wall time, no NaN.

    Examples
    --------
    >>> ok = {"mean_error": 0.01, "log_sd_ratio": 0.2}
    >>> rows = [{"guide": g, "problem": "radon", "groups": 85, "seed": 0, "nan": False,
    ...          "wall_s": t, "errors": {s: ok for s in SITES["radon"]}}
    ...         for g, t in (("structured", 3.0), ("autonormal", 2.0))]
    >>> bars(rows)["radon J=85 seed 0: wall time <= 2x AutoNormal's"]
    True
    """
    autonormal = {
        (row["problem"], row["groups"], row["seed"]): row["wall_s"]
        for row in rows
        if row["guide"] == "autonormal"
    }
    result = {}
    for row in rows:
        if row["guide"] != "structured":
            continue
        key = (row["problem"], row["groups"], row["seed"])
        label = f"{row['problem']} J={row['groups']} seed {row['seed']}: "
        result[label + "no NaN"] = not row["nan"]
        if key in autonormal:
            result[label + "wall time <= 2x AutoNormal's"] = (
                row["wall_s"] <= TIME_BAR * autonormal[key]
            )
        for site in SITES[row["problem"]]:
            accurate = row["errors"] is not None and _accurate(row["errors"][site])
            result[label + f"{site} within 0.1 sd and 10%"] = accurate
    return result


def _parser(prog: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, nargs="*", default=[100, 1000, 10000, 100000])
    parser.add_argument("--full-batch-max", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=1000, help="above --full-batch-max")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--samples", type=int, help="draws behind each moment (default: DRAWS)")
    parser.add_argument("--guides", nargs="+", choices=list(GUIDES), default=list(GUIDES))
    parser.add_argument("--radon", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--num-steps", type=int, help="fit's step limit (default: fit's)")
    parser.add_argument("--out", type=Path, default=RESULTS / "hierarchical.json")
    return parser


def _cases(args: argparse.Namespace) -> list[Case]:
    common = {"samples": args.samples, "num_steps": args.num_steps}
    problems = [("normal", j) for j in args.groups]
    problems += [("radon", radon.NUM_COUNTIES)] if args.radon else []
    return [
        Case(guide, problem, groups, None, seed, **common)
        if problem == "radon" or groups <= args.full_batch_max
        else Case(guide, problem, groups, args.batch_size, seed, **common)
        for seed in args.seeds
        for problem, groups in problems
        for guide in args.guides
    ]


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> list[dict[str, Any]]:
    """Command-line entry point (``python -m benchmarks.hierarchical``); returns the rows."""
    args = _parser(prog).parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in _cases(args):
        # A fresh process per fit: its peak memory is its own.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            rows.append(pool.submit(run_case, case).result())
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "errors"}), flush=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")  # a crash keeps the rows
    for problem in dict.fromkeys(row["problem"] for row in rows):
        print(f"\n{problem}: mean error in sds / log sd ratio (groups: 95th percentiles)")
        print(format_table(rows, problem))
        print(f"\n{problem}, weighted towards the posterior (pyro_nf.reweighted; not the bars)")
        print(format_table(rows, problem, key="corrected"))
    for bar, ok in bars(rows).items():
        print(f"{'PASS' if ok else 'FAIL'}  {bar}")
    return rows


if __name__ == "__main__":
    main()
