"""The ``batchnorm`` command.

``batchnorm --version`` prints the library's version (and torch's).

``batchnorm lab [EXPERIMENT ...] [--data digits|mnist1d|mnist] [--data-dir DIR] [--seeds K]
[--quick|--full] [--out DIR] [--jobs N]`` runs the lab's experiments (all by default), writes a
PNG per experiment, ``results.json``, ``report.md`` and ``report.html`` into ``--out``, and
prints a table of claims → measured effects. Progress bars (over the experiments, and the
training steps of the current one) go to stderr when stdout and stderr are terminals; nothing
is drawn otherwise. Bad arguments exit with code 2 and a message; so does a missing part of the
``lab`` extra (matplotlib, scikit-learn; ``pip install 'batchnorm[lab]'``), in one line.

``batchnorm explain [--batch ROWS] [--gamma G] [--beta B] [--momentum M] [--eps E] [--image]``
prints the worked example of :mod:`batchnorm.lab.explain`: batch normalization by hand on a tiny
batch, each step checked against the library's ``BatchNorm1d`` (``BatchNorm2d`` with
``--image``); exit code 1 if a step disagrees. It needs no extra. (Not to be confused with
``calibrate --show``, which explains the CPU backend's routing.)

``batchnorm calibrate [--threads N ...] [--quick] [--rounds R] [--min-size S] [--max-size S]
[--dtypes ...] [--show | --reset]`` measures where the CPU kernels beat ATen's on this machine
(:meth:`batchnorm.backends.cpu_backend.CpuBackend.calibrate`: each case on a geometric ladder of
sizes, median of interleaved rounds), stores the thresholds in the cache directory (what
``auto`` then routes by) and prints the table; ``--show`` prints what is stored for this
machine, ``--reset`` removes it (the committed defaults and lazy measurement route again).

Why this file is long: three sub-commands, each with its parser (help texts included) and its
checks of what argparse cannot check.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["LAB_EXTRA", "build_parser", "lab_requirements_missing", "main"]

#: The lab's experiments, in order (kept here so that parsing imports neither the lab nor
#: matplotlib; a test checks them against :data:`batchnorm.lab.catalog.EXPERIMENTS`).
EXPERIMENT_NAMES = (
    "convergence",
    "distributions",
    "learning-rates",
    "regularization",
    "cnn-rnn",
    "small-batches",
    "landscape",
    "gradient-flow",
    "which-axes",
    "worked-example",
)
DATA_NAMES = ("digits", "mnist1d", "mnist")
#: How to install what ``batchnorm lab`` needs beyond the core library.
LAB_EXTRA = "pip install 'batchnorm[lab]'"
#: Modules ``batchnorm lab`` imports from the ``lab`` extra: always, and per ``--data``.
LAB_MODULES = ("matplotlib",)
DATA_MODULES = {"digits": ("sklearn",), "mnist1d": ("mnist1d",), "mnist": ()}


def _positive_int(text: str) -> int:
    """argparse type: an int ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
               "g": 1 << 30, "gib": 1 << 30}  # fmt: skip


