"""What `fit()`'s k-hat check and corrected summaries cost, on one fitted guide.

Fits the default guide once per seed with the check off (``num_khat_samples=0``), then
runs the check (`pyro_nf.fitting.trust.judge_fit`) on the same guide with the previous
settings (a tenth of the fit's time, no further draws) and with the current ones, in
turn, ``--repeats`` times each; prints one JSON line per seed with the fit's time, each
check's time, draws, k-hat and whether corrected summaries were kept, and the ratio of
the fit's time with the current check to that with the previous one.

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.check_cost --model garch --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.plain_svi import PROBLEMS
from benchmarks.tail_correction import first_fit
from pyro_nf.fitting import trust

#: (TIME_FRACTION, CORRECTION_FRACTION) of each setting compared.
SETTINGS = {"previous": (0.1, 0.0), "current": (trust.TIME_FRACTION, trust.CORRECTION_FRACTION)}


def check_times(problem, guide, fit_time: float, repeats: int) -> dict[str, list[dict]]:
    """Each setting's check on the fitted guide, interleaved, ``repeats`` times."""
    rows: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    saved = trust.TIME_FRACTION, trust.CORRECTION_FRACTION
    try:
        for _ in range(repeats):
            for name, (fraction, correction) in SETTINGS.items():
                trust.TIME_FRACTION, trust.CORRECTION_FRACTION = fraction, correction
                start = time.perf_counter()
                judged = trust.judge_fit(problem.model, guide, problem.args, {}, fit_time=fit_time)
                rows[name].append(
                    {
                        "check_s": time.perf_counter() - start,
                        "draws": judged.num_khat_samples,
                        "khat": judged.khat,
                        "kept": judged.reweighted is not None,
                    }
                )
    finally:
        trust.TIME_FRACTION, trust.CORRECTION_FRACTION = saved
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    """One line per seed; see the module's docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="garch", choices=sorted(PROBLEMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--fit-steps", type=int, default=5000, help="the fit's step bound")
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    problem = PROBLEMS[args.model]()
    out = []
    for seed in args.seeds:
        guide, fit_s, _, result = first_fit(problem, seed, args.fit_steps, num_khat_samples=0)
        rows = check_times(problem, guide, result.wall_time, args.repeats)
        totals = {name: [fit_s + row["check_s"] for row in rows[name]] for name in rows}
        ratios = [c / p for c, p in zip(totals["current"], totals["previous"], strict=True)]
        line = {"model": args.model, "seed": seed, "fit_s": fit_s, **rows, "ratio": ratios}
        print(json.dumps(line), flush=True)
        out.append(line)
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
