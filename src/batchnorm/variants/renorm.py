"""Batch Renormalization (Ioffe, 2017): batch statistics corrected towards the population ones.

In training, with the batch statistics ``μ_B``, ``σ_B = sqrt(σ²_B + ε)`` and the running ones
``μ``, ``σ = sqrt(running_var + ε)``::

    r = clip(σ_B / σ, 1/r_max, r_max),   d = clip((μ_B − μ) / σ, −d_max, d_max)
    y = γ·(x̂·r + d) + β,                 x̂ = (x − μ_B) / σ_B

where ``r`` and ``d`` are constants for the backward pass (``stop_gradient``). That is batch
normalization with the effective affine ``γ' = γ·r`` and ``β' = γ·d + β``, which is how it is
computed here: the constants come from one detached statistics pass, then the ordinary
training path (any backend) normalizes with ``γ'`` and ``β'`` and produces the running update;
autograd carries the gradient from ``γ'``, ``β'`` back to ``γ``, ``β``. Evaluation is plain
batch normalization with the running statistics.

The limits follow the paper's schedule, driven by the ``renorm_step`` buffer (training steps
that updated the statistics): plain batch normalization (``r_max = 1``, ``d_max = 0``) for the
first ``warmup_steps``, then linear growth to ``r_max`` at step ``r_max_steps`` and to ``d_max``
at step ``d_max_steps``.

Reference:
    S. Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in
    Batch-Normalized Models", NeurIPS 2017.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from batchnorm.functional import BatchNormOutput, batch_norm_pure
from batchnorm.modules import BatchNormBase

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "BatchRenormBase", "renorm_limits"]


def renorm_limits(
    step: int,
    r_max: float,
    d_max: float,
    warmup_steps: int,
    r_max_steps: int,
    d_max_steps: int,
) -> tuple[float, float]:
    """The clipping limits ``(r_max, d_max)`` in force at training step ``step`` (0-based).

    ``1`` and ``0`` until ``warmup_steps``, then each grows linearly, reaching its final value at
    ``r_max_steps`` / ``d_max_steps`` (immediately if that is not after the warm-up).

    Args:
        step: number of training steps already taken.
        r_max, d_max: final limits.
        warmup_steps: steps of plain batch normalization.
        r_max_steps, d_max_steps: steps at which the limits reach ``r_max`` / ``d_max``.

    Returns:
        ``(r_max_now, d_max_now)``.
    """

    def progress(final_step: int) -> float:
        if step < warmup_steps:
            return 0.0
        if final_step <= warmup_steps:
            return 1.0
        return min(1.0, (step - warmup_steps) / (final_step - warmup_steps))

    return 1.0 + (r_max - 1.0) * progress(r_max_steps), d_max * progress(d_max_steps)


class BatchRenormBase(BatchNormBase):
    """Batch renormalization over dim 1 (see the module docstring for the math).

    Args:
        num_features, eps, momentum, affine, device, dtype: as :class:`BatchNormBase`.
        track_running_stats: must be True (the positional slot of ``torch.nn.BatchNorm*``
            is kept): ``r`` and ``d`` need the running statistics.
        r_max: final upper limit of ``r`` (≥ 1). Default: 3.0.
        d_max: final limit of ``|d|`` (≥ 0). Default: 5.0.
        warmup_steps: training steps of plain batch normalization. Default: 5000.
        r_max_steps: step at which ``r_max`` is reached. Default: 40000.
        d_max_steps: step at which ``d_max`` is reached. Default: 25000.
        **kwargs: keyword-only options of :class:`BatchNormBase` (``bias``, ``backend``,
            ``freeze_stats``, ``nonfinite``).

    Raises:
        ValueError: if ``r_max < 1``, ``d_max < 0``, a step count is negative or
            ``track_running_stats`` is False.

    References:
        S. Ioffe, "Batch Renormalization", NeurIPS 2017.
    """

    _scriptable = False  # r and d from the running statistics: no TorchScript twin

    renorm_step: torch.Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        r_max_steps: int = 40000,
        d_max_steps: int = 25000,
        **kwargs: Any,
    ) -> None:
        if track_running_stats is not True:
            raise ValueError(
                "track_running_stats: batch renormalization needs the running statistics "
                f"(r and d compare the batch with them); expected True, got {track_running_stats!r}"
            )
        if not r_max >= 1.0:
            raise ValueError(f"r_max: expected a float ≥ 1, got {r_max!r}")
        if not d_max >= 0.0:
            raise ValueError(f"d_max: expected a float ≥ 0, got {d_max!r}")
        for name, value in (
            ("warmup_steps", warmup_steps),
            ("r_max_steps", r_max_steps),
            ("d_max_steps", d_max_steps),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
        super().__init__(num_features, eps, momentum, affine, True, device, dtype, **kwargs)
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_steps = warmup_steps
        self.r_max_steps = r_max_steps
        self.d_max_steps = d_max_steps
        # Training steps taken, for the schedule of the limits (in the state_dict).
        self.register_buffer("renorm_step", torch.tensor(0, dtype=torch.long, device=device))

    def reset_running_stats(self) -> None:
        """Resets the running statistics and the schedule's step counter."""
        super().reset_running_stats()
        if hasattr(self, "renorm_step"):
            self.renorm_step.zero_()

    def current_limits(self) -> tuple[float, float]:
        """The limits ``(r_max, d_max)`` the next training step uses."""
        return renorm_limits(
            int(self.renorm_step),
            self.r_max,
            self.d_max,
            self.warmup_steps,
            self.r_max_steps,
            self.d_max_steps,
        )

    def extra_repr(self) -> str:
        """The base arguments plus the limits and their schedule."""
        return (
            f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
            f"warmup_steps={self.warmup_steps}, r_max_steps={self.r_max_steps}, "
            f"d_max_steps={self.d_max_steps}"
        )

    def _normalize(
        self, input: torch.Tensor, use_batch_stats: bool, momentum: float
    ) -> BatchNormOutput:
        """Renormalizes in training; plain batch norm in evaluation and during the warm-up."""
        r_max, d_max = self.current_limits()
        if not use_batch_stats or (r_max == 1.0 and d_max == 0.0):
            return super()._normalize(input, use_batch_stats, momentum)
        assert self.running_mean is not None  # track_running_stats is always on
        assert self.running_var is not None
        with torch.no_grad():  # r and d are constants in backward
            length = math.prod(input.shape[2:])  # L
            x3 = input.detach().reshape(input.shape[0], input.shape[1], length)  # (N, C, L)
            dtype = torch.promote_types(input.dtype, torch.float32)
            batch_var, batch_mean = torch.var_mean(x3.to(dtype), dim=(0, 2), correction=0)
            sigma = torch.sqrt(self.running_var.to(dtype) + self.eps)  # (C,)  σ
            batch_sigma = torch.sqrt(batch_var + self.eps)  # (C,)  σ_B
            r = (batch_sigma / sigma).clamp(1.0 / r_max, r_max)  # (C,)
            d = ((batch_mean - self.running_mean.to(dtype)) / sigma).clamp(-d_max, d_max)  # (C,)
        weight = r if self.weight is None else self.weight * r  # (C,)  γ' = γ·r
        shift = d if self.weight is None else self.weight * d  # (C,)  γ·d
        bias = shift if self.bias is None else self.bias + shift  # (C,)  β' = γ·d + β
        return batch_norm_pure(
            input,
            self.running_mean,
            self.running_var,
            weight.to(self.running_mean.dtype),
            bias.to(self.running_mean.dtype),
            True,
            momentum,
            self.eps,
            backend=self.backend,
        )

    def _commit_running_stats(self, result: BatchNormOutput) -> None:
        """Commits the statistics and advances the schedule by one step."""
        super()._commit_running_stats(result)
        with torch.no_grad():
            self.renorm_step.add_(1)


class BatchRenorm1d(BatchRenormBase, nn.BatchNorm1d):  # type: ignore[misc]
    """Batch renormalization of ``(N, C)`` or ``(N, C, L)`` input (see :class:`BatchRenormBase`).

    Examples:
        >>> bn = BatchRenorm1d(100, warmup_steps=0, r_max_steps=0, d_max_steps=0)
        >>> bn(torch.randn(20, 100)).shape
        torch.Size([20, 100])
    """

    _allowed_dims = (2, 3)
    _shape_text = "(N, C) or (N, C, L)"


class BatchRenorm2d(BatchRenormBase, nn.BatchNorm2d):  # type: ignore[misc]
    """Batch renormalization of ``(N, C, H, W)`` input (see :class:`BatchRenormBase`)."""

    _allowed_dims = (4,)
    _shape_text = "(N, C, H, W)"


class BatchRenorm3d(BatchRenormBase, nn.BatchNorm3d):  # type: ignore[misc]
    """Batch renormalization of ``(N, C, D, H, W)`` input (see :class:`BatchRenormBase`)."""

    _allowed_dims = (5,)
    _shape_text = "(N, C, D, H, W)"
