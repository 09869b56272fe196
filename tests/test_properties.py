"""Check 4 of the chain: properties that hold for any input (hypothesis), for every backend.

* training with γ = 1, β = 0 gives per-channel mean 0 and biased variance σ²/(σ² + ε) (≈ 1);
* evaluation leaves the running buffers bit-identical;
* a large offset (mean 1e4, std 1, float32) keeps the batch variance to 1e-3 relative;
* the output is invariant to a per-channel positive scale and shift of the input;
* evaluation with the batch's own statistics reproduces the training output.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import batchnorm
from batchnorm.backends import resolve_backend
from batchnorm.functional import batch_norm
from conftest import BACKENDS, assert_bit_identical, buffers_of, make_input, per_channel

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure is reproducible in CI
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@st.composite
def shapes(draw, min_values: int = 2) -> tuple[int, ...]:
    """(N, C, *spatial) with 0–3 spatial dims and at least ``min_values`` values per channel."""
    n = draw(st.integers(1, 6))
    c = draw(st.integers(1, 4))
    spatial = draw(st.lists(st.integers(1, 4), min_size=0, max_size=3))
    shape = (n, c, *spatial)
    per_channel_count = n
    for s in spatial:
        per_channel_count *= s
    assume(per_channel_count >= min_values)
    return shape


def _channels_last_if_possible(shape: tuple[int, ...], want: bool) -> str:
    return "channels_last" if want and len(shape) in (4, 5) else "contiguous"


def _per_channel_stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) per channel, in float64."""
    t3 = t.detach().double().reshape(t.shape[0], t.shape[1], -1)
    return t3.mean(dim=(0, 2)), t3.var(dim=(0, 2), correction=0)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(
    shape=shapes(),
    seed=st.integers(0, 2**16),
    scale=st.floats(0.1, 100.0),
    offset=st.floats(-100.0, 100.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    channels_last=st.booleans(),
)
def test_training_output_is_standardized(backend, shape, seed, scale, offset, dtype, channels_last):
    memory_format = _channels_last_if_possible(shape, channels_last)
    x = make_input(shape, memory_format, dtype, seed=seed, scale=scale, offset=offset)
    _, var_in = _per_channel_stats(x)
    assume(bool((var_in > 1e-2).all()))  # input variance not tiny against eps = 1e-5
    eps = 1e-5
    y = batch_norm(x, None, None, training=True, eps=eps, backend=backend)
    mean_out, var_out = _per_channel_stats(y)
    atol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(mean_out, torch.zeros_like(mean_out), atol=atol * 10, rtol=0)
    # Exactly σ²/(σ² + ε) in exact arithmetic; within 1e-3 of 1 since σ² > 1e-2 = 1000·ε.
    torch.testing.assert_close(var_out, var_in / (var_in + eps), atol=atol * 10, rtol=atol * 10)
    torch.testing.assert_close(var_out, torch.ones_like(var_out), atol=1.1e-3, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(shape=shapes(min_values=1), seed=st.integers(0, 2**16), channels_last=st.booleans())
def test_eval_leaves_buffers_bit_identical(backend, shape, seed, channels_last):
    family = {2: 1, 3: 1, 4: 2, 5: 3}[len(shape)]
    module_cls = {1: batchnorm.BatchNorm1d, 2: batchnorm.BatchNorm2d, 3: batchnorm.BatchNorm3d}
    channels = shape[1]
    module = module_cls[family](channels, momentum=None, backend=backend)
    with torch.no_grad():
        module.running_mean.copy_(per_channel(channels, seed=seed))
        module.running_var.copy_(per_channel(channels, seed=seed + 1, positive=True))
        module.num_batches_tracked.fill_(seed % 7)
    module.eval()
    before = buffers_of(module)
    x = make_input(shape, _channels_last_if_possible(shape, channels_last), seed=seed)
    module(x)
    module(x.requires_grad_()).sum().backward()
    assert_bit_identical(before, buffers_of(module))

    # The functional in evaluation mode too.
    rm, rv = before["running_mean"].clone(), before["running_var"].clone()
    batch_norm(x, rm, rv, training=False, backend=backend)
    assert torch.equal(rm, before["running_mean"])
    assert torch.equal(rv, before["running_var"])


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(
    n=st.integers(2, 64),
    c=st.integers(1, 3),
    length=st.integers(1, 32),
    seed=st.integers(0, 2**16),
    offset=st.sampled_from([1e4, -1e4, 3e4]),
)
def test_large_offset_keeps_variance_precise(backend, n, c, length, seed, offset):
    """x = 1e4 + randn in float32: E[x²] − E[x]² would lose every digit; we keep 1e-3."""
    x = make_input((n, c, length), dtype=torch.float32, seed=seed, offset=offset)
    count = n * length
    _, exact = _per_channel_stats(x)  # float64 variance of the very same float32 values
    assume(bool((exact > 0.05).all()))

    # Straight from the backend's forward ...
    result = resolve_backend(backend, x.device).forward(x, None, None, 1e-5)
    torch.testing.assert_close(result.var.double(), exact, rtol=1e-3, atol=0)

    # ... and through the running-variance update with momentum = 1 (it stores σ²·M/(M − 1)).
    rm, rv = torch.zeros(c), torch.ones(c)
    y = batch_norm(x, rm, rv, training=True, momentum=1.0, backend=backend)
    torch.testing.assert_close(rv.double() * (count - 1) / count, exact, rtol=1e-3, atol=0)
    torch.testing.assert_close(rm.double(), x.double().mean(dim=(0, 2)), rtol=1e-6, atol=0)
    _, var_out = _per_channel_stats(y)
    torch.testing.assert_close(var_out, torch.ones_like(var_out), atol=2e-3, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(
    shape=shapes(),
    seed=st.integers(0, 2**16),
    log_scale=st.floats(-1.0, 1.0),
    shift=st.floats(-10.0, 10.0),
)
def test_invariant_to_per_channel_scale_and_shift(backend, shape, seed, log_scale, shift):
    x = make_input(shape, dtype=torch.float64, seed=seed)
    _, var_in = _per_channel_stats(x)
    assume(bool((var_in > 1e-2).all()))
    channel_shape = [1, shape[1]] + [1] * (len(shape) - 2)
    factors = 10.0 ** (log_scale * torch.linspace(0.5, 1.0, shape[1], dtype=torch.float64))
    moved = x * factors.reshape(channel_shape) + shift
    eps = 1e-12  # so eps does not break the invariance at the tolerance below
    y = batch_norm(x, None, None, training=True, eps=eps, backend=backend)
    y_moved = batch_norm(moved, None, None, training=True, eps=eps, backend=backend)
    torch.testing.assert_close(y_moved, y, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(shape=shapes(), seed=st.integers(0, 2**16))
def test_eval_with_batch_statistics_equals_training(backend, shape, seed):
    x = make_input(shape, dtype=torch.float64, seed=seed, scale=2.0, offset=3.0)
    weight = per_channel(shape[1], torch.float64, seed=seed)
    bias = per_channel(shape[1], torch.float64, seed=seed + 1)
    mean, var = _per_channel_stats(x)
    y_train = batch_norm(x, None, None, weight, bias, training=True, backend=backend)
    y_eval = batch_norm(x, mean, var, weight, bias, training=False, backend=backend)
    torch.testing.assert_close(y_train, y_eval, atol=1e-9, rtol=1e-9)
