"""``BatchNorm1d/2d/3d``: drop-in replacements for ``torch.nn.BatchNorm*`` on our backends.

The modules hold the policy (when buffers update, the momentum schedule, train/eval), the
functional (:mod:`batchnorm.functional`) holds the math. Parameter and buffer names, dtypes and
the ``state_dict`` layout are those of ``torch.nn.BatchNorm*``, so checkpoints load both ways.

Why this file is long: the whole module family, policy in one class (BatchNormBase) and its
TorchScript twin, as ``torch/nn/modules/batchnorm.py`` keeps torch's.
"""

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from batchnorm import _compat
from batchnorm._math import activate
from batchnorm.backends import resolve_backend
from batchnorm.functional import (
    BatchNormOutput,
    batch_norm,
    batch_norm_pure,
    check_fusion_args,
)

__all__ = [
    "NONFINITE_POLICIES",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchNormActBase",
    "BatchNormBase",
    "NonFiniteBatchWarning",
]

#: What a module does with a batch whose input or statistics hold NaN or ±Inf (``nonfinite=``).
NONFINITE_POLICIES = ("propagate", "skip", "raise")


class NonFiniteBatchWarning(UserWarning):
    """A batch-norm layer skipped a batch with NaN/Inf (``nonfinite="skip"``), once per layer."""


