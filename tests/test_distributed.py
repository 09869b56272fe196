"""Check 6 of the chain: ``SyncBatchNorm`` on gloo ranks equals one process on the whole batch.

Each spawned rank builds the same global batch from a seed, runs :class:`SyncBatchNorm` on its own
slice and compares with ``torch.nn.BatchNorm*`` run (in the same process) on the concatenated
batch: outputs, input gradients, the per-rank ``weight``/``bias`` contributions (their sum over
ranks and an independent float64 formula), running buffers and ``num_batches_tracked``. Many
configurations share one process group per test, so the spawn cost (~3 s) is paid few times.

In-process tests cover what needs no second rank (Chan's merge, conversion, world size 1, the
path outside a process group), so the module stays covered although coverage is not collected in
spawned processes.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import batchnorm.distributed as bnd
from batchnorm.distributed import SyncBatchNorm, chan_merge, local_moments
from batchnorm.modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormBase,
)
from tolerances import TOLERANCES

#: Wall-clock limit of one spawned group; a broken test fails here instead of hanging CI.
GROUP_DEADLINE_S = 180.0
#: The process-group timeout of the equivalence groups (a stuck collective fails after this).
GROUP_TIMEOUT_S = 60.0
#: The short timeout of the hang test.
HANG_TIMEOUT_S = 5.0


# --------------------------------------------------------------------------------------------
# Process-group harness
# --------------------------------------------------------------------------------------------


def _entry(
    rank: int, world_size: int, store_path: str, timeout_s: float, worker: Any, args: tuple
) -> None:
    """Body of each spawned rank: joins a gloo group through a FileStore, runs ``worker``."""
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group(
        "gloo",
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        worker(rank, world_size, store, *args)
    except BaseException:
        # The parent reports only one rank's error, often a peer's "connection closed": keep
        # every rank's own traceback in the captured stderr.
        sys.stderr.write(f"rank {rank}:\n{traceback.format_exc()}")
        dist.destroy_process_group()
        raise
    # A rank that tears gloo down while a peer is still in a collective, or exits while a peer
    # is still destroying, can abort that peer ("terminate called without an active exception",
    # seen once in CI on the 3-rank group): the ranks meet, through the store (no collective),
    # before and after the teardown.
    _meet(store, "worker_done", world_size)
    dist.destroy_process_group()
    _meet(store, "destroyed", world_size)


def _meet(store: Any, key: str, world_size: int) -> None:
    """A barrier on the store alone: every rank adds one to ``key``, then waits for all."""
    store.add(key, 1)
    deadline = time.monotonic() + GROUP_TIMEOUT_S
    while store.add(key, 0) < world_size:
        if time.monotonic() > deadline:
            raise RuntimeError(f"barrier {key!r}: not every rank came in {GROUP_TIMEOUT_S} s")
        time.sleep(0.01)


def _run_group(worker: Any, world_size: int, *args: Any) -> None:
    """Runs ``worker(rank, world_size, store, *args)`` on ``world_size`` spawned gloo ranks.

    A FileStore in a fresh directory needs no port. A rank that raises fails the test with its
    traceback; a group that is still running after :data:`GROUP_DEADLINE_S` is killed and fails.
    """
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.spawn(
            _entry,
            args=(world_size, os.path.join(tmp, "store"), GROUP_TIMEOUT_S, worker, args),
            nprocs=world_size,
            join=False,
        )
        deadline = time.monotonic() + GROUP_DEADLINE_S
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                pytest.fail(f"process group of {world_size} did not finish in {GROUP_DEADLINE_S} s")


# --------------------------------------------------------------------------------------------
# Equivalence with one process on the concatenated batch
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One comparison: per-rank batch sizes and the layer's settings."""

    splits: tuple[int, ...]
    spatial: tuple[int, ...] = ()
    channels: int = 3
    channels_last: bool = False
    dtype: torch.dtype = torch.float32
    momentum: float | None = 0.1
    affine: bool = True
    track_running_stats: bool = True
    offset: float = 0.0
    steps: int = 2


def _torch_class(ndim: int) -> type[nn.Module]:
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[ndim]


