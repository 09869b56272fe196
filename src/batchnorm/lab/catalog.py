"""The lab's experiments by command-line name, in report order, with the runs each will need.

:data:`EXPERIMENTS` maps a name to its function (a :class:`~batchnorm.lab.experiments.LabContext`
in, an :class:`~batchnorm.lab.experiments.ExperimentResult` out); :data:`PLANS` maps the same name
to the list of training runs that function asks the runner for, so that a session can start them
all at once (:meth:`batchnorm.lab.training.Runner.prefetch`).
"""

from __future__ import annotations

from collections.abc import Callable

from batchnorm.lab.experiments import (
    ExperimentResult,
    LabContext,
    cnn_rnn,
    cnn_rnn_runs,
    convergence,
    distributions,
    landscape,
    landscape_runs,
    learning_rate_runs,
    learning_rates,
    mlp_pair_runs,
    regularization,
    small_batch_runs,
    small_batches,
)
from batchnorm.lab.experiments_gradients import (
    gradient_flow,
    gradient_flow_runs,
    which_axes,
    which_axes_runs,
)
from batchnorm.lab.explain import worked_example_experiment
from batchnorm.lab.training import RunSpec

__all__ = ["EXPERIMENTS", "PLANS"]


def _no_runs(context: LabContext) -> list[RunSpec]:
    """An experiment that trains nothing."""
    del context
    return []


#: Command-line name → experiment function, in report order.
EXPERIMENTS: dict[str, Callable[[LabContext], ExperimentResult]] = {
    "convergence": convergence,
    "distributions": distributions,
    "learning-rates": learning_rates,
    "regularization": regularization,
    "cnn-rnn": cnn_rnn,
    "small-batches": small_batches,
    "landscape": landscape,
    "gradient-flow": gradient_flow,
    "which-axes": which_axes,
    "worked-example": worked_example_experiment,
}

#: Command-line name → the training runs its experiment asks for (the same keys).
PLANS: dict[str, Callable[[LabContext], list[RunSpec]]] = {
    "convergence": mlp_pair_runs,
    "distributions": mlp_pair_runs,
    "learning-rates": learning_rate_runs,
    "regularization": mlp_pair_runs,
    "cnn-rnn": cnn_rnn_runs,
    "small-batches": small_batch_runs,
    "landscape": landscape_runs,
    "gradient-flow": gradient_flow_runs,
    "which-axes": which_axes_runs,
    "worked-example": _no_runs,
}
