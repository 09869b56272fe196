"""Tools that work on whole models: fold, convert, recalibrate (PreciseBN), freeze, unfreeze,
name_layers."""

from batchnorm.tools.convert import convert
from batchnorm.tools.fold import fold
from batchnorm.tools.freeze import freeze, unfreeze
from batchnorm.tools.names import name_layers
from batchnorm.tools.recalibrate import recalibrate

__all__ = ["convert", "fold", "freeze", "name_layers", "recalibrate", "unfreeze"]
