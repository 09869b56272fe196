"""Second derivatives (``create_graph``) through every autograd path, against ``gradgradcheck``.

A backward with ``create_graph`` recomputes the forward in torch operations (the saved batch
statistics carry no graph), so double backward is exact on every backend route: the generic
autograd function, ATen's native forward, and the fused activation/residual composition.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported

import pytest
import torch

from batchnorm.backends import available_backends
from batchnorm.functional import batch_norm

BACKENDS = [name for name in ("torch", "aten", "numba", "cuda") if name in available_backends()]


def _leaves(strided: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 10 if strided else 5, generator=gen, dtype=torch.float64)
    if strided:
        x = x[:, :, ::2]  # no dense view: the generic autograd function runs
    z = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    weight = torch.rand(2, generator=gen, dtype=torch.float64) + 0.5
    bias = torch.randn(2, generator=gen, dtype=torch.float64)
    return [t.detach().requires_grad_() for t in (x, weight, bias, z)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", [None, "silu", "gelu", "leaky_relu"])
@pytest.mark.parametrize("strided", [False, True], ids=["dense", "strided"])
def test_second_derivatives_are_exact(backend: str, activation: str | None, strided: bool) -> None:
    """``gradgradcheck`` of ``act(bn(x) + z)`` (plain ``bn(x)`` without activation)."""
    leaves = _leaves(strided)

    def fn(x, weight, bias, z):
        if activation is None:
            return batch_norm(x, None, None, weight, bias, True, backend=backend)
        return batch_norm(
            x, None, None, weight, bias, True, backend=backend, activation=activation, residual=z
        )

    assert torch.autograd.gradgradcheck(fn, leaves)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_penalty_reaches_the_parameters(backend: str) -> None:
    """A penalty on ``dx`` (``create_graph``) gives the parameters the gradient float64
    ``F.batch_norm`` gives them: nothing silently dropped."""
    x, weight, bias, z = _leaves(strided=True)

    def penalty(batch_norm_fn):
        y = batch_norm_fn(x, weight, bias, z)
        (dx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
        return torch.autograd.grad(dx.pow(2).sum(), (weight, bias))

    def ours(x, weight, bias, z):
        return batch_norm(
            x, None, None, weight, bias, True, backend=backend, activation="silu", residual=z
        )

    def reference(x, weight, bias, z):
        return torch.nn.functional.silu(
            torch.nn.functional.batch_norm(x, None, None, weight, bias, True) + z
        )

    for got, want in zip(penalty(ours), penalty(reference), strict=True):
        torch.testing.assert_close(got, want)
