"""Ahead-of-time compilation of the kernels for an H100 (sm_90), no GPU needed; and that the
compiled objects carry what the direct launcher reads of them.

The interpreter runs the kernels as NumPy code, so it misses what only the compiler sees (types
carried through loops, constexpr branches, the spin barrier's loop, atomics with memory
semantics). Here every launched kernel is compiled down to a cubin with Triton's own ``ptxas``;
a failure is a kernel that would not build on the GPU. The compilation runs in a subprocess
without ``TRITON_INTERPRET`` (with it, ``triton.jit`` makes interpreter functions instead).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

if __name__ != "__main__":
    pytest.importorskip("triton")

#: Pointer arguments that hold float32 statistics, parameters or scratch.
_FP32_POINTERS = {
    "partial_ptr", "mean_ptr", "invstd_ptr", "var_ptr", "dweight_ptr", "dbias_ptr",
    "weight_ptr", "bias_ptr", "running_mean_ptr", "running_var_ptr", "new_running_mean_ptr",
    "new_running_var_ptr",
}  # fmt: skip


def _compile(
    kernel: object, constants: dict[str, object], unit_strides: tuple[str, ...] = ()
) -> object:
    """Compiles ``kernel`` (a JITFunction) for sm_90 with bf16 tensors; returns the kernel."""
    signature = {}
    for name in kernel.arg_names:  # type: ignore[attr-defined]
        if name in constants or name in unit_strides:
            signature[name] = "constexpr"
        elif name == "counter_ptr":
            signature[name] = "*i32"
        elif name == "positive_ptr":
            signature[name] = "*u8"
        elif name in _FP32_POINTERS:
            signature[name] = "*fp32"
        elif name.endswith("_ptr"):
            signature[name] = "*bf16"
        elif name in ("eps", "momentum", "slope"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    constexprs = {**constants, **dict.fromkeys(unit_strides, 1)}
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(kernel, signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def compile_all(activation: int) -> None:
    """Persistent forward/backward (all device functions), split kernels and inference."""
    from batchnorm.kernels.triton import batchnorm_bwd as bwd
    from batchnorm.kernels.triton import batchnorm_fwd as fwd
    from batchnorm.kernels.triton import inference

    flags = {"HAS_WEIGHT": True, "HAS_BIAS": True, "HAS_RESIDUAL": True, "ACTIVATION": activation}
    nchw = {"L_VEC": 4, "BLOCK_N": 4, "BLOCK_L": 256, "BLOCK_C": 4}
    rows = {"L_VEC": 1, "BLOCK_N": 1, "BLOCK_L": 64, "BLOCK_C": 64}
    built = [
        _compile(fwd.persistent_forward_kernel,
                 {**flags, "SAVE_MASK": True, "UPDATE_RUNNING": True, **nchw, "BLOCK_P": 64},
                 ("sx_l",)),
        _compile(bwd.persistent_backward_kernel,
                 {**flags, "FROM_MASK": activation == 1, "WRITE_DZ": True, **rows,
                  "BLOCK_P": 64}, ("sd_c", "sx_c")),
        _compile(fwd.reduce_stats_kernel, {"UPDATE_RUNNING": True, **rows, "BLOCK_P": 8},
                 ("sx_c",)),
        _compile(fwd.normalize_kernel, {**flags, "SAVE_MASK": True, **nchw}, ("sx_l", "sy_l")),
        _compile(bwd.reduce_grads_kernel, {**flags, "FROM_MASK": activation == 1, **nchw,
                                           "BLOCK_P": 8}),
        _compile(bwd.input_grad_kernel, {**flags, "FROM_MASK": activation == 1,
                                         "WRITE_DZ": True, **rows}),
        _compile(inference.inference_kernel, {**flags, **rows}),
    ]  # fmt: skip
    for kernel in built:
        assert kernel.asm["cubin"]  # type: ignore[attr-defined]
        check_launcher_metadata(kernel)


def check_launcher_metadata(kernel: object) -> None:
    """What :class:`batchnorm.kernels.triton.launcher.DirectLauncher` reads of a compiled kernel
    is there: ``packed_metadata``, ``run`` (a property that loads the binary on first use, then
    Triton's ``CudaLauncher``, called as ``(grid_x, grid_y, grid_z, stream, function, ...)``),
    and the occupancy inputs ``metadata.num_warps`` and ``metadata.shared``."""
    import inspect

    from triton.backends.nvidia.driver import CudaLauncher

    assert kernel.packed_metadata is not None  # type: ignore[attr-defined]
    assert isinstance(type(kernel).__dict__["run"], property)
    assert isinstance(kernel.metadata.num_warps, int)  # type: ignore[attr-defined]
    assert isinstance(kernel.metadata.shared, int)  # type: ignore[attr-defined]
    names = list(inspect.signature(CudaLauncher.__call__).parameters)
    assert names[:6] == ["self", "gridX", "gridY", "gridZ", "stream", "function"], names


@pytest.mark.slow
def test_kernels_compile_for_sm90() -> None:
    """Every kernel builds a cubin for sm_90, with ReLU (mask path) and GELU (recompute path)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip().endswith("compiled")


if __name__ == "__main__":
    for code in (1, 4):  # ReLU, GELU
        compile_all(code)
    sys.stdout.write("compiled\n")
