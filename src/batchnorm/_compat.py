"""Every private torch call the library makes, in one place, with the versions it was checked on.

Checked on torch 2.13.0 (CPU build) and 2.14.1 (CUDA build run on the CPU), the two versions the
test suite runs on (``make test`` and ``make test-compat``); the device image runs 2.11. Each
helper degrades to the public behaviour when its private call is missing, so an untested torch
version loses a shortcut, not correctness.

The one question most callers ask is :func:`traced`: is this call run eagerly on plain tensors,
or recorded by something (``torch.compile``, ``torch.export``, FX, ``torch.jit.trace``, fake or
functional tensors, a ``TorchDispatchMode``) that can only see ATen operations? Our C and Numba
kernels read data pointers and are invisible to all of those, so a traced call takes ATen's ops.
"""

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = [
    "EAGER",
    "PLAIN_TENSOR_TYPES",
    "SYMBOLIC",
    "TRACED",
    "call_kind",
    "dispatch_modes",
    "environ_get",
    "functorch_active",
    "functorch_wrapped",
    "fx_attribute",
    "is_compiling",
    "is_fx_proxy",
    "is_scripting",
    "jit_tracing",
    "register_fusers",
    "traced",
]

#: Tensor types our own kernels run on; subclasses (fake, functional, DTensor, ...) do not.
PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)

#: ``torch.compiler.is_compiling`` (public since 2.3): True while Dynamo (``torch.compile``,
#: strict ``torch.export``) traces the call.
is_compiling: Callable[[], bool] = torch.compiler.is_compiling

#: ``torch._C._is_tracing`` (2.3–2.14): ``torch.jit.trace`` is recording. ``torch.jit.is_tracing``
#: is the public spelling, with a Python-level check of TorchScript around it.
_is_tracing: Callable[[], bool] = getattr(torch._C, "_is_tracing", torch.jit.is_tracing)  # type: ignore[attr-defined]

#: ``torch.jit.is_scripting`` (public; not in ``torch.jit``'s ``__all__``, hence the alias):
#: True inside TorchScript, where ``if is_scripting():`` compiles only its own branch.
is_scripting: Callable[[], bool] = torch.jit.is_scripting  # type: ignore[attr-defined]


def jit_tracing() -> bool:
    """Whether ``torch.jit.trace`` is recording (never under Dynamo, which cannot call it)."""
    return not is_compiling() and _is_tracing()


#: ``torch._C._len_torch_dispatch_stack`` (2.3–2.14): how many ``TorchDispatchMode``s are active
#: (``make_fx``, FLOP counters, selective checkpointing); without it none is assumed.
dispatch_modes: Callable[[], int] = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)

#: ``torch._C._are_functorch_transforms_active`` (2.3–2.14): a ``torch.func`` transform
#: (``grad``, ``vmap``, ``jacrev``, ...) wraps the tensors of this call.
functorch_active: Callable[[], bool] = getattr(
    torch._C, "_are_functorch_transforms_active", lambda: False
)


#: ``torch._C._functorch.is_functorch_wrapped_tensor`` (2.3–2.14): the tensor is a
#: ``torch.func`` wrapper (a ``grad`` or ``vmap`` level), whose storage a kernel cannot read.
functorch_wrapped: Callable[[torch.Tensor], bool] = getattr(
    getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", lambda tensor: False
)


def is_fx_proxy(value: object) -> bool:
    """Whether ``value`` is a ``torch.fx.Proxy`` (``symbolic_trace`` is recording the call)."""
    return isinstance(value, torch.fx.Proxy)


def fx_attribute(proxy: Any, module: nn.Module, name: str) -> Any:
    """A ``get_attr`` proxy of ``module.<name>`` in the graph ``proxy`` is being traced into.

    ``symbolic_trace`` records operations on proxies only; an in-place operation on a buffer
    itself (``num_batches_tracked.add_(1)``) would run once at trace time and be missing from the
    graph. ``Tracer.path_of_module`` (public) names the module inside the traced root.

    Args:
        proxy: a ``torch.fx.Proxy`` of the current trace (the module's input).
        module: the module that owns the attribute, a submodule of the traced root.
        name: the attribute's name, e.g. ``"num_batches_tracked"``.

    Returns:
        A proxy; operations on it are recorded in the graph.
    """
    tracer = proxy.tracer
    path = tracer.path_of_module(module)
    return tracer.create_proxy("get_attr", f"{path}.{name}" if path else name, (), {})


def traced(x: Any) -> bool:
    """Whether a call on ``x`` is being recorded rather than run eagerly on real, plain tensors.

    True for anything but a plain ``torch.Tensor``/``nn.Parameter`` (FX proxies, fake and
    functional tensors of ``torch.export``/AOTAutograd, tensor subclasses), for meta tensors, and
    while ``torch.compile``, ``torch.jit.trace`` or a ``TorchDispatchMode`` is active. A
    ``torch.func`` transform alone does not count: its wrapped tensors are handled by the
    backends themselves (see :func:`functorch_active`).

    Args:
        x: the input of the call.

    Returns:
        ``True`` when the call must be expressed in ATen operations.
    """
    return (
        is_compiling()  # first: Dynamo then never sees the private calls below
        or type(x) not in PLAIN_TENSOR_TYPES
        or x.is_meta
        or _is_tracing()
        or dispatch_modes() > 0
    )


