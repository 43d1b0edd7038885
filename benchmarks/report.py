"""Reporting: speed ratios, the pass/fail bars, the terminal table and the sample figure."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.guide_specs import GUIDES
from benchmarks.targets import EnergyTarget, get_target

__all__ = [
    "check_bars",
    "format_table",
    "plot_samples",
    "speed_ratios",
    "summarize",
    "summarize_ratios",
]

#: Targets on which our best KL must be at most a third of the best Pyro built-in's.
STRICT_TARGETS = ("u1", "u2", "u3", "u4", "funnel")
SPLINE_VS_NORMAL_TARGET = "gauss50"


def speed_ratios(rows: Sequence[dict]) -> list[dict]:
    """Per target, ours/Pyro median step time for each pair trained interleaved.

    Pairs: each of our default flow guides with Pyro's same-layer stack, and our spline
    with AutoNormal.
    """
    ratios = []
    for ours in rows:
        if not ours["ours"]:
            continue
        partners = [GUIDES[ours["guide"]].counterpart]
        if ours["guide"] == "spline":
            partners.append("AutoNormal")
        for row in rows:
            same_run = all(row.get(key) == ours.get(key) for key in ("target", "group", "seed"))
            if same_run and row["guide"] in partners:
                ratio = ours["sec_per_step"] / row["sec_per_step"]
                ratios.append(
                    {
                        "target": ours["target"],
                        "ours": ours["guide"],
                        "pyro": row["guide"],
                        "ratio": ratio,
                        "seed": ours.get("seed"),
                    }
                )
    return ratios


def _median(values: Sequence[float]) -> float:
    return float(torch.tensor(values, dtype=torch.float64).quantile(0.5))


def _median_run(runs: Sequence[dict]) -> dict:
    # The run whose KL is the (lower) median: its samples and moments represent the guide.
    return sorted(runs, key=lambda row: row["kl"])[(len(runs) - 1) // 2]


def summarize(rows: Sequence[dict]) -> list[dict]:
    """One row per (target, guide): the median over seeds.

    ``kl``, ``khat`` and ``sec_per_step`` are medians over the seeds' runs, ``kl_min`` and
    ``kl_max`` their range, ``num_seeds`` their number; the other fields (samples, moment
    errors, the KL's standard error) are those of the median-KL run. With one seed the
    row is the run itself (plus those fields).

    Examples
    --------
    >>> runs = [{"target": "u1", "guide": "planar", "kl": kl, "khat": 0.5,
    ...          "sec_per_step": 0.01, "seed": seed} for seed, kl in enumerate([0.3, 0.1, 0.2])]
    >>> row = summarize(runs)[0]
    >>> row["kl"], row["kl_min"], row["kl_max"], row["seed"]
    (0.2, 0.1, 0.3, 2)
    """
    runs: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        runs.setdefault((row["target"], row["guide"]), []).append(row)
    summary = []
    for guide_runs in runs.values():
        kls = [row["kl"] for row in guide_runs]
        summary.append(
            {
                **_median_run(guide_runs),
                "kl": _median(kls),
                "kl_min": min(kls),
                "kl_max": max(kls),
                "khat": _median([row["khat"] for row in guide_runs]),
                "sec_per_step": _median([row["sec_per_step"] for row in guide_runs]),
                "num_seeds": len(guide_runs),
            }
        )
    return summary


def summarize_ratios(ratios: Sequence[dict]) -> list[dict]:
    """Per (target, ours, Pyro) pair, the median step-time ratio over seeds."""
    pairs: dict[tuple[str, str, str], list[float]] = {}
    for ratio in ratios:
        pairs.setdefault((ratio["target"], ratio["ours"], ratio["pyro"]), []).append(ratio["ratio"])
    return [
        {"target": target, "ours": ours, "pyro": pyro, "ratio": _median(values)}
        for (target, ours, pyro), values in pairs.items()
    ]


def check_bars(rows: Sequence[dict], ratios: Sequence[dict]) -> list[dict]:
    """Each bar of the benchmark with the measured value and whether it is met."""
    bars = []
    for target in dict.fromkeys(row["target"] for row in rows):
        kls = [(row["kl"], row["guide"], row["ours"]) for row in rows if row["target"] == target]
        none = (math.inf, "none")
        ours = min(
            ((kl, n) for kl, n, is_ours in kls if is_ours and math.isfinite(kl)), default=none
        )
        pyro = min(
            ((kl, n) for kl, n, is_ours in kls if not is_ours and math.isfinite(kl)), default=none
        )
        factor = 1 / 3 if target in STRICT_TARGETS else 1.0
        bars.append(
            {
                "bar": f"{target}: best ours KL <= {'1/3 x ' if factor < 1 else ''}best Pyro KL",
                "value": f"{ours[0]:.3f} ({ours[1]}) vs {pyro[0]:.3f} ({pyro[1]})",
                "met": bool(ours[0] <= factor * max(pyro[0], 0.0)),
            }
        )
    for ratio in ratios:
        limit = 3.0 if ratio["pyro"] == "AutoNormal" else 1.0
        if ratio["pyro"] == "AutoNormal" and ratio["target"] != SPLINE_VS_NORMAL_TARGET:
            continue
        bars.append(
            {
                "bar": f"{ratio['target']}: {ratio['ours']} / {ratio['pyro']} step time "
                f"<= {limit:g}",
                "value": f"{ratio['ratio']:.2f}",
                "met": bool(ratio["ratio"] <= limit),
            }
        )
    return bars


def format_table(results: dict) -> str:
    """The terminal table: one block per target, then the bars."""
    ratio_of = {
        (r["target"], r["ours"], r["pyro"]): r["ratio"] for r in results["summary_speed_ratios"]
    }
    num_seeds = results["config"].get("num_seeds", 1)
    lines = []
    if num_seeds > 1:
        lines.append(f"medians over {num_seeds} seeds; [min-max] of the KL")
    header = f"{'guide':<24}{'KL (nats)':>18}{'k-hat':>8}{'ms/step':>9}  ratio vs Pyro"
    for target in dict.fromkeys(row["target"] for row in results["summary"]):
        rows = [row for row in results["summary"] if row["target"] == target]
        log_z = results["log_z"][target]
        note = f"log Z = {log_z:.4f}" if log_z is not None else "log Z estimated (IS)"
        lines += ["", f"== {target} ({note})", header]
        for row in sorted(rows, key=lambda row: row["kl"]):
            se = f" ± {row['kl_se']:.3f}" if row.get("kl_se") is not None else "       "
            if num_seeds > 1:
                se = f" [{row['kl_min']:.3f}-{row['kl_max']:.3f}]"
            ratios = ", ".join(
                f"{value:.2f} vs {pyro}"
                for (t, ours, pyro), value in ratio_of.items()
                if t == target and ours == row["guide"]
            )
            moments = ""
            if "max_mean_error_sd" in row:
                moments = (
                    f"  mean err {row['max_mean_error_sd']:.2f} sd, "
                    f"sd err {100 * row['max_sd_rel_error']:.0f}%"
                )
            mark = "*" if row["ours"] else " "
            lines.append(
                f"{mark}{row['guide']:<23}{row['kl']:>11.3f}{se}{row['khat']:>8.2f}"
                f"{1000 * row['sec_per_step']:>9.2f}  {ratios}{moments}"
            )
    lines += ["", "== bars (* = ours)"]
    for bar in results.get("bars", []):
        lines.append(f"[{'pass' if bar['met'] else 'MISS'}] {bar['bar']}: {bar['value']}")
    lines.append(f"total time {results['seconds']:.0f} s")
    return "\n".join(lines)


def _true_density(target: EnergyTarget, num: int = 200) -> tuple[torch.Tensor, list[float]]:
    lo, hi = target.box
    axis = torch.linspace(lo, hi, num)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1)
    return target.log_density(grid).exp(), [lo, hi, lo, hi]


def plot_samples(rows: Sequence[dict], path: Path) -> Path | None:
    """Figure in the style of Rezende & Mohamed (2015), Fig. 3, for the 2-D targets.

    One row per 2-D target: the true density, then a 2-D histogram of each guide's
    samples. Returns the path written, or None when matplotlib is not installed or no
    2-D target was run.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    targets = [name for name in dict.fromkeys(r["target"] for r in rows if "samples" in r)]
    if not targets:
        return None
    guides = list(dict.fromkeys(r["guide"] for r in rows if "samples" in r))
    fig, axes = plt.subplots(
        len(targets),
        len(guides) + 1,
        figsize=(1.6 * (len(guides) + 1), 1.7 * len(targets)),
        squeeze=False,
    )
    for i, name in enumerate(targets):
        target = get_target(name)
        density, extent = _true_density(target)
        axes[i, 0].imshow(density.numpy(), origin="lower", extent=extent, cmap="viridis")
        axes[i, 0].set_ylabel(name)
        for j, guide in enumerate(guides, start=1):
            row = next(r for r in rows if r["target"] == name and r["guide"] == guide)
            samples = torch.tensor(row["samples"])
            axes[i, j].hist2d(
                samples[:, 0].numpy(),
                samples[:, 1].numpy(),
                bins=60,
                range=[extent[:2], extent[2:]],
                cmap="viridis",
            )
            if i == 0:
                axes[i, j].set_title(("* " if row["ours"] else "") + guide, fontsize=7)
            axes[i, j].set_xlabel(f"KL {row['kl']:.2f}", fontsize=7)
    axes[0, 0].set_title("true density", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
