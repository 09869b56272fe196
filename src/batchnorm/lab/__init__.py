"""The lab: experiments that reproduce the claims about batch normalization, with plots and a
report. Run it with ``batchnorm lab`` (see :mod:`batchnorm.cli`) or :func:`run_lab`; print the
worked example with ``batchnorm explain`` (:mod:`batchnorm.lab.explain`).

The names below are imported on first use, so that ``import batchnorm.lab.explain`` (or
``batchnorm.lab.data``) works without matplotlib, which only the plots need (the ``lab`` extra).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["BUDGETS", "EXPERIMENTS", "ExperimentResult", "LabOutput", "run_lab"]

#: Public name → the module that defines it.
_HOMES = {
    "BUDGETS": "batchnorm.lab.experiments",
    "ExperimentResult": "batchnorm.lab.experiments",
    "EXPERIMENTS": "batchnorm.lab.catalog",
    "LabOutput": "batchnorm.lab.session",
    "run_lab": "batchnorm.lab.session",
}


def __getattr__(name: str) -> Any:
    """Imports ``BUDGETS``, ``EXPERIMENTS``, ``ExperimentResult``, ``LabOutput``, ``run_lab``
    from their modules when first asked for."""
    if name not in _HOMES:
        raise AttributeError(f"module 'batchnorm.lab' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
