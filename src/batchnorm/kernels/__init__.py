"""Kernels and their launch code, one subpackage per kind of device code.

* :mod:`.triton` — ``@triton.jit`` kernels (training forward and backward, evaluation) and their
  launch heuristics; importing it imports Triton;
* :mod:`.cpu` — the CPU kernels: C with AVX-512 or AVX2 and streaming stores
  (:mod:`.cpu.cpu_stream`, built with the package where a compiler is found) and Numba's
  (:mod:`.cpu.cpu_numba`, with the ``cpu`` extra).

Nothing here checks arguments or knows about running statistics' policy: the backends
(:mod:`batchnorm.backends`) call these with checked tensors.
"""
