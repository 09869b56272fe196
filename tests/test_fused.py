"""Fused ``act(bn(x) + residual)``: functional and modules against the unfused composition.

The oracle is always ``torch.nn.functional`` in float64 (``F.batch_norm``, ``+``, the activation),
differentiated by torch autograd; ours runs on every backend (torch, numpy, and Triton under the
interpreter) in one autograd node whose backward also returns the residual's gradient.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported

import pytest
import torch

import triton_helpers as th
from batchnorm import functional as bnf
from batchnorm._math import activate, activation_derivative
from batchnorm.backends import available_backends
from batchnorm.modules import BatchNorm2d, BatchNormAct1d, BatchNormAct2d, BatchNormAct3d

BACKENDS = [
    name
    for name in ("torch", "numpy", "triton", "aten", "numba", "cuda")
    if name in available_backends()
]
ACTIVATIONS = [None, "relu", "leaky_relu", "silu", "gelu"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_residual", [False, True], ids=["no_residual", "residual"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_functional_training_matches_composition(
    backend: str, activation: str | None, with_residual: bool
) -> None:
    """Output, dx, dγ, dβ, dz and the running statistics of the fused functional."""
    shape = (2, 3, 5, 3)
    x, dy = th.make(shape, "channels_last"), th.make(shape, "channels_last", seed=3)
    z = th.make(shape, seed=4) if with_residual else None
    weight, bias = th.make((3,), seed=1), th.make((3,), seed=2)
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    leaves = [None if t is None else t.clone().requires_grad_() for t in (x, weight, bias, z)]
    y = bnf.batch_norm(
        leaves[0], running_mean, running_var, leaves[1], leaves[2], training=True,
        momentum=0.2, backend=backend, activation=activation, residual=leaves[3],
        negative_slope=th.NEGATIVE_SLOPE,
    )  # fmt: skip
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, present, dy))
    expected = th.reference(x, weight, bias, z, dy, activation)
    th.assert_close_to(y, expected["y"], torch.float32, "y")
    assert y.stride() == x.stride()  # channels_last kept
    for leaf, name in zip(leaves, ("dx", "dweight", "dbias", "dresidual"), strict=True):
        th.assert_close_to(
            None if leaf is None else next(grads), expected[name], torch.float32, name
        )
    m = 2 * 5 * 3
    torch.testing.assert_close(running_mean, 0.2 * expected["mean"].float())
    torch.testing.assert_close(running_var, 0.8 + 0.2 * expected["var"].float() * m / (m - 1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", [None, "leaky_relu", "gelu"])
def test_functional_eval_matches_composition(backend: str, activation: str | None) -> None:
    """Evaluation mode fuses too and leaves the running buffers untouched."""
    shape = (3, 4, 5)
    x, z = th.make(shape), th.make(shape, seed=4)
    weight, bias = th.make((4,), seed=1), th.make((4,), seed=2)
    running_mean, running_var = th.make((4,), seed=5), th.make((4,), seed=6).abs() + 0.5
    before = (running_mean.clone(), running_var.clone())
    y = bnf.batch_norm(
        x, running_mean, running_var, weight, bias, training=False, backend=backend,
        activation=activation, residual=z, negative_slope=th.NEGATIVE_SLOPE,
    )  # fmt: skip
    u = torch.nn.functional.batch_norm(
        x.double(), before[0].double(), before[1].double(), weight.double(), bias.double()
    )
    th.assert_close_to(y, th.ACTIVATION_FUNCTIONS[activation](u + z.double()), torch.float32, "y")
    assert torch.equal(running_mean, before[0])
    assert torch.equal(running_var, before[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_fused(backend: str, dtype: torch.dtype) -> None:
    """fp16/bf16 input and residual: output in the input dtype, gradients within tolerance."""
    shape = (2, 5, 7)
    x, z, dy = (th.make(shape, dtype=dtype, seed=s) for s in (0, 4, 3))
    weight, bias = th.make((5,), seed=1), th.make((5,), seed=2)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, z)]
    y = bnf.batch_norm(
        leaves[0], None, None, leaves[1], leaves[2], training=True, backend=backend,
        activation="silu", residual=leaves[3],
    )  # fmt: skip
    assert y.dtype == dtype
    grads = torch.autograd.grad(y, leaves, dy)
    expected = th.reference(x, weight, bias, z, dy, "silu")
    th.assert_close_to(y, expected["y"], dtype, "y")
    for grad, name in zip(grads, ("dx", "dweight", "dbias", "dresidual"), strict=True):
        th.assert_close_to(grad, expected[name], dtype, name)
    assert grads[0].dtype == dtype
    assert grads[3].dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_pure_form_returns_new_statistics(backend: str) -> None:
    """``batch_norm_pure`` with fusion returns new running statistics and mutates nothing."""
    x = th.make((4, 3, 2))
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    out = bnf.batch_norm_pure(
        x, running_mean, running_var, training=True, backend=backend, activation="relu"
    )
    assert torch.equal(running_mean, torch.zeros(3))
    assert out.running_mean is not None
    assert out.running_var is not None
    torch.testing.assert_close(out.running_mean, 0.1 * x.mean(dim=(0, 2)))
    torch.testing.assert_close(out.running_var, 0.9 + 0.1 * x.var(dim=(0, 2)))
    assert (out.output >= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("module_class", "shape", "layout"),
    [
        (BatchNormAct1d, (6, 5), "contiguous"),
        (BatchNormAct2d, (2, 5, 3, 3), "channels_last"),
        (BatchNormAct3d, (2, 5, 2, 1, 3), "contiguous"),
    ],
)
def test_modules_match_torch_composition(
    backend: str, module_class: type, shape: tuple[int, ...], layout: str
) -> None:
    """Two training steps and an eval step against torch.nn.BatchNorm + add + ReLU."""
    ours = module_class(5, backend=backend, momentum=None)
    reference = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}[
        len(shape) - 2 if len(shape) > 2 else 1
    ](5, momentum=None).double()
    with torch.no_grad():
        ours.weight.copy_(th.make((5,), seed=1))
        reference.weight.copy_(ours.weight)
    for step in range(2):
        x, z = th.make(shape, layout, seed=10 + step), th.make(shape, seed=20 + step)
        y = ours(x, residual=z)
        expected = torch.relu(reference(x.double()) + z.double())
        th.assert_close_to(y, expected.detach(), torch.float32, f"step {step}")
    assert int(ours.num_batches_tracked) == 2
    torch.testing.assert_close(ours.running_mean, reference.running_mean.float())
    torch.testing.assert_close(ours.running_var, reference.running_var.float())
    ours.eval()
    reference.eval()
    x = th.make(shape, layout, seed=30)
    th.assert_close_to(ours(x), torch.relu(reference(x.double())).detach(), torch.float32, "eval")
    assert int(ours.num_batches_tracked) == 2


def test_module_state_dict_is_that_of_batchnorm() -> None:
    """Same keys as BatchNorm2d; a torch.nn.BatchNorm2d checkpoint loads both ways."""
    ours = BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.3)
    torch_bn = torch.nn.BatchNorm2d(4)
    torch_bn.running_mean.fill_(2.0)
    ours.load_state_dict(torch_bn.state_dict())
    assert ours.state_dict().keys() == BatchNorm2d(4).state_dict().keys()
    torch.nn.BatchNorm2d(4).load_state_dict(ours.state_dict())
    assert torch.equal(ours.running_mean, torch.full((4,), 2.0))
    assert "activation=leaky_relu, negative_slope=0.3" in repr(ours)
    assert "activation=gelu" in repr(BatchNormAct2d(4, activation="gelu"))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"activation": "tanh"}, ValueError, "activation: expected None or one of"),
        ({"residual": torch.zeros(2, 3, 5)}, ValueError, "residual: expected the shape"),
        (
            {"residual": torch.zeros(2, 3, 4, dtype=torch.float64)},
            TypeError,
            "residual: expected dtype",
        ),
        ({"residual": [0.0]}, TypeError, "residual: expected a torch.Tensor"),
        (
            {"residual": torch.zeros(2, 3, 4, device="meta")},
            RuntimeError,
            "residual: expected a tensor on",
        ),
        ({"negative_slope": float("nan")}, TypeError, "negative_slope: expected a finite float"),
        ({"negative_slope": True}, TypeError, "negative_slope"),
    ],
)
def test_bad_fusion_arguments_are_rejected_before_any_update(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    """Each bad fused argument raises a clear error and leaves the running buffers as they were."""
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    with pytest.raises(error, match=match):
        bnf.batch_norm(
            th.make((2, 3, 4)), running_mean, running_var, training=True, backend="torch", **kwargs
        )
    assert torch.equal(running_mean, torch.zeros(3))
    assert torch.equal(running_var, torch.ones(3))


def test_module_constructor_checks() -> None:
    """Unknown activation, bad slope or unknown backend name fail at construction."""
    with pytest.raises(ValueError, match="activation"):
        BatchNormAct2d(3, activation="swish")
    with pytest.raises(TypeError, match="negative_slope"):
        BatchNormAct2d(3, negative_slope="0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        BatchNormAct2d(3, backend="cudnn")


@pytest.mark.slow
@pytest.mark.parametrize("module_class", [BatchNorm2d, BatchNormAct2d])
def test_torch_backend_compiles_fullgraph(module_class: type) -> None:
    """``torch.compile(fullgraph=True)`` on CPU: same outputs, gradients and buffers as eager."""
    eager, compiled_module = module_class(3, backend="torch"), module_class(3, backend="torch")
    compiled = torch.compile(compiled_module, fullgraph=True)
    x = th.make((4, 3, 2, 2), "channels_last")
    extra = {"residual": th.make((4, 3, 2, 2), seed=4)} if module_class is BatchNormAct2d else {}
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_eager = eager(x_eager, **extra)
    y_compiled = compiled(x_compiled, **extra)
    torch.testing.assert_close(y_compiled, y_eager)
    y_eager.sum().backward()
    y_compiled.sum().backward()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)
    torch.testing.assert_close(compiled_module.running_var, eager.running_var)
    assert int(compiled_module.num_batches_tracked) == 1


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_derivatives_match_autograd(activation: str | None) -> None:
    """The closed-form derivatives of the composition against autograd of torch's functions."""
    u = torch.linspace(-4, 4, 101, dtype=torch.float64).requires_grad_()
    (expected,) = torch.autograd.grad(th.ACTIVATION_FUNCTIONS[activation](u).sum(), u)
    slope = th.NEGATIVE_SLOPE
    torch.testing.assert_close(activation_derivative(u.detach(), activation, slope), expected)
    torch.testing.assert_close(
        activate(u.detach(), activation, slope), th.ACTIVATION_FUNCTIONS[activation](u).detach()
    )
