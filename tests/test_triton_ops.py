"""The Triton backend's ``torch.library`` custom ops: registration, compile, dispatch, errors."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported

import sys

import pytest
import torch

pytest.importorskip("triton")

import triton_helpers as th
from batchnorm import backends
from batchnorm.backends import triton_backend as tb
from batchnorm.modules import BatchNormAct2d


def _leaf(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return th.make(shape, seed=seed).requires_grad_()


@pytest.mark.parametrize(
    ("activation", "with_running", "with_affine"),
    [("relu", True, True), ("gelu", False, False)],
)
def test_train_op_passes_opcheck(activation: str, with_running: bool, with_affine: bool) -> None:
    """Schema, fake tensor, autograd registration and AOT dispatch of ``triton_train``."""
    x, z = _leaf((2, 3, 5), 0), _leaf((2, 3, 5), 4)
    weight, bias = (_leaf((3,), 1), _leaf((3,), 2)) if with_affine else (None, None)
    running = (torch.zeros(3), torch.ones(3)) if with_running else (None, None)
    args = (x, weight, bias, z, *running, 0.1, 1e-5, activation, 0.01)
    torch.library.opcheck(tb.train_op, args)


def test_backward_and_inference_ops_pass_opcheck() -> None:
    """``triton_train_backward`` and ``triton_inference`` (with its autograd) pass opcheck."""
    x, dy = th.make((2, 3, 5)), th.make((2, 3, 5), seed=3)
    mask = (th.make((2, 3, 5), seed=4) > 0).to(torch.uint8)
    mean, invstd = x.mean(dim=(0, 2)), torch.rsqrt(x.var(dim=(0, 2), correction=0) + 1e-5)
    torch.library.opcheck(
        tb.train_backward_op,
        (dy, x, torch.ones(3), torch.zeros(3), None, mask, mean, invstd, "relu", 0.0, True),
    )
    torch.library.opcheck(
        tb.inference_op,
        (_leaf((2, 3, 5), 0), torch.zeros(3), torch.ones(3), _leaf((3,), 1), None,
         _leaf((2, 3, 5), 4), 1e-5, "silu", 0.01),
    )  # fmt: skip


def test_inference_op_gradients_match_autograd() -> None:
    """Eval-mode gradients (dx, dγ, dβ, dz) against torch autograd in float64."""
    x, z, weight, bias = _leaf((2, 3, 5), 0), _leaf((2, 3, 5), 4), _leaf((3,), 1), _leaf((3,), 2)
    running_mean, running_var = th.make((3,), seed=5), th.make((3,), seed=6).abs() + 0.5
    dy = th.make((2, 3, 5), seed=3)
    y = tb.inference_op(x, running_mean, running_var, weight, bias, z, 1e-5, "gelu", 0.01)
    grads = torch.autograd.grad(y, (x, weight, bias, z), dy)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, weight, bias, z)]
    u = torch.nn.functional.batch_norm(
        leaves64[0], running_mean.double(), running_var.double(), leaves64[1], leaves64[2]
    )
    expected = torch.autograd.grad(torch.nn.functional.gelu(u + leaves64[3]), leaves64, dy.double())
    for grad, reference, name in zip(grads, expected, ("dx", "dw", "db", "dz"), strict=True):
        th.assert_close_to(grad, reference, torch.float32, name)


def test_runs_eagerly_only_for_plain_tensors_outside_tracing() -> None:
    """Plain tensors and parameters launch directly; fake and meta tensors, torch.func,
    torch.jit.trace and dispatch modes use the ops."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = th.make((2, 3, 5))
    assert tb.runs_eagerly(x)
    assert tb.runs_eagerly(torch.nn.Parameter(x))
    with FakeTensorMode() as mode:
        assert not tb.runs_eagerly(mode.from_tensor(x))
    seen: list[bool] = []

    def probe(t: torch.Tensor) -> torch.Tensor:
        seen.append(tb.runs_eagerly(t))
        return t.sum()

    torch.func.grad(probe)(x)
    assert seen == [False]
    assert not tb.runs_eagerly(torch.empty((2, 3, 5), device="meta"))
    assert not tb.runs_eagerly(x, mode.from_tensor(x))  # any tensor argument counts
    torch.jit.trace(probe, x, check_trace=False)
    assert seen[-1] is False

    class Recording(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Recording():
        assert not tb.runs_eagerly(x)


@pytest.mark.parametrize(
    ("activation", "with_residual", "with_running"),
    [("relu", True, True), ("gelu", True, False), ("none", False, True)],
)
def test_eager_twins_match_the_ops_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch, activation: str, with_residual: bool, with_running: bool
) -> None:
    """The backend's direct launches give the ops' outputs, gradients and running statistics."""
    backend = tb.TritonBackend()

    def run(eager: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(tb, "runs_eagerly", lambda *tensors: eager)
        x, w, b, z = _leaf((2, 3, 5), 0), _leaf((3,), 1), _leaf((3,), 2), _leaf((2, 3, 5), 4)
        residual = z if with_residual else None
        running = (
            (th.make((3,), seed=5), th.make((3,), seed=6).abs()) if with_running else (None, None)
        )
        result = backend.forward_act(x, w, b, residual, 1e-5, activation, 0.01, *running, 0.1)
        leaves = [x, w, b, z] if with_residual else [x, w, b]
        grads = torch.autograd.grad(result.y, leaves, th.make((2, 3, 5), seed=3))
        stats = [t for t in (result.running_mean, result.running_var) if t is not None]
        y_eval = backend.inference_act(
            x, th.make((3,), seed=5), th.make((3,), seed=6).abs() + 0.5, w, b, residual, 1e-5,
            activation, 0.01,
        )  # fmt: skip
        eval_grads = torch.autograd.grad(y_eval, leaves, th.make((2, 3, 5), seed=7))
        return [result.y, result.mean, result.invstd, *grads, *stats, y_eval, *eval_grads]

    for got, expected in zip(run(True), run(False), strict=True):
        assert torch.equal(got, expected)


@pytest.mark.slow
def test_triton_backend_compiles_fullgraph() -> None:
    """``torch.compile(fullgraph=True)`` traces the custom ops (training and evaluation)."""
    eager = BatchNormAct2d(3, backend="triton")
    compiled_module = BatchNormAct2d(3, backend="triton")
    compiled = torch.compile(compiled_module, fullgraph=True)
    x = th.make((2, 3, 2, 2), "channels_last")
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_eager, y_compiled = eager(x_eager), compiled(x_compiled)
    torch.testing.assert_close(y_compiled, y_eager)
    y_eager.sum().backward()
    y_compiled.sum().backward()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)
    torch.testing.assert_close(compiled_module.running_mean, eager.running_mean)
    compiled_module.eval()
    eager.eval()
    torch.testing.assert_close(compiled(x), eager(x))


