"""freeze()/unfreeze(): statistics and affine parameters of every batch norm of a model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from batchnorm.modules import BatchNorm1d, BatchNorm2d
from batchnorm.tools import freeze, unfreeze
from batchnorm.variants.frozen import FrozenBatchNorm2d


def _model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 1),
        BatchNorm2d(4),
        FrozenBatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(16, 2),
        BatchNorm1d(2),
    )


def test_freeze_stats_then_unfreeze():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert freeze(model) is model
    assert model[1].freeze_stats
    assert model[5].freeze_stats
    model.train()(torch.randn(3, 3, 2, 2)).sum().backward()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model[1].weight.grad is not None  # affine still trains
    unfreeze(model)
    assert not model[1].freeze_stats
    assert model[2].freeze_stats  # a frozen layer stays frozen
    model(torch.randn(3, 3, 2, 2))
    assert int(model[1].num_batches_tracked) == 1


def test_freeze_affine_only():
    model = _model()
    freeze(model, stats=False, affine=True)
    assert not model[1].freeze_stats
    assert not model[1].weight.requires_grad
    assert not model[5].bias.requires_grad
    assert model[0].weight.requires_grad  # other layers untouched
    unfreeze(model, stats=False, affine=True)
    assert model[1].weight.requires_grad
    assert model[2].weight.requires_grad


def test_torch_layers_have_no_stats_switch():
    model = nn.Sequential(BatchNorm2d(4), nn.BatchNorm2d(4))
    with pytest.raises(TypeError, match=r"1 \(BatchNorm2d\).*convert"):
        freeze(model)
    assert not model[0].freeze_stats  # nothing changed
    freeze(model, stats=False, affine=True)
    assert not model[1].weight.requires_grad
    with pytest.raises(TypeError, match="model"):
        unfreeze(None)
