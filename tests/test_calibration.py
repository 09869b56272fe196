"""The CPU kernels' routing measured on this machine: stored tables, lazy measurement, the CLI.

A chain of checks, each of which can fail on its own: where tables live and under which key;
that a stored file round-trips and only a table of this key is used; that a corrupt one warns
and leaves the committed defaults; that ``BATCHNORM_CALIBRATE=0`` measures nothing; that a lazy
measurement runs once per case and size class (also with two threads calling at once), on
scratch tensors (the caller's running statistics and torch's random state untouched), and is
stored; that routing follows a stored threshold (which kernel launcher runs), with results
matching ``torch.nn.functional.batch_norm`` whichever table is in force; ``explain``; and
``batchnorm calibrate`` at tiny sizes. Every test writes its tables to its own ``tmp_path``
(never the user's cache) and sets ``BATCHNORM_CALIBRATE`` itself. Timings in these tests are
either faked (the decision is then known) or taken at tiny sizes, where only that they run is
checked: timing belongs in ``benchmarks/``.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import sys
import threading
import time
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as TF

from batchnorm import backends, cli
from batchnorm.backends import calibration, cpu_backend, measured
from batchnorm.backends.calibration import CalibrationWarning, SweepPoint, Timing
from batchnorm.functional import batch_norm
from batchnorm.kernels.cpu import cpu_stream
from conftest import assert_close

pytestmark = pytest.mark.skipif(
    not cpu_stream.SUPPORTED, reason="the C kernels are not built or this CPU lacks AVX-512"
)

SOURCE = Path(__file__).resolve().parents[1] / "src"
F32_NCL = ("forward", "ncl", torch.float32)
B32_NCL = ("backward", "ncl", torch.float32)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A cache directory of this test, measuring on; tables of other tests forgotten."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("BATCHNORM_CACHE_DIR", str(folder))
    monkeypatch.setenv("BATCHNORM_CALIBRATE", "1")
    calibration.forget()
    with backends.fresh():
        yield folder
    calibration.forget()


@pytest.fixture
def timed(monkeypatch: pytest.MonkeyPatch):
    """Replaces the timing function: records each call's passes and size; the kernels win
    the forward and inference (ATen 2 ms, ours 1 ms) and lose the backward."""
    calls: list[tuple[tuple[str, ...], tuple[int, ...]]] = []

    def fake(kernels, aten, passes, shape, layout, dtype, **options):
        calls.append((tuple(passes), tuple(shape)))
        return {name: Timing(1.0, 0.5 if name == "backward" else 2.0, 3) for name in passes}

    monkeypatch.setattr(calibration, "time_passes", fake)
    return calls


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the C kernel launches per pass."""
    counts = {"train_forward": 0, "train_backward": 0, "inference": 0}
    for name in counts:
        original = getattr(cpu_stream, name)

        def counting(*args, _name=name, _original=original):
            counts[_name] += 1
            return _original(*args)

        monkeypatch.setattr(cpu_stream, name, counting)
    return counts


def _inputs(batch: int = 4, channels: int = 16, length: int = 256, seed: int = 0):
    """``x`` ``(N, C, L)`` float32 (64 KiB by default, the smallest measured size) requiring
    grad, ``weight``, ``bias`` and running buffers."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, channels, length, generator=gen) * 2 + 1).requires_grad_()
    weight = (torch.rand(channels, generator=gen) + 0.5).requires_grad_()
    bias = torch.randn(channels, generator=gen).requires_grad_()
    return x, weight, bias, torch.zeros(channels), torch.ones(channels)


def _train_step(x, weight, bias, mean, var, dy=None):
    """One training call through ``auto`` and its backward; returns (y, grads)."""
    y = batch_norm(x, mean, var, weight, bias, True, 0.1, 1e-5)
    grads = torch.autograd.grad(y, (x, weight, bias), torch.ones_like(y) if dy is None else dy)
    return y, grads


def _reference_step(x, weight, bias, mean, var, dy=None):
    """The same with ``torch.nn.functional.batch_norm``."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    y = TF.batch_norm(leaves[0], mean, var, leaves[1], leaves[2], True, 0.1, 1e-5)
    grads = torch.autograd.grad(y, leaves, torch.ones_like(y) if dy is None else dy)
    return y, grads


def _default_table(threads: int | None = None) -> calibration.RoutingTable:
    return cpu_backend.CpuBackend().routing_table(threads)


# -- where, and under which key ------------------------------------------------------------


