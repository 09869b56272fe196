"""Masked batch norm (padded batches) against batch norm of the unpadded values, in float64.

The independent side is ``torch.nn.functional.batch_norm`` applied to the real values only
(gathered into a dense ``(M, C)`` tensor), with torch autograd for the gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from batchnorm.functional import batch_norm, batch_norm_pure
from batchnorm.modules import BatchNorm1d

EPS = 1e-5


def _padded(batch: int = 5, channels: int = 3, length: int = 7, seed: int = 0):
    """A float64 ``(N, C, L)`` batch, a mask with different lengths per row, NaN at padding."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, length, generator=gen, dtype=torch.float64) * 2 + 1
    lengths = torch.tensor([7, 3, 5, 1, 6][:batch])
    mask = torch.arange(length)[None, :] < lengths[:, None]  # (N, L)
    x = torch.where(mask[:, None, :], x, torch.nan)  # padding holds garbage
    return x, mask


def _dense(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The real values of ``x`` ``(N, C, L)`` as ``(M, C)``."""
    return x.permute(0, 2, 1)[mask]


def test_training_matches_batch_norm_of_real_values_with_gradients():
    x, mask = _padded()
    channels = x.shape[1]
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(channels, generator=gen, dtype=torch.float64) + 1.5
    bias = torch.randn(channels, generator=gen, dtype=torch.float64)
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)

    x1, w1, b1 = (t.clone().requires_grad_() for t in (x, weight, bias))
    mean1, var1 = (
        torch.zeros(channels, dtype=torch.float64),
        torch.ones(channels, dtype=torch.float64),
    )
    y = batch_norm(x1, mean1, var1, w1, b1, training=True, momentum=0.3, eps=EPS, mask=mask)
    (y * torch.nan_to_num(dy)).sum().backward()

    x2, w2, b2 = (t.clone().requires_grad_() for t in (x, weight, bias))
    dense = _dense(x2, mask)  # (M, C)
    mean2, var2 = (
        torch.zeros(channels, dtype=torch.float64),
        torch.ones(channels, dtype=torch.float64),
    )
    expected = F.batch_norm(dense, mean2, var2, w2, b2, training=True, momentum=0.3, eps=EPS)
    (expected * _dense(dy, mask)).sum().backward()

    torch.testing.assert_close(_dense(y, mask), expected)
    assert torch.equal(y.permute(0, 2, 1)[~mask], torch.zeros_like(y.permute(0, 2, 1)[~mask]))
    torch.testing.assert_close(mean1, mean2)
    torch.testing.assert_close(var1, var2)
    torch.testing.assert_close(_dense(x1.grad, mask), _dense(x2.grad, mask))
    assert torch.equal(
        x1.grad.permute(0, 2, 1)[~mask],
        torch.zeros(int((~mask).sum()), channels, dtype=torch.float64),
    )
    torch.testing.assert_close(w1.grad, w2.grad)
    torch.testing.assert_close(b1.grad, b2.grad)


def test_evaluation_uses_running_statistics_and_zero_padding():
    x, mask = _padded(seed=2)
    mean = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    var = torch.tensor([1.5, 0.7, 3.0], dtype=torch.float64)
    out = batch_norm_pure(x, mean, var, training=False, mask=mask)
    expected = F.batch_norm(_dense(x, mask), mean, var, training=False, eps=EPS)
    torch.testing.assert_close(_dense(out.output, mask), expected)
    assert out.running_mean is mean
    assert out.running_var is var
    assert not out.output.isnan().any()


def test_module_mask_matches_torch_module_on_real_values():
    x, mask = _padded(seed=3)
    x = x.float()
    ours = BatchNorm1d(3)
    theirs = torch.nn.BatchNorm1d(3)
    for _ in range(3):
        y = ours(x, mask=mask)
        expected = theirs(_dense(x, mask))
    torch.testing.assert_close(_dense(y, mask), expected)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)


def test_two_dimensional_input_masks_rows():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    mask = torch.tensor([True, True, False, True, False, True])
    y = batch_norm(x, None, None, training=True, mask=mask)
    torch.testing.assert_close(y[mask], F.batch_norm(x[mask], None, None, training=True))
    assert torch.equal(y[~mask], torch.zeros(2, 4, dtype=torch.float64))


def test_low_precision_input_gives_its_dtype():
    x, mask = _padded(seed=5)
    y = batch_norm(x.to(torch.bfloat16), None, None, training=True, mask=mask)
    assert y.dtype == torch.bfloat16
    expected = F.batch_norm(_dense(x.to(torch.bfloat16).double(), mask), None, None, training=True)
    torch.testing.assert_close(_dense(y, mask).double(), expected, atol=2e-2, rtol=2e-2)


def test_all_padding_leaves_statistics_and_gives_zeros():
    x = torch.randn(3, 2, 4)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mean, var = torch.zeros(2), torch.ones(2)
    y = batch_norm(x, mean, var, training=True, mask=mask)
    assert torch.equal(y, torch.zeros_like(x))
    assert torch.equal(mean, torch.zeros(2))
    assert torch.equal(var, torch.ones(2))


@pytest.mark.parametrize(
    ("mask", "error", "match"),
    [
        (torch.ones(3, 4), TypeError, "torch.bool"),
        (torch.ones(3, 5, dtype=torch.bool), ValueError, r"expected shape \(3, 4\)"),
        ("mask", TypeError, "torch.bool"),
        (torch.arange(12).reshape(3, 4) == 0, ValueError, "1 real value"),
    ],
)
def test_bad_masks_are_rejected_and_buffers_kept(mask, error, match):
    x = torch.randn(3, 2, 4)
    bn = BatchNorm1d(2)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(error, match=match):
        bn(x, mask=mask)
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_empty_batch_keeps_statistics():
    mean, var = torch.zeros(2), torch.ones(2)
    y = batch_norm(
        torch.randn(0, 2, 3), mean, var, training=True, mask=torch.ones(0, 3, dtype=torch.bool)
    )
    assert y.shape == (0, 2, 3)
    assert torch.equal(mean, torch.zeros(2))
