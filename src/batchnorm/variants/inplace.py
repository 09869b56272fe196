r"""In-place activated batch normalization (InPlace-ABN; Rota Bulò, Porzi & Kontschieder, 2018).

Batch normalization followed by an *invertible* activation, computed so that the only
input-sized tensor kept for backward is the output, written into the input's own storage:

.. math::

    y = \mathrm{act}(\gamma' \hat{x} + \beta), \qquad
    \hat{x} = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}, \qquad
    \gamma' = |\gamma| + \epsilon_\gamma

with the batch mean ``μ`` and biased variance ``σ²`` per channel (``M = N·L`` values). Backward
needs ``x̂``, not ``x``; both the activation and the affine map are inverted from ``y``::

    z  = act⁻¹(y),       x̂ = (z − β) / γ'                      (γ' > 0, act strictly increasing)
    dz = dy · act'(z)    (from y alone: 1 where y > 0, else leaky ReLU's s or ELU's y + α)
    dβ = Σ dz,   dγ' = Σ dz·x̂,   dx = (γ'·r / M)·(M·dz − dβ − x̂·dγ'),   r = 1/sqrt(σ² + ε)
    dγ = dγ'·sign(γ)

so autograd keeps ``y`` (the input's storage) and the per-channel ``r``, ``γ``, ``β``; the mean is
not needed. The usual pair "batch norm, then activation" keeps two input-sized tensors (the
batch norm's input and the activation's input or output); this layer keeps one, half of what
those blocks save for backward (``benchmarks/memory.py``).

``γ' = |γ| + ε_γ`` is the paper's remedy for ``γ ≈ 0`` (``x̂ = (z − β)/γ'`` would divide by
zero): it is what the layer effectively multiplies by, and the gradient reaching ``γ`` carries
the factor ``sign(γ)`` (0 at ``γ = 0``, as ``torch.abs``). A checkpoint of ``torch.nn.BatchNorm*``
loads as it is (same ``state_dict``), but its ``γ`` then acts as ``|γ| + ε_γ``.

Only invertible activations qualify: ``identity``, ``leaky_relu`` with a positive slope and
``elu`` with a positive ``α``. ReLU, SiLU and GELU lose information (ReLU maps every negative
input to 0, SiLU and GELU are not monotonic); use :class:`batchnorm.BatchNormAct2d` for them.

In evaluation mode, under ``torch.no_grad()`` (or when neither the input nor a parameter requires
grad, so nothing is saved), under tracers and compilers (``torch.compile``, ``torch.export``,
FX, ``torch.jit.trace``, fake tensors) and under ``torch.func`` transforms the layer runs the
ordinary out-of-place composition ``act(bn(x; γ', β))`` and leaves the input as it is.

Reference:
    S. Rota Bulò, L. Porzi and P. Kontschieder, "In-Place Activated BatchNorm for
    Memory-Optimized Training of DNNs", CVPR 2018.

Why this file is long: the in-place autograd function, its input checks and the three module
classes depend on each other's conventions (|γ| + ε_γ, which storage is overwritten).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from batchnorm import _compat
from batchnorm.backends import Backend, compute_dtype, resolve_backend
from batchnorm.backends.base import Saved
from batchnorm.functional import (
    BatchNormOutput,
    batch_norm_pure,
    channel_view,
    check_batch_norm_args,
    running_update,
)
from batchnorm.modules import BatchNormBase

__all__ = [
    "INVERTIBLE_ACTIVATIONS",
    "InPlaceABNFunction",
    "InPlaceBatchNormAct1d",
    "InPlaceBatchNormAct2d",
    "InPlaceBatchNormAct3d",
    "InPlaceBatchNormActBase",
    "InPlaceResult",
    "check_inplace_activation",
    "check_overwritable",
    "inplace_batch_norm_act_train",
]

#: Activations whose input can be recovered from their output (with a positive slope / alpha).
INVERTIBLE_ACTIVATIONS = ("identity", "leaky_relu", "elu")

#: Activations people reach for that are not invertible, and why.
_NOT_INVERTIBLE = {
    "relu": "ReLU is not invertible (it maps every negative input to 0)",
    "silu": "SiLU is not invertible (not monotonic: two inputs give each output in (−0.28, 0))",
    "gelu": "GELU is not invertible (not monotonic: two inputs give each output in (−0.17, 0))",
}


class InPlaceResult(NamedTuple):
    """What :func:`inplace_batch_norm_act_train` returns.

    Attributes:
        output: ``y``, which *is* the input tensor (its storage was overwritten).
        mean: the batch mean per channel, ``(C,)``, float32 (float64 for float64 input).
        var: the biased batch variance per channel, same shape and dtype as ``mean``.
    """

    output: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor


def _finite_number(name: str, value: object) -> float:
    """``value`` as a float, or TypeError naming ``name`` if it is not a finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name}: expected a finite float, got {value!r}")
    return float(value)


