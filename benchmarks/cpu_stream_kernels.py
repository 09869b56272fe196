"""Kernel-only CPU timing of the C passes (``cpu_stream``) against ATen's, once per ISA.

``benchmarks/cpu.py`` times whole calls (checks, autograd, allocation, routing); this script
times the three C passes alone on preallocated outputs, on one thread, back to back (warm
caches), for every instruction set this CPU runs them with (``cpu_stream.ISAS``), so that a
change to the vector code can be judged by itself:

* inference: ``cpu_stream.inference`` against ``aten::_native_batch_norm_legit_no_training``;
* forward: ``cpu_stream.train_forward`` (statistics, output, running buffers) against
  ``aten::native_batch_norm.out``;
* backward: ``cpu_stream.train_backward`` against ``aten::native_batch_norm_backward``.

ATen allocates the outputs it cannot be given. Each pass's output is compared with ATen's
before it is timed. Printed: milliseconds (median of ``--rounds``) and ATen/ours (above 1: ours
faster).

Usage::

    python benchmarks/cpu_stream_kernels.py [--rounds 30] [--tiny]
"""

from __future__ import annotations

import argparse
import sys

import torch

from batchnorm.kernels.cpu import cpu_stream
from harness import median_call_ms

#: ``(N, C, L)`` views of ``benchmarks/cpu.py``'s contiguous cases; (M, C) as ``(M, C, 0)``.
SHAPES = [(64, 64, 3136), (64, 256, 196), (32, 128, 784), (256, 64, 100), (4096, 512, 0)]
TINY_SHAPES = [(4, 3, 50), (40, 5, 0)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
EPS, MOMENTUM = 1e-5, 0.1


def _row(shape: tuple[int, int, int], dtype: torch.dtype, rounds: int) -> str:
    """Checks the three passes against ATen on one case, then times them; the printed row."""
    rows, channels, run = shape
    full = (rows, channels, run) if run else (rows, channels)  # the tensor's shape
    gen = torch.Generator().manual_seed(0)
    x = (1.0 + torch.randn(full, generator=gen)).to(dtype)
    dy = torch.randn(full, generator=gen).to(dtype)
    # ATen sees (M, C) as (M, C); ours takes it as rows of channels (run = 0).
    ones, zeros = torch.ones(channels), torch.zeros(channels)  # (C,) float32 γ, β
    running = (torch.zeros(channels), torch.ones(channels))  # (C,) each, moved by ours
    y, dx = torch.empty_like(x), torch.empty_like(x)
    mean, invstd = torch.empty(channels), torch.empty(channels)  # (C,) float32 each
    dweight, dbias = torch.empty(channels), torch.empty(channels)
    is_bf16 = dtype == torch.bfloat16
    address = torch.Tensor.data_ptr

    def ours_inference() -> None:
        cpu_stream.inference(
            address(x), address(y), rows, channels, run, is_bf16, address(ones), address(zeros),
            (address(running[0]), address(running[1])), EPS, 1,
        )  # fmt: skip

    def ours_forward() -> None:
        cpu_stream.train_forward(
            address(x), address(y), rows, channels, run, is_bf16, address(ones), address(zeros),
            EPS, MOMENTUM, (address(running[0]), address(running[1])),
            (address(mean), address(invstd)), 1,
        )  # fmt: skip

    def ours_backward() -> None:
        cpu_stream.train_backward(
            address(dy), address(x), address(dx), rows, channels, run, is_bf16, address(ones),
            (address(mean), address(invstd)), (address(dweight), address(dbias)), 1,
        )  # fmt: skip

    stats = (torch.zeros(channels), torch.ones(channels))  # ATen's inference statistics

    def aten_inference() -> object:
        return torch.ops.aten._native_batch_norm_legit_no_training(x, ones, zeros, *stats, 0.1, EPS)

    y_aten = torch.empty_like(x)

    def aten_forward() -> object:
        return torch.ops.aten.native_batch_norm.out(
            x, ones, zeros, torch.zeros(channels), torch.ones(channels), True, MOMENTUM, EPS,
            out=y_aten, save_mean=torch.empty(channels), save_invstd=torch.empty(channels),
        )  # fmt: skip

    def aten_backward() -> object:
        return torch.ops.aten.native_batch_norm_backward(
            dy, x, ones, None, None, mean, invstd, True, EPS, [True, True, True]
        )

    tolerance = 2e-2 if is_bf16 else 1e-4
    ours_inference()
    y_expected = aten_inference()[0]  # type: ignore[index]
    torch.testing.assert_close(y.float(), y_expected.float(), atol=tolerance, rtol=tolerance)
    ours_forward()
    aten_forward()
    torch.testing.assert_close(y.float(), y_aten.float(), atol=tolerance, rtol=tolerance)
    ours_backward()
    dx_expected = aten_backward()[0]  # type: ignore[index]
    torch.testing.assert_close(dx.float(), dx_expected.float(), atol=tolerance, rtol=tolerance)
    cells = []
    for name, ours, aten in (
        ("inference", ours_inference, aten_inference),
        ("forward", ours_forward, aten_forward),
        ("backward", ours_backward, aten_backward),
    ):
        ours_ms, aten_ms = median_call_ms(ours, rounds), median_call_ms(aten, rounds)
        cells.append(f"{name} ours {ours_ms:7.3f} aten {aten_ms:7.3f} ×{aten_ms / ours_ms:.2f}")
    label = "x".join(map(str, full))
    return f"{cpu_stream.isa():6} {label:>12} {str(dtype).removeprefix('torch.'):8} " + " | ".join(
        cells
    )


def main(argv: list[str] | None = None) -> int:
    """Runs the comparison for every ISA and prints one row per case; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed calls per entry")
    parser.add_argument("--tiny", action="store_true", help="smoke test: tiny shapes")
    args = parser.parse_args(argv)
    if not cpu_stream.SUPPORTED:
        print("the C kernels are not built or this CPU has neither AVX-512 nor AVX2")
        return 0
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, ISAs {cpu_stream.ISAS}; ms, median of "
          f"{args.rounds}; ×: ATen/ours")  # fmt: skip
    try:
        for isa in cpu_stream.ISAS:
            cpu_stream.use_isa(isa)
            for shape in TINY_SHAPES if args.tiny else SHAPES:
                for dtype in DTYPES.values():
                    print(_row(shape, dtype, args.rounds), flush=True)
    finally:
        cpu_stream.use_isa(cpu_stream.ISAS[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