def torch_memory_format(x: torch.Tensor) -> torch.memory_format:
    """``channels_last`` for 4D tensors, ``channels_last_3d`` for 5D ones."""
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if not channels_last:
        return x.contiguous()
    return x.contiguous(
        memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    )


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _check_config(rank: int, world_size: int, config: Config, seed: int) -> None:
    """Runs ``config.steps`` training steps and one eval step on both sides and compares.

    Every rank draws the same global batch from ``seed`` and keeps its own slice.
    """
    assert len(config.splits) == world_size
    gen = torch.Generator().manual_seed(seed)
    total = sum(config.splits)
    start = sum(config.splits[:rank])
    stop = start + config.splits[rank]
    shape = (total, config.channels, *config.spatial)
    settings = {
        "momentum": config.momentum,
        "affine": config.affine,
        "track_running_stats": config.track_running_stats,
        "dtype": config.dtype,
    }
    reference = _torch_class(len(shape))(config.channels, **settings)
    ours = SyncBatchNorm(config.channels, **settings)
    if config.affine:  # the same random γ, β on both sides
        gamma, beta = torch.randn(2, config.channels, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            for module in (reference, ours):
                module.weight.copy_(gamma)
                module.bias.copy_(beta)
    for step in range(config.steps):
        x_global = config.offset + torch.randn(shape, generator=gen, dtype=torch.float64)
        dy_global = torch.randn(shape, generator=gen, dtype=torch.float64).to(config.dtype)
        x_global = _layout(x_global.to(config.dtype), config.channels_last)
        x_ref = x_global.clone().requires_grad_()
        x_mine = _layout(x_global[start:stop].clone(), config.channels_last).requires_grad_()
        y_ref = reference(x_ref)
        y_ref.backward(dy_global)
        y_mine = ours(x_mine)
        y_mine.backward(_layout(dy_global[start:stop], config.channels_last))
        what = f"{config} step {step} rank {rank}"
        assert y_mine.shape == x_mine.shape
        layout = torch_memory_format(x_mine) if config.channels_last else torch.contiguous_format
        if y_mine.numel() > 0:  # an empty tensor has no meaningful layout
            assert y_mine.is_contiguous(memory_format=layout), f"{what}: memory format not kept"
        _close(y_mine, y_ref[start:stop], config.dtype, f"{what} output")
        _close(x_mine.grad, x_ref.grad[start:stop], config.dtype, f"{what} input grad")
        if config.affine:
            _check_parameter_grads(ours, reference, x_global, dy_global, start, stop, what)
            for module in (reference, ours):
                module.weight.grad = None
                module.bias.grad = None
        _check_buffers(ours, reference, config.dtype, what)
    ours.eval()  # evaluation: running statistics, no collective (only this rank's slice)
    reference.eval()
    x_eval = torch.randn((config.splits[rank], *shape[1:]), generator=gen, dtype=torch.float64)
    x_eval = x_eval.to(config.dtype)
    if config.splits[rank] > 0:  # empty eval input: functional.py's reshape(N, C, -1) fails
        _close(ours(x_eval), reference(x_eval), config.dtype, f"{config} eval rank {rank}")


def _check_parameter_grads(ours, reference, x_global, dy_global, start, stop, what) -> None:
    """Per-rank ``weight``/``bias`` grads: the float64 formula on the slice; sum = torch.nn."""
    dtype = ours.weight.dtype
    x64 = x_global.double()
    dims = [0, *range(2, x64.dim())]
    x_hat = x64[start:stop]  # empty global batch: no statistics, zero gradients
    if x64.numel() > 0:
        var, mean = torch.var_mean(x64, dim=dims, correction=0, keepdim=True)  # global statistics
        x_hat = ((x64 - mean) / torch.sqrt(var + ours.eps))[start:stop]
    dy = dy_global.double()[start:stop]
    _close(ours.bias.grad.double(), dy.sum(dim=dims), dtype, f"{what} bias grad (this rank)")
    _close(ours.weight.grad.double(), (dy * x_hat).sum(dim=dims), dtype, f"{what} weight grad")
    summed = torch.stack([ours.weight.grad, ours.bias.grad])  # (2, C)
    dist.all_reduce(summed)
    expected = torch.stack([reference.weight.grad, reference.bias.grad])
    _close(summed, expected, dtype, f"{what} weight/bias grads summed over ranks")


def _check_buffers(ours, reference, dtype, what) -> None:
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        mine, theirs = getattr(ours, name), getattr(reference, name)
        if theirs is None:
            assert mine is None, f"{what}: {name}"
            continue
        assert mine.dtype == theirs.dtype, f"{what}: {name} dtype"
        _close(mine, theirs, dtype, f"{what} {name}")


def _check_global_single_value(rank: int, world_size: int, splits: tuple[int, ...]) -> None:
    """One value per channel in the global batch: every rank raises, buffers are unchanged."""
    bn = SyncBatchNorm(3)
    before = {name: buffer.clone() for name, buffer in bn.named_buffers()}
    x = torch.randn(splits[rank], 3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(x)
    for name, buffer in bn.named_buffers():
        assert torch.equal(buffer, before[name]), name


def _check_equivalence(rank: int, world_size: int, configs, single_values) -> None:
    """The error cases first, then every configuration: ranks stay in step after the errors."""
    for splits in single_values:
        _check_global_single_value(rank, world_size, splits)
    for seed, config in enumerate(configs):
        _check_config(rank, world_size, config, seed)


def _configs(splits: list[tuple[int, ...]]) -> list[Config]:
    """Every layout for each split, plus the flag and dtype variants on the first split."""
    configs = []
    for split in splits:
        configs += [
            Config(split),
            Config(split, (5,)),
            Config(split, (3, 2)),
            Config(split, (3, 2), channels_last=True),
            Config(split, (2, 3, 2), channels_last=True, dtype=torch.float64),
        ]
    first = splits[0]
    return [
        *configs,
        Config(first, (4,), dtype=torch.float64, offset=1e4),  # large mean: Chan's merge
        Config(first, (3, 2), momentum=None, steps=3),  # cumulative average
        Config(first, (4,), affine=False),
        Config(first, (4,), track_running_stats=False),
        Config(tuple(0 for _ in first), (4,), momentum=None),  # empty global batch
    ]


# --------------------------------------------------------------------------------------------
# DistributedDataParallel
# --------------------------------------------------------------------------------------------


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
        BatchNorm1d(3, momentum=None),
    ).double()


def _check_ddp(rank: int, world_size: int, steps: list[tuple[int, ...]]) -> None:
    """A few SGD steps under DDP equal SGD on the concatenated batch; buffers agree on all ranks.

    DDP averages gradients over ranks, so the single-process loss is the global sum over ``W``.
    """
    reference = _small_model()
    model = nn.parallel.DistributedDataParallel(
        SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(reference)), broadcast_buffers=False
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(7)
    for splits in steps:
        x = torch.randn(sum(splits), 2, 5, 5, generator=gen, dtype=torch.float64)
        target = torch.randn(sum(splits), 3, generator=gen, dtype=torch.float64)
        start = sum(splits[:rank])
        stop = start + splits[rank]
        optimizer.zero_grad()
        ((model(x[start:stop]) - target[start:stop]) ** 2).sum().backward()
        optimizer.step()
        reference_optimizer.zero_grad()
        (((reference(x) - target) ** 2).sum() / world_size).backward()
        reference_optimizer.step()
    for (name, mine), theirs in zip(
        model.module.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        _close(mine.double(), theirs.double(), torch.float64, f"rank {rank} {name}")
    for name, buffer in model.module.named_buffers():
        gathered = [torch.empty_like(buffer) for _ in range(world_size)]
        dist.all_gather(gathered, buffer)
        assert all(torch.equal(other, buffer) for other in gathered), f"{name} differs"


# --------------------------------------------------------------------------------------------
# No silent hang
# --------------------------------------------------------------------------------------------


def _check_hang(rank: int, world_size: int, store: Any) -> None:
    """Rank 1 skips a call; rank 0's collective fails within the (short) group timeout.

    Runs last, on a subgroup of ranks 0 and 1 created with a timeout of :data:`HANG_TIMEOUT_S`.
    """
    group = dist.new_group([0, 1], timeout=timedelta(seconds=HANG_TIMEOUT_S))
    if rank > 1:
        return
    bn = SyncBatchNorm(3, process_group=group)
    x = torch.randn(4, 3)
    bn(x)
    if rank == 0:
        before = {name: buffer.clone() for name, buffer in bn.named_buffers()}
        with pytest.raises(
            RuntimeError, match=r"SyncBatchNorm: the all_gather .* did not complete"
        ):
            bn(x)
        for name, buffer in bn.named_buffers():
            assert torch.equal(buffer, before[name]), f"{name} changed by the failed call"
        store.set("rank0_done", "1")
    else:
        store.wait(["rank0_done"], timedelta(seconds=GROUP_DEADLINE_S))


def _two_rank_worker(rank: int, world_size: int, store: Any) -> None:
    _check_equivalence(rank, world_size, _configs([(1, 1), (2, 5), (0, 3)]), [(1, 0), (0, 1)])
    _check_ddp(rank, world_size, [(3, 2), (4, 0), (1, 2)])
    _check_act(rank, world_size, (3, 0))
    _check_act(rank, world_size, (2, 3))
    _check_hang(rank, world_size, store)


def _three_rank_worker(rank: int, world_size: int, store: Any) -> None:
    _check_equivalence(rank, world_size, _configs([(5, 0, 3), (1, 1, 0), (2, 3, 4)]), [(0, 1, 0)])
    _check_ddp(rank, world_size, [(2, 0, 3), (1, 1, 1)])


@pytest.mark.slow
def test_two_ranks_equal_one_process_and_a_skipped_call_is_an_error_not_a_hang() -> None:
    """Equivalence (incl. (1, 1) and empty ranks), DDP steps, then the hang case, on 2 ranks."""
    _run_group(_two_rank_worker, 2)


@pytest.mark.slow
def test_three_ranks_with_uneven_and_empty_batches_equal_one_process() -> None:
    """Equivalence with batch sizes like (5, 0, 3) and DDP steps, on 3 ranks."""
    _run_group(_three_rank_worker, 3)


# --------------------------------------------------------------------------------------------
# In process: math helpers, world size 1, no process group, conversion
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_chan_merge_equals_moments_of_the_concatenation(offset: float) -> None:
    gen = torch.Generator().manual_seed(3)
    parts = [
        offset + torch.randn(n, 4, 3, generator=gen, dtype=torch.float64) for n in (5, 0, 1, 7)
    ]
    moments = [local_moments(part, torch.float64) for part in parts]
    merged = chan_merge(
        torch.stack([m.n for m in moments]),
        torch.stack([m.mean for m in moments]),
        torch.stack([m.m2 for m in moments]),
    )
    whole = torch.cat(parts)  # (13, 4, 3)
    var, mean = torch.var_mean(whole, dim=(0, 2), correction=0)
    assert merged.n.item() == whole.shape[0] * whole.shape[2]
    torch.testing.assert_close(merged.mean, mean, atol=1e-12 * (1 + offset), rtol=1e-12)
    torch.testing.assert_close(merged.m2 / merged.n, var, atol=1e-10, rtol=1e-8)


def test_chan_merge_of_empty_groups_is_zero() -> None:
    empty = local_moments(torch.zeros(0, 2, 3), torch.float32)
    merged = chan_merge(empty.n.reshape(1), empty.mean[None], empty.m2[None])
    assert merged.n.item() == 0
    assert torch.equal(merged.mean, torch.zeros(2))
    assert torch.equal(merged.m2, torch.zeros(2))


def _compare_with_torch(shape: tuple[int, ...], momentum: float | None = 0.1) -> None:
    """Two training steps and one eval step of SyncBatchNorm vs torch.nn.BatchNorm*."""
    reference = _torch_class(len(shape))(shape[1], momentum=momentum).double()
    ours = SyncBatchNorm(shape[1], momentum=momentum, dtype=torch.float64)
    for seed in range(2):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        dy = torch.randn(shape, generator=gen, dtype=torch.float64)
        x_ref, x_mine = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ref, y_mine = reference(x_ref), ours(x_mine)
        y_ref.backward(dy)
        y_mine.backward(dy)
        _close(y_mine, y_ref, torch.float64, "output")
        _close(x_mine.grad, x_ref.grad, torch.float64, "input grad")
        _close(ours.weight.grad, reference.weight.grad, torch.float64, "weight grad")
        _close(ours.bias.grad, reference.bias.grad, torch.float64, "bias grad")
        _check_buffers(ours, reference, torch.float64, f"{shape}")
    ours.eval()
    reference.eval()
    _close(ours(x), reference(x), torch.float64, "eval output")


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 3, 4, 2), (2, 3, 2, 2, 2)])
def test_outside_a_process_group_it_is_plain_batch_norm(shape: tuple[int, ...]) -> None:
    assert not dist.is_initialized()
    _compare_with_torch(shape, momentum=None)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        SyncBatchNorm(3)(torch.randn(1, 3))


