"""A cached direct launcher for ``@triton.jit`` kernels: compile once per specialization, then
launch the compiled kernel with integer pointers.

``kernel[grid](*args)`` costs tens of µs on the host per launch: Triton's binder specializes every
argument, builds a string cache key, and its C launcher calls ``data_ptr()`` and
``cuPointerGetAttribute`` for every tensor. Inductor's generated launchers (and vLLM's cached
kernels) skip all of that: they keep the compiled kernel and call its ``run`` with the grid, the
raw stream, integer pointers and the scalars. :class:`DirectLauncher` does the same.

The specialization key mirrors what Triton specializes on (checked against Triton's own
``native_specialize_impl`` by ``tests/test_triton_launcher.py``): per tensor its dtype and
whether its address is 16-byte aligned; per integer whether it equals 1 (then a constexpr),
whether it is divisible by 16, and whether it needs 64 bits; floats are not specialized. Then the
constexpr values and ``num_warps``. A key seen for the first time launches once through
``kernel[grid](...)``, which compiles (or loads from Triton's disk cache), and keeps the
``CompiledKernel`` it returns.

The calling convention of ``CompiledKernel.run`` is the same in Triton 3.6 and 3.9:
``run(grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata,
enter_hook, exit_hook, *every_argument)``, constexprs included in signature order (the launcher
skips them); the hooks are ``HookChain`` objects in both, called by the C launcher when not
``None``, so the fast path passes ``None`` while they are empty. The fast path is used only where
all of that is present; otherwise, under ``TRITON_INTERPRET=1``, for CPU tensors, with a launch
hook installed (profilers such as Proton) or on another Triton version, every launch is the plain
``kernel[grid](...)``.

Kernels launched this way take their arguments in one order: runtime arguments (pointers,
integers, floats) first, constexprs last, as the kernels of this package do.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch

from batchnorm.kernels.triton.common import interpreting

__all__ = [
    "DirectLauncher",
    "fast_path_available",
    "int_class",
    "jit_function",
    "specialization_key",
]

#: Triton versions whose ``CompiledKernel.run`` convention this module was checked against.
_CHECKED_VERSIONS = ((3, 6), (3, 7), (3, 8), (3, 9))

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _triton_version() -> tuple[int, int]:
    """``(major, minor)`` of the installed Triton, ``(0, 0)`` when unreadable."""
    import triton

    try:
        major, minor = triton.__version__.split(".")[:2]
        return int(major), int(minor)
    except (ValueError, AttributeError):
        return (0, 0)


def fast_path_available() -> bool:
    """Whether launches may bypass ``kernel[grid]``: compiled Triton of a checked version with
    ``knobs.runtime`` (the launch hooks) and a way to read the raw CUDA stream."""
    if interpreting() or _triton_version() not in _CHECKED_VERSIONS:
        return False
    try:
        from triton import knobs

        knobs.runtime.launch_enter_hook  # noqa: B018 (present in the checked versions)
    except (ImportError, AttributeError):
        return False
    return hasattr(torch._C, "_cuda_getCurrentRawStream")


def _hook_set(hook: Any) -> bool:
    """Whether a launch hook would do anything: Triton 3.6 and 3.9 keep a ``HookChain`` there
    (empty unless a profiler added itself); older ones ``None`` or a function."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return True if calls is None else bool(calls)


def int_class(value: int) -> int:
    """The class Triton specializes an integer on: 1 (the value 1, a constexpr), 2 (divisible
    by 16), 3 (other), plus 4 when it needs 64 bits."""
    if value == 1:
        return 1
    wide = 0 if _INT32_MIN <= value <= _INT32_MAX else 4
    return (2 if value % 16 == 0 else 3) + wide


def specialization_key(args: Sequence[Any]) -> tuple[tuple[Any, ...], list[Any]]:
    """``(key, call_args)``: the specialization of the runtime ``args`` and the arguments to
    pass to ``run`` (tensors as integer addresses)."""
    key: list[Any] = []
    call: list[Any] = []
    for arg in args:
        kind = type(arg)
        if kind is int:
            key.append(int_class(arg))
            call.append(arg)
        elif kind is float:
            key.append(0)
            call.append(arg)
        elif kind is bool:
            key.append(arg)
            call.append(arg)
        else:  # a tensor (torch.Tensor or nn.Parameter)
            address = arg.data_ptr()
            key.append((arg.dtype, address % 16 == 0))
            call.append(address)
    return tuple(key), call


_JIT_TWINS: dict[int, Any] = {}


