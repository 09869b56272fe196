"""Scratch memory of the split and persistent kernels, cached per device and stream.

The reductions write their partial summaries to an fp32 buffer and count arrivals in int32
words; both are allocated once per device and stream (grown geometrically) instead of once per
launch, and the counters are zero-filled only when allocated: every kernel leaves them at zero
(``arrive_last`` and ``grid_barrier`` in :mod:`.common`).
"""

from __future__ import annotations

import torch

__all__ = ["scratch"]


class _Scratch:
    """The fp32 partial summaries and the int32 arrival counters of one device and stream."""

    def __init__(self) -> None:
        self.partial: torch.Tensor | None = None
        self.counter: torch.Tensor | None = None
        self.retired: list[torch.Tensor] = []  # outgrown buffers a captured graph may still use


_SCRATCH: dict[tuple[str, int | None, int], _Scratch] = {}


def _stream_key(device: torch.device) -> tuple[str, int | None, int]:
    """``(type, index, raw stream)``: scratch is never shared between streams."""
    if device.type != "cuda":
        return (device.type, device.index, 0)
    index = device.index if device.index is not None else torch.cuda.current_device()
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    stream = raw(index) if raw is not None else torch.cuda.current_stream(index).cuda_stream
    return ("cuda", index, int(stream))


def _capturing(device: torch.device) -> bool:
    """Whether the current CUDA stream is being captured into a graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def scratch(device: torch.device, floats: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(partial, counter)``: at least ``floats`` fp32 and ``2·counters`` int32 words.

    Cached per device and stream and grown geometrically; the counters are zeros when first
    allocated and every kernel leaves them at zero (see ``arrive_last`` and ``grid_barrier`` in
    :mod:`.common`). A counter buffer allocated while a CUDA graph is being captured is not
    kept (its zero fill runs only when the graph replays); outgrown buffers are kept alive, since
    a captured graph may still point at them.
    """
    key = _stream_key(device)
    entry = _SCRATCH.get(key)
    if entry is None:
        entry = _SCRATCH[key] = _Scratch()
    partial, counter = entry.partial, entry.counter
    if partial is None or partial.numel() < floats:
        if partial is not None:
            entry.retired.append(partial)
        partial = torch.empty(max(floats, 1024, 2 * (0 if partial is None else partial.numel())),
                              dtype=torch.float32, device=device)  # fmt: skip
        entry.partial = partial
    if counter is None or counter.numel() < 2 * counters:
        size = max(2 * counters, 256, 2 * (0 if counter is None else counter.numel()))
        fresh = torch.zeros(size, dtype=torch.int32, device=device)
        if _capturing(device):
            return partial, fresh
        if counter is not None:
            entry.retired.append(counter)
        counter = entry.counter = fresh
    return partial, counter
