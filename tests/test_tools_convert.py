"""convert(): torch.nn batch norm ⇄ ours, bit-exact, refusing to drop behaviour."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from batchnorm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from batchnorm.tools import convert
from batchnorm.variants.frozen import FrozenBatchNorm2d
from batchnorm.variants.ghost import GhostBatchNorm2d
from batchnorm.variants.renorm import BatchRenorm2d


def _model(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, dtype=dtype),
        nn.BatchNorm2d(4, momentum=None, dtype=dtype),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 6, dtype=dtype),
        nn.BatchNorm1d(6, affine=False, dtype=dtype),
        nn.Unflatten(1, (6, 1, 1, 1)),
        nn.BatchNorm3d(6, track_running_stats=False, eps=1e-3, dtype=dtype),
    )
    model(torch.randn(5, 3, 6, 6, dtype=dtype))  # move the statistics away from the defaults
    model[1].weight.requires_grad_(False)
    model[4].eval()
    return model


def test_round_trip_is_bit_exact():
    model = _model(torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ours = convert(model, to="batchnorm")
    assert [type(m) for m in ours if "BatchNorm" in type(m).__name__] == [
        BatchNorm2d,
        BatchNorm1d,
        BatchNorm3d,
    ]
    assert type(model[1]) is nn.BatchNorm2d  # the original is untouched (a copy was converted)
    back = convert(ours, to="torch")
    assert [type(m) for m in back] == [type(m) for m in model]
    for converted in (ours, back):
        for key, value in converted.state_dict().items():
            assert value.dtype == state[key].dtype, key
            assert torch.equal(value, state[key]), key
        assert [m.training for m in converted.modules()] == [m.training for m in model.modules()]
        assert converted[1].weight.requires_grad is False
        assert converted[1].momentum is None
        assert converted[6].eps == 1e-3
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    expected = model(x)
    torch.testing.assert_close(ours(x), expected)
    assert torch.equal(back(x), expected)


def test_inplace_keeps_parameter_objects():
    model = _model()
    weight, running_mean = model[1].weight, model[1].running_mean
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    result = convert(model, inplace=True)
    assert result is model
    assert type(model[1]) is BatchNorm2d
    assert model[1].weight is weight
    assert model[1].running_mean is running_mean
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    optimizer.step()  # the optimizer still owns the layer's parameters


def test_single_layer_and_already_converted():
    layer = nn.BatchNorm2d(3, bias=False)
    ours = convert(layer)
    assert type(ours) is BatchNorm2d
    assert ours.bias is None
    assert convert(ours) is not ours  # copy, already ours, nothing to do
    same = convert(ours, inplace=True)
    assert same is ours
    torch_layer = convert(ours, to="torch")
    assert type(torch_layer) is nn.BatchNorm2d
    assert torch_layer.bias is None


@pytest.mark.parametrize(
    ("layer", "to", "match"),
    [
        (BatchRenorm2d(4), "torch", "BatchRenorm2d"),
        (GhostBatchNorm2d(4, virtual_batch_size=2), "torch", "GhostBatchNorm2d"),
        (FrozenBatchNorm2d(4), "torch", "FrozenBatchNorm2d"),
        (BatchNorm2d(4, freeze_stats=True), "torch", "freeze_stats"),
        (BatchNorm2d(4, nonfinite="skip"), "torch", "nonfinite='skip'"),
        (nn.SyncBatchNorm(4), "batchnorm", "SyncBatchNorm"),
    ],
)
def test_refuses_to_drop_behaviour_and_changes_nothing(layer, to, match):
    first = nn.BatchNorm2d(4) if to == "batchnorm" else BatchNorm2d(4)
    model = nn.Sequential(first, layer)
    with pytest.raises(TypeError, match=match):
        convert(model, to=to, inplace=True)
    assert model[0] is first
    assert model[1] is layer


def test_refuses_hooks_and_bad_arguments():
    model = nn.Sequential(nn.BatchNorm2d(4))
    model[0].register_forward_hook(lambda *args: None)
    with pytest.raises(TypeError, match="hooks"):
        convert(model)
    with pytest.raises(ValueError, match="to"):
        convert(nn.BatchNorm2d(4), to="tensorflow")
    with pytest.raises(TypeError, match="model"):
        convert("model")
    # layers of the target library are left alone, subclasses included
    frozen = FrozenBatchNorm2d(4)
    assert convert(nn.Sequential(frozen), inplace=True)[0] is frozen
