"""Launch code of the Triton kernels: tile configurations, occupancy, the three passes.

(One file of about 490 lines: the forward, backward and inference launches share the geometry,
the stand-ins for absent tensors and the occupancy check, and each lists its kernels' arguments
in the kernels' own order; scratch memory and the launcher live beside it.)

Each function takes checked ``(N, C, L)`` views (any strides) and launches the kernels of
:mod:`batchnorm.kernels.triton` with Triton's own launcher; nothing here knows about autograd or
running-statistics policy (the backend, :mod:`batchnorm.backends.triton_backend`, does).

Arrangements (``BATCHNORM_TRITON_ARRANGEMENT``): ``split`` (default) launches two kernels per
direction, the reduction (whose last program per channel block merges the partials and writes the
statistics and running buffers) and the elementwise pass; ``persistent`` runs each direction as
one launch with a barrier per channel block, its grid sized from the compiled kernel's occupancy
(falling back to ``split`` when the channel blocks do not all fit at once). Under
``TRITON_INTERPRET=1`` programs run one after another, so ``persistent`` is only used with a
single program (whole problem in one program), which exercises the same device functions
without a barrier that could deadlock.

Host work per launch is kept small: every launch goes through a cached
:class:`~batchnorm.kernels.triton.launcher.DirectLauncher`; the partial-summary scratch and the
arrival counters are cached per device and stream (the counters are zeroed once, when
allocated, and reset by the kernels themselves); ``(n, l)`` merge into one row axis whenever
every tensor of the launch allows it (channels_last, ``(M, C)``), so those inputs take 1-D row
tiles.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import torch

from batchnorm.kernels.triton import batchnorm_bwd, batchnorm_fwd, inference
from batchnorm.kernels.triton.common import (
    ACTIVATIONS,
    TileConfig,
    interpreting,
    next_power_of_2,
    tile_config,
    vector_width,
)
from batchnorm.kernels.triton.launcher import DirectLauncher
from batchnorm.kernels.triton.scratch import scratch

__all__ = [
    "ARRANGEMENT_ENV_VAR",
    "check_device",
    "placeholder",
    "run_inference",
    "scratch",
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


def _geometry(
    n: int, length: int, tensors: tuple[torch.Tensor, ...], traceable: bool = False
) -> tuple[int, int, int, list[tuple[int, int, int]]]:
    """``(N, L, L_VEC, strides)`` as the kernels see the ``(N, C, L)`` ``tensors`` of one launch.

    When every tensor's ``(n, l)`` offset is ``m·stride_l`` for the flat row ``m = n·L + l``
    (``stride_n == L·stride_l``, or ``L == 1``, or ``N == 1``: channels_last, ``(M, C)``), the
    rows are passed as ``N = 1, L = M``: one row axis, 1-D row tiles. Otherwise (NCHW) the tiles
    are 2-D over ``(n, l)``. Where every tensor is contiguous along ``l``, ``L_VEC``
    (:func:`~.common.vector_width`) divides ``L`` and all ``n``/``c`` strides, which are returned
    in units of ``L_VEC`` (the kernels multiply them back). ``traceable``: sizes and strides may
    be symbolic (a traced call) and are specialized to ints.
    """
    if traceable:
        n, length = _static(n, length)
        tensors = tuple(_StaticStrides(t) for t in tensors)  # type: ignore[misc]
    if length == 1 or n == 1 or all(t.stride(0) == length * t.stride(2) for t in tensors):
        axis = 0 if length == 1 else 2
        n, length = 1, n * length
        strides = [(0, t.stride(1), t.stride(axis)) for t in tensors]
    else:
        strides = [(t.stride(0), t.stride(1), t.stride(2)) for t in tensors]
    if length == 1 or any(s[2] != 1 for s in strides):
        return n, length, 1, strides
    vec = vector_width(math.gcd(length, *(s[0] for s in strides), *(s[1] for s in strides)))
    if vec == 1:
        return n, length, 1, strides
    return n, length, vec, [(s[0] // vec, s[1] // vec, s[2]) for s in strides]


class _StaticStrides:
    """``stride(i)`` of a tensor as a Python int (for :func:`_geometry` of a traced call)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.strides = _static(*tensor.stride())

    def stride(self, dim: int) -> int:
        return self.strides[dim]


