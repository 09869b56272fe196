"""Backends behind one contract (:class:`Backend`) and the rule that picks one for a tensor.

Selection, first match wins:

1. the ``backend=`` argument of :func:`batchnorm.functional.batch_norm` or of a module;
2. the environment variable ``BATCHNORM_BACKEND`` (a backend name or ``auto``);
3. ``auto``: for CUDA tensors the ``cuda`` backend (Triton kernels where they measured faster
   than PyTorch's, ATen's CUDA kernels elsewhere: ``benchmarks/gpu.py``) when Triton imports,
   else ATen's; for CPU tensors the Numba kernels when Numba imports, else ATen's native
   kernels (both measured at least as fast as ``torch.nn.functional.batch_norm``:
   ``benchmarks/cpu.py``); else the pure-torch backend.

Backends live in their own modules and are imported on first use, so a missing optional
dependency (Triton) only matters to whoever asks for that backend.
"""

from __future__ import annotations

import importlib
import os

import torch

from batchnorm.backends.base import (
    Backend,
    ForwardResult,
    compute_dtype,
    normalize_with_running_stats,
)

__all__ = [
    "BACKEND_ENV_VAR",
    "Backend",
    "ForwardResult",
    "available_backends",
    "compute_dtype",
    "normalize_with_running_stats",
    "resolve_backend",
]

BACKEND_ENV_VAR = "BATCHNORM_BACKEND"

#: Backend name → (module, class); the module is imported when the backend is first asked for.
_REGISTRY: dict[str, tuple[str, str]] = {
    "torch": ("batchnorm.backends.torch_backend", "TorchBackend"),
    "numpy": ("batchnorm.backends.numpy_backend", "NumpyBackend"),
    "triton": ("batchnorm.backends.triton_backend", "TritonBackend"),
    "aten": ("batchnorm.backends.aten_backend", "AtenBackend"),
    "numba": ("batchnorm.backends.numba_backend", "NumbaBackend"),
    "cuda": ("batchnorm.backends.cuda_backend", "CudaBackend"),
}
#: Backend name → its shared instance; also a device → auto's choice there (looked up by the
#: device itself: reading its type costs more than the lookup).
_INSTANCES: dict[str | torch.device, Backend] = {}


def available_backends() -> tuple[str, ...]:
    """Names of the backends that import on this machine (``backend=`` also takes ``auto``)."""
    names = []
    for name in _REGISTRY:
        try:
            _instance(name)
        except ImportError:
            continue
        names.append(name)
    return tuple(names)


def _instance(name: str) -> Backend:
    """The shared instance of backend ``name``; raises ImportError if its module cannot load."""
    if name not in _INSTANCES:
        module_name, class_name = _REGISTRY[name]
        backend_class = getattr(importlib.import_module(module_name), class_name)
        _INSTANCES[name] = backend_class()
    return _INSTANCES[name]


def _auto(device: torch.device) -> str:
    """The backend ``auto`` picks for ``device``."""
    if device.type == "cuda":
        try:
            _instance("cuda")
        except ImportError:  # no Triton here: PyTorch's own CUDA kernels
            return "aten"
        return "cuda"
    if device.type == "cpu":
        try:
            _instance("numba")
        except ImportError:
            return "aten"
        return "numba"
    return "torch"


#: ``os.environ``'s own mapping and key encoding (CPython's ``os._Environ``), read directly:
#: ``os.environ.get`` runs four Python-level calls, ~10 µs per batch norm when caches are cold.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENVIRON_KEY = os.environ.encodekey(BACKEND_ENV_VAR) if hasattr(os.environ, "encodekey") else None


def _environment_value() -> str | None:
    """The current value of ``BATCHNORM_BACKEND`` (None when unset), as ``os.environ`` has it."""
    if _ENVIRON_DATA is None or _ENVIRON_KEY is None:
        return os.environ.get(BACKEND_ENV_VAR)
    raw = _ENVIRON_DATA.get(_ENVIRON_KEY)
    return None if raw is None else os.environ.decodevalue(raw)


def resolve_backend(name: str | None, device: torch.device) -> Backend:
    """Returns the backend to run on ``device``.

    Args:
        name: a backend name, ``"auto"``, or ``None`` to read ``BATCHNORM_BACKEND``.
        device: the device of the input; ``auto`` chooses by it.

    Returns:
        A backend instance (one shared instance per name).

    Raises:
        ValueError: if the name (argument or environment variable) is not a known backend.
        ImportError: if the named backend needs a package that is not installed.
    """
    source = "backend"
    if name is None:
        name = _environment_value() or "auto"
        source = BACKEND_ENV_VAR
    is_auto = name == "auto"
    if is_auto:
        chosen = _INSTANCES.get(device)  # auto's choice for this device, made once
        if chosen is not None:
            return chosen
        name = _auto(device)
    if name not in _REGISTRY:
        choices = ", ".join(("auto", *_REGISTRY))
        raise ValueError(f"{source}: expected one of {choices}, got {name!r}")
    try:
        instance = _instance(name)
    except ImportError as error:
        raise ImportError(
            f"{source}: the {name!r} backend cannot be used here ({error}); "
            f"install what it needs or choose another of: {', '.join(available_backends())}"
        ) from error
    if is_auto:
        _INSTANCES[device] = instance
    return instance
