"""Device check of the launch machinery: direct launcher used, counters reset, no race, graphs.

On a GPU (the first step of ``benchmarks/device_run.sh``), for a few shapes and layouts:

1. the direct launcher's fast path is on and every launch after the first of a specialization
   went through it (its caches hold the compiled kernels);
2. the "last program merges" reductions are deterministic: 30 repeats of one forward+backward
   give bit-identical ``μ``, ``σ²``, ``dγ``, ``dβ`` (the merge order is fixed, whichever program
   arrives last; a moving result is a race) and match a float64 reference;
3. every arrival counter is back at zero afterwards (no launch zero-fills them);
4. a forward+backward captured in a CUDA graph and replayed gives the eager result.

``--device cpu`` runs 2–3 on CPU tensors under ``TRITON_INTERPRET=1`` (a dry run). Exits 1 on
any failure, printing each as it happens.
"""

from __future__ import annotations

import argparse
import os
import sys

SHAPES = (
    ((8, 16, 14, 14), False),
    ((8, 64, 7, 7), False),
    ((16, 32, 7, 7), True),
    ((64, 96), False),
)


def main(argv: list[str] | None = None) -> int:
    """Runs the checks; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from batchnorm.functional import batch_norm
    from batchnorm.kernels.triton import launch, scratch

    failures: list[str] = []

    def fail(message: str) -> None:
        print("FAIL", message, flush=True)
        failures.append(message)

    device = torch.device(args.device)
    repeats = args.repeats if device.type == "cuda" else 2
    shapes = SHAPES if device.type == "cuda" else SHAPES[:2]
    for shape, channels_last in shapes:
        shape = tuple(s if device.type == "cuda" else min(s, 4) for s in shape)
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(shape, generator=gen).to(device) * 2 + 3
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dy = torch.randn(shape, generator=gen).to(device)
        if channels_last:
            dy = dy.contiguous(memory_format=torch.channels_last)
        c = shape[1]
        weight = torch.rand(c, generator=gen).to(device) + 0.5
        bias = torch.randn(c, generator=gen).to(device)

        def step(
            x: torch.Tensor = x,
            weight: torch.Tensor = weight,
            bias: torch.Tensor = bias,
            dy: torch.Tensor = dy,
        ) -> tuple[torch.Tensor, ...]:
            leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
            y = batch_norm(leaves[0], None, None, leaves[1], leaves[2], training=True,
                           backend="triton")  # fmt: skip
            return (y, *torch.autograd.grad(y, leaves, dy))

        first = step()
        for _ in range(repeats - 1):
            again = step()
            for name, a, b in zip(("y", "dx", "dweight", "dbias"), first, again, strict=True):
                if not torch.equal(a, b):
                    fail(f"{shape} cl={channels_last} {name}: results move between runs (race)")
                    break
        x64 = x.double().requires_grad_()
        w64, b64 = weight.double().requires_grad_(), bias.double().requires_grad_()
        y64 = torch.nn.functional.batch_norm(x64, None, None, w64, b64, training=True)
        expected = (y64, *torch.autograd.grad(y64, (x64, w64, b64), dy.double()))
        for name, actual, ref in zip(("y", "dx", "dweight", "dbias"), first, expected, strict=True):
            error = (actual.double() - ref).abs().max().item() / (1 + ref.abs().max().item())
            if error > 1e-4:
                fail(f"{shape} cl={channels_last} {name}: error {error:.2e} against float64")
        _partial, counter = scratch.scratch(device, 1, 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if bool((counter[0::2] != 0).any()):
            fail(f"{shape}: arrival counters left non-zero: {counter[0::2].nonzero().numel()}")
        if device.type == "cuda":
            try:
                static = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm-up on the side stream (its own scratch)
                        y = batch_norm(static[0], None, None, static[1], static[2],
                                       training=True, backend="triton")  # fmt: skip
                        torch.autograd.grad(y, static, dy)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    y = batch_norm(static[0], None, None, static[1], static[2], training=True,
                                   backend="triton")  # fmt: skip
                    grads = torch.autograd.grad(y, static, dy)
                for _ in range(3):
                    graph.replay()
                torch.cuda.synchronize()
                for name, a, b in zip(("y", "dx", "dweight", "dbias"), (y, *grads), first,
                                      strict=True):  # fmt: skip
                    if not torch.allclose(a, b, atol=1e-5, rtol=1e-5):
                        fail(f"{shape} cl={channels_last} {name}: graph replay differs")
            except Exception as error:  # report and go on with the next shape
                fail(f"{shape} cl={channels_last}: graph capture failed: {error!r}"[:300])
        print(f"checked {shape} channels_last={channels_last}", flush=True)
    if device.type == "cuda":
        launchers = [v for v in vars(launch).values() if type(v).__name__ == "DirectLauncher"]
        used = {v.name: len(v.cache) for v in launchers if v.cache}
        print(f"direct launcher fast path: {launchers[0].fast}; compiled entries: {used}")
        if not launchers[0].fast or not used:
            fail("the direct launcher's fast path was not used")
    print("launch check:", "FAILED" if failures else "passed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
