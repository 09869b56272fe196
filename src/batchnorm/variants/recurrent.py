"""Recurrent batch normalization and the BN-LSTM (Cooijmans et al., 2016).

:class:`RecurrentBatchNorm1d` keeps separate running statistics for each time step ``t`` (steps
past ``max_steps`` reuse those of the last step) and shares ``γ`` (initialised to 0.1, as the
paper recommends so that the ``tanh``/sigmoid units do not saturate) and ``β`` across steps.

The BN-LSTM normalizes the input and the recurrent contributions separately, and the cell
state before the output non-linearity (the paper's equations 6–8)::

    (ĩ, f̃, g̃, õ) = BN(W_h·h_{t−1}; γ_h, 0) + BN(W_x·x_t; γ_x, 0) + b
    c_t = σ(f̃)⊙c_{t−1} + σ(ĩ)⊙tanh(g̃)
    h_t = σ(õ)⊙tanh(BN(c_t; γ_c, β_c))

(gates in PyTorch's ``nn.LSTM`` order ``i, f, g, o``; the BN shifts of the two gate terms are
left out since ``b`` already provides one). Each ``BN`` uses the statistics of step ``t``.

Variable-length batches: a mask ``(N,)`` per step (``True`` = the sequence is still running)
restricts the statistics of step ``t`` to the running sequences (masked batch norm), and the
state of a finished sequence is carried unchanged, so the final state of each sequence is its
state at its own last step. A step where fewer than two sequences are running cannot be
batch-normalized in training; it is normalized with that step's running statistics instead
(as in evaluation) and does not update them.

Reference:
    T. Cooijmans, N. Ballas, C. Laurent, Ç. Gülçehre and A. Courville, "Recurrent Batch
    Normalization", ICLR 2017 (arXiv:1603.09025).

Why this file is long: the paper's three pieces (per-step batch norm, the BN-LSTM cell and the
layer over a sequence) are one unit and are read together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from batchnorm.functional import batch_norm_pure
from batchnorm.modules import BatchNormBase

__all__ = ["BNLSTM", "BNLSTMCell", "RecurrentBatchNorm1d"]


class RecurrentBatchNorm1d(BatchNormBase):
    """Batch normalization of ``(N, C)`` input with running statistics per time step.

    Not a ``torch.nn.BatchNorm1d`` by type: its statistics have shape ``(max_steps, C)`` and its
    forward takes the time step, so tools made for torch's layer (``convert_sync_batchnorm``,
    ``update_bn``, fusers) would misuse it.

    ``running_mean``, ``running_var`` have shape ``(max_steps, C)`` and ``num_batches_tracked``
    ``(max_steps,)``; ``weight`` (γ, init ``weight_init``) and ``bias`` (β, init 0) are ``(C,)``
    and shared by all steps.

    Args:
        num_features: ``C``.
        max_steps: number of time steps with their own statistics (≥ 1); later steps use
            the last ones.
        eps, momentum, affine, track_running_stats, device, dtype: as :class:`BatchNormBase`.
        weight_init: initial value of γ (keyword only). Default: 0.1, as in the paper.
        **kwargs: keyword-only options of :class:`BatchNormBase` (``bias``, ``backend``,
            ``freeze_stats``, ``nonfinite``).

    Raises:
        ValueError: if ``max_steps`` is not a positive int.

    Examples:
        >>> bn = RecurrentBatchNorm1d(8, max_steps=5)
        >>> bn(torch.randn(4, 8), step=7).shape  # uses the statistics of step 4
        torch.Size([4, 8])
    """

    _allowed_dims = (2,)
    _shape_text = "(N, C)"
    _scriptable = False  # per-step statistics and a step argument: no TorchScript twin

    def __init__(
        self,
        num_features: int,
        max_steps: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        weight_init: float = 0.1,
        **kwargs: Any,
    ) -> None:
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps: expected a positive int, got {max_steps!r}")
        self.max_steps = max_steps
        self.weight_init = float(weight_init)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs
        )
        if track_running_stats:  # one row of statistics per time step
            factory: dict[str, Any] = {"device": device, "dtype": dtype}
            self.running_mean = torch.zeros(max_steps, num_features, **factory)
            self.running_var = torch.ones(max_steps, num_features, **factory)
            self.num_batches_tracked = torch.zeros(max_steps, dtype=torch.long, device=device)

    def reset_parameters(self) -> None:
        """Resets the statistics, γ to ``weight_init`` and β to 0."""
        super().reset_parameters()
        if self.weight is not None:
            nn.init.constant_(self.weight, self.weight_init)

    def extra_repr(self) -> str:
        """The base arguments plus ``max_steps``."""
        return f"{super().extra_repr()}, max_steps={self.max_steps}"

    def forward(  # type: ignore[override]
        self, input: torch.Tensor, step: int, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Normalizes the values of time step ``step``.

        Args:
            input: ``(N, C)`` values at this step.
            step: the time step (0-based); ``step ≥ max_steps`` uses the last statistics.
            mask: optional ``torch.bool`` ``(N,)``, ``True`` for sequences still running;
                padded rows give 0 and no gradient.

        Returns:
            ``(N, C)`` normalized values.

        Raises:
            TypeError, ValueError, RuntimeError: on a bad input, step or mask (buffers
                unchanged).
        """
        self._check_input_dim(input)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step: expected a non-negative int, got {step!r}")
        index = min(step, self.max_steps - 1)
        running_mean = None if self.running_mean is None else self.running_mean[index]
        running_var = None if self.running_var is None else self.running_var[index]
        use_batch_stats = self.training or running_mean is None
        updates_stats = self._updates_stats()
        real = input.shape[0] if mask is None or not use_batch_stats else int(mask.sum())
        if use_batch_stats and real < 2 and running_mean is not None:
            use_batch_stats = updates_stats = False  # too few sequences: population statistics
        momentum = 0.0
        if updates_stats:
            assert self.num_batches_tracked is not None
            tracked = int(self.num_batches_tracked[index])
            momentum = 1.0 / (tracked + 1) if self.momentum is None else float(self.momentum)
        result = batch_norm_pure(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
            backend=self.backend,
            mask=mask,
        )
        if updates_stats and self._passes_nonfinite_guard(input, mask, result):
            assert self.running_mean is not None
            assert self.running_var is not None
            assert self.num_batches_tracked is not None
            with torch.no_grad():
                self.running_mean[index].copy_(result.running_mean)  # type: ignore[arg-type]
                self.running_var[index].copy_(result.running_var)  # type: ignore[arg-type]
                self.num_batches_tracked[index].add_(1)
        return result.output