def check_inplace_activation(
    activation: str | None, negative_slope: float, alpha: float, alternative: str = "BatchNormAct2d"
) -> str:
    """Checks that ``activation`` can be inverted from its output; returns its canonical name.

    Args:
        activation: ``None`` or ``"identity"``, ``"leaky_relu"``, ``"elu"``.
        negative_slope: leaky ReLU's slope for negative inputs; must be > 0 for ``leaky_relu``.
        alpha: ELU's ``α`` (``y = α·(eᶻ − 1)`` for ``z ≤ 0``); must be > 0 for ``elu``.
        alternative: the out-of-place layer the error messages suggest.

    Returns:
        ``"identity"``, ``"leaky_relu"`` or ``"elu"``.

    Raises:
        ValueError: naming the argument, for an unknown or non-invertible activation (ReLU,
            SiLU, GELU, a slope or ``α`` ≤ 0).
        TypeError: for a non-numeric or non-finite ``negative_slope``/``alpha``.
    """
    slope = _finite_number("negative_slope", negative_slope)
    alpha_value = _finite_number("alpha", alpha)
    if activation is None:
        return "identity"
    if isinstance(activation, str) and activation in _NOT_INVERTIBLE:
        raise ValueError(
            f"activation: {_NOT_INVERTIBLE[activation]}, so in-place activated batch norm "
            f"cannot recover its input from the output; use 'leaky_relu', 'elu' or 'identity', "
            f"or use {alternative}(activation={activation!r}) (out of place)"
        )
    if activation not in INVERTIBLE_ACTIVATIONS:
        raise ValueError(
            f"activation: expected None or one of {', '.join(INVERTIBLE_ACTIVATIONS)} "
            f"(invertible activations), got {activation!r}"
        )
    if activation == "leaky_relu" and not slope > 0:
        raise ValueError(
            f"negative_slope: leaky_relu is invertible only with a positive slope, got {slope!r} "
            f"(0 is ReLU, which is not invertible; a negative slope is not monotonic); "
            f"use {alternative} for it"
        )
    if activation == "elu" and not alpha_value > 0:
        raise ValueError(
            f"alpha: elu is invertible only with a positive alpha, got {alpha_value!r}; "
            f"use {alternative} with another activation, or an out-of-place ELU"
        )
    return str(activation)


def _effective_weight(
    weight: torch.Tensor | None, weight_eps: float, dtype: torch.dtype
) -> torch.Tensor | None:
    """``γ' = |γ| + ε_γ`` in ``dtype`` (not differentiable), or ``None`` without ``γ``."""
    if weight is None:
        return None
    return weight.detach().to(dtype).abs() + weight_eps  # (C,)


def _activate_(y: torch.Tensor, activation: str, negative_slope: float, alpha: float) -> None:
    """Applies the activation to ``y`` in place (``y`` is a fresh tensor of the backend)."""
    if activation == "leaky_relu":
        F.leaky_relu_(y, negative_slope)
    elif activation == "elu":
        F.elu_(y, alpha)


