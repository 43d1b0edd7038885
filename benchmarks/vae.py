"""Flow VAE benchmark: the diagonal Gaussian against flow posteriors on binarized MNIST.

Every posterior is trained with the same seed, architecture, recipe and number of epochs
in one interleaved run: each batch goes to every model in turn (the order rotating from
batch to batch), each step timed, so the load on the machine falls on all of them alike.
Each model keeps its own random-number stream, so it draws the noise it would draw trained
alone. Then each is scored on the same test images by importance sampling, with the
standard error across images and the paired standard error of its difference to the
diagonal Gaussian (per image, same images).

    python -m benchmarks.vae --quick                 # a few seconds
    python -m benchmarks.vae --epochs 10 --eval-subset 1000
    pyro-nf bench vae --quick                        # the same, from a source checkout

Writes ``vae.json`` (after every epoch, and with the test results at the end) to
``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pyro_nf import FLOWS, NonFiniteLossError
from pyro_nf.vae import TrainConfig, Trainer, image_log_likelihoods, load_binarized_mnist
from pyro_nf.vae.evaluate import mean_and_se

__all__ = ["BARS", "POSTERIORS", "format_table", "main", "run_benchmark"]

#: Benchmarked posteriors: name -> (flow family, number of layers). ``coupling`` runs
#: where that family is registered.
POSTERIORS = {
    "none": ("none", 1),
    "planar": ("planar", 10),
    "iaf": ("iaf", 4),
    "spline": ("spline", 4),
    "coupling": ("coupling", 4),
}

#: Throughput bars: training images/s of a posterior at least this times the diagonal's.
BARS = {"planar": 0.8, "iaf": 0.6}

#: Settings of ``--quick`` (a smoke run in seconds).
QUICK = {
    "epochs": 1,
    "train_subset": 300,
    "eval_subset": 20,
    "eval_samples": 20,
    "latent": 8,
    "hidden": [32],
    "flow_hidden": [16],
    "warmup": 4,
}


@dataclass
class Contender:
    """One posterior in the interleaved run: its trainer, noise stream and timings."""

    name: str
    trainer: Trainer
    rng: torch.Tensor
    seconds: float = 0.0
    images: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    diverged: str | None = None


def _parser(prog: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    default = [name for name, (family, _) in POSTERIORS.items() if family in FLOWS]
    p.add_argument("--flows", nargs="+", choices=default, default=default)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-subset", type=int, help="first N training images (default all)")
    p.add_argument("--eval-subset", type=int, help="first N test images (default all 10000)")
    p.add_argument("--eval-samples", type=int, default=1000, help="K per image (default 1000)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-decay", type=float, default=1.0, help="per epoch (default 1)")
    p.add_argument("--warmup", type=int, default=10_000, help="KL warm-up updates")
    p.add_argument("--iwae", type=int, default=1, help="train on the K-sample IWAE bound")
    p.add_argument("--latent", type=int, default=40)
    p.add_argument("--hidden", type=int, nargs="+", default=[300, 300])
    p.add_argument("--flow-hidden", type=int, nargs="+", default=[200, 200])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--max-minutes", type=float, help="stop training after the epoch past this")
    p.add_argument("--out", type=Path, default=Path("benchmark-results"))
    p.add_argument("--quick", action="store_true", help="smoke run: " + json.dumps(QUICK))
    p.add_argument("--no-progress", action="store_true")
    return p


def _config(args: argparse.Namespace, name: str) -> TrainConfig:
    family, layers = POSTERIORS[name]
    return TrainConfig(
        flow=family,
        num_layers=layers,
        latent_dim=args.latent,
        hidden_dims=args.hidden,
        flow_hidden_dims=args.flow_hidden,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_decay=args.lr_decay,
        warmup=args.warmup,
        iwae=args.iwae,
        seed=args.seed,
        train_subset=args.train_subset,
        eval_subset=args.eval_subset,
        eval_samples=args.eval_samples,
        progress=False,
    )


def _contenders(args: argparse.Namespace, train_x: torch.Tensor) -> list[Contender]:
    contenders = []
    for name in args.flows:
        config = _config(args, name)
        # Same seed: every posterior starts from the same encoder/decoder weights.
        torch.manual_seed(config.seed)
        trainer = Trainer(config.build_model(), config)
        trainer.vae.decoder.init_output_bias(train_x.double().mean(0))
        contenders.append(Contender(name, trainer, torch.get_rng_state()))
    return contenders


def _timed_step(contender: Contender, x: torch.Tensor) -> float:
    torch.set_rng_state(contender.rng)
    start = time.perf_counter()
    try:
        loss = contender.trainer.step(x)
    except NonFiniteLossError as err:
        contender.diverged = f"update {contender.trainer.updates + 1}: {err}"
        loss = math.nan
    contender.seconds += time.perf_counter() - start
    contender.images += len(x)
    contender.rng = torch.get_rng_state()
    return loss


def _epoch(contenders: list[Contender], train_x: torch.Tensor, epoch: int, args) -> None:
    """One interleaved pass over the shuffled training images (the same order for all)."""
    order = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
    batches = torch.randperm(len(train_x), generator=order).split(args.batch_size)
    active = [c for c in contenders if c.diverged is None]
    totals = dict.fromkeys((c.name for c in active), 0.0)
    for c in active:
        c.trainer.start_epoch(epoch, c.trainer.updates)
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{args.epochs}", disable=args.no_progress)
    for i, index in enumerate(bar):
        x = train_x[index].float()
        shift = i % len(active)
        for c in active[shift:] + active[:shift]:
            if c.diverged is None:
                totals[c.name] -= _timed_step(c, x)
    for c in active:
        c.history.append(
            {
                "epoch": epoch + 1,
                "train_bound": totals[c.name] / len(train_x),
                "beta": c.trainer.config.beta(c.trainer.updates - 1),
                "images_per_s": c.images / c.seconds,
            }
        )


def _evaluate(contenders: list[Contender], test_x: torch.Tensor, args) -> dict[str, Any]:
    results = {}
    for c in contenders:
        if c.diverged is None:
            torch.manual_seed(args.seed)
            log_px, elbo = image_log_likelihoods(
                c.trainer.vae, test_x, args.eval_samples, progress=not args.no_progress
            )
            results[c.name] = (-log_px, -elbo)
    return results


def _rows(contenders: list[Contender], scores: dict[str, Any]) -> list[dict[str, Any]]:
    base = next((c for c in contenders if c.name == "none"), None)
    rows = []
    for c in contenders:
        row: dict[str, Any] = {
            "posterior": c.name,
            "flow": c.trainer.config.flow,
            "layers": c.trainer.config.num_layers if c.name != "none" else 0,
            "parameters": sum(p.numel() for p in c.trainer.vae.parameters()),
            "images_per_s": c.images / c.seconds,
            "speed_ratio": (c.images / c.seconds) / (base.images / base.seconds) if base else None,
            "history": c.history,
            "diverged": c.diverged,
        }
        if c.name in scores:
            nll, neg_elbo = scores[c.name]
            row["nll"], row["nll_se"] = mean_and_se(nll)
            row["neg_elbo"], row["neg_elbo_se"] = mean_and_se(neg_elbo)
            if "none" in scores and c.name != "none":
                diff, diff_se = mean_and_se(nll - scores["none"][0])
                row.update(nll_diff=diff, nll_diff_se=diff_se, nll_diff_z=diff / diff_se)
        rows.append(row)
    return rows


def _bars(rows: list[dict[str, Any]]) -> dict[str, Any]:
    bars = {}
    for row in rows:
        name = row["posterior"]
        if name in BARS and row["speed_ratio"] is not None:
            bars[f"speed {name} >= {BARS[name]}x diagonal"] = row["speed_ratio"] >= BARS[name]
        if "nll_diff" in row:
            bars[f"{name} beats diagonal by > 3 paired SE"] = row["nll_diff_z"] < -3
    return bars


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Train every posterior of `args.flows` interleaved, then score them; see the module."""
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data = load_binarized_mnist()
    train_x = torch.from_numpy(np.ascontiguousarray(data["train"][: args.train_subset]))
    test_x = torch.from_numpy(np.ascontiguousarray(data["test"][: args.eval_subset]))
    contenders = _contenders(args, train_x)
    results: dict[str, Any] = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "recipe": _config(args, "none").to_dict(),
        "machine": {"torch": torch.__version__, "python": platform.python_version()},
        "commit": _commit(),
        "device": "cpu",
        "train_images": len(train_x),
        "test_images": len(test_x),
    }
    for epoch in range(args.epochs):
        _epoch(contenders, train_x, epoch, args)
        results.update(epochs_done=epoch + 1, rows=_rows(contenders, {}))
        _write(results, args.out)
        minutes = (time.perf_counter() - started) / 60
        print(_epoch_line(results["rows"], epoch, minutes), flush=True)
        if args.max_minutes is not None and minutes > args.max_minutes:
            break
    results["train_seconds"] = time.perf_counter() - started
    results["rows"] = _rows(contenders, _evaluate(contenders, test_x, args))
    results["bars"] = _bars(results["rows"])
    results["seconds"] = time.perf_counter() - started
    _write(results, args.out)
    return results


