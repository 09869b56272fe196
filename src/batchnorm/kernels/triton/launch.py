"""Launch code of the Triton kernels: tile configurations, occupancy, the three passes.

Each function takes checked ``(N, C, L)`` views (any strides) and launches the kernels of
:mod:`batchnorm.kernels.triton` with Triton's own launcher; nothing here knows about autograd or
running-statistics policy (the backend, :mod:`batchnorm.backends.triton_backend`, does).

Arrangements (``BATCHNORM_TRITON_ARRANGEMENT``): ``split`` (default) launches reduction, merge and
elementwise pass separately; ``persistent`` runs each direction as one launch with a barrier per
channel block, its grid sized from the compiled kernel's occupancy (falling back to ``split`` when
the channel blocks do not all fit at once). Under ``TRITON_INTERPRET=1`` programs run one after
another, so ``persistent`` is only used with a single program (whole problem in one program),
which exercises the same device functions without a barrier that could deadlock.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from batchnorm.kernels.triton import batchnorm_bwd, batchnorm_fwd, inference
from batchnorm.kernels.triton.common import (
    ACTIVATIONS,
    TileConfig,
    cdiv,
    interpreting,
    next_power_of_2,
    tile_config,
)

__all__ = [
    "ARRANGEMENT_ENV_VAR",
    "check_device",
    "placeholder",
    "run_inference",
    "train_backward",
    "train_forward",
    "uses_mask",
]

ARRANGEMENT_ENV_VAR = "BATCHNORM_TRITON_ARRANGEMENT"
_ARRANGEMENTS = ("split", "persistent")


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


def check_device(x3: torch.Tensor) -> None:
    """Rejects tensors the kernels cannot reach: CPU tensors need the interpreter."""
    if x3.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"triton backend: expected a CUDA tensor, got one on {x3.device}; CPU tensors run "
            "only in Triton's interpreter (set TRITON_INTERPRET=1 before importing batchnorm)"
        )


def uses_mask(activation: str, has_residual: bool) -> bool:
    """(Leaky) ReLU with a residual saves the ``u > 0`` mask instead of re-reading ``z``."""
    return has_residual and activation in ("relu", "leaky_relu")


def placeholder(x3: torch.Tensor) -> torch.Tensor:
    """A 0-element float32 tensor standing for an absent output."""
    return x3.new_empty((0,), dtype=torch.float32)


def _activation_code(activation: str) -> int:
    """The kernels' ``ACTIVATION`` constexpr for an op-level activation name."""
    return int(ACTIVATIONS[None if activation == "none" else activation])


def train_forward(
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
    in_place: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Launches the training forward; returns ``(y, mean, invstd, var, mask, new_rm, new_rv)``.

    Absent outputs (the mask, the running statistics) are 0-element tensors. With ``in_place``
    the merge kernel writes the new running statistics over ``running_mean``/``running_var``
    (each channel's value is read before it is written, by the same program), which are then
    returned as ``new_rm``/``new_rv``: no separate update or copy. The op (``torch.library``)
    never passes it: its inputs are not mutable.
    """
    check_device(x3)
    n, c, length = x3.shape
    rows = n * length  # M
    y = torch.empty_like(x3)  # (N, C, L), strides of x3 when x3 is dense
    mean, invstd, var = (x3.new_empty((c,), dtype=torch.float32) for _ in range(3))  # (C,)
    save_mask = uses_mask(activation, residual is not None)
    positive = torch.empty_like(x3, dtype=torch.uint8) if save_mask else placeholder(x3)
    update = running_mean is not None and running_var is not None and rows > 0
    if update and in_place:
        new_mean, new_var = running_mean, running_var  # (C,), (C,): moved by the merge kernel
    else:
        new_mean = torch.empty_like(running_mean) if update else placeholder(x3)  # type: ignore[arg-type]
        new_var = torch.empty_like(running_var) if update else placeholder(x3)  # type: ignore[arg-type]
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


def train_backward(
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
    check_device(x3)
    n, c, length = x3.shape
    rows = n * length  # M
    dx = torch.empty_like(x3)  # (N, C, L)
    dz = torch.empty_like(x3) if residual_grad else placeholder(x3)  # (N, C, L)
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


def run_inference(
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
    check_device(x3)
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