def _invert(
    y3: torch.Tensor, dy3: torch.Tensor, activation: str, negative_slope: float, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, dz) = (act⁻¹(y), dy·act'(z))`` from the output alone, on ``(N, C, L)`` views.

    ``y > 0`` exactly where ``z > 0`` (both activations keep the sign), so the derivative follows
    PyTorch's conventions at 0: leaky ReLU' = 1 for ``z > 0`` else the slope, ELU' = 1 for
    ``z > 0`` else ``α·eᶻ = y + α``. ELU's inverse ``z = log(1 + y/α)`` is clamped where ``y``
    rounded to ``−α`` (``z`` below ``log`` of the dtype's epsilon), where ``dz ≈ 0`` anyway.
    """
    if activation == "identity":
        return y3, dy3
    positive = y3 > 0  # (N, C, L) bool
    if activation == "leaky_relu":
        z3 = torch.where(positive, y3, y3 / negative_slope)  # (N, C, L)
        dz3 = torch.where(positive, dy3, dy3 * negative_slope)  # (N, C, L)
        return z3, dz3
    floor = -1.0 + torch.finfo(y3.dtype).eps  # y/α > −1 except where rounding saturated it
    z3 = torch.where(positive, y3, torch.log1p((y3 / alpha).clamp_min(floor)))  # (N, C, L)
    dz3 = torch.where(positive, dy3, dy3 * (y3 + alpha))  # (N, C, L)  ELU' = y + α for z ≤ 0
    return z3, dz3


class InPlaceABNFunction(torch.autograd.Function):
    """``y = act(γ'·x̂ + β)`` written into ``x``; backward reconstructs ``x̂`` from ``y``.

    Outputs ``(x, mean, var)``: ``x`` itself (marked dirty; it now holds ``y``) and the batch
    statistics (not differentiable) for the running update. Saves ``y`` (the input's storage),
    ``γ``, ``β`` and ``r`` only; see the module docstring for the formulas.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        weight_eps: float,
        activation: str,
        negative_slope: float,
        alpha: float,
        backend: Backend,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalizes ``x`` (``(N, C, *)``) with ``backend.forward`` and overwrites it."""
        dtype = compute_dtype(x.dtype)
        gamma = _effective_weight(weight, weight_eps, dtype)  # (C,) γ' or None
        stats = backend.forward(channel_view(x), gamma, bias, eps)  # y: (N, C, L), a new tensor
        _activate_(stats.y, activation, negative_slope, alpha)
        x.copy_(stats.y.reshape(x.shape))  # the only write into the caller's tensor
        ctx.mark_dirty(x)
        ctx.save_for_backward(x, weight, bias, stats.invstd)  # no input-sized tensor but y
        ctx.mark_non_differentiable(stats.mean, stats.var)
        ctx.weight_eps = weight_eps
        ctx.activation = activation
        ctx.negative_slope = negative_slope
        ctx.alpha = alpha
        ctx.backend = backend
        return x, stats.mean, stats.var

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, dy: torch.Tensor, _dmean: torch.Tensor | None, _dvar: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        """``(dx, dγ, dβ)`` through ``backend.backward`` on the reconstructed ``x̂``.

        The backend's primitive computes ``dx = (w·r₀/M)(M·dz − Σdz − x̂₀·Σdz·x̂₀)`` with
        ``x̂₀ = (x₀ − μ₀)·r₀``; called with ``x₀ = x̂``, ``μ₀ = 0``, ``r₀ = 1`` and ``w = γ'·r``, that
        is exactly the three-term formula above, and its ``dweight`` is ``Σ dz·x̂ = dγ'``.
        """
        y, weight, bias, invstd = ctx.saved_tensors
        dtype = compute_dtype(y.dtype)
        y3 = channel_view(y).to(dtype)  # (N, C, L)
        dy3 = channel_view(dy).to(dtype)  # (N, C, L)
        z3, dz3 = _invert(y3, dy3, ctx.activation, ctx.negative_slope, ctx.alpha)
        gamma = _effective_weight(weight, ctx.weight_eps, dtype)  # (C,) γ' or None
        gain = invstd.to(dtype)  # (C,)  r
        if bias is not None:
            x_hat = z3 - bias.to(dtype)[None, :, None]  # (N, C, L), a new tensor
            if gamma is not None:
                x_hat.div_(gamma[None, :, None])  # x̂ = (z − β)/γ', in place
        elif gamma is not None:
            x_hat = z3 / gamma[None, :, None]  # (N, C, L)  x̂ = z/γ'
        else:
            x_hat = z3  # (N, C, L)
        del z3  # (freed here unless it is y itself)
        if gamma is not None:
            gain = gamma * gain  # (C,)  γ'·r
        zeros = torch.zeros_like(gain)  # (C,)  μ₀
        ones = torch.ones_like(gain)  # (C,)  r₀
        dx3, dgamma, dbeta = ctx.backend.backward(dz3, Saved(x_hat, gain, zeros, ones))
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        dx = dx3.reshape(y.shape).to(y.dtype) if needs_x else None  # (N, C, *)
        dweight = None
        if needs_weight:
            dweight = (dgamma * torch.sign(weight.detach()).to(dgamma.dtype)).to(weight.dtype)
        dbias = dbeta.to(bias.dtype) if needs_bias else None
        return dx, dweight, dbias, None, None, None, None, None, None


def _is_dense(x: torch.Tensor) -> bool:
    """Whether ``x`` is contiguous or channels-last (each element once, nothing in between)."""
    if x.is_contiguous():
        return True
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def check_overwritable(input: torch.Tensor, alternative: str = "BatchNormAct2d") -> None:
    """Rejects an input whose storage the in-place path may not overwrite.

    Args:
        input: the (otherwise checked) input of a training call.
        alternative: the out-of-place layer the messages suggest.

    Raises:
        ValueError: naming ``input``, for a leaf that requires grad (autograd needs its value),
            a view of another tensor (that tensor would change too), an inference tensor, or
            a tensor that is neither contiguous nor channels-last.
    """
    hint = f"pass input.clone() or use {alternative} (out of place)"
    if input.requires_grad and input.is_leaf:
        raise ValueError(
            "input: a leaf tensor that requires grad cannot be overwritten in place (autograd "
            "needs its value for its own gradient); feed the output of another layer, "
            f"or use {alternative} (out of place)"
        )
    if input._base is not None:
        raise ValueError(
            "input: a view of another tensor (input._base is not None) cannot be overwritten "
            f"in place, that tensor would change too; {hint}"
        )
    if input.is_inference():
        raise ValueError(
            "input: an inference tensor (made under torch.inference_mode) cannot be "
            f"overwritten outside inference mode; {hint}"
        )
    if not _is_dense(input):
        raise ValueError(
            "input: expected a contiguous or channels-last tensor to overwrite in place, got "
            f"strides {input.stride()} for shape {tuple(input.shape)}; call "
            f"input.contiguous() first or use {alternative} (out of place)"
        )


def inplace_batch_norm_act_train(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    activation: str | None = "leaky_relu",
    negative_slope: float = 0.01,
    alpha: float = 1.0,
    weight_eps: float = 1e-5,
    backend: str | None = None,
) -> InPlaceResult:
    r"""Training-mode in-place activated batch norm: overwrites ``input`` with ``y``.

    .. math::

        y = \mathrm{act}\left((|\gamma| + \epsilon_\gamma)\,\frac{x - \mu}{\sqrt{\sigma^2 +
        \epsilon}} + \beta\right)

    with the batch statistics of ``input``; the result *is* ``input`` (same tensor, same
    storage), and autograd keeps only it and per-channel tensors for backward. Running
    statistics are not touched: update them from the returned ``mean`` and ``var``.

    Args:
        input: ``(N, C, *)`` floating-point tensor, contiguous or channels-last, not a view,
            not a leaf that requires grad. Its values are lost.
        weight: ``γ`` of shape ``(C,)`` (used as ``|γ| + ε_γ``), or ``None`` for 1.
        bias: ``β`` of shape ``(C,)``, or ``None`` for 0.
        eps: added to the variance inside the square root.
        activation: ``None``/``"identity"``, ``"leaky_relu"`` or ``"elu"``.
        negative_slope: leaky ReLU's slope for negative inputs (> 0).
        alpha: ELU's ``α`` (> 0).
        weight_eps: ``ε_γ`` (≥ 0; > 0 keeps ``x̂ = (z − β)/γ'`` finite when ``γ = 0``).
        backend: backend name for the statistics and the backward primitive, or ``None``
            (``BATCHNORM_BACKEND``, then ``auto``).

    Returns:
        An :class:`InPlaceResult` ``(output, mean, var)``; ``output is input``.

    Raises:
        TypeError, ValueError, RuntimeError: on arguments :func:`check_batch_norm_args` rejects,
            on a non-invertible activation (:func:`check_inplace_activation`) and on an input
            that cannot be overwritten (:func:`check_overwritable`); ``input`` is unchanged then.

    Examples:
        >>> x = torch.randn(4, 3, 5, 5, requires_grad=True)
        >>> h = x * 2  # a non-leaf: the output of some layer
        >>> out, mean, var = inplace_batch_norm_act_train(h, torch.ones(3), torch.zeros(3))
        >>> out is h
        True
    """
    check_batch_norm_args(input, None, None, weight, bias, True, 0.0, eps)
    name = check_inplace_activation(activation, negative_slope, alpha)
    weight_eps = _finite_number("weight_eps", weight_eps)
    if weight_eps < 0:
        raise ValueError(f"weight_eps: expected a non-negative float, got {weight_eps!r}")
    check_overwritable(input)
    impl = resolve_backend(backend, input.device)
    output, mean, var = InPlaceABNFunction.apply(  # type: ignore[no-untyped-call]
        input, weight, bias, float(eps), weight_eps, name, float(negative_slope), float(alpha),
        impl,
    )  # fmt: skip
    return InPlaceResult(output, mean, var)


class InPlaceBatchNormActBase(BatchNormBase):
    r"""In-place activated batch norm over dim 1 (see the module docstring for the math).

    .. math::

        y = \mathrm{act}\left((|\gamma| + \epsilon_\gamma)\,\frac{x - \mathrm{E}[x]}
        {\sqrt{\mathrm{Var}[x] + \epsilon}} + \beta\right)

    **In training with autograd recording, the input's storage is overwritten with the output**
    (the returned tensor is the input itself): feed it a tensor nothing else reads afterwards,
    typically a convolution's output. A later use of the input sees ``y``, and if another
    operation saved the input for its backward, that backward raises autograd's "modified by
    an inplace operation" error. Inputs that cannot be overwritten (a leaf that requires grad,
    a view, an inference tensor, a tensor neither contiguous nor channels-last) are rejected
    with ValueError before anything changes.

    Everywhere else (``eval()``, ``torch.no_grad()``, neither input nor parameters requiring
    grad, tracers and compilers, ``torch.func`` transforms) the layer computes the same values
    out of place, as :class:`batchnorm.BatchNormAct2d` with the weight ``|γ| + ε_γ`` would
    (ELU in torch operations), and leaves the input alone.

    Statistics, buffers, momentum (``None``: cumulative average), ``freeze_stats``,
    ``nonfinite`` and the ``state_dict`` are those of :class:`BatchNormBase` (a
    ``torch.nn.BatchNorm*`` checkpoint loads as is; its ``γ`` acts as ``|γ| + ε_γ``). With
    ``nonfinite`` other than ``"propagate"`` the finiteness check of an in-place call reads the
    output (the input is gone by then), which is non-finite wherever the input was.

    Not scriptable (``torch.jit.script`` raises): use ``torch.compile`` or ``torch.export``.

    Args:
        num_features: ``C``, the number of channels.
        activation: ``"leaky_relu"`` (default), ``"elu"``, ``"identity"`` or ``None``.
        eps, momentum, affine, track_running_stats, device, dtype: as :class:`BatchNormBase`.
        negative_slope: leaky ReLU's slope for negative inputs, > 0 (keyword only).
            Default: 0.01.
        alpha: ELU's ``α``, > 0 (keyword only). Default: 1.0.
        weight_eps: ``ε_γ``, added to ``|γ|`` (keyword only, ≥ 0). Default: 1e-5.
        bias, backend, freeze_stats, nonfinite: keyword-only options of :class:`BatchNormBase`.

    Raises:
        ValueError: naming the argument, for a non-invertible activation (``"relu"``,
            ``"silu"``, ``"gelu"``, ``negative_slope ≤ 0``, ``alpha ≤ 0``), and as
            :class:`BatchNormBase`.
        TypeError: for a non-finite or non-numeric ``negative_slope``, ``alpha`` or
            ``weight_eps``.

    References:
        S. Rota Bulò, L. Porzi and P. Kontschieder, "In-Place Activated BatchNorm for
        Memory-Optimized Training of DNNs", CVPR 2018.
    """

    _scriptable = False  # overwrites its input inside a Python autograd.Function
    #: The out-of-place layer with the same rank, named in error messages.
    _alternative = "BatchNormAct2d"

    weight_eps: float
    alpha: float

    def __init__(
        self,
        num_features: int,
        activation: str | None = "leaky_relu",
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        negative_slope: float = 0.01,
        alpha: float = 1.0,
        weight_eps: float = 1e-5,
        bias: bool = True,
        backend: str | None = None,
        freeze_stats: bool = False,
        nonfinite: str = "propagate",
    ) -> None:
        name = check_inplace_activation(activation, negative_slope, alpha, self._alternative)
        weight_eps = _finite_number("weight_eps", weight_eps)
        if weight_eps < 0:
            raise ValueError(f"weight_eps: expected a non-negative float, got {weight_eps!r}")
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, backend=backend, freeze_stats=freeze_stats, nonfinite=nonfinite,
        )  # fmt: skip
        self.activation = None if name == "identity" else name
        self.negative_slope = float(negative_slope)
        self.alpha = float(alpha)
        self.weight_eps = weight_eps

    def extra_repr(self) -> str:
        """The batch-norm arguments, then the activation, its parameter and ``ε_γ``."""
        text = f"{super().extra_repr()}, activation={self.activation or 'identity'}"
        if self.activation == "leaky_relu":
            text += f", negative_slope={self.negative_slope}"
        elif self.activation == "elu":
            text += f", alpha={self.alpha}"
        return f"{text}, weight_eps={self.weight_eps}"

    def __prepare_scriptable__(self) -> nn.Module:
        """Called by ``torch.jit.script`` first: always refuses.

        Raises:
            RuntimeError: naming the layer and the alternatives.
        """
        raise RuntimeError(
            f"torch.jit.script: {type(self).__name__} cannot be scripted (it overwrites its "
            "input inside a Python torch.autograd.Function, which TorchScript cannot compile); "
            "use torch.compile or torch.export.export (both run its out-of-place path), "
            "or torch.jit.trace"
        )

    def effective_weight(self) -> torch.Tensor | None:
        """``γ' = |γ| + ε_γ``, the scale the layer applies (differentiable), or ``None``."""
        if self.weight is None:
            return None
        return self.weight.abs() + self.weight_eps  # (C,)

    def _runs_in_place(self, input: torch.Tensor) -> bool:
        """Whether this call takes the in-place path (see the class docstring)."""
        if not self.training or not torch.is_grad_enabled():
            return False
        if _compat.traced(input) or _compat.functorch_active():
            return False
        if input.requires_grad:
            return True
        return any(p is not None and p.requires_grad for p in (self.weight, self.bias))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Returns ``act(γ'·x̂ + β)``; in training with autograd, ``input`` itself, overwritten.

        Args:
            input: tensor of shape ``(N, C, *)`` as the subclass states.

        Returns:
            The output, of the shape, dtype and memory format of ``input``: ``input`` itself
            on the in-place path, a new tensor otherwise.

        Raises:
            TypeError, ValueError, RuntimeError: on a wrong rank, channel count, dtype or
                device, one value per channel in training, or an input the in-place path may
                not overwrite; buffers and input are left unchanged.
        """
        self._check_input_dim(input)
        use_batch_stats = self.training or self.running_mean is None
        updates_stats = self._updates_stats()
        if _compat.is_fx_proxy(input) and updates_stats:
            raise RuntimeError(
                f"{type(self).__name__}: torch.fx.symbolic_trace cannot record the update of "
                "the running statistics; trace it as a leaf module, in eval mode, or use "
                "torch.export.export"
            )
        momentum = self._momentum_for_this_step() if updates_stats else 0.0
        if self._runs_in_place(input):
            result = self._in_place(input, momentum)
        else:
            result = self._out_of_place(input, use_batch_stats, momentum)
        if updates_stats and self._passes_nonfinite_guard(input, None, result):
            self._commit_running_stats(result)
        return result.output

    def _in_place(self, input: torch.Tensor, momentum: float) -> BatchNormOutput:
        """The training call that overwrites ``input``; returns it and the new statistics."""
        check_batch_norm_args(
            input, self.running_mean, self.running_var, self.weight, self.bias, True,
            momentum, self.eps,
        )  # fmt: skip
        check_overwritable(input, self._alternative)
        impl = resolve_backend(self.backend, input.device)
        output, mean, var = InPlaceABNFunction.apply(  # type: ignore[no-untyped-call]
            input, self.weight, self.bias, self.eps, self.weight_eps,
            self.activation or "identity", self.negative_slope, self.alpha, impl,
        )  # fmt: skip
        count = input.numel() // input.shape[1]  # M = N·L
        new_mean, new_var = self.running_mean, self.running_var
        if count > 0:  # an empty batch leaves the statistics as they are (as PyTorch)
            if new_mean is not None:
                new_mean = running_update(new_mean, mean, momentum)  # (C,)
            if new_var is not None:
                unbiased = var * (count / (count - 1))  # (C,)  Bessel's correction
                new_var = running_update(new_var, unbiased, momentum)  # (C,)
        return BatchNormOutput(output, new_mean, new_var)

    def _out_of_place(
        self, input: torch.Tensor, use_batch_stats: bool, momentum: float
    ) -> BatchNormOutput:
        """``act(bn(x; γ', β))`` as a new tensor (evaluation, no grad, tracers, transforms)."""
        if _compat.is_fx_proxy(input):
            return self._recorded(input, use_batch_stats)
        gamma = self.effective_weight()  # (C,)  γ'
        leaky = self.activation == "leaky_relu"
        result = batch_norm_pure(
            input, self.running_mean, self.running_var, gamma, self.bias, use_batch_stats,
            momentum, self.eps, backend=self.backend,
            activation="leaky_relu" if leaky else None, negative_slope=self.negative_slope,
        )  # fmt: skip
        if self.activation == "elu":
            return result._replace(output=F.elu(result.output, self.alpha))
        return result

    def _recorded(self, input: torch.Tensor, use_batch_stats: bool) -> BatchNormOutput:
        """:meth:`_out_of_place` for ``torch.fx.symbolic_trace``: ATen's op on proxies.

        ``γ'`` is computed from a ``get_attr`` proxy of ``weight`` (else FX would bake its
        value into the graph as a constant); training here never updates the buffers (the
        caller refuses a trace that would).
        """
        gamma = None
        if self.weight is not None:
            weight = _compat.fx_attribute(input, self, "weight")  # recorded, not a constant
            gamma = weight.abs() + self.weight_eps  # (C,)  γ'
        running_mean = None if use_batch_stats else self.running_mean
        running_var = None if use_batch_stats else self.running_var
        y = F.batch_norm(
            input, running_mean, running_var, gamma, self.bias, use_batch_stats, 0.0, self.eps
        )  # (N, C, *)
        if self.activation == "leaky_relu":
            y = F.leaky_relu(y, self.negative_slope)
        elif self.activation == "elu":
            y = F.elu(y, self.alpha)
        return BatchNormOutput(y, self.running_mean, self.running_var)


class InPlaceBatchNormAct1d(InPlaceBatchNormActBase, nn.BatchNorm1d):  # type: ignore[misc]
    """In-place activated batch norm of ``(N, C)`` or ``(N, C, L)`` input.

    See :class:`InPlaceBatchNormActBase`.

    Examples:
        >>> bn = InPlaceBatchNormAct1d(100)
        >>> bn(torch.randn(20, 100, requires_grad=True) * 1).shape
        torch.Size([20, 100])
    """

    _allowed_dims = (2, 3)
    _shape_text = "(N, C) or (N, C, L)"
    _alternative = "BatchNormAct1d"


class InPlaceBatchNormAct2d(InPlaceBatchNormActBase, nn.BatchNorm2d):  # type: ignore[misc]
    """In-place activated batch norm of ``(N, C, H, W)`` input.

    See :class:`InPlaceBatchNormActBase`.

    Examples:
        >>> conv, bn = torch.nn.Conv2d(3, 16, 3), InPlaceBatchNormAct2d(16)
        >>> h = conv(torch.randn(4, 3, 8, 8))
        >>> bn(h) is h  # the convolution's output now holds the result
        True
    """

    _allowed_dims = (4,)
    _shape_text = "(N, C, H, W)"
    _alternative = "BatchNormAct2d"


class InPlaceBatchNormAct3d(InPlaceBatchNormActBase, nn.BatchNorm3d):  # type: ignore[misc]
    """In-place activated batch norm of ``(N, C, D, H, W)`` input.

    See :class:`InPlaceBatchNormActBase`.

    Examples:
        >>> bn = InPlaceBatchNormAct3d(8, activation="elu")
        >>> bn(torch.randn(2, 8, 4, 4, 4, requires_grad=True) * 1).shape
        torch.Size([2, 8, 4, 4, 4])
    """

    _allowed_dims = (5,)
    _shape_text = "(N, C, D, H, W)"
    _alternative = "BatchNormAct3d"