def test_cache_directory_follows_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("BATCHNORM_CACHE_DIR", str(tmp_path / "explicit"))
    assert calibration.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("BATCHNORM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert calibration.cache_dir() == tmp_path / "xdg" / "batchnorm"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert calibration.cache_dir() == tmp_path / "home" / ".cache" / "batchnorm"


def test_key_names_machine_threads_and_versions() -> None:
    model, flags = calibration.machine()
    key = calibration.routing_key(3, "c")
    assert key["cpu"] == model
    assert model
    assert key["isa"] == list(flags)
    assert set(flags) <= set(calibration.ISA_FLAGS)
    assert key["threads"] == 3
    assert key["torch"] == torch.__version__
    assert key["batchnorm"] == __import__("batchnorm").__version__
    one, two = (calibration.table_path(calibration.routing_key(n, "c")) for n in (1, 2))
    assert one != two
    assert one.name.endswith("-t1.json")
    assert two.name.endswith("-t2.json")
    assert one.name.rpartition("-t")[0] == two.name.rpartition("-t")[0]  # one machine
    other = calibration.table_path(calibration.routing_key(1, "numba-0"))
    assert other.name.rpartition("-t")[0] != one.name.rpartition("-t")[0]


def test_sizes_and_shapes() -> None:
    assert calibration.ladder(64, 1024, 4) == [64, 256, 1024]
    with pytest.raises(ValueError, match="sizes"):
        calibration.ladder(64, 32, 2)
    for nbytes in (16 << 10, 64 << 10, 1 << 20, 64 << 20):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            shape = calibration.sweep_shape(nbytes, dtype)
            size = torch.empty((), dtype=dtype).element_size()
            for dim in shape:
                size *= dim
            assert size == nbytes, (nbytes, dtype, shape)
    assert calibration.size_class(1 << 20) == calibration.size_class((2 << 20) - 1) == 20
    assert calibration.size_class(1 << 40) == calibration.LAZY_MAX_CLASS  # one class above
    assert calibration.scratch_shape((4, 16, 256), 4) == (4, 16, 256)
    big = calibration.scratch_shape((4096, 64, 112, 112), 4)  # 12 GiB: the batch cut down
    assert big == (11, 64, 112, 112)  # the fewest samples from 32 MiB on (11 × 3.1 MiB)
    long = calibration.scratch_shape((1, 8, 1 << 27), 2)  # one 2 GiB sample: L cut down
    assert long == (1, 8, 1 << 21)  # 32 MiB exactly
    assert calibration.scratch_shape((2, 1 << 25), 4) is None  # (N, C): not 2 values a channel
    assert calibration.scratch_shape((1, 3, 1), 4) is None  # one value per channel


def test_threshold_is_where_the_kernels_win_from_on() -> None:
    def points(*ratios):
        return [SweepPoint(1 << (10 + i), Timing(1.0, r, 3)) for i, r in enumerate(ratios)]

    assert calibration.threshold_from(points(0.5, 0.9, 1.5, 2.0)) == 1 << 12
    assert calibration.threshold_from(points(1.5, 0.5, 1.5, 2.0)) == 1 << 12  # not a dip
    assert calibration.threshold_from(points(1.5, 1.5)) == 1 << 10
    assert calibration.threshold_from(points(1.5, 0.8)) is None  # ATen at the top: never
    assert calibration.threshold_from(points(1.01)) is None  # within the margin: ATen


@pytest.mark.parametrize(
    ("first", "second", "threshold", "again"),
    [
        # A disturbed loss between wins is timed again and turns into a win (the lower
        # medians): the threshold goes below it; the next loss down is timed again too, and
        # so on until one stays a loss.
        ((0.5, 1.5, 0.6, 1.5), {2: 1.5, 0: 0.5}, 1 << 11, [2, 0]),
        ((0.5, 0.7, 0.6, 1.5), {2: 1.5, 1: 1.2, 0: 0.9}, 1 << 11, [2, 1, 0]),
        # A loss that stays a loss is kept, timed twice only.
        ((0.5, 1.5, 0.6, 1.5), {2: 0.7}, 1 << 13, [2]),
        # A disturbed largest size would mean ATen everywhere: timed again.
        ((1.5, 1.5, 0.6), {2: 1.5}, 1 << 10, [2]),
        # Nothing to decide: wins everywhere, or losses everywhere.
        ((1.5, 1.5, 1.5), {}, 1 << 10, []),
        ((0.5, 0.6, 0.7), {}, None, []),
    ],
)
def test_a_loss_that_decides_the_threshold_is_timed_twice(
    monkeypatch, first, second, threshold, again
) -> None:
    """sweep: each loss that decides the threshold (the largest loss, when the kernels win at
    some size) is timed a second time, and each backend keeps its lower median."""
    sizes = [1 << (10 + i) for i in range(len(first))]
    index_of = {calibration.sweep_shape(size, torch.float32): i for i, size in enumerate(sizes)}
    timed: list[int] = []

    def scripted(kernels, aten, passes, shape, layout, dtype, **options):
        index = index_of[tuple(shape)]
        retimed = index in timed
        timed.append(index)
        # A second timing: ATen as before, the kernels at ATen / ratio (never slower than before).
        ratio = second[index] if retimed else first[index]
        return {name: Timing(1.0 / ratio, 1.0, 3) for name in passes}

    monkeypatch.setattr(calibration, "time_passes", scripted)
    steps: list[str] = []
    points = calibration.sweep(None, None, [F32_NCL], sizes, 3, steps.append)
    assert timed == list(range(len(sizes))) + again
    assert len(steps) == calibration.sweep_steps([F32_NCL], sizes) + len(again)
    assert all(text.endswith(" again") for text in steps[len(sizes) :])
    assert calibration.threshold_from(points[F32_NCL]) == threshold
    for index in again:  # the lower of the two medians, each timing's rounds
        point = points[F32_NCL][index]
        best = max(first[index], second[index])
        assert point.timing.kernels_ms == pytest.approx(1.0 / best)
        assert point.timing.rounds == 6


# -- the file ------------------------------------------------------------------------------


def test_stored_file_round_trips(cache) -> None:
    table = _default_table()
    table.record_sweep(
        {
            F32_NCL: [SweepPoint(1 << 16, Timing(1, 0.5, 3)), SweepPoint(1 << 18, Timing(1, 2, 3))],
            B32_NCL: [SweepPoint(1 << 16, Timing(2.0, 1.0, 3))],
        },
        {"date": "2026-12-01", "rounds": 3, "sizes": [1 << 16, 1 << 18], "seconds": 0.5},
    )
    decision = calibration.Decision(True, Timing(1.0, 3.0, 5), 1 << 20, 0.1, "2026-12-01")
    table.record_decisions({(("inference", "rows", torch.bfloat16), (20, 3)): decision})
    assert table.path.parent == cache
    assert table.path.exists()
    assert [p.name for p in cache.iterdir() if p.name.endswith(".tmp")] == []  # atomic write
    data = json.loads(table.path.read_text())
    assert data["key"] == table.key
    assert data["thresholds"] == {"forward/ncl/float32": 1 << 18, "backward/ncl/float32": None}
    sweeps, swept = dict(table.sweeps), table.swept
    calibration.forget()  # as a new process
    loaded = _default_table()
    assert loaded is not table
    assert loaded.state == "stored"
    assert loaded.thresholds == {F32_NCL: 1 << 18, B32_NCL: None}
    assert loaded.sweeps == sweeps
    assert loaded.decisions == {(("inference", "rows", torch.bfloat16), (20, 3)): decision}
    assert loaded.swept == swept


def test_a_table_of_another_key_is_not_used(cache, timed, monkeypatch) -> None:
    """Stored for other threads, another CPU or another torch version: never read."""
    threads = torch.get_num_threads()
    _default_table(threads + 1).record_sweep({F32_NCL: [SweepPoint(1, Timing(1, 2, 3))]}, {})
    assert _default_table(threads).thresholds == {}  # other thread count
    # The same file under this key's name, but written for another torch: ignored.
    path = _default_table(threads).path
    data = json.loads(_default_table(threads + 1).path.read_text())
    data["key"]["threads"] = threads
    data["key"]["torch"] = "0.0.0"
    path.write_text(json.dumps(data))
    calibration.forget()
    table = _default_table(threads)
    assert table.state == "ignored"
    assert table.thresholds == {}
    # Another CPU: another file name, nothing found.
    monkeypatch.setattr(calibration, "_MACHINE", ("Some Other CPU", ("avx2",)))
    calibration.forget()
    assert _default_table(threads).path != path
    assert _default_table(threads).state == "empty"


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "",
        '{"format": 2, "key": {}, "thresholds": {"forward/ncl/float32": "big"}}',
        "[1, 2, 3]",
    ],
)
def test_a_corrupt_file_warns_and_leaves_the_defaults(cache, timed, content) -> None:
    path = calibration.table_path(
        calibration.routing_key(torch.get_num_threads(), cpu_backend.CpuBackend().kernel_set())
    )
    path.parent.mkdir(parents=True)
    path.write_text(content)
    backend = cpu_backend.CpuBackend()
    small = torch.randn(4, 3, 20)  # under 64 KiB: the committed tables, nothing measured
    with pytest.warns(CalibrationWarning, match="ignoring the CPU routing table"):
        assert backend._kernel_layout("forward", small) is None
    assert backend.routing_table().state == "corrupt"
    # A later measurement replaces the file with a valid one.
    x, weight, bias, mean, var = _inputs()
    _train_step(x, weight, bias, mean, var)
    assert len(timed) == 1
    assert json.loads(path.read_text())["lazy"]