class BatchNormBase(nn.Module):
    r"""Batch normalization over dim 1 (the channels) of an ``(N, C, *)`` input.

    ``BatchNorm1d/2d/3d`` (and the fused layers) are also subclasses of ``torch.nn.BatchNorm1d/
    2d/3d``, so every library that finds batch norms with ``isinstance(m, _BatchNorm)`` treats
    them as such (``update_bn``, ``convert_sync_batchnorm``, weight-decay grouping, FSDP mixed
    precision, ``fuse_modules``); this base class holds the behaviour shared with the variants
    that are *not* torch batch norms (frozen, recurrent).

    Traced calls (``torch.compile``, ``torch.export``, ``torch.fx.symbolic_trace``,
    ``torch.jit.trace``, fake tensors, dispatch modes) run ATen's ``batch_norm`` op, which every
    tracer understands, instead of our CPU kernels; ``torch.jit.script`` compiles a TorchScript
    twin of the same math (``backend`` is then ignored).

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    In training the mean and the **biased** variance of the batch are used, and (with
    ``track_running_stats``) ``running_mean`` / ``running_var`` move towards the batch mean and
    the **unbiased** variance: ``running ← (1 − momentum)·running + momentum·batch``; with
    ``momentum=None`` the factor is ``1 / num_batches_tracked`` (cumulative average). In
    evaluation the running estimates are used, unless ``track_running_stats=False``, in which
    case batch statistics are used in both modes.

    Variance note: normalization uses the biased estimator (divide by ``M = N·L``), the running
    estimate the unbiased one (divide by ``M − 1``), exactly as ``torch.nn.BatchNorm*``.

    Every input is checked before any buffer changes: a rejected call leaves ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` bit-identical.

    Args:
        num_features: ``C``, the number of channels.
        eps: added to the variance inside the square root. Default: 1e-5.
        momentum: running-average factor, or ``None`` for a cumulative average. Default: 0.1.
        affine: learnable ``weight`` (γ, init 1) and ``bias`` (β, init 0). Default: True.
        track_running_stats: keep ``running_mean``, ``running_var`` and
            ``num_batches_tracked`` buffers. Default: True.
        device: device of parameters and buffers.
        dtype: dtype of parameters and running buffers.
        bias: with ``affine``, also learn ``bias`` (keyword only, as in PyTorch). Default: True.
        backend: backend name for the training pass (keyword only); ``None`` reads
            ``BATCHNORM_BACKEND``, then ``auto``.
        freeze_stats: never update the running statistics (keyword only; also an attribute
            to switch at any time), whatever ``train()``/``eval()`` say: training still
            normalizes with batch statistics, but ``running_mean``, ``running_var`` and
            ``num_batches_tracked`` stay as they are. Default: False.
        nonfinite: what a call that would update the running statistics does when the input
            (its real positions, with ``mask``) or the new statistics hold NaN or ±Inf
            (keyword only; also an attribute). ``"propagate"`` (default, PyTorch's behaviour
            and free of cost): update anyway, the buffers become non-finite. ``"skip"``: leave
            the buffers (and ``num_batches_tracked``) bit-identical and warn once per layer
            with :class:`NonFiniteBatchWarning`; the output is returned as computed.
            ``"raise"``: raise RuntimeError naming the layer, buffers unchanged. The check
            costs one pass over the input and a device synchronization per training call.

    Raises:
        TypeError, ValueError: on constructor arguments of the wrong type or range.

    Shape:
        - Input: ``(N, C, *)`` as the subclass states.
        - Output: same shape, dtype and memory format as the input.

    References:
        S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating Deep Network Training by
        Reducing Internal Covariate Shift", ICML 2015.
    """

    _version = 2
    #: Whether the base class's statistics path is used unchanged (set per class on creation:
    #: a subclass overriding ``_normalize``, ``_batch_norm_pure`` or ``_commit_running_stats``
    #: is always called through them, never through the in-place shortcut).
    _commits_in_place: bool = True
    #: Whether ``torch.jit.script`` can compile this class's math (see ``_scripted``).
    _scriptable: bool = True
    #: The layer's dotted name in its model, for messages (``None``: unknown; see
    #: :meth:`_layer_name` and :func:`batchnorm.tools.name_layers`).
    layer_name: str | None = None
    #: Input ranks the subclass accepts, and how it names them in errors.
    _allowed_dims: tuple[int, ...] = ()
    _shape_text: str = "(N, C, *)"
    #: Fused activation of ``act(bn(x) + z)``; ``None`` for plain batch norm (see BatchNormAct*).
    activation: str | None = None
    negative_slope: float = 0.01

    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    freeze_stats: bool
    # Parameters and buffers are annotated where they are registered (in __init__), not here:
    # TorchScript would take class-level annotations for plain attributes, not buffers.

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
        bias: bool = True,
        backend: str | None = None,
        freeze_stats: bool = False,
        nonfinite: str = "propagate",
    ) -> None:
        # nn.Module's initializer, not the next class's in the MRO: for BatchNorm2d that is
        # torch.nn.BatchNorm2d's, whose work (the same attributes, parameters and buffers) is
        # done here with our checks and options.
        nn.Module.__init__(self)
        if not isinstance(freeze_stats, bool):
            raise TypeError(f"freeze_stats: expected a bool, got {freeze_stats!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite: expected one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self.freeze_stats = freeze_stats
        self.nonfinite = nonfinite
        self._warned_nonfinite = False
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features: expected a positive int, got {num_features!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"eps: expected a non-negative float, got {eps!r}")
        if momentum is not None and (
            isinstance(momentum, bool) or not isinstance(momentum, (int, float))
        ):
            raise TypeError(f"momentum: expected a float or None, got {momentum!r}")
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if backend not in (None, "auto"):
            # Import a named backend now: torch.compile cannot trace a first-time import.
            resolve_backend(backend, torch.device("meta"))
        self.backend = backend
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.weight: torch.Tensor | None
        self.bias: torch.Tensor | None
        self.running_mean: torch.Tensor | None
        self.running_var: torch.Tensor | None
        self.num_batches_tracked: torch.Tensor | None
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            shift = nn.Parameter(torch.empty(num_features, **factory)) if bias else None
            self.register_parameter("bias", shift)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Sets ``running_mean`` to 0, ``running_var`` to 1 and ``num_batches_tracked`` to 0."""
        if self.running_mean is not None:
            self.running_mean.zero_()
        if self.running_var is not None:
            self.running_var.fill_(1)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Resets the running statistics, ``weight`` to 1 and ``bias`` to 0."""
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        """The constructor arguments, formatted as ``torch.nn.BatchNorm*`` does."""
        text = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )
        if self.freeze_stats:
            text += ", freeze_stats=True"
        if self.nonfinite != "propagate":
            text += f", nonfinite={self.nonfinite!r}"
        return text

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Records whether the subclass keeps the base class's statistics path."""
        super().__init_subclass__(**kwargs)
        cls._commits_in_place = (
            cls._normalize is BatchNormBase._normalize
            and cls._batch_norm_pure is BatchNormBase._batch_norm_pure
            and cls._commit_running_stats is BatchNormBase._commit_running_stats
        )

    def __prepare_scriptable__(self) -> nn.Module:
        """Called by ``torch.jit.script`` first: refuses what TorchScript cannot express.

        Returns:
            This module (its ``forward`` has a TorchScript branch, see ``_scripted``).

        Raises:
            RuntimeError: naming the layer and the alternatives, for a class whose math has no
                TorchScript twin or a ``nonfinite`` policy other than ``"propagate"``.
        """
        reason = None
        if not self._scriptable:
            reason = "its normalization has no TorchScript form"
        elif self.nonfinite != "propagate":
            reason = f"nonfinite={self.nonfinite!r} needs a host-side check per call"
        if reason is not None:
            raise RuntimeError(
                f"torch.jit.script: {type(self).__name__} cannot be scripted ({reason}); "
                "use torch.jit.trace, torch.export.export or torch.compile instead"
            )
        return self

    def _check_input_dim(self, input: torch.Tensor) -> None:
        """Rejects an input of the wrong rank or channel count for this module."""
        if _compat.call_kind(input) != _compat.SYMBOLIC:
            self._check_dims(input)
        # else a recording: our checks would be baked in; the graph runs ATen's checks

    def _check_dims(self, input: torch.Tensor) -> None:
        """:meth:`_check_input_dim` of an input that is not a symbolic recording."""
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input: expected a torch.Tensor, got {type(input).__name__}")
        name = type(self).__name__
        if self._allowed_dims and input.dim() not in self._allowed_dims:
            ranks = " or ".join(f"{d}D" for d in self._allowed_dims)
            raise ValueError(
                f"{name}: expected {ranks} input {self._shape_text}, "
                f"got {input.dim()}D input of shape {tuple(input.shape)}"
            )
        if input.dim() < 2 or input.shape[1] != self.num_features:
            got = input.shape[1] if input.dim() >= 2 else "none"
            raise ValueError(
                f"{name}: expected input with {self.num_features} channels (dim 1, "
                f"num_features), got {got} in input of shape {tuple(input.shape)}"
            )

    def _momentum_for_this_step(self) -> float:
        """The running-average factor of the coming training step (before counting it)."""
        if self.momentum is not None:
            return float(self.momentum)
        tracked = 0 if self.num_batches_tracked is None else int(self.num_batches_tracked)
        return 1.0 / (tracked + 1)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalizes ``input``; see the class docstring for the mode rules.

        Args:
            input: tensor of shape ``(N, C, *)`` as the subclass states.

        Returns:
            A tensor of the shape, dtype and memory format of ``input``.

        Raises:
            TypeError, ValueError, RuntimeError: on a wrong rank, channel count, dtype or
                device, or one value per channel in training; buffers are left unchanged.
        """
        if _compat.is_scripting():
            return self._scripted(input)
        return self._forward(input, None)

    def _scripted(self, input: torch.Tensor) -> torch.Tensor:
        """The TorchScript form of :meth:`forward` (what ``torch.jit.script`` compiles)."""
        return self._scripted_batch_norm(input)

    def _scripted_batch_norm(self, input: torch.Tensor) -> torch.Tensor:
        """``torch.nn.BatchNorm*``'s forward with ``freeze_stats``, in TorchScript's subset."""
        momentum = 0.0
        updates_stats = self.training and self.track_running_stats and not self.freeze_stats
        counter = self.num_batches_tracked
        if updates_stats and counter is not None:
            counter.add_(1)
            momentum = 1.0 / float(counter) if self.momentum is None else self.momentum
        use_batch_stats = self.training or self.running_mean is None
        uses_buffers = not self.training or updates_stats  # frozen training: batch stats only
        return F.batch_norm(
            input,
            self.running_mean if uses_buffers else None,
            self.running_var if uses_buffers else None,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
        )

    def _forward(
        self,
        input: torch.Tensor,
        mask: torch.Tensor | None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The policy of :meth:`forward`.

        Args:
            input: the input, ``(N, C, *)``.
            mask: ``(N, *)``, True = real value, or ``None`` for all values.
            residual: ``z`` of ``act(bn(x) + z)`` (fused modules), or ``None``.
        """
        kind = _compat.call_kind(input)  # asked once for this call (see _check_input_dim)
        if kind != _compat.SYMBOLIC:
            self._check_dims(input)
        # Buffers are None without track_running_stats; then batch statistics serve both modes.
        use_batch_stats = self.training or self.running_mean is None
        updates_stats = self._updates_stats()
        symbolic = kind == _compat.SYMBOLIC and _compat.is_fx_proxy(input)
        counter = self.num_batches_tracked
        if symbolic and counter is not None:
            # A proxy of the buffer, recorded in the graph (so that the traced module keeps it
            # in its state_dict, as it keeps the other buffers), used below in training.
            counter = _compat.fx_attribute(input, self, "num_batches_tracked")
        if symbolic and updates_stats and self.momentum is None:
            raise RuntimeError(
                f"{type(self).__name__}: momentum=None (a cumulative average over "
                "num_batches_tracked) cannot be traced by torch.fx.symbolic_trace; "
                "give a float momentum, or use torch.export.export"
            )
        momentum = self._momentum_for_this_step() if updates_stats else 0.0
        if (
            mask is None
            and (residual is None or kind != _compat.EAGER)
            and self.nonfinite == "propagate"
            and self._commits_in_place
        ):
            # Nothing to check before committing: the in-place functional lets the kernel move
            # the buffers (after every argument is checked), as torch.nn.BatchNorm does. The
            # buffers are handed over where this call reads or moves them: evaluation, and
            # training that updates them (not frozen training, which normalizes with the batch).
            uses_buffers = not self.training or updates_stats
            output = batch_norm(
                input, self.running_mean if uses_buffers else None,
                self.running_var if uses_buffers else None, self.weight, self.bias,
                use_batch_stats, momentum, self.eps, backend=self.backend,
                activation=self.activation, residual=residual, negative_slope=self.negative_slope,
            )  # fmt: skip
            if updates_stats and counter is not None:  # under FX, recorded in the graph
                counter.add_(1)
            return output
        if symbolic and updates_stats:
            raise RuntimeError(
                f"{type(self).__name__}: torch.fx.symbolic_trace cannot record this layer's "
                "update of the running statistics (a variant, a mask or a nonfinite policy); "
                "trace it as a leaf module, in eval mode, or use torch.export.export"
            )
        if mask is not None:
            result = self._normalize_masked(input, mask, use_batch_stats, momentum)
        elif residual is not None:
            result = self._normalize_residual(input, residual, use_batch_stats, momentum)
        else:
            result = self._normalize(input, use_batch_stats, momentum)
        if updates_stats and self._passes_nonfinite_guard(input, mask, result):
            self._commit_running_stats(result)
        return result.output

    def _updates_stats(self) -> bool:
        """Whether a call now would update the running statistics (training, tracked, unfrozen)."""
        return self.training and self.track_running_stats and not self.freeze_stats

    def _passes_nonfinite_guard(
        self, input: torch.Tensor, mask: torch.Tensor | None, result: BatchNormOutput
    ) -> bool:
        """Applies the ``nonfinite`` policy; returns whether the statistics may be committed.

        Args:
            input: the input of this call, ``(N, C, *)``.
            mask: ``(N, *)`` real positions of ``input``, or ``None`` for all.
            result: what :meth:`_normalize` returned, holding the new running statistics.

        Returns:
            ``True`` to commit: always with ``"propagate"``, else only if every real input
            value and every new statistic is finite.

        Raises:
            RuntimeError: with ``nonfinite="raise"`` and a non-finite value, naming the layer.
        """
        if self.nonfinite == "propagate":
            return True
        with torch.no_grad():
            values = input if mask is None else input.movedim(1, -1)[mask]  # real values
            finite = bool(torch.isfinite(values).all())
            for stat in (result.running_mean, result.running_var):
                finite = finite and (stat is None or bool(torch.isfinite(stat).all()))
        if finite:
            return True
        if self.nonfinite == "raise":
            raise RuntimeError(
                f"{self._layer_name()}: NaN or Inf in the input or the batch statistics "
                "(nonfinite='raise'); running statistics left unchanged"
            )
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"{self._layer_name()}: skipped a batch with NaN or Inf in the input or the "
                "batch statistics (nonfinite='skip'); running statistics left unchanged. "
                "Further skips of this layer are silent.",
                NonFiniteBatchWarning,
                stacklevel=4,
            )
        return False

    def _layer_name(self) -> str:
        """How errors and warnings name this layer: ``'layer1.0.bn2 (BatchNorm2d)'`` or its repr.

        The dotted name is :attr:`layer_name`, stored by :func:`batchnorm.tools.name_layers`
        (and by :func:`batchnorm.tools.convert`, and by loading a ``state_dict``, whose keys
        carry it); a layer that was never told its name is named by its ``repr``.
        """
        if self.layer_name is None:
            return repr(self)
        return f"{self.layer_name} ({type(self).__name__})"

    def _normalize(
        self, input: torch.Tensor, use_batch_stats: bool, momentum: float
    ) -> BatchNormOutput:
        """Computes the output and the new running statistics without changing anything.

        The one place subclasses (synchronized, ghost, renormalized batch norm) override: the
        base class checks the input before and commits the statistics after.

        Args:
            input: the checked input, ``(N, C, *)``.
            use_batch_stats: normalize with batch statistics (else with the running ones).
            momentum: running-average factor of this step.

        Returns:
            A :class:`BatchNormOutput`; its statistics are committed only if training.
        """
        return self._batch_norm_pure(input, use_batch_stats, momentum)

    def _normalize_residual(
        self, input: torch.Tensor, residual: torch.Tensor, use_batch_stats: bool, momentum: float
    ) -> BatchNormOutput:
        """:meth:`_normalize` with ``+ residual`` before the activation: ``act(bn(x) + z)``."""
        return self._batch_norm_pure(input, use_batch_stats, momentum, residual=residual)

    def _normalize_masked(
        self, input: torch.Tensor, mask: torch.Tensor, use_batch_stats: bool, momentum: float
    ) -> BatchNormOutput:
        """:meth:`_normalize` over the real positions ``mask`` (``(N, *)``) of a padded batch."""
        return self._batch_norm_pure(input, use_batch_stats, momentum, mask=mask)

    def _batch_norm_pure(
        self,
        input: torch.Tensor,
        use_batch_stats: bool,
        momentum: float,
        *,
        residual: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> BatchNormOutput:
        """:func:`batch_norm_pure` with this module's tensors and settings."""
        return batch_norm_pure(  # checks every argument; pure, so nothing changes on error
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
            backend=self.backend,
            mask=mask,
            activation=self.activation,
            residual=residual,
            negative_slope=self.negative_slope,
        )

    def _commit_running_stats(self, result: BatchNormOutput) -> None:
        """Copies the new running statistics into the buffers and counts the batch."""
        with torch.no_grad():
            if self.running_mean is not None and result.running_mean is not None:
                self.running_mean.copy_(result.running_mean)
            if self.running_var is not None and result.running_var is not None:
                self.running_var.copy_(result.running_var)
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Loads like ``torch.nn.BatchNorm*``; a missing ``num_batches_tracked`` is kept as is.

        As PyTorch does for checkpoints older than version 2 (which lack the counter), the
        module keeps its current counter; unlike PyTorch, this holds for any checkpoint that
        lacks the key, so a checkpoint with the counter removed still loads with ``strict=True``.
        The keys' ``prefix`` is the layer's dotted name in the model, stored as
        :attr:`layer_name` for messages.
        """
        key = prefix + "num_batches_tracked"
        if self.track_running_stats and key not in state_dict:
            counter = self.num_batches_tracked
            keep = counter is not None and counter.device.type != "meta"
            state_dict[key] = counter if keep else torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if prefix:
            self.layer_name = prefix.removesuffix(".")


class BatchNorm1d(BatchNormBase, nn.BatchNorm1d):  # type: ignore[misc]
    """Batch normalization of ``(N, C)`` or ``(N, C, L)`` input (see :class:`BatchNormBase`).

    Examples:
        >>> bn = BatchNorm1d(100)
        >>> bn(torch.randn(20, 100)).shape
        torch.Size([20, 100])
    """

    _allowed_dims = (2, 3)
    _shape_text = "(N, C) or (N, C, L)"

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalizes ``input``; with ``mask``, over the real positions of a padded batch.

        Args:
            input: tensor of shape ``(N, C)`` or ``(N, C, L)``.
            mask: optional ``torch.bool`` tensor ``(N,)`` or ``(N, L)``, ``True`` = real value:
                statistics over real values only, padded outputs and gradients 0 (see
                :mod:`batchnorm.variants.masked`).

        Returns:
            A tensor of the shape, dtype and memory format of ``input``.

        Raises:
            TypeError, ValueError, RuntimeError: as :meth:`BatchNormBase.forward`, or on a
                mask of the wrong dtype, shape or device; buffers are left unchanged.
        """
        if _compat.is_scripting():
            if mask is not None:
                raise RuntimeError("BatchNorm1d: mask is not supported under torch.jit.script")
            return self._scripted(input)
        return self._forward(input, mask)


class BatchNorm2d(BatchNormBase, nn.BatchNorm2d):  # type: ignore[misc]
    """Batch normalization of ``(N, C, H, W)`` input (see :class:`BatchNormBase`).

    Examples:
        >>> bn = BatchNorm2d(16)
        >>> bn(torch.randn(4, 16, 8, 8)).shape
        torch.Size([4, 16, 8, 8])
    """

    _allowed_dims = (4,)
    _shape_text = "(N, C, H, W)"


class BatchNorm3d(BatchNormBase, nn.BatchNorm3d):  # type: ignore[misc]
    """Batch normalization of ``(N, C, D, H, W)`` input (see :class:`BatchNormBase`).

    Examples:
        >>> bn = BatchNorm3d(8)
        >>> bn(torch.randn(2, 8, 4, 4, 4)).shape
        torch.Size([2, 8, 4, 4, 4])
    """

    _allowed_dims = (5,)
    _shape_text = "(N, C, D, H, W)"


class BatchNormActBase(BatchNormBase):
    r"""Batch normalization fused with a residual add and an activation: ``act(bn(x) + z)``.

    .. math::

        y = \mathrm{act}\left(\gamma \cdot \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] +
        \epsilon}} + \beta + z\right)

    Same parameters, buffers, ``state_dict`` and statistics policy as :class:`BatchNormBase`
    (a checkpoint of ``torch.nn.BatchNorm*`` loads as is); the activation and the residual ``z``
    are applied in the same pass (one kernel pass on the Triton backend, one autograd node
    elsewhere), and backward returns ``dz`` too. Evaluation mode fuses them as well.

    Args:
        num_features: ``C``, the number of channels.
        activation: ``"relu"`` (default), ``"leaky_relu"``, ``"silu"``, ``"gelu"`` (exact) or
            ``None`` (residual add only).
        eps, momentum, affine, track_running_stats, device, dtype, bias, backend: as in
            :class:`BatchNormBase`.
        negative_slope: slope of ``leaky_relu`` for negative inputs (keyword only).

    Raises:
        ValueError: on an unknown activation, and as :class:`BatchNormBase`.
        TypeError: on a non-finite or non-numeric ``negative_slope``.

    References:
        K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition",
        CVPR 2016 (the ``relu(bn(conv(x)) + shortcut)`` block this fuses).
    """

    def __init__(
        self,
        num_features: int,
        activation: str | None = "relu",
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        backend: str | None = None,
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, backend=backend,
        )  # fmt: skip
        probe = torch.empty(1, num_features, device="meta")
        check_fusion_args(probe, activation, None, negative_slope)  # raises on bad arguments
        self.activation = activation
        self.negative_slope = float(negative_slope)

    def extra_repr(self) -> str:
        """The batch-norm arguments, then the activation (and its slope for leaky ReLU)."""
        text = f"{super().extra_repr()}, activation={self.activation}"
        if self.activation == "leaky_relu":
            text += f", negative_slope={self.negative_slope}"
        return text

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Returns ``act(bn(input) + residual)``; the mode rules are those of the base class.

        Args:
            input: tensor of shape ``(N, C, *)`` as the subclass states.
            residual: tensor of the shape and dtype of ``input``, or ``None``.

        Returns:
            A tensor of the shape, dtype and memory format of ``input``.

        Raises:
            TypeError, ValueError, RuntimeError: on a bad input or residual; buffers unchanged.
        """
        if _compat.is_scripting():
            y = self._scripted(input)
            if residual is not None:
                y = y + residual
            return activate(y, self.activation, self.negative_slope)
        return self._forward(input, None, residual)


class BatchNormAct1d(BatchNormActBase, nn.BatchNorm1d):  # type: ignore[misc]
    """``act(bn(x) + z)`` for ``(N, C)`` or ``(N, C, L)`` input (see :class:`BatchNormActBase`).

    Examples:
        >>> bn = BatchNormAct1d(100, activation="silu")
        >>> bn(torch.randn(20, 100)).shape
        torch.Size([20, 100])
    """

    _allowed_dims = (2, 3)
    _shape_text = "(N, C) or (N, C, L)"


class BatchNormAct2d(BatchNormActBase, nn.BatchNorm2d):  # type: ignore[misc]
    """``act(bn(x) + z)`` for ``(N, C, H, W)`` input (see :class:`BatchNormActBase`).

    Examples:
        >>> bn = BatchNormAct2d(16)
        >>> x = torch.randn(4, 16, 8, 8)
        >>> bn(x, residual=torch.randn_like(x)).shape
        torch.Size([4, 16, 8, 8])
    """

    _allowed_dims = (4,)
    _shape_text = "(N, C, H, W)"


class BatchNormAct3d(BatchNormActBase, nn.BatchNorm3d):  # type: ignore[misc]
    """``act(bn(x) + z)`` for ``(N, C, D, H, W)`` input (see :class:`BatchNormActBase`).

    Examples:
        >>> bn = BatchNormAct3d(8, activation="gelu")
        >>> bn(torch.randn(2, 8, 4, 4, 4)).shape
        torch.Size([2, 8, 4, 4, 4])
    """

    _allowed_dims = (5,)
    _shape_text = "(N, C, D, H, W)"


#: ``torch.ao.quantization.fuse_modules`` finds its fusers by the exact types of the modules, so
#: ours are registered beside torch's (the fused layers are not: fusing would drop the activation).
_compat.register_fusers(
    {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
)
