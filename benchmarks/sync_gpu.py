"""SyncBatchNorm on NCCL: equivalence with one process, then timing against torch's.

Run on a GPU machine: ``PYTHONPATH=src timeout 120 python benchmarks/sync_gpu.py``.

1. **World size 1, NCCL** (this process): the module (which then is plain batch norm) and the
   synchronized path itself (:func:`batchnorm.distributed.sync_batch_norm_pure`, whose
   ``all_gather`` and ``all_reduce`` run on NCCL even with one rank) against
   ``torch.nn.BatchNorm*d`` on the same batch: output, input/weight/bias gradients, running
   statistics; float32 (NCHW, channels_last, ``(N, C)``) and bfloat16.
2. **Two processes on the one card** (``--two-ranks``): NCCL refuses two ranks on one GPU
   ("Duplicate GPU detected"); the script reports what happens, with a 60 s limit.
3. **Timing**: forward+backward of the synchronized paths at world size 1 (collectives
   included): ours against ``torch.nn.SyncBatchNorm``'s autograd function, median ms from
   ``triton.testing.do_bench``. Prints a table; exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from batchnorm import SyncBatchNorm
from batchnorm.distributed import sync_batch_norm_pure

#: (shape, dtype, channels_last) of the equivalence check and the timing.
CASES = [
    ((8, 16, 14, 14), torch.float32, False),
    ((8, 16, 14, 14), torch.float32, True),
    ((64, 32), torch.float32, False),
    ((8, 16, 14, 14), torch.bfloat16, False),
]
TIMED = [
    ((32, 64, 56, 56), torch.float32, False),
    ((32, 64, 56, 56), torch.bfloat16, True),
    ((256, 256, 14, 14), torch.float32, False),
]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _inputs(shape, dtype, channels_last, seed=0):
    """``(x, weight, bias, dy)`` on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(shape, generator=gen, device="cuda") * 2 + 1).to(dtype)
    dy = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    if channels_last:
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    weight = torch.rand(shape[1], generator=gen, device="cuda") + 0.5
    bias = torch.randn(shape[1], generator=gen, device="cuda")
    return x, weight, bias, dy


def _close(label, actual, expected, tol, failures):
    error = (actual.double() - expected.double()).abs().max().item()
    bound = tol * (1 + expected.double().abs().max().item())
    status = "ok" if error <= bound else "FAIL"
    print(f"  {status} {label}: max error {error:.3g} (bound {bound:.3g})", flush=True)
    if status == "FAIL":
        failures.append(label)


def check_equivalence(failures: list[str]) -> None:
    """Step 1: the module and the synchronized path against torch.nn on one rank."""
    for shape, dtype, channels_last in CASES:
        x, weight, bias, dy = _inputs(shape, dtype, channels_last)
        tol = TOLERANCE[dtype]
        label = f"{shape} {dtype} channels_last={channels_last}"
        reference = {2: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(shape)](shape[1]).cuda()
        with torch.no_grad():
            reference.weight.copy_(weight)
            reference.bias.copy_(bias)
        x_ref = x.double().requires_grad_()
        y_ref = reference.double()(x_ref)
        grads_ref = torch.autograd.grad(
            y_ref, (x_ref, reference.weight, reference.bias), dy.double()
        )
        module = SyncBatchNorm(shape[1]).cuda()
        with torch.no_grad():
            module.weight.copy_(weight)
            module.bias.copy_(bias)
        x_mod = x.clone().requires_grad_()
        y_mod = module(x_mod)
        grads_mod = torch.autograd.grad(y_mod, (x_mod, module.weight, module.bias), dy)
        # The collective path itself, with its own buffers (pure: new tensors returned).
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        mean, var = torch.zeros(shape[1], device="cuda"), torch.ones(shape[1], device="cuda")
        out = sync_batch_norm_pure(leaves[0], mean, var, leaves[1], leaves[2], 0.1, 1e-5)
        grads_sync = torch.autograd.grad(out.output, leaves, dy)
        for name, (y, grads, rm, rv) in {
            "module": (y_mod, grads_mod, module.running_mean, module.running_var),
            "synchronized": (out.output, grads_sync, out.running_mean, out.running_var),
        }.items():
            _close(f"{label} {name} y", y, y_ref, tol, failures)
            for grad_name, got, expected in zip(("dx", "dw", "db"), grads, grads_ref, strict=True):
                _close(f"{label} {name} {grad_name}", got, expected, tol * 10, failures)
            _close(f"{label} {name} running_mean", rm, reference.running_mean, tol, failures)
            _close(f"{label} {name} running_var", rv, reference.running_var, tol, failures)


