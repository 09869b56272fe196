"""The switches every batch-norm module has: ``freeze_stats`` and the non-finite guard."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm.tools
from batchnorm.modules import BatchNorm1d, BatchNorm2d, NonFiniteBatchWarning
from batchnorm.variants.ghost import GhostBatchNorm2d
from batchnorm.variants.renorm import BatchRenorm2d


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_same(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for key, value in module.state_dict().items():
        assert value.dtype == before[key].dtype, key
        assert torch.equal(value, before[key]), key  # bit-identical (NaN would fail)


def test_freeze_stats_keeps_buffers_but_normalizes_with_batch_statistics():
    gen = torch.Generator().manual_seed(0)
    frozen = BatchNorm2d(3, freeze_stats=True, momentum=None)
    reference = nn.BatchNorm2d(3, momentum=None)
    before = _snapshot(frozen)
    x = torch.randn(4, 3, 2, 2, generator=gen) * 2 + 1
    torch.testing.assert_close(frozen(x), reference(x))  # training output: batch statistics
    _assert_same(frozen, before)
    frozen.freeze_stats = False
    frozen(x)
    torch.testing.assert_close(frozen.running_mean, reference.running_mean)
    assert int(frozen.num_batches_tracked) == 1
    assert "freeze_stats=True" in repr(BatchNorm2d(3, freeze_stats=True))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize(
    "make",
    [
        lambda: BatchNorm2d(3, nonfinite="skip"),
        lambda: GhostBatchNorm2d(3, virtual_batch_size=2, nonfinite="skip"),
        lambda: BatchRenorm2d(3, warmup_steps=0, r_max_steps=0, d_max_steps=0, nonfinite="skip"),
    ],
)
def test_skip_leaves_buffers_bit_identical_and_warns_once(make, bad):
    layer = make()
    layer(torch.randn(4, 3, 2, 2))  # one good step, so the buffers are not the defaults
    before = _snapshot(layer)
    x = torch.randn(4, 3, 2, 2)
    x[1, 2, 0, 1] = bad
    with pytest.warns(NonFiniteBatchWarning, match="skipped a batch"):
        layer(x)
    _assert_same(layer, before)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # the second skip is silent
    _assert_same(layer, before)
    layer(torch.randn(4, 3, 2, 2))  # a good batch updates again
    assert int(layer.num_batches_tracked) == int(before["num_batches_tracked"]) + 1


def test_skip_catches_statistics_that_overflow():
    layer = BatchNorm1d(2, nonfinite="skip")
    before = _snapshot(layer)
    x = torch.tensor([[3e38, 1.0], [-3e38, 2.0], [3e38, 0.5]])  # finite input, variance overflows
    with pytest.warns(NonFiniteBatchWarning):
        layer(x)
    _assert_same(layer, before)


def test_raise_names_the_layer_and_keeps_buffers():
    net = nn.Sequential(
        nn.Linear(4, 3), nn.Sequential(nn.ReLU(), BatchNorm1d(3, nonfinite="raise"))
    )
    before = _snapshot(net)
    x = torch.randn(5, 4)
    x[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"^BatchNorm1d\(3, .*nonfinite='raise'\): NaN or Inf"):
        net(x)  # not told its name yet: named by its repr
    _assert_same(net, before)
    batchnorm.tools.name_layers(net)
    with pytest.raises(RuntimeError, match=r"^1\.1 \(BatchNorm1d\): NaN or Inf"):
        net(x)
    _assert_same(net, before)
    loaded = nn.Sequential(
        nn.Linear(4, 3), nn.Sequential(nn.ReLU(), BatchNorm1d(3, nonfinite="raise"))
    )
    loaded.load_state_dict(net.state_dict())  # the keys' prefixes name the layers too
    with pytest.raises(RuntimeError, match=r"^1\.1 \(BatchNorm1d\): NaN or Inf"):
        loaded(x)
    alone = BatchNorm1d(3, nonfinite="raise")
    with pytest.raises(RuntimeError, match=r"BatchNorm1d\(3, .*nonfinite='raise'\)"):
        alone(torch.full((2, 3), float("inf")))


def test_propagate_is_the_default_and_matches_torch():
    ours, theirs = BatchNorm1d(2), nn.BatchNorm1d(2)
    x = torch.tensor([[float("nan"), 1.0], [0.0, 2.0]])
    ours(x)
    theirs(x)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, equal_nan=True)
    assert ours.running_mean.isnan().any()


def test_guard_ignores_padding_and_evaluation():
    layer = BatchNorm1d(2, nonfinite="raise")
    x = torch.randn(3, 2, 4)
    x[2, :, 3] = float("nan")
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 3] = False
    layer(x, mask=mask)  # NaN only at padding: fine
    assert int(layer.num_batches_tracked) == 1
    layer.eval()
    assert layer(x).isnan().any()  # evaluation updates nothing, so nothing to guard


def test_bad_switch_values():
    with pytest.raises(ValueError, match="nonfinite"):
        BatchNorm1d(2, nonfinite="ignore")
    with pytest.raises(TypeError, match="freeze_stats"):
        BatchNorm1d(2, freeze_stats=1)


def test_convert_names_the_layers_it_creates():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.BatchNorm2d(4)))
    converted = batchnorm.tools.convert(net)
    assert converted[1][0].layer_name == "1.0"
    assert converted[1][0]._layer_name() == "1.0 (BatchNorm2d)"


def test_name_layers_rejects_what_is_not_a_module():
    with pytest.raises(TypeError, match=r"^model: expected an nn.Module, got list"):
        batchnorm.tools.name_layers([BatchNorm1d(3)])