class BNLSTMCell(nn.Module):
    """One step of the batch-normalized LSTM (see the module docstring for the equations).

    Args:
        input_size: features of ``x_t``.
        hidden_size: features of ``h_t`` and ``c_t``.
        max_steps: time steps with their own statistics.
        bias: learn the gate bias ``b`` (init 0). Default: True.
        eps, momentum: of the three recurrent batch norms.
        gamma_init: initial γ of the three batch norms. Default: 0.1, as in the paper.
        device, dtype: of the parameters and buffers.

    Attributes:
        weight_ih: ``W_x``, ``(4·hidden_size, input_size)``, uniform in ``±1/sqrt(hidden_size)``.
        weight_hh: ``W_h``, ``(4·hidden_size, hidden_size)``, orthogonal per gate (paper §5).
        bn_ih, bn_hh, bn_c: the batch norms of ``W_x·x``, ``W_h·h`` (no shift) and ``c``.

    Examples:
        >>> cell = BNLSTMCell(3, 8, max_steps=10)
        >>> h, c = cell(torch.randn(4, 3), (torch.zeros(4, 8), torch.zeros(4, 8)), step=0)
        >>> h.shape
        torch.Size([4, 8])
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        max_steps: int,
        bias: bool = True,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        gamma_init: float = 0.1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        gates = 4 * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gates, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(gates, hidden_size, **factory))
        self.bias = nn.Parameter(torch.empty(gates, **factory)) if bias else None
        norm: dict[str, Any] = {"eps": eps, "momentum": momentum, "weight_init": gamma_init}
        self.bn_ih = RecurrentBatchNorm1d(gates, max_steps, bias=False, **norm, **factory)
        self.bn_hh = RecurrentBatchNorm1d(gates, max_steps, bias=False, **norm, **factory)
        self.bn_c = RecurrentBatchNorm1d(hidden_size, max_steps, **norm, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialises the weights, the gate bias and the three batch norms."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        nn.init.uniform_(self.weight_ih, -bound, bound)
        with torch.no_grad():
            for block in torch.split(self.weight_hh, self.hidden_size):  # (H, H) per gate
                nn.init.orthogonal_(block)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        for norm in (self.bn_ih, self.bn_hh, self.bn_c):
            norm.reset_parameters()

    def forward(
        self,
        input: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor],
        step: int,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Advances the state ``(h, c)`` by one time step.

        Args:
            input: ``x_t``, ``(N, input_size)``.
            state: ``(h_{t−1}, c_{t−1})``, each ``(N, hidden_size)``.
            step: the time step ``t`` (selects the batch-norm statistics).
            mask: optional ``torch.bool`` ``(N,)``; rows that are ``False`` keep their state.

        Returns:
            ``(h_t, c_t)``, each ``(N, hidden_size)``.

        Raises:
            ValueError: if ``input`` or the state has the wrong shape.
        """
        hidden, cell = state
        batch = input.shape[0] if input.dim() == 2 else -1
        if input.dim() != 2 or input.shape[1] != self.input_size:
            raise ValueError(
                f"input: expected shape (N, {self.input_size}), got {tuple(input.shape)}"
            )
        for name, tensor in (("h", hidden), ("c", cell)):
            if tuple(tensor.shape) != (batch, self.hidden_size):
                raise ValueError(
                    f"state: expected {name} of shape ({batch}, {self.hidden_size}), "
                    f"got {tuple(tensor.shape)}"
                )
        gates_x = self.bn_ih(input @ self.weight_ih.T, step, mask)  # (N, 4H)  BN(W_x·x)
        gates_h = self.bn_hh(hidden @ self.weight_hh.T, step, mask)  # (N, 4H)  BN(W_h·h)
        gates = gates_x + gates_h  # (N, 4H)
        if self.bias is not None:
            gates = gates + self.bias  # (N, 4H)
        in_gate, forget_gate, candidate, out_gate = gates.chunk(4, dim=1)  # (N, H) each
        new_cell = torch.sigmoid(forget_gate) * cell + torch.sigmoid(in_gate) * torch.tanh(
            candidate
        )  # (N, H)
        new_hidden = torch.sigmoid(out_gate) * torch.tanh(self.bn_c(new_cell, step, mask))
        if mask is not None:  # finished sequences keep their state
            running = mask[:, None]  # (N, 1)
            new_hidden = torch.where(running, new_hidden, hidden)  # (N, H)
            new_cell = torch.where(running, new_cell, cell)  # (N, H)
        return new_hidden, new_cell


