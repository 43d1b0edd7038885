"""The first call of each default flow guide against 50 SVI steps of the same guide.

The first call sets the guide up: the model's prototype trace, the MAP search and Hessian,
and the candidate starts scored on common draws (`pyro_nf.starts`). The bar: it costs at
most what 50 SVI steps of the same guide cost (ratio <= 1), on the README's demo
regression, the centred eight-schools model and the 25-predictor regression with N = 5000
of `examples/robust_posteriors.py`. Both are timed in one process, one after the other
(the median of ``--repeats`` such pairs), after one throw-away optimiser is built (the
first `torch.optim` optimiser imports `torch._dynamo`, seconds that whichever came first
would pay).

Usage::

    nice -n 10 python -m benchmarks.first_call --out /tmp/first_call.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_nf.autoguides import AutoIAFFlow, AutoPlanarFlow, AutoRadialFlow, AutoSplineFlow
from pyro_nf.demo import regression_model

GUIDES = (AutoSplineFlow, AutoIAFFlow, AutoPlanarFlow, AutoRadialFlow)
NUM_STEPS = 50


def _examples():
    path = Path(__file__).resolve().parents[1] / "examples" / "robust_posteriors.py"
    spec = importlib.util.spec_from_file_location("robust_posteriors", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def problems() -> dict:
    """Name to ``(model, args)``."""
    generator = torch.Generator().manual_seed(0)
    x = torch.linspace(5.0, 15.0, 50)
    y = 1.0 + 0.5 * x + 0.8 * torch.randn(50, generator=generator)
    examples = _examples()
    schools, correlated = examples.schools_problem(), examples.correlated_problem()
    return {
        "demo regression": (regression_model, (x, y)),
        "eight schools (centred)": (schools.model, schools.args),
        "regression, 25 predictors, N=5000": (correlated.model, correlated.args),
    }


def _pair(guide_class, model, args, seed: int) -> tuple[float, float, str]:
    """Seconds of a new guide's first call and of 50 SVI steps after it, and its start."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = guide_class(model)
    start = time.perf_counter()
    guide(*args)
    first_call = time.perf_counter() - start
    svi = SVI(model, guide, pyro.optim.Adam({"lr": guide.default_lr}), Trace_ELBO())
    svi.step(*args)  # the optimiser's own first step (its state) is not a step's cost
    start = time.perf_counter()
    for _ in range(NUM_STEPS):
        svi.step(*args)
    return first_call, time.perf_counter() - start, guide.start.label


def measure(guide_class, model, args, seed: int, repeats: int) -> dict:
    """Medians over ``repeats`` pairs (first call, then 50 steps: interleaved, so a
    machine's load weighs on both alike) of the two times, and their ratio."""
    pairs = [_pair(guide_class, model, args, seed) for _ in range(repeats)]
    first_call = statistics.median(pair[0] for pair in pairs)
    steps = statistics.median(pair[1] for pair in pairs)
    return {
        "guide": guide_class.__name__,
        "first_call_s": first_call,
        "svi_50_steps_s": steps,
        "ratio": first_call / steps,
        "start": pairs[0][2],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("first_call.json"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="pairs per row (medians)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # torch._dynamo imported here
    rows = []
    print(f"{'model':36} {'guide':15} {'first call':>10} {'50 steps':>9} {'ratio':>6}  start")
    for name, (model, model_args) in problems().items():
        for guide_class in GUIDES:
            timing = measure(guide_class, model, model_args, args.seed, args.repeats)
            row = {"model": name, **timing}
            rows.append(row)
            print(
                f"{name:36} {row['guide']:15} {row['first_call_s']:9.3f}s "
                f"{row['svi_50_steps_s']:8.3f}s {row['ratio']:6.2f}  {row['start']}",
                flush=True,
            )
    args.out.write_text(json.dumps(rows, indent=2))
    worst = max(row["ratio"] for row in rows)
    print(f"worst ratio {worst:.2f} (bar: 1.00); written to {args.out}")


if __name__ == "__main__":
    main()