def _config(x3: torch.Tensor, batch: int, length: int, vec: int) -> TileConfig:
    """The tile configuration of the split arrangement for ``x3`` seen as ``(batch, C, length)``."""
    c = x3.shape[1]
    channels_contiguous = x3.stride(1) == 1 and c > 1
    return tile_config(batch, length, c, channels_contiguous, _target_programs(x3.device), vec=vec)


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
    x3: torch.Tensor, batch: int, length: int, vec: int, compile_kernel: Any, split: TileConfig
) -> TileConfig | None:
    """The persistent grid for ``x3``, or ``None`` when its channel blocks cannot all be resident.

    On a GPU the kernel is compiled for the split tiles (``compile_kernel(config)``), and the
    rows are then spread over at most as many programs as the GPU holds at once. In the
    interpreter (sequential programs) the grid is a single program over the whole problem.
    """
    c = x3.shape[1]
    channels_contiguous = x3.stride(1) == 1 and c > 1
    if interpreting() or x3.device.type != "cuda":
        return tile_config(
            batch, length, c, channels_contiguous, 1, block_c=next_power_of_2(c), vec=vec
        )
    capacity = _resident_programs(compile_kernel(split), x3.device)
    config = tile_config(
        batch, length, c, channels_contiguous, capacity, block_l=split.block_l,
        block_c=split.block_c, vec=vec,
    )  # fmt: skip
    programs = config.channel_blocks * config.row_programs
    # The final grid compiles its own variant (BLOCK_P follows P): check its occupancy too.
    if programs > capacity or programs > _resident_programs(compile_kernel(config), x3.device):
        return None
    return config


#: Strides passed for an absent tensor (never read).
_NO_STRIDES = (0, 0, 0)


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