class BNLSTM(nn.Module):
    """A batch-normalized LSTM over whole sequences, one or more stacked :class:`BNLSTMCell`.

    Args:
        input_size: features of the input.
        hidden_size: features of the hidden state.
        max_steps: time steps with their own batch-norm statistics.
        num_layers: stacked cells. Default: 1.
        bias, eps, momentum, gamma_init, device, dtype: as :class:`BNLSTMCell`.
        batch_first: input and output are ``(N, T, ·)`` instead of ``(T, N, ·)``.

    Examples:
        >>> lstm = BNLSTM(3, 8, max_steps=20, batch_first=True)
        >>> out, (h, c) = lstm(torch.randn(4, 6, 3), lengths=[6, 5, 3, 2])
        >>> out.shape, h.shape
        (torch.Size([4, 6, 8]), torch.Size([1, 4, 8]))
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        max_steps: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        gamma_init: float = 0.1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers: expected a positive int, got {num_layers!r}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.batch_first = batch_first
        self.cells = nn.ModuleList(
            BNLSTMCell(
                input_size if layer == 0 else hidden_size,
                hidden_size,
                max_steps,
                bias,
                eps,
                momentum,
                gamma_init,
                device,
                dtype,
            )
            for layer in range(num_layers)
        )

    def forward(
        self,
        input: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        lengths: Sequence[int] | torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Runs the sequences through every layer.

        Args:
            input: ``(T, N, input_size)``, or ``(N, T, input_size)`` with ``batch_first``.
            state: initial ``(h_0, c_0)``, each ``(num_layers, N, hidden_size)``; zeros if
                ``None``.
            lengths: optional ``(N,)`` sequence lengths (each in ``1..T``); the rest is padding.
            mask: optional ``torch.bool`` ``(T, N)`` (``(N, T)`` with ``batch_first``),
                ``True`` = real step; give ``lengths`` or ``mask``, not both.

        Returns:
            ``(output, (h_n, c_n))``: ``output`` ``(T, N, hidden_size)`` (batch-first if
            asked) with 0 at padded steps; ``h_n``, ``c_n`` ``(num_layers, N, hidden_size)``,
            each sequence's state after its last real step.

        Raises:
            ValueError, TypeError: on shapes or masks that do not fit.
        """
        if input.dim() != 3 or input.shape[2] != self.input_size:
            layout = "(N, T, input_size)" if self.batch_first else "(T, N, input_size)"
            raise ValueError(
                f"input: expected shape {layout} with input_size={self.input_size}, "
                f"got {tuple(input.shape)}"
            )
        sequence = input.transpose(0, 1) if self.batch_first else input  # (T, N, I)
        steps, batch = sequence.shape[0], sequence.shape[1]
        step_mask = self._step_mask(lengths, mask, steps, batch, input.device)  # (T, N) | None
        if state is None:
            zeros = sequence.new_zeros(self.num_layers, batch, self.hidden_size)
            state = (zeros, zeros)
        expected = (self.num_layers, batch, self.hidden_size)
        if tuple(state[0].shape) != expected or tuple(state[1].shape) != expected:
            raise ValueError(
                f"state: expected (h_0, c_0) each of shape {expected}, "
                f"got {tuple(state[0].shape)} and {tuple(state[1].shape)}"
            )
        layer_input = sequence  # (T, N, ·)
        final_h, final_c = [], []
        for layer, cell in enumerate(self.cells):
            hidden, cell_state = state[0][layer], state[1][layer]  # (N, H) each
            outputs = []
            for t in range(steps):
                step_real = None if step_mask is None else step_mask[t]  # (N,)
                hidden, cell_state = cell(layer_input[t], (hidden, cell_state), t, step_real)
                out = hidden if step_real is None else hidden * step_real[:, None]  # (N, H)
                outputs.append(out)
            layer_input = torch.stack(outputs)  # (T, N, H)
            final_h.append(hidden)
            final_c.append(cell_state)
        output = layer_input.transpose(0, 1) if self.batch_first else layer_input
        return output, (torch.stack(final_h), torch.stack(final_c))

    def _step_mask(
        self,
        lengths: Sequence[int] | torch.Tensor | None,
        mask: torch.Tensor | None,
        steps: int,
        batch: int,
        device: torch.device,
    ) -> torch.Tensor | None:
        """The ``(T, N)`` boolean mask of real steps from ``lengths`` or ``mask`` (or None)."""
        if lengths is not None and mask is not None:
            raise ValueError("lengths, mask: give one of them, not both")
        if lengths is not None:
            sizes = torch.as_tensor(lengths, device=device).reshape(-1)  # (N,)
            if sizes.shape[0] != batch or sizes.dtype.is_floating_point:
                raise ValueError(f"lengths: expected {batch} integers, got {lengths!r}")
            if bool((sizes < 1).any()) or bool((sizes > steps).any()):
                raise ValueError(f"lengths: expected values in 1..{steps}, got {lengths!r}")
            return torch.arange(steps, device=device)[:, None] < sizes[None, :]  # (T, N)
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask: expected a torch.bool tensor (True = real step)")
        step_mask = mask.transpose(0, 1) if self.batch_first else mask  # (T, N)
        if tuple(step_mask.shape) != (steps, batch):
            expected = (batch, steps) if self.batch_first else (steps, batch)
            raise ValueError(f"mask: expected shape {expected}, got {tuple(mask.shape)}")
        return step_mask