def test_a_table_of_the_earlier_format_is_replaced_quietly(cache, timed) -> None:
    """Format 1 (size classes alone) is not read, not warned about, and replaced by the next
    measurement."""
    path = calibration.table_path(
        calibration.routing_key(torch.get_num_threads(), cpu_backend.CpuBackend().kernel_set())
    )
    path.parent.mkdir(parents=True)
    path.write_text('{"format": 1, "key": {}, "thresholds": {}, "lazy": {}}')
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        table = _default_table()
        assert table.state == "ignored"
        x, weight, bias, mean, var = _inputs()
        _train_step(x, weight, bias, mean, var)
    assert json.loads(path.read_text())["format"] == calibration.FORMAT == 2


# -- measuring off, measuring once ---------------------------------------------------------


def test_calibrate_0_measures_nothing(cache, timed, monkeypatch, launches) -> None:
    monkeypatch.setenv("BATCHNORM_CALIBRATE", "0")
    committed = _default_table().committed
    for batch in (4, 8, 64):  # 64 KiB, 128 KiB, 1 MiB
        x, weight, bias, mean, var = _inputs(batch)
        _train_step(x, weight, bias, mean, var)
        with torch.no_grad():
            batch_norm(x, mean, var, weight, bias, False, 0.1, 1e-5)
    assert timed == []
    assert not cache.exists() or list(cache.iterdir()) == []
    # The committed table routed: the kernels ran exactly its cases.
    expected = sum(
        committed.get(("forward", "ncl", torch.float32), 1 << 62) <= batch * 16 * 256 * 4
        for batch in (4, 8, 64)
    )
    assert launches["train_forward"] == expected
    monkeypatch.setenv("BATCHNORM_CALIBRATE", "1")
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        x, weight, bias, mean, var = _inputs(8)
        _train_step(x, weight, bias, mean, var)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert timed == []  # deterministic algorithms: nothing measured either


