"""One training run of the lab, described by a :class:`RunSpec`, and the :class:`Runner` that
executes, caches and (with ``jobs > 1``) parallelizes runs over worker processes.

A run is a pure function of its spec and the dataset: the weights come from
``torch.manual_seed(spec.seed)``, the batches from a ``torch.Generator`` seeded from it, and every
process trains with one intra-op thread, so the same spec gives the same numbers in the main
process and in any worker.

Why this file is long: the lab's one training loop with its recorders (losses, activations,
gradients, landscapes) so that every experiment measures the same way.
"""

from __future__ import annotations

import copy
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from batchnorm.lab.data import Dataset, load_dataset
from batchnorm.lab.models import SequenceClassifier, SmallCNN, mlp

__all__ = [
    "RunResult",
    "RunSpec",
    "Runner",
    "batch_stats_accuracy",
    "gradient_norms",
    "landscape_probe",
    "single_thread",
    "train",
]

#: Percentiles of the tracked sigmoid input (Ioffe & Szegedy 2015, Fig. 1b, c).
PERCENTILES = (15.0, 50.0, 85.0)

#: At most this many training examples are used to measure training accuracy and loss.
TRAIN_EVAL_LIMIT = 5000

RunResult = dict[str, Any]


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines one training run.

    Attributes:
        model: ``"mlp"``, ``"cnn"``, ``"lstm"`` or ``"bnlstm"``.
        norm: normalization of the MLP (``None``, ``"bn"``, ``"ln"``, ``"renorm"``,
            ``"ghost"``); for the CNN ``"bn"`` or ``None``; ignored by the sequence models.
        lr: learning rate.
        steps: number of optimizer steps.
        batch_size: examples per batch.
        seed: seed of the initial weights and of the batch order.
        eval_every: evaluate every this many steps (and at step 0 and at the end).
        optimizer: ``"sgd"`` or ``"adam"``.
        momentum: SGD momentum.
        non_iid: draw every batch from a single class (chosen at random each step).
        test_batch_stats: also measure test accuracy with the statistics of test batches of
            ``batch_size`` (see :func:`batch_stats_accuracy`).
        probe_every: run the loss-landscape probe every this many steps (0: never).
        probe_step_sizes: step sizes η of the probe, along the negative gradient.
        depth: hidden layers of the MLP.
        activation: activation of the MLP (``"sigmoid"``, ``"tanh"``, ``"relu"``).
        init_std: std of the MLP's initial weights; ``None`` for fan-in scaled (see
            :func:`batchnorm.lab.models.mlp`).
        gradient_norms: at every evaluation, also record the gradient norm of each linear
            layer's weight (see :func:`gradient_norms`).
    """

    model: str
    norm: str | None
    lr: float
    steps: int
    batch_size: int
    seed: int
    eval_every: int
    optimizer: str = "sgd"
    momentum: float = 0.0
    non_iid: bool = False
    test_batch_stats: bool = False
    probe_every: int = 0
    probe_step_sizes: tuple[float, ...] = ()
    depth: int = 3
    activation: str = "sigmoid"
    init_std: float | None = 0.1
    gradient_norms: bool = False


def build_model(spec: RunSpec, dataset: Dataset) -> nn.Module:
    """The freshly initialized network of ``spec`` (seeds the global RNG with ``spec.seed``)."""
    torch.manual_seed(spec.seed)
    if spec.model == "mlp":
        return mlp(
            dataset.in_features,
            dataset.num_classes,
            spec.norm,
            depth=spec.depth,
            init_std=spec.init_std,
            total_steps=spec.steps,
            activation=spec.activation,
        )
    if spec.model == "cnn":
        if dataset.image_shape is None:
            raise ValueError(f"model 'cnn' needs image data; {dataset.name!r} has none")
        return SmallCNN(dataset.image_shape, dataset.num_classes, batch_norm=spec.norm == "bn")
    if spec.model in ("lstm", "bnlstm"):
        return SequenceClassifier(
            dataset.sequence_shape, dataset.num_classes, hidden=64, cell=spec.model
        )
    raise ValueError(f"model: expected 'mlp', 'cnn', 'lstm' or 'bnlstm', got {spec.model!r}")


class _BatchSampler:
    """Draws index batches: uniformly with replacement, or all from one random class."""

    def __init__(self, labels: torch.Tensor, num_classes: int, spec: RunSpec) -> None:
        self.size = spec.batch_size
        self.non_iid = spec.non_iid
        self.count = len(labels)
        self.generator = torch.Generator().manual_seed(10_007 * spec.seed + 1)
        self.by_class = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
        self.by_class = [members for members in self.by_class if len(members) > 0]

    def __call__(self) -> torch.Tensor:
        """The next batch of indices, ``(batch_size,)``."""
        if not self.non_iid:
            return torch.randint(self.count, (self.size,), generator=self.generator)
        which = int(torch.randint(len(self.by_class), (1,), generator=self.generator))
        members = self.by_class[which]  # (n_c,)
        return members[torch.randint(len(members), (self.size,), generator=self.generator)]


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` in its current mode, without gradients."""
    with torch.no_grad():
        logits = model(x)  # (N, classes)
        loss = nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(1) == y).float().mean().item()
    return accuracy, loss


