"""Activation memory of conv → batch norm → activation stacks, with and without InPlace-ABN.

One training step (forward, cross-entropy, backward, SGD) of a ResNet-50-shaped stack of
``conv3x3 → norm → leaky ReLU`` blocks (stages of 64/128/256/512 channels, each stage but the
first halving the resolution; ``--blocks`` per stage, ResNet-50's 3,4,6,3 by default; no
shortcuts) for each way of writing the norm and activation:

* ``torch.nn``: ``nn.BatchNorm2d`` then ``nn.LeakyReLU()`` (the reference of the ratios);
* ``torch.nn+inplace-act``: ``nn.BatchNorm2d`` then ``nn.LeakyReLU(inplace=True)``;
* ``BatchNormAct2d``: our fused layer (``activation="leaky_relu"``);
* ``InPlaceBatchNormAct2d``: in-place activated batch norm (Rota Bulò et al., CVPR 2018).

Measured for each, on the same weights and data (the batch norms' ``γ`` set so that every variant
computes the same function: the in-place layer's ``|γ| + ε_γ`` equals the others' ``γ``):

* ``saved_bytes_blocks``: bytes of the tensors autograd saves for backward while a norm +
  activation block runs (``torch.autograd.graph.saved_tensors_hooks``, switched on and off by
  forward pre/post hooks on the blocks), counted once per storage
  (``untyped_storage().data_ptr()``);
* ``saved_bytes_total``: the same over the whole forward (convolutions and head too); both
  leave out the storages of parameters, buffers and the input batch, which exist anyway;
* ``peak_bytes``: on CUDA, ``torch.cuda.max_memory_allocated`` during forward + backward above
  what was allocated before the step; on CPU, the same high-water mark computed from the
  profiler's allocation events (``torch.profiler`` with ``profile_memory=True``: every
  allocation and free of the CPU allocator, summed in time order);
* ``loss``: the step's loss, equal across the variants up to float32 rounding (relative
  difference ≤ ``LOSS_RTOL``, checked: ``losses_equal`` in the JSON, exit status 1 otherwise);
  ``loss_after_step``, after the SGD update, checks the gradients more loosely: float32
  gradients of a deep stack without shortcuts are ill-conditioned (with ``--resolution 32
  --batch 8``, ``torch.nn``'s own float32 gradient differs from its float64 one by 9% in the
  worst tensor), so it agrees to 1e-4 or so (3e-6 at the default size), and exactly between
  variants on the same kernels.

The default size (ResNet-50's stage depths and resolutions 56/28/14/7, batch 16) runs in 8 s
on an idle 2-core CPU (23 s on a busy one). Run: ``python benchmarks/memory.py [--blocks 3,4,6,3]
[--resolution 56] [--batch 16] [--device cpu|cuda] [--out PATH]`` (default
``benchmarks/results/memory-<device>-<date>.json``).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
from batchnorm.backends import resolve_backend
from batchnorm.modules import BatchNormAct2d
from batchnorm.variants.inplace import InPlaceBatchNormAct2d

VARIANTS = ("torch.nn", "torch.nn+inplace-act", "BatchNormAct2d", "InPlaceBatchNormAct2d")
REFERENCE = "torch.nn"
STAGES = (64, 128, 256, 512)
NEGATIVE_SLOPE = 0.01
WEIGHT_EPS = 1e-5
#: The in-place layer's target: its blocks save at most this fraction of torch.nn's bytes.
TARGET_RATIO = 0.55
#: Largest relative difference of the step's loss from torch.nn's that counts as equal.
LOSS_RTOL = 1e-5


class TorchNormAct(nn.Sequential):
    """``nn.BatchNorm2d`` then ``nn.LeakyReLU``, as one module (so hooks see one block)."""

    def __init__(self, channels: int, inplace: bool) -> None:
        super().__init__(nn.BatchNorm2d(channels), nn.LeakyReLU(NEGATIVE_SLOPE, inplace=inplace))


def norm_act(variant: str, channels: int) -> nn.Module:
    """The norm + activation block of ``variant`` for ``channels`` channels."""
    if variant == "torch.nn":
        return TorchNormAct(channels, inplace=False)
    if variant == "torch.nn+inplace-act":
        return TorchNormAct(channels, inplace=True)
    if variant == "BatchNormAct2d":
        return BatchNormAct2d(channels, activation="leaky_relu", negative_slope=NEGATIVE_SLOPE)
    return InPlaceBatchNormAct2d(
        channels, activation="leaky_relu", negative_slope=NEGATIVE_SLOPE, weight_eps=WEIGHT_EPS
    )


def is_block(module: nn.Module) -> bool:
    """Whether ``module`` is one of the norm + activation blocks :func:`norm_act` makes."""
    return isinstance(module, (TorchNormAct, BatchNormAct2d, InPlaceBatchNormAct2d))


def build_model(variant: str, blocks: tuple[int, ...], classes: int, seed: int) -> nn.Sequential:
    """The stack: stem conv, ``blocks[i]`` conv-norm-act blocks per stage, pooled linear head.

    The same ``seed`` gives the same convolution and head weights for every variant; each
    block's scale is then set from a second generator (see :func:`set_scales`).
    """
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(3, STAGES[0], 3, padding=1, bias=False)]
    layers.append(norm_act(variant, STAGES[0]))
    channels = STAGES[0]
    for stage, (width, depth) in enumerate(zip(STAGES, blocks, strict=True)):
        for index in range(depth):
            stride = 2 if stage > 0 and index == 0 else 1
            layers.append(nn.Conv2d(channels, width, 3, stride, padding=1, bias=False))
            layers.append(norm_act(variant, width))
            channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]
    return nn.Sequential(*layers)


def set_scales(model: nn.Module, seed: int) -> None:
    """Sets every block's ``γ`` to a random value in ``[0.5, 1.5)``, the same for all variants.

    The in-place layer gets ``γ − ε_γ``, so that its effective scale ``|γ| + ε_γ`` is the
    others' ``γ`` and all variants compute the same function.
    """
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if not is_block(module):
            continue
        norm = module[0] if isinstance(module, TorchNormAct) else module
        scale = 0.5 + torch.rand(norm.num_features, generator=gen)  # (C,)
        if isinstance(module, InPlaceBatchNormAct2d):
            scale = scale - module.weight_eps
        with torch.no_grad():
            norm.weight.copy_(scale)


class SavedTensorCounter:
    """Counts the storages autograd saves, overall and while a norm + activation block runs."""

    def __init__(self, model: nn.Module, exclude: set[int]) -> None:
        self.exclude = exclude
        self.total: dict[int, int] = {}
        self.blocks: dict[int, int] = {}
        self.in_block = False
        self.in_place_calls = 0
        self.block_calls = 0
        self._handles: list[Any] = []
        for module in model.modules():
            if is_block(module):
                self._handles.append(module.register_forward_pre_hook(self._enter))
                self._handles.append(module.register_forward_hook(self._leave))

    def _enter(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.in_block = True
        self._block_input = args[0]

    def _leave(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.in_block = False
        self.block_calls += 1
        self.in_place_calls += int(output is self._block_input)
        self._block_input = None

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        """The pack hook: records the tensor's storage, returns the tensor itself."""
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.exclude:
            self.total[key] = storage.nbytes()
            if self.in_block:
                self.blocks[key] = storage.nbytes()
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        """The unpack hook: the tensor as packed."""
        return tensor

    def remove(self) -> None:
        """Removes the module hooks."""
        for handle in self._handles:
            handle.remove()


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, Any]]:
    """Measures the allocator's high-water mark in the block, above its level at the start.

    Yields a dict that holds ``peak_bytes`` and ``peak_source`` once the block has run.
    """
    record: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield record
        torch.cuda.synchronize(device)
        record["peak_bytes"] = torch.cuda.max_memory_allocated(device) - start
        record["peak_source"] = "torch.cuda.max_memory_allocated above the step's start"
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield record
    # Kineto's raw events: each "[memory]" event is one allocation (+) or free (−) of the CPU
    # allocator; prof.events() folds most of them into their operators.
    events = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
    changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    level = peak = 0
    for _, nbytes in changes:
        level += nbytes
        peak = max(peak, level)
    record["peak_bytes"] = peak
    record["peak_source"] = (
        "CPU allocator high-water mark above the step's start, from torch.profiler memory events"
    )