def _size(text: str) -> int:
    """argparse type: bytes, with an optional unit (``64K``, ``16MiB``, ``4096``)."""
    stripped = text.strip().lower()
    number = stripped.rstrip("bgikm ")
    unit = stripped[len(number) :].strip()
    try:
        value = int(number) * _SIZE_UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(
            f"expected a size in bytes such as 65536, 64K or 16MiB, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return value


#: ``calibrate``'s ladders: (smallest bytes, largest bytes, factor, rounds).
CALIBRATE_DEFAULT = (64 << 10, 64 << 20, 2, 9)
CALIBRATE_QUICK = (64 << 10, 16 << 20, 4, 5)
CALIBRATE_DTYPES = ("float32", "bfloat16", "float64")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``batchnorm`` command."""
    return _build_parsers()[0]


def _build_parsers() -> tuple[
    argparse.ArgumentParser, argparse.ArgumentParser, argparse.ArgumentParser
]:
    """The ``batchnorm`` parser and its ``lab`` and ``explain`` sub-parsers."""
    parser = argparse.ArgumentParser(
        prog="batchnorm", description="Batch normalization: the lab that reproduces its claims."
    )
    parser.add_argument(
        "--version", action="version", version=_version(), help="print the version and exit"
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
    explain = _add_explain(commands)
    _add_calibrate(commands)
    return parser, lab, explain


def _version() -> str:
    """``batchnorm X.Y.Z (torch A.B.C)``: the installed distribution's version, else the
    package's own."""
    from importlib import metadata

    import torch

    try:
        version = metadata.version("batchnorm")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        from batchnorm import __version__ as version
    return f"batchnorm {version} (torch {torch.__version__})"


def _add_explain(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """The ``explain`` sub-parser."""
    explain = commands.add_parser(
        "explain",
        help="batch normalization by hand on a tiny batch, checked against the library",
        description="Prints the three steps of batch normalization (batch mean, biased "
        "variance, normalized values), then γ and β, the running estimates after one step "
        "(unbiased variance) and the evaluation-mode output, on a tiny batch with real numbers; "
        "each step is checked against batchnorm.BatchNorm1d (BatchNorm2d with --image). Exit "
        "code 1 if a step disagrees. For the CPU backend's routing, see 'calibrate --show'.",
    )
    source = explain.add_mutually_exclusive_group()
    source.add_argument(
        "--batch",
        metavar="ROWS",
        help="the batch: rows (examples) separated by ';', values by spaces or commas, "
        "e.g. '1 2; 3 2; 5 4; 7 8' (default: a 4 × 3 batch)",
    )
    source.add_argument(
        "--image",
        action="store_true",
        help="an image batch (N, C, H, W) = (2, 2, 2, 2) through BatchNorm2d: statistics per "
        "channel over N·H·W",
    )
    explain.add_argument("--gamma", metavar="G", help="γ per feature, e.g. '1 2 0.5'")
    explain.add_argument("--beta", metavar="B", help="β per feature, e.g. '0 1 -1'")
    explain.add_argument(
        "--momentum", type=float, default=0.1, metavar="M", help="momentum (default: 0.1)"
    )
    explain.add_argument("--eps", type=float, default=1e-5, metavar="E", help="ε (default: 1e-5)")
    return explain


def _add_calibrate(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``calibrate`` sub-parser."""
    calibrate = commands.add_parser(
        "calibrate",
        help="measure where the CPU kernels beat ATen's on this machine and store it",
        description="Times our CPU kernels against ATen's (behind the same checks) for each "
        "pass, layout and dtype on a geometric ladder of sizes, at this machine's thread count "
        "(or --threads), stores the thresholds in the cache directory ($BATCHNORM_CACHE_DIR, "
        "else $XDG_CACHE_HOME/batchnorm or ~/.cache/batchnorm), where the cpu backend's "
        "default routing reads them, and prints the table.",
    )
    calibrate.add_argument(
        "--threads",
        type=_positive_int,
        nargs="+",
        metavar="N",
        help="torch thread counts to measure (default: torch.get_num_threads())",
    )
    calibrate.add_argument(
        "--quick",
        action="store_true",
        help=f"a short ladder (x{CALIBRATE_QUICK[2]} steps up to 16 MiB, "
        f"{CALIBRATE_QUICK[3]} rounds)",
    )
    calibrate.add_argument(
        "--rounds",
        type=_positive_int,
        metavar="R",
        help="timed rounds per size (default: 9; quick 5)",
    )
    calibrate.add_argument(
        "--min-size", type=_size, metavar="S", help="smallest input (default: 64K)"
    )
    calibrate.add_argument(
        "--max-size", type=_size, metavar="S", help="largest input (default: 64M; quick 16M)"
    )
    calibrate.add_argument(
        "--dtypes",
        nargs="+",
        choices=CALIBRATE_DTYPES,
        metavar="DTYPE",
        help=f"dtypes to measure (default: all the kernels run here: "
        f"{', '.join(CALIBRATE_DTYPES)})",
    )
    action = calibrate.add_mutually_exclusive_group()
    action.add_argument(
        "--show",
        action="store_true",
        help="print the table stored for this machine; measure nothing",
    )
    action.add_argument(
        "--reset",
        action="store_true",
        help="remove the tables stored for this machine (all thread counts unless --threads)",
    )


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


def lab_requirements_missing(data: str) -> str | None:
    """The one-line message for a module of the ``lab`` extra that cannot be imported, or None.

    Tries to import matplotlib (the plots) and the module ``data`` needs (scikit-learn for
    ``digits``, mnist1d for ``mnist1d``), the way the lab will.

    Args:
        data: the ``--data`` name.

    Returns:
        ``"batchnorm lab needs <module> (<error>): install the lab extra: pip install
        'batchnorm[lab]'"``, or ``None`` when everything imports.
    """
    for module in (*LAB_MODULES, *DATA_MODULES.get(data, ())):
        try:
            importlib.import_module(module)
        except ImportError as error:
            name = "scikit-learn" if module == "sklearn" else module
            return f"batchnorm lab needs {name} ({error}): install the lab extra: {LAB_EXTRA}"
    return None


def _show_progress() -> bool:
    """Progress bars only when both stdout and stderr are terminals (the bars go to stderr)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``batchnorm`` command.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 on success, 1 when ``explain`` finds a step that disagrees with the
        library, 2 when the ``lab`` extra is missing. Bad arguments raise ``SystemExit(2)`` with
        a message.
    """
    start = time.perf_counter()
    parser, lab_parser, explain_parser = _build_parsers()
    args = parser.parse_args(argv)
    if args.command == "calibrate":
        return _calibrate(parser, args)
    if args.command == "explain":
        return _explain(explain_parser, args)
    _check_lab_arguments(lab_parser, args)
    missing = lab_requirements_missing(args.data)
    if missing is not None:
        print(missing, file=sys.stderr)
        return 2

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
        progress=_show_progress(),
    )
    print()
    print(claims_table(output.results))
    print(f"\nReport: {output.report.resolve()}  ({time.perf_counter() - start:.0f} s)")
    return 0


def _explain(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``batchnorm explain``: prints the worked example; 1 if a step disagrees."""
    from batchnorm.lab import explain

    try:
        batch: Any = explain.DEFAULT_IMAGE if args.image else explain.DEFAULT_BATCH
        if args.batch is not None:
            batch = explain.parse_batch(args.batch)
        gamma = None if args.gamma is None else explain.parse_values(args.gamma, "--gamma")
        beta = None if args.beta is None else explain.parse_values(args.beta, "--beta")
        example = explain.worked_example(batch, gamma, beta, momentum=args.momentum, eps=args.eps)
    except ValueError as error:
        parser.error(str(error))
    print(example.text())
    return 0 if example.ok else 1


def _calibrate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``batchnorm calibrate``: sweep and store, ``--show`` or ``--reset``; returns the code."""
    smallest, largest, factor, rounds = CALIBRATE_QUICK if args.quick else CALIBRATE_DEFAULT
    smallest = args.min_size or smallest
    largest = args.max_size or largest
    if largest < smallest:
        parser.error(f"calibrate: --max-size ({largest}) is below --min-size ({smallest})")

    import torch
    from tqdm import tqdm

    from batchnorm.backends import calibration, cpu_backend

    try:
        backend = cpu_backend.CpuBackend()
    except ImportError as error:
        print(f"batchnorm calibrate: nothing to measure: {error}", file=sys.stderr)
        return 1
    threads = args.threads or [torch.get_num_threads()]
    kernels = backend.kernel_set()
    if args.reset:
        if args.threads:
            paths = [calibration.table_path(calibration.routing_key(n, kernels)) for n in threads]
        else:
            paths = calibration.stored_paths(calibration.routing_key(threads[0], kernels))
        removed = calibration.remove(paths)
        for path in removed:
            print(f"removed {path}")
        if not removed:
            print(f"nothing stored for this machine in {calibration.cache_dir()}")
        return 0
    if args.show:
        if not args.threads:
            stored = calibration.stored_paths(calibration.routing_key(threads[0], kernels))
            counts = [path.stem.rpartition("-t")[2] for path in stored]
            threads = [int(count) for count in counts if count.isdigit()] or threads
        for index, count in enumerate(threads):
            table = backend.routing_table(count)
            print(("\n" if index else "") + calibration.describe(table))
            if table.state != "stored":
                print(
                    f"\nnothing stored for {count} thread(s): the committed defaults and "
                    f"measurements on first use route the kernels"
                )
        return 0
    sizes = calibration.ladder(smallest, largest, factor)
    rounds = args.rounds or rounds
    dtypes = None if args.dtypes is None else {calibration.DTYPES[name] for name in args.dtypes}
    for index, count in enumerate(threads):
        cases = [
            case for case in backend.measurable_cases(count) if dtypes is None or case[2] in dtypes
        ]
        if not cases:
            print(f"no kernel of ours runs here at {count} thread(s): nothing to measure")
            continue
        begin = time.perf_counter()
        with tqdm(
            total=calibration.sweep_steps(cases, sizes),
            desc=f"calibrating, {count} thread(s)",
            unit="size",
            file=sys.stderr,
            disable=None,  # no bar where stderr is not a terminal
        ) as bar:

            def progress(text: str, bar: Any = bar) -> None:
                if bar.total is not None and bar.n >= bar.total:
                    bar.total += 1  # a size timed a second time (calibration.sweep)
                bar.set_postfix_str(text, refresh=False)
                bar.update()

            table = backend.calibrate(
                count, sizes=sizes, rounds=rounds, dtypes=dtypes, progress=progress
            )
        print(("\n" if index else "") + calibration.describe(table))
        print(f"\nmeasured in {time.perf_counter() - begin:.1f} s; stored in {table.path}")
    return 0
