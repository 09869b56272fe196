"""The bottom layer every layer may import: shared math in torch operations.

The fused activations and their derivatives, the result record of a call, the running-statistics
update, and the ``create_graph`` recomputation every backward falls back to. Written in
TorchScript's subset of Python where it matters (no postponed annotations, plain ``if`` chains):
the modules' ``torch.jit.script`` branch calls :func:`activate`.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "BatchNormOutput",
    "activate",
    "activation_derivative",
    "add_and_activate",
    "compute_dtype",
    "differentiable_grads",
    "new_running_stats",
    "recomputed",
    "running_update",
]

#: Activations the fused path applies after the normalization (and the residual add).
ACTIVATIONS = ("relu", "leaky_relu", "silu", "gelu")


def activate(u: torch.Tensor, activation: str | None, negative_slope: float) -> torch.Tensor:
    """``act(u)`` for an activation name (``None``: identity), with PyTorch's definitions."""
    if activation is None:
        return u
    if activation == "relu":
        return torch.relu(u)
    if activation == "leaky_relu":
        return F.leaky_relu(u, negative_slope)
    if activation == "silu":
        return F.silu(u)
    return F.gelu(u)  # exact (erf) GELU


def activation_derivative(
    u: torch.Tensor, activation: str | None, negative_slope: float
) -> torch.Tensor:
    """``act'(u)`` elementwise, by PyTorch's conventions (ReLU' = [u > 0]).

    SiLU' = σ(u)·(1 + u·(1 − σ(u))); GELU' = Φ(u) + u·φ(u) (Hendrycks & Gimpel, 2016).
    """
    if activation is None:
        return torch.ones_like(u)
    if activation == "relu":
        return (u > 0).to(u.dtype)
    if activation == "leaky_relu":
        return torch.where(u > 0, 1.0, negative_slope).to(u.dtype)
    if activation == "silu":
        sig = torch.sigmoid(u)
        return sig * (1 + u * (1 - sig))
    cdf = 0.5 * (1 + torch.erf(u * (1 / math.sqrt(2))))  # Φ(u)
    pdf = torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)  # φ(u)
    return cdf + u * pdf


class BatchNormOutput(NamedTuple):
    """The result of a whole batch-norm call (``batch_norm_pure``, a backend's ``train``).

    Attributes:
        output: the normalized tensor, shape and dtype of the input.
        running_mean: the updated running mean, or the given one (or ``None``) when unchanged.
        running_var: the updated running variance, or the given one (or ``None``) when unchanged.
    """

    output: torch.Tensor
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and reductions use for an input dtype: float64 stays, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def running_update(
    running: torch.Tensor,
    batch_stat: torch.Tensor,
    momentum: float,
) -> torch.Tensor:
    """Returns ``(1 − momentum)·running + momentum·batch_stat`` in ``running``'s dtype (pure).

    Args:
        running: a running buffer, shape ``(C,)``.
        batch_stat: this batch's mean or unbiased variance, shape ``(C,)``.
        momentum: the exponential-average factor for this step.

    Returns:
        The new running value, a new tensor of ``running``'s dtype; computed in at least
        float32.
    """
    if running.dtype == batch_stat.dtype:  # the common case: one fused multiply-add, no casts
        return torch.add(running * (1.0 - momentum), batch_stat, alpha=momentum)  # (C,)
    dtype = torch.promote_types(running.dtype, torch.float32)
    new = (1.0 - momentum) * running.to(dtype) + momentum * batch_stat.to(dtype)  # (C,)
    return new.to(running.dtype)


def new_running_stats(
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    count: int,
    momentum: float,
    computed: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The running statistics after a training batch of ``count = M = N·L`` values per channel.

    Args:
        running_mean, running_var: the current buffers (``None`` when not tracked).
        mean, var: the batch mean and biased variance, ``(C,)``.
        count: ``M``, the values per channel in the batch.
        momentum: the factor of this step.
        computed: new statistics a backend already computed in its kernels (used as they are).

    Returns:
        ``(new_mean, new_var)``: the given buffers themselves for an empty batch (PyTorch
        leaves them as they are), ``None`` where a buffer is ``None``.
    """
    if count == 0:
        return running_mean, running_var
    new_mean, new_var = computed
    if running_mean is not None and new_mean is None:
        new_mean = running_update(running_mean, mean, momentum)
    if running_var is not None and new_var is None:
        var_unbiased = var * (count / (count - 1))  # (C,)  Bessel's correction
        new_var = running_update(running_var, var_unbiased, momentum)
    return (
        None if running_mean is None else new_mean,
        None if running_var is None else new_var,
    )


def add_and_activate(
    bn: torch.Tensor, residual: torch.Tensor | None, activation: str | None, negative_slope: float
) -> torch.Tensor:
    """``act(bn + z)`` in the compute dtype, returned in ``bn``'s dtype (the input's).

    ``bn`` is ``bn(x)`` already rounded to the input dtype, as the unfused composition has it.
    """
    dtype = compute_dtype(bn.dtype)
    u = bn.to(dtype)  # (N, C, L)
    if residual is not None:
        u = u + residual.to(dtype)
    return activate(u, activation, negative_slope).to(bn.dtype)


def recomputed(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    activation: str | None,
    negative_slope: float,
) -> torch.Tensor:
    """``act(bn(x) + z)`` again, in differentiable torch operations, rounded as the forward was.

    The statistics ``μ``, ``r`` are functions of ``x`` here, which the saved (non-differentiable)
    ones are not: this is what a ``create_graph`` backward differentiates.
    """
    dtype = compute_dtype(x.dtype)
    gamma = None if weight is None else weight.to(dtype)
    beta = None if bias is None else bias.to(dtype)
    bn = F.batch_norm(x.to(dtype), None, None, gamma, beta, True, 0.0, eps)  # (N, C, L)
    return add_and_activate(bn.to(x.dtype), residual, activation, negative_slope)


def differentiable_grads(
    dy: torch.Tensor,
    inputs: tuple[torch.Tensor | None, ...],
    needs: tuple[bool, ...],
    eps: float,
    activation: str | None = None,
    negative_slope: float = 0.0,
) -> tuple[torch.Tensor | None, ...]:
    """The gradients of ``(x, γ, β[, z])`` as a graph autograd can differentiate again.

    A backward with ``create_graph`` (double backward, gradient penalties, ``torch.func.grad``
    of a gradient) comes here instead of the backend's kernels, whose results carry no graph
    through the statistics: the forward is recomputed in torch operations and differentiated
    with ``create_graph``. First-order training never takes this path.
    """
    x, weight, bias = inputs[:3]
    residual = inputs[3] if len(inputs) > 3 else None
    assert x is not None
    wanted = [t for t, need in zip(inputs, needs, strict=False) if need and t is not None]
    y = recomputed(x, weight, bias, residual, eps, activation, negative_slope)
    grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True))
    return tuple(
        next(grads) if need and t is not None else None
        for t, need in zip(inputs, needs, strict=False)
    )
