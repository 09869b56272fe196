"""The ``batchnorm`` command.

``batchnorm lab [EXPERIMENT ...] [--data digits|mnist1d|mnist] [--data-dir DIR] [--seeds K]
[--quick|--full] [--out DIR] [--jobs N]`` runs the lab's experiments (all by default), writes a
PNG per experiment, ``results.json``, ``report.md`` and ``report.html`` into ``--out``, and
prints a table of claims → measured effects. Bad arguments exit with code 2 and a message.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

#: The lab's experiments, in order (kept here so that ``--help`` does not import torch).
EXPERIMENT_NAMES = (
    "convergence",
    "distributions",
    "learning-rates",
    "regularization",
    "cnn-rnn",
    "small-batches",
    "landscape",
)
DATA_NAMES = ("digits", "mnist1d", "mnist")


def _positive_int(text: str) -> int:
    """argparse type: an int ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``batchnorm`` command."""
    return _build_parsers()[0]


def _build_parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The ``batchnorm`` parser and its ``lab`` sub-parser."""
    parser = argparse.ArgumentParser(
        prog="batchnorm", description="Batch normalization: the lab that reproduces its claims."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    lab = commands.add_parser(
        "lab",
        help="run the experiments and write plots and a report",
        description="Runs experiments that reproduce the claims about batch normalization "
        "and writes one PNG each, results.json, report.md and report.html.",
    )
    lab.add_argument(
        "experiments",
        nargs="*",
        metavar="EXPERIMENT",
        help=f"experiments to run (default: all): {', '.join(EXPERIMENT_NAMES)}",
    )
    lab.add_argument(
        "--data",
        choices=DATA_NAMES,
        default="digits",
        help="dataset (default: digits, bundled with scikit-learn)",
    )
    lab.add_argument(
        "--data-dir",
        metavar="DIR",
        help="folder with the MNIST IDX files (.gz or raw), for --data mnist",
    )
    lab.add_argument(
        "--seeds",
        type=_positive_int,
        metavar="K",
        help="number of seeds (default: 1 quick, 3 default, 5 full)",
    )
    schedule = lab.add_mutually_exclusive_group()
    schedule.add_argument(
        "--quick",
        action="store_const",
        dest="budget",
        const="quick",
        help="tiny schedule (seconds; for tests)",
    )
    schedule.add_argument(
        "--full", action="store_const", dest="budget", const="full", help="long schedule (minutes)"
    )
    lab.set_defaults(budget="default")
    lab.add_argument(
        "--out", metavar="DIR", default="lab-output", help="output folder (default: lab-output)"
    )
    lab.add_argument(
        "--jobs",
        type=_positive_int,
        metavar="N",
        help="worker processes for training (default: CPUs, at most 2)",
    )
    return parser, lab


def _check_lab_arguments(lab_parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Rejects what argparse cannot (unknown experiments, data folder): exits with code 2."""
    unknown = [name for name in args.experiments if name not in EXPERIMENT_NAMES]
    if unknown:
        lab_parser.error(
            f"unknown experiment(s) {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(EXPERIMENT_NAMES)}"
        )
    if args.data == "mnist":
        if args.data_dir is None:
            lab_parser.error("--data mnist needs --data-dir DIR, the folder of the MNIST IDX files")
        from batchnorm.lab.data import find_mnist_files

        try:
            find_mnist_files(args.data_dir)
        except FileNotFoundError as error:
            lab_parser.error(str(error))
    elif args.data_dir is not None:
        lab_parser.error(f"--data-dir is only used with --data mnist (got --data {args.data})")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``batchnorm`` command.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 on success. Bad arguments raise ``SystemExit(2)`` with a message.
    """
    start = time.perf_counter()
    parser, lab_parser = _build_parsers()
    args = parser.parse_args(argv)
    _check_lab_arguments(lab_parser, args)

    from batchnorm.lab.report import claims_table
    from batchnorm.lab.session import default_jobs, run_lab

    output = run_lab(
        args.experiments,
        data=args.data,
        data_dir=args.data_dir,
        seeds=args.seeds,
        budget=args.budget,
        out=args.out,
        jobs=args.jobs or default_jobs(),
        progress=sys.stderr.isatty(),
    )
    print()
    print(claims_table(output.results))
    print(f"\nReport: {output.report.resolve()}  ({time.perf_counter() - start:.0f} s)")
    return 0
