"""recalibrate() (PreciseBN) against population statistics computed by hand, and across ranks."""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from batchnorm.modules import BatchNorm1d, BatchNorm2d
from batchnorm.tools import recalibrate
from batchnorm.variants.frozen import FrozenBatchNorm2d
from batchnorm.variants.renorm import BatchRenorm1d

SIZES = (5, 3, 8, 2, 6)  # unequal batch sizes: each batch must count by its size


def _batches(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 4, generator=gen) * 3 + 1 for n in SIZES]


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 3), BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2), nn.BatchNorm1d(2)
    )


def _population(values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance per channel of every value of every batch, in float64."""
    flat = torch.cat([v.double().transpose(0, 1).reshape(v.shape[1], -1) for v in values], dim=1)
    return flat.mean(dim=1), flat.var(dim=1)


def test_equals_population_statistics_computed_by_hand():
    model = _mlp().eval()
    batches = _batches()
    first_inputs, second_inputs = [], []
    with torch.no_grad():  # by hand: training-mode BN (batch statistics) between the layers
        for x in batches:
            z = model[0](x)
            first_inputs.append(z)
            a = torch.relu(F.batch_norm(z, None, None, model[1].weight, model[1].bias, True))
            second_inputs.append(model[3](a))
    tracked = model[1].num_batches_tracked.clone()
    recalibrate(model, batches, progress=False)
    for layer, inputs in ((model[1], first_inputs), (model[4], second_inputs)):
        mean, var = _population(inputs)
        torch.testing.assert_close(layer.running_mean, mean.float(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer.running_var, var.float(), rtol=1e-6, atol=1e-6)
    assert torch.equal(model[1].num_batches_tracked, tracked)
    assert not any(m.training for m in model.modules())  # evaluation mode restored


def test_spatial_layers_count_every_position_and_flags_are_restored(capsys):
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 1), BatchNorm2d(3), FrozenBatchNorm2d(3), BatchNorm2d(3, freeze_stats=True)
    )
    model.train()
    model[0].eval()  # a mixed state must come back as it was
    frozen_before = {k: v.clone() for k, v in model[2].state_dict().items()}
    fixed_before = {k: v.clone() for k, v in model[3].state_dict().items()}
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(n, 2, 3, 4, generator=gen) - 2, torch.zeros(n)) for n in (2, 5, 1)]
    recalibrate(model, batches, num_batches=2)  # (inputs, targets) pairs; only the first two
    with torch.no_grad():
        mean, var = _population([model[0](x) for x, _ in batches[:2]])
    torch.testing.assert_close(model[1].running_mean, mean.float())
    torch.testing.assert_close(model[1].running_var, var.float())
    for layer, before in ((model[2], frozen_before), (model[3], fixed_before)):
        for key, value in layer.state_dict().items():
            assert torch.equal(value, before[key]), key
    assert [m.training for m in model] == [False, True, True, True]
    assert "recalibrate" in capsys.readouterr().err  # the progress bar


def test_side_effects_of_the_passes_are_undone():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(4, 3), BatchRenorm1d(3, warmup_steps=0, r_max_steps=0, d_max_steps=0)
    )
    step = model[1].renorm_step.clone()
    recalibrate(model, _batches(), progress=False)
    assert torch.equal(model[1].renorm_step, step)


def test_unused_layer_warns_and_keeps_statistics():
    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.BatchNorm1d(4)
            self.unused = nn.BatchNorm1d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    model = Branch()
    with pytest.warns(UserWarning, match="unused saw 0"):
        recalibrate(model, _batches(), progress=False)
    assert torch.equal(model.unused.running_var, torch.ones(4))


def test_bad_arguments_change_nothing():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrate(model, [], progress=False)
    with pytest.raises(ValueError, match="num_batches"):
        recalibrate(model, _batches(), num_batches=0)
    with pytest.raises(TypeError, match="forward="):
        recalibrate(model, [{"x": torch.randn(3, 4)}], progress=False)
    with pytest.raises(TypeError, match="model"):
        recalibrate("model", _batches())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.training
    custom = recalibrate(
        model, [{"x": b} for b in _batches()], forward=lambda m, b: m(b["x"]), progress=False
    )
    assert custom is model


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(rank: int, world_size: int, port: int, path: str) -> None:
    """One rank: recalibrates on its share of the batches (unequal sizes) and saves the result."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=30),
    )
    try:
        model = _mlp()
        share = _batches()[rank::world_size]  # rank 0: sizes 5, 8, 6; rank 1: sizes 3, 2
        recalibrate(model, share, process_group=dist.group.WORLD, progress=rank == 0)
        torch.save(model.state_dict(), os.path.join(path, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path):
    context = mp.start_processes(
        _worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2 gloo processes did not finish within 120 s")
    single = recalibrate(_mlp(), _batches(), progress=False)
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt")
        for key, value in single.state_dict().items():
            torch.testing.assert_close(
                state[key], value, rtol=1e-6, atol=1e-6, msg=f"rank {rank} {key}"
            )


def test_single_rank_group_equals_no_group():
    """A one-process gloo group runs the merge code in this process; it must change nothing."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{_free_port()}",
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=30),
    )
    try:
        grouped = recalibrate(_mlp(), _batches(), process_group=dist.group.WORLD)
        # a rank without batches still joins the merge, with zero samples
        with pytest.warns(UserWarning, match="saw 0 value"):
            empty = recalibrate(_mlp(), [], process_group=dist.group.WORLD, progress=False)
    finally:
        dist.destroy_process_group()
    single = recalibrate(_mlp(), _batches(), progress=False)
    for key, value in single.state_dict().items():
        torch.testing.assert_close(grouped.state_dict()[key], value, rtol=1e-12, atol=1e-12)
    assert torch.equal(empty[1].running_var, torch.ones(3))
