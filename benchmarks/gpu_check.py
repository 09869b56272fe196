"""GPU correctness sweep: our modules on CUDA (Triton) against ``torch.nn`` in float64.

Complements ``gpu.py`` (which checks the large benchmark shapes in fp32/bf16 before timing): small
odd shapes (prime C and M, 1×1 spatial, N = 2, channels_last, non-contiguous), float32, float16
and bfloat16, both Triton arrangements, every fused activation with and without a residual,
two training steps then evaluation; outputs, every gradient, running statistics and
``num_batches_tracked``. Then the family layers and tools on CUDA against the same on CPU.
Poisoned (NaN) gradients are not needed: every compared tensor is freshly allocated by the call.

Run on a GPU machine: ``PYTHONPATH=src timeout 200 python benchmarks/gpu_check.py``. Exits 1 on
any mismatch and prints one line per failure, then a summary line. Most of its time is Triton
compiling kernel variants, so the sweep can be cut into shards run side by side, e.g.
``--arrangement persistent --dtype bfloat16 --no-family`` (compiled kernels are shared through
Triton's on-disk cache).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

import batchnorm
from batchnorm.backends.triton_backend import ARRANGEMENT_ENV_VAR

#: atol = rtol per dtype, against float64 torch.nn on the same (rounded) inputs.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
#: (shape, layout): prime channels and rows, 1×1 spatial, N = 2, channels_last, strided.
CASES = [
    ((2, 7), "contiguous"),
    ((5, 13, 11), "contiguous"),
    ((3, 5, 1, 1), "contiguous"),
    ((2, 17, 7, 5), "channels_last"),
    ((3, 6, 9, 7), "strided"),
    ((2, 3, 3, 5, 7), "channels_last"),
    ((4, 37, 16, 16), "contiguous"),
]
ACTIVATIONS = (None, "relu", "leaky_relu", "silu", "gelu")
#: |u| below KINK × the dtype's tolerance: (leaky) ReLU's derivative is left out of the
#: gradient comparison there (u is rounded to the input dtype on some routes).
KINK = 1.0
failures: list[str] = []
#: ``cuda``; ``cpu`` (with ``TRITON_INTERPRET=1``) only to try the script itself without a GPU.
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` in the named memory layout (same values)."""
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=fmt)
    if layout == "strided":
        return x.transpose(2, 3).contiguous().transpose(2, 3)  # (N, C, H, W), W-major strides
    return x


