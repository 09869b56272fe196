"""The ``cpu`` backend's old module name (it ran only Numba's kernels once).

Kept so that ``from batchnorm.backends.numba_backend import NumbaBackend`` still works; the
backend lives in :mod:`batchnorm.backends.cpu_backend`.
"""

from batchnorm.backends.cpu_backend import CpuBackend

NumbaBackend = CpuBackend

__all__ = ["NumbaBackend"]
