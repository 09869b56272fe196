"""CPU kernels: C with AVX-512 or AVX2 and streaming stores, and Numba's.

:mod:`.cpu_stream` is the plain-Python launcher of the C extension ``_cpu_stream`` (float32 and
bfloat16, built by ``pip install`` where a compiler is found; ``cpu_stream.SUPPORTED`` says
whether it runs here). :mod:`.cpu_numba` needs the optional ``numba`` package (float64 and the
fallback for float32 where the C kernels do not run).
"""
