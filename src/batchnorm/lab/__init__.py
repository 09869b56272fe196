"""The lab: experiments that reproduce the claims about batch normalization, with plots and a
report. Run it with ``batchnorm lab`` (see :mod:`batchnorm.cli`) or :func:`run_lab`.
"""

from batchnorm.lab.experiments import BUDGETS, EXPERIMENTS, ExperimentResult
from batchnorm.lab.session import LabOutput, run_lab

__all__ = ["BUDGETS", "EXPERIMENTS", "ExperimentResult", "LabOutput", "run_lab"]
