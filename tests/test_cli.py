"""The ``batchnorm`` command: help, argument errors (exit code 2 with a message), a quick run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from batchnorm import cli
from batchnorm.lab.data import DATASETS
from batchnorm.lab.experiments import EXPERIMENTS
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