def _compare(label: str, actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Records a failure if ``actual`` is off ``expected`` by more than ``tol`` (abs + rel)."""
    error = (actual.double() - expected.double()).abs()
    bound = tol * (1.0 + expected.double().abs())
    if not bool(torch.isfinite(actual).all()) or bool((error > bound).any()):
        _fail(f"{label}: max error {error.max().item():.3g}")


def _fail(message: str) -> None:
    """Records a failure and prints it at once (a run cut short by its timeout still shows it)."""
    failures.append(message)
    print("FAIL", message, flush=True)


def _torch_reference(dims: int, channels: int) -> nn.Module:
    """``torch.nn.BatchNorm{dims}d`` in float64 on the device."""
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[dims]
    return cls(channels).double().to(DEVICE)


def check_modules(
    arrangements: tuple[str, ...], dtypes: tuple[torch.dtype, ...], backend: str = "triton"
) -> None:
    """BatchNorm*d and BatchNormAct*d on ``backend`` vs float64 torch.nn.

    Prints one progress line per (arrangement, dtype), so a run cut short still reports.
    """
    for arrangement in arrangements:
        os.environ[ARRANGEMENT_ENV_VAR] = arrangement
        for dtype in dtypes:
            tol = TOLERANCE[dtype]
            for shape, layout in CASES:
                dims = len(shape)
                suffix = {2: "1d", 3: "1d", 4: "2d", 5: "3d"}[dims]
                for activation in ACTIVATIONS:
                    for with_residual in (False, True):
                        if activation is None and not with_residual:
                            module = getattr(batchnorm, f"BatchNorm{suffix}")(
                                shape[1], backend=backend
                            )
                        else:
                            module = getattr(batchnorm, f"BatchNormAct{suffix}")(
                                shape[1], activation=activation, backend=backend
                            )
                        label = (
                            f"{arrangement} {shape} {layout} {dtype} {activation} z={with_residual}"
                        )
                        _run_steps(
                            module.to(DEVICE), _torch_reference(dims, shape[1]), shape, layout,
                            dtype, tol, activation, with_residual, label,
                        )  # fmt: skip
            print(f"modules {arrangement} {dtype}: {len(failures)} failures so far", flush=True)
    os.environ.pop(ARRANGEMENT_ENV_VAR, None)


def _run_steps(module, reference, shape, layout, dtype, tol, activation, with_residual, label):
    """Two training steps and one evaluation step, comparing everything after each."""
    for step, training in enumerate((True, True, False)):
        module.train(training)
        reference.train(training)
        x = _layout(torch.randn(shape, device=DEVICE).mul(2).add(1).to(dtype), layout)
        z = _layout(torch.randn(shape, device=DEVICE).to(dtype), layout) if with_residual else None
        dy = _layout(torch.randn(shape, device=DEVICE).to(dtype), layout)
        leaves = [x.clone().requires_grad_()] + (
            [z.clone().requires_grad_()] if z is not None else []
        )
        y = module(leaves[0], residual=leaves[1]) if z is not None else module(leaves[0])
        x64 = x.double().requires_grad_()
        z64 = z.double().requires_grad_() if z is not None else None
        y64 = reference(x64)
        if z64 is not None:
            y64 = y64 + z64
        if activation in ("relu", "leaky_relu"):
            # At a kink (u = 0) the derivative is 1 or the slope depending on the last bit of
            # u, so float32 and float64 may take different sides: no gradient flows from there.
            kink = y64.detach().abs() < KINK * tol
            dy = dy.masked_fill(kink, 0)
            if bool(kink.any()):
                near = f"{int(kink.sum())} values within {KINK * tol:.3g} of the kink"
                print(f"{label} step{step}: {near}")
        y64 = batchnorm._math.activate(y64, activation, 0.01) if activation else y64
        grads = torch.autograd.grad(y, [*leaves, module.weight, module.bias], dy)
        refs = torch.autograd.grad(
            y64,
            [x64, *([z64] if z64 is not None else []), reference.weight, reference.bias],
            dy.double(),
        )
        _compare(f"{label} step{step} y", y, y64, tol)
        for name, got, ref in zip(
            ("dx", "dz", "dw", "db")[: len(grads)] if z is not None else ("dx", "dw", "db"),
            grads,
            refs,
            strict=True,
        ):
            _compare(f"{label} step{step} {name}", got, ref, tol * 10)
        for buffer in ("running_mean", "running_var"):
            _compare(
                f"{label} step{step} {buffer}",
                getattr(module, buffer),
                getattr(reference, buffer),
                tol,
            )
        if int(module.num_batches_tracked) != int(reference.num_batches_tracked):
            _fail(f"{label} step{step} num_batches_tracked")


def check_family() -> None:
    """Family layers and tools: CUDA (Triton where BN runs) against the same on the CPU."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, 5, 5)
    for make in (
        lambda: batchnorm.BatchRenorm2d(3, warmup_steps=0, r_max_steps=0, d_max_steps=0),
        lambda: batchnorm.GhostBatchNorm2d(3, virtual_batch_size=3),
        lambda: batchnorm.FrozenBatchNorm2d(3),
        lambda: batchnorm.BatchNorm2d(3, nonfinite="skip"),
    ):
        cpu_layer, gpu_layer = make(), make().to(DEVICE)
        y_cpu, y_gpu = cpu_layer(x), gpu_layer(x.to(DEVICE))
        _compare(f"family {type(cpu_layer).__name__} y", y_gpu.cpu(), y_cpu, 1e-4)
        for name, buffer in cpu_layer.named_buffers():
            if buffer.is_floating_point():
                _compare(
                    f"family {type(cpu_layer).__name__} {name}",
                    dict(gpu_layer.named_buffers())[name].cpu(),
                    buffer,
                    1e-4,
                )
    sequence = torch.randn(4, 6, 5)
    lstm_cpu = batchnorm.BNLSTM(5, 8, max_steps=6, batch_first=True)
    lstm_gpu = batchnorm.BNLSTM(5, 8, max_steps=6, batch_first=True)
    lstm_gpu.load_state_dict(lstm_cpu.state_dict())
    out_cpu, _ = lstm_cpu(sequence, lengths=[6, 5, 3, 2])
    out_gpu, _ = lstm_gpu.to(DEVICE)(sequence.to(DEVICE), lengths=[6, 5, 3, 2])
    _compare("family BNLSTM output", out_gpu.cpu(), out_cpu, 1e-4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).to(DEVICE)
    model = batchnorm.tools.convert(model, to="batchnorm")
    images = [torch.randn(4, 3, 8, 8, device=DEVICE) for _ in range(3)]
    batchnorm.tools.recalibrate(model, images, num_batches=3)
    folded = batchnorm.tools.fold(model.eval())
    _compare("tools fold", folded(images[0]), model(images[0]), 1e-4)
    masked_x = torch.randn(6, 3, 9)
    mask = torch.rand(6, 9) > 0.3
    _compare(
        "masked functional",
        batchnorm.functional.batch_norm(
            masked_x.to(DEVICE), None, None, training=True, mask=mask.to(DEVICE)
        ).cpu(),
        batchnorm.functional.batch_norm(masked_x, None, None, training=True, mask=mask),
        1e-4,
    )
    ours = batchnorm.functional.batch_norm(x.to(DEVICE), None, None, training=True)
    _compare("functional auto", ours, F.batch_norm(x.to(DEVICE), None, None, training=True), 1e-4)


def main(argv: list[str] | None = None) -> int:
    """Runs the sweeps asked for; prints failures and a summary; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arrangement", choices=("split", "persistent"), action="append",
        help="Triton arrangement to sweep (repeatable; default both)",
    )  # fmt: skip
    parser.add_argument(
        "--dtype", choices=[str(d).removeprefix("torch.") for d in TOLERANCE], action="append",
        help="input dtype to sweep (repeatable; default all)",
    )  # fmt: skip
    parser.add_argument("--no-family", action="store_true", help="skip the family and tools")
    parser.add_argument(
        "--backend", default="triton",
        help="backend of the module sweep (default triton; auto/cuda take ATen on small shapes)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    arrangements = tuple(args.arrangement or ("split", "persistent"))
    dtypes = tuple(getattr(torch, name) for name in args.dtype) if args.dtype else tuple(TOLERANCE)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    print(torch.__version__, name, flush=True)
    if not args.no_family:
        check_family()
        print(f"family and tools: {len(failures)} failures", flush=True)
    check_modules(arrangements, dtypes, args.backend)
    print(f"gpu_check: {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