#: :func:`call_kind`'s answers: run eagerly on plain tensors (our kernels may run); record ATen
#: operations (``torch.compile``, ``torch.export``, fake/functional tensors, subclasses, meta
#: tensors, dispatch modes); record symbolically (FX proxies, ``torch.jit.trace``), where the
#: values cannot be checked and a check would be baked into the recording as a constant.
EAGER, TRACED, SYMBOLIC = 0, 1, 2


def call_kind(x: Any) -> int:
    """How a call on ``x`` runs: :data:`EAGER`, :data:`TRACED` or :data:`SYMBOLIC`.

    One question instead of three (:func:`is_fx_proxy`, :func:`jit_tracing`, :func:`traced`),
    asked once per call: ``is_compiling`` is asked first, so Dynamo never sees the private
    calls; ``SYMBOLIC`` implies what ``traced`` says too (the call takes ATen's operations).
    ``benchmarks/results/cpu-2026-12-02-c-overhead.log`` has what the single question saves
    on a call whose caches are cold.

    Args:
        x: the input of the call.

    Returns:
        ``SYMBOLIC`` for an FX proxy or while ``torch.jit.trace`` records (outside Dynamo);
        ``EAGER`` for a plain, non-meta tensor with no dispatch mode active; else ``TRACED``.
    """
    if is_compiling():
        return TRACED
    if _is_tracing():
        return SYMBOLIC
    if type(x) in PLAIN_TENSOR_TYPES and not x.is_meta and dispatch_modes() == 0:
        return EAGER
    return SYMBOLIC if isinstance(x, torch.fx.Proxy) else TRACED


#: ``os.environ._data`` (CPython 3.9–3.13; checked on 3.11 and 3.12): the dict behind
#: ``os.environ``, which ``os.environ[...] = ...`` and ``del`` keep current, keyed by the
#: encoded name on POSIX. ``os.environ.get`` reaches it through four Python frames and, for an
#: unset name, a raised and caught ``KeyError``: 36–41 µs of a call whose caches are cold,
#: against 8–10 µs here, on a 2-core AMD EPYC (``benchmarks/cpu_overhead.py --parts``, results
#: in ``benchmarks/results/cpu-2026-12-02-c-overhead.log``), over 5% of the smallest case of
#: ``benchmarks/cpu.py`` there (0.34–0.48 ms). Where the dict is missing or keyed otherwise
#: (Windows upper-cases str keys), the public read runs.
_ENVIRON_DATA: dict[Any, Any] | None = getattr(os.environ, "_data", None)
_ENVIRON_ENCODED = os.name == "posix" and isinstance(_ENVIRON_DATA, dict)


def environ_get(name: str, encoded: bytes) -> str | None:
    """``os.environ.get(name)``, read from the dict behind it where that is safe.

    Args:
        name: the variable's name.
        encoded: ``name`` encoded as ``os.environ`` keys it (``os.fsencode(name)``), computed
            once by the caller.

    Returns:
        The value, or None when the variable is not set.
    """
    if _ENVIRON_ENCODED:
        value = _ENVIRON_DATA.get(encoded)  # type: ignore[union-attr]
        return None if value is None else os.fsdecode(value)
    return os.environ.get(name)


def register_fusers(ours: dict[type[nn.Module], type[nn.Module]]) -> int:
    """Adds our batch-norm classes to ``torch.ao.quantization``'s table of module fusers.

    ``torch.ao.quantization.fuse_modules`` looks fusers up by the *exact* types of the modules,
    e.g. ``(nn.Conv2d, nn.BatchNorm2d)``, in the private dict
    ``fuser_method_mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD`` (same name and layout in
    2.3–2.14). Every entry naming one of torch's batch-norm classes is copied with ours in its
    place and torch's fuser function (which reads only the batch-norm attributes ours share).

    Args:
        ours: torch's class → ours, e.g. ``{nn.BatchNorm2d: batchnorm.BatchNorm2d}``; only
            classes whose forward is exactly torch's math belong here (not fused activations).

    Returns:
        The number of entries added (0 when the private table is not there).
    """
    try:
        from torch.ao.quantization import fuser_method_mappings
    except ImportError:  # pragma: no cover - torch built without quantization
        return 0
    table = getattr(fuser_method_mappings, "_DEFAULT_OP_LIST_TO_FUSER_METHOD", None)
    if not isinstance(table, dict):  # pragma: no cover - a torch that reorganized it
        return 0
    added = 0
    for key, fuser in list(table.items()):
        if not any(kind in ours for kind in key):
            continue
        new_key = tuple(ours.get(kind, kind) for kind in key)
        if new_key not in table:
            table[new_key] = fuser
            added += 1
    return added
