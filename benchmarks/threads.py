"""`fit`'s thread choice against torch's default thread count, with a core kept busy.

Small models gain nothing from intra-op threads and lose much when a core is shared: on a
machine where another process keeps one core busy, a step at torch's default count waits
for the busy core. `fit(num_threads=None)` times its first steps at the default count and
at one thread and keeps the faster (`pyro_nf.fitting.threads`). This benchmark fits the
README's demo regression and the centred eight-schools model (spline guide, 4 particles,
a fixed number of steps) at the default count forced (`num_threads=torch's default`) and
with the measured choice, the two interleaved (`--repeats` pairs, alternating which goes
first), while a busy-loop subprocess it starts keeps one core loaded (`--no-busy` leaves
it out); the process is killed at the end. Load averages before and after are recorded:
on a shared machine the times are only as steady as its load.

Usage::

    python -m benchmarks.threads --out benchmarks/results/threads.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyro
import torch

from pyro_nf.autoguides import AutoSplineFlow
from pyro_nf.demo import regression_model
from pyro_nf.fitting import fit

SCHOOLS_Y = [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
SCHOOLS_SIGMA = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]
NUM_PARTICLES = 4


def schools(y: torch.Tensor, sigma: torch.Tensor) -> None:
    """Eight schools, centred (as in `examples/robust_posteriors.py`)."""
    mu = pyro.sample("mu", pyro.distributions.Normal(0.0, 5.0))
    tau = pyro.sample("tau", pyro.distributions.HalfCauchy(5.0))
    with pyro.plate("schools", len(y)):
        theta = pyro.sample("theta", pyro.distributions.Normal(mu, tau))
        pyro.sample("y", pyro.distributions.Normal(theta, sigma), obs=y)


def problems() -> dict[str, tuple[Callable, tuple]]:
    """Name to ``(model, args)``."""
    generator = torch.Generator().manual_seed(0)
    x = torch.linspace(5.0, 15.0, 50)
    y = 1.0 + 0.5 * x + 0.8 * torch.randn(50, generator=generator)
    return {
        "demo regression": (regression_model, (x, y)),
        "eight schools (centred)": (
            schools,
            (torch.tensor(SCHOOLS_Y), torch.tensor(SCHOOLS_SIGMA)),
        ),
    }


@contextmanager
def busy_core(enabled: bool) -> Iterator[int | None]:
    """A subprocess spinning on one core for the block's duration (its pid, or None)."""
    if not enabled:
        yield None
        return
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it reach the scheduler before the first timing
        yield process.pid
    finally:
        process.kill()
        process.wait()


def fit_once(model: Callable, args: tuple, steps: int, num_threads: int | None, seed: int) -> dict:
    """One fit of a fresh spline guide; its wall time and thread count."""
    pyro.clear_param_store()
    guide = AutoSplineFlow(model)
    result = fit(model, guide, *args, num_steps=steps, num_particles=NUM_PARTICLES,
                 num_threads=num_threads, progress=False, seed=seed)  # fmt: skip
    return {"seconds": result.wall_time, "threads": result.num_threads}


def measure(
    model: Callable, args: tuple, steps: int, repeats: int, default: int, seed: int
) -> dict:
    """Median wall times over ``repeats`` interleaved pairs: the default count forced, and
    the measured choice (which goes first alternates)."""
    forced, chosen, counts = [], [], []
    for repeat in range(repeats):
        order = (default, None) if repeat % 2 == 0 else (None, default)
        for num_threads in order:
            run = fit_once(model, args, steps, num_threads, seed)
            if num_threads is None:
                chosen.append(run["seconds"])
                counts.append(run["threads"])
            else:
                forced.append(run["seconds"])
    return {
        "default_threads": default,
        "default_s": statistics.median(forced),
        "chosen_s": statistics.median(chosen),
        "chosen_threads": counts,
        "speedup": statistics.median(forced) / statistics.median(chosen),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/threads.json"))
    parser.add_argument("--steps", type=int, default=400, help="steps per fit")
    parser.add_argument("--repeats", type=int, default=3, help="pairs per row (medians)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-busy", action="store_true", help="no busy-loop process")
    parser.add_argument(
        "--models", nargs="+", choices=list(problems()), default=list(problems()),
        help="which models to fit (default: all)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    default = torch.get_num_threads()
    load_before = os.getloadavg()
    rows = []
    print(f"{'model':26} {'default':>13} {'chosen':>13} {'speedup':>8}  (steps {args.steps})")
    with busy_core(not args.no_busy) as busy:
        for name in args.models:
            model, model_args = problems()[name]
            timing = measure(model, model_args, args.steps, args.repeats, default, args.seed)
            rows.append({"model": name, **timing})
            counts = "/".join(str(count) for count in timing["chosen_threads"])
            print(
                f"{name:26} {timing['default_s']:6.2f}s at {default:<3} "
                f"{timing['chosen_s']:6.2f}s at {counts:<5} {timing['speedup']:6.2f}x",
                flush=True,
            )
    load_after = os.getloadavg()
    report = {
        "steps": args.steps,
        "repeats": args.repeats,
        "num_particles": NUM_PARTICLES,
        "busy_process": busy is not None,
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(
        f"load average (1/5/15 min) before {', '.join(f'{v:.2f}' for v in load_before)}, "
        f"after {', '.join(f'{v:.2f}' for v in load_after)}; written to {args.out}"
    )


if __name__ == "__main__":
    main()
