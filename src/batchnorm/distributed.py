"""``SyncBatchNorm``: batch statistics of the *global* batch, across the ranks of a process group.

When a model trains on several processes, each rank holds a slice of the batch. Synchronized batch
normalization normalizes every slice with the mean and variance of the whole (concatenated) batch,
so the result does not depend on how the batch was split. Built on ``torch.distributed`` (gloo on
CPU, NCCL on GPU); outside a process group (not initialized, or world size 1) and in evaluation
mode it is exactly :class:`batchnorm.BatchNorm2d` & co., with no collective at all.

Forward, per channel, rank ``r`` holding ``n_r`` values (``n_r = N_r·L``, possibly 0):

1. local moments ``(n_r, μ_r, M2_r)`` with ``M2_r = Σ (x − μ_r)²`` (Welford in ``torch.var_mean``);
2. **one** collective: ``all_gather`` of one packed float64 tensor ``[n_r, μ_r(C), M2_r(C)]``;
3. every rank merges the same ``(W, 2C+1)`` table with Chan's formula (:func:`chan_merge`),
   ``n = Σ n_r``, ``μ = Σ n_r·μ_r / n``, ``M2 = Σ M2_r + Σ n_r·(μ_r − μ)²``, never
   ``E[x²] − E[x]²``, so a large mean does not cancel the variance away;
4. ``σ² = M2 / n`` (biased, for normalizing), ``M2 / (n − 1)`` for the running variance.

Backward, **one** collective: ``all_reduce`` (sum) of one packed ``[Σ dy, Σ dy·x̂]`` tensor, then
``dx = γ·r·(dy − Σ_g dy / n − x̂·Σ_g dy·x̂ / n)`` with the global sums and the global ``n``.
``weight``/``bias`` gradients are the rank's **own** contribution (``Σ_rank dy·x̂``, ``Σ_rank dy``):
their sum over ranks is the single-process gradient; this is the convention of
``torch.nn.SyncBatchNorm`` and keeps ``DistributedDataParallel``'s gradient averaging consistent.

No host synchronisation in the hot path: the only value read on the host is the global count,
and only on a rank whose own slice has at most one value per channel (then the global count
decides whether the step is the error case "one value per channel in the global batch"). Every
rank that could be in that case reads the same gathered count, so they all raise together and
no rank is left waiting in a collective.

A collective that does not complete (a rank died, skipped a call or called the layer once more)
raises a :class:`RuntimeError` naming the layer once the process group's timeout
(``init_process_group(timeout=...)``) expires; see ``docs/distributed.md``.

Extension point: :func:`register_sync_counterpart` tells
:meth:`SyncBatchNorm.convert_sync_batchnorm` which synchronized class replaces a
:class:`~batchnorm.modules.BatchNormBase` subclass (or that it stays as it is); an unregistered
subclass is refused with an error naming it, so that nothing a subclass adds (a fused
activation, a residual input) is silently dropped.

References:
    T. F. Chan, G. H. Golub, R. J. LeVeque, "Updating Formulae and a Pairwise Algorithm for
    Computing Sample Variances", Stanford CS Tech. Report STAN-CS-79-773, 1979.
    C. Peng et al., "MegDet: A Large Mini-Batch Object Detector", CVPR 2018 (cross-GPU BN).

Why this file is long: the synchronized statistics, their autograd function and the conversion
to and from local layers must agree on one protocol (what is gathered, when, in which order).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm._math import activate
from batchnorm.backends import compute_dtype
from batchnorm.functional import (
    BatchNormOutput,
    check_batch_norm_args,
    check_fusion_args,
    running_update,
)
from batchnorm.modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    BatchNormActBase,
    BatchNormBase,
)

__all__ = [
    "Moments",
    "SyncBatchNorm",
    "SyncBatchNormAct",
    "SyncBatchNormFunction",
    "chan_merge",
    "local_moments",
    "register_sync_counterpart",
    "sync_batch_norm_pure",
]

ModuleT = TypeVar("ModuleT", bound=nn.Module)

#: Dtype of the packed statistics sent between ranks: counts stay exact up to 2**53 values and the
#: merge loses nothing; the tensor holds only 2C + 1 numbers per rank.
STATS_DTYPE = torch.float64


class Moments(NamedTuple):
    """Count, mean and sum of squared deviations of one or several groups of values.

    Attributes:
        n: number of values, a float tensor of shape ``(...)``.
        mean: mean per channel, shape ``(..., C)`` (0 where ``n`` is 0).
        m2: ``Σ (x − mean)²`` per channel, shape ``(..., C)`` (0 where ``n`` is 0).
    """

    n: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor


def local_moments(x3: torch.Tensor, dtype: torch.dtype) -> Moments:
    """The moments of each channel of an ``(N, C, L)`` view, computed in ``dtype``.

    Args:
        x3: input view of shape ``(N, C, L)``; ``N`` or ``L`` may be 0.
        dtype: the dtype of the reduction (see :func:`batchnorm.backends.compute_dtype`).

    Returns:
        :class:`Moments` with ``n = N·L`` of shape ``()`` in float64 (exact up to 2**53), and
        ``mean`` and ``m2`` of shape ``(C,)`` in ``dtype``; zeros for an empty view.
    """
    values = x3.shape[0] * x3.shape[2]  # n = N·L per channel
    count = torch.full((), float(values), dtype=STATS_DTYPE, device=x3.device)  # () exact
    if values == 0:
        zeros = torch.zeros(x3.shape[1], dtype=dtype, device=x3.device)  # (C,)
        return Moments(count, zeros, zeros)
    var, mean = torch.var_mean(x3.to(dtype), dim=(0, 2), correction=0)  # (C,), (C,) biased
    return Moments(count, mean, var * values)  # M2 = n·σ²


def chan_merge(counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor) -> Moments:
    """Merges the moments of ``W`` disjoint groups into those of their union (Chan et al.).

    .. math::

        n = \\sum_r n_r, \\qquad \\mu = \\sum_r \\frac{n_r}{n}\\,\\mu_r, \\qquad
        M_2 = \\sum_r M_{2,r} + \\sum_r n_r\\,(\\mu_r - \\mu)^2

    This is Chan, Golub and LeVeque's pairwise update ``M2 = M2_a + M2_b + δ²·n_a·n_b / n``
    written for ``W`` groups at once: every term is a sum of non-negative numbers, so nothing
    cancels (unlike ``E[x²] − E[x]²``). Empty groups (``n_r = 0``) contribute nothing.

    Args:
        counts: ``n_r``, shape ``(W,)``.
        means: ``μ_r``, shape ``(W, C)``.
        m2s: ``M2_r``, shape ``(W, C)``.

    Returns:
        :class:`Moments` of the union: ``n`` of shape ``()``, ``mean`` and ``m2`` of shape
        ``(C,)``; zeros when every group is empty.
    """
    total = counts.sum()  # ()  n
    weights = counts / total.clamp(min=1)  # (W,)  n_r / n, all 0 when n = 0
    mean = (weights[:, None] * means).sum(dim=0)  # (C,)
    spread = (counts[:, None] * (means - mean) ** 2).sum(dim=0)  # (C,)  Σ n_r·(μ_r − μ)²
    return Moments(total, mean, m2s.sum(dim=0) + spread)


def _collective_error(what: str, error: Exception) -> RuntimeError:
    """The error raised when a collective of :class:`SyncBatchNormFunction` fails."""
    return RuntimeError(
        f"SyncBatchNorm: the {what} across the process group did not complete: {error}. "
        "Every rank of the group must call the layer the same number of times in training mode "
        "(and run backward through it); a rank that died, skipped a call or called it once "
        "more leaves the others waiting until the process group's timeout "
        "(init_process_group(timeout=...)); see docs/distributed.md"
    )


def _gather_moments(local: Moments, process_group: Any) -> Moments:
    """All-gathers every rank's moments in one collective and merges them (:func:`chan_merge`)."""
    channels = local.mean.shape[0]
    parts = [local.n.reshape(1), local.mean.to(STATS_DTYPE), local.m2.to(STATS_DTYPE)]
    packed = torch.cat(parts)  # (2C+1,)  [n_r, μ_r, M2_r] in float64
    world_size = dist.get_world_size(process_group)
    table = [torch.empty_like(packed) for _ in range(world_size)]  # W × (2C+1,)
    try:
        dist.all_gather(table, packed, group=process_group)
    except RuntimeError as error:  # DistBackendError (timeout, closed peer) is a RuntimeError
        raise _collective_error("all_gather of the batch statistics (forward)", error) from error
    stacked = torch.stack(table)  # (W, 2C+1)
    return chan_merge(stacked[:, 0], stacked[:, 1 : channels + 1], stacked[:, channels + 1 :])


