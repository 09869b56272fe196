"""The worked example (``batchnorm explain``): its numbers against NumPy and the paper's formulas,
its checks against the library (and that they catch a wrong layer), its text, its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchnorm import cli
from batchnorm.lab import explain
from batchnorm.lab.experiments import BUDGETS, LabContext
from batchnorm.modules import BatchNorm1d


def test_default_example_numbers() -> None:
    """Against NumPy in float64: column statistics, ddof=0 for normalizing, ddof=1 for running."""
    x = np.array(explain.DEFAULT_BATCH)  # (4, 3)
    gamma, beta = np.array(explain.DEFAULT_GAMMA), np.array(explain.DEFAULT_BETA)
    example = explain.worked_example()
    assert example.shape == (4, 3)
    np.testing.assert_allclose(example.mean, [4.0, 4.0, 11.5])
    np.testing.assert_allclose(example.var, x.var(axis=0, ddof=0))
    np.testing.assert_allclose(example.var, [5.0, 6.0, 1.25])
    np.testing.assert_allclose(example.var_unbiased, x.var(axis=0, ddof=1))
    x_hat = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)  # (4, 3)
    np.testing.assert_allclose(np.array(example.x_hat).T, x_hat, rtol=1e-12)
    np.testing.assert_allclose(np.array(example.y).T, gamma * x_hat + beta, rtol=1e-12)
    np.testing.assert_allclose(example.running_mean, 0.1 * x.mean(0))
    np.testing.assert_allclose(example.running_var, 0.9 + 0.1 * x.var(0, ddof=1))
    y_eval = gamma * (x - 0.1 * x.mean(0)) / np.sqrt(0.9 + 0.1 * x.var(0, ddof=1) + 1e-5) + beta
    np.testing.assert_allclose(np.array(example.y_eval).T, y_eval, rtol=1e-12)
    np.testing.assert_allclose(example.layer_norm_mean, x.mean(axis=1))
    assert example.ok
    assert [check.name for check in example.checks] == [
        "batch mean",
        "biased variance",
        "normalized values",
        "γ·x̂ + β",
        "running mean",
        "running variance",
        "evaluation output",
        "layer norm",
    ]
    assert example.largest_error < 1e-12


def test_the_text_shows_each_step_and_its_check() -> None:
    text = explain.worked_example().text()
    for line in (
        "f0: μ = (1 + 3 + 5 + 7) / 4 = 4",
        "f0: σ² = ((1 − 4)² + (3 − 4)² + (5 − 4)² + (7 − 4)²) / 4 = 20 / 4 = 5",
        "f0: mean of x̂ = 0.000000, variance of x̂ = 0.999998",
        "running_mean = (1 − 0.1)·0 + 0.1·μ = (0.4, 0.4, 1.15)",
        "σ²·4/3 = (6.667, 8, 1.667)",
        "running_var = (1 − 0.1)·1 + 0.1·σ²·M/(M − 1) = (1.567, 1.7, 1.067)",
        "row means (4.333, 5.333, 7, 9.333) instead of column means (4, 4, 11.5)",
        "every step agrees with the library",
    ):
        assert line in text, line
    assert text.count("✓ equals") == 8
    assert "✗" not in text


def test_image_batch_goes_through_batchnorm2d() -> None:
    example = explain.worked_example(explain.DEFAULT_IMAGE)
    x = np.array(explain.DEFAULT_IMAGE)  # (2, 2, 2, 2)
    np.testing.assert_allclose(example.mean, x.mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(example.var, x.var(axis=(0, 2, 3)))
    assert example.ok
    assert "batchnorm.BatchNorm2d" in example.text()
    assert "M = N·H·W = 2·2·2 = 8 values" in example.text()
    assert example.layer_norm_mean == []


class UnbiasedBatchNorm1d(BatchNorm1d):
    """A wrong layer: normalizes with the unbiased variance (the classic mistake)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output = super().forward(input)  # running statistics as the library keeps them
        if not self.training:
            return output
        mean, var = input.mean(0), input.var(0, unbiased=True)  # (C,)
        y = (input - mean) / torch.sqrt(var + self.eps)  # (N, C)
        if self.affine:
            y = y * self.weight + self.bias
        return y


def test_the_checks_catch_a_wrong_layer(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(explain, "BatchNorm1d", UnbiasedBatchNorm1d)
    example = explain.worked_example()
    assert not example.ok
    failed = {check.name for check in example.checks if not check.ok}
    assert failed == {"normalized values", "γ·x̂ + β"}
    assert "✗ DIFFERS FROM" in example.text()
    assert "SOME STEPS DISAGREE" in example.text()
    assert cli.main(["explain"]) == 1
    assert "✗ DIFFERS FROM" in capsys.readouterr().out


def test_check_of_different_lengths_fails() -> None:
    check = explain.Check("x", (1.0, 2.0), (1.0,), "somewhere")
    assert check.error == float("inf")
    assert not check.ok


def test_custom_batch_defaults_gamma_one_beta_zero() -> None:
    example = explain.worked_example(explain.parse_batch("1, 2; 3 4; 5 9"))
    assert example.gamma == [1.0, 1.0]
    assert example.beta == [0.0, 0.0]
    assert example.y == example.x_hat
    assert example.ok


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: explain.worked_example([[1.0, 2.0]]), "more than 1 value per channel"),
        (lambda: explain.worked_example([1.0, 2.0]), r"shape \(N, C\) or \(N, C, H, W\)"),
        (lambda: explain.worked_example([[1.0], [2.0, 3.0]]), "rectangular"),
        (lambda: explain.worked_example(gamma=[1.0]), "gamma: expected 3 values"),
        (lambda: explain.worked_example(beta=[1.0] * 4), "beta: expected 3 values"),
        (lambda: explain.worked_example(momentum=0.0), r"momentum: expected a number in \(0, 1\]"),
        (lambda: explain.worked_example(eps=-1.0), "eps: expected a finite number ≥ 0"),
        (lambda: explain.worked_example(eps=float("nan")), "eps: expected a finite number ≥ 0"),
        (lambda: explain.worked_example([[1.0], [float("inf")]]), "batch: expected finite"),
        (lambda: explain.worked_example(beta=[0.0, float("nan"), 0.0]), "beta: expected finite"),
        (lambda: explain.parse_batch("1 2; 3"), "every row needs the same number of features"),
        (lambda: explain.parse_batch(" ; "), "expected rows separated by ';'"),
        (lambda: explain.parse_values("1 two", "--gamma"), "--gamma: expected numbers"),
        (lambda: explain.parse_values("", "--beta"), "--beta: expected at least one number"),
    ],
)
def test_bad_input_is_named(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_the_lab_section() -> None:
    result = explain.worked_example_experiment(LabContext(None, (0,), BUDGETS["quick"]))  # type: ignore[arg-type]
    assert result.key == "worked-example"
    assert (
        result.summary["steps that agree"]
        == result.summary["steps checked against the library"]
        == 8
    )
    assert result.summary["biased variance, f0"] == 5.0
    assert result.summary["unbiased variance (running update), f1"] == 8.0
    assert result.text == explain.worked_example().text()
    assert result.notes == []
    assert "8 of 8 steps agree" in result.effect


def test_the_lab_section_notes_a_disagreement(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(explain, "BatchNorm1d", UnbiasedBatchNorm1d)
    result = explain.worked_example_experiment(LabContext(None, (0,), BUDGETS["quick"]))  # type: ignore[arg-type]
    assert result.summary["steps that agree"] == 6
    assert result.notes == ["Some steps disagree with the library: see the text."]