def test_lazy_measurement_once_per_case_and_shape_class(cache, timed, launches) -> None:
    x, weight, bias, mean, var = _inputs()  # 64 KiB
    _train_step(x, weight, bias, mean, var)
    assert timed == [(("forward", "backward"), (4, 16, 256))]  # both training passes at once
    assert launches["train_forward"] == 1  # measured faster: ours
    assert launches["train_backward"] == 0  # measured slower: ATen's
    x2, *_ = _inputs(seed=1)
    _train_step(x2, weight, bias, mean, var)  # same class: no new measurement
    assert len(timed) == 1
    x3, *_ = _inputs(batch=6)  # 96 KiB: still the class [64, 128) KiB
    _train_step(x3, weight, bias, mean, var)
    assert len(timed) == 1
    x4, *_ = _inputs(batch=8)  # 128 KiB: the next class
    _train_step(x4, weight, bias, mean, var)
    assert len(timed) == 2
    with torch.no_grad():  # evaluation: its own case
        batch_norm(x, mean, var, weight, bias, False, 0.1, 1e-5)
        batch_norm(x, mean, var, weight, bias, False, 0.1, 1e-5)
    assert timed[2] == (("inference",), (4, 16, 256))
    assert len(timed) == 3
    # Stored: a new process (forget the memory) routes by it without measuring.
    stored = json.loads(_default_table().path.read_text())["lazy"]
    assert set(stored) == {
        "forward/ncl/float32@16/4", "backward/ncl/float32@16/4", "forward/ncl/float32@17/4",
        "backward/ncl/float32@17/4", "inference/ncl/float32@16/4",
    }  # fmt: skip
    assert stored["forward/ncl/float32@16/4"]["kernels"] is True
    assert stored["backward/ncl/float32@16/4"]["kernels"] is False
    calibration.forget()
    with backends.fresh():
        before = launches["train_forward"]
        _train_step(x, weight, bias, mean, var)
        assert launches["train_forward"] == before + 1
    assert len(timed) == 3


def test_a_decided_route_is_looked_up_and_forgotten_when_the_table_changes(
    cache, timed, launches, monkeypatch
) -> None:
    """After the measurement decides an input's route, the next call finds it in the table's
    memo (the layout is not worked out again); any change of the table empties the memo."""
    x, weight, bias, mean, var = _inputs()  # 64 KiB, the kernels measured faster in inference
    x = x.detach()
    with torch.no_grad():
        batch_norm(x, mean, var, weight, bias, False, 0.1, 1e-5)
        table = _default_table()
        key = ("inference", x.dtype, x.shape, x.stride(), True)
        assert table.routes == {key: "ncl"}
        expected = TF.batch_norm(x, mean, var, weight, bias, False, 0.1, 1e-5)

        def no_layout(tensor):
            raise AssertionError("the memo should have answered")

        original = cpu_backend.kernel_layout
        monkeypatch.setattr(cpu_backend, "kernel_layout", no_layout)
        assert_close(batch_norm(x, mean, var, weight, bias, False, 0.1, 1e-5), expected)
        assert launches["inference"] == 2  # ours both times, one measurement
        assert len(timed) == 1
        monkeypatch.setattr(cpu_backend, "kernel_layout", original)
        with calibration.LOCK:
            table.clear()
        assert table.routes == {}
        batch_norm(x, mean, var, weight, bias, False, 0.1, 1e-5)  # measured again
        assert len(timed) == 2
        assert table.routes == {key: "ncl"}
        # An input whose route a measurement would still decide is not memoized.
        monkeypatch.setenv("BATCHNORM_CALIBRATE", "0")
        x2, *_ = _inputs(batch=8)  # 128 KiB: a class nothing measured
        batch_norm(x2.detach(), mean, var, weight, bias, False, 0.1, 1e-5)
        assert len(timed) == 2
        assert len(table.routes) == 1


