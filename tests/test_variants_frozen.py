"""Frozen batch norm against ``torch.nn.BatchNorm*`` in evaluation mode."""

from __future__ import annotations

import pytest
import torch

from batchnorm.modules import BatchNorm2d
from batchnorm.variants.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d


def _trained_torch_bn(cls, channels: int, shape, seed: int = 0):
    """A torch batch norm with non-trivial statistics and affine parameters, in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    bn = cls(channels)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=gen))
        bn.running_var.copy_(torch.rand(channels, generator=gen) + 0.5)
        bn.weight.copy_(torch.randn(channels, generator=gen))
        bn.bias.copy_(torch.randn(channels, generator=gen))
        bn.num_batches_tracked.fill_(7)
    return bn.eval()


@pytest.mark.parametrize(
    ("frozen_cls", "torch_cls", "shape"),
    [
        (FrozenBatchNorm1d, torch.nn.BatchNorm1d, (5, 3)),
        (FrozenBatchNorm2d, torch.nn.BatchNorm2d, (2, 3, 4, 4)),
        (FrozenBatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 2, 2, 2)),
    ],
)
def test_equals_eval_batch_norm_in_training_mode(frozen_cls, torch_cls, shape):
    reference = _trained_torch_bn(torch_cls, 3, shape)
    frozen = frozen_cls(3)
    frozen.load_state_dict(reference.state_dict())
    frozen.train()  # training mode changes nothing
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    x = torch.randn(shape).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y = frozen(x)
    expected = reference(x_ref)
    torch.testing.assert_close(y, expected)
    dy = torch.randn(shape)
    (y * dy).sum().backward()
    (expected * dy).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert frozen.weight.grad is None
    assert frozen.bias.grad is None
    for key, value in frozen.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_requires_grad_gives_eval_gradients_and_single_sample_works():
    reference = _trained_torch_bn(torch.nn.BatchNorm2d, 3, (1, 3, 1, 1), seed=1)
    frozen = FrozenBatchNorm2d.from_batchnorm(reference, requires_grad=True)
    x = torch.randn(1, 3, 1, 1)  # one value per channel: fine, no batch statistics
    frozen(x).square().sum().backward()
    reference(x).square().sum().backward()
    torch.testing.assert_close(frozen.weight.grad, reference.weight.grad)
    torch.testing.assert_close(frozen.bias.grad, reference.bias.grad)
    assert "requires_grad=True" in repr(frozen)


def test_from_batchnorm_copies_and_checks():
    ours = BatchNorm2d(3, affine=False)
    with torch.no_grad():
        ours.running_mean.fill_(2.0)
    frozen = FrozenBatchNorm2d.from_batchnorm(ours)
    assert torch.equal(frozen.running_mean, ours.running_mean)
    assert torch.equal(frozen.weight, torch.ones(3))
    assert torch.equal(frozen.bias, torch.zeros(3))
    frozen.freeze_stats = False  # even so, statistics never change
    frozen.train()(torch.randn(4, 3, 2, 2))
    assert torch.equal(frozen.running_mean, torch.full((3,), 2.0))
    assert int(frozen.num_batches_tracked) == 0
    with pytest.raises(TypeError, match="batch-norm module"):
        FrozenBatchNorm2d.from_batchnorm(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="track_running_stats"):
        FrozenBatchNorm2d.from_batchnorm(torch.nn.BatchNorm2d(3, track_running_stats=False))
    torch_bn = torch.nn.BatchNorm2d(3)
    torch_bn.load_state_dict(frozen.state_dict())  # same keys both ways