def _two_rank_entry(rank: int, path: str, queue) -> None:
    """One rank of the two-process attempt: one synchronized step on cuda:0."""
    try:
        store = dist.FileStore(path, 2)
        dist.init_process_group("nccl", store=store, rank=rank, world_size=2,
                                timeout=timedelta(seconds=30))  # fmt: skip
        x, weight, bias, _dy = _inputs((4, 8, 5, 5), torch.float32, False, seed=rank)
        out = sync_batch_norm_pure(x, None, None, weight, bias, 0.1, 1e-5)
        torch.cuda.synchronize()
        queue.put((rank, f"ran, output finite: {bool(out.output.isfinite().all())}"))
        dist.destroy_process_group()
    except Exception as error:  # reported, not raised: the outcome is what is measured
        queue.put((rank, f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"))


def try_two_ranks() -> None:
    """Step 2: two NCCL ranks on the same GPU; prints each rank's outcome."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "store")
        processes = [context.Process(target=_two_rank_entry, args=(r, path, queue)) for r in (0, 1)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(60)
            if process.is_alive():
                process.kill()
        while not queue.empty():
            rank, outcome = queue.get()
            print(f"  two ranks on one GPU, rank {rank}: {outcome}", flush=True)


def time_paths() -> None:
    """Step 3: forward+backward ms of the synchronized paths (world size 1, NCCL)."""
    import triton.testing
    from torch.nn.modules._functions import SyncBatchNorm as TorchSyncFunction

    group = dist.group.WORLD
    print(
        f"{'shape':<18} {'dtype':<15} {'CL':<5} {'ours ms':>8} {'torch ms':>9} {'torch/ours':>10}"
    )
    for shape, dtype, channels_last in TIMED:
        x, weight, bias, dy = _inputs(shape, dtype, channels_last)
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        buffers = [torch.zeros(shape[1], device="cuda"), torch.ones(shape[1], device="cuda")]

        def ours(leaves=leaves, buffers=buffers, dy=dy):
            out = sync_batch_norm_pure(leaves[0], *buffers, leaves[1], leaves[2], 0.1, 1e-5)
            torch.autograd.grad(out.output, leaves, dy)

        def theirs(leaves=leaves, buffers=buffers, dy=dy):
            y = TorchSyncFunction.apply(
                leaves[0], leaves[1], leaves[2], buffers[0], buffers[1], 1e-5, 0.1, group, 1
            )
            torch.autograd.grad(y, leaves, dy)

        ours_ms = triton.testing.do_bench(ours, rep=200, return_mode="median")
        torch_ms = triton.testing.do_bench(theirs, rep=200, return_mode="median")
        print(
            f"{'x'.join(map(str, shape)):<18} {dtype!s:<15} {channels_last!s:<5} "
            f"{ours_ms:8.3f} {torch_ms:9.3f} {torch_ms / ours_ms:10.2f}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    """Runs the three steps; returns 1 on any mismatch."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--two-ranks", action="store_true", help="also try 2 NCCL ranks on 1 GPU")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/sync_gpu.py: needs a CUDA device")
        return 2
    print(torch.__version__, torch.cuda.get_device_name(), "NCCL", torch.cuda.nccl.version())
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as directory:
        store = dist.FileStore(os.path.join(directory, "store"), 1)
        dist.init_process_group(
            "nccl", store=store, rank=0, world_size=1, timeout=timedelta(seconds=60),
            device_id=torch.device("cuda", 0),
        )  # fmt: skip
        print("world size 1, NCCL: equivalence with torch.nn.BatchNorm (float64)")
        check_equivalence(failures)
        time_paths()
        dist.destroy_process_group()
    if args.two_ranks:
        try_two_ranks()
    print(f"sync_gpu: {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
