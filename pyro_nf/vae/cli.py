"""``pyro-nf vae train`` and ``pyro-nf vae eval``."""

from __future__ import annotations

import argparse
from typing import Any

from ..flows import FLOWS
from .training import TrainConfig, evaluate_run, train

__all__ = ["add_parser"]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        default=None,
        help="an .npz with train/valid/test arrays "
        "(uint8 0/1, shape (N, 784)); default: the shipped binarized MNIST",
    )
    parser.add_argument("--out", default="runs/vae", help="run directory (default: runs/vae)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--eval-subset",
        type=int,
        default=None,
        metavar="N",
        help="evaluate on the first N test images (default: all)",
    )
    parser.add_argument(
        "--eval-samples",
        type=int,
        default=5000,
        metavar="K",
        help="importance samples per image for -log p(x) (default: 5000)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _common_values(args: argparse.Namespace) -> dict[str, Any]:
    """The options `_common` declares, as the keyword arguments of both commands."""
    return {
        "data": args.data,
        "out": args.out,
        "device": args.device,
        "seed": args.seed,
        "eval_subset": args.eval_subset,
        "eval_samples": args.eval_samples,
        "progress": not args.no_progress,
    }


def _train(args: argparse.Namespace) -> dict[str, Any] | None:
    config = TrainConfig(
        flow=args.flow,
        num_layers=args.layers,
        latent_dim=args.latent,
        hidden_dims=args.hidden,
        flow_hidden_dims=args.flow_hidden,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        flow_lr_scale=args.flow_lr_scale,
        lr_decay=args.lr_decay,
        warmup=args.warmup,
        warmup_start=args.warmup_start,
        iwae=args.iwae,
        resume=args.resume,
        force_resume=args.force_resume,
        train_subset=args.train_subset,
        **_common_values(args),
    )
    result = train(config)
    if result.rank != 0:  # under torchrun, only rank 0 reports
        return None
    return _train_summary(result.metrics)


def _train_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """What ``vae train`` prints: the last epoch's history entry and the test metrics."""
    return {"history": metrics["history"][-1:], "test": metrics.get("test")}


def _eval(args: argparse.Namespace) -> dict[str, Any]:
    return _eval_summary(evaluate_run(split=args.split, **_common_values(args)))


def _eval_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """What ``vae eval`` prints: its metrics without the run's config."""
    return {key: value for key, value in metrics.items() if key != "config"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``vae`` command group (``train``, ``eval``) on ``pyro-nf``'s parser.

    Each command also sets ``summarize``, which turns the metrics that a failed write
    carries (`WriteError.result`) into the summary the command would have printed.

    Examples
    --------
    >>> parser = argparse.ArgumentParser(prog="pyro-nf")
    >>> add_parser(parser.add_subparsers())
    >>> parser.parse_args(["vae", "eval", "--split", "valid"]).split
    'valid'
    """
    vae = subparsers.add_parser("vae", help="flow-posterior VAE on binarized MNIST")
    commands = vae.add_subparsers(dest="vae_command", required=True)

    p = commands.add_parser("train", help="train a flow VAE, then evaluate -log p(x) on test")
    _architecture_options(p)
    _recipe_options(p)
    _common(p)
    p.set_defaults(func=_train, summarize=_train_summary)

    p = commands.add_parser("eval", help="evaluate the checkpoint in --out")
    p.add_argument("--split", choices=["train", "valid", "test"], default="test")
    _common(p)
    p.set_defaults(func=_eval, summarize=_eval_summary)


def _architecture_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--flow", choices=list(FLOWS), default="none")
    p.add_argument("--layers", type=int, default=10, help="flow layers (default: 10)")
    p.add_argument("--latent", type=int, default=40, help="latent size (default: 40)")
    p.add_argument(
        "--hidden",
        type=int,
        nargs="+",
        default=[300, 300],
        help="encoder/decoder hidden widths (default: 300 300)",
    )
    p.add_argument(
        "--flow-hidden",
        type=int,
        nargs="+",
        default=[200, 200],
        help="hidden widths of each flow layer's network (default: 200 200)",
    )


def _recipe_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=100, help="per process")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--flow-lr-scale",
        type=float,
        default=0.1,
        help="the flow layers' networks train at lr * this (default: 0.1)",
    )
    p.add_argument(
        "--lr-decay",
        type=float,
        default=1.0,
        metavar="G",
        help="multiply the learning rate by G in (0, 1] after every epoch (default: 1)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=10_000,
        metavar="N",
        help="KL warm-up: its weight rises linearly to 1 over the first N updates "
        "(default: 10000, as Rezende & Mohamed; 0: off)",
    )
    p.add_argument(
        "--warmup-start",
        type=float,
        default=0.01,
        metavar="B",
        help="the KL weight at the first update, in (0, 1] (default: 0.01)",
    )
    p.add_argument(
        "--iwae",
        type=int,
        default=1,
        metavar="K",
        help="train on the importance-weighted bound with K samples (default: 1, the ELBO)",
    )
    p.add_argument(
        "--train-subset",
        type=int,
        default=None,
        metavar="N",
        help="train on the first N training images (default: all)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument(
        "--force-resume",
        action="store_true",
        help="with --resume: continue even if --data, --lr, --batch-size, --seed or another "
        "training setting differs from the checkpoint's",
    )
