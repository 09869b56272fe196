"""Backends behind one contract (:class:`Backend`) and the rule that picks one for a tensor.

Selection, first match wins:

1. the ``backend=`` argument of :func:`batchnorm.functional.batch_norm` or of a module;
2. the environment variable ``BATCHNORM_BACKEND`` (``torch``, ``numpy`` or ``auto``);
3. ``auto``: the pure-torch backend.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from batchnorm.backends.base import Backend, ForwardResult, compute_dtype
from batchnorm.backends.numpy_backend import NumpyBackend
from batchnorm.backends.torch_backend import TorchBackend

__all__ = [
    "BACKEND_ENV_VAR",
    "Backend",
    "ForwardResult",
    "available_backends",
    "compute_dtype",
    "resolve_backend",
]

BACKEND_ENV_VAR = "BATCHNORM_BACKEND"

_FACTORIES: dict[str, Callable[[], Backend]] = {
    "torch": TorchBackend,
    "numpy": NumpyBackend,
}
_INSTANCES: dict[str, Backend] = {}


def available_backends() -> tuple[str, ...]:
    """Names accepted by ``backend=`` and ``BATCHNORM_BACKEND`` (besides ``auto``)."""
    return tuple(_FACTORIES)


def resolve_backend(name: str | None, device: torch.device) -> Backend:
    """Returns the backend to run on ``device``.

    Args:
        name: a backend name, ``"auto"``, or ``None`` to read ``BATCHNORM_BACKEND``.
        device: the device of the input; ``auto`` chooses by it.

    Returns:
        A backend instance (one shared instance per name).

    Raises:
        ValueError: if the name (argument or environment variable) is not a known backend.
    """
    source = "backend"
    if name is None:
        name = os.environ.get(BACKEND_ENV_VAR, "auto") or "auto"
        source = BACKEND_ENV_VAR
    if name == "auto":
        name = "torch"
    if name not in _FACTORIES:
        choices = ", ".join(("auto", *_FACTORIES))
        raise ValueError(f"{source}: expected one of {choices}, got {name!r}")
    if name not in _INSTANCES:
        _INSTANCES[name] = _FACTORIES[name]()
    return _INSTANCES[name]
