"""Challenger O-rings: a flow guide, AutoNormal and NUTS on a logistic regression.

The data (``examples/data/challenger_orings.csv``, see its README) are the 23 Space
Shuttle flights before *Challenger*: launch temperature and how many of the six field-joint
O-rings showed thermal distress. The model is the binomial logistic regression of Dalal,
Fowlkes & Hoadley (1989),

    distressed_i ~ Binomial(6, sigmoid(intercept + slope * temperature_i)),

on the temperature in degrees Fahrenheit as recorded (53-81 °F, not centred), with
``intercept ~ N(0, 10²)`` and ``slope ~ N(0, 1)``. Intercept and slope are then correlated
at about -0.99 a posteriori: a mean-field AutoNormal cannot represent that and shrinks both
marginal sds; a flow guide can. Each guide is fitted with `pyro_nf.fit` and
checked against NUTS with :func:`pyro_nf.diagnostics.compare_to_mcmc` (errors of the
posterior means and sds in NUTS posterior sds) and PSIS k-hat. The probability that an
O-ring is distressed at 31 °F, the *Challenger* launch temperature, is an extrapolation far
outside the data, and is where the guides disagree most.

Writes ``logistic_regression.png`` (posterior draws and fitted curves) and
``logistic_regression.json`` (the comparison) to ``--out``. The figure in the
documentation comes from::

    python examples/logistic_regression.py --steps 3000 --warmup 500 --draws 1000 \\
        --out docs/img
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import AutoNormal

from pyro_nf import AutoSplineFlow, compare_to_mcmc, fit, psis_khat, to_inference_data

DATA = Path(__file__).resolve().parent / "data" / "challenger_orings.csv"
CHALLENGER_TEMPERATURE_F = 31.0


def load_data(path: Path = DATA) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch temperatures (°F) and counts of distressed O-rings (of 6), as tensors."""
    table = np.genfromtxt(path, delimiter=",", names=True)
    if not (table["o_rings"] == 6).all():
        raise ValueError(f"{path}: expected 6 O-rings at risk on every flight")
    return torch.tensor(table["temperature_f"]), torch.tensor(table["distressed"])


def model(temperature: torch.Tensor, distressed: torch.Tensor | None = None) -> None:
    """Binomial logistic regression of O-ring distress on launch temperature."""
    intercept = pyro.sample("intercept", dist.Normal(0.0, 10.0))
    slope = pyro.sample("slope", dist.Normal(0.0, 1.0))
    with pyro.plate("flights", temperature.shape[0]):
        pyro.sample(
            "distressed",
            dist.Binomial(6, logits=intercept + slope * temperature),
            obs=distressed,
        )


def run_nuts(data: tuple, args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Reference posterior draws from one NUTS chain (dense mass matrix, JIT-compiled)."""
    pyro.set_rng_seed(args.seed)
    mcmc = MCMC(
        NUTS(
            model,
            target_accept_prob=0.9,
            full_mass=True,
            jit_compile=True,
            ignore_jit_warnings=True,
        ),
        num_samples=args.draws,
        warmup_steps=args.warmup,
        disable_progbar=True,
    )
    mcmc.run(*data)
    return {name: value.numpy() for name, value in mcmc.get_samples().items()}


def fit_guide(name: str, data: tuple, args: argparse.Namespace):
    """Fit one guide with :func:`fit`; return the guide and its draws."""
    pyro.clear_param_store()
    guide = AutoNormal(model) if name == "AutoNormal" else AutoSplineFlow(model)
    fit(model, guide, *data, num_steps=args.steps, progress=False, seed=args.seed)
    idata = to_inference_data(model, guide, *data, num_samples=args.draws, observed_data=False)
    draws = {site: idata.posterior[site].values.reshape(-1) for site in ("intercept", "slope")}
    return guide, draws


def distress_probability(draws: dict[str, np.ndarray], temperature: np.ndarray) -> np.ndarray:
    """P(an O-ring is distressed) at each temperature, one row per posterior draw."""
    logits = draws["intercept"][:, None] + draws["slope"][:, None] * temperature[None, :]
    return 1.0 / (1.0 + np.exp(-logits))


def plot(posteriors: dict, data: tuple, path: Path) -> Path | None:
    """Posterior draws of (intercept, slope) and the fitted distress curves."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    temperature, distressed = (x.numpy() for x in data)
    grid = np.linspace(25.0, 85.0, 121)
    colors = {"NUTS": "0.4", "AutoNormal": "tab:orange", "AutoSplineFlow": "tab:blue"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, draws in posteriors.items():
        keep = slice(0, 1000)
        left.scatter(
            draws["intercept"][keep], draws["slope"][keep], s=3, alpha=0.4, color=colors[name]
        )
        band = np.percentile(distress_probability(draws, grid), [5, 50, 95], axis=0)
        right.plot(grid, band[1], color=colors[name], label=name)
        right.fill_between(grid, band[0], band[2], color=colors[name], alpha=0.15)
    left.set(xlabel="intercept", ylabel="slope (per °F)", title="posterior draws")
    right.scatter(temperature, distressed / 6, color="k", s=12, zorder=3, label="flights")
    right.axvline(CHALLENGER_TEMPERATURE_F, color="k", ls=":", lw=1)
    right.set(
        xlabel="launch temperature (°F)",
        ylabel="P(O-ring distressed)",
        title="median and 90% band; dotted: 31 °F",
    )
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--steps", type=int, default=400, help="maximum fit() steps per guide")
    parser.add_argument("--warmup", type=int, default=100, help="NUTS warm-up steps")
    parser.add_argument("--draws", type=int, default=200, help="NUTS draws and guide draws")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="figures", help="output folder (default: figures)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data()
    posteriors = {"NUTS": run_nuts(data, args)}
    nuts_p31 = distress_probability(posteriors["NUTS"], np.array([CHALLENGER_TEMPERATURE_F]))
    corr = np.corrcoef(posteriors["NUTS"]["intercept"], posteriors["NUTS"]["slope"])[0, 1]
    summary = {"nuts": {"corr": corr, "p_distress_31F_median": float(np.median(nuts_p31))}}
    print(
        f"NUTS: corr(intercept, slope) {corr:+.3f}, P(distress at 31 °F) {np.median(nuts_p31):.2f}"
    )
    for name in ("AutoNormal", "AutoSplineFlow"):
        guide, draws = fit_guide(name, data, args)
        posteriors[name] = draws
        table = compare_to_mcmc(
            guide, posteriors["NUTS"], *data, model=model, num_samples=args.draws
        )
        p31 = distress_probability(draws, np.array([CHALLENGER_TEMPERATURE_F]))
        summary[name] = {
            "khat": psis_khat(model, guide, *data, num_samples=2000),
            "corr": float(np.corrcoef(draws["intercept"], draws["slope"])[0, 1]),
            "p_distress_31F_median": float(np.median(p31)),
            "compare_to_mcmc": table[["mean_error", "sd_error"]].to_dict(orient="index"),
        }
        print(
            f"\n{name}: k-hat {summary[name]['khat']:.2f}, corr {summary[name]['corr']:+.3f}, "
            f"P(distress at 31 °F) {np.median(p31):.2f}\n"
            f"{table.round(3).to_string()}"
        )
    (out / "logistic_regression.json").write_text(json.dumps(summary, indent=2, default=float))
    figure = plot(posteriors, data, out / "logistic_regression.png")
    print(f"\nwrote {out / 'logistic_regression.json'}" + (f" and {figure}" if figure else ""))


if __name__ == "__main__":
    main()
