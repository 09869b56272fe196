"""Every routing threshold the backends use, with where, when and how it was measured.

A threshold is a fact about the machine it was measured on (design.md: the CPU model changes
between sessions and between us and our users). The tables here are the committed defaults: the
cold start where nothing was measured on the machine that runs. Each comes with a
:class:`Measured` record; the figures behind it are in ``benchmarks/results/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch

from batchnorm.backends.memory import ADVISE_FROM_BYTES

__all__ = [
    "ALL_KERNEL_CASES",
    "CPU_KERNELS_ONE_THREAD",
    "CPU_KERNELS_THREADED",
    "CPU_NUMBA_ONLY",
    "FRESH_MAPPING_BYTES",
    "MEASURED_KERNEL_CASES",
    "MEASURED_NUMBA_CASES",
    "MEASURED_THREADED_CASES",
    "TRITON_CASES",
    "TRITON_ON_H200",
    "KernelCase",
    "Measured",
    "TritonCase",
]


class Measured(NamedTuple):
    """Where a table of thresholds comes from.

    Attributes:
        machine: the machine, as ``lscpu``/``nvidia-smi`` named it.
        threads: ``torch.get_num_threads()`` during the measurement (0 for a GPU).
        date: the day of the run.
        command: the command that produced the figures (from the repository root).
        results: the committed results file(s) under ``benchmarks/results/``.
    """

    machine: str
    threads: int
    date: str
    command: str
    results: str


#: A case of the CPU kernels: (pass, layout, dtype), pass "forward", "backward" or "inference",
#: layout "ncl" (contiguous (N, C, L)) or "rows" (channels innermost, (M, C)).
KernelCase = tuple[str, str, torch.dtype]
#: Every case the CPU kernels implement, each from the smallest input (1 byte); tests use it.
ALL_KERNEL_CASES: Mapping[KernelCase, int] = {
    (pass_name, layout, dtype): 1
    for pass_name in ("forward", "backward", "inference")
    for layout in ("ncl", "rows")
    for dtype in (torch.float32, torch.float64, torch.bfloat16)
}
#: Input bytes from which each output is a fresh ``mmap`` for glibc's allocator (its largest
#: dynamic mmap threshold, 32 MiB on 64-bit Linux): ATen then pays a page fault per 4 KiB of
#: output, the kernels' huge-page outputs one per 2 MiB (:mod:`batchnorm.backends.memory`).
FRESH_MAPPING_BYTES = ADVISE_FROM_BYTES

#: The results files record only "Intel(R) Xeon(R) Processor", 2 cores (issue #20 names it an
#: Emerald Rapids Xeon); AVX-512, under KVM.
_XEON = "2-core Intel(R) Xeon(R) Processor (AVX-512, KVM), 24 GiB"

CPU_NUMBA_ONLY = Measured(
    _XEON,
    1,
    "2026-11-26",
    "python benchmarks/cpu.py --threads 1; python benchmarks/cpu_kernels.py",
    "cpu-2026-11-26.json, cpu-2026-11-26.log",
)
#: Where Numba's kernels alone (no C kernels: not built, or neither AVX-512 nor AVX2) measured
#: faster than ATen's, case → smallest input in bytes (:data:`CPU_NUMBA_ONLY`): the contiguous
#: forward of float32/float64 from 512 KiB (its channel slice re-read from L2), the contiguous
#: float32 backward from 512 KiB and bfloat16 backward from 2 MiB, every float32 pass once outputs
#: are fresh mappings (page faults avoided). ATen was as fast or faster elsewhere.
MEASURED_NUMBA_CASES: Mapping[KernelCase, int] = {
    ("forward", "ncl", torch.float32): 1 << 19,
    ("forward", "ncl", torch.float64): 1 << 19,
    ("backward", "ncl", torch.float32): 1 << 19,
    ("backward", "ncl", torch.bfloat16): 2 << 20,
    ("forward", "rows", torch.float32): FRESH_MAPPING_BYTES,
    ("backward", "rows", torch.float32): FRESH_MAPPING_BYTES,
    ("inference", "ncl", torch.float32): FRESH_MAPPING_BYTES,
    ("inference", "rows", torch.float32): FRESH_MAPPING_BYTES,
}

CPU_KERNELS_ONE_THREAD = Measured(
    _XEON,
    1,
    "2026-11-27",
    "python benchmarks/cpu_sizes.py --threads 1",
    "cpu-2026-11-27.json, cpu-2026-11-27.log",
)
#: Where the C kernels (float32, bfloat16; Numba's for float64) measured faster than ATen's on
#: one thread (:data:`CPU_KERNELS_ONE_THREAD`): whole calls against ATen behind the same checks,
#: ``(N, 64, 14, 14)`` contiguous and channels_last; below these sizes the per-call work in
#: Python costs more than the kernels save.
MEASURED_KERNEL_CASES: Mapping[KernelCase, int] = {
    ("forward", "ncl", torch.float32): 1 << 19,
    ("backward", "ncl", torch.float32): 2 << 20,
    ("inference", "ncl", torch.float32): 1 << 20,
    ("forward", "rows", torch.float32): 2 << 20,
    ("backward", "rows", torch.float32): 4 << 20,
    ("inference", "rows", torch.float32): 1 << 20,
    ("forward", "ncl", torch.bfloat16): 2 << 20,
    ("backward", "ncl", torch.bfloat16): 1 << 19,
    ("inference", "ncl", torch.bfloat16): 2 << 20,
    ("forward", "rows", torch.bfloat16): 1 << 19,
    ("backward", "rows", torch.bfloat16): 1 << 19,
    ("inference", "rows", torch.bfloat16): 1 << 20,
    ("forward", "ncl", torch.float64): 1 << 19,
}

CPU_KERNELS_THREADED = Measured(
    _XEON,
    2,
    "2026-11-27",
    "python benchmarks/cpu_sizes.py --threads 2",
    "cpu-2026-11-27-threads2.json, cpu-2026-11-27-threads2.log",
)
#: The same on several threads, the C kernels on torch's OpenMP team
#: (:data:`CPU_KERNELS_THREADED`); the float32 (M, C) training passes and bfloat16 inference
#: start earlier than on one thread. Measured on two threads only.
MEASURED_THREADED_CASES: Mapping[KernelCase, int] = {
    ("forward", "ncl", torch.float32): 1 << 19,
    ("backward", "ncl", torch.float32): 2 << 20,
    ("inference", "ncl", torch.float32): 1 << 20,
    ("forward", "rows", torch.float32): 1 << 20,
    ("backward", "rows", torch.float32): 1 << 20,
    ("inference", "rows", torch.float32): 1 << 20,
    ("forward", "ncl", torch.bfloat16): 2 << 20,
    ("backward", "ncl", torch.bfloat16): 1 << 19,
    ("inference", "ncl", torch.bfloat16): 1 << 20,
    ("forward", "rows", torch.bfloat16): 1 << 19,
    ("backward", "rows", torch.bfloat16): 1 << 19,
    ("inference", "rows", torch.bfloat16): 1 << 19,
    ("forward", "ncl", torch.float64): 1 << 19,
}


class TritonCase(NamedTuple):
    """Where the Triton kernels take a layout: both bounds must hold."""

    min_values: int  # numel of the input
    min_row: int  # L, the values per (sample, channel) row


TRITON_ON_H200 = Measured(
    "NVIDIA H200 (one card)",
    0,
    "2026-11-26",
    "BATCHNORM_BENCHMARK_COMMIT=2a50eac timeout 300 python benchmarks/gpu.py",
    "nvidia-h200-2026-11-26.json, nvidia-h200-2026-11-26.log",
)
#: ``(fused, channels_innermost)`` → where the ``triton`` backend's training forward+backward
#: measured faster than eager ATen (:data:`TRITON_ON_H200`): plain NCHW from 2²⁵ values with
#: rows (L) of ≥ 2048; plain channels_last from 2²⁷ values, L ≥ 2048; with a residual and an
#: activation, NCHW from 2²⁵ values and channels_last from 2²⁶, L ≥ 512. Elsewhere ATen won
#: (the host's work around Triton's launches, ~0.95 ms per step on that card, hid the kernels).
TRITON_CASES: dict[tuple[bool, bool], TritonCase] = {
    (False, False): TritonCase(min_values=1 << 25, min_row=2048),
    (False, True): TritonCase(min_values=1 << 27, min_row=2048),
    (True, False): TritonCase(min_values=1 << 25, min_row=512),
    (True, True): TritonCase(min_values=1 << 26, min_row=512),
}