class _NotTwiceDifferentiable(torch.autograd.Function):
    """Passes a first-order gradient through; differentiating it again raises a clear error.

    ``SyncBatchNormFunction``'s backward is not differentiable (its statistics are saved
    without a graph and the collective has no derivative), so a ``create_graph`` backward
    marks its results with this instead of letting a gradient penalty silently lose a term.
    """

    @staticmethod
    def forward(ctx: Any, grad: torch.Tensor, *sources: torch.Tensor) -> torch.Tensor:
        """Returns ``grad`` (a view); ``sources`` make the result part of the graph."""
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Always raises.

        Raises:
            RuntimeError: double backward through SyncBatchNorm is not supported.
        """
        raise RuntimeError(
            "SyncBatchNorm: double backward (differentiating its gradients, e.g. a gradient "
            "penalty through create_graph=True) is not supported"
        )


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch normalization with the statistics of the global batch.

    Inputs ``(x3, weight, bias, eps, process_group)`` with ``x3`` the ``(N, C, L)`` view; outputs
    ``(y, mean, invstd, var, count)``: ``y`` like ``x3``; ``mean``, ``invstd`` and the biased
    ``var`` of the global batch, shape ``(C,)`` in the compute dtype; ``count`` the global number
    of values per channel, a float64 tensor of shape ``()``. Only ``y`` is differentiable.
    Saves ``x3``, ``weight``, ``mean``, ``invstd`` and ``count`` for backward.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x3: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        process_group: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gathers the moments, merges them and normalizes the local slice.

        Raises:
            ValueError: on every rank, when the global batch holds one value per channel.
            RuntimeError: when the all_gather does not complete (see module docstring).
        """
        dtype = compute_dtype(x3.dtype)
        local_values = x3.shape[0] * x3.shape[2]  # n_r, a host int: no synchronisation
        merged = _gather_moments(local_moments(x3, dtype), process_group)
        # Only a rank with ≤ 1 local value can be part of a global batch of 1 value; every such
        # rank reads the same gathered count (a host sync, off the hot path) and raises alike.
        if local_values <= 1 and int(merged.n) == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got 1 value per channel "
                f"in the global batch (this rank's input has shape {tuple(x3.shape)} as (N, C, L))"
            )
        count = merged.n  # ()  float64
        var = (merged.m2 / count.clamp(min=1)).to(dtype)  # (C,)  biased σ² of the global batch
        mean = merged.mean.to(dtype)  # (C,)
        invstd = torch.rsqrt(var + eps)  # (C,)  r
        scale = invstd if weight is None else invstd * weight.to(dtype)  # (C,)  γ·r
        y3 = (x3.to(dtype) - mean[None, :, None]) * scale[None, :, None]  # (N, C, L)
        if bias is not None:
            y3 = y3 + bias.to(dtype)[None, :, None]  # (N, C, L)
        ctx.save_for_backward(x3, weight, mean, invstd, count)
        ctx.process_group = process_group
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, invstd, var, count)
        return y3.to(x3.dtype), mean, invstd, var, count

    @staticmethod
    def backward(
        ctx: Any, dy: torch.Tensor, *_stat_grads: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        """Returns ``(dx, dweight, dbias, None, None)``; one all_reduce when ``dx`` is needed.

        Raises:
            RuntimeError: when the all_reduce does not complete (see module docstring).
        """
        x3, weight, mean, invstd, count = ctx.saved_tensors
        dtype = compute_dtype(x3.dtype)
        dyf = dy.to(dtype)  # (N, C, L)
        x_hat = (x3.to(dtype) - mean[None, :, None]) * invstd[None, :, None]  # (N, C, L)
        dbias = dyf.sum(dim=(0, 2))  # (C,)  this rank's Σ dy
        dweight = (dyf * x_hat).sum(dim=(0, 2))  # (C,)  this rank's Σ dy·x̂
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        dx = None
        if needs_x:
            sums = torch.cat([dbias, dweight])  # (2C,)  packed: one collective
            try:
                dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.process_group)
            except RuntimeError as error:
                raise _collective_error("all_reduce of the gradient sums (backward)", error) from (
                    error
                )
            global_dbias, global_dweight = sums.chunk(2)  # (C,), (C,)  Σ_g dy, Σ_g dy·x̂
            per_value = 1.0 / count.clamp(min=1).to(dtype)  # ()  1 / n
            gain = invstd if weight is None else invstd * weight.to(dtype)  # (C,)  γ·r
            # dx = γ·r·(dy − Σ_g dy / n − x̂·Σ_g dy·x̂ / n): direct, mean and variance terms.
            mean_term = (global_dbias * per_value)[None, :, None]  # (1, C, 1)
            variance_term = x_hat * (global_dweight * per_value)[None, :, None]  # (N, C, L)
            dx = (gain[None, :, None] * (dyf - mean_term - variance_term)).to(x3.dtype)
        grads = [
            dx,
            dweight.to(weight.dtype) if needs_weight else None,
            dbias.to(ctx.bias_dtype) if needs_bias else None,
        ]
        sources = [t for t in (dy, x3, weight) if t is not None and t.requires_grad]
        if torch.is_grad_enabled() and sources:  # create_graph: differentiating these raises
            grads = [
                None if g is None else _NotTwiceDifferentiable.apply(g, *sources)  # type: ignore[no-untyped-call]
                for g in grads
            ]
        return (*grads, None, None)


