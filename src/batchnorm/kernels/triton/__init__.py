"""Triton kernels for batch normalization (``@triton.jit`` code and launch heuristics only).

Families, one file each:

* :mod:`.common` — device functions shared by every family (tile addressing, activations and
  their derivatives, Welford/Chan merges, the grid barrier) and the launch heuristics;
* :mod:`.batchnorm_fwd` — training forward: split Welford reduction, Chan merge with the
  running-statistics update, normalize with fused activation and residual add;
* :mod:`.batchnorm_bwd` — training backward: split ``Σdu``/``Σdu·x̂`` reduction, merge, ``dx``
  (and ``d residual``) pass;
* :mod:`.inference` — evaluation forward from the running statistics.

Importing this package imports Triton; the backend that launches the kernels lives in
:mod:`batchnorm.backends.triton_backend`.
"""
