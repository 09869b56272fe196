"""Check 1 of the chain: the NumPy reference vs finite differences and vs torch autograd (float64).

The reference (:mod:`batchnorm.reference`) is the yardstick for everything else, so it is checked
here against computations that share no code with it: central finite differences of a scalar loss,
and torch autograd through the textbook formula ``(x − mean) / sqrt(var + eps)·w + b``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchnorm import reference

EPS = 1e-5


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _problem(shape: tuple[int, ...], seed: int = 0):
    """Random float64 ``x``, ``weight``, ``bias`` and upstream gradient ``dy``."""
    rng = _rng(seed)
    channels = shape[1]
    x = rng.standard_normal(shape)
    weight = rng.standard_normal(channels) + 1.5  # away from 0 so dx is not trivially small
    bias = rng.standard_normal(channels)
    dy = rng.standard_normal(shape)
    return x, weight, bias, dy


def _rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Norm-wise relative error ``‖a − e‖ / max(‖a‖, ‖e‖)``."""
    scale = max(np.linalg.norm(actual), np.linalg.norm(expected), 1e-300)
    return float(np.linalg.norm(actual - expected) / scale)


def _numerical_grad(f, array: np.ndarray, h: float = 1e-3) -> np.ndarray:
    """Central finite differences of scalar ``f`` w.r.t. ``array`` (five-point stencil, O(h⁴)).

    ``f'(a) ≈ (−f(a+2h) + 8 f(a+h) − 8 f(a−h) + f(a−2h)) / 12h``; with h = 1e-3 the truncation
    error is ~1e-12 and the rounding error ~1e-13, far below the 1e-8 asserted.
    """
    grad = np.zeros_like(array)
    flat = array.reshape(-1)  # a view: writes go to ``array``
    for i in range(flat.size):
        original = flat[i]
        values = []
        for step in (2 * h, h, -h, -2 * h):
            flat[i] = original + step
            values.append(f())
        flat[i] = original
        f2, f1, fm1, fm2 = values
        grad.reshape(-1)[i] = (-f2 + 8 * f1 - 8 * fm1 + fm2) / (12 * h)
    return grad


@pytest.mark.parametrize("shape", [(4, 3, 5), (3, 2), (2, 2, 2, 3)])
def test_backward_matches_finite_differences(shape: tuple[int, ...]) -> None:
    x, weight, bias, dy = _problem(shape, seed=1)

    def loss() -> float:
        y, _ = reference.forward(x, weight, bias, EPS)
        return float(np.sum(y * dy))  # dL/dy = dy

    _, cache = reference.forward(x, weight, bias, EPS)
    dx, dweight, dbias = reference.backward(dy, cache)

    assert _rel_error(dx, _numerical_grad(loss, x)) < 1e-8
    assert _rel_error(dweight, _numerical_grad(loss, weight)) < 1e-8
    assert _rel_error(dbias, _numerical_grad(loss, bias)) < 1e-8


def _torch_batch_norm(x, weight, bias, eps):
    """Textbook training-mode batch norm with torch ops (independent of the library)."""
    dims = [0, *range(2, x.dim())]
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)  # biased
    x_hat = (x - mean) / torch.sqrt(var + eps)
    y = x_hat * weight.reshape(shape) + bias.reshape(shape)
    return y, mean.reshape(-1), var.reshape(-1), x_hat


@pytest.mark.parametrize("shape", [(4, 3, 5), (3, 2), (2, 3, 4, 5), (2, 2, 3, 2, 2), (2, 1, 1)])
def test_matches_torch_autograd_float64(shape: tuple[int, ...]) -> None:
    x, weight, bias, dy = _problem(shape, seed=2)
    y, cache = reference.forward(x, weight, bias, EPS)
    dx, dweight, dbias = reference.backward(dy, cache)

    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, weight, bias))
    yt, mean_t, var_t, x_hat_t = _torch_batch_norm(xt, wt, bt, EPS)
    dxt, dwt, dbt = torch.autograd.grad(yt, (xt, wt, bt), torch.tensor(dy))

    opts = {"rtol": 1e-12, "atol": 1e-12}
    assert y.dtype == np.float64
    assert y.shape == x.shape
    np.testing.assert_allclose(y, yt.detach().numpy(), **opts)
    np.testing.assert_allclose(cache.mean, mean_t.detach().numpy(), **opts)
    np.testing.assert_allclose(cache.var, var_t.detach().numpy(), **opts)
    np.testing.assert_allclose(cache.invstd, 1 / np.sqrt(var_t.detach().numpy() + EPS), **opts)
    np.testing.assert_allclose(cache.x_hat, x_hat_t.detach().numpy(), **opts)
    np.testing.assert_allclose(dx, dxt.numpy(), **opts)
    np.testing.assert_allclose(dweight, dwt.numpy(), **opts)
    np.testing.assert_allclose(dbias, dbt.numpy(), **opts)
    assert dx.shape == x.shape
    assert dweight.shape == (shape[1],)
    assert dbias.shape == (shape[1],)


