"""batchnorm: Batch Normalization, correct to the last detail, with a NumPy reference.

Public API:

* modules :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d` (drop-in for
  ``torch.nn.BatchNorm*``) and the fused :class:`BatchNormAct2d` family (``act(bn(x) + z)``);
* the family: Batch Renorm, Ghost BN, recurrent BN / BN-LSTM, frozen BN, in-place activated BN
  (:mod:`.variants`);
* :class:`SyncBatchNorm` over ``torch.distributed`` (gloo, NCCL);
* :mod:`batchnorm.functional` (``batch_norm`` like ``F.batch_norm``, ``batch_norm_pure``);
* :mod:`batchnorm.tools` (fold, convert, recalibrate, freeze);
* :mod:`batchnorm.reference`, the float64 NumPy reference.
"""

from batchnorm import functional, reference, tools, variants
from batchnorm.backends import available_backends
from batchnorm.distributed import SyncBatchNorm, SyncBatchNormAct
from batchnorm.modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    BatchNormActBase,
    BatchNormBase,
    NonFiniteBatchWarning,
)
from batchnorm.variants import (
    BNLSTM,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    BNLSTMCell,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    InPlaceBatchNormAct1d,
    InPlaceBatchNormAct2d,
    InPlaceBatchNormAct3d,
    RecurrentBatchNorm1d,
)

__all__ = [
    "BNLSTM",
    "BNLSTMCell",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchNormActBase",
    "BatchNormBase",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "InPlaceBatchNormAct1d",
    "InPlaceBatchNormAct2d",
    "InPlaceBatchNormAct3d",
    "NonFiniteBatchWarning",
    "RecurrentBatchNorm1d",
    "SyncBatchNorm",
    "SyncBatchNormAct",
    "available_backends",
    "functional",
    "reference",
    "tools",
    "variants",
]

__version__ = "0.1.0"