@pytest.fixture
def world_of_one(tmp_path):
    """A gloo process group of one rank in this process, destroyed afterwards."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group(
        "gloo", store=store, rank=0, world_size=1, timeout=timedelta(seconds=30)
    )
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_world_size_one_is_plain_batch_norm(world_of_one) -> None:
    _compare_with_torch((4, 3, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_synchronized_path_with_one_rank_equals_torch(world_of_one, dtype: torch.dtype) -> None:
    """The collective path itself (forced, world size 1) against F.batch_norm."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 3, 2, generator=gen, dtype=torch.float64).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(3, dtype=dtype), torch.randn(3, dtype=dtype)
    dy = torch.randn(x.shape, generator=gen, dtype=dtype)
    mean, var = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = bnd.sync_batch_norm_pure(leaves[0], mean, var, leaves[1], leaves[2], 0.2, 1e-5)
    out.output.backward(dy)
    expected_mean, expected_var = mean.clone(), var.clone()
    ref_leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y_ref = nn.functional.batch_norm(
        ref_leaves[0], expected_mean, expected_var, ref_leaves[1], ref_leaves[2], True, 0.2, 1e-5
    )
    y_ref.backward(dy)
    assert out.output.is_contiguous(memory_format=torch.channels_last)
    _close(out.output, y_ref, dtype, "output")
    for mine, theirs in zip(leaves, ref_leaves, strict=True):
        _close(mine.grad, theirs.grad, dtype, "gradient")
    _close(out.running_mean, expected_mean, dtype, "running_mean")
    _close(out.running_var, expected_var, dtype, "running_var")
    assert torch.equal(mean, torch.zeros(3, dtype=dtype)), "pure: the given buffer changed"