def sync_batch_norm_pure(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    momentum: float,
    eps: float,
    process_group: Any = None,
) -> BatchNormOutput:
    """Training-mode batch norm with global statistics; returns the new running statistics.

    Like :func:`batchnorm.functional.batch_norm_pure` with ``training=True``, except that the
    statistics are those of the batch concatenated over the ranks of ``process_group``. Every
    rank of the group must call it (an empty local batch included). Nothing is changed in place.

    Args:
        input: this rank's slice, shape ``(N, C, *)``, any memory format; ``N`` may be 0.
        running_mean, running_var: running buffers ``(C,)`` or ``None``.
        weight, bias: ``γ``, ``β`` of shape ``(C,)`` or ``None``.
        momentum: running-average factor of this step.
        eps: added to the variance inside the square root.
        process_group: the group to synchronize over; ``None`` for the default group.

    Returns:
        :class:`~batchnorm.functional.BatchNormOutput`; the running statistics move towards the
        global mean and unbiased variance, and stay as they are when the global batch is empty.

    Raises:
        TypeError, ValueError, RuntimeError: on bad arguments (checked before the collective, as
            :func:`~batchnorm.functional.check_batch_norm_args` does), on one value per channel
            in the global batch (on every rank), or when a collective does not complete.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input: expected a torch.Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"input: expected a tensor of shape (N, C, *), got {tuple(input.shape)}")
    batch, channels = input.shape[0], input.shape[1]
    # The local "one value per channel" rule does not apply here (the global one does), so the
    # remaining checks run on an empty probe of input's dtype, device and channel count.
    probe = input.new_empty((0, channels))  # (0, C), allocates nothing
    check_batch_norm_args(probe, running_mean, running_var, weight, bias, True, momentum, eps)
    x3 = input.reshape(batch, channels, math.prod(input.shape[2:]))  # (N, C, L), view if possible
    y3, mean, _invstd, var, count = SyncBatchNormFunction.apply(  # type: ignore[no-untyped-call]
        x3, weight, bias, eps, process_group
    )
    has_values = count > 0  # ()  an empty global batch leaves the running statistics as they are
    new_mean, new_var = running_mean, running_var
    if running_mean is not None:
        new_mean = torch.where(
            has_values, running_update(running_mean, mean, momentum), running_mean
        )
    if running_var is not None:
        var_unbiased = var * (count / (count - 1).clamp(min=1))  # (C,)  Bessel: n / (n − 1)
        new_var = torch.where(
            has_values, running_update(running_var, var_unbiased, momentum), running_var
        )
    return BatchNormOutput(y3.reshape(input.shape), new_mean, new_var)


def _world_size(process_group: Any) -> int:
    """World size of ``process_group`` (default group if ``None``), or 1 outside of one."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size(process_group))