def _fresh_scratch(
    device: torch.device, floats: int, counters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scratch of one traced call: allocated by the graph (Inductor's pool, a CUDA graph's
    private pool when captured), the counters zero-filled by a kernel, never cached on the host."""
    partial = torch.empty(max(floats, 1), dtype=torch.float32, device=device)
    return partial, torch.zeros(max(2 * counters, 2), dtype=torch.int32, device=device)


def _launch(launcher: DirectLauncher, traceable: bool) -> Any:
    """The launch function: the cached direct launch, or ``wrap_triton`` when ``traceable``."""
    return launcher.traced if traceable else launcher


def _static(*values: Any) -> tuple[int, ...]:
    """Sizes and strides as Python ints (a symbolic size is specialized: the tiles need ints)."""
    return tuple(int(v) for v in values)


_REDUCE_STATS = DirectLauncher(batchnorm_fwd, "reduce_stats_kernel")
_NORMALIZE = DirectLauncher(batchnorm_fwd, "normalize_kernel")
_PERSISTENT_FORWARD = DirectLauncher(batchnorm_fwd, "persistent_forward_kernel")
_REDUCE_GRADS = DirectLauncher(batchnorm_bwd, "reduce_grads_kernel")
_INPUT_GRAD = DirectLauncher(batchnorm_bwd, "input_grad_kernel")
_PERSISTENT_BACKWARD = DirectLauncher(batchnorm_bwd, "persistent_backward_kernel")
_INFERENCE = DirectLauncher(inference, "inference_kernel")


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
    *,
    traceable: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Launches the training forward; returns ``(y, mean, invstd, var, mask, new_rm, new_rv)``.

    Absent outputs (the mask, the running statistics) are 0-element tensors. With ``in_place``
    the reduction's merging program writes the new running statistics over
    ``running_mean``/``running_var`` (each channel's value is read before it is written, by the
    same program), which are then returned as ``new_rm``/``new_rv``: no separate update or copy.
    The op (``torch.library``) never passes it: its inputs are not mutable. ``traceable``
    (the bodies of :mod:`batchnorm.backends.triton_compiled`): launches through
    ``torch.library.wrap_triton``, per-call scratch, the split arrangement.
    """
    check_device(x3)
    n, c, length = _static(*x3.shape) if traceable else x3.shape
    rows = n * length  # M
    y = torch.empty_like(x3)  # (N, C, L), strides of x3 when x3 is dense
    mean, invstd, var = (x3.new_empty((c,), dtype=torch.float32) for _ in range(3))  # (C,)
    save_mask = uses_mask(activation, residual is not None)
    positive = torch.empty_like(x3, dtype=torch.uint8) if save_mask else placeholder(x3)
    update = running_mean is not None and running_var is not None and rows > 0
    if update and in_place:
        new_mean, new_var = running_mean, running_var  # (C,), (C,): moved by the kernel
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
    out_mean, out_var = (new_mean, new_var) if update else (mean, var)
    batch, length_, vec, (sx, sy, sz, sp) = _geometry(n, length, (x3, y, z_, positive_), traceable)
    strides = (*sx, *sy, *(sz if residual is not None else _NO_STRIDES),
               *(sp if save_mask else _NO_STRIDES))  # fmt: skip
    flags = (
        weight is not None, bias is not None, residual is not None, _activation_code(activation),
        save_mask,
    )  # fmt: skip
    split = _config(x3, batch, length_, vec)

    def persistent(config: TileConfig, warmup: bool = False) -> Any:
        partial, counter = scratch(x3.device, 3 * config.row_programs * c, config.channel_blocks)
        args = (
            x3, y, z_, positive_, weight_, bias_, partial, counter, mean, invstd, var,
            old_mean, old_var, out_mean, out_var, batch, length_ // config.l_vec, c,
            config.row_programs, config.tiles_per_program, *strides, eps, momentum,
            negative_slope,
        )  # fmt: skip
        constexprs = (
            *flags, update, config.l_vec, config.block_n, config.block_l, config.block_c,
            batchnorm_fwd.merge_block_p(config.row_programs),
        )  # fmt: skip
        run = _PERSISTENT_FORWARD.warmup if warmup else _PERSISTENT_FORWARD
        return run(config.grid, args, constexprs, config.num_warps)

    if not traceable and _arrangement() == "persistent":
        config = _persistent_config(
            x3, batch, length_, vec, lambda cfg: persistent(cfg, warmup=True), split
        )
        if config is not None:
            persistent(config)
            return outputs
    partial, counter = (_fresh_scratch if traceable else scratch)(
        x3.device, 3 * split.row_programs * c, split.channel_blocks
    )
    l_groups = length_ // split.l_vec
    _launch(_REDUCE_STATS, traceable)(
        split.grid,
        (
            x3, partial, counter, mean, invstd, var, old_mean, old_var, out_mean, out_var,
            batch, l_groups, c, split.row_programs, split.tiles_per_program, *sx, eps, momentum,
        ),
        (
            update, split.l_vec, split.block_n, split.block_l, split.block_c,
            batchnorm_fwd.merge_block_p(split.row_programs),
        ),
        split.num_warps,
    )  # fmt: skip
    _launch(_NORMALIZE, traceable)(
        split.grid,
        (
            x3, y, z_, positive_, weight_, bias_, mean, invstd, batch, l_groups, c,
            split.tiles_per_program, *strides, negative_slope,
        ),
        (*flags, split.l_vec, split.block_n, split.block_l, split.block_c),
        split.num_warps,
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
    *,
    traceable: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Launches the training backward; returns ``(dx, dweight, dbias, dresidual)``.

    ``residual`` is given only when ``u`` must be recomputed from it (SiLU, GELU); ``mask`` is
    the forward's ``u > 0`` mask or a 0-element tensor. ``dweight``/``dbias`` are float32
    ``(C,)``; ``dresidual = du`` (dtype of ``x``) when ``residual_grad``, else 0 elements.
    """
    check_device(x3)
    n, c, length = _static(*x3.shape) if traceable else x3.shape
    rows = n * length  # M
    dx = torch.empty_like(x3)  # (N, C, L)
    dz = torch.empty_like(x3) if residual_grad else placeholder(x3)  # (N, C, L)
    if rows == 0:  # no values: zero gradients (separate tensors: op outputs may not alias)
        return dx, *(x3.new_zeros((c,), dtype=torch.float32) for _ in range(2)), dz
    # dγ, dβ of every channel are stored by the reduction's last program (split) or by
    # program 0 of its block (persistent).
    dweight, dbias = (x3.new_empty((c,), dtype=torch.float32) for _ in range(2))  # (C,), (C,)
    from_mask = positive.dim() == 3
    # Absent tensors are never read or written (constexpr flags); x3 stands in for them.
    weight_ = x3 if weight is None else weight
    bias_ = x3 if bias is None else bias
    z_ = x3 if residual is None else residual
    positive_ = positive if from_mask else x3
    dz_ = dz if residual_grad else x3
    batch, length_, vec, (sd, sx, sz, sp, sdx, sdz) = _geometry(
        n, length, (dy, x3, z_, positive_, dx, dz_), traceable
    )
    grad_strides = (
        *sd, *sx, *(sz if residual is not None else _NO_STRIDES),
        *(sp if from_mask else _NO_STRIDES),
    )  # fmt: skip
    strides = (*grad_strides, *sdx, *(sdz if residual_grad else _NO_STRIDES))
    flags = (
        weight is not None, bias is not None, residual is not None, _activation_code(activation),
        from_mask,
    )  # fmt: skip
    split = _config(x3, batch, length_, vec)

    def persistent(config: TileConfig, warmup: bool = False) -> Any:
        partial, counter = scratch(x3.device, 2 * config.row_programs * c, config.channel_blocks)
        args = (
            dy, x3, z_, positive_, dx, dz_, weight_, bias_, mean, invstd, partial, counter,
            dweight, dbias, batch, length_ // config.l_vec, c, config.row_programs,
            config.tiles_per_program, *strides, negative_slope,
        )  # fmt: skip
        constexprs = (
            *flags, residual_grad, config.l_vec, config.block_n, config.block_l,
            config.block_c, batchnorm_fwd.merge_block_p(config.row_programs),
        )  # fmt: skip
        run = _PERSISTENT_BACKWARD.warmup if warmup else _PERSISTENT_BACKWARD
        return run(config.grid, args, constexprs, config.num_warps)

    if not traceable and _arrangement() == "persistent":
        config = _persistent_config(
            x3, batch, length_, vec, lambda cfg: persistent(cfg, warmup=True), split
        )
        if config is not None:
            persistent(config)
            return dx, dweight, dbias, dz
    partial, counter = (_fresh_scratch if traceable else scratch)(
        x3.device, 2 * split.row_programs * c, split.channel_blocks
    )
    l_groups = length_ // split.l_vec
    _launch(_REDUCE_GRADS, traceable)(
        split.grid,
        (
            dy, x3, z_, positive_, weight_, bias_, mean, invstd, partial, counter, dweight,
            dbias, batch, l_groups, c, split.row_programs, split.tiles_per_program,
            *grad_strides, negative_slope,
        ),
        (
            *flags, split.l_vec, split.block_n, split.block_l, split.block_c,
            batchnorm_fwd.merge_block_p(split.row_programs),
        ),
        split.num_warps,
    )  # fmt: skip
    _launch(_INPUT_GRAD, traceable)(
        split.grid,
        (
            dy, x3, z_, positive_, dx, dz_, weight_, bias_, mean, invstd, dweight, dbias, batch,
            l_groups, c, split.tiles_per_program, *strides, negative_slope,
        ),
        (*flags, residual_grad, split.l_vec, split.block_n, split.block_l, split.block_c),
        split.num_warps,
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
    *,
    traceable: bool = False,
) -> torch.Tensor:
    """Launches the evaluation forward ``y = act(γ·(x − μ̄)/sqrt(σ̄² + ε) + β + z)``."""
    check_device(x3)
    n, c, length = _static(*x3.shape) if traceable else x3.shape
    y = torch.empty_like(x3)  # (N, C, L)
    if n * length == 0:
        return y
    z_ = x3 if residual is None else residual
    batch, length_, vec, (sx, sy, sz) = _geometry(n, length, (x3, y, z_), traceable)
    config = _config(x3, batch, length_, vec)
    _launch(_INFERENCE, traceable)(
        config.grid,
        (
            x3, y, z_, x3 if weight is None else weight, x3 if bias is None else bias,
            running_mean, running_var, batch, length_ // config.l_vec, c,
            config.tiles_per_program, *sx, *sy, *(sz if residual is not None else _NO_STRIDES),
            eps, negative_slope,
        ),
        (
            weight is not None, bias is not None, residual is not None,
            _activation_code(activation), config.l_vec, config.block_n, config.block_l,
            config.block_c,
        ),
        config.num_warps,
    )  # fmt: skip
    return y
