"""The batch-norm family: renormalization, ghost, recurrent (BN-LSTM), frozen, in-place activated
and masked BN.

Each layer subclasses :class:`batchnorm.modules.BatchNormBase` (same parameters, buffers and
``state_dict`` layout as ``torch.nn.BatchNorm*``, plus its own extra buffers) and overrides the
``_normalize`` hook; masked batch norm is the ``mask=`` argument of
:func:`batchnorm.functional.batch_norm` and :class:`batchnorm.BatchNorm1d`
(:mod:`batchnorm.variants.masked`).
"""

from batchnorm.variants.frozen import (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    FrozenBatchNormBase,
)
from batchnorm.variants.ghost import (
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    GhostBatchNormBase,
)
from batchnorm.variants.inplace import (
    InPlaceBatchNormAct1d,
    InPlaceBatchNormAct2d,
    InPlaceBatchNormAct3d,
    InPlaceBatchNormActBase,
    inplace_batch_norm_act_train,
)
from batchnorm.variants.masked import masked_batch_norm_pure
from batchnorm.variants.recurrent import BNLSTM, BNLSTMCell, RecurrentBatchNorm1d
from batchnorm.variants.renorm import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    BatchRenormBase,
    renorm_limits,
)

__all__ = [
    "BNLSTM",
    "BNLSTMCell",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "BatchRenormBase",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FrozenBatchNormBase",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "GhostBatchNormBase",
    "InPlaceBatchNormAct1d",
    "InPlaceBatchNormAct2d",
    "InPlaceBatchNormAct3d",
    "InPlaceBatchNormActBase",
    "RecurrentBatchNorm1d",
    "inplace_batch_norm_act_train",
    "masked_batch_norm_pure",
    "renorm_limits",
]