def test_module_takes_the_synchronized_path_only_in_training(world_of_one, monkeypatch) -> None:
    """With a (pretended) world of 2, training goes through the collective, eval does not."""
    calls = []
    monkeypatch.setattr(bnd, "_world_size", lambda group: 2)
    real_gather = dist.all_gather
    monkeypatch.setattr(dist, "all_gather", lambda *a, **k: calls.append(1) or real_gather(*a, **k))
    ours, reference = SyncBatchNorm(3), nn.BatchNorm1d(3)
    x = torch.randn(5, 3, 2)
    _close(ours(x), reference(x), torch.float32, "training output")
    _check_buffers(ours, reference, torch.float32, "after one step")
    assert calls == [1]
    _close(ours.eval()(x), reference.eval()(x), torch.float32, "eval output")
    assert calls == [1], "evaluation must not call a collective"


def test_synchronized_path_errors_and_empty_batch(world_of_one) -> None:
    mean, var = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="global batch"):
        bnd.sync_batch_norm_pure(torch.randn(1, 3), mean, var, None, None, 0.1, 1e-5)
    with pytest.raises(ValueError, match="weight: expected shape"):
        bnd.sync_batch_norm_pure(torch.randn(4, 3), mean, var, torch.ones(2), None, 0.1, 1e-5)
    with pytest.raises(ValueError, match="input: expected a tensor of shape"):
        bnd.sync_batch_norm_pure(torch.randn(4), mean, var, None, None, 0.1, 1e-5)
    with pytest.raises(TypeError, match=r"input: expected a torch\.Tensor"):
        bnd.sync_batch_norm_pure([[1.0]], mean, var, None, None, 0.1, 1e-5)
    x = torch.randn(0, 3, 4, requires_grad=True)
    weight = torch.ones(3, requires_grad=True)
    out = bnd.sync_batch_norm_pure(x, mean, var, weight, None, 0.1, 1e-5)
    assert out.output.shape == (0, 3, 4)
    assert torch.equal(out.running_mean, mean)
    assert torch.equal(out.running_var, var)
    out.output.sum().backward()
    assert torch.equal(weight.grad, torch.zeros(3))
    assert x.grad.shape == (0, 3, 4)


