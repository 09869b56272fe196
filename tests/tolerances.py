"""The suite's one tolerance table: dtype → (atol, rtol) for values of order 1.

Every comparison is against an independent computation (``torch.nn``, a float64 formula, finite
differences) and every backend computes in float32 (float64 for float64 input) and rounds its
result once to the input dtype. So the error of a normalized output or of a gradient of a random
``dy`` is about half an ulp of |y| at the input dtype (2^-24 float32, 2^-11 float16, 2^-8
bfloat16) plus the float32 rounding of a reduction over up to a few thousand elements; the
values below are that with a little slack, measured against the float64 reference on every
backend (CPU kernels, ATen, the Triton kernels in the interpreter).
"""

from __future__ import annotations

import torch

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

# Per-channel statistics and dγ/dβ are float32 (float64 for float64 input) whatever the input
# dtype; they sum many products, so they get the float32 row's absolute error scaled up a little.
STATS_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-4, 1e-4),
}


def tol(dtype: torch.dtype) -> dict[str, float]:
    """``atol``/``rtol`` keyword arguments for ``torch.testing.assert_close`` at ``dtype``.

    Args:
        dtype: The dtype of the tensor under test.

    Returns:
        ``{"atol": ..., "rtol": ...}`` from :data:`TOLERANCES`.

    Raises:
        KeyError: For a dtype the table does not cover.
    """
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}
