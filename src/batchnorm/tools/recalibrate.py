"""PreciseBN: recompute the population statistics of every batch norm exactly.

The running averages of training are an exponential moving average over batches seen with
changing weights; Wu and Johnson (2021) show that recomputing them with the weights fixed, over
many samples, improves and stabilises evaluation. For each batch-norm layer the inputs it
receives while the model runs in training mode are reduced, per channel, to
``(n, mean, M2)`` (``M2 = Σ (x − mean)²``, float64) and merged across batches with Chan's
parallel formula, which weights each batch by its size::

    n = n_a + n_b,   δ = mean_b − mean_a,   mean = mean_a + δ·n_b/n,
    M2 = M2_a + M2_b + δ²·n_a·n_b/n

The result is the exact mean and variance of all values seen, not an average of batch
statistics: ``running_mean = mean``, ``running_var = M2 / (n − 1)`` (unbiased, as training
stores it). With ``process_group=``, the per-rank results are merged with two
``all_reduce`` sums (``n``, ``n·mean``; then ``M2 + n·(mean − global_mean)²``), so every rank
ends with the statistics of all ranks' samples.

Reference:
    Y. Wu and J. Johnson, "Rethinking 'Batch' in BatchNorm", arXiv:2105.07576 (2021), §3.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Sized
from typing import Any

import torch
from torch import nn

from batchnorm.tools.common import has_channel_statistics
from batchnorm.variants.frozen import FrozenBatchNormBase

__all__ = ["recalibrate"]


class _PopulationStatistics:
    """Per-channel ``(n, mean, M2)`` of every value seen so far, merged with Chan's formula."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None  # (C,) float64
        self.m2: torch.Tensor | None = None  # (C,) float64

    def add(self, input: torch.Tensor) -> None:
        """Merges the values of one batch ``(N, C, *)``."""
        x = input.detach().transpose(0, 1).reshape(input.shape[1], -1).to(torch.float64)  # (C, M)
        count = x.shape[1]
        if count == 0:
            return
        mean = x.mean(dim=1)  # (C,)
        m2 = (x - mean[:, None]).square().sum(dim=1)  # (C,)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean  # (C,)
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * count / total)
        self.count = total

    def all_reduce(self, channels: int, device: torch.device, group: Any) -> None:
        """Replaces the local statistics by those of every rank of ``group``."""
        import torch.distributed as dist

        mean = torch.zeros(channels, dtype=torch.float64, device=device)
        m2 = torch.zeros(channels, dtype=torch.float64, device=device)
        if self.mean is not None and self.m2 is not None:
            mean, m2 = self.mean.to(device), self.m2.to(device)
        packed = torch.cat(
            [
                torch.tensor([float(self.count)], dtype=torch.float64, device=device),
                mean * self.count,
            ]
        )  # (1 + C,)
        dist.all_reduce(packed, group=group)  # Σ n, Σ n·mean
        total = int(packed[0].item())
        if total == 0:
            return
        global_mean = packed[1:] / total  # (C,)
        spread = m2 + self.count * (mean - global_mean).square()  # (C,)
        dist.all_reduce(spread, group=group)  # Σ (M2 + n·(mean − global_mean)²)
        self.count, self.mean, self.m2 = total, global_mean, spread