def jit_function(kernel: Any) -> Any:
    """``kernel`` as a ``triton.runtime.jit.JITFunction``, which ``torch.library.wrap_triton``
    needs in order to trace it (into ``triton_kernel_wrapper_mutation``/``_functional``).

    A compiled ``@triton.jit`` kernel is returned as it is. Under ``TRITON_INTERPRET=1`` the
    decorator made an ``InterpretedFunction``, which ``wrap_triton`` does not trace (torch 2.13
    runs it eagerly, earlier versions reject it); its twin here is a ``JITFunction`` of the same
    Python function whose launches run in the interpreter, so traced graphs can be built and
    run on CPU tensors (tests only: Inductor generates its own launcher for the real kernel).
    """
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    twin = _JIT_TWINS.get(id(kernel))
    if twin is None:

        class _InterpretedJIT(JITFunction):  # type: ignore[misc]
            """A ``JITFunction`` whose launches run ``interpreted`` (the interpreter's kernel)."""

            @property
            def cache_key(self) -> str:  # the device functions are not JITFunctions
                return f"interpreted:{self.fn.__module__}.{self.fn.__qualname__}"

            def __hash__(self) -> int:
                return hash(self.cache_key)

            def run(self, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
                for name in ("num_warps", "num_stages", "num_ctas"):
                    kwargs.pop(name, None)
                return kernel.run(*args, grid=grid, warmup=warmup, **kwargs)

        twin = _JIT_TWINS[id(kernel)] = _InterpretedJIT(kernel.fn)
    return twin


class DirectLauncher:
    """Launches ``module.<name>`` (a ``@triton.jit`` kernel) with a per-specialization cache.

    The kernel is looked up on the module at every launch, so replacing the module attribute
    (the stubs of ``benchmarks/gpu_host.py``) replaces what runs.

    Args:
        module: the module that defines the kernel.
        name: the kernel's name in it.
    """

    def __init__(self, module: ModuleType, name: str) -> None:
        self.module = module
        self.name = name
        kernel = getattr(module, name)
        parameters = list(inspect.signature(kernel.fn).parameters.values())
        constexpr = ["constexpr" in str(p.annotation) for p in parameters]
        first = constexpr.index(True) if True in constexpr else len(parameters)
        if not all(constexpr[first:]):
            raise TypeError(f"{name}: constexpr arguments must come after all runtime arguments")
        self.runtime_names = tuple(p.name for p in parameters[:first])
        self.constexpr_names = tuple(p.name for p in parameters[first:])
        self.cache: dict[tuple[Any, ...], Any] = {}
        self.fast = fast_path_available()

    def __call__(
        self,
        grid: tuple[int, ...],
        args: Sequence[Any],
        constexprs: Sequence[Any],
        num_warps: int,
    ) -> None:
        """Launches over ``grid`` with runtime ``args`` and ``constexprs`` (both in signature
        order)."""
        first = args[0]
        if not self.fast or first.device.type != "cuda":
            self.plain(grid, args, constexprs, num_warps)
            return
        from triton import knobs

        hooks = knobs.runtime
        device = first.get_device()
        if (
            _hook_set(hooks.launch_enter_hook)
            or _hook_set(hooks.launch_exit_hook)
            or device != torch.cuda.current_device()
        ):
            self.plain(grid, args, constexprs, num_warps)
            return
        key, call = specialization_key(args)
        full_key = (device, key, tuple(constexprs), num_warps)
        compiled = self.cache.get(full_key)
        if compiled is None:
            self.cache[full_key] = self.plain(grid, args, constexprs, num_warps)
            return
        stream = torch._C._cuda_getCurrentRawStream(device)
        grid_y = grid[1] if len(grid) > 1 else 1
        grid_z = grid[2] if len(grid) > 2 else 1
        compiled.run(
            grid[0], grid_y, grid_z, stream, compiled.function, compiled.packed_metadata,
            None, None, None, *call, *constexprs,
        )  # fmt: skip

    def traced(
        self,
        grid: tuple[int, ...],
        args: Sequence[Any],
        constexprs: Sequence[Any],
        num_warps: int,
    ) -> None:
        """``wrap_triton(kernel)[grid](...)``: the launch as ``torch.library.triton_op`` bodies
        write it, tensors passed as tensors (traceable; no integer pointers, no cache)."""
        from torch.library import wrap_triton

        kernel = wrap_triton(jit_function(getattr(self.module, self.name)))
        kernel[grid](
            *args, **dict(zip(self.constexpr_names, constexprs, strict=True)), num_warps=num_warps
        )

    def warmup(
        self,
        grid: tuple[int, ...],
        args: Sequence[Any],
        constexprs: Sequence[Any],
        num_warps: int,
    ) -> Any:
        """Compiles without launching (``kernel.warmup``); returns the ``CompiledKernel``."""
        kernel = getattr(self.module, self.name)
        return kernel.warmup(
            *args, **dict(zip(self.constexpr_names, constexprs, strict=True)),
            num_warps=num_warps, grid=grid,
        )  # fmt: skip

    def plain(
        self,
        grid: tuple[int, ...],
        args: Sequence[Any],
        constexprs: Sequence[Any],
        num_warps: int,
    ) -> Any:
        """``kernel[grid](*args, **constexprs, num_warps=...)``; returns what Triton returns
        (the ``CompiledKernel`` when compiled)."""
        kernel = getattr(self.module, self.name)
        return kernel[grid](
            *args, **dict(zip(self.constexpr_names, constexprs, strict=True)), num_warps=num_warps
        )
