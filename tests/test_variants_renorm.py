"""Batch renormalization against a direct float64 re-implementation of Ioffe (2017), Alg. 1."""

from __future__ import annotations

import pytest
import torch

from batchnorm.modules import BatchNorm2d
from batchnorm.variants.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, renorm_limits

EPS = 1e-5


def _paper_renorm(x, running_mean, running_var, gamma, beta, r_max, d_max, momentum):
    """Algorithm 1 of the paper, written out: returns ``y`` and the new ``(μ, σ²)`` estimates."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mu_b = x.mean(dims)
    sigma_b = torch.sqrt(x.var(dims, unbiased=False) + EPS)
    sigma = torch.sqrt(running_var + EPS)
    r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()  # stop_gradient
    d = ((mu_b - running_mean) / sigma).clamp(-d_max, d_max).detach()  # stop_gradient
    x_hat = (x - mu_b.view(shape)) / sigma_b.view(shape) * r.view(shape) + d.view(shape)
    y = gamma.view(shape) * x_hat + beta.view(shape)
    count = x.numel() // x.shape[1]
    new_mean = running_mean + momentum * (mu_b.detach() - running_mean)
    new_var = running_var + momentum * (x.detach().var(dims) - running_var)  # unbiased, as BN
    assert count > 1
    return y, new_mean, new_var


@pytest.mark.parametrize(
    ("cls", "shape"),
    [(BatchRenorm1d, (16, 3)), (BatchRenorm2d, (4, 3, 3, 5)), (BatchRenorm3d, (2, 3, 2, 3, 2))],
)
def test_matches_paper_definition_with_gradients(cls, shape):
    gen = torch.Generator().manual_seed(0)
    channels = shape[1]
    layer = cls(
        channels,
        dtype=torch.float64,
        r_max=1.5,
        d_max=0.5,
        warmup_steps=0,
        r_max_steps=0,
        d_max_steps=0,
    )
    with torch.no_grad():  # population estimates far enough from the batch's to clip some r, d
        layer.running_mean.copy_(torch.tensor([0.0, 2.0, -1.0], dtype=torch.float64))
        layer.running_var.copy_(torch.tensor([1.0, 9.0, 0.2], dtype=torch.float64))
        layer.weight.copy_(torch.tensor([0.5, 1.5, -2.0], dtype=torch.float64))
        layer.bias.copy_(torch.tensor([0.1, -0.3, 0.2], dtype=torch.float64))
    mean, var = layer.running_mean.clone(), layer.running_var.clone()
    gamma = layer.weight.detach().clone().requires_grad_()
    beta = layer.bias.detach().clone().requires_grad_()
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 1.7 + 0.4).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)

    y = layer(x)
    (y * dy).sum().backward()
    expected, new_mean, new_var = _paper_renorm(x_ref, mean, var, gamma, beta, 1.5, 0.5, 0.1)
    (expected * dy).sum().backward()

    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.weight.grad, gamma.grad)
    torch.testing.assert_close(layer.bias.grad, beta.grad)
    torch.testing.assert_close(layer.running_mean, new_mean)
    torch.testing.assert_close(layer.running_var, new_var)
    assert int(layer.renorm_step) == 1
    assert int(layer.num_batches_tracked) == 1


def test_limits_one_and_zero_equal_batch_norm_exactly():
    gen = torch.Generator().manual_seed(1)
    renorm = BatchRenorm2d(4, r_max=1.0, d_max=0.0, warmup_steps=0, r_max_steps=0, d_max_steps=0)
    plain = BatchNorm2d(4)
    for step in range(3):
        x = torch.randn(5, 4, 3, 3, generator=gen) * (step + 1) + step
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = renorm(xa), plain(xb)
        dy = torch.randn(ya.shape, generator=gen)
        (ya * dy).sum().backward()
        (yb * dy).sum().backward()
        assert torch.equal(ya, yb)
        assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(renorm.weight.grad, plain.weight.grad)
    assert torch.equal(renorm.bias.grad, plain.bias.grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(renorm, name), getattr(plain, name)), name
    renorm.eval()
    plain.eval()
    x = torch.randn(2, 4, 3, 3, generator=gen)
    assert torch.equal(renorm(x), plain(x))


def test_schedule_follows_the_paper():
    # Paper: r_max 1 → 3 reached at 40k steps, d_max 0 → 5 at 25k, after 5k warm-up steps.
    args = (3.0, 5.0, 5000, 40000, 25000)
    assert renorm_limits(0, *args) == (1.0, 0.0)
    assert renorm_limits(4999, *args) == (1.0, 0.0)
    assert renorm_limits(5000, *args) == (1.0, 0.0)
    r_max, d_max = renorm_limits(22500, *args)
    assert r_max == pytest.approx(1.0 + 2.0 * 17500 / 35000)
    assert d_max == pytest.approx(5.0 * 17500 / 20000)
    assert renorm_limits(40000, *args) == (3.0, 5.0)
    assert renorm_limits(10**6, *args) == (3.0, 5.0)


def test_warmup_is_plain_batch_norm_then_renormalizes():
    gen = torch.Generator().manual_seed(2)
    renorm = BatchRenorm1d(3, warmup_steps=2, r_max_steps=3, d_max_steps=3)
    plain = BatchNorm2d(3)
    x = torch.randn(8, 3, generator=gen) * 3 + 2
    for _ in range(2):
        assert torch.equal(renorm(x), plain(x[..., None, None]).reshape(8, 3))
    assert renorm.current_limits() == (1.0, 0.0)
    renorm(x)  # step 2: progress (2-2)/(3-2) = 0
    assert renorm.current_limits() == (3.0, 5.0)
    assert int(renorm.renorm_step) == 3
    state = renorm.state_dict()
    assert set(state) == {
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
        "renorm_step",
    }
    fresh = BatchRenorm1d(3, warmup_steps=2, r_max_steps=3, d_max_steps=3)
    fresh.load_state_dict(state)
    assert fresh.current_limits() == (3.0, 5.0)
    fresh.reset_running_stats()
    assert int(fresh.renorm_step) == 0


def test_affine_false_and_frozen_stats():
    gen = torch.Generator().manual_seed(3)
    layer = BatchRenorm1d(
        2, affine=False, dtype=torch.float64, warmup_steps=0, r_max_steps=0, d_max_steps=0
    )
    with torch.no_grad():
        layer.running_var.fill_(4.0)
    x = torch.randn(10, 2, generator=gen, dtype=torch.float64)
    expected, _, _ = _paper_renorm(
        x,
        torch.zeros(2, dtype=torch.float64),
        torch.full((2,), 4.0, dtype=torch.float64),
        torch.ones(2, dtype=torch.float64),
        torch.zeros(2, dtype=torch.float64),
        3.0,
        5.0,
        0.1,
    )
    layer.freeze_stats = True
    torch.testing.assert_close(layer(x), expected)
    assert int(layer.renorm_step) == 0
    assert torch.equal(layer.running_var, torch.full((2,), 4.0, dtype=torch.float64))
    assert "r_max=3.0" in repr(layer)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r_max": 0.5}, "r_max"),
        ({"d_max": -1.0}, "d_max"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"r_max_steps": 1.5}, "r_max_steps"),
        ({"track_running_stats": False}, "track_running_stats"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchRenorm1d(3, **kwargs)


def test_input_checks_keep_buffers():
    layer = BatchRenorm2d(3, warmup_steps=0, r_max_steps=0, d_max_steps=0)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="channels"):
        layer(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="more than 1 value"):
        layer(torch.randn(1, 3, 1, 1))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