def _default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(batch)`` for a tensor, ``model(batch[0])`` for an ``(inputs, targets, …)`` tuple."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return model(batch[0])
    raise TypeError(
        f"batches: cannot feed a {type(batch).__name__} to the model; pass forward=, "
        "e.g. forward=lambda model, batch: model(**batch)"
    )


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int = 200,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    process_group: Any = None,
    progress: bool = True,
) -> nn.Module:
    """Recomputes ``running_mean``/``running_var`` of every batch norm exactly (PreciseBN).

    The model runs in training mode (as during training, each layer normalizes with its batch
    statistics) without gradients on up to ``num_batches`` batches; each batch-norm layer's
    inputs are accumulated exactly (see the module docstring). Then every buffer the passes
    changed is restored, the new statistics are written (``num_batches_tracked`` unchanged),
    and every module's train/eval flag is restored, also if an error interrupts.

    Layers left as they are: frozen ones (:class:`FrozenBatchNormBase` or
    ``freeze_stats=True``), recurrent ones (statistics per time step), ones without running
    statistics, and ones that saw fewer than 2 values (with a warning).

    Args:
        model: the model; its parameters are not changed.
        batches: an iterable of batches (e.g. a ``DataLoader``).
        num_batches: use at most this many batches (≥ 1). Default: 200.
        forward: ``forward(model, batch)`` runs one batch; default ``model(batch)`` for a
            tensor, ``model(batch[0])`` for a tuple or list.
        process_group: a ``torch.distributed`` process group (or ``torch.distributed.group.WORLD``)
            to merge the statistics of all its ranks; every rank must call this. ``None``:
            this process only.
        progress: show a ``tqdm`` progress bar (on rank 0 only). Default: True.

    Returns:
        ``model``, with its population statistics recomputed in place.

    Raises:
        TypeError: if ``model`` is not a module or a batch cannot be fed.
        ValueError: if ``num_batches < 1``, or ``batches`` is empty without ``process_group``
            (nothing is changed; with a group, a rank without batches contributes none).

    Examples:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        >>> data = [torch.randn(16, 4) for _ in range(10)]
        >>> recalibrate(net, data, progress=False) is net
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches: expected a positive int, got {num_batches!r}")
    run = _default_forward if forward is None else forward
    layers = {
        name: module
        for name, module in model.named_modules()
        if has_channel_statistics(module)
        and not isinstance(module, FrozenBatchNormBase)
        and not getattr(module, "freeze_stats", False)
    }
    statistics = {name: _PopulationStatistics() for name in layers}
    modes = {module: module.training for module in model.modules()}
    saved = {
        name: {key: value.detach().clone() for key, value in module.named_buffers(recurse=False)}
        for name, module in layers.items()
    }
    handles = [
        module.register_forward_pre_hook(
            lambda _module, args, stats=statistics[name]: stats.add(args[0])
        )
        for name, module in layers.items()
    ]
    seen = 0
    try:
        model.train()
        show = progress and _rank(process_group) == 0
        with torch.no_grad():
            total = min(num_batches, len(batches)) if isinstance(batches, Sized) else num_batches
            for batch in _progress(itertools.islice(batches, num_batches), total, show):
                run(model, batch)
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.train(training)
        for name, module in layers.items():  # undo what the training-mode passes changed
            with torch.no_grad():
                for key, value in module.named_buffers(recurse=False):
                    value.copy_(saved[name][key])
    if seen == 0 and process_group is None:
        raise ValueError("batches: expected at least one batch, got none")
    for name, module in layers.items():
        stats = statistics[name]
        running_mean: torch.Tensor = module.running_mean
        running_var: torch.Tensor = module.running_var
        if process_group is not None:
            stats.all_reduce(running_mean.shape[0], running_mean.device, process_group)
        if stats.count < 2 or stats.mean is None or stats.m2 is None:
            warnings.warn(
                f"recalibrate: {name} saw {stats.count} value(s) per channel; "
                "its statistics are left as they were",
                stacklevel=2,
            )
            continue
        with torch.no_grad():
            running_mean.copy_(stats.mean)
            running_var.copy_(stats.m2 / (stats.count - 1))
    return model


def _rank(process_group: Any) -> int:
    """This process's rank in ``process_group`` (0 without one)."""
    if process_group is None:
        return 0
    import torch.distributed as dist

    return int(dist.get_rank(group=process_group))


def _progress(items: Iterable[Any], total: int, show: bool) -> Iterable[Any]:
    """``items`` wrapped in a ``tqdm`` progress bar when ``show``."""
    if not show:
        return items
    from tqdm.auto import tqdm

    bar: Iterable[Any] = tqdm(items, total=total, desc="recalibrate", unit="batch", leave=False)
    return bar
