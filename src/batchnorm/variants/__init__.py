"""The batch-norm family: renormalization, ghost, recurrent (BN-LSTM), frozen and masked BN.

Each layer subclasses :class:`batchnorm.modules.BatchNormBase` (same parameters, buffers and
``state_dict`` layout as ``torch.nn.BatchNorm*``, plus its own extra buffers) and overrides the
``_normalize`` hook.
"""