def test_runs_of_another_length_are_measured_apart(cache, timed, launches) -> None:
    """The same size read in runs of another class (L = 64, not 256) is its own measurement,
    also where a sweep's threshold covers the case: that answers only for its run class."""
    x, weight, bias, mean, var = _inputs()  # (4, 16, 256): 64 KiB, runs of 256
    _train_step(x, weight, bias, mean, var)
    assert len(timed) == 1
    short = torch.randn(16, 16, 64).requires_grad_()  # 64 KiB too, runs of 64
    _train_step(short, weight, bias, mean, var)
    assert timed[1] == (("forward", "backward"), (16, 16, 64))
    table = _default_table()
    assert (F32_NCL, (16, 3)) in table.decisions
    assert calibration.run_class(64) != calibration.run_class(256) == calibration.SWEEP_RUN["ncl"]
    table.record_sweep(  # a sweep at runs of 256 where ATen wins: no threshold
        {F32_NCL: [calibration.SweepPoint(1 << 16, calibration.Timing(2.0, 1.0, 3))]},
        {"date": "2026-12-02", "rounds": 3, "sizes": [1 << 16], "seconds": 0.1},
    )
    assert table.choice(F32_NCL, 1 << 16, 256) is False  # the sweep's run class: its threshold
    assert table.choice(F32_NCL, 1 << 16, 64) is True  # another: the lazy decision
    assert calibration.class_range((16, 3)) == "64 KiB–128 KiB, runs 32–127"