class SyncBatchNorm(BatchNormBase, _BatchNorm):  # type: ignore[misc]
    r"""Batch normalization with the statistics of the batch concatenated over all ranks.

    In training, inside a process group of more than one rank, the output, the input gradient
    and the running statistics are those of one process on the concatenated global batch (see
    the module docstring for the algorithm); ``weight``/``bias`` gradients are each rank's own
    contribution, summing over ranks to the single-process gradient (as ``torch.nn.SyncBatchNorm``).
    Ranks may hold different batch sizes, including 0. In evaluation mode, outside a process
    group, or with world size 1 it is exactly :class:`~batchnorm.modules.BatchNormBase`
    (``BatchNorm*d``), with no collective.

    Every rank of the group must call the layer the same number of times in training mode; if a
    collective does not complete, a :class:`RuntimeError` is raised once the process group's
    timeout expires (``init_process_group(timeout=...)``).

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias, backend:
            as in :class:`~batchnorm.modules.BatchNormBase` (``backend`` serves the
            unsynchronized path; the synchronized path computes with torch operations).
        process_group: the group to synchronize over; ``None`` for the default (world) group.

    Raises:
        ValueError: in training when the *global* batch has one value per channel (on every
            rank alike); the running buffers are unchanged.
        RuntimeError: when a collective does not complete within the group's timeout.

    Shape:
        - Input: ``(N, C, *)``, any rank ≥ 2 and memory format; ``N`` may be 0 on some ranks.
        - Output: same shape, dtype and memory format as the input.

    Examples:
        >>> bn = SyncBatchNorm(16)  # outside a process group: plain batch norm
        >>> bn(torch.randn(4, 16, 8, 8)).shape
        torch.Size([4, 16, 8, 8])
        >>> model = SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(BatchNorm1d(4)))
        >>> type(model[0]).__name__
        'SyncBatchNorm'
    """

    _allowed_dims = ()
    _shape_text = "(N, C, *)"
    _scriptable = False  # collectives have no TorchScript form

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            backend=backend,
        )
        self.process_group = process_group
        #: The class this module was converted from (the target of :meth:`revert_sync_batchnorm`).
        self._local_class: type[nn.Module] | None = None

    def _normalize(
        self, input: torch.Tensor, use_batch_stats: bool, momentum: float
    ) -> BatchNormOutput:
        """Synchronized statistics in training within a group of ≥ 2 ranks, else the base path."""
        if not self.training or _world_size(self.process_group) <= 1:
            return super()._normalize(input, use_batch_stats, momentum)
        return sync_batch_norm_pure(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            momentum,
            self.eps,
            self.process_group,
        )

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Replaces every batch-norm layer of ``module`` by its synchronized counterpart.

        Converted, with the same parameter and buffer tensors (not copies), training mode and
        every attribute a subclass adds:

        * ``torch.nn.BatchNorm1d/2d/3d`` (and ``torch.nn.SyncBatchNorm``, initialized lazy
          ones) and our ``BatchNorm1d/2d/3d`` → :class:`SyncBatchNorm`;
        * any other :class:`~batchnorm.modules.BatchNormBase` subclass → the class registered
          with :func:`register_sync_counterpart` (or left as it is if registered with ``None``).

        Modules that are already synchronized are left as they are.

        Args:
            module: a model or a single layer; converted in place where it is a container.
            process_group: the group to synchronize over; ``None`` for the default group.

        Returns:
            ``module`` with its batch-norm layers replaced (a new module if ``module`` itself
            is one).

        Raises:
            TypeError: for a ``BatchNormBase`` subclass with no registered counterpart (naming
                it, so a fused activation or other added behaviour is never dropped silently).
            ValueError: for a lazy batch-norm layer that has not seen an input yet.
        """
        converted = _to_sync(module, process_group)
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted

    @classmethod
    def revert_sync_batchnorm(cls, module: nn.Module) -> nn.Module:
        """The inverse of :meth:`convert_sync_batchnorm`: synchronized layers become local.

        A layer created by conversion returns to the class it came from; any other
        :class:`SyncBatchNorm` becomes a :class:`~batchnorm.modules.BatchNormBase` (any input
        rank), and a registered synchronized class returns to its registered local class.
        Parameters and buffers are the same tensors.

        Args:
            module: a model or a single layer; converted in place where it is a container.

        Returns:
            ``module`` with its synchronized layers replaced.
        """
        reverted = _to_local(module)
        for name, child in module.named_children():
            reverted.add_module(name, cls.revert_sync_batchnorm(child))
        return reverted


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Module-level alias of :meth:`SyncBatchNorm.revert_sync_batchnorm`."""
    return SyncBatchNorm.revert_sync_batchnorm(module)