def run_variant(
    variant: str,
    blocks: tuple[int, ...],
    images: torch.Tensor,
    labels: torch.Tensor,
    seed: int,
    lr: float,
) -> dict[str, Any]:
    """One training step of ``variant``'s model; returns its memory figures and losses."""
    device = images.device
    model = build_model(variant, blocks, int(labels.max()) + 1, seed).to(device)
    set_scales(model, seed + 1)
    model.train()
    exclude = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    exclude.add(images.untyped_storage().data_ptr())
    counter = SavedTensorCounter(model, exclude)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with peak_memory(device) as peak:
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
    counter.remove()
    optimizer.step()
    with torch.no_grad():
        loss_after = F.cross_entropy(model(images), labels)
    return {
        "saved_bytes_blocks": sum(counter.blocks.values()),
        "saved_bytes_total": sum(counter.total.values()),
        "peak_bytes": int(peak["peak_bytes"]),
        "peak_source": peak["peak_source"],
        "loss": loss.item(),
        "loss_after_step": loss_after.item(),
        "blocks_run": counter.block_calls,
        "blocks_in_place": counter.in_place_calls,
    }


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:9.2f}"


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """The results as a text table, sizes in MiB, ratios against ``torch.nn``."""
    ref = results[REFERENCE]
    header = (
        f"{'variant':<24}{'blocks MiB':>11}{'ratio':>7}{'total MiB':>11}{'ratio':>7}"
        f"{'peak MiB':>11}{'ratio':>7}{'loss':>11}{'after step':>12}"
    )
    lines = [header, "-" * len(header)]
    for name, row in results.items():
        lines.append(
            f"{name:<24}{_mib(row['saved_bytes_blocks']):>11}"
            f"{row['saved_bytes_blocks'] / ref['saved_bytes_blocks']:>7.3f}"
            f"{_mib(row['saved_bytes_total']):>11}"
            f"{row['saved_bytes_total'] / ref['saved_bytes_total']:>7.3f}"
            f"{_mib(row['peak_bytes']):>11}{row['peak_bytes'] / ref['peak_bytes']:>7.3f}"
            f"{row['loss']:>11.6f}{row['loss_after_step']:>12.6f}"
        )
    return "\n".join(lines)


