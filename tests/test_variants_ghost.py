"""Ghost batch norm against its definition (Hoffer et al., 2017) written with F.batch_norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from batchnorm.modules import BatchNorm2d
from batchnorm.variants.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d


def _paper_ghost(x, gamma, beta, virtual_batch_size, running_mean, running_var, momentum):
    """Each virtual batch normalized alone; running stats move to the size-weighted average."""
    outputs, means, variances, sizes = [], [], [], []
    dims = [0, *range(2, x.dim())]
    for chunk in x.split(virtual_batch_size):
        outputs.append(F.batch_norm(chunk, None, None, gamma, beta, training=True, eps=1e-5))
        means.append(chunk.detach().mean(dims))
        variances.append(chunk.detach().var(dims))  # unbiased, what BN stores
        sizes.append(chunk.shape[0])
    weights = torch.tensor(sizes, dtype=x.dtype) / x.shape[0]
    mean = sum(w * m for w, m in zip(weights, means, strict=True))
    var = sum(w * v for w, v in zip(weights, variances, strict=True))
    new_mean = (1 - momentum) * running_mean + momentum * mean
    new_var = (1 - momentum) * running_var + momentum * var
    return torch.cat(outputs), new_mean, new_var


@pytest.mark.parametrize(
    ("cls", "shape", "virtual"),
    [
        (GhostBatchNorm1d, (10, 3), 4),  # 4 + 4 + 2: the last virtual batch is smaller
        (GhostBatchNorm1d, (9, 3, 2), 3),
        (GhostBatchNorm2d, (7, 3, 2, 3), 2),
        (GhostBatchNorm3d, (5, 3, 2, 2, 2), 2),
    ],
)
def test_matches_definition_with_gradients(cls, shape, virtual):
    gen = torch.Generator().manual_seed(0)
    layer = cls(shape[1], virtual_batch_size=virtual, momentum=0.2, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(shape[1], generator=gen, dtype=torch.float64) + 1)
        layer.bias.copy_(torch.randn(shape[1], generator=gen, dtype=torch.float64))
    gamma = layer.weight.detach().clone().requires_grad_()
    beta = layer.bias.detach().clone().requires_grad_()
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    mean0, var0 = layer.running_mean.clone(), layer.running_var.clone()

    y = layer(x)
    (y * dy).sum().backward()
    expected, new_mean, new_var = _paper_ghost(x_ref, gamma, beta, virtual, mean0, var0, 0.2)
    (expected * dy).sum().backward()

    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.weight.grad, gamma.grad)
    torch.testing.assert_close(layer.bias.grad, beta.grad)
    torch.testing.assert_close(layer.running_mean, new_mean)
    torch.testing.assert_close(layer.running_var, new_var)


@pytest.mark.parametrize("virtual", [8, 100])
def test_large_virtual_batch_equals_batch_norm_exactly(virtual):
    gen = torch.Generator().manual_seed(1)
    ghost = GhostBatchNorm2d(3, virtual_batch_size=virtual, momentum=None)
    plain = BatchNorm2d(3, momentum=None)
    for _ in range(2):
        x = torch.randn(8, 3, 4, 4, generator=gen) * 2 + 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ghost(xa), plain(xb)
        (ya * 1.0).sum().backward()  # the same dy (a dense tensor of ones) for both
        (yb * 1.0).sum().backward()
        assert torch.equal(ya, yb)
        assert torch.equal(xa.grad, xb.grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(ghost, name), getattr(plain, name)), name
    ghost.eval()
    plain.eval()
    x = torch.randn(3, 3, 4, 4, generator=gen)
    assert torch.equal(ghost(x), plain(x))


def test_without_running_stats_and_empty_batch():
    gen = torch.Generator().manual_seed(2)
    ghost = GhostBatchNorm1d(2, virtual_batch_size=3, track_running_stats=False)
    x = torch.randn(6, 2, generator=gen)
    expected = torch.cat(
        [F.batch_norm(c, None, None, ghost.weight, ghost.bias, True) for c in x.split(3)]
    )
    torch.testing.assert_close(ghost(x), expected)
    ghost.eval()  # no running statistics: batch statistics in evaluation too
    torch.testing.assert_close(ghost(x), expected)
    tracked = GhostBatchNorm1d(2, virtual_batch_size=3)
    assert tracked(torch.randn(0, 2)).shape == (0, 2)
    assert int(tracked.num_batches_tracked) == 1
    assert torch.equal(tracked.running_mean, torch.zeros(2))
    assert "virtual_batch_size=3" in repr(tracked)


def test_errors_keep_buffers():
    ghost = GhostBatchNorm1d(2, virtual_batch_size=2)
    before = {k: v.clone() for k, v in ghost.state_dict().items()}
    with pytest.raises(ValueError, match="every virtual batch"):
        ghost(torch.randn(5, 2))  # 2 + 2 + 1: the last one has a single value per channel
    with pytest.raises(ValueError, match="channels"):
        ghost(torch.randn(4, 3))
    for key, value in ghost.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="virtual_batch_size"):
        GhostBatchNorm1d(2, virtual_batch_size=0)
