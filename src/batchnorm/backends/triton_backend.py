"""Triton backend: the kernels of :mod:`batchnorm.kernels` as ``torch.library`` custom ops.

Three ops in the ``batchnorm`` namespace, each with a fake (meta) implementation, so
``torch.compile(fullgraph=True)`` traces through them without graph breaks:

* ``batchnorm::triton_train`` — training forward ``y = act(γ·x̂ + β + z)`` with the batch
  statistics, the new running statistics (computed in the merge kernel, out of place) and, for
  (leaky) ReLU with a residual, a uint8 ``u > 0`` mask; its backward is registered with
  :func:`torch.library.register_autograd` and calls
* ``batchnorm::triton_train_backward`` — ``(dx, dγ, dβ, dz)`` in one reduction + one
  elementwise pass;
* ``batchnorm::triton_inference`` — evaluation forward from the running statistics.

The ops are opaque to Inductor (``torch.library.custom_op``), which keeps one code path for
eager, compiled and interpreted runs (``torch.library.triton_op`` would expose the kernels to
Inductor but cannot run them in the interpreter on CPU tensors).

Arrangements (``BATCHNORM_TRITON_ARRANGEMENT``): ``split`` (default) launches reduction, merge and
elementwise pass separately; ``persistent`` runs each direction as one launch with a barrier per
channel block, its grid sized from the compiled kernel's occupancy (falling back to ``split`` when
the channel blocks do not all fit at once). Under ``TRITON_INTERPRET=1`` programs run one after
another, so ``persistent`` is only used with a single program (whole problem in one program),
which exercises the same device functions without a barrier that could deadlock.

Inputs: float16, bfloat16, float32 (statistics, γ, β and reductions in float32); any strides of
the ``(N, C, L)`` view, including channels_last, without copying. Float64 input is computed by
the pure-torch backend (Triton's fp64 path has no use here).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from batchnorm import _compat
from batchnorm._math import activation_derivative, new_running_stats
from batchnorm.backends.base import (
    Backend,
    BatchNormOutput,
    Call,
    ForwardResult,
    FusedForwardResult,
    channel_view,
)
from batchnorm.backends.torch_backend import TorchBackend
from batchnorm.kernels.triton import batchnorm_bwd, batchnorm_fwd, inference
from batchnorm.kernels.triton.common import (
    ACTIVATIONS,
    TileConfig,
    cdiv,
    interpreting,
    next_power_of_2,
    tile_config,
)

__all__ = ["ARRANGEMENT_ENV_VAR", "TritonBackend", "inference_op", "train_backward_op", "train_op"]

ARRANGEMENT_ENV_VAR = "BATCHNORM_TRITON_ARRANGEMENT"
_ARRANGEMENTS = ("split", "persistent")
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _arrangement() -> str:
    """The arrangement chosen by ``BATCHNORM_TRITON_ARRANGEMENT`` (``split`` when unset)."""
    name = os.environ.get(ARRANGEMENT_ENV_VAR, "split") or "split"
    if name not in _ARRANGEMENTS:
        raise ValueError(
            f"{ARRANGEMENT_ENV_VAR}: expected one of {', '.join(_ARRANGEMENTS)}, got {name!r}"
        )
    return name


def _target_programs(device: torch.device) -> int:
    """Programs a launch aims for: 4 per SM on a GPU, 4 in all in the interpreter."""
    if device.type != "cuda" or interpreting():
        return 4
    index = torch.cuda.current_device() if device.index is None else device.index
    return 4 * _multiprocessors(index)


@functools.cache
def _multiprocessors(index: int) -> int:
    """SMs of CUDA device ``index``, asked once per device."""
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def _config(x3: torch.Tensor) -> TileConfig:
    """The tile configuration of the split arrangement for the ``(N, C, L)`` view ``x3``."""
    n, c, length = x3.shape
    channels_contiguous = x3.stride(1) == 1 and c > 1
    return tile_config(n * length, c, channels_contiguous, _target_programs(x3.device))


def _resident_programs(compiled: Any, device: torch.device) -> int:
    """How many programs of a compiled kernel the whole GPU holds at once (occupancy × SMs).

    Limited by registers, threads and shared memory per SM, as the CUDA occupancy calculator
    does (registers are allocated per warp in units of 256).
    """
    compiled._init_handles()  # loads the binary; fills n_regs
    props = torch.cuda.get_device_properties(device)
    num_warps = compiled.metadata.num_warps
    threads = num_warps * 32
    regs_per_warp = -(-max(compiled.n_regs, 1) * 32 // 256) * 256  # rounded up to 256
    regs_per_sm = getattr(props, "regs_per_multiprocessor", 65536)
    by_registers = regs_per_sm // (regs_per_warp * num_warps)
    by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // threads
    shared = compiled.metadata.shared
    shared_per_sm = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    by_shared = shared_per_sm // shared if shared else by_threads
    per_sm = max(0, min(by_registers, by_threads, by_shared))
    return int(per_sm * props.multi_processor_count)


def _persistent_config(
    x3: torch.Tensor, compile_kernel: Any, split: TileConfig
) -> TileConfig | None:
    """The persistent grid for ``x3``, or ``None`` when its channel blocks cannot all be resident.

    On a GPU the kernel is compiled for the split tiles (``compile_kernel(config)``), and the
    rows are then spread over at most as many programs as the GPU holds at once. In the
    interpreter (sequential programs) the grid is a single program over the whole problem.
    """
    n, c, length = x3.shape
    channels_contiguous = x3.stride(1) == 1 and c > 1
    if interpreting() or x3.device.type != "cuda":
        return tile_config(n * length, c, channels_contiguous, 1, block_c=next_power_of_2(c))
    capacity = _resident_programs(compile_kernel(split), x3.device)
    config = tile_config(
        n * length, c, channels_contiguous, capacity, block_m=split.block_m, block_c=split.block_c
    )
    programs = config.channel_blocks * config.row_programs
    # The final grid compiles its own variant (BLOCK_P follows P): check its occupancy too.
    if programs > capacity or programs > _resident_programs(compile_kernel(config), x3.device):
        return None
    return config


def _strides(t: torch.Tensor | None) -> tuple[int, int, int]:
    """Strides of an ``(N, C, L)`` tensor, or zeros for an absent one."""
    if t is None or t.dim() != 3:
        return (0, 0, 0)
    stride_n, stride_c, stride_l = t.stride()
    return (stride_n, stride_c, stride_l)


def _check_device(x3: torch.Tensor) -> None:
    """Rejects tensors the kernels cannot reach: CPU tensors need the interpreter."""
    if x3.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"triton backend: expected a CUDA tensor, got one on {x3.device}; CPU tensors run "
            "only in Triton's interpreter (set TRITON_INTERPRET=1 before importing batchnorm)"
        )


def _uses_mask(activation: str, has_residual: bool) -> bool:
    """(Leaky) ReLU with a residual saves the ``u > 0`` mask instead of re-reading ``z``."""
    return has_residual and activation in ("relu", "leaky_relu")


def _placeholder(x3: torch.Tensor) -> torch.Tensor:
    """A 0-element float32 tensor standing for an absent output."""
    return x3.new_empty((0,), dtype=torch.float32)


def _activation_code(activation: str) -> int:
    """The kernels' ``ACTIVATION`` constexpr for an op-level activation name."""
    return int(ACTIVATIONS[None if activation == "none" else activation])


