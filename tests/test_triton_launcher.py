"""The cached direct launcher (``batchnorm.kernels.triton.launcher``), without a GPU.

Its key must split launches exactly where Triton's own specialization does (checked against
Triton's ``native_specialize_impl``), a key seen once must never compile again, and under the
interpreter every launch must be the plain ``kernel[grid](...)``. The fast path itself is
driven here with stand-in CUDA tensors and a stand-in compiled kernel; that the real compiled
kernel has what it reads is checked by ``tests/test_triton_compile.py`` (AOT for sm_90).
"""

from __future__ import annotations

import os
import types
from typing import Any

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")

from batchnorm.kernels.triton import launcher as ln

_INTS = [0, 1, 2, 15, 16, 17, 32, 48, -16, -1, 2**31 - 1, 2**31, 2**31 + 16, -(2**31), 2**40]


def _triton_specialization(value: Any) -> Any:
    """What Triton itself specializes ``value`` on, for a backend built without a GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime import jit

    backend = make_backend(GPUTarget("cuda", 90, 32))
    return jit.native_specialize_impl(backend, value, False, True, True)


def test_integer_classes_match_triton() -> None:
    """Two integers share a key class exactly when Triton compiles them alike."""
    if not hasattr(__import__("triton.runtime.jit").runtime.jit, "native_specialize_impl"):
        pytest.skip("this Triton has no native_specialize_impl")
    for a in _INTS:
        for b in _INTS:
            same_key = ln.int_class(a) == ln.int_class(b)
            same_triton = _triton_specialization(a) == _triton_specialization(b)
            assert same_key == same_triton, (a, b)


def test_tensor_keys_match_triton() -> None:
    """Tensors: dtype and 16-byte alignment, as in Triton's specialization."""
    if not hasattr(__import__("triton.runtime.jit").runtime.jit, "native_specialize_impl"):
        pytest.skip("this Triton has no native_specialize_impl")
    base = torch.empty(64)
    tensors = [base, base[1:], base[4:], torch.empty(64, dtype=torch.bfloat16), base[8:]]
    for a in tensors:
        for b in tensors:
            same_key = ln.specialization_key([a])[0] == ln.specialization_key([b])[0]
            same_triton = _triton_specialization(a) == _triton_specialization(b)
            assert same_key == same_triton


def test_interpreter_uses_the_plain_launch() -> None:
    """Under ``TRITON_INTERPRET=1`` the fast path is off and launches go through Triton."""
    from batchnorm.kernels.triton import launch

    assert not ln.fast_path_available()
    assert not launch._NORMALIZE.fast


class _Device:
    type = "cuda"


class _CudaTensor:
    """Stands for a CUDA tensor: what the launcher reads of one."""

    def __init__(self, address: int, dtype: torch.dtype = torch.float32) -> None:
        self.address = address
        self.dtype = dtype
        self.device = _Device()

    def data_ptr(self) -> int:
        return self.address

    def get_device(self) -> int:
        return 0


class _Compiled:
    """Stands for a ``CompiledKernel``: records the calls of ``run``."""

    function = "function-handle"
    packed_metadata = ("packed",)

    def __init__(self, runs: list[tuple[Any, ...]]) -> None:
        self.runs = runs

    def run(self, *args: Any) -> None:
        self.runs.append(args)


def _fake_kernel_module(
    compiles: list[tuple[Any, ...]], runs: list[tuple[Any, ...]]
) -> types.ModuleType:
    """A module with ``kernel(x_ptr, n, scale, BLOCK: tl.constexpr)`` whose launch compiles."""

    def body(x_ptr, n, scale, BLOCK: "tl.constexpr"):  # type: ignore[no-untyped-def]  # noqa: F821, UP037
        pass

    class Kernel:
        fn = body

        def __getitem__(self, grid: Any) -> Any:
            def launch(*args: Any, **kwargs: Any) -> _Compiled:
                compiles.append((grid, args, kwargs))
                return _Compiled(runs)

            return launch

    module = types.ModuleType("fake_kernels")
    module.kernel = Kernel()  # type: ignore[attr-defined]
    return module


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> tuple[ln.DirectLauncher, list[Any], list[Any]]:
    """A launcher on the fake module with the fast path forced on (no GPU needed)."""
    compiles: list[tuple[Any, ...]] = []
    runs: list[tuple[Any, ...]] = []
    launcher = ln.DirectLauncher(_fake_kernel_module(compiles, runs), "kernel")
    launcher.fast = True
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1234, raising=False)
    return launcher, compiles, runs


def test_one_compile_per_key_then_direct_runs(
    fast: tuple[ln.DirectLauncher, list[Any], list[Any]],
) -> None:
    """Same specialization: compiled once, then ``run`` with integer pointers and the stream;
    alignment, the integer classes and constexprs each make a new entry."""
    launcher, compiles, runs = fast
    x = _CudaTensor(4096)
    for _ in range(3):
        launcher((4, 2), (x, 64, 0.5), (128,), 4)
    assert len(compiles) == 1
    assert compiles[0][2] == {"BLOCK": 128, "num_warps": 4}
    assert len(runs) == 2
    assert runs[0] == (4, 2, 1, 1234, "function-handle", ("packed",), None, None, None,
                       4096, 64, 0.5, 128)  # fmt: skip
    launcher((4, 2), (_CudaTensor(8192), 80, 0.25), (128,), 4)  # same classes: no compile
    assert len(compiles) == 1
    for args, constexprs in (
        ((_CudaTensor(4100), 64, 0.5), (128,)),  # not 16-byte aligned
        ((x, 1, 0.5), (128,)),  # n == 1
        ((x, 65, 0.5), (128,)),  # n not divisible by 16
        ((x, 2**33, 0.5), (128,)),  # n needs 64 bits
        ((x, 64, 0.5), (256,)),  # another constexpr
        ((_CudaTensor(4096, torch.bfloat16), 64, 0.5), (128,)),  # another dtype
    ):
        before = len(compiles)
        launcher((1,), args, constexprs, 4)
        assert len(compiles) == before + 1, (args, constexprs)
    assert len(launcher.cache) == 7


def test_launch_hook_or_other_device_takes_the_plain_path(
    fast: tuple[ln.DirectLauncher, list[Any], list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A profiler's launch hook sees every launch; a tensor off the current device too."""
    from triton import knobs

    launcher, compiles, runs = fast
    x = _CudaTensor(4096)
    launcher((1,), (x, 64, 0.5), (128,), 4)
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", lambda *a: None)
    launcher((1,), (x, 64, 0.5), (128,), 4)
    assert (len(compiles), len(runs)) == (2, 0)
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    launcher((1,), (x, 64, 0.5), (128,), 4)
    assert (len(compiles), len(runs)) == (3, 0)


def test_constexprs_must_come_last() -> None:
    """The launcher appends constexprs after the runtime arguments: other orders are refused."""

    def body(x_ptr, BLOCK: "tl.constexpr", n):  # type: ignore[no-untyped-def]  # noqa: F821, UP037
        pass

    module = types.ModuleType("bad_kernels")
    module.kernel = types.SimpleNamespace(fn=body)  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="constexpr arguments must come after"):
        ln.DirectLauncher(module, "kernel")


def test_every_kernel_launcher_knows_its_constexprs() -> None:
    """The package's launchers split each kernel's arguments at the first constexpr."""
    from batchnorm.kernels.triton import launch

    assert launch._REDUCE_STATS.constexpr_names[0] == "UPDATE_RUNNING"
    assert launch._NORMALIZE.runtime_names[-1] == "slope"
    assert launch._INPUT_GRAD.constexpr_names[-1] == "BLOCK_C"
