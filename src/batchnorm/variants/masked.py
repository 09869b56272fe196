"""Masked batch normalization lives in :mod:`batchnorm.masked` (the functional's ``mask=``).

Kept so that ``from batchnorm.variants.masked import masked_batch_norm_pure`` still works.
"""

from batchnorm.masked import check_mask, masked_batch_norm_pure

__all__ = ["check_mask", "masked_batch_norm_pure"]
