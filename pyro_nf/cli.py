"""The ``pyro-nf`` command line.

Each command group lives in its own module exposing ``add_parser(subparsers)``, which
adds its parser and sets ``func`` (a callable taking the parsed arguments and returning a
JSON-serialisable summary to print, or ``None``) as a default. A command whose errors may
carry a computed result (``err.result``, as `WriteError` does when an output cannot be
written) also sets ``summarize``, turning that result into the summary, which is then
printed before the error. To add a group, append its
``add_parser`` to `COMMAND_GROUPS`. A command that takes the arguments it does not know
itself (``pyro-nf bench vae ...``, which hands them to its benchmark) sets ``rest=True``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .fitting import NonFiniteLossError
from .vae.cli import add_parser as add_vae_parser

__all__ = ["COMMAND_GROUPS", "build_parser", "main"]

#: The benchmarks that ``pyro-nf bench NAME`` runs: name -> module with ``main(argv)``.
BENCHMARKS = {"vae": "benchmarks.vae", "hierarchical": "benchmarks.hierarchical"}


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one ``pyro-nf: error: ...`` line (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("pyro-nf").strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"pyro-nf: error: {where}{message}\n")


def _run_benchmark(args: argparse.Namespace) -> Any:
    # benchmarks/ is part of a source checkout, not of the installed package.
    root = Path.cwd()
    if not (root / "benchmarks" / f"{args.benchmark}.py").is_file():
        raise ValueError(
            f"pyro-nf bench {args.benchmark} runs from a source checkout of pyro-nf: no "
            f"benchmarks/{args.benchmark}.py in {root}; cd to the repository root"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    module = importlib.import_module(BENCHMARKS[args.benchmark])
    module.main(args.rest, prog=f"pyro-nf bench {args.benchmark}")
    return None


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``pyro-nf bench NAME [options]`` (options: ``pyro-nf bench NAME --help``)."""
    bench = subparsers.add_parser("bench", help="run a benchmark from a source checkout")
    names = bench.add_subparsers(dest="benchmark", required=True)
    for name in BENCHMARKS:
        p = names.add_parser(name, add_help=False, help=f"the benchmark {BENCHMARKS[name]}")
        p.set_defaults(func=_run_benchmark, rest=True)


#: ``add_parser(subparsers)`` functions, one per command group.
COMMAND_GROUPS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_vae_parser,
    add_bench_parser,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``pyro-nf`` argument parser with every command group registered.

    Examples
    --------
    >>> build_parser().parse_args(["vae", "eval", "--out", "runs/x"]).out
    'runs/x'
    """
    parser = _Parser(prog="pyro-nf", description="Normalizing-flow posteriors for Pyro.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_parser in COMMAND_GROUPS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pyro-nf``; prints the command's JSON summary, returns an exit code.

    User errors (bad options, missing, invalid or damaged files, an unwritable ``--out``,
    a full disk, no CUDA, a diverging run, a batch too large for the device's memory) are
    reported as one ``pyro-nf: error: ...``
    line on stderr, without a traceback, with exit code 1 (2 for options argparse
    rejects). If the command had computed its results but could not write them, they are
    printed first (exit code 1 still: a file the caller expects is missing). Ctrl-C gives
    one ``pyro-nf: interrupted: ...`` line (what was saved, how to go on), exit code 130.

    Examples
    --------
    >>> main(["vae", "eval", "--out", "/nonexistent"])
    1
    """
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "rest", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    try:
        summary = args.func(args)
    except (ValueError, OSError, MemoryError, FloatingPointError, NonFiniteLossError) as err:
        unsaved = getattr(err, "result", None)
        if unsaved is not None:
            _print_summary(args.summarize(unsaved))
        print(f"pyro-nf: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        note = f": {err}" if str(err) else ""
        print(f"pyro-nf: interrupted{note}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it
    _print_summary(summary)
    return 0


def _print_summary(summary: Any) -> None:
    if summary is not None:
        print(json.dumps(summary, indent=2), flush=True)


if __name__ == "__main__":
    sys.exit(main())