def batch_stats_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, one_class: bool
) -> float:
    """Test accuracy when every normalization layer uses the statistics of its test batch.

    The test set is cut into batches of ``batch_size`` (each from one class if ``one_class``,
    else in the given order); remainders smaller than a batch are left out. Runs on a copy of
    the model in training mode, so the original's running statistics are untouched.

    Args:
        model: the trained network.
        x: ``(N, D)`` test inputs.
        y: ``(N,)`` test labels.
        batch_size: examples per test batch (≥ 2).
        one_class: group the batches by class.

    Returns:
        The fraction of correctly classified examples among those in full batches.
    """
    copy_in_train_mode = copy.deepcopy(model).train()
    groups = (
        [torch.nonzero(y == c).flatten() for c in torch.unique(y)]
        if one_class
        else [torch.arange(len(y))]
    )
    correct = total = 0
    with torch.no_grad():
        for members in groups:  # members: (n_g,)
            usable = len(members) - len(members) % batch_size
            for start in range(0, usable, batch_size):
                index = members[start : start + batch_size]  # (batch_size,)
                prediction = copy_in_train_mode(x[index]).argmax(1)  # (batch_size,)
                correct += int((prediction == y[index]).sum())
                total += batch_size
    return correct / max(total, 1)


def gradient_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """The norm ``‖∂L/∂W_l‖`` of the loss gradient for each linear layer's weight, input first.

    ``L`` is the mean cross-entropy on the batch ``(x, y)``. Runs on a copy in training mode
    (batch statistics, as the optimizer sees them), so the model, its gradients and its running
    statistics are left as they were. A vanishing gradient shows as norms that shrink from the
    output layer towards the input, an exploding one as norms that grow.

    Args:
        model: the network.
        x: the batch's inputs.
        y: the batch's labels.

    Returns:
        One Frobenius norm per ``nn.Linear`` in the order of ``model.modules()``.
    """
    copy_in_train_mode = copy.deepcopy(model).train()
    copy_in_train_mode.zero_grad()
    loss = nn.functional.cross_entropy(copy_in_train_mode(x), y)
    torch.autograd.backward(loss)
    return [
        float(layer.weight.grad.norm()) if layer.weight.grad is not None else 0.0
        for layer in copy_in_train_mode.modules()
        if isinstance(layer, nn.Linear)
    ]