def test_forward_matches_torch_functional_float64() -> None:
    """Same numbers as ``F.batch_norm`` (a third, compiled implementation)."""
    x, weight, bias, _ = _problem((5, 4, 3, 2), seed=3)
    y, _ = reference.forward(x, weight, bias, 1e-3)
    expected = torch.nn.functional.batch_norm(
        torch.tensor(x), None, None, torch.tensor(weight), torch.tensor(bias), True, 0.1, 1e-3
    )
    np.testing.assert_allclose(y, expected.numpy(), rtol=1e-12, atol=1e-12)


def test_float32_input_returns_float32() -> None:
    x64, weight, bias, dy64 = _problem((4, 3, 5), seed=4)
    x32, dy32 = x64.astype(np.float32), dy64.astype(np.float32)
    y32, cache32 = reference.forward(x32, weight.astype(np.float32), bias.astype(np.float32), EPS)
    dx32, dw32, db32 = reference.backward(dy32, cache32)
    assert y32.dtype == np.float32
    assert y32.shape == x32.shape
    assert dx32.dtype == np.float32
    assert dx32.shape == x32.shape

    # Same values as float64 on the float32-rounded inputs, to float32 accuracy.
    y64, cache64 = reference.forward(
        x32.astype(np.float64), weight.astype(np.float32).astype(np.float64),
        bias.astype(np.float32).astype(np.float64), EPS,
    )  # fmt: skip
    dx64, dw64, db64 = reference.backward(dy32.astype(np.float64), cache64)
    np.testing.assert_allclose(y32, y64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx32, dx64, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dw32, dw64, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(db32, db64, rtol=1e-4, atol=1e-5)


def test_variance_is_two_pass_precise_with_large_offset() -> None:
    """|μ| ≫ σ: E[x²] − E[x]² would lose every digit; the two-pass variance keeps them."""
    rng = _rng(5)
    offset = 1e8
    deviation = rng.standard_normal((64, 2, 8))
    x = offset + deviation  # representable to ~1.5e-8, so x − offset is exact below
    _, cache = reference.forward(x, np.ones(2), np.zeros(2), EPS)
    exact = np.var(x - offset, axis=(0, 2))
    np.testing.assert_allclose(cache.var, exact, rtol=1e-6)
    np.testing.assert_allclose(cache.mean, offset + np.mean(x - offset, axis=(0, 2)), rtol=1e-15)


def test_forward_does_not_modify_inputs() -> None:
    x, weight, bias, dy = _problem((3, 2, 4), seed=6)
    copies = [a.copy() for a in (x, weight, bias, dy)]
    _, cache = reference.forward(x, weight, bias, EPS)
    reference.backward(dy, cache)
    for original, copy in zip((x, weight, bias, dy), copies, strict=True):
        np.testing.assert_array_equal(original, copy)


# --------------------------------------------------------------------------- update_running


def _batch_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    x3 = x.reshape(x.shape[0], x.shape[1], -1)
    count = x3.shape[0] * x3.shape[2]
    return x3.mean(axis=(0, 2)), x3.var(axis=(0, 2)), count


def test_update_running_with_momentum_matches_formula() -> None:
    rng = _rng(7)
    running_mean = rng.standard_normal(3)
    running_var = rng.random(3) + 0.5
    before = (running_mean.copy(), running_var.copy())
    x = rng.standard_normal((4, 3, 5)) * 2 + 1
    mean, var_biased, count = _batch_stats(x)

    new_mean, new_var, tracked = reference.update_running(
        running_mean, running_var, mean, var_biased, count, 0.1, 7
    )

    var_unbiased = np.var(x.reshape(4, 3, 5), axis=(0, 2), ddof=1)  # Bessel: divide by M − 1
    np.testing.assert_allclose(new_mean, 0.9 * running_mean + 0.1 * mean, rtol=1e-14)
    np.testing.assert_allclose(new_var, 0.9 * running_var + 0.1 * var_unbiased, rtol=1e-14)
    assert tracked == 8
    # Pure: the given arrays are untouched.
    np.testing.assert_array_equal(running_mean, before[0])
    np.testing.assert_array_equal(running_var, before[1])


def test_update_running_momentum_none_is_cumulative_average() -> None:
    rng = _rng(8)
    running_mean, running_var, tracked = np.zeros(2), np.ones(2), 0
    means, unbiased_vars = [], []
    for step in range(1, 6):
        x = rng.standard_normal((3, 2, 4)) * step + step
        mean, var_biased, count = _batch_stats(x)
        running_mean, running_var, tracked = reference.update_running(
            running_mean, running_var, mean, var_biased, count, None, tracked
        )
        means.append(mean)
        unbiased_vars.append(np.var(x, axis=(0, 2), ddof=1))
        assert tracked == step
        # After k batches (starting from 0 counted), the running values are plain averages.
        np.testing.assert_allclose(running_mean, np.mean(means, axis=0), rtol=1e-13)
        np.testing.assert_allclose(running_var, np.mean(unbiased_vars, axis=0), rtol=1e-13)


def test_update_running_momentum_none_uses_batches_already_tracked() -> None:
    running_mean, running_var = np.array([1.0, 2.0]), np.array([3.0, 4.0])
    mean, var_biased = np.array([5.0, 6.0]), np.array([0.5, 1.0])
    new_mean, new_var, tracked = reference.update_running(
        running_mean, running_var, mean, var_biased, 4, None, 3
    )
    factor = 1 / 4  # this batch is the 4th
    np.testing.assert_allclose(new_mean, (1 - factor) * running_mean + factor * mean)
    np.testing.assert_allclose(new_var, (1 - factor) * running_var + factor * var_biased * 4 / 3)
    assert tracked == 4


def test_update_running_keeps_dtype() -> None:
    rm, rv = np.zeros(2, dtype=np.float32), np.ones(2, dtype=np.float32)
    new_mean, new_var, _ = reference.update_running(
        rm, rv, np.array([1.0, 2.0]), np.array([1.0, 1.0]), 2, 0.5, 0
    )
    assert new_mean.dtype == np.float32
    assert new_var.dtype == np.float32
    np.testing.assert_allclose(new_mean, [0.5, 1.0])
    np.testing.assert_allclose(new_var, [1.5, 1.5])  # 0.5·1 + 0.5·(1·2/1)


@pytest.mark.parametrize("count", [1, 0])
def test_update_running_rejects_count_below_two(count: int) -> None:
    with pytest.raises(ValueError, match="count"):
        reference.update_running(np.zeros(2), np.ones(2), np.zeros(2), np.ones(2), count, 0.1, 0)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", ["weight", "bias"])
@pytest.mark.parametrize("length", [2, 4])
def test_forward_rejects_per_channel_of_wrong_length(name: str, length: int) -> None:
    x, weight, bias, _ = _problem((4, 3, 5))
    args = {"weight": weight, "bias": bias}
    args[name] = np.ones(length)
    with pytest.raises(ValueError, match=name):
        reference.forward(x, args["weight"], args["bias"], EPS)


def test_forward_rejects_2d_weight() -> None:
    x, weight, bias, _ = _problem((4, 3, 5))
    with pytest.raises(ValueError, match="weight"):
        reference.forward(x, weight[None, :], bias, EPS)


def test_forward_rejects_1d_input() -> None:
    with pytest.raises(ValueError, match="x"):
        reference.forward(np.ones(4), np.ones(4), np.zeros(4), EPS)


def test_backward_rejects_dy_of_wrong_shape() -> None:
    x, weight, bias, dy = _problem((4, 3, 5))
    _, cache = reference.forward(x, weight, bias, EPS)
    with pytest.raises(ValueError, match="dy"):
        reference.backward(dy[:, :, :4], cache)