def _train_forward(
    x3: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
    activation: str,
    negative_slope: float,
) -> tuple[torch.Tensor, ...]:
    """Launches the training forward; returns ``(y, mean, invstd, var, mask, new_rm, new_rv)``.

    Absent outputs (the mask, the running statistics) are 0-element tensors.
    """
    _check_device(x3)
    n, c, length = x3.shape
    rows = n * length  # M
    y = torch.empty_like(x3)  # (N, C, L), strides of x3 when x3 is dense
    mean, invstd, var = (x3.new_empty((c,), dtype=torch.float32) for _ in range(3))  # (C,)
    save_mask = _uses_mask(activation, residual is not None)
    positive = torch.empty_like(x3, dtype=torch.uint8) if save_mask else _placeholder(x3)
    update = running_mean is not None and running_var is not None and rows > 0
    new_mean = torch.empty_like(running_mean) if update else _placeholder(x3)  # type: ignore[arg-type]
    new_var = torch.empty_like(running_var) if update else _placeholder(x3)  # type: ignore[arg-type]
    outputs = (y, mean, invstd, var, positive, new_mean, new_var)
    if rows == 0:  # empty batch: statistics undefined and unused, nothing to normalize
        mean.zero_()
        var.zero_()
        invstd.copy_(torch.rsqrt(var + eps))
        return outputs
    # Absent tensors are never read (constexpr flags); x3 stands in for them (never pass a
    # 0-element tensor as a pointer).
    weight_ = x3 if weight is None else weight
    bias_ = x3 if bias is None else bias
    z_ = x3 if residual is None else residual
    positive_ = positive if save_mask else x3
    old_mean, old_var = (running_mean, running_var) if update else (mean, var)
    strides = (*_strides(x3), *_strides(y), *_strides(residual), *_strides(positive))
    flags = {
        "HAS_WEIGHT": weight is not None,
        "HAS_BIAS": bias is not None,
        "HAS_RESIDUAL": residual is not None,
        "ACTIVATION": _activation_code(activation),
        "SAVE_MASK": save_mask,
    }
    split = _config(x3)

    def persistent(config: TileConfig, warmup: bool = False) -> Any:
        partial = x3.new_empty((3, config.row_programs, c), dtype=torch.float32)  # (3, P, C)
        counter = torch.zeros(config.channel_blocks, dtype=torch.int32, device=x3.device)
        kernel = batchnorm_fwd.persistent_forward_kernel
        run = kernel.warmup if warmup else kernel[config.grid]
        extra = {"grid": config.grid} if warmup else {}
        return run(
            x3, y, z_, positive_, weight_, bias_, partial, counter, mean, invstd, var,
            old_mean, old_var, new_mean if update else mean, new_var if update else var,
            rows, length, c, config.row_programs, eps, momentum, negative_slope, *strides,
            config.rows_per_program, **flags, UPDATE_RUNNING=update, BLOCK_M=config.block_m,
            BLOCK_P=batchnorm_fwd.merge_block_p(config.row_programs), BLOCK_C=config.block_c,
            num_warps=config.num_warps, **extra,
        )  # fmt: skip

    if _arrangement() == "persistent":
        config = _persistent_config(x3, lambda cfg: persistent(cfg, warmup=True), split)
        if config is not None:
            persistent(config)
            return outputs
    partial = x3.new_empty((3, split.row_programs, c), dtype=torch.float32)  # (3, P, C)
    batchnorm_fwd.partial_stats_kernel[split.grid](
        x3, partial, rows, length, c, split.row_programs, *_strides(x3), split.rows_per_program,
        BLOCK_M=split.block_m, BLOCK_C=split.block_c, num_warps=split.num_warps,
    )  # fmt: skip
    merge_block_c = min(next_power_of_2(c), 128)
    batchnorm_fwd.merge_stats_kernel[(cdiv(c, merge_block_c),)](
        partial, x3, x3.stride(1), split.row_programs, c, eps, momentum, mean, invstd, var,
        old_mean, old_var,
        new_mean if update else mean, new_var if update else var, UPDATE_RUNNING=update,
        BLOCK_P=batchnorm_fwd.merge_block_p(split.row_programs), BLOCK_C=merge_block_c,
    )  # fmt: skip
    batchnorm_fwd.normalize_kernel[split.grid](
        x3, y, z_, positive_, weight_, bias_, mean, invstd, rows, length, c, negative_slope,
        *strides, split.rows_per_program, **flags, BLOCK_M=split.block_m,
        BLOCK_C=split.block_c, num_warps=split.num_warps,
    )  # fmt: skip
    return outputs


