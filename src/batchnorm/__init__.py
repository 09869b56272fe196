"""batchnorm: Batch Normalization, correct to the last detail, with a NumPy reference.

Public API:

* modules :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d` (drop-in for
  ``torch.nn.BatchNorm*``);
* :mod:`batchnorm.functional` (``batch_norm`` like ``F.batch_norm``, ``batch_norm_pure``);
* :mod:`batchnorm.reference`, the float64 NumPy reference.
"""

from batchnorm import functional, reference
from batchnorm.backends import available_backends
from batchnorm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormBase",
    "available_backends",
    "functional",
    "reference",
]

__version__ = "0.1.0"
