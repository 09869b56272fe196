"""The ``batchnorm`` command: help, ``--version``, argument errors (exit code 2 with a message),
a quick run, progress bars only on a terminal, ``explain``, and a clear message (exit code 2, no
traceback) when the ``lab`` extra is missing, simulated by blocking its import."""

from __future__ import annotations

import importlib
import io
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

import batchnorm
from batchnorm import cli
from batchnorm.lab import session
from batchnorm.lab.catalog import EXPERIMENTS
from batchnorm.lab.data import DATASETS
from lab_files import write_mnist

SOURCE = Path(__file__).resolve().parents[1] / "src"


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``batchnorm ARGS``."""
    try:
        code = cli.main(args)
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_names_match_the_lab() -> None:
    assert tuple(EXPERIMENTS) == cli.EXPERIMENT_NAMES
    assert cli.DATA_NAMES == DATASETS


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["lab", "--help"], capsys)
    assert code == 0
    assert "--data {digits,mnist1d,mnist}" in out
    for name in EXPERIMENTS:
        assert name in out.replace("\n", "").replace(" ", "")
    assert cli.build_parser().prog == "batchnorm"
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    assert "lab" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["lab", "speed"], "unknown experiment(s) 'speed'; choose from convergence"),
        (["lab", "--data", "cifar"], "invalid choice: 'cifar'"),
        (["lab", "--data", "mnist"], "--data mnist needs --data-dir DIR"),
        (["lab", "--data", "mnist", "--data-dir", "/no/such/dir"], "/no/such/dir: not a directory"),
        (["lab", "--data-dir", "."], "--data-dir is only used with --data mnist"),
        (["lab", "--seeds", "0"], "expected a positive integer, got '0'"),
        (["lab", "--seeds", "two"], "expected a positive integer, got 'two'"),
        (["lab", "--jobs", "-1"], "expected a positive integer, got '-1'"),
        (["lab", "--quick", "--full"], "not allowed with argument"),
    ],
)
def test_bad_arguments_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert message in err
    assert out == ""
    assert list(tmp_path.iterdir()) == []


def test_data_dir_without_mnist_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["lab", "--data", "mnist", "--data-dir", str(tmp_path)], capsys)
    assert code == 2
    assert "missing MNIST file(s) train-images-idx3-ubyte[.gz]" in err


def test_quick_run_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_mnist(tmp_path, compressed=False)
    out_dir = tmp_path / "report"
    args = [
        "lab",
        "convergence",
        "regularization",
        "--data",
        "mnist",
        "--data-dir",
        str(tmp_path),
        "--quick",
        "--seeds",
        "2",
        "--jobs",
        "1",
        "--out",
        str(out_dir),
    ]
    code, out, _ = run_cli(args, capsys)
    assert code == 0
    assert "Faster convergence" in out
    assert "Regularization" in out
    assert f"Report: {(out_dir / 'report.html').resolve()}" in out
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "convergence.png",
        "regularization.png",
        "report.html",
        "report.md",
        "results.json",
    ]


def test_python_dash_m_batchnorm() -> None:
    environment = {**os.environ, "PYTHONPATH": str(SOURCE)}
    done = subprocess.run(
        [sys.executable, "-m", "batchnorm", "lab", "no-such-experiment"],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
    )
    assert done.returncode == 2
    assert "unknown experiment(s) 'no-such-experiment'" in done.stderr


def test_version(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0
    assert out == f"batchnorm {metadata.version('batchnorm')} (torch {torch.__version__})\n"
    assert metadata.version("batchnorm") == batchnorm.__version__

    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    code, out, _ = run_cli(["--version"], capsys)
    assert out.startswith(f"batchnorm {batchnorm.__version__} (torch ")


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stdout_is_terminal", "stderr_is_terminal", "expected"),
    [(True, True, True), (True, False, False), (False, True, False), (False, False, False)],
)
def test_progress_bars_only_on_a_terminal(
    stdout_is_terminal: bool,
    stderr_is_terminal: bool,
    expected: bool,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    seen: dict[str, object] = {}

    def fake_run_lab(experiments: list[str], **options: object) -> session.LabOutput:
        seen.update(options)
        return session.LabOutput([], tmp_path, tmp_path / "report.html", 0.0)

    monkeypatch.setattr(session, "run_lab", fake_run_lab)
    monkeypatch.setattr(sys, "stdout", Terminal() if stdout_is_terminal else io.StringIO())
    monkeypatch.setattr(sys, "stderr", Terminal() if stderr_is_terminal else io.StringIO())
    assert cli.main(["lab", "--quick", "--out", str(tmp_path)]) == 0
    assert seen["progress"] is expected


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bars_over_experiments_and_steps(
    progress: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    session.run_lab(
        ["convergence", "worked-example"], budget="quick", out=tmp_path, progress=progress
    )
    err = capsys.readouterr().err
    if progress:
        assert "batchnorm lab" in err  # the bar over the experiments …
        assert "2/2" in err
        assert "worked-example" in err
        assert "1 convergence" in err  # … and the one over the current experiment's steps
        assert "step" in err
    else:
        assert err == ""


def test_explain(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["explain"], capsys)
    assert code == 0
    assert err == ""
    assert "f0: μ = (1 + 3 + 5 + 7) / 4 = 4" in out
    assert out.count("✓ equals") == 8
    code, out, _ = run_cli(["explain", "--image"], capsys)
    assert code == 0
    assert "batchnorm.BatchNorm2d" in out
    code, out, _ = run_cli(
        ["explain", "--batch", "1 2; 3 6", "--gamma", "2, 3", "--beta", "0 1", "--momentum", "0.5"],
        capsys,
    )
    assert code == 0
    assert "with γ = (2, 3), β = (0, 1)" in out
    assert "running_mean = (1 − 0.5)·0 + 0.5·μ = (1, 2)" in out
    code, out, _ = run_cli(["explain", "--help"], capsys)
    assert code == 0
    assert "calibrate --show" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["explain", "--batch", "1 2"], "more than 1 value per channel when training"),
        (["explain", "--batch", "1 2; 3"], "every row needs the same number of features"),
        (["explain", "--batch", "1 a; 2 3"], "--batch: expected numbers"),
        (["explain", "--gamma", "1 2"], "gamma: expected 3 values (one per channel), got 2"),
        (["explain", "--momentum", "2"], "momentum: expected a number in (0, 1]"),
        (["explain", "--image", "--batch", "1; 2"], "not allowed with argument"),
    ],
)
def test_explain_bad_arguments_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert message in err
    assert "batchnorm explain: error:" in err
    assert out == ""


#: Runs ``batchnorm ARGS`` with the import of one module made to fail, as after a plain
#: ``pip install batchnorm`` without the ``lab`` extra.
BLOCKED_IMPORT = """
import importlib.abc
import sys

