"""Shared pieces of the Triton tests: interpreter setup, tolerances, inputs, float64 references.

Importing this module sets ``TRITON_INTERPRET=1`` (unless a GPU run set it otherwise) before
Triton is first used, so the kernels run on CPU tensors; the test modules skip when Triton is
not installed.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tolerances import TOLERANCES, tol  # noqa: F401  (re-exported for the Triton tests)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: (shape, layout) cases: C and M prime, 1×1 spatial, N = 2, 1D/3D/5D, channels_last, strided.
CASES: list[tuple[tuple[int, ...], str]] = [
    ((2, 3, 5, 7), "contiguous"),  # M = 70, C = 3
    ((2, 5, 3, 3), "channels_last"),  # channels contiguous, C = 5
    ((13, 7), "contiguous"),  # BatchNorm1d (N, C): L = 1, M = 13 prime
    ((2, 11, 1, 1), "contiguous"),  # 1×1 spatial: M = 2
    ((1, 5, 13), "noncontiguous"),  # M = 13 prime, strided last axis
    ((2, 3, 2, 3, 5), "channels_last"),  # channels_last_3d
]

ACTIVATION_FUNCTIONS = {
    None: lambda u: u,
    "relu": F.relu,
    "leaky_relu": lambda u: F.leaky_relu(u, 0.2),
    "silu": F.silu,
    "gelu": F.gelu,
}
NEGATIVE_SLOPE = 0.2


def make(
    shape: Sequence[int],
    layout: str = "contiguous",
    dtype: torch.dtype = torch.float32,
    *,
    seed: int = 0,
    offset: float = 0.0,
) -> torch.Tensor:
    """A seeded ``offset + randn(shape)`` in ``dtype`` and the requested layout."""
    shape = tuple(shape)
    gen = torch.Generator().manual_seed(seed)
    if layout == "noncontiguous":
        big = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen, dtype=torch.float64)
        x = (offset + big).to(dtype)[..., ::2]
        assert not x.is_contiguous()
        return x
    x = (offset + torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x


def reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    dy: torch.Tensor,
    activation: str | None = None,
    eps: float = 1e-5,
) -> dict[str, torch.Tensor | None]:
    """Float64 ``act(F.batch_norm(x) + z)`` and its gradients by torch autograd.

    Returns ``y``, ``mean``, ``var`` (biased), ``invstd`` and ``dx``, ``dweight``, ``dbias``,
    ``dresidual`` (``None`` for absent inputs), all float64.
    """
    leaves = [
        None if t is None else t.detach().double().requires_grad_()
        for t in (x, weight, bias, residual)
    ]
    x64, w64, b64, z64 = leaves
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x64.detach(), dim=dims, correction=0)
    u = F.batch_norm(x64, None, None, w64, b64, training=True, eps=eps)
    if z64 is not None:
        u = u + z64
    y = ACTIVATION_FUNCTIONS[activation](u)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, present, dy.double()))
    dx, dw, db, dz = (None if t is None else next(grads) for t in leaves)
    return {
        "y": y.detach(),
        "mean": mean,
        "var": var,
        "invstd": torch.rsqrt(var + eps),
        "dx": dx,
        "dweight": dw,
        "dbias": db,
        "dresidual": dz,
    }


def assert_close_to(
    actual: torch.Tensor | None, expected: torch.Tensor | None, dtype: torch.dtype, name: str
) -> None:
    """``actual`` (any dtype) ≈ float64 ``expected`` at the tolerance of ``dtype``."""
    assert (actual is None) == (expected is None), name
    if actual is None or expected is None:
        return
    assert actual.shape == expected.shape, f"{name}: {actual.shape} vs {expected.shape}"
    torch.testing.assert_close(
        actual.double(), expected, **tol(dtype), msg=lambda m: f"{name}: {m}"
    )
