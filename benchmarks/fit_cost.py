"""What `fit()` costs with the default spline guide against `AutoNormal`, and how accurate each is.

On the four models of `examples/robust_posteriors.py` (years, correlated, garch, schools:
the "correlated" regression has 26 coefficients, intercept included, on N = 5000) plus an
ARMA(1,1) and a GARCH(1,1) on 200 observations, `fit()` is run at its defaults with
`AutoSplineFlow` and with `AutoNormal`, the two fits of a model one after the other
(interleaved model by model), and each is timed end to end (warm start included). Accuracy
is measured over all scalar latent parameters in unconstrained space, as in the example:
the largest |mean - reference mean| / reference sd and the largest |log(sd / reference
sd)|, the reference being the exact moments where they can be computed (the regressions,
`benchmarks.exact_regression`; the GARCHs, on a grid, `benchmarks.exact_garch`) and a
NUTS chain otherwise (arma, schools). The bars: spline wall time at most twice AutoNormal's, and
the spline guide within 0.1 sd and 10% (log ratio 0.095).

NUTS references (every model has one, the grid is laid out from it: 1000 warm-up steps
and 2000 draws unless told otherwise; shorter chains had min ESS below 100 on garch200)
are cached under `--cache` (default `benchmarks/nuts_cache/`, ignored by git), so a
rerun only pays for the fits.

Usage::

    nice -n 10 python -m benchmarks.fit_cost --nuts-only      # the references, once
    nice -n 10 python -m benchmarks.fit_cost --out /tmp/fit_cost.json
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoNormal

from benchmarks import exact_garch, exact_regression
from pyro_nf.autoguides import AutoSplineFlow

ROOT = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location(
    "robust_posteriors", ROOT / "examples" / "robust_posteriors.py"
)
robust = importlib.util.module_from_spec(_SPEC)
sys.modules["robust_posteriors"] = robust  # dataclasses look their module up there
_SPEC.loader.exec_module(robust)

MEAN_BAR, SD_BAR, TIME_BAR = 0.1, 0.095, 2.0


def _arma_residuals(y: torch.Tensor, mu, phi, theta) -> torch.Tensor:
    """e_t = y_t - mu - phi (y_{t-1} - mu) - theta e_{t-1}, e_0 = y_0 - mu, as one matrix
    product: e = M d with M_ts = (-theta)^(t-s) for s <= t (batched over leading dims)."""
    n = y.shape[-1]
    centred = y - mu
    drive = torch.cat([centred[..., :1], centred[..., 1:] - phi * centred[..., :-1]], -1)
    lag = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    mask = lag >= 0
    powers = torch.where(mask, (-theta)[..., None] ** lag.clamp_min(0), 0.0)
    return (powers @ drive.unsqueeze(-1)).squeeze(-1)


def arma_problem(num_data: int = 200) -> robust.Problem:
    gen = torch.Generator().manual_seed(4)
    mu, phi, theta, sigma = 0.5, 0.7, 0.3, 1.0
    noise = sigma * torch.randn(num_data, generator=gen)
    y = torch.zeros(num_data)
    y[0] = mu + noise[0]
    for t in range(1, num_data):
        y[t] = mu + phi * (y[t - 1] - mu) + theta * noise[t - 1] + noise[t]

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        phi = pyro.sample("phi", dist.Uniform(-1.0, 1.0))
        theta = pyro.sample("theta", dist.Uniform(-1.0, 1.0))
        sigma = pyro.sample("sigma", dist.HalfNormal(5.0))
        mu, phi, theta, sigma = (v.unsqueeze(-1) for v in (mu, phi, theta, sigma))
        residuals = _arma_residuals(y, mu, phi, theta)
        pyro.factor("y", dist.Normal(0.0, sigma).log_prob(residuals).sum(-1))

    return robust.Problem("arma", model, (y,))


PROBLEMS = {
    **robust.PROBLEMS,
    "arma": arma_problem,
    "garch200": lambda: robust.Problem(**{**vars(robust.garch_problem(200)), "name": "garch200"}),
}
#: Exact moments, `(problem, NUTS draws) -> (means, sds)`: the grid is laid out from the draws.
EXACT = {
    "years": lambda problem, _: exact_regression.problem_moments("years", problem),
    "correlated": lambda problem, _: exact_regression.problem_moments("correlated", problem),
    "garch": exact_garch.problem_moments,
    "garch200": exact_garch.problem_moments,
}
GUIDES = {"AutoNormal": AutoNormal, "AutoSplineFlow": AutoSplineFlow}


def with_exact_moments(name: str, problem: robust.Problem, reference: dict) -> dict:
    """The NUTS reference, with the exact means and sds (`mean`, `sd`) where `EXACT` has
    them, and the chain's own errors against them (`nuts_mean_err`, `nuts_sd_err`)."""
    if name not in EXACT:
        return reference
    draws = robust.flatten(robust.unconstrain(reference["draws"], robust.latent_supports(problem)))
    mean, sd = EXACT[name](problem, draws)
    nuts_mean_err = float(((draws.mean(0) - mean).abs() / sd).max())
    nuts_sd_err = float((draws.std(0) / sd).log().abs().max())
    return {
        **reference,
        "mean": mean,
        "sd": sd,
        "nuts_mean_err": nuts_mean_err,
        "nuts_sd_err": nuts_sd_err,
    }


def time_ratios(rows: list[dict]) -> list[dict]:
    """The rows, each with `time_ratio`: its time over AutoNormal's on the same model."""
    normal = {r["model"]: r["seconds"] for r in rows if r["guide"] == "AutoNormal"}
    return [{**r, "time_ratio": r["seconds"] / normal.get(r["model"], math.nan)} for r in rows]


COLUMNS = {**robust.COLUMNS, "time ratio": lambda r: f"{r['time_ratio']:.2f}"}


def main(argv: list[str] | None = None) -> None:
    description = __doc__.split("\n\n")[0]
    parser = robust.argument_parser(description, PROBLEMS, str(ROOT / "benchmarks" / "nuts_cache"))
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    print(json.dumps({"commit": commit}), flush=True)
    rows = []
    for name in args.models:
        problem = PROBLEMS[name]()
        reference = with_exact_moments(name, problem, robust.nuts_reference(problem, args))
        summary = {k: v for k, v in reference.items() if k not in ("draws", "mean", "sd")}
        print(json.dumps({"model": name, "nuts": summary}), flush=True)
        if not args.nuts_only:
            rows += [robust.fit_row(problem, *item, reference, args) for item in GUIDES.items()]
    rows = time_ratios(rows)
    if rows:
        print(robust.markdown_table(rows, COLUMNS))
    if args.out:
        Path(args.out).write_text(json.dumps({"commit": commit, "rows": rows}, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
