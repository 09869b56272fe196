"""fold(): the folded model computes what the eval-mode original does, with fewer parameters."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import batchnorm
from batchnorm.modules import BatchNorm1d, BatchNorm2d
from batchnorm.tools import fold
from batchnorm.tools.fold import fold_into
from batchnorm.variants.frozen import FrozenBatchNorm2d


def _randomize_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters in every batch norm."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if getattr(module, "running_var", None) is not None:
            with torch.no_grad():
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.3)
                if module.weight is not None:
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen))
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen))
    return model.eval()


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _norms(model: nn.Module) -> int:
    return sum(
        isinstance(m, (nn.modules.batchnorm._BatchNorm, BatchNorm2d, BatchNorm1d))
        for m in model.modules()
    )


class ResidualBlock(nn.Module):
    """conv-bn-relu-conv-bn plus a conv-bn shortcut, then relu (ResNet's downsampling block)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.shortcut = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), FrozenBatchNorm2d(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def test_conv_bn_relu_stack():
    model = _randomize_statistics(
        nn.Sequential(
            nn.Conv2d(3, 6, 3, bias=False),
            BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, 4, 3, groups=2),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2),
            BatchNorm2d(6),
            nn.Flatten(),
            nn.Linear(6 * 8 * 8, 5),
            BatchNorm1d(5),
        )
    )
    original = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    folded = fold(model)
    assert isinstance(folded, fx.GraphModule)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert _norms(folded) == 0
    assert _count(folded) < _count(model)
    for key, value in model.state_dict().items():  # the original is untouched
        assert torch.equal(value, original[key]), key


def test_residual_block_and_counts():
    model = _randomize_statistics(ResidualBlock(), seed=1)
    x = torch.randn(2, 3, 6, 6)
    folded = fold(model)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert _norms(folded) == 0
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in folded.modules())
    # three 8-channel BNs (γ, β each) go, three conv biases (8 each) come
    assert _count(model) - _count(folded) == 3 * 8


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv1d(3, 4, 3),
        nn.Conv3d(3, 4, 1, bias=False),
        nn.ConvTranspose1d(3, 4, 2),
        nn.ConvTranspose3d(3, 4, 1),
    ],
)
def test_every_layer_kind(layer):
    rank = {nn.Conv1d: 3, nn.ConvTranspose1d: 3}.get(type(layer), 5)
    norm = {3: nn.BatchNorm1d(4), 5: nn.BatchNorm3d(4)}[rank]
    model = _randomize_statistics(nn.Sequential(layer, norm), seed=2)
    x = torch.randn(2, 3, *([4] * (rank - 2)))
    folded = fold(model)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert _norms(folded) == 0


class _DataDependent(nn.Module):
    """Control flow on a tensor value: torch.fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


def test_untraceable_model_falls_back_to_sequential_order():
    model = _randomize_statistics(
        nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.BatchNorm2d(4),
            _DataDependent(),
            nn.Conv2d(4, 4, 1),
            BatchNorm2d(4),
        ),
        seed=3,
    )
    x = torch.randn(2, 3, 5, 5)
    with pytest.warns(UserWarning, match="could not trace"):
        folded = fold(model)
    assert not isinstance(folded, fx.GraphModule)
    assert isinstance(folded[1], nn.Identity)
    assert isinstance(folded[4], nn.Identity)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_unfoldable_pairs_are_left():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)
            self.free = nn.BatchNorm2d(4, track_running_stats=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = self.conv(x)
            return self.bn(z) + z + self.free(self.conv(x))  # conv output used twice; no stats

    model = _randomize_statistics(Shared(), seed=4)
    folded = fold(model)
    x = torch.randn(2, 3, 3, 3)
    torch.testing.assert_close(folded(x), model(x))
    assert _norms(folded) == 2
    with pytest.raises(ValueError, match="cannot fold"):
        fold_into(nn.Linear(3, 4), nn.BatchNorm1d(5))


def test_refuses_training_mode_and_non_modules():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r"model\.eval"):
        fold(model)
    model.eval()
    model[1].train()
    with pytest.raises(ValueError, match="1"):
        fold(model)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        fold("model")


@pytest.mark.parametrize(
    "make",
    [
        lambda: batchnorm.BatchNormAct2d(4, activation="relu"),
        lambda: batchnorm.BatchNormAct2d(4, activation=None),
        lambda: batchnorm.InPlaceBatchNormAct2d(4),
    ],
)
def test_fused_layers_are_not_folded(make) -> None:
    """A batch norm with an activation after it (or |γ| + ε) is not the affine map alone:
    folding it would drop that, so it stays, and the model's output is unchanged."""
    torch.manual_seed(0)
    norm = make()
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.weight.uniform_(-1, 1)  # negative γ: the in-place layer's |γ| matters
    model = nn.Sequential(nn.Conv2d(3, 4, 3), norm).eval()
    x = torch.randn(2, 3, 8, 8)
    folded = fold(model)
    assert any(type(m) is type(norm) for m in folded.modules())
    torch.testing.assert_close(folded(x), model(x))