#: Local class → its synchronized class (``None``: leave such layers as they are). Exact types:
#: a subclass is never converted through its parent's entry, since it may add behaviour.
_SYNC_COUNTERPARTS: dict[type[nn.Module], type[BatchNormBase] | None] = {
    BatchNormBase: SyncBatchNorm,
    BatchNorm1d: SyncBatchNorm,
    BatchNorm2d: SyncBatchNorm,
    BatchNorm3d: SyncBatchNorm,
}
#: Synchronized class → local class, for layers built directly (not by conversion).
_LOCAL_COUNTERPARTS: dict[type[nn.Module], type[nn.Module]] = {SyncBatchNorm: BatchNormBase}
#: Attributes only a synchronized layer has; they are not carried back by revert.
_SYNC_ONLY_ATTRIBUTES = frozenset({"process_group", "_local_class"})


def register_sync_counterpart(
    local_class: type[BatchNormBase], sync_class: type[BatchNormBase] | None
) -> None:
    """Declares how :meth:`SyncBatchNorm.convert_sync_batchnorm` converts ``local_class``.

    The extension point for ``BatchNormBase`` subclasses that add behaviour (a fused
    activation, a residual input, frozen statistics). Conversion builds the synchronized layer
    **without calling its ``__init__``**: it moves every attribute, parameter, buffer and child
    of the local layer onto a new ``sync_class`` instance, then sets ``process_group`` (and the
    class to revert to). So ``sync_class`` must work with exactly the state of a ``local_class``
    instance plus ``process_group``; the natural way is
    ``class SyncFoo(SyncBatchNorm, Foo)`` whose ``_normalize`` (or ``forward``) calls
    :func:`sync_batch_norm_pure` or :class:`SyncBatchNormFunction` in training.

    Args:
        local_class: the exact class to convert (subclasses need their own entry).
        sync_class: its synchronized counterpart, or ``None`` to leave such layers unconverted
            (e.g. frozen batch norm, which uses no batch statistics).

    Raises:
        TypeError: if a class is not a ``BatchNormBase`` subclass.

    Examples:
        >>> class ScaledBatchNorm2d(BatchNorm2d): ...
        >>> class SyncScaledBatchNorm2d(SyncBatchNorm, ScaledBatchNorm2d): ...
        >>> register_sync_counterpart(ScaledBatchNorm2d, SyncScaledBatchNorm2d)
    """
    for name, value in (("local_class", local_class), ("sync_class", sync_class)):
        if value is None and name == "sync_class":
            continue
        if not (isinstance(value, type) and issubclass(value, BatchNormBase)):
            raise TypeError(f"{name}: expected a subclass of BatchNormBase, got {value!r}")
    _SYNC_COUNTERPARTS[local_class] = sync_class
    if sync_class is not None:
        _LOCAL_COUNTERPARTS[sync_class] = local_class