def test_missing_triton_gives_a_clear_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Asking for ``triton`` when it cannot import names the backend and the alternatives."""
    for module in ("triton_backend", "cuda_backend"):  # cuda_backend imports triton_backend
        monkeypatch.setitem(sys.modules, f"batchnorm.backends.{module}", None)
    with backends.fresh():
        with pytest.raises(ImportError, match="the 'triton' backend cannot be used here"):
            backends.resolve_backend("triton", torch.device("cpu"))
        assert "triton" not in backends.available_backends()
        assert "cuda" not in backends.available_backends()
        assert backends.resolve_backend("auto", torch.device("cuda")).name == "aten"


def test_no_cuda_and_no_interpreter_means_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a GPU and outside the interpreter the backend refuses to start, saying why."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ImportError, match="need a CUDA device, or TRITON_INTERPRET=1"):
        tb.TritonBackend()


@pytest.mark.parametrize("eager", [True, False], ids=["direct", "ops"])
def test_double_backward_through_the_kernels_is_an_error(monkeypatch, eager: bool) -> None:
    """The Triton backward is not differentiable: asking for it raises on both routes, also
    when the gradient enters a larger loss (no gradient silently lost)."""
    monkeypatch.setattr(tb, "runs_eagerly", lambda *tensors: eager)
    x, weight = _leaf((4, 3, 5), 0), _leaf((3,), 1)
    backend = tb.TritonBackend()
    y = backend.forward_act(x, weight, None, None, 1e-5, "relu", 0.01, None, None, 0.1).y
    (grad,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad(grad.sum(), x)
    y = backend.forward_act(x, weight, None, None, 1e-5, "relu", 0.01, None, None, 0.1).y
    (grad,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    penalty = (weight * weight).sum() + grad.pow(2).sum()  # a gradient penalty
    with pytest.raises(RuntimeError, match="no autograd formula"):
        penalty.backward()