def test_failed_collectives_raise_a_clear_error(world_of_one, monkeypatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("peer closed the connection")

    x = torch.randn(4, 3, requires_grad=True)
    out = bnd.sync_batch_norm_pure(x, None, None, None, None, 0.1, 1e-5)
    monkeypatch.setattr(dist, "all_reduce", broken)
    with pytest.raises(RuntimeError, match=r"all_reduce of the gradient sums \(backward\)"):
        out.output.sum().backward()
    monkeypatch.setattr(dist, "all_gather", broken)
    with pytest.raises(RuntimeError, match=r"all_gather of the batch statistics.*timeout"):
        bnd.sync_batch_norm_pure(x, None, None, None, None, 0.1, 1e-5)


def test_no_input_grad_needs_no_backward_collective(world_of_one, monkeypatch) -> None:
    weight = torch.ones(3, requires_grad=True)
    out = bnd.sync_batch_norm_pure(torch.randn(4, 3), None, None, weight, None, 0.1, 1e-5)
    monkeypatch.setattr(dist, "all_reduce", None)  # would raise TypeError if called
    out.output.sum().backward()
    assert weight.grad is not None


def _mixed_model() -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm1d(3),
        nn.Sequential(nn.BatchNorm2d(4, affine=False), BatchNorm2d(4)),
        nn.BatchNorm3d(2, track_running_stats=False),
        BatchNorm1d(3, momentum=None),
        BatchNorm3d(2),
        nn.BatchNorm2d(4, bias=False),
        nn.Linear(3, 3),
    )