def _is_synchronized(module: nn.Module) -> bool:
    """Whether ``module`` is already a synchronized batch-norm layer."""
    return isinstance(module, SyncBatchNorm) or type(module) in _LOCAL_COUNTERPARTS


def _move_state(source: nn.Module, target_class: type[ModuleT], skip: frozenset[str]) -> ModuleT:
    """A new ``target_class`` instance holding ``source``'s state (its ``__init__`` not run).

    Parameters, buffers (persistent or not) and children are the same objects; every other
    attribute the source's class set (``num_features``, ``eps``, ``activation``, ...) is copied
    by reference, except those in ``skip``. Hooks are not carried over (as
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``).
    """
    target = target_class.__new__(target_class)
    nn.Module.__init__(target)
    module_bookkeeping = set(target.__dict__)  # containers, hooks, training flag of nn.Module
    for name, value in source.__dict__.items():
        if name not in module_bookkeeping and name not in skip:
            target.__dict__[name] = value
    target._parameters.update(source._parameters)
    target._buffers.update(source._buffers)
    target._non_persistent_buffers_set = set(source._non_persistent_buffers_set)
    target._modules.update(source._modules)
    target.training = source.training
    return target


def _to_sync(module: nn.Module, process_group: Any) -> nn.Module:
    """The synchronized replacement of one layer (``module`` itself if there is none)."""
    if _is_synchronized(module):
        return module
    if isinstance(module, BatchNormBase):
        local_class = type(module)
        if local_class not in _SYNC_COUNTERPARTS:
            raise TypeError(
                f"convert_sync_batchnorm: {local_class.__name__} is a subclass of BatchNormBase "
                "with no registered synchronized counterpart, so converting it could drop what "
                "it adds; register one with batchnorm.distributed.register_sync_counterpart("
                f"{local_class.__name__}, SyncClass) (or None to leave it unconverted)"
            )
        sync_class = _SYNC_COUNTERPARTS[local_class]
        if sync_class is None:
            return module
        converted = _move_state(module, sync_class, skip=frozenset())
        vars(converted).update(process_group=process_group, _local_class=local_class)
        return converted
    if isinstance(module, _BatchNorm):
        return _from_torch(module, process_group)
    return module


