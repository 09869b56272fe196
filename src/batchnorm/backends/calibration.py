"""The CPU kernels' routing measured on the machine that runs them, and where it is stored.

The committed thresholds of :mod:`batchnorm.backends.measured` were measured on one 2-core Xeon
at one and two threads; on other CPUs (and thread counts) our kernels can lose to ATen's where
that machine said they win. So the ``cpu`` backend's default routing (``CpuBackend()``, what
``auto`` runs) decides each case ``(pass, layout, dtype)`` at each thread count by measurement
here, in this order:

1. **stored**: a threshold of ``batchnorm calibrate`` (:func:`sweep`, sizes on a geometric
   ladder, our kernels ``CpuBackend(ALL_KERNEL_CASES)`` against ATen behind the same checks
   ``CpuBackend({})``, median of interleaved rounds): the kernels from that size on;
2. **lazy**: like ``cudnn.benchmark``, the first call of a case in a shape class
   (:func:`shape_class`: the size class ``[2^k, 2^(k+1))`` bytes, every input from 32 MiB on in
   one class, and the run class of the values the kernels read in one stretch, ``L`` of
   ``(N, C, L)`` or ``C`` of a channels-innermost input, by factors of 4) times both a few
   rounds on scratch tensors of the call's shape and layout (:data:`LAZY_ROUNDS`, within
   :data:`LAZY_BUDGET_S` once :data:`LAZY_MIN_ROUNDS` are done; about 0.1–0.6 s once), and the
   choice is stored for later calls and processes. A stored threshold answers only for the run
   class it was swept at (:data:`SWEEP_RUN`); every other run class is measured on first use,
   since how fast a kernel streams depends on how long its runs are (7×7 and 56×56 inputs of
   one size can fall on opposite sides);
3. **committed**: the tables of :mod:`batchnorm.backends.measured`, the cold start (inputs under
   :data:`LAZY_MIN_BYTES`, where per-call work decides and measuring is noise, and whenever
   nothing may be measured).

Tables live in the user's cache directory (:func:`cache_dir`: ``$BATCHNORM_CACHE_DIR``, else
``$XDG_CACHE_HOME/batchnorm``, else ``~/.cache/batchnorm``), one JSON file per key
(:func:`routing_key`: CPU model, the ISA flags the kernels care about, thread count, torch,
batchnorm and kernel versions), written atomically (temporary file, then ``os.replace``); a
file that cannot be read or parsed is ignored with a :class:`CalibrationWarning`.

``BATCHNORM_CALIBRATE=0`` (also ``false``/``no``/``off``) measures nothing: a stored table
that matches is still used, the committed defaults otherwise. Which kernel runs changes the
rounding of the result (within the dtype's tolerance, not bit for bit), so runs that must be
bitwise reproducible should set it (``torch.use_deterministic_algorithms(True)`` also stops
lazy measuring). Nothing is measured under tracing or compilation, under ``torch.func``
transforms, inside somebody else's OpenMP region, or from inside a measurement.

This module holds no kernel and imports no backend: the measuring backends are handed in by
:class:`batchnorm.backends.cpu_backend.CpuBackend`.

Why this file is long: the key, the file format and its checks, the timing, the lazy
measurement under its lock and the sweep all serve one :class:`RoutingTable`; apart, each part
would reach into the others' records.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import random
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from batchnorm import _compat
from batchnorm.backends.base import Backend, Call, compute_dtype
from batchnorm.backends.measured import KernelCase

__all__ = [
    "CACHE_DIR_ENV_VAR",
    "CALIBRATE_ENV_VAR",
    "LAZY_MIN_BYTES",
    "CalibrationWarning",
    "Decision",
    "RoutingTable",
    "SweepPoint",
    "Timing",
    "cache_dir",
    "calibrating",
    "ladder",
    "machine",
    "remove",
    "routing_key",
    "run_class",
    "run_length",
    "shape_class",
    "size_class",
    "sweep",
    "sweep_shape",
    "table_for",
    "threshold_from",
    "time_passes",
]

CACHE_DIR_ENV_VAR = "BATCHNORM_CACHE_DIR"
CALIBRATE_ENV_VAR = "BATCHNORM_CALIBRATE"
#: Version of the file format (part of the key: an older file is not read).
FORMAT = 2
#: The ISA flags of ``/proc/cpuinfo`` the kernels' speed depends on (part of the key).
ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_bf16", "amx_tile")
#: Smallest input (bytes) measured lazily: below it the committed tables decide (ATen there).
LAZY_MIN_BYTES = 64 << 10
#: Largest size class: every input from ``2**LAZY_MAX_CLASS`` bytes (32 MiB) on shares one,
#: measured just above that size (:func:`scratch_shape`: the batch dimension cut down).
LAZY_MAX_CLASS = 25
#: Rounds of a lazy measurement (each: one call of each side, in a shuffled order) after one
#: untimed warm-up round; it stops after :data:`LAZY_MIN_ROUNDS` once :data:`LAZY_BUDGET_S`
#: seconds have passed.
LAZY_ROUNDS = 11
LAZY_MIN_ROUNDS = 5
LAZY_BUDGET_S = 0.5
#: The kernels win a size when ATen's median time is at least this many times theirs. Ties go
#: to ATen, whose rounding is ``F.batch_norm``'s, and a case the kernels win by less than 5%
#: loses little there. The margin does not cover every spread: for outputs of a few MiB to
#: 32 MiB repeated measurements of one case moved by far more on the 2-core Xeon of 2026-12-02
#: (``benchmarks/results/cpu-2026-12-02-calibration-stability.log``: ×0.95–×1.40), with
#: whether the output lands on memory already mapped.
WIN_RATIO = 1.05
#: How long one sample of :func:`time_passes` lasts (ms; back-to-back calls of one backend, at
#: most MAX_CALLS_PER_SAMPLE): a 1 ms call is timed 4 times in a row, a slow one once.
SAMPLE_MS = 4.0
MAX_CALLS_PER_SAMPLE = 8
#: Largest run class (:func:`run_class`): every run from 2048 values on.
RUN_MAX_CLASS = 6
#: The sweep's inputs, ``(N, 64, 16, 16)`` (``benchmarks/cpu_sizes.py``: ``(N, 64, 14, 14)``).
SWEEP_CHANNELS, SWEEP_SPATIAL = 64, (16, 16)
#: The run class a sweep's thresholds stand for, per layout (runs of 256 and of 64 values; the
#: sweep's smallest sizes, ``(2, 64, 1, L)``, are below the sizes where this matters).
SWEEP_RUN = {
    "ncl": (SWEEP_SPATIAL[0] * SWEEP_SPATIAL[1]).bit_length() // 2,
    "rows": SWEEP_CHANNELS.bit_length() // 2,
}
PASSES = ("forward", "backward", "inference")
LAYOUTS = ("ncl", "rows")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}

_log = logging.getLogger(__name__)


class CalibrationWarning(UserWarning):
    """A stored routing table could not be read or written (the defaults are used instead)."""


# ---------------------------------------------------------------------------------------------
# Where and under which key


def cache_dir() -> Path:
    """The folder of the stored tables: ``$BATCHNORM_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/batchnorm``, else ``~/.cache/batchnorm`` (read on each call)."""
    explicit = os.environ.get(CACHE_DIR_ENV_VAR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "batchnorm"


def calibrating() -> bool:
    """Whether measuring is allowed: ``BATCHNORM_CALIBRATE`` is not ``0``/``false``/``no``/``off``
    and torch's deterministic algorithms are off (read on each call)."""
    value = os.environ.get(CALIBRATE_ENV_VAR, "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    return not torch.are_deterministic_algorithms_enabled()


_MACHINE: tuple[str, tuple[str, ...]] | None = None


def machine() -> tuple[str, tuple[str, ...]]:
    """``(CPU model, ISA flags of ISA_FLAGS it has)``: ``/proc/cpuinfo``'s "model name" and
    "flags", else ``platform.processor()`` and no flags. Read once per process."""
    global _MACHINE
    if _MACHINE is None:
        model, flags = "", set[str]()
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
                for line in info:
                    name, _, value = line.partition(":")
                    name = name.strip()
                    if name == "model name" and not model:
                        model = value.strip()
                    elif name == "flags" and not flags:
                        flags = set(value.split())
                    if model and flags:
                        break
        except OSError:
            pass
        model = model or platform.processor() or platform.machine() or "unknown CPU"
        _MACHINE = (model, tuple(flag for flag in ISA_FLAGS if flag in flags))
    return _MACHINE


def _package_version() -> str:
    """This package's installed version ("unknown" from a bare source tree)."""
    try:
        return importlib.metadata.version("batchnorm")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - always installed here
        return "unknown"


def routing_key(threads: int, kernels: str) -> dict[str, Any]:
    """What a stored table is valid for: this CPU, ``threads``, these versions.

    Args:
        threads: ``torch.get_num_threads()`` of the calls the table routes.
        kernels: which kernels run, with versions (e.g. ``"c+numba-0.61.0"``): the backend's
            :meth:`~batchnorm.backends.cpu_backend.CpuBackend.kernel_set`.
    """
    model, flags = machine()
    return {
        "format": FORMAT,
        "cpu": model,
        "isa": list(flags),
        "threads": threads,
        "torch": torch.__version__,
        "batchnorm": _package_version(),
        "kernels": kernels,
    }


def _machine_digest(key: Mapping[str, Any]) -> str:
    """12 hex digits naming a key without its thread count (one machine, all counts)."""
    rest = {name: value for name, value in key.items() if name != "threads"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()[:12]


def table_path(key: Mapping[str, Any], folder: Path | None = None) -> Path:
    """``<cache>/cpu-routing-<machine digest>-t<threads>.json``."""
    folder = cache_dir() if folder is None else folder
    return folder / f"cpu-routing-{_machine_digest(key)}-t{key['threads']}.json"


def stored_paths(key: Mapping[str, Any], folder: Path | None = None) -> list[Path]:
    """The stored files of this machine and versions, any thread count, by thread count."""
    folder = cache_dir() if folder is None else folder
    found = folder.glob(f"cpu-routing-{_machine_digest(key)}-t*.json")

    def threads(path: Path) -> int:
        tail = path.stem.rpartition("-t")[2]
        return int(tail) if tail.isdigit() else 0

    return sorted(found, key=threads)


# ---------------------------------------------------------------------------------------------
# Sizes


def size_class(nbytes: int) -> int:
    """The lazy measurement's size class of an input of ``nbytes`` bytes: ``⌊log2⌋``, capped."""
    return min(nbytes.bit_length() - 1, LAZY_MAX_CLASS)


def run_length(shape: Sequence[int], layout: str) -> int:
    """How many values the kernels read in one stretch of a channel: ``L`` = the product of the
    spatial sizes for ``"ncl"`` (``(N, C, L)``), ``C`` for ``"rows"`` (channels innermost)."""
    if layout == "rows":
        return int(shape[1])
    run = 1
    for size in shape[2:]:
        run *= int(size)
    return run


def run_class(run: int) -> int:
    """``run.bit_length() // 2``, capped at :data:`RUN_MAX_CLASS`: classes a factor 4 wide, 1,
    2–7, 8–31, 32–127, 128–511, 512–2047 and 2048 on. Runs of 7×7 and 10×10 values share a
    class, 14×14 and 16×16 another, 28×28 a third, 56×56 the last."""
    return min(max(run, 1).bit_length() // 2, RUN_MAX_CLASS)


#: A lazy decision's class: ``(size class, run class)``.
ShapeClass = tuple[int, int]


def shape_class(nbytes: int, run: int) -> ShapeClass:
    """The class of an input of ``nbytes`` bytes read in runs of ``run`` values."""
    return (size_class(nbytes), run_class(run))


def ladder(smallest: int, largest: int, factor: int) -> list[int]:
    """``smallest, smallest·factor, …`` up to ``largest`` (bytes), the sweep's sizes."""
    if smallest < 1 or largest < smallest or factor < 2:
        raise ValueError(
            f"sizes: expected 1 <= smallest <= largest and factor >= 2, got {smallest}, "
            f"{largest}, {factor}"
        )
    sizes = [smallest]
    while sizes[-1] * factor <= largest:
        sizes.append(sizes[-1] * factor)
    return sizes


def sweep_shape(nbytes: int, dtype: torch.dtype) -> tuple[int, ...]:
    """The sweep's input of ``nbytes`` (exactly, for powers of two): ``(N, 64, 16, 16)``, or
    ``(2, 64, 1, L)`` below two such samples (as ``benchmarks/cpu_sizes.py``'s
    ``(N, 64, 14, 14)``: the same memory order, any ``L`` for both kernels and ATen's)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    channels, spatial = SWEEP_CHANNELS, SWEEP_SPATIAL[0] * SWEEP_SPATIAL[1]
    values = max(nbytes // itemsize, 4 * channels)
    batch = max(2, values // (channels * spatial))
    length = values // (batch * channels)
    if length == spatial:
        return (batch, channels, *SWEEP_SPATIAL)
    return (batch, channels, 1, length)


def scratch_shape(shape: Sequence[int], itemsize: int) -> tuple[int, ...] | None:
    """The shape a lazy measurement times for an input of ``shape``: ``shape`` itself below
    twice the top class's floor (``2**LAZY_MAX_CLASS`` bytes), else cut down (the batch
    dimension, then the last ones) to the fewest values not under that floor (the top class
    holds every larger input; the fresh-mapping regime of ``FRESH_MAPPING_BYTES`` starts
    there); ``None`` when that cannot be done keeping two values per channel."""
    floor = 1 << LAZY_MAX_CLASS
    dims = list(shape)

    def size() -> int:
        total = itemsize
        for dim in dims:
            total *= dim
        return total

    for dim in (0, *range(len(dims) - 1, 1, -1)):
        if size() < 2 * floor:
            break
        per_unit = size() // dims[dim]  # bytes per index of this dimension
        dims[dim] = max(1, -(-floor // per_unit))  # ⌈floor / per_unit⌉
    if size() >= 4 * floor or size() // (itemsize * max(dims[1], 1)) < 2:
        return None
    return tuple(dims)


def scratch_input(
    shape: Sequence[int], layout: str, dtype: torch.dtype, generator: torch.Generator
) -> torch.Tensor:
    """Random values of ``shape`` in ``layout`` (``"ncl"``: contiguous; ``"rows"``: channels
    innermost) from ``generator`` (torch's global generator is not touched)."""
    shape = tuple(shape)
    if layout == "ncl":
        return torch.randn(shape, generator=generator).to(dtype)
    moved = torch.randn((shape[0], *shape[2:], shape[1]), generator=generator)  # (N, *, C)
    return moved.to(dtype).movedim(-1, 1)  # (N, C, *), channels innermost


# ---------------------------------------------------------------------------------------------
# Timing


class Timing(NamedTuple):
    """Median wall-clock times (ms) of one pass, our kernels and ATen, over ``rounds``."""

    kernels_ms: float
    aten_ms: float
    rounds: int

    @property
    def ratio(self) -> float:
        """ATen's time over the kernels' (above 1: the kernels are faster)."""
        return self.aten_ms / self.kernels_ms if self.kernels_ms > 0 else float("inf")

    @property
    def kernels_win(self) -> bool:
        """Whether the kernels are faster by at least :data:`WIN_RATIO`."""
        return self.aten_ms >= WIN_RATIO * self.kernels_ms


def _calls_per_sample(seconds_per_call: float) -> int:
    """Back-to-back calls in one sample of :func:`time_passes`: about :data:`SAMPLE_MS` of
    them, at most :data:`MAX_CALLS_PER_SAMPLE`."""
    wanted = SAMPLE_MS / max(seconds_per_call * 1e3, 1e-3)
    return max(1, min(MAX_CALLS_PER_SAMPLE, int(wanted + 0.999)))


def time_passes(
    kernels: Backend,
    aten: Backend,
    passes: Sequence[str],
    shape: Sequence[int],
    layout: str,
    dtype: torch.dtype,
    *,
    rounds: int,
    min_rounds: int | None = None,
    budget_s: float | None = None,
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, Timing]:
    """Times whole calls of ``kernels`` and ``aten`` on a scratch input, interleaved.

    Each round runs both backends in a shuffled order (seeded), with the caches as a network
    leaves them for a batch norm's input, which the layer before has just written: the scratch
    input was read by the previous call, no flush in between. A sample is the mean of a few
    back-to-back calls of one pass of one backend (:data:`SAMPLE_MS`), so that each call's
    output lands on the memory the previous call of that pass freed, as in a training or
    inference loop and as ``benchmarks/cpu.py`` times them. The passes: the training forward
    (``train`` on a :class:`Call`, autograd graph built), the backward (``torch.autograd.grad``
    of a forward's output, that forward untimed), evaluation (``evaluate``, no grad).
    Everything is made here from a private generator: no tensor of the caller's is read or
    written, torch's global random state is not drawn from.

    Args:
        kernels, aten: the backends to compare (``CpuBackend(ALL_KERNEL_CASES)``,
            ``CpuBackend({})``).
        passes: some of ``"forward"``, ``"backward"``, ``"inference"``.
        shape: the input's shape ``(N, C, *)``.
        layout: ``"ncl"`` (contiguous) or ``"rows"`` (channels innermost).
        dtype: the input's dtype.
        rounds: timed rounds at most.
        min_rounds: with ``budget_s``: stop once this many are done and ``budget_s`` seconds
            have passed since the start.
        budget_s: see ``min_rounds``.
        warmup: untimed rounds first (Numba's compilation, the allocator).
        seed: of the scratch values and of the order.

    Returns:
        pass → :class:`Timing` (medians in ms).
    """
    generator = torch.Generator().manual_seed(seed)
    order = random.Random(seed)
    training = [name for name in passes if name in ("forward", "backward")]
    times: dict[tuple[str, str], list[float]] = {}
    variants = {"kernels": kernels, "aten": aten}
    start = time.perf_counter()
    with torch.inference_mode(False), torch.autocast("cpu", enabled=False):
        x = scratch_input(shape, layout, dtype, generator)
        channels = x.shape[1]
        stats = compute_dtype(dtype)
        weight = torch.rand(channels, generator=generator).to(stats) + 0.5  # (C,)
        bias = torch.randn(channels, generator=generator).to(stats)  # (C,)
        running_mean = torch.zeros(channels, dtype=stats)  # (C,)
        running_var = torch.ones(channels, dtype=stats)  # (C,)
        dy = scratch_input(shape, layout, dtype, generator) if "backward" in passes else None
        if training:
            x.requires_grad_()
            weight.requires_grad_()
            bias.requires_grad_()
        train = Call(x, running_mean, running_var, weight, bias, 0.1, 1e-5, None, True)
        evaluate = Call(x, running_mean, running_var, weight, bias, 0.1, 1e-5, None, False)
        names = list(variants)
        done = 0
        # Back-to-back calls per sample (one in the warm-up rounds): k calls of one pass of
        # one backend in a row, k chosen from the warm-up so that a sample lasts about
        # SAMPLE_MS, as benchmarks/cpu.py times them: each call's output lands on the memory
        # the previous call of the same pass freed, as in a training or inference loop. Each
        # pass has samples of its own: what ran just before a call changes its time (measured
        # on a 2-core Xeon: an 8 MiB bfloat16 training forward of the kernels took 1.6 ms after
        # their backward, 2.3 ms after their inference, ATen's 2.1 ms after either).
        calls = {(name, pass_name): 1 for name in variants for pass_name in passes}
        for round_index in range(warmup + rounds):
            order.shuffle(names)
            timed = round_index >= warmup
            for name in names:
                backend = variants[name]
                for pass_name in passes:
                    count = calls[(name, pass_name)]
                    if pass_name == "inference":
                        elapsed = _time_inference(backend, evaluate, count)
                    else:
                        elapsed = _time_training(
                            name, backend, train, (x, weight, bias), dy, pass_name, count
                        )
                    if timed:
                        times.setdefault((name, pass_name), []).append(elapsed * 1e3 / count)
                    else:
                        calls[(name, pass_name)] = _calls_per_sample(elapsed / count)
            done += timed
            if (
                budget_s is not None
                and done >= (min_rounds or 1)
                and time.perf_counter() - start > budget_s
            ):
                break
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        name: Timing(medians[("kernels", name)], medians[("aten", name)], done) for name in passes
    }


def _time_inference(backend: Backend, call: Call, count: int) -> float:
    """Seconds of ``count`` back-to-back evaluations (no grad)."""
    elapsed = 0.0
    with torch.no_grad():
        for _ in range(count):
            begin = time.perf_counter()
            backend.evaluate(call)
            elapsed += time.perf_counter() - begin
    return elapsed


def _time_training(
    name: str,
    backend: Backend,
    call: Call,
    leaves: tuple[torch.Tensor, ...],
    dy: torch.Tensor | None,
    pass_name: str,
    count: int,
) -> float:
    """Seconds of ``count`` back-to-back training forwards (``pass_name`` ``"forward"``) or
    backwards (``"backward"``: each after an untimed forward), the graph built.

    Raises:
        RuntimeError: if the backend returned None (it did not run the call itself).
    """
    elapsed = 0.0
    with torch.enable_grad():
        for _ in range(count):
            begin = time.perf_counter()
            result = backend.train(call)
            if pass_name == "forward":
                elapsed += time.perf_counter() - begin
            if result is None:
                raise RuntimeError(f"{name}: the backend did not run the call itself")
            if pass_name == "backward":
                begin = time.perf_counter()
                torch.autograd.grad(result.output, leaves, dy)
                elapsed += time.perf_counter() - begin
            del result
    return elapsed


# ---------------------------------------------------------------------------------------------
# Tables


class SweepPoint(NamedTuple):
    """One size of a sweep: the input's bytes and the pass's :class:`Timing` there."""

    nbytes: int
    timing: Timing


class Decision(NamedTuple):
    """A lazy measurement's choice for one case and size class.

    Attributes:
        kernels: whether our kernels run there (else ATen's).
        timing: what it was decided from.
        nbytes: the size it was measured at.
        seconds: what the whole measurement cost (every pass measured with it).
        date: when (UTC, ISO 8601).
    """

    kernels: bool
    timing: Timing
    nbytes: int
    seconds: float
    date: str


def threshold_from(points: Sequence[SweepPoint]) -> int | None:
    """The smallest swept size from which the kernels win at every larger swept size (None:
    they lose at the largest; ATen everywhere)."""
    threshold = None
    for point in sorted(points, reverse=True):
        if not point.timing.kernels_win:
            break
        threshold = point.nbytes
    return threshold


def case_name(case: KernelCase) -> str:
    """``"forward/ncl/float32"`` for ``("forward", "ncl", torch.float32)``."""
    pass_name, layout, dtype = case
    return f"{pass_name}/{layout}/{str(dtype).removeprefix('torch.')}"


def parse_case(name: str) -> KernelCase:
    """The inverse of :func:`case_name`; raises ValueError on anything else."""
    pass_name, layout, dtype_name = name.split("/")
    if pass_name not in PASSES or layout not in LAYOUTS or dtype_name not in DTYPES:
        raise ValueError(f"unknown case {name!r}")
    return pass_name, layout, DTYPES[dtype_name]


def _timing_json(timing: Timing) -> dict[str, Any]:
    return {"kernels_ms": timing.kernels_ms, "aten_ms": timing.aten_ms, "rounds": timing.rounds}


def _timing_from(entry: Mapping[str, Any]) -> Timing:
    kernels_ms, aten_ms, rounds = entry["kernels_ms"], entry["aten_ms"], entry["rounds"]
    if not all(isinstance(v, (int, float)) and v >= 0 for v in (kernels_ms, aten_ms, rounds)):
        raise ValueError(f"bad timing {entry!r}")
    return Timing(float(kernels_ms), float(aten_ms), int(rounds))


def _bytes_from(value: Any) -> int:
    if type(value) is not int or value < 1:
        raise ValueError(f"expected a positive number of bytes, got {value!r}")
    return value


class RoutingTable:
    """The routing of one key (machine, thread count, versions): stored, lazy, committed.

    Shared by every backend instance of that key and cache file (:func:`table_for`). Reads
    take no lock (dict lookups; every change replaces :attr:`smallest` whole); changes and
    measurements hold :data:`LOCK`.

    Attributes:
        path: the JSON file.
        key: :func:`routing_key`.
        committed: the committed table that applies (the cold start).
        committed_source: where that was measured (``Measured`` record's fields, as text).
        measurable: the cases the kernels can run here (what may be measured).
        thresholds: case → stored threshold (bytes) of a sweep, None: ATen at every size.
        sweeps: case → the sweep's points behind its threshold.
        swept: the sweep's date, rounds, sizes and cost (None before one).
        decisions: ``(case, size class)`` → :class:`Decision` of a lazy measurement.
        failed: ``(case, size class)`` whose measurement failed in this process (not retried).
        state: "empty" (no file), "stored", "ignored" (a file for another key), "corrupt".
        smallest: ``(pass, dtype)`` → smallest input any layout may run the kernels at, a
            lazy measurement included.
        smallest_unmeasured: the same where nothing new is measured.
        routes: a memo for the backends: ``(pass, dtype, shape, strides, is_cpu)`` → the layout
            the kernels read (None: ATen), for inputs whose route a measurement decided or no
            measurement could change; replaced by an empty one on every change.
    """

    def __init__(
        self,
        path: Path,
        key: dict[str, Any],
        committed: Mapping[KernelCase, int],
        committed_source: str,
        measurable: Mapping[KernelCase, int],
    ):
        self.path = path
        self.key = key
        self.committed = committed
        self.committed_source = committed_source
        self.measurable = measurable
        self.thresholds: dict[KernelCase, int | None] = {}
        self.sweeps: dict[KernelCase, list[SweepPoint]] = {}
        self.swept: dict[str, Any] | None = None
        self.decisions: dict[tuple[KernelCase, ShapeClass], Decision] = {}
        self.failed: set[tuple[KernelCase, ShapeClass]] = set()
        self.state = "empty"
        self.warned_unmeasured = False
        # What this process added, for the merge with the file when saving.
        self._new_decisions: set[tuple[KernelCase, ShapeClass]] = set()
        self._new_sweep = False
        self.smallest: dict[tuple[str, torch.dtype], int] = {}
        self.smallest_unmeasured: dict[tuple[str, torch.dtype], int] = {}
        self.routes: dict[tuple[Any, ...], str | None] = {}
        self._refresh()

    @property
    def threads(self) -> int:
        """The thread count this table routes."""
        return int(self.key["threads"])

    def choice(self, case: KernelCase, nbytes: int, run: int) -> bool | None:
        """Whether the kernels run ``case`` at ``nbytes`` in runs of ``run`` values by what was
        measured here: the lazy decision of the shape class, else a stored threshold where it
        answers (the run class it was swept at, and sizes under :data:`LAZY_MIN_BYTES`, which
        are not measured on first use); None where nothing measured answers."""
        cls = shape_class(nbytes, run)
        decision = self.decisions.get((case, cls))
        if decision is not None:
            return decision.kernels
        if case in self.thresholds and (cls[1] == SWEEP_RUN[case[1]] or nbytes < LAZY_MIN_BYTES):
            threshold = self.thresholds[case]
            return threshold is not None and nbytes >= threshold
        return None

    def committed_choice(self, case: KernelCase, nbytes: int) -> bool:
        """The committed tables' answer for ``case`` at ``nbytes``."""
        threshold = self.committed.get(case)
        return threshold is not None and nbytes >= threshold

    def unmeasured_choice(self, case: KernelCase, nbytes: int) -> bool:
        """The answer where nothing is measured for this shape class: a stored threshold (of
        another run class, the nearest measurement there is), else the committed table."""
        if case in self.thresholds:
            threshold = self.thresholds[case]
            return threshold is not None and nbytes >= threshold
        return self.committed_choice(case, nbytes)

    def _refresh(self) -> None:
        """Recomputes :attr:`smallest` and :attr:`smallest_unmeasured` (each replaced whole:
        readers see the old or the new)."""
        smallest: dict[tuple[str, torch.dtype], int] = {}
        unmeasured: dict[tuple[str, torch.dtype], int] = {}
        for case in {*self.committed, *self.measurable, *self.thresholds}:
            pass_name, _layout, dtype = case
            group = (pass_name, dtype)
            # The sweep's threshold answers for its run class, the committed table (where
            # nothing is measured) and the lazy decisions for the others.
            candidates = [self.committed.get(case)]
            if case in self.thresholds:
                candidates.append(self.thresholds[case])
            candidates += [
                1 << size
                for (other, (size, _run)), decision in self.decisions.items()
                if other == case and decision.kernels
            ]
            for value in candidates:
                if value is not None:
                    unmeasured[group] = min(value, unmeasured.get(group, value))
            if case in self.measurable:
                candidates.append(LAZY_MIN_BYTES)
            for value in candidates:
                if value is not None:
                    smallest[group] = min(value, smallest.get(group, value))
        self.smallest_unmeasured = unmeasured
        self.smallest = smallest
        self.routes = {}

    # -- changes (under LOCK) -------------------------------------------------------------------

    def record_decisions(self, decisions: Mapping[tuple[KernelCase, ShapeClass], Decision]) -> None:
        """Adds lazy decisions and saves the table."""
        self.decisions.update(decisions)
        self._new_decisions.update(decisions)
        self._refresh()
        self.save()

    def record_sweep(
        self, points: Mapping[KernelCase, Sequence[SweepPoint]], info: dict[str, Any]
    ) -> None:
        """Adds a sweep's thresholds (:func:`threshold_from`) and points and saves the table."""
        for case, case_points in points.items():
            self.sweeps[case] = sorted(case_points)
            self.thresholds[case] = threshold_from(case_points)
        _drop_swept(self.decisions, points)
        self.swept = info
        self._new_sweep = True
        self._refresh()
        self.save()

    def clear(self) -> None:
        """Forgets everything measured (the file is the caller's to remove)."""
        self.thresholds.clear()
        self.sweeps.clear()
        self.decisions.clear()
        self.failed.clear()
        self._new_decisions.clear()
        self.swept = None
        self._new_sweep = False
        self.state = "empty"
        self._refresh()

    # -- the file ---------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The file's content."""
        return {
            "format": FORMAT,
            "key": self.key,
            "committed": self.committed_source,
            "swept": self.swept,
            "thresholds": {case_name(case): value for case, value in self.thresholds.items()},
            "sweeps": {
                case_name(case): [
                    {"bytes": point.nbytes, **_timing_json(point.timing)} for point in points
                ]
                for case, points in self.sweeps.items()
            },
            "lazy": {
                f"{case_name(case)}@{cls[0]}/{cls[1]}": {
                    "kernels": decision.kernels,
                    "bytes": decision.nbytes,
                    "seconds": decision.seconds,
                    "date": decision.date,
                    **_timing_json(decision.timing),
                }
                for (case, cls), decision in sorted(
                    self.decisions.items(), key=lambda item: (case_name(item[0][0]), item[0][1])
                )
            },
        }

    def load(self) -> None:
        """Reads the file: a table of this key is used, another key's ignored, a file that
        cannot be read or parsed ignored with a :class:`CalibrationWarning`."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except OSError as error:
            self._corrupt(f"cannot be read ({error})")
            return
        try:
            parsed = _parse(json.loads(text))
        except _OlderFormat as error:
            self.state = "ignored"
            _log.info("%s was written by an earlier version (%s): not used", self.path, error)
            return
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            self._corrupt(f"is not a routing table ({type(error).__name__}: {error})")
            return
        key, thresholds, sweeps, swept, decisions = parsed
        if key != self.key:
            self.state = "ignored"
            _log.info("%s is stored for another machine or versions: not used", self.path)
            return
        self.thresholds, self.sweeps, self.swept = thresholds, sweeps, swept
        self.decisions = decisions
        self.state = "stored"
        self._refresh()

    def _corrupt(self, reason: str) -> None:
        self.state = "corrupt"
        warnings.warn(
            f"batchnorm: ignoring the CPU routing table {self.path}: it {reason}; the committed "
            f"defaults route the kernels (the file is replaced on the next measurement, or run "
            f"`batchnorm calibrate --reset`)",
            CalibrationWarning,
            stacklevel=4,
        )

    def save(self) -> None:
        """Writes the table, merged with what another process stored meanwhile: atomically
        (a temporary file, then ``os.replace``); failures warn once and are not raised."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _file_lock(self.path):
                merged = self._merged_with_disk()
                _write_atomically(self.path, json.dumps(merged, indent=1) + "\n")
            self.state = "stored"
        except OSError as error:
            if not _WARNED_WRITE.get(self.path):
                _WARNED_WRITE[self.path] = True
                warnings.warn(
                    f"batchnorm: cannot store the CPU routing table in {self.path} ({error}); "
                    f"it is kept in memory for this process",
                    CalibrationWarning,
                    stacklevel=4,
                )

    def _merged_with_disk(self) -> dict[str, Any]:
        """This table's JSON with the file's entries this process did not change."""
        ours = self.to_json()
        try:
            disk_key, thresholds, sweeps, swept, decisions = _parse(
                json.loads(self.path.read_text(encoding="utf-8"))
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return ours  # no file, or one we replace
        if disk_key != self.key:
            return ours
        merged = RoutingTable(self.path, self.key, self.committed, self.committed_source, {})
        merged.thresholds, merged.sweeps, merged.swept = thresholds, sweeps, swept
        merged.decisions = decisions
        if self._new_sweep:
            merged.thresholds.update(self.thresholds)
            merged.sweeps.update(self.sweeps)
            merged.swept = self.swept
            _drop_swept(merged.decisions, self.sweeps)
        for item in self._new_decisions:
            if item in self.decisions:
                merged.decisions[item] = self.decisions[item]
        return merged.to_json()


def _parse(
    data: Any,
) -> tuple[
    dict[str, Any],
    dict[KernelCase, int | None],
    dict[KernelCase, list[SweepPoint]],
    dict[str, Any] | None,
    dict[tuple[KernelCase, ShapeClass], Decision],
]:
    """A file's JSON checked entry by entry; raises ValueError/KeyError/TypeError if anything
    is not what :meth:`RoutingTable.to_json` writes (:class:`_OlderFormat` for a file an
    earlier version of the library wrote)."""
    if isinstance(data, dict) and type(data.get("format")) is int and data["format"] < FORMAT:
        raise _OlderFormat(f"format {data['format']}, not {FORMAT}")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"not of format {FORMAT}")
    key = data["key"]
    if not isinstance(key, dict):
        raise TypeError("key: expected an object")
    thresholds: dict[KernelCase, int | None] = {}
    for name, value in data["thresholds"].items():
        thresholds[parse_case(name)] = None if value is None else _bytes_from(value)
    sweeps = {
        parse_case(name): [
            SweepPoint(_bytes_from(entry["bytes"]), _timing_from(entry)) for entry in points
        ]
        for name, points in data["sweeps"].items()
    }
    swept = data["swept"]
    if swept is not None and not isinstance(swept, dict):
        raise TypeError("swept: expected an object or null")
    decisions: dict[tuple[KernelCase, ShapeClass], Decision] = {}
    for name, entry in data["lazy"].items():
        case, _, cls = name.rpartition("@")
        size, _, run = cls.partition("/")
        if type(entry["kernels"]) is not bool or not isinstance(entry["date"], str):
            raise TypeError(f"lazy {name!r}: bad entry")
        decisions[(parse_case(case), (int(size), int(run)))] = Decision(
            entry["kernels"], _timing_from(entry), _bytes_from(entry["bytes"]),
            float(entry["seconds"]), entry["date"],
        )  # fmt: skip
    return key, thresholds, sweeps, swept, decisions


def _drop_swept(
    decisions: dict[tuple[KernelCase, ShapeClass], Decision], swept: Mapping[KernelCase, Any]
) -> None:
    """Removes the lazy decisions a sweep of ``swept`` replaces: its cases at its run class."""
    for item in [
        (case, cls) for case, cls in decisions if case in swept and cls[1] == SWEEP_RUN[case[1]]
    ]:
        del decisions[item]


class _OlderFormat(ValueError):
    """A table an earlier version of the library wrote: replaced, not warned about."""


def _write_atomically(path: Path, text: str) -> None:
    """Writes ``text`` to a temporary file beside ``path``, then renames it over ``path``."""
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An advisory lock (``flock``) beside ``path`` against other processes' merges; none
    where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


_WARNED_WRITE: dict[Path, bool] = {}
#: Path → its table, shared by the backend instances of this process.
_TABLES: dict[Path, RoutingTable] = {}

#: Held while a measurement runs or a table changes (one measurement at a time per process).
LOCK = threading.Lock()
_REGISTRY_LOCK = threading.Lock()
#: ``measuring``: this thread is inside a measurement (nothing nested is measured).
_state = threading.local()


def _after_fork_in_child() -> None:
    """A child starts with free locks (a fork while another thread held one would leave them
    held forever)."""
    global LOCK, _REGISTRY_LOCK, _state
    LOCK = threading.Lock()
    _REGISTRY_LOCK = threading.Lock()
    _state = threading.local()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def table_for(
    key: dict[str, Any],
    committed: Mapping[KernelCase, int],
    committed_source: str,
    measurable: Mapping[KernelCase, int],
) -> RoutingTable:
    """The shared table of ``key`` in the current cache directory, loaded on first use."""
    path = table_path(key)
    table = _TABLES.get(path)
    if table is None:
        with _REGISTRY_LOCK:
            table = _TABLES.get(path)
            if table is None:
                table = RoutingTable(path, key, committed, committed_source, measurable)
                table.load()
                _TABLES[path] = table
    return table


def forget(paths: Sequence[Path] | None = None) -> None:
    """Forgets the tables of ``paths`` (default: all) in memory: the backends holding them
    fall back to lazy measurement and the committed defaults, and backends made afterwards
    read the files again (as a new process would)."""
    with LOCK, _REGISTRY_LOCK:
        for path, table in list(_TABLES.items()):
            if paths is None or path in paths:
                table.clear()
                del _TABLES[path]


def remove(paths: Sequence[Path]) -> list[Path]:
    """Deletes the stored tables ``paths`` (and their lock files) and forgets them in memory.

    Returns:
        The files that were there.
    """
    removed = []
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
        with contextlib.suppress(FileNotFoundError):
            path.with_name(path.name + ".lock").unlink()
    forget(paths)
    return removed


# ---------------------------------------------------------------------------------------------
# Measuring


#: ``omp_in_parallel`` of torch's OpenMP runtime, if found (a call inside somebody else's
#: OpenMP region is not measured: its timings would be that team's).
_omp_in_parallel: Callable[[], int] | None = None
_omp_looked_up = False


def in_openmp_region() -> bool:
    """Whether the calling thread runs inside an OpenMP parallel region of torch's runtime."""
    global _omp_in_parallel, _omp_looked_up
    if not _omp_looked_up:
        _omp_looked_up = True
        library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
        try:
            function = ctypes.CDLL(str(library)).omp_in_parallel
        except (OSError, AttributeError):  # pragma: no cover - other platforms, no OpenMP
            return False
        function.restype = ctypes.c_int
        function.argtypes = []
        _omp_in_parallel = function
    return _omp_in_parallel is not None and bool(_omp_in_parallel())


def may_measure(x: torch.Tensor) -> bool:
    """Whether a lazy measurement may run for a call on ``x`` now: measuring allowed
    (:func:`calibrating`), an eager call on a plain tensor (no tracing, compilation, dispatch
    mode or ``torch.func`` transform), outside an OpenMP region and any measurement."""
    return not (
        getattr(_state, "measuring", False)
        or _compat.traced(x)
        or _compat.functorch_active()
        or _compat.functorch_wrapped(x)
        or not calibrating()
        or in_openmp_region()
    )


def measure_lazily(
    table: RoutingTable,
    cases: Sequence[KernelCase],
    nbytes: int,
    shape: Sequence[int],
    backends: Callable[[], tuple[Backend, Backend]],
) -> bool | None:
    """Measures ``cases`` (one layout and dtype; the first is the one asked for) at the shape
    class of ``nbytes`` and ``shape`` on scratch inputs of ``shape``, records and stores the
    decisions.

    One measurement at a time (:data:`LOCK`); a thread that waited for another's measurement
    of the same case takes its result. A failure warns, is not retried in this process and
    returns None (the caller routes by the committed table).

    Returns:
        Whether the kernels run ``cases[0]``, or None where nothing was measured.
    """
    _pass, layout, dtype = cases[0]
    cls = shape_class(nbytes, run_length(shape, layout))
    first = (cases[0], cls)
    with LOCK:
        decided = table.decisions.get(first)
        if decided is not None:
            return decided.kernels
        if first in table.failed:
            return None
        todo = [case for case in cases if (case, cls) not in table.decisions]
        itemsize = torch.empty((), dtype=dtype).element_size()
        scratch = scratch_shape(shape, itemsize)
        if scratch is None:
            table.failed.add(first)
            return None
        _state.measuring = True
        start = time.perf_counter()
        try:
            kernels, aten = backends()
            timings = time_passes(
                kernels, aten, [case[0] for case in todo], scratch, layout, dtype,
                rounds=LAZY_ROUNDS, min_rounds=LAZY_MIN_ROUNDS, budget_s=LAZY_BUDGET_S,
            )  # fmt: skip
        except Exception as error:
            table.failed.update((case, cls) for case in todo)
            warnings.warn(
                f"batchnorm: measuring the CPU routing of {case_name(cases[0])} failed "
                f"({type(error).__name__}: {error}); the committed defaults route it",
                CalibrationWarning,
                stacklevel=2,
            )
            return None
        finally:
            _state.measuring = False
        seconds = time.perf_counter() - start
        date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        scratch_bytes = itemsize
        for size in scratch:
            scratch_bytes *= size
        decisions = {
            (case, cls): Decision(
                timings[case[0]].kernels_win, timings[case[0]], scratch_bytes, seconds, date
            )
            for case in todo
        }
        table.record_decisions(decisions)
        for (case, _), decision in decisions.items():
            _log.info(
                "measured %s at %d thread(s), %d bytes: ours %.3f ms, ATen %.3f ms -> %s "
                "(%.0f ms, once)",
                case_name(case), table.threads, scratch_bytes, decision.timing.kernels_ms,
                decision.timing.aten_ms, "ours" if decision.kernels else "ATen", seconds * 1e3,
            )  # fmt: skip
        return table.decisions[first].kernels


def sweep(
    kernels: Backend,
    aten: Backend,
    cases: Sequence[KernelCase],
    sizes: Sequence[int],
    rounds: int,
    progress: Callable[[str], None] | None = None,
) -> dict[KernelCase, list[SweepPoint]]:
    """Times ``cases`` at each size of ``sizes`` (bytes; :func:`sweep_shape`), the passes of
    one layout and dtype in the same rounds.

    A loss of the kernels above which they win somewhere decides the threshold
    (:func:`threshold_from`: ATen below it), so one disturbed median, a burst of another
    process or of the hypervisor during that size's rounds, would move a whole range of sizes
    to ATen. Each such deciding loss is therefore timed a second time (every pass of its layout
    and dtype), once, from the largest size down, and each backend keeps the lower of its two
    medians (a disturbance only adds time, to either backend); a loss that stays a loss is
    kept. At most one extra step per size.

    Args:
        kernels, aten: the backends to compare.
        cases: the cases to measure.
        sizes: the sizes (bytes), e.g. :func:`ladder`'s.
        rounds: timed rounds per size (after one untimed).
        progress: called after each (layout, dtype, size) with a description; the sizes timed a
            second time call it too, after the :func:`sweep_steps` first ones.

    Returns:
        case → its points, by size.
    """
    groups: dict[tuple[str, torch.dtype], list[str]] = {}
    for pass_name, layout, dtype in cases:
        groups.setdefault((layout, dtype), []).append(pass_name)
    points: dict[KernelCase, list[SweepPoint]] = {case: [] for case in cases}
    for (layout, dtype), passes in groups.items():
        shapes = [sweep_shape(size, dtype) for size in sizes]
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = [itemsize * math.prod(shape) for shape in shapes]
        name = str(dtype).removeprefix("torch.")
        timed: list[dict[str, Timing]] = []
        for shape, size in zip(shapes, nbytes, strict=True):
            timed.append(time_passes(kernels, aten, passes, shape, layout, dtype, rounds=rounds))
            if progress is not None:
                progress(f"{name} {layout} {format_bytes(size)}")
        again: set[int] = set()
        while True:
            indices = {_deciding_loss([t[p] for t in timed], again) for p in passes} - {None}
            if not indices:
                break
            for index in sorted(i for i in indices if i is not None):
                second = time_passes(
                    kernels, aten, passes, shapes[index], layout, dtype, rounds=rounds
                )
                timed[index] = {p: _lower(timed[index][p], second[p]) for p in passes}
                again.add(index)
                if progress is not None:
                    progress(f"{name} {layout} {format_bytes(nbytes[index])} again")
        for pass_name in passes:
            points[(pass_name, layout, dtype)] = [
                SweepPoint(size, t[pass_name]) for size, t in zip(nbytes, timed, strict=True)
            ]
    return points


def _deciding_loss(timings: Sequence[Timing], again: Collection[int]) -> int | None:
    """The index of the largest size where the kernels lose, when it is not yet timed twice
    (``again``) and they win at some other size (else nothing a second timing could change)."""
    for index in range(len(timings) - 1, -1, -1):
        if not timings[index].kernels_win:
            wins = any(t.kernels_win for t in timings)
            return index if index not in again and wins else None
    return None


def _lower(first: Timing, second: Timing) -> Timing:
    """Each backend's lower median of two timings of the same size (rounds: both)."""
    return Timing(
        min(first.kernels_ms, second.kernels_ms),
        min(first.aten_ms, second.aten_ms),
        first.rounds + second.rounds,
    )


def sweep_steps(cases: Sequence[KernelCase], sizes: Sequence[int]) -> int:
    """How many steps (progress calls) :func:`sweep` makes at least (sizes timed twice add one
    each)."""
    return len({(layout, dtype) for _pass, layout, dtype in cases}) * len(sizes)


# ---------------------------------------------------------------------------------------------
# Text


def format_bytes(nbytes: int | None) -> str:
    """``"512 KiB"``, ``"2 MiB"``, ``"1.5 MiB"``, ``"96 B"``; ``"never"`` for None."""
    if nbytes is None:
        return "never"
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            value = nbytes / (1 << shift)
            digits = 0 if value == int(value) or value >= 10 else 1
            return f"{value:.{digits}f} {unit}"
    return f"{nbytes} B"


def class_range(cls: ShapeClass) -> str:
    """The inputs of a shape class: ``"1 MiB–2 MiB, runs 64–255"``, ``"32 MiB and up, runs
    4096+"`` (the last classes)."""
    size, run = cls
    sizes = (
        f"{format_bytes(1 << size)} and up"
        if size >= LAZY_MAX_CLASS
        else f"{format_bytes(1 << size)}–{format_bytes(2 << size)}"
    )
    low = 1 << max(2 * run - 1, 0)  # see run_class
    runs = f"{low}+" if run >= RUN_MAX_CLASS else f"{low}–{(2 << 2 * run) - 1}"
    return f"{sizes}, runs {runs}"


def describe(table: RoutingTable) -> str:
    """The table as text: key, provenance, each case's threshold (stored, committed) with the
    sweep's ratios by size, then the lazy decisions."""
    key = table.key
    isa = " ".join(key["isa"]) or "neither AVX2 nor AVX-512"
    lines = [
        f"CPU routing on {key['cpu']} ({isa}), {key['threads']} thread(s); "
        f"torch {key['torch']}, batchnorm {key['batchnorm']}, kernels {key['kernels']}",
        f"file: {table.path} ({table.state})",
    ]
    if table.swept:
        swept = table.swept
        lines.append(
            f"swept {swept.get('date')}: {swept.get('rounds')} rounds per size, "
            f"{swept.get('seconds', 0):.1f} s"
        )
    lines.append(f"committed defaults: {table.committed_source}")
    cases = sorted(
        {*table.thresholds, *table.measurable, *table.committed},
        key=lambda case: (str(case[2]), case[1], PASSES.index(case[0])),
    )
    sizes = sorted({point.nbytes for points in table.sweeps.values() for point in points})
    header = f"{'pass':9} {'layout':6} {'dtype':8}  {'ours from':>9}  {'committed':>9}"
    if sizes:
        header += "  ATen/ours at " + " ".join(f"{format_bytes(s):>7}" for s in sizes)
    lines += ["", header]
    for case in cases:
        pass_name, layout, dtype = case
        stored = format_bytes(table.thresholds[case]) if case in table.thresholds else "-"
        committed = format_bytes(table.committed.get(case))
        row = f"{pass_name:9} {layout:6} {str(dtype).removeprefix('torch.'):8}  {stored:>9}  "
        row += f"{committed:>9}"
        by_size = {point.nbytes: point.timing.ratio for point in table.sweeps.get(case, [])}
        if sizes:
            row += (
                "  "
                + " " * 13
                + " ".join(f"{by_size[s]:7.2f}" if s in by_size else f"{'':7}" for s in sizes)
            )
        lines.append(row.rstrip())
    if table.decisions:
        lines += ["", "measured on first use (lazy):"]
        for (case, cls), decision in sorted(
            table.decisions.items(), key=lambda item: (case_name(item[0][0]), item[0][1])
        ):
            timing = decision.timing
            lines.append(
                f"  {case_name(case):24} {class_range(cls):>30}  "
                f"{'ours' if decision.kernels else 'ATen':4}  ours {timing.kernels_ms:.3f} ms, "
                f"ATen {timing.aten_ms:.3f} ms (x{timing.ratio:.2f}), "
                f"cost {decision.seconds * 1e3:.0f} ms"
            )
    return "\n".join(lines)