def _train_backward(
    dy: torch.Tensor,
    x3: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    positive: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    activation: str,
    negative_slope: float,
    residual_grad: bool,
) -> tuple[torch.Tensor, ...]:
    """Launches the training backward; returns ``(dx, dweight, dbias, dresidual)``.

    ``residual`` is given only when ``u`` must be recomputed from it (SiLU, GELU); ``mask`` is
    the forward's ``u > 0`` mask or a 0-element tensor. ``dweight``/``dbias`` are float32
    ``(C,)``; ``dresidual = du`` (dtype of ``x``) when ``residual_grad``, else 0 elements.
    """
    _check_device(x3)
    n, c, length = x3.shape
    rows = n * length  # M
    dx = torch.empty_like(x3)  # (N, C, L)
    dz = torch.empty_like(x3) if residual_grad else _placeholder(x3)  # (N, C, L)
    if rows == 0:  # no values: zero gradients (separate tensors: op outputs may not alias)
        return dx, *(x3.new_zeros((c,), dtype=torch.float32) for _ in range(2)), dz
    # dγ, dβ of every channel are stored by the merge (split) or by program 0 of its block.
    dweight, dbias = (x3.new_empty((c,), dtype=torch.float32) for _ in range(2))  # (C,), (C,)
    from_mask = positive.dim() == 3
    # Absent tensors are never read or written (constexpr flags); x3 stands in for them.
    weight_ = x3 if weight is None else weight
    bias_ = x3 if bias is None else bias
    z_ = x3 if residual is None else residual
    positive_ = positive if from_mask else x3
    dz_ = dz if residual_grad else x3
    strides = (
        *_strides(dy), *_strides(x3), *_strides(residual), *_strides(positive),
        *_strides(dx), *_strides(dz),
    )  # fmt: skip
    flags = {
        "HAS_WEIGHT": weight is not None,
        "HAS_BIAS": bias is not None,
        "HAS_RESIDUAL": residual is not None,
        "ACTIVATION": _activation_code(activation),
        "FROM_MASK": from_mask,
        "WRITE_DZ": residual_grad,
    }
    split = _config(x3)

    def persistent(config: TileConfig, warmup: bool = False) -> Any:
        partial = x3.new_empty((2, config.row_programs, c), dtype=torch.float32)  # (2, P, C)
        counter = torch.zeros(config.channel_blocks, dtype=torch.int32, device=x3.device)
        kernel = batchnorm_bwd.persistent_backward_kernel
        run = kernel.warmup if warmup else kernel[config.grid]
        extra = {"grid": config.grid} if warmup else {}
        return run(
            dy, x3, z_, positive_, dx, dz_, weight_, bias_, mean, invstd, partial, counter,
            dweight, dbias, rows, length, c, config.row_programs, negative_slope, *strides,
            config.rows_per_program, **flags, BLOCK_M=config.block_m,
            BLOCK_P=batchnorm_fwd.merge_block_p(config.row_programs), BLOCK_C=config.block_c,
            num_warps=config.num_warps, **extra,
        )  # fmt: skip

    if _arrangement() == "persistent":
        config = _persistent_config(x3, lambda cfg: persistent(cfg, warmup=True), split)
        if config is not None:
            persistent(config)
            return dx, dweight, dbias, dz
    partial = x3.new_empty((2, split.row_programs, c), dtype=torch.float32)  # (2, P, C)
    grad_strides = strides[:12]  # dy, x, z, mask
    batchnorm_bwd.partial_grads_kernel[split.grid](
        dy, x3, z_, positive_, weight_, bias_, mean, invstd, partial, rows, length, c,
        split.row_programs, negative_slope, *grad_strides, split.rows_per_program,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None, ACTIVATION=flags["ACTIVATION"], FROM_MASK=from_mask,
        BLOCK_M=split.block_m, BLOCK_C=split.block_c, num_warps=split.num_warps,
    )  # fmt: skip
    merge_block_c = min(next_power_of_2(c), 128)
    batchnorm_bwd.merge_grads_kernel[(cdiv(c, merge_block_c),)](
        partial, dweight, dbias, split.row_programs, c,
        BLOCK_P=batchnorm_fwd.merge_block_p(split.row_programs), BLOCK_C=merge_block_c,
    )  # fmt: skip
    batchnorm_bwd.input_grad_kernel[split.grid](
        dy, x3, z_, positive_, dx, dz_, weight_, bias_, mean, invstd, dweight, dbias, rows, length,
        c, negative_slope, *strides, split.rows_per_program, **flags, BLOCK_M=split.block_m,
        BLOCK_C=split.block_c, num_warps=split.num_warps,
    )  # fmt: skip
    return dx, dweight, dbias, dz