def test_convert_keeps_tensors_and_revert_restores_classes() -> None:
    model = _mixed_model().eval()
    layers = [
        m
        for m in model.modules()
        if isinstance(m, (BatchNormBase, nn.modules.batchnorm._BatchNorm))
    ]
    classes = [type(m) for m in layers]
    state = copy.deepcopy(model.state_dict())
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    group = object()
    converted = SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    synced = [m for m in converted.modules() if isinstance(m, SyncBatchNorm)]
    assert len(synced) == len(layers)
    assert all(m.process_group is group and not m.training for m in synced)
    assert converted.state_dict().keys() == state.keys()
    for name, tensor in list(converted.named_parameters()) + list(converted.named_buffers()):
        assert tensor is tensors[name], f"{name} was copied, not shared"
    reverted = bnd.revert_sync_batchnorm(converted)
    assert [
        type(m) for m in reverted.modules() if type(m) in classes or isinstance(m, BatchNormBase)
    ] == classes
    for name, tensor in list(reverted.named_parameters()) + list(reverted.named_buffers()):
        assert tensor is tensors[name]
    assert not any(hasattr(m, "process_group") for m in reverted.modules())
    torch.testing.assert_close(reverted.state_dict(), state, atol=0, rtol=0)


def test_state_dict_loads_both_ways_with_torch_batch_norm() -> None:
    torch_bn = nn.BatchNorm2d(4)
    torch_bn(torch.randn(3, 4, 2, 2))  # non-trivial buffers and num_batches_tracked
    ours = SyncBatchNorm(4)
    ours.load_state_dict(torch_bn.state_dict())
    torch.testing.assert_close(ours.state_dict(), torch_bn.state_dict(), atol=0, rtol=0)
    back = nn.BatchNorm2d(4)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back.state_dict(), torch_bn.state_dict(), atol=0, rtol=0)