def parse_blocks(text: str) -> tuple[int, ...]:
    """``"2"`` → ``(2, 2, 2, 2)``; ``"3,4,6,3"`` → ``(3, 4, 6, 3)`` (blocks per stage)."""
    parts = [int(part) for part in text.split(",")]
    if len(parts) == 1:
        parts *= len(STAGES)
    if len(parts) != len(STAGES) or any(part < 1 for part in parts):
        raise argparse.ArgumentTypeError(
            f"--blocks: expected one positive int or {len(STAGES)} comma-separated ones, "
            f"got {text!r}"
        )
    return tuple(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs every variant, prints the table and writes the JSON; returns the payload."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--blocks", type=parse_blocks, default=(3, 4, 6, 3))
    parser.add_argument("--resolution", type=int, default=56, help="input height and width")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch, 3, args.resolution, args.resolution, generator=gen)
    labels = torch.randint(0, args.classes, (args.batch,), generator=gen)
    labels[0] = args.classes - 1  # every variant's head has `classes` outputs
    images, labels = images.to(device), labels.to(device)

    results = {
        variant: run_variant(variant, args.blocks, images, labels, args.seed, args.lr)
        for variant in VARIANTS
    }
    ref = results[REFERENCE]
    for row in results.values():
        for key in ("saved_bytes_blocks", "saved_bytes_total", "peak_bytes"):
            row[f"{key}_ratio"] = row[key] / ref[key]
        row["loss_rel_diff"] = abs(row["loss"] - ref["loss"]) / abs(ref["loss"])
        row["loss_after_step_rel_diff"] = abs(row["loss_after_step"] - ref["loss_after_step"]) / (
            abs(ref["loss_after_step"])
        )
    inplace = results["InPlaceBatchNormAct2d"]
    threads = torch.get_num_threads()
    payload = {
        "benchmark": "memory",
        "command": ["benchmarks/memory.py", *(sys.argv[1:] if argv is None else argv)],
        "config": {
            "blocks": list(args.blocks),
            "stages": list(STAGES),
            "resolution": args.resolution,
            "batch": args.batch,
            "classes": args.classes,
            "lr": args.lr,
            "seed": args.seed,
            "device": str(device),
            "dtype": "float32",
            "backend": resolve_backend(None, device).name,
        },
        "environment": harness.environment(threads),
        "target": {
            "saved_bytes_blocks_ratio_max": TARGET_RATIO,
            "met": inplace["saved_bytes_blocks_ratio"] <= TARGET_RATIO,
        },
        "losses_equal": all(row["loss_rel_diff"] <= LOSS_RTOL for row in results.values()),
        "loss_rtol": LOSS_RTOL,
        "results": results,
    }
    payload["environment"]["device_name"] = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    )
    print(format_table(results))
    print(
        f"\nInPlaceBatchNormAct2d / torch.nn: blocks {inplace['saved_bytes_blocks_ratio']:.3f} "
        f"(target ≤ {TARGET_RATIO}), total saved {inplace['saved_bytes_total_ratio']:.3f}, "
        f"peak {inplace['peak_bytes_ratio']:.3f}; {inplace['blocks_in_place']} of "
        f"{inplace['blocks_run']} blocks ran in place; peak: {ref['peak_source']}"
    )
    out: Path = args.out
    if out is None:
        date = datetime.date.today().isoformat()
        out = Path(__file__).resolve().parent / "results" / f"memory-{device.type}-{date}.json"
    harness.write_results(out, payload)
    print(f"wrote {out}")
    if not payload["losses_equal"]:
        print(f"FAILED: the variants' losses differ by more than {LOSS_RTOL} (relative)")
    return payload


if __name__ == "__main__":
    sys.exit(0 if main()["losses_equal"] else 1)