def test_a_real_lazy_measurement_leaves_the_call_alone(cache, monkeypatch) -> None:
    """Measured on scratch tensors: the caller's output, gradients and running statistics are
    F.batch_norm's, its buffers moved once, torch's random state untouched."""
    calls = []
    real = calibration.time_passes

    def counting(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(calibration, "time_passes", counting)
    x, weight, bias, mean, var = _inputs()
    mean_ref, var_ref = mean.clone(), var.clone()
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    rng = torch.get_rng_state()
    start = time.perf_counter()
    y, grads = _train_step(x, weight, bias, mean, var, dy)
    cost = time.perf_counter() - start
    assert torch.equal(torch.get_rng_state(), rng)
    assert calls == [["forward", "backward"]]
    y_ref, grads_ref = _reference_step(x, weight, bias, mean_ref, var_ref, dy)
    assert_close(y, y_ref)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        assert_close(grad, grad_ref)
    assert_close(mean, mean_ref)  # moved once, by the call itself
    assert_close(var, var_ref)
    table = _default_table()
    decision = table.decisions[(F32_NCL, (16, 4))]
    assert decision.timing.kernels_ms > 0
    assert decision.timing.aten_ms > 0
    assert decision.timing.rounds >= calibration.LAZY_MIN_ROUNDS
    assert 0 < decision.seconds < cost
    assert decision.nbytes == 64 << 10


def test_two_threads_calling_at_once_measure_once(cache, monkeypatch) -> None:
    calls = []

    def slow(kernels, aten, passes, shape, layout, dtype, **options):
        calls.append(tuple(passes))
        time.sleep(0.2)  # the other thread arrives meanwhile
        return {name: Timing(1.0, 2.0, 3) for name in passes}

    monkeypatch.setattr(calibration, "time_passes", slow)
    barrier = threading.Barrier(2)
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def body(index: int) -> None:
        try:
            x, weight, bias, mean, var = _inputs(seed=index)
            barrier.wait()
            results[index] = (_train_step(x, weight, bias, mean, var), (x, weight, bias))
        except BaseException as error:  # reported below
            errors.append(error)

    workers = [threading.Thread(target=body, args=(i,)) for i in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    assert calls == [("forward", "backward")]
    for index in range(2):
        (y, grads), (x, weight, bias) = results[index]
        _, _, _, mean, var = _inputs(seed=index)
        y_ref, grads_ref = _reference_step(x, weight, bias, mean, var)
        assert_close(y, y_ref)
        assert_close(grads[0], grads_ref[0])


def test_a_failed_measurement_warns_once_and_is_not_retried(cache, monkeypatch) -> None:
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise MemoryError("no room for scratch tensors")

    monkeypatch.setattr(calibration, "time_passes", failing)
    x, weight, bias, mean, var = _inputs()
    with pytest.warns(CalibrationWarning, match="MemoryError"):
        y, _ = _train_step(x, weight, bias, mean, var)
    _train_step(x, weight, bias, mean, var)
    assert calls == [1]
    assert_close(y, _reference_step(x, weight, bias, torch.zeros(16), torch.ones(16))[0])


def test_an_unwritable_cache_warns_and_keeps_the_choice(tmp_path, monkeypatch, timed) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("BATCHNORM_CACHE_DIR", str(blocker / "cache"))  # under a file
    monkeypatch.setenv("BATCHNORM_CALIBRATE", "1")
    calibration.forget()
    x, weight, bias, mean, var = _inputs()
    with backends.fresh():
        with pytest.warns(CalibrationWarning) as caught:
            _train_step(x, weight, bias, mean, var)
        _train_step(x, weight, bias, mean, var)
    messages = [str(warning.message) for warning in caught]
    assert any("cannot be read" in message for message in messages)
    assert any("cannot store" in message for message in messages)
    assert len(timed) == 1  # the choice kept in memory
    calibration.forget()


def test_nothing_is_measured_under_torch_func(cache, timed) -> None:
    x, _, _, mean, var = _inputs()

    def ours(inp):
        return (
            batch_norm(inp, mean.clone(), var.clone(), None, None, True, 0.1, 1e-5).square().sum()
        )

    def theirs(inp):
        return TF.batch_norm(inp, None, None, training=True).square().sum()

    grad = torch.func.grad(ours)(x.detach())
    assert timed == []
    assert_close(grad, torch.func.grad(theirs)(x.detach()))
    assert calibration.may_measure(x)


@pytest.mark.skipif(not cpu_stream.THREADED, reason="torch's OpenMP runtime not found")
def test_nothing_is_measured_inside_an_openmp_region() -> None:
    runtime = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    body_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    runtime.GOMP_parallel.argtypes = [body_type, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    seen: list[bool] = []

    def body(_: int) -> None:
        seen.append(calibration.in_openmp_region())

    runtime.GOMP_parallel(body_type(body), None, 2, 0)
    assert seen == [True, True]
    assert not calibration.in_openmp_region()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() of a threaded process
def test_a_forked_child_starts_with_a_free_lock() -> None:
    """A fork while another thread measures (holds the lock) must not leave the child's lock
    held forever."""
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with calibration.LOCK:
            held.set()
            release.wait(10)

    worker = threading.Thread(target=holder)
    worker.start()
    held.wait(10)
    try:
        pid = os.fork()
        if pid == 0:  # the child: exit 0 only if the lock can be taken
            os._exit(0 if calibration.LOCK.acquire(timeout=5) else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        worker.join()
    assert os.waitstatus_to_exitcode(status) == 0


# -- routing follows the table -------------------------------------------------------------


def _store(cases: dict, *, threads: int | None = None) -> None:
    """Stores ``case → threshold`` as a sweep would, then forgets the memory (a new process)."""
    points = {
        case: [SweepPoint(threshold, Timing(1.0, 2.0, 3))] for case, threshold in cases.items()
    }
    _default_table(threads).record_sweep(points, {"date": "test", "rounds": 3, "seconds": 0})
    calibration.forget()


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("threshold", [1, 1 << 40], ids=["one-byte", "huge"])
def test_routing_follows_the_stored_thresholds(
    cache, timed, launches, monkeypatch, threshold, memory_format
) -> None:
    monkeypatch.setenv("BATCHNORM_CALIBRATE", "0")  # a stored table routes all the same
    layout = "ncl" if memory_format == "contiguous" else "rows"
    _store({(name, layout, torch.float32): threshold for name in calibration.PASSES})
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 6, generator=gen) * 3 + 2  # 1.4 KiB
    if memory_format == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight, bias = torch.rand(3, generator=gen) + 0.5, torch.randn(3, generator=gen)
    weight.requires_grad_()
    bias.requires_grad_()
    mean, var = torch.zeros(3), torch.ones(3)
    dy = torch.randn(x.shape, generator=gen)
    with backends.fresh():
        y, grads = _train_step(x, weight, bias, mean, var, dy)
        with torch.no_grad():
            y_eval = batch_norm(x, mean, var, weight, bias, False, 0.1, 1e-5)
    ours = threshold == 1
    assert launches == {"train_forward": ours, "train_backward": ours, "inference": ours}
    assert timed == []
    mean_ref, var_ref = torch.zeros(3), torch.ones(3)
    y_ref, grads_ref = _reference_step(x, weight, bias, mean_ref, var_ref, dy)
    assert_close(y, y_ref)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        assert_close(grad, grad_ref)
    assert_close(mean, mean_ref)
    assert_close(var, var_ref)
    expected = TF.batch_norm(x.detach(), mean, var, weight.detach(), bias.detach(), False)
    assert_close(y_eval, expected)


def test_explicit_tables_keep_their_meaning(cache, timed, launches) -> None:
    """``CpuBackend(ALL_KERNEL_CASES)`` and ``CpuBackend({})`` ignore stored tables and never
    measure."""
    _store({F32_NCL: 1 << 40})
    x, weight, bias, mean, var = _inputs()
    for tables, expected in ((measured.ALL_KERNEL_CASES, 1), ({}, 0)):
        before = launches["train_forward"]
        with backends.override("cpu", cpu_backend.CpuBackend(tables)):
            _train_step(x, weight, bias, mean, var)
        assert launches["train_forward"] - before == expected
    assert timed == []
    with pytest.raises(ValueError, match="explicitly"):
        cpu_backend.CpuBackend({}).routing_table()


def test_other_thread_counts(cache, timed, monkeypatch) -> None:
    """Where the committed tables were not measured (3 threads), measuring off says what
    routes instead, once; measuring on measures at that count."""
    saved = torch.get_num_threads()
    x, weight, bias, mean, var = _inputs()
    try:
        torch.set_num_threads(3)
        monkeypatch.setenv("BATCHNORM_CALIBRATE", "0")
        with pytest.warns(CalibrationWarning, match="committed table .*MEASURED_THREADED_CASES"):
            _train_step(x, weight, bias, mean, var)
        explained = str(cpu_backend.explain(x))
        assert "measured at 2 thread(s), not at 3" in explained
        assert "BATCHNORM_CALIBRATE=0" in explained
        monkeypatch.setenv("BATCHNORM_CALIBRATE", "1")
        _train_step(x, weight, bias, mean, var)
        assert len(timed) == 1
        assert _default_table(3).decisions
        assert _default_table(3).path.name.endswith("-t3.json")
    finally:
        torch.set_num_threads(saved)


@pytest.mark.skipif(cpu_backend.cpu_numba is None, reason="numba not installed")
def test_fused_calls_are_measured_at_their_entry(cache, timed, monkeypatch) -> None:
    """A fused call runs the generic path over the primitives (which measure nothing): the
    training passes are decided when the whole call comes in."""
    kernels = []
    launch = cpu_backend._launch
    monkeypatch.setattr(
        cpu_backend,
        "_launch",
        lambda kernel, *args: (kernels.append(kernel), launch(kernel, *args)),
    )
    x, weight, bias, mean, var = _inputs()
    y = batch_norm(x, mean, var, weight, bias, True, 0.1, 1e-5, activation="relu")
    y.sum().backward()
    assert timed == [(("forward", "backward"), (4, 16, 256))]
    assert kernels == [cpu_backend.cpu_numba.forward_ncl]  # forward measured faster: ours
    x_ref = x.detach().clone().requires_grad_()
    expected = torch.relu(TF.batch_norm(x_ref, None, None, weight.detach(), bias.detach(), True))
    expected.sum().backward()
    assert_close(y, expected)
    assert_close(x.grad, x_ref.grad)


# -- explain -------------------------------------------------------------------------------


def test_explain_names_the_kernel_the_table_and_the_times(cache, timed) -> None:
    x, weight, bias, mean, var = _inputs()
    before = cpu_backend.explain(x.detach())
    assert before.source == "committed"
    assert "not measured yet" in before.note
    _train_step(x, weight, bias, mean, var)
    forward = cpu_backend.explain(x.detach())
    assert (forward.source, forward.kernel, forward.ours) == ("lazy", "C", True)
    assert forward.timing == Timing(1.0, 2.0, 3)
    backward = cpu_backend.explain(x.detach(), "backward")
    assert (backward.source, backward.kernel) == ("lazy", "ATen")
    assert "x0.50" in str(backward)
    assert "lazy" in str(backward)
    assert cpu_backend.explain(x, "inference").note.startswith("autograd records")
    half = cpu_backend.explain(x.detach().half())
    assert (half.source, half.kernel, half.layout) == ("none", "ATen", None)
    _store({F32_NCL: 1 << 17})
    with backends.fresh():
        stored = cpu_backend.explain(x.detach())
        assert (stored.source, stored.threshold, stored.kernel) == ("stored", 1 << 17, "ATen")
        assert "ours from 128 KiB" in str(stored)
        with backends.override("cpu", cpu_backend.CpuBackend(measured.ALL_KERNEL_CASES)):
            assert cpu_backend.explain(x.detach()).source == "explicit"
    with pytest.raises(ValueError, match="pass_name"):
        cpu_backend.explain(x, "sideways")


def test_explain_says_when_calls_go_elsewhere(cache, monkeypatch) -> None:
    x = torch.randn(4, 16, 256)
    monkeypatch.setenv("BATCHNORM_BACKEND", "aten")
    assert "BATCHNORM_BACKEND=aten" in cpu_backend.explain(x).note
    monkeypatch.delenv("BATCHNORM_BACKEND")
    small = cpu_backend.explain(torch.randn(4, 3, 5))
    assert (small.source, small.kernel) == ("committed", "ATen")
    assert "not measured" in small.note
    assert cpu_backend.explain(x[:, :, ::2]).source == "none"  # strided: no kernel takes it


# -- batchnorm calibrate --------------------------------------------------------------------


def _cli(args: list[str], capsys) -> tuple[int, str]:
    try:
        code = cli.main(args)
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    out = capsys.readouterr()
    return code, out.out + out.err


def test_calibrate_quick_show_and_reset(cache, capsys) -> None:
    threads = torch.get_num_threads()
    tiny = ["--min-size", "16K", "--max-size", "64K", "--rounds", "1", "--dtypes", "float32"]
    code, out = _cli(["calibrate", "--quick", *tiny], capsys)
    assert code == 0, out
    assert f"{threads} thread(s)" in out
    assert "ours from" in out
    assert "committed" in out
    assert "forward   ncl    float32" in out
    stored = calibration.stored_paths(_default_table().key)
    assert [p.parent for p in stored] == [cache]
    thresholds = json.loads(stored[0].read_text())["thresholds"]
    names = {
        f"{name}/{layout}/float32" for name in calibration.PASSES for layout in ("ncl", "rows")
    }
    assert set(thresholds) == names
    # auto routes by it: a fresh backend reads the stored thresholds.
    with backends.fresh():
        assert set(_default_table().thresholds) == {calibration.parse_case(n) for n in thresholds}
    code, shown = _cli(["calibrate", "--show"], capsys)
    assert code == 0
    assert "(stored)" in shown
    assert "16 KiB" in shown
    assert "64 KiB" in shown
    code, out = _cli(["calibrate", "--reset"], capsys)
    assert code == 0
    assert f"removed {stored[0]}" in out
    assert not stored[0].exists()
    code, out = _cli(["calibrate", "--show"], capsys)
    assert code == 0
    assert "nothing stored" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--min-size", "abc"], "expected a size in bytes"),
        (["--min-size", "2M", "--max-size", "1M"], "is below --min-size"),
        (["--show", "--reset"], "not allowed with argument"),
        (["--threads", "0"], "expected a positive integer"),
        (["--dtypes", "float16"], "invalid choice"),
    ],
)
def test_calibrate_bad_arguments_exit_2(cache, capsys, args, message) -> None:
    code, out = _cli(["calibrate", *args], capsys)
    assert code == 2
    assert message in out
    assert not cache.exists()


def test_calibrate_show_in_a_subprocess(cache) -> None:
    _store({F32_NCL: 1 << 20})
    environment = {**os.environ, "PYTHONPATH": str(SOURCE)}
    threads = str(torch.get_num_threads())
    done = subprocess.run(
        [sys.executable, "-m", "batchnorm", "calibrate", "--show", "--threads", threads],
        capture_output=True, text=True, env=environment, check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "(stored)" in done.stdout
    assert re.search(r"forward +ncl +float32 +1 MiB", done.stdout)
    assert str(cache) in done.stdout


def test_a_sample_is_several_back_to_back_calls(monkeypatch) -> None:
    """time_passes: after one warm-up call, each sample is about SAMPLE_MS of back-to-back calls
    of one backend (a 1 ms call: 4 of them), reported per call; a slow call once a sample.

    The clock is fake (it moves only when a backend runs), so a loaded CI machine, where a
    1 ms sleep can last 3 ms, cannot change the counts."""
    now = [0.0]
    monkeypatch.setattr(calibration, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    class Sleeper:
        def __init__(self, seconds: float) -> None:
            self.seconds, self.calls = seconds, 0

        def evaluate(self, call):
            self.calls += 1
            now[0] += self.seconds

    fast, slow = Sleeper(0.001), Sleeper(0.006)
    timings = calibration.time_passes(
        fast, slow, ["inference"], (2, 3, 4), "ncl", torch.float32, rounds=3
    )
    per_sample = calibration._calls_per_sample(0.001)
    assert per_sample == 4
    assert fast.calls == 1 + 3 * per_sample
    assert slow.calls == 1 + 3  # over SAMPLE_MS per call: one call a sample
    assert timings["inference"].kernels_ms == pytest.approx(1.0)  # per call, not per sample
    assert timings["inference"].aten_ms == pytest.approx(6.0)


def test_each_training_pass_has_samples_of_its_own(monkeypatch) -> None:
    """time_passes: the forward's samples are back-to-back forwards alone, the backward's
    back-to-back (untimed forward, timed backward) pairs, each with its own count per sample;
    a 1 ms forward and a 3 ms backward are reported as such (fake clock, as above)."""
    now = [0.0]
    monkeypatch.setattr(calibration, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    class Trainer:
        def __init__(self, forward_s: float, backward_s: float) -> None:
            self.forward_s, self.backward_s = forward_s, backward_s
            self.forwards = self.backwards = 0

        def train(self, call):
            self.forwards += 1
            now[0] += self.forward_s
            shape = (1, -1) + (1,) * (call.input.dim() - 2)
            output = call.input * call.weight.view(shape) + call.bias.view(shape)
            output.register_hook(self._backward)
            return types.SimpleNamespace(output=output)

        def _backward(self, grad):
            self.backwards += 1
            now[0] += self.backward_s

    kernels, aten = Trainer(0.001, 0.003), Trainer(0.002, 0.004)
    timings = calibration.time_passes(
        kernels, aten, ["forward", "backward"], (2, 3, 4), "ncl", torch.float32, rounds=3
    )
    assert timings["forward"].kernels_ms == pytest.approx(1.0)
    assert timings["forward"].aten_ms == pytest.approx(2.0)
    assert timings["backward"].kernels_ms == pytest.approx(3.0)
    assert timings["backward"].aten_ms == pytest.approx(4.0)
    # Warm-up: one forward, one (forward, backward); then 3 samples of each pass: 4 forwards
    # (4 ms) and 2 pairs (3 ms each: ceil(4 / 3)) for the kernels.
    assert (kernels.forwards, kernels.backwards) == (1 + 1 + 3 * 4 + 3 * 2, 1 + 3 * 2)
    assert (aten.forwards, aten.backwards) == (1 + 1 + 3 * 2 + 3 * 1, 1 + 3 * 1)