def test_convert_a_single_layer_and_already_synchronized_ones() -> None:
    bn = nn.BatchNorm2d(4)
    bn.qconfig = "a quantization config"
    converted = SyncBatchNorm.convert_sync_batchnorm(bn)
    assert isinstance(converted, SyncBatchNorm)
    assert converted.qconfig == bn.qconfig
    assert SyncBatchNorm.convert_sync_batchnorm(converted) is converted
    direct = SyncBatchNorm(4)
    assert type(SyncBatchNorm.revert_sync_batchnorm(direct)) is BatchNormBase
    from_torch_sync = SyncBatchNorm.convert_sync_batchnorm(nn.SyncBatchNorm(4))
    assert type(SyncBatchNorm.revert_sync_batchnorm(from_torch_sync)) is BatchNormBase
    assert type(SyncBatchNorm.revert_sync_batchnorm(converted)) is nn.BatchNorm2d

    class UnregisteredSyncBatchNorm(SyncBatchNorm):
        pass

    unregistered = UnregisteredSyncBatchNorm(4)
    assert type(SyncBatchNorm.revert_sync_batchnorm(unregistered)) is BatchNormBase


def test_convert_refuses_unregistered_subclasses_and_uninitialized_lazy_layers() -> None:
    class ScaledBatchNorm2d(BatchNorm2d):
        pass

    with pytest.raises(TypeError, match="ScaledBatchNorm2d is a subclass of BatchNormBase"):
        SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(ScaledBatchNorm2d(4)))
    with pytest.raises(ValueError, match="LazyBatchNorm2d has not seen an input"):
        SyncBatchNorm.convert_sync_batchnorm(nn.LazyBatchNorm2d())
    with pytest.raises(TypeError, match="local_class: expected a subclass of BatchNormBase"):
        bnd.register_sync_counterpart(nn.BatchNorm2d, SyncBatchNorm)  # type: ignore[arg-type]


def test_registered_counterpart_keeps_what_the_subclass_adds() -> None:
    class ActBatchNorm2d(BatchNorm2d):
        def __init__(self, num_features: int, negative_slope: float = 0.01) -> None:
            super().__init__(num_features)
            self.negative_slope = negative_slope

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            return nn.functional.leaky_relu(super().forward(input), self.negative_slope)

    class SyncActBatchNorm2d(SyncBatchNorm, ActBatchNorm2d):
        pass

    class FrozenBatchNorm2d(BatchNorm2d):
        pass

    bnd.register_sync_counterpart(ActBatchNorm2d, SyncActBatchNorm2d)
    bnd.register_sync_counterpart(FrozenBatchNorm2d, None)
    frozen = FrozenBatchNorm2d(4)
    model = SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(ActBatchNorm2d(4, 0.5), frozen))
    assert type(model[0]) is SyncActBatchNorm2d
    assert model[0].negative_slope == 0.5
    assert model[1] is frozen
    x = torch.randn(3, 4, 2, 2)
    expected = nn.functional.leaky_relu(nn.functional.batch_norm(x, None, None, training=True), 0.5)
    _close(model[0](x), expected, torch.float32, "activation kept through conversion")
    reverted = SyncBatchNorm.revert_sync_batchnorm(model)
    assert type(reverted[0]) is ActBatchNorm2d
    assert reverted[0].negative_slope == 0.5
    assert not hasattr(reverted[0], "process_group")


# --------------------------------------------------------------------------------------------
# BatchNormAct: conversion keeps the fused activation and residual
# --------------------------------------------------------------------------------------------


