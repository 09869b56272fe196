"""Backends behind one contract (:class:`Backend`) and the rule that picks one for a tensor.

Selection, first match wins:

1. the ``backend=`` argument of :func:`batchnorm.functional.batch_norm` or of a module;
2. the environment variable ``BATCHNORM_BACKEND`` (a backend name or ``auto``);
3. ``auto``: for CUDA tensors the ``cuda`` backend (Triton kernels where they measured faster
   than PyTorch's, ATen's CUDA kernels elsewhere: ``benchmarks/gpu.py``) when Triton imports,
   else ATen's; for CPU tensors the ``cpu`` backend (our C or Numba kernels where they measured
   faster than ATen on this machine, ATen's elsewhere: :mod:`batchnorm.backends.calibration`)
   when either kernel set runs here, else ATen's native kernels; else the pure-torch backend.

Backends live in their own modules and are imported on first use, so a missing optional
dependency (Triton) only matters to whoever asks for that backend.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator

import torch

from batchnorm import _compat
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
    "fresh",
    "normalize_with_running_stats",
    "override",
    "resolve_backend",
]

BACKEND_ENV_VAR = "BATCHNORM_BACKEND"
_ENCODED_ENV_VAR = os.fsencode(BACKEND_ENV_VAR)

#: Backend name → (module, class); the module is imported when the backend is first asked for.
_REGISTRY: dict[str, tuple[str, str]] = {
    "torch": ("batchnorm.backends.torch_backend", "TorchBackend"),
    "numpy": ("batchnorm.backends.numpy_backend", "NumpyBackend"),
    "triton": ("batchnorm.backends.triton_backend", "TritonBackend"),
    "aten": ("batchnorm.backends.aten_backend", "AtenBackend"),
    "cpu": ("batchnorm.backends.cpu_backend", "CpuBackend"),
    "cuda": ("batchnorm.backends.cuda_backend", "CudaBackend"),
}
#: Other names of registered backends (the ``cpu`` backend ran only Numba's kernels once).
_ALIASES: dict[str, str] = {"numba": "cpu"}
#: Backend name → its shared instance, made on first use.
_INSTANCES: dict[str, Backend] = {}
#: Device → the backend ``auto`` chose there (chosen once per process and device).
_AUTO: dict[torch.device, Backend] = {}


def available_backends() -> tuple[str, ...]:
    """Names of the backends that import on this machine (``backend=`` also takes ``auto``
    and the aliases, e.g. ``numba`` for ``cpu``)."""
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
    instance = _INSTANCES.get(name)
    if instance is None:
        module_name, class_name = _REGISTRY[name]
        backend_class = getattr(importlib.import_module(module_name), class_name)
        instance = _INSTANCES[name] = backend_class()
    return instance


def _auto(device_type: str) -> str:
    """The backend ``auto`` picks for a device type."""
    preferred = {"cuda": "cuda", "cpu": "cpu"}.get(device_type)
    if preferred is None:
        return "torch"
    try:
        _instance(preferred)
    except ImportError:  # no Triton (CUDA), neither C kernels nor Numba (CPU): ATen's kernels
        return "aten"
    return preferred


@contextlib.contextmanager
def override(name: str, instance: Backend) -> Iterator[Backend]:
    """Makes ``instance`` the backend called ``name`` (and ``auto``'s choice) inside a block.

    The seam tests and benchmarks use to run a configured backend (e.g. the ``cpu`` backend
    with every kernel enabled) through the functional and the modules; on leaving the block the
    previous instances come back.

    Args:
        name: a registered backend name (not ``auto``; an alias names its backend).
        instance: the backend to use under that name.

    Yields:
        ``instance``.

    Raises:
        ValueError: if ``name`` is not a registered backend.
    """
    name = _ALIASES.get(name, name)
    if name not in _REGISTRY:
        raise ValueError(f"name: expected one of {', '.join(_REGISTRY)}, got {name!r}")
    saved_instances, saved_auto = dict(_INSTANCES), dict(_AUTO)
    _INSTANCES[name] = instance
    _AUTO.clear()
    try:
        yield instance
    finally:
        _INSTANCES.clear()
        _INSTANCES.update(saved_instances)
        _AUTO.clear()
        _AUTO.update(saved_auto)


@contextlib.contextmanager
def fresh() -> Iterator[None]:
    """Inside the block no backend is instantiated yet and ``auto`` has chosen nothing.

    The seam for tests of first use (which backend ``auto`` picks, what an unimportable one
    says); the instances of before come back on leaving.
    """
    saved_instances, saved_auto = dict(_INSTANCES), dict(_AUTO)
    _INSTANCES.clear()
    _AUTO.clear()
    try:
        yield
    finally:
        _INSTANCES.clear()
        _INSTANCES.update(saved_instances)
        _AUTO.clear()
        _AUTO.update(saved_auto)


def resolve_backend(name: str | None, device: torch.device) -> Backend:
    """Returns the backend to run on ``device``.

    Args:
        name: a backend name, an alias, ``"auto"``, or ``None`` to read ``BATCHNORM_BACKEND``.
        device: the device of the input; ``auto`` chooses by its type.

    Returns:
        A backend instance (one shared instance per name).

    Raises:
        ValueError: if the name (argument or environment variable) is not a known backend.
        ImportError: if the named backend needs a package that is not installed.
    """
    if name is None:
        name = _compat.environ_get(BACKEND_ENV_VAR, _ENCODED_ENV_VAR) or "auto"
        source = BACKEND_ENV_VAR
    else:
        source = "backend"
    if name == "auto":
        chosen = _AUTO.get(device)  # keyed by the device itself: reading .type costs more
        if chosen is None:
            chosen = _AUTO[device] = resolve_backend(_auto(device.type), device)
        return chosen
    name = _ALIASES.get(name, name)
    if name not in _REGISTRY:
        choices = ", ".join(("auto", *_REGISTRY, *_ALIASES))
        raise ValueError(f"{source}: expected one of {choices}, got {name!r}")
    try:
        return _instance(name)
    except ImportError as error:
        raise ImportError(
            f"{source}: the {name!r} backend cannot be used here ({error}); "
            f"install what it needs or choose another of: {', '.join(available_backends())}"
        ) from error
