"""The ``pyro-nf`` command line.

Each command group lives in its own module exposing ``add_parser(subparsers)``, which
adds its parser and sets ``func`` (a callable taking the parsed arguments and returning a
JSON-serialisable summary to print, or ``None``) as a default. To add a group, append its
``add_parser`` to :data:`COMMAND_GROUPS`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from .vae.cli import add_parser as add_vae_parser

__all__ = ["COMMAND_GROUPS", "build_parser", "main"]

#: ``add_parser(subparsers)`` functions, one per command group.
COMMAND_GROUPS: list[Callable[[argparse._SubParsersAction], None]] = [add_vae_parser]


def build_parser() -> argparse.ArgumentParser:
    """The ``pyro-nf`` argument parser with every command group registered."""
    parser = argparse.ArgumentParser(
        prog="pyro-nf", description="Normalizing-flow posteriors for Pyro."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_parser in COMMAND_GROUPS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pyro-nf``; prints the command's JSON summary, returns an exit code.

    User errors (bad options, missing or invalid files, no CUDA, NaN losses) are reported
    as one ``pyro-nf: error: ...`` line on stderr with exit code 1.

    Examples
    --------
    >>> main(["vae", "eval", "--out", "/nonexistent"])  # doctest: +SKIP
    1
    """
    args = build_parser().parse_args(argv)
    try:
        summary = args.func(args)
    except (ValueError, OSError, FloatingPointError) as err:
        print(f"pyro-nf: error: {err}", file=sys.stderr)
        return 1
    if summary is not None:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