def _check_act(rank: int, world_size: int, splits: tuple[int, ...]) -> None:
    """SyncBatchNormAct on slices = leaky_relu(torch BN(x) + z) on the whole batch, grads too."""
    gen = torch.Generator().manual_seed(11)
    shape = (sum(splits), 3, 2, 2)
    x, z, dy = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    start = sum(splits[:rank])
    stop = start + splits[rank]
    local = BatchNormAct2d(3, "leaky_relu", dtype=torch.float64, negative_slope=0.2)
    ours = SyncBatchNorm.convert_sync_batchnorm(local)
    reference = nn.BatchNorm2d(3, dtype=torch.float64)
    x_ref, z_ref = x.clone().requires_grad_(), z.clone().requires_grad_()
    y_ref = nn.functional.leaky_relu(reference(x_ref) + z_ref, 0.2)
    y_ref.backward(dy)
    x_mine = x[start:stop].clone().requires_grad_()
    z_mine = z[start:stop].clone().requires_grad_()
    y_mine = ours(x_mine, residual=z_mine)
    y_mine.backward(dy[start:stop])
    _close(y_mine, y_ref[start:stop], torch.float64, f"rank {rank} act output")
    _close(x_mine.grad, x_ref.grad[start:stop], torch.float64, f"rank {rank} act input grad")
    _close(z_mine.grad, z_ref.grad[start:stop], torch.float64, f"rank {rank} act residual grad")
    summed = torch.stack([ours.weight.grad, ours.bias.grad])
    dist.all_reduce(summed)
    expected_grads = torch.stack([reference.weight.grad, reference.bias.grad])
    _close(summed, expected_grads, torch.float64, f"rank {rank} act weight/bias grads")


def test_act_layers_convert_to_sync_and_back_keeping_the_activation() -> None:
    local = BatchNormAct2d(4, "leaky_relu", negative_slope=0.2)
    converted = SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(local))
    assert type(converted[0]) is bnd.SyncBatchNormAct
    assert (converted[0].activation, converted[0].negative_slope) == ("leaky_relu", 0.2)
    x, z = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    expected = nn.functional.leaky_relu(
        nn.functional.batch_norm(x, None, None, training=True) + z, 0.2
    )
    _close(converted[0](x, residual=z), expected, torch.float32, "outside a group")
    reverted = SyncBatchNorm.revert_sync_batchnorm(converted)
    assert type(reverted[0]) is BatchNormAct2d
    assert reverted[0].negative_slope == 0.2


def test_act_synchronized_path(world_of_one, monkeypatch) -> None:
    monkeypatch.setattr(bnd, "_world_size", lambda group: 2)  # the collective path, 1 rank
    ours = SyncBatchNorm.convert_sync_batchnorm(BatchNormAct1d(3, "silu"))
    x = torch.randn(6, 3, 4, dtype=torch.float32, requires_grad=True)
    z = torch.randn(6, 3, 4, requires_grad=True)
    reference = nn.BatchNorm1d(3)
    x_ref, z_ref = x.detach().clone().requires_grad_(), z.detach().clone().requires_grad_()
    nn.functional.silu(reference(x_ref) + z_ref).sum().backward()
    ours(x, z).sum().backward()
    _close(x.grad, x_ref.grad, torch.float32, "input grad")
    _close(z.grad, z_ref.grad, torch.float32, "residual grad")
    _check_buffers(ours, reference, torch.float32, "act buffers")
    with pytest.raises(ValueError, match="residual"):
        ours(x, torch.randn(2, 3, 4))
    ours.eval()
    _close(ours(x, z), nn.functional.silu(reference.eval()(x) + z), torch.float32, "eval")


def test_double_backward_is_a_clear_error_not_a_lost_gradient(world_of_one) -> None:
    """A gradient penalty through the synchronized path raises instead of dropping its term;
    first-order gradients under ``create_graph`` are unchanged."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64).requires_grad_()
    weight = torch.rand(3, generator=gen, dtype=torch.float64).add(0.5).requires_grad_()
    bias = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    out = bnd.sync_batch_norm_pure(x, None, None, weight, bias, 0.1, 1e-5)
    (dx,) = torch.autograd.grad(out.output.pow(3).sum(), x, create_graph=True)
    (dx_plain,) = torch.autograd.grad(
        bnd.sync_batch_norm_pure(x, None, None, weight, bias, 0.1, 1e-5).output.pow(3).sum(), x
    )
    torch.testing.assert_close(dx, dx_plain)
    penalty = (weight * weight).sum() + dx.pow(2).sum()
    with pytest.raises(RuntimeError, match="SyncBatchNorm: double backward"):
        penalty.backward()
