"""Flow guides on the four 2-D energy densities of Rezende & Mohamed (2015), Figure 3.

For each target ``p(z) ∝ exp(-U(z))`` (U1-U4 of the paper's Table 1, from
``benchmarks/targets.py``) and each guide, fit the guide with `pyro_nf.fit`,
estimate ``KL(q‖p) = log Z - ELBO`` (the targets' normalisers are known) and the PSIS
k-hat, and draw a figure: the true density, then a histogram of each guide's samples.

Writes ``energy_2d.png`` and ``energy_2d.json`` (the KLs and k-hats) to ``--out``.
The small defaults are a smoke run; the figure in the documentation comes from::

    python examples/energy_2d.py --targets u1 u2 u3 u4 \\
        --guides planar:2 planar:8 planar:32 spline --steps 2000 --out docs/img
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyro
import torch

# The energy targets and the figure helper live in the repository's benchmarks package,
# not in the installed library: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import plot_samples  # noqa: E402
from benchmarks.targets import EnergyTarget, get_target  # noqa: E402
from pyro_nf import AutoFlow, fit, log_evidence, psis_khat  # noqa: E402

ENERGY_TARGETS = ("u1", "u2", "u3", "u4")


def parse_guide(text: str) -> tuple[str, int | None]:
    """``"planar:8"`` -> ``("planar", 8)``; ``"spline"`` -> ``("spline", None)`` (default K)."""
    family, _, layers = text.partition(":")
    if layers and not (layers.isdigit() and int(layers) > 0):
        raise argparse.ArgumentTypeError(f"expected FAMILY or FAMILY:LAYERS, got {text!r}")
    return family, int(layers) if layers else None


def fit_one(
    target: EnergyTarget, family: str, num_layers: int | None, args: argparse.Namespace
) -> dict:
    """Fit one guide to one target; return the figure row (samples, KL, k-hat)."""
    pyro.clear_param_store()
    guide = AutoFlow(
        target.model,
        flow=family,
        num_layers=num_layers,
        init_loc_fn=target.init_loc_fn,
        warm_start=None if args.warm_start == "none" else args.warm_start,
    )
    fit(
        target.model,
        guide,
        num_steps=args.steps,
        num_particles=args.particles,
        progress=False,
        seed=args.seed,
    )
    evidence = log_evidence(target.model, guide, num_samples=args.samples)
    with torch.no_grad():
        samples = guide.get_posterior().sample((args.samples,))
    label = f"{family} K={len(guide.flow.layers)}"
    return {
        "target": target.name,
        "guide": label,
        "ours": True,
        "kl": target.log_z - evidence.elbo,
        "khat": psis_khat(target.model, guide, num_samples=args.samples),
        "samples": samples.tolist(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument(
        "--targets", nargs="+", choices=ENERGY_TARGETS, default=["u1", "u2"], help="energies"
    )
    parser.add_argument(
        "--guides",
        nargs="+",
        type=parse_guide,
        default=[("planar", 8), ("spline", None)],
        metavar="FAMILY[:LAYERS]",
        help="flow families (planar, radial, iaf, spline) with an optional number of layers "
        "(default: planar:8 spline)",
    )
    parser.add_argument("--steps", type=int, default=150, help="maximum fit() steps per guide")
    parser.add_argument("--particles", type=int, default=8, help="ELBO particles per step")
    parser.add_argument("--samples", type=int, default=2000, help="draws for KL, k-hat, figure")
    parser.add_argument(
        "--warm-start",
        choices=["none", "laplace"],
        default="none",
        help="guide start: N(0, 0.1² I) as in the paper (default), or the library's default "
        "Laplace warm start (kept only where it finds a mode that beats the plain start)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="figures", help="output folder (default: figures)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.targets:
        for family, num_layers in args.guides:
            row = fit_one(get_target(name), family, num_layers, args)
            print(f"{name}  {row['guide']:<12} KL {row['kl']:6.3f}  k-hat {row['khat']:5.2f}")
            rows.append(row)
    summary = [{k: v for k, v in row.items() if k != "samples"} for row in rows]
    (out / "energy_2d.json").write_text(json.dumps(summary, indent=2))
    figure = plot_samples(rows, out / "energy_2d.png")
    print(f"wrote {out / 'energy_2d.json'}" + (f" and {figure}" if figure else " (no matplotlib)"))


if __name__ == "__main__":
    main()
