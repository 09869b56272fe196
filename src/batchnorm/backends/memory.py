"""Output allocation for the CPU backends: large buffers on transparent huge pages.

A fresh tensor of several MiB gets memory the operating system maps page by page when it is
first written. With 4 KiB pages, writing a 51 MB output costs about 12,500 page faults, more than
the batch norm itself: on the 2-core Xeon of ``benchmarks/cpu.py``, ``torch.empty_like`` plus a
copy of a ``(64, 64, 56, 56)`` float32 tensor took 37 ms, against 9 ms for the same copy into
memory already mapped. Linux maps 2 MiB pages instead (512 times fewer faults) where a program
asks for them with ``madvise(MADV_HUGEPAGE)``, when transparent huge pages are in ``madvise``
mode (the common default) or ``always``; with the advice the same allocation and copy took 14 ms.
PyTorch's CPU allocator gives that advice only when ``THP_MEM_ALLOC_ENABLE=1`` is set before it
starts, so the backends ask for their own outputs.

Only allocations of :data:`ADVISE_FROM_BYTES` or more are advised. Smaller ones are recycled
from glibc's heap, already mapped, where the advice cannot save faults and its system call
(which also splits the heap's memory map) measured about 0.15 ms slower per 12 MB backward.

The advice changes nothing but speed: the memory is an ordinary tensor from PyTorch's allocator,
freed by it. Elsewhere (other systems, huge pages ``never``, GPU tensors) :func:`empty_like` is
``torch.empty_like``.

References:
    Linux kernel documentation, "Transparent Hugepage Support" (admin-guide/mm/transhuge).
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import torch

__all__ = ["ADVISE_FROM_BYTES", "HUGE_PAGE_BYTES", "empty_like", "huge_pages_advisable"]

#: Size of a transparent huge page on x86-64 and arm64 (4 KiB base pages).
HUGE_PAGE_BYTES = 1 << 21
#: Smallest allocation advised: glibc's largest dynamic mmap threshold (64-bit Linux), from
#: which every allocation is a fresh mapping whose pages are all faulted in on first write.
ADVISE_FROM_BYTES = 32 << 20
#: ``MADV_HUGEPAGE`` from ``<sys/mman.h>`` (the same value on every Linux architecture).
_MADV_HUGEPAGE = 14
_THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _load_madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """libc's ``madvise`` when this is Linux with huge pages available, else ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        mode = _THP_MODE_FILE.read_text()  # e.g. "always [madvise] never"
    except OSError:
        return None
    if "[never]" in mode:
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_MADVISE = _load_madvise()


def huge_pages_advisable() -> bool:
    """Whether :func:`empty_like` advises huge pages on this machine."""
    return _MADVISE is not None


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(x)`` (same shape, dtype, device, memory format), huge pages advised.

    Args:
        x: the tensor to imitate.

    Returns:
        An uninitialized tensor; on CPU and from :data:`ADVISE_FROM_BYTES`, the 2 MiB-aligned
        part of its memory is advised ``MADV_HUGEPAGE`` before anything touches it.
    """
    out = torch.empty_like(x)
    nbytes = out.untyped_storage().nbytes()
    if _MADVISE is None or out.device.type != "cpu" or nbytes < ADVISE_FROM_BYTES:
        return out
    start = out.data_ptr()
    stop = start + nbytes
    first = -(-start // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES  # first huge-page boundary ≥ start
    last = stop // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES  # last boundary ≤ stop
    if last > first:
        _MADVISE(first, last - first, _MADV_HUGEPAGE)  # advice only: a failure changes nothing
    return out