def _flat_gradient(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[float, torch.Tensor]:
    """Loss and the gradient of all parameters as one flat vector ``(P,)``."""
    model.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    torch.autograd.backward(loss)
    gradient = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return loss.item(), gradient


def landscape_probe(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, step_sizes: Sequence[float]
) -> dict[str, float]:
    """The loss-landscape probe of Santurkar et al. (2018), Sec. 3.1, Fig. 4, at one point.

    From the current weights w and the gradient g = ∇L(w) on the batch ``(x, y)``, moves to
    ``w − η·g`` for each step size η and measures:

    * the loss range ``max_η L(w − ηg) − min_η L(w − ηg)`` (η = 0 included): how much the
      loss varies along the direction the optimizer takes (Fig. 4a);
    * the gradient change ``max_η ‖∇L(w − ηg) − g‖`` (Fig. 4b, "gradient predictiveness");
    * the effective β-smoothness ``max_η ‖∇L(w − ηg) − g‖ / ‖η·g‖`` (Fig. 4c).

    Runs on a copy in training mode (batch statistics, as the optimizer sees them); the model
    and its running statistics are left as they were.

    Args:
        model: the network at the current step.
        x: the batch's inputs.
        y: the batch's labels.
        step_sizes: the positive step sizes η.

    Returns:
        ``{"loss": L(w), "loss_min", "loss_max", "loss_range", "grad_change", "beta"}``.

    References:
        S. Santurkar, D. Tsipras, A. Ilyas, A. Madry, "How Does Batch Normalization Help
        Optimization?", NeurIPS 2018.
    """
    probe = copy.deepcopy(model).train()
    parameters = [p for p in probe.parameters() if p.requires_grad]
    origin = [p.detach().clone() for p in parameters]
    loss, gradient = _flat_gradient(probe, x, y)  # gradient: (P,)
    gradient_norm = gradient.norm().item()
    losses, changes, smoothness = [loss], [0.0], [0.0]
    for eta in step_sizes:
        with torch.no_grad():
            offset = 0
            for parameter, start in zip(parameters, origin, strict=True):
                count = parameter.numel()
                step = gradient[offset : offset + count].view_as(parameter)
                parameter.copy_(start - eta * step)
                offset += count
        moved_loss, moved_gradient = _flat_gradient(probe, x, y)
        change = (moved_gradient - gradient).norm().item()
        losses.append(moved_loss)
        changes.append(change)
        smoothness.append(change / max(eta * gradient_norm, 1e-12))
    return {
        "loss": loss,
        "loss_min": min(losses),
        "loss_max": max(losses),
        "loss_range": max(losses) - min(losses),
        "grad_change": max(changes),
        "beta": max(smoothness),
    }


def _optimizer(spec: RunSpec, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (with ``spec.momentum``) or Adam at ``spec.lr``."""
    if spec.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum)
    if spec.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=spec.lr)
    raise ValueError(f"optimizer: expected 'sgd' or 'adam', got {spec.optimizer!r}")


def train(
    spec: RunSpec, dataset: Dataset, on_progress: Callable[[int], None] | None = None
) -> RunResult:
    """Trains the network of ``spec`` on ``dataset`` and records its curves.

    Evaluations (at step 0, every ``eval_every`` steps and at the end) use the population
    statistics (evaluation mode) and measure test accuracy/loss, training accuracy/loss (on at
    most :data:`TRAIN_EVAL_LIMIT` examples) and, for the MLP, the 15th/50th/85th percentiles
    over the test set of the input to unit 0 of the last hidden sigmoid. A non-finite training
    loss stops the run and marks it diverged.

    Args:
        spec: the run.
        dataset: the data.
        on_progress: called with the number of steps done since its last call.

    Returns:
        A JSON-able dict: ``steps``, ``test_acc``, ``test_loss``, ``train_acc``, ``train_loss``
        (lists, one per evaluation), ``percentiles`` (list of ``[p15, p50, p85]``, MLP only),
        ``diverged``, ``steps_done``, ``final_test_acc``, ``final_train_acc``, ``probes`` (list
        of :func:`landscape_probe` dicts with their ``step``), ``gradient_norms`` (with
        ``spec.gradient_norms``: per evaluation, :func:`gradient_norms` on the first
        ``batch_size`` training examples), and with ``test_batch_stats``
        ``batch_stats_acc_one_class`` and ``batch_stats_acc_mixed``.
    """
    model = build_model(spec, dataset)
    optimizer = _optimizer(spec, model)
    sample = _BatchSampler(dataset.y_train, dataset.num_classes, spec)
    x_train_eval = dataset.x_train[:TRAIN_EVAL_LIMIT]  # (≤5000, D)
    y_train_eval = dataset.y_train[:TRAIN_EVAL_LIMIT]
    captured: list[torch.Tensor] = []
    hook = None
    if spec.model == "mlp":
        last_sigmoid = model[-2]  # type: ignore[index]
        hook = last_sigmoid.register_forward_pre_hook(
            lambda _module, inputs: captured.append(inputs[0][:, 0].detach())  # (N,)
        )
    result: RunResult = {key: [] for key in ("steps", "test_acc", "test_loss", "train_acc")}
    result.update(train_loss=[], percentiles=[], probes=[], gradient_norms=[], diverged=False)
    x_probe = dataset.x_train[: spec.batch_size]  # (B, D): a fixed batch for the gradient norms
    y_probe = dataset.y_train[: spec.batch_size]

    def record(step: int) -> None:
        model.eval()
        captured.clear()
        test_acc, test_loss = _evaluate(model, dataset.x_test, dataset.y_test)
        if captured:
            levels = torch.tensor(PERCENTILES, dtype=torch.float64) / 100.0
            values = torch.quantile(captured[0].double(), levels)  # (3,)
            result["percentiles"].append([float(v) for v in values])
        train_acc, train_loss = _evaluate(model, x_train_eval, y_train_eval)
        if spec.gradient_norms:
            result["gradient_norms"].append(gradient_norms(model, x_probe, y_probe))
        for key, value in (
            ("steps", step),
            ("test_acc", test_acc),
            ("test_loss", test_loss),
            ("train_acc", train_acc),
            ("train_loss", train_loss),
        ):
            result[key].append(value)

    record(0)
    step = 0
    reported = 0
    for step in range(1, spec.steps + 1):
        model.train()
        index = sample()  # (B,)
        x, y = dataset.x_train[index], dataset.y_train[index]
        if spec.probe_every and (step - 1) % spec.probe_every == 0:
            probe = landscape_probe(model, x, y, spec.probe_step_sizes)
            result["probes"].append({"step": step - 1, **probe})
        loss = nn.functional.cross_entropy(model(x), y)
        if not torch.isfinite(loss):
            result["diverged"] = True
            break
        optimizer.zero_grad()
        torch.autograd.backward(loss)
        optimizer.step()
        if step % spec.eval_every == 0 or step == spec.steps:
            record(step)
            if on_progress is not None:
                on_progress(step - reported)
            reported = step
    if hook is not None:
        hook.remove()
    if result["diverged"]:
        record(step)
    if on_progress is not None and spec.steps > reported:
        on_progress(spec.steps - reported)
    result["steps_done"] = step
    result["final_test_acc"] = result["test_acc"][-1]
    result["final_train_acc"] = result["train_acc"][-1]
    if spec.test_batch_stats:
        for key, one_class in (
            ("batch_stats_acc_one_class", True),
            ("batch_stats_acc_mixed", False),
        ):
            result[key] = batch_stats_accuracy(
                model, dataset.x_test, dataset.y_test, spec.batch_size, one_class
            )
    return result


@contextmanager
def single_thread() -> Iterator[None]:
    """Runs the block with one intra-op thread (deterministic, and fastest for tiny models)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# Worker-process state: the dataset, loaded once per worker by _init_worker.
_worker_dataset: Dataset | None = None


def _init_worker(name: str, data_dir: str | None) -> None:
    """Pool initializer: one thread, and the dataset loaded once."""
    global _worker_dataset
    torch.set_num_threads(1)
    _worker_dataset = load_dataset(name, data_dir)


def _train_in_worker(spec: RunSpec) -> RunResult:
    """Pool task: :func:`train` on the worker's dataset."""
    assert _worker_dataset is not None, "worker used before _init_worker"
    return train(spec, _worker_dataset)


#: Rough CPU milliseconds per step of each model, measured on 2 cores (MLPs: per 3 hidden layers;
#: with BN ×3, with layer norm ×2).
_STEP_COST = {"mlp": 1.0, "cnn": 8.0, "lstm": 10.0, "bnlstm": 120.0}


def _estimated_cost(spec: RunSpec) -> float:
    """Rough cost of a run, to start the longest ones first (results do not depend on order)."""
    if spec.model != "mlp":
        return spec.steps * _STEP_COST.get(spec.model, 1.0)
    per_layer = 1.0 if spec.norm is None else 2.0 if spec.norm == "ln" else 3.0
    return spec.steps * per_layer * spec.depth / 3.0


class Runner:
    """Executes training runs, each spec once per lab session, in-process or in worker processes.

    With ``jobs > 1`` the runs go to a pool of worker processes: :meth:`prefetch` hands the pool
    every run a session will need at its start (costliest first, so that the longest run does
    not end alone), and :meth:`run` then only waits for the ones asked for. Results do not
    depend on the order or the process (see :func:`train`).

    Args:
        data: dataset name (see :data:`batchnorm.lab.data.DATASETS`).
        data_dir: folder of the MNIST IDX files, if ``data == "mnist"``.
        jobs: worker processes; 1 trains in this process.
        progress: show a progress bar per :meth:`run` call.

    Raises:
        ValueError: if ``jobs`` is not a positive int.
    """

    def __init__(
        self, data: str, data_dir: str | Path | None = None, jobs: int = 1, progress: bool = True
    ) -> None:
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise ValueError(f"jobs: expected a positive int, got {jobs!r}")
        self.data = data
        self.data_dir = None if data_dir is None else str(data_dir)
        self.jobs = jobs
        self.progress = progress
        self.dataset = load_dataset(data, self.data_dir)
        self._cache: dict[RunSpec, RunResult] = {}
        self._pending: dict[RunSpec, Future[RunResult]] = {}
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.jobs,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.data, self.data_dir),
            )
        return self._pool

    def prefetch(self, specs: Sequence[RunSpec]) -> None:
        """Starts the runs of ``specs`` not yet done or started in the workers, costliest first.

        Returns at once; :meth:`run` collects the results. Does nothing with ``jobs == 1``.

        Args:
            specs: the runs, e.g. every run of a lab session.
        """
        if self.jobs == 1:
            return
        todo = [
            spec
            for spec in dict.fromkeys(specs)
            if spec not in self._cache and spec not in self._pending
        ]
        for spec in sorted(todo, key=_estimated_cost, reverse=True):
            self._pending[spec] = self._executor().submit(_train_in_worker, spec)

    def run(self, specs: Sequence[RunSpec], description: str) -> list[RunResult]:
        """Results of ``specs`` in order; runs those not seen before (in parallel if jobs > 1).

        Args:
            specs: the runs.
            description: label of the progress bar.

        Returns:
            One :func:`train` result per spec.
        """
        todo = list(dict.fromkeys(spec for spec in specs if spec not in self._cache))
        with tqdm(
            total=sum(spec.steps for spec in todo),
            desc=description,
            unit="step",
            disable=not self.progress or not todo,
            leave=False,
        ) as bar:
            if self.jobs == 1:
                with single_thread():
                    for spec in todo:
                        self._cache[spec] = train(spec, self.dataset, bar.update)
            else:
                self.prefetch(todo)
                futures = {self._pending[spec]: spec for spec in todo}
                for future in as_completed(futures):
                    spec = futures[future]
                    self._cache[spec] = future.result()
                    del self._pending[spec]
                    bar.update(spec.steps)
        return [self._cache[spec] for spec in specs]

    def close(self) -> None:
        """Stops the worker processes, if any (runs not yet started are cancelled)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
            self._pending.clear()