BLOCKED = sys.argv.pop(1)


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == BLOCKED or name.startswith(BLOCKED + "."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Blocker())
from batchnorm import cli

sys.exit(cli.main(sys.argv[1:]))
"""


def run_without(module: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(SOURCE)}
    return subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORT, module, *args],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "data", "name"),
    [("matplotlib", "digits", "matplotlib"), ("sklearn", "digits", "scikit-learn")],
)
def test_lab_without_the_lab_extra(module: str, data: str, name: str, tmp_path: Path) -> None:
    out = tmp_path / "report"
    done = run_without(module, ["lab", "--quick", "--data", data, "--out", str(out)])
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"batchnorm lab needs {name} (No module named '{module}')")
    assert lines[0].endswith("install the lab extra: pip install 'batchnorm[lab]'")
    assert "Traceback" not in done.stderr
    assert not out.exists()


@pytest.mark.slow
def test_explain_and_version_need_no_lab_extra() -> None:
    done = run_without("matplotlib", ["explain"])
    assert done.returncode == 0, done.stderr
    assert "every step agrees with the library" in done.stdout
    done = run_without("matplotlib", ["--version"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("batchnorm ")


def test_the_blocker_blocks() -> None:
    """The simulation itself: with matplotlib blocked, importing it fails in that process."""
    script = BLOCKED_IMPORT.replace("from batchnorm import cli", "import matplotlib")
    done = subprocess.run(
        [sys.executable, "-c", script, "matplotlib"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 1
    assert "ModuleNotFoundError: No module named 'matplotlib'" in done.stderr


class ImportsWithout:
    """Stands in for ``importlib`` in the CLI: importing ``missing`` fails, the rest imports."""

    def __init__(self, missing: str) -> None:
        self.missing = missing

    def import_module(self, name: str) -> object:
        if name == self.missing:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return importlib.import_module(name)


@pytest.mark.parametrize(
    ("missing", "data", "name"),
    [("matplotlib", "digits", "matplotlib"), ("sklearn", "digits", "scikit-learn"),
     ("mnist1d", "mnist1d", "mnist1d")],
)  # fmt: skip
def test_missing_extra_in_process(
    missing: str,
    data: str,
    name: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.setattr(cli, "importlib", ImportsWithout(missing))
    code, out, err = run_cli(
        ["lab", "--quick", "--data", data, "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2
    assert out == ""
    assert err == (
        f"batchnorm lab needs {name} (No module named '{missing}'): install the lab extra: "
        "pip install 'batchnorm[lab]'\n"
    )
    assert not (tmp_path / "o").exists()
    needs_matplotlib = cli.lab_requirements_missing("mnist")  # mnist needs no module of its own
    assert (needs_matplotlib is None) == (missing != "matplotlib")


def test_nothing_missing_here() -> None:
    assert cli.lab_requirements_missing("digits") is None
