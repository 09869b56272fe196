"""Modules on the Triton backend (interpreted) against ``torch.nn.BatchNorm*``.

Outputs, every gradient, running statistics and ``num_batches_tracked`` over several steps,
momentum ``None``, evaluation, ``track_running_stats=False``, low-precision input into a float32
module, channels_last and strided input.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported

import pytest
import torch

pytest.importorskip("triton")

import triton_helpers as th
from batchnorm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct2d

#: Input rank → (our module, torch's module).
MODULES = {
    2: (BatchNorm1d, torch.nn.BatchNorm1d),
    3: (BatchNorm1d, torch.nn.BatchNorm1d),
    4: (BatchNorm2d, torch.nn.BatchNorm2d),
    5: (BatchNorm3d, torch.nn.BatchNorm3d),
}


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(("shape", "layout"), th.CASES)
def test_training_steps_then_eval_match_torch(
    shape: tuple[int, ...], layout: str, momentum: float | None
) -> None:
    """Two training steps (outputs, dx, dγ, dβ, buffers) and one evaluation step."""
    ours_class, torch_class = MODULES[len(shape)]
    channels = shape[1]
    ours = ours_class(channels, momentum=momentum, backend="triton")
    reference = torch_class(channels, momentum=momentum).double()
    with torch.no_grad():
        ours.weight.copy_(th.make((channels,), seed=1))
        ours.bias.copy_(th.make((channels,), seed=2))
        reference.load_state_dict(ours.state_dict())
    for step in range(2):
        x = th.make(shape, layout, seed=step).requires_grad_()
        x64 = x.detach().double().requires_grad_()
        dy = th.make(shape, seed=10 + step)
        y, y64 = ours(x), reference(x64)
        th.assert_close_to(y, y64.detach(), torch.float32, "y")
        y.backward(dy)
        y64.backward(dy.double())
        th.assert_close_to(x.grad, x64.grad, torch.float32, "dx")
    th.assert_close_to(ours.weight.grad, reference.weight.grad, torch.float32, "dweight")
    th.assert_close_to(ours.bias.grad, reference.bias.grad, torch.float32, "dbias")
    th.assert_close_to(ours.running_mean, reference.running_mean, torch.float32, "running_mean")
    th.assert_close_to(ours.running_var, reference.running_var, torch.float32, "running_var")
    assert int(ours.num_batches_tracked) == int(reference.num_batches_tracked) == 2
    ours.eval()
    reference.eval()
    x = th.make(shape, layout, seed=5)
    th.assert_close_to(ours(x), reference(x.double()).detach(), torch.float32, "eval")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_input_into_float32_module(dtype: torch.dtype) -> None:
    """fp16/bf16 activations with fp32 parameters and buffers (the mixed-precision setup)."""
    ours = BatchNorm2d(5, backend="triton")
    reference = torch.nn.BatchNorm2d(5).double()
    x = th.make((2, 5, 3, 3), "channels_last", dtype).requires_grad_()
    y = ours(x)
    assert y.dtype == dtype
    assert ours.running_mean.dtype == torch.float32
    x64 = x.detach().double().requires_grad_()
    expected = reference(x64)
    th.assert_close_to(y, expected.detach(), dtype, "y")
    dy = th.make((2, 5, 3, 3), dtype=dtype, seed=3)
    y.backward(dy)
    expected.backward(dy.double())
    th.assert_close_to(x.grad, x64.grad, dtype, "dx")
    th.assert_close_to(ours.weight.grad, reference.weight.grad, dtype, "dweight")
    th.assert_close_to(ours.running_var, reference.running_var, torch.float32, "running_var")


def test_without_running_stats_and_without_affine() -> None:
    """``track_running_stats=False`` uses batch statistics in eval; ``affine=False`` works."""
    ours = BatchNorm1d(7, affine=False, track_running_stats=False, backend="triton").eval()
    x = th.make((13, 7))
    expected = torch.nn.functional.batch_norm(x.double(), None, None, training=True)
    th.assert_close_to(ours(x), expected, torch.float32, "y")
    assert ours.running_mean is None


def test_autocast_channels_last_model_keeps_float32_statistics() -> None:
    """A channels_last conv + BatchNormAct2d under bf16 autocast: bf16 activations, fp32 buffers."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1).to(memory_format=torch.channels_last)
    ours = BatchNormAct2d(5, backend="triton")
    reference = torch.nn.BatchNorm2d(5)
    x = th.make((2, 3, 4, 4), "channels_last")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        y = ours(h)
    assert h.dtype == y.dtype == torch.bfloat16
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert ours.running_var.dtype == torch.float32
    expected = torch.relu(reference(h.detach().float()))
    th.assert_close_to(y, expected.detach().double(), torch.bfloat16, "y")
    th.assert_close_to(ours.running_var, reference.running_var.double(), torch.float32, "var")
