"""Train and evaluate a flow-posterior VAE on binarized MNIST through the ``pyro-nf`` CLI.

A thin wrapper over ``pyro-nf vae train`` and ``pyro-nf vae eval`` (see docs/vae.md)
with tiny defaults, so that it finishes in seconds: a small network, one epoch on the
first ``--train-subset`` training images, and -log p(x) estimated with few importance
samples on a few test images. It runs exactly these two commands::

    pyro-nf vae train --flow FLOW --layers K --latent D --hidden H --flow-hidden H \\
        --epochs E --train-subset N --eval-samples 0 --out OUT --no-progress
    pyro-nf vae eval --eval-subset M --eval-samples S --out OUT --no-progress

and writes the checkpoint, ``metrics.json``, ``eval_test.json``, ``samples.png`` and
``reconstructions.png`` to ``--out``. Options after ``--`` go to ``pyro-nf vae train``
unchanged. A paper-sized run is ``pyro-nf vae train --flow planar --layers 10`` (see the
documentation for timings).
"""

from __future__ import annotations

import argparse
import shlex

from pyro_nf.cli import main as pyro_nf_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--flow", default="planar", help="none, planar, radial, iaf or spline")
    parser.add_argument("--layers", type=int, default=2, help="flow layers (default: 2)")
    parser.add_argument("--latent", type=int, default=8, help="latent size (default: 8)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden width (default: 64)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-subset", type=int, default=500, metavar="N")
    parser.add_argument("--eval-subset", type=int, default=20, metavar="M")
    parser.add_argument("--eval-samples", type=int, default=100, metavar="S")
    parser.add_argument("--out", default="runs/vae_mnist", help="run folder")
    parser.add_argument("extra", nargs="*", help="more `pyro-nf vae train` options, after --")
    args = parser.parse_args(argv)

    hidden = str(args.hidden)
    train = [
        "vae", "train", "--flow", args.flow, "--layers", str(args.layers),
        "--latent", str(args.latent), "--hidden", hidden, hidden, "--flow-hidden", hidden,
        "--epochs", str(args.epochs), "--train-subset", str(args.train_subset),
        "--eval-samples", "0", "--out", args.out, "--no-progress", *args.extra,
    ]  # fmt: skip
    evaluate = [
        "vae", "eval", "--eval-subset", str(args.eval_subset),
        "--eval-samples", str(args.eval_samples), "--out", args.out, "--no-progress",
    ]  # fmt: skip
    for command in (train, evaluate):
        print("+ pyro-nf " + shlex.join(command), flush=True)
        code = pyro_nf_cli(command)
        if code:
            return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