def _from_torch(module: _BatchNorm, process_group: Any) -> SyncBatchNorm:
    """A :class:`SyncBatchNorm` sharing the parameters and buffers of a ``torch.nn`` layer."""
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        raise ValueError(
            f"convert_sync_batchnorm: {type(module).__name__} has not seen an input yet "
            "(lazy num_features); run one forward pass before converting"
        )
    converted = SyncBatchNorm(
        module.num_features,
        module.eps,
        module.momentum,
        module.affine,
        module.track_running_stats,
        process_group,
    )
    _share_tensors(module, converted)  # a layer without bias passes its None on
    converted._local_class = None if isinstance(module, nn.SyncBatchNorm) else type(module)
    return converted


def _share_tensors(source: nn.Module, target: nn.Module) -> None:
    """Makes ``target`` use ``source``'s parameters, running buffers and training mode."""
    for name in ("weight", "bias"):
        if name in target._parameters:
            target._parameters[name] = source._parameters.get(name)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if name in target._buffers:
            target._buffers[name] = source._buffers.get(name)
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig
    target.train(source.training)


def _to_local(module: nn.Module) -> nn.Module:
    """The local replacement of one synchronized layer (``module`` itself for others)."""
    if not _is_synchronized(module):
        return module
    local_class: type[nn.Module] | None = getattr(module, "_local_class", None)
    local_class = local_class or _LOCAL_COUNTERPARTS.get(type(module))
    if local_class is None:  # a SyncBatchNorm subclass nobody registered
        local_class = BatchNormBase
    if issubclass(local_class, _BatchNorm) and not issubclass(local_class, BatchNormBase):
        assert isinstance(module, BatchNormBase)
        kwargs = {} if module.bias is not None or not module.affine else {"bias": False}
        local = local_class(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            **kwargs,
        )
        _share_tensors(module, local)
        return local
    return _move_state(module, local_class, skip=_SYNC_ONLY_ATTRIBUTES)


class SyncBatchNormAct(SyncBatchNorm, BatchNormActBase):  # type: ignore[misc]
    """``act(bn(x) + z)`` with the statistics of the global batch (see :class:`SyncBatchNorm`).

    The synchronized counterpart of ``BatchNormAct1d/2d/3d``: in training within a group of
    ≥ 2 ranks the normalization is :class:`SyncBatchNormFunction`, and the residual add and the
    activation follow as ordinary autograd operations (so ``dz`` is returned too); otherwise it
    is exactly the local fused layer. Built by :meth:`SyncBatchNorm.convert_sync_batchnorm`,
    which keeps ``activation`` and ``negative_slope``.
    """

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Returns ``act(bn(input) + residual)`` with synchronized statistics in training.

        Raises:
            TypeError, ValueError, RuntimeError: as :class:`SyncBatchNorm` and on a bad
                residual (checked before any collective).
        """
        if not self.training or _world_size(self.process_group) <= 1:
            return BatchNormActBase.forward(self, input, residual)
        self._check_input_dim(input)
        check_fusion_args(input, self.activation, residual, self.negative_slope)
        normalized = SyncBatchNorm.forward(self, input)  # (N, C, *)  global statistics
        if residual is not None:
            normalized = normalized + residual
        return activate(normalized, self.activation, self.negative_slope)


for _act_class in (BatchNormActBase, BatchNormAct1d, BatchNormAct2d, BatchNormAct3d):
    register_sync_counterpart(_act_class, SyncBatchNormAct)