def _epoch_line(rows: list[dict[str, Any]], epoch: int, minutes: float) -> str:
    parts = [
        f"{r['posterior']} {r['history'][-1]['train_bound']:.1f} ({r['images_per_s']:.0f}/s)"
        for r in rows
        if r["history"] and r["history"][-1]["epoch"] == epoch + 1
    ]
    return f"epoch {epoch + 1} after {minutes:.1f} min, train bound: " + ", ".join(parts)


def _commit() -> str | None:
    try:
        run = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        )
    except OSError:
        return None
    return run.stdout.strip() or None


def _write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "vae.json").write_text(json.dumps(results, indent=1) + "\n")


def _cell(row: dict[str, Any], key: str, digits: int = 2) -> str:
    if key not in row:
        return "–"
    return f"{row[key]:.{digits}f} ± {row[key + '_se']:.{digits}f}"


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table of the results of `run_benchmark`.

    Examples
    --------
    >>> row = {"posterior": "none", "layers": 0, "nll": 90.0, "nll_se": 0.5, "neg_elbo": 95.0,
    ...        "neg_elbo_se": 0.5, "history": [{"train_bound": -96.0}],
    ...        "images_per_s": 5000.0, "speed_ratio": 1.0}
    >>> print(format_table({"rows": [row]}).splitlines()[2])
    | none | 0 | 90.00 ± 0.50 | 95.00 ± 0.50 | – | -96.0 | 5000 | 1.00 |
    """
    lines = [
        "| posterior | layers | test −log p(x) | test −ELBO | Δ −log p(x) vs diagonal "
        "(paired SE) | train bound, last epoch | train images/s | × diagonal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        last = row["history"][-1]["train_bound"] if row["history"] else math.nan
        ratio = "–" if row["speed_ratio"] is None else f"{row['speed_ratio']:.2f}"
        lines.append(
            f"| {row['posterior']} | {row['layers']} | {_cell(row, 'nll')} | "
            f"{_cell(row, 'neg_elbo')} | {_cell(row, 'nll_diff')} | {last:.1f} | "
            f"{row['images_per_s']:.0f} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    """Command-line entry point (``python -m benchmarks.vae``); returns the results."""
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    results = run_benchmark(args)
    print(format_table(results))
    for bar, ok in results["bars"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {bar}")
    print(f"wrote {args.out / 'vae.json'}")
    return results


if __name__ == "__main__":
    main()