def _inference(
    x3: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    activation: str,
    negative_slope: float,
) -> torch.Tensor:
    """Launches the evaluation forward ``y = act(γ·(x − μ̄)/sqrt(σ̄² + ε) + β + z)``."""
    _check_device(x3)
    n, c, length = x3.shape
    y = torch.empty_like(x3)  # (N, C, L)
    if n * length == 0:
        return y
    config = _config(x3)
    inference.inference_kernel[config.grid](
        x3, y, x3 if residual is None else residual, x3 if weight is None else weight,
        x3 if bias is None else bias, running_mean, running_var, n * length, length, c, eps,
        negative_slope, *_strides(x3), *_strides(y), *_strides(residual),
        config.rows_per_program, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None, ACTIVATION=_activation_code(activation),
        BLOCK_M=config.block_m, BLOCK_C=config.block_c, num_warps=config.num_warps,
    )  # fmt: skip
    return y


# --- torch.library custom ops ---------------------------------------------------------------

_TRAIN_SCHEMA = (
    "(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, Tensor? running_mean, "
    "Tensor? running_var, float momentum, float eps, str activation, float negative_slope) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_BACKWARD_SCHEMA = (
    "(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, Tensor mask, "
    "Tensor mean, Tensor invstd, str activation, float negative_slope, bool residual_grad) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)
_INFERENCE_SCHEMA = (
    "(Tensor x, Tensor running_mean, Tensor running_var, Tensor? weight, Tensor? bias, "
    "Tensor? residual, float eps, str activation, float negative_slope) -> Tensor"
)

train_op = torch.library.custom_op(
    "batchnorm::triton_train", mutates_args=(), schema=_TRAIN_SCHEMA
)(_train_forward)
train_backward_op = torch.library.custom_op(
    "batchnorm::triton_train_backward", mutates_args=(), schema=_BACKWARD_SCHEMA
)(_train_backward)
inference_op = torch.library.custom_op(
    "batchnorm::triton_inference", mutates_args=(), schema=_INFERENCE_SCHEMA
)(_inference)


@train_op.register_fake
def _train_fake(
    x3: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
    activation: str,
    negative_slope: float,
) -> tuple[torch.Tensor, ...]:
    """Shapes, dtypes and strides of :func:`_train_forward`'s outputs."""
    c = x3.shape[1]
    stats = [x3.new_empty((c,), dtype=torch.float32) for _ in range(3)]
    save_mask = _uses_mask(activation, residual is not None)
    positive = torch.empty_like(x3, dtype=torch.uint8) if save_mask else _placeholder(x3)
    update = running_mean is not None and running_var is not None and x3.numel() > 0
    new_mean = torch.empty_like(running_mean) if update else _placeholder(x3)  # type: ignore[arg-type]
    new_var = torch.empty_like(running_var) if update else _placeholder(x3)  # type: ignore[arg-type]
    return (torch.empty_like(x3), *stats, positive, new_mean, new_var)


@train_backward_op.register_fake
def _train_backward_fake(
    dy: torch.Tensor,
    x3: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    positive: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    activation: str,
    negative_slope: float,
    residual_grad: bool,
) -> tuple[torch.Tensor, ...]:
    """Shapes, dtypes and strides of :func:`_train_backward`'s outputs."""
    c = x3.shape[1]
    dz = torch.empty_like(x3) if residual_grad else _placeholder(x3)
    grads = [x3.new_empty((c,), dtype=torch.float32) for _ in range(2)]
    return (torch.empty_like(x3), *grads, dz)


@inference_op.register_fake
def _inference_fake(
    x3: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    activation: str,
    negative_slope: float,
) -> torch.Tensor:
    """Shape, dtype and strides of :func:`_inference`'s output."""
    return torch.empty_like(x3)


def _train_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    """Saves ``x``, ``γ``, ``β``, the mask, ``μ`` and ``r`` (never ``x̂`` or ``y``).

    The residual is kept only where the backward recomputes ``u`` from it (SiLU, GELU).
    """
    x3, weight, bias, residual, _rm, _rv, _momentum, _eps, activation, negative_slope = inputs
    _y, mean, invstd, _var, positive, _new_mean, _new_var = output
    recompute_from_residual = activation in ("silu", "gelu")
    keep_residual = residual if recompute_from_residual else None
    ctx.save_for_backward(x3, weight, bias, keep_residual, positive, mean, invstd)
    ctx.activation = activation
    ctx.negative_slope = negative_slope
    ctx.mark_non_differentiable(*output[1:])


def _train_backward_formula(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``batchnorm::triton_train`` w.r.t. ``x``, ``γ``, ``β`` and ``z``."""
    x3, weight, bias, residual, positive, mean, invstd = ctx.saved_tensors
    needs = ctx.needs_input_grad
    # With create_graph the op runs, so that differentiating its result fails as it does on
    # the op route (the kernels have no backward of their own) instead of losing gradients.
    direct = not torch.is_grad_enabled() and runs_eagerly(x3, grads[0], weight, bias, residual)
    backward = _train_backward if direct else train_backward_op
    dx, dweight, dbias, dz = backward(
        grads[0], x3, weight, bias, residual, positive, mean, invstd, ctx.activation,
        ctx.negative_slope, needs[3],
    )  # fmt: skip
    return (
        dx if needs[0] else None,
        dweight.to(weight.dtype) if needs[1] else None,
        dbias.to(bias.dtype) if needs[2] else None,
        dz if needs[3] else None,
        None, None, None, None, None, None,
    )  # fmt: skip


train_op.register_autograd(_train_backward_formula, setup_context=_train_setup_context)


# --- eager twins of the ops ------------------------------------------------------------------
# Outside torch.compile a custom op's Python dispatch and its registered autograd cost several
# hundred µs per training step (more than the kernels of a mid-sized batch norm on a GPU); these
# autograd functions run the same launch code and the same formulas with none of that.


def runs_eagerly(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether a call launches directly instead of through the ``torch.library`` op.

    True when ``x`` and every other given tensor are plain tensors (or parameters) with real
    storage, and nothing records or transforms the call: no ``torch.compile``, ``torch.func``
    transform, ``torch.jit.trace`` or ``TorchDispatchMode`` (``make_fx``, FLOP counters,
    selective checkpointing) is active (:func:`batchnorm._compat.traced`). Everything else goes
    through the ops, whose fake implementations serve tracing, compiling, meta tensors and
    ``opcheck``.
    """
    if _compat.traced(x) or _compat.functorch_active():
        return False
    for tensor in others:  # a plain loop: this runs on every call
        if tensor is not None and type(tensor) not in _compat.PLAIN_TENSOR_TYPES:
            return False
    return True


class _TrainFunction(torch.autograd.Function):
    """``batchnorm::triton_train`` with its autograd, as a plain autograd function (eager)."""

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> tuple[torch.Tensor, ...]:
        """:func:`_train_forward` on the op's arguments, then the op's ``setup_context``.

        (``forward`` takes ``ctx`` itself: a separate ``setup_context`` makes every ``apply``
        bind its arguments through ``inspect.signature``.)
        """
        outputs = _train_forward(*inputs)
        _train_setup_context(ctx, inputs, outputs)
        return outputs

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """The op's registered formula (double backward fails as on the op route)."""
        return _train_backward_formula(ctx, *grads)


_TORCH_BACKEND = TorchBackend()


class TritonBackend(Backend):
    """Batch normalization on Triton kernels (see :class:`Backend` and the module docstring).

    Whole calls, plain and fused (``y = act(γ·x̂ + β + z)``), for the dtypes the kernels take
    (:meth:`supports_fusion`): :meth:`train` runs :meth:`forward_act` (differentiable, with the
    running update in the merge kernel), :meth:`evaluate` runs :meth:`inference_act`. Backward,
    through autograd: ``du = dy·act'(u)``, ``dz = du``, ``(dx, dγ, dβ)`` from the saved ``μ``,
    ``r`` (nothing input-sized but a 1-byte mask where the activation needs one).
    """

    name = "triton"

    def train(self, call: Call) -> BatchNormOutput | None:
        """The whole training call in the Triton kernels; see :class:`Backend`."""
        x3 = channel_view(call.input)  # (N, C, L), a view when possible
        if not self.supports_fusion(x3, call.fusion is not None):
            return None
        activation, slope, residual = call.fusion or (None, 0.01, None)
        z3 = None if residual is None else channel_view(residual)  # (N, C, L)
        result = self.forward_act(
            x3, call.weight, call.bias, z3, call.eps, activation, slope, call.running_mean,
            call.running_var, call.momentum,
        )  # fmt: skip
        new_mean, new_var = new_running_stats(
            call.running_mean, call.running_var, result.mean, result.var,
            x3.shape[0] * x3.shape[2], call.momentum,
            computed=(result.running_mean, result.running_var),
        )  # fmt: skip
        return BatchNormOutput(result.y.reshape(call.input.shape), new_mean, new_var)

    def evaluate(self, call: Call) -> torch.Tensor | None:
        """The whole evaluation call in one Triton kernel; see :class:`Backend`."""
        x3 = channel_view(call.input)  # (N, C, L), a view when possible
        if not self.supports_fusion(x3, call.fusion is not None):
            return None
        assert call.running_mean is not None  # checked by check_batch_norm_args
        assert call.running_var is not None
        activation, slope, residual = call.fusion or (None, 0.01, None)
        z3 = None if residual is None else channel_view(residual)  # (N, C, L)
        y3 = self.inference_act(
            x3, call.running_mean, call.running_var, call.weight, call.bias, z3, call.eps,
            activation, slope,
        )  # fmt: skip
        return y3.reshape(call.input.shape)

    def __init__(self) -> None:
        """Checks that the kernels can run here at all.

        Raises:
            ImportError: without a CUDA device and outside the interpreter (so the registry
                reports the backend as unavailable, with this reason).
        """
        if not torch.cuda.is_available() and not interpreting():
            raise ImportError(
                "Triton kernels need a CUDA device, or TRITON_INTERPRET=1 (set before importing "
                "batchnorm) to run them on CPU tensors in the interpreter"
            )

    def supports_fusion(self, x: torch.Tensor, fused: bool = False) -> bool:
        """Whether the fused ops take ``x``: float16, bfloat16 and float32 (not float64)."""
        return x.dtype in _SUPPORTED_DTYPES

    def forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> ForwardResult:
        """Training-mode forward on the ``(N, C, L)`` view; see :class:`Backend`."""
        if not self.supports_fusion(x):
            return _TORCH_BACKEND.forward(x, weight, bias, eps)
        forward = _train_forward if runs_eagerly(x, weight, bias) else train_op
        y, mean, invstd, var, *_ = forward(x, weight, bias, None, None, None, 0.0, eps, "none", 0.0)
        return ForwardResult(y, mean, invstd, var)

    def backward(
        self,
        dy: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        mean: torch.Tensor,
        invstd: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Backward of :meth:`forward`; see :class:`Backend`."""
        if not self.supports_fusion(x):
            return _TORCH_BACKEND.backward(dy, x, weight, mean, invstd)
        backward = _train_backward if runs_eagerly(x, dy, weight) else train_backward_op
        dx, dweight, dbias, _dz = backward(
            dy, x, weight, None, None, _placeholder(x), mean, invstd, "none", 0.0, False
        )
        return dx, dweight, dbias

    def forward_act(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        residual: torch.Tensor | None,
        eps: float,
        activation: str | None,
        negative_slope: float,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        momentum: float,
    ) -> FusedForwardResult:
        """Differentiable ``act(γ·x̂ + β + z)`` with batch statistics."""
        direct = runs_eagerly(x, weight, bias, residual, running_mean, running_var)
        train = _TrainFunction.apply if direct else train_op
        y, mean, invstd, var, _mask, new_mean, new_var = train(  # type: ignore[no-untyped-call]
            x, weight, bias, residual, running_mean, running_var, float(momentum), float(eps),
            activation or "none", float(negative_slope),
        )  # fmt: skip
        has_running = new_mean.numel() > 0
        return FusedForwardResult(
            y,
            mean,
            invstd,
            var,
            new_mean if has_running else None,
            new_var if has_running else None,
        )

    def inference_act(
        self,
        x: torch.Tensor,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        residual: torch.Tensor | None,
        eps: float,
        activation: str | None,
        negative_slope: float,
    ) -> torch.Tensor:
        """``act(γ·(x − μ̄)/sqrt(σ̄² + ε) + β + z)`` from the running statistics."""
        direct = runs_eagerly(x, running_mean, running_var, weight, bias, residual)
        run = _InferenceFunction.apply if direct else inference_op
        y: torch.Tensor = run(  # type: ignore[no-untyped-call]
            x, running_mean, running_var, weight, bias, residual, float(eps),
            activation or "none", float(negative_slope),
        )  # fmt: skip
        return y


def _inference_setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    """Saves what the evaluation backward recomputes ``u`` from."""
    x3, running_mean, running_var, weight, bias, residual, eps, activation, slope = inputs
    ctx.save_for_backward(x3, running_mean, running_var, weight, bias, residual)
    ctx.eps = eps
    ctx.activation = activation
    ctx.negative_slope = slope


def _inference_backward_formula(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Gradients of the evaluation forward (statistics are constants here), in torch ops.

    ``du = dy·act'(u)``, ``dx = du·γ·r̄``, ``dz = du``, ``dγ = Σ du·x̂``, ``dβ = Σ du`` with
    ``x̂ = (x − μ̄)·r̄`` and ``r̄ = 1 / sqrt(σ̄² + ε)``. Rarely on a hot path (fine-tuning with
    frozen statistics, input gradients), so written for clarity.
    """
    x3, running_mean, running_var, weight, bias, residual = ctx.saved_tensors
    dtype = torch.float32
    invstd = torch.rsqrt(running_var.to(dtype) + ctx.eps)[None, :, None]  # (1, C, 1)
    x_hat = (x3.to(dtype) - running_mean.to(dtype)[None, :, None]) * invstd  # (N, C, L)
    gamma = 1.0 if weight is None else weight.to(dtype)[None, :, None]
    du = dy.to(dtype)  # (N, C, L)
    if ctx.activation != "none":
        u = x_hat * gamma + (0.0 if bias is None else bias.to(dtype)[None, :, None])
        if residual is not None:
            u = u + residual.to(dtype)
        du = du * activation_derivative(u, ctx.activation, ctx.negative_slope)
    needs = ctx.needs_input_grad
    return (
        (du * gamma * invstd).to(x3.dtype) if needs[0] else None,
        None,
        None,
        (du * x_hat).sum(dim=(0, 2)).to(weight.dtype) if needs[3] else None,
        du.sum(dim=(0, 2)).to(bias.dtype) if needs[4] else None,
        du.to(residual.dtype) if needs[5] else None,
        None,
        None,
        None,
    )


inference_op.register_autograd(_inference_backward_formula, setup_context=_inference_setup_context)


class _InferenceFunction(torch.autograd.Function):
    """``batchnorm::triton_inference`` with its autograd, as a plain autograd function (eager)."""

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> torch.Tensor:
        """:func:`_inference` on the op's arguments, then the op's ``setup_context``."""
        y = _inference(*inputs)
        _inference_setup_context(ctx, inputs, y)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """The op's registered formula."""
        return _inference_backward_formula(ctx, dy)
