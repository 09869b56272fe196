"""Kernel-only CPU timing: the Numba ``(N, C, L)`` kernels against ATen's, outputs preallocated.

``benchmarks/cpu.py`` times whole calls (checks, autograd, allocation); this script times the
kernels alone, so a kernel change can be judged before the per-call work is added to it:

* forward: :func:`batchnorm.kernels.cpu.cpu_numba.forward_ncl` against
  ``aten::native_batch_norm.out`` (training, statistics and output);
* backward: :func:`batchnorm.kernels.cpu.cpu_numba.backward_ncl` against
  ``aten::native_batch_norm_backward`` (``dx``, ``dγ``, ``dβ``).

Both run on one thread, back to back (warm caches), median of ``--rounds``; ATen's backward
allocates its outputs, which it cannot be told not to. The outputs are compared before timing.

Usage::

    python benchmarks/cpu_kernels.py [--rounds 30] [--tiny]
"""

from __future__ import annotations

import argparse

import numba
import numpy as np
import torch

from batchnorm.backends.cpu_backend import _as_array
from batchnorm.kernels.cpu import cpu_numba
from harness import median_call_ms

#: ``(N, C, L)`` views of ``benchmarks/cpu.py``'s contiguous cases.
SHAPES = [(64, 64, 3136), (64, 256, 196), (32, 128, 784), (256, 64, 100)]
TINY_SHAPES = [(4, 3, 50)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
EPS = 1e-5


def _row(shape: tuple[int, int, int], dtype: torch.dtype, rounds: int) -> str:
    """Checks both kernels against ATen on one case, then times them; returns the printed row."""
    gen = torch.Generator().manual_seed(0)
    x = (1.0 + torch.randn(shape, generator=gen)).to(dtype)  # (N, C, L)
    dy = torch.randn(shape, generator=gen).to(dtype)  # (N, C, L)
    channels = shape[1]
    ones, zeros = torch.ones(channels), torch.zeros(channels)  # (C,) float32 γ, β
    y_ours, y_aten = torch.empty_like(x), torch.empty_like(x)
    dx_ours = torch.empty_like(x)
    stats = np.empty((3, channels))  # mean, var, invstd (C,) each
    grads = np.empty((2, channels))  # dγ, dβ (C,) each
    x_arr, dy_arr = _as_array(x), _as_array(dy)
    weight64, bias64 = np.ones(channels), np.zeros(channels)

    def ours_forward() -> None:
        cpu_numba.forward_ncl(x_arr, weight64, bias64, EPS, _as_array(y_ours), *stats)

    def aten_forward() -> tuple[torch.Tensor, ...]:
        return torch.ops.aten.native_batch_norm.out(
            x, ones, zeros, torch.zeros(channels), torch.ones(channels), True, 0.1, EPS,
            out=y_aten, save_mean=torch.empty(channels), save_invstd=torch.empty(channels),
        )  # fmt: skip

    _, mean, invstd = aten_forward()  # (C,) float32 each

    def ours_backward() -> None:
        cpu_numba.backward_ncl(
            dy_arr, x_arr, weight64, mean.double().numpy(), invstd.double().numpy(),
            _as_array(dx_ours), *grads,
        )  # fmt: skip

    def aten_backward() -> tuple[torch.Tensor, ...]:
        return torch.ops.aten.native_batch_norm_backward(
            dy, x, ones, None, None, mean, invstd, True, EPS, [True, True, True]
        )

    ours_forward()
    ours_backward()
    dx_aten = aten_backward()[0]
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(y_ours.float(), y_aten.float(), atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(dx_ours.float(), dx_aten.float(), atol=tolerance, rtol=tolerance)
    forward = [median_call_ms(call, rounds) for call in (ours_forward, aten_forward)]
    backward = [median_call_ms(call, rounds) for call in (ours_backward, aten_backward)]
    name = "x".join(map(str, shape))
    dtype_name = str(dtype).removeprefix("torch.")
    return (
        f"{name:>12} {dtype_name:8} forward numba {forward[0]:7.3f} aten {forward[1]:7.3f} "
        f"(aten/numba ×{forward[1] / forward[0]:.2f}) | backward numba {backward[0]:7.3f} "
        f"aten {backward[1]:7.3f} (×{backward[1] / backward[0]:.2f})"
    )


def main(argv: list[str] | None = None) -> int:
    """Runs the comparison and prints one row per case; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed calls per entry")
    parser.add_argument("--tiny", action="store_true", help="smoke test: one tiny shape")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    print("ms per call, 1 thread, kernels only (outputs preallocated where ATen allows)")
    for shape in TINY_SHAPES if args.tiny else SHAPES:
        for dtype in DTYPES.values():
            print(_row(shape, dtype, args.rounds), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
