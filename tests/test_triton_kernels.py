"""Triton kernels under ``TRITON_INTERPRET=1`` against a float64 reference (test chain, step 3).

Every kernel (split reduction, Chan merge with the running update, normalize, backward reduction,
``dx`` pass, inference) and both arrangements (split launches; persistent, which the interpreter
runs as one program) on small odd shapes, layouts and fp32/fp16/bf16.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported

import pytest
import torch

pytest.importorskip("triton")

import triton_helpers as th
from batchnorm.backends import resolve_backend
from batchnorm.backends import triton_backend as tb
from batchnorm.backends.base import Saved
from batchnorm.kernels.triton import batchnorm_fwd, launch
from batchnorm.kernels.triton.common import tile_config

CPU = torch.device("cpu")


@pytest.fixture(params=["split", "persistent"])
def arrangement(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each arrangement, chosen through ``BATCHNORM_TRITON_ARRANGEMENT``."""
    monkeypatch.setenv(tb.ARRANGEMENT_ENV_VAR, request.param)
    return str(request.param)


def _view3(x: torch.Tensor) -> torch.Tensor:
    """The ``(N, C, L)`` view the functional layer hands to backends (a view, never a copy)."""
    x3 = x.reshape(x.shape[0], x.shape[1], -1)
    assert x3.data_ptr() == x.data_ptr()
    return x3


@pytest.mark.parametrize("dtype", th.DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "layout"), th.CASES)
def test_forward_backward_match_reference(
    shape: tuple[int, ...], layout: str, dtype: torch.dtype, arrangement: str
) -> None:
    """Plain training forward (y, μ, r, σ²) and backward (dx, dγ, dβ) of the backend."""
    x = th.make(shape, layout, dtype)
    weight = th.make(shape[1:2], seed=1) + 1.5  # (C,) float32
    bias = th.make(shape[1:2], seed=2)
    dy = th.make(shape, layout, dtype, seed=3)
    backend = resolve_backend("triton", CPU)
    result = backend.forward(_view3(x), weight, bias, 1e-5)
    expected = th.reference(x, weight, bias, None, dy)
    th.assert_close_to(result.y.reshape(shape), expected["y"], dtype, "y")
    assert result.y.dtype == dtype
    for name in ("mean", "var", "invstd"):
        actual = getattr(result, name)
        assert actual.dtype == torch.float32, name
        torch.testing.assert_close(actual.double(), expected[name], atol=1e-5, rtol=1e-5)
    dx, dweight, dbias = backend.backward(
        _view3(dy), Saved(_view3(x), weight, result.mean, result.invstd)
    )
    th.assert_close_to(dx.reshape(shape), expected["dx"], dtype, "dx")
    th.assert_close_to(dweight, expected["dweight"], dtype, "dweight")
    th.assert_close_to(dbias, expected["dbias"], dtype, "dbias")
    if layout == "channels_last":  # output keeps the input's memory format
        assert result.y.reshape(shape).stride() == x.stride()


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "silu", "gelu"])
def test_fused_op_with_residual_and_running_update(activation: str, arrangement: str) -> None:
    """``triton_train`` + its autograd: act(bn(x) + z), dz, and the in-kernel running update."""
    shape = (3, 5, 7)
    x, z, dy = (th.make(shape, seed=s) for s in (0, 4, 3))
    weight, bias = th.make((5,), seed=1), th.make((5,), seed=2)
    running_mean, running_var = th.make((5,), seed=5), th.make((5,), seed=6).abs() + 0.5
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, z)]
    outputs = tb.train_op(
        leaves[0], leaves[1], leaves[2], leaves[3], running_mean, running_var, 0.3, 1e-5,
        activation, th.NEGATIVE_SLOPE,
    )  # fmt: skip
    y, mean, _invstd, var, mask, new_mean, new_var = outputs
    grads = torch.autograd.grad(y, leaves, dy)
    expected = th.reference(x, weight, bias, z, dy, activation)
    th.assert_close_to(y, expected["y"], torch.float32, "y")
    for actual, name in zip(grads, ("dx", "dweight", "dbias", "dresidual"), strict=True):
        th.assert_close_to(actual, expected[name], torch.float32, name)
    # (leaky) ReLU with a residual keeps the u > 0 mask for backward, the others nothing.
    assert mask.shape == (shape if activation in ("relu", "leaky_relu") else (0,))
    m = 3 * 7
    torch.testing.assert_close(new_mean, 0.7 * running_mean + 0.3 * expected["mean"].float())
    unbiased = expected["var"].float() * m / (m - 1)
    torch.testing.assert_close(new_var, 0.7 * running_var + 0.3 * unbiased)
    torch.testing.assert_close(var.double(), expected["var"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mean.double(), expected["mean"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", th.DTYPES, ids=str)
@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
def test_inference_kernel(dtype: torch.dtype, activation: str | None) -> None:
    """Evaluation from running statistics, channels_last, with residual and activation."""
    shape = (2, 5, 3, 3)
    x, z = th.make(shape, "channels_last", dtype), th.make(shape, "channels_last", dtype, seed=4)
    weight, bias = th.make((5,), seed=1), th.make((5,), seed=2)
    running_mean, running_var = th.make((5,), seed=5), th.make((5,), seed=6).abs() + 0.5
    y = tb.inference_op(
        _view3(x), running_mean, running_var, weight, bias, _view3(z), 1e-5, activation or "none",
        0.01,
    )  # fmt: skip
    u = torch.nn.functional.batch_norm(
        x.double(), running_mean.double(), running_var.double(), weight.double(), bias.double()
    )
    expected = th.ACTIVATION_FUNCTIONS[activation](u + z.double())
    th.assert_close_to(y.reshape(shape), expected, dtype, "y")
    assert y.dtype == dtype


@pytest.mark.parametrize(
    ("shape", "tiles", "programs"),
    [
        ((1, 3, 67), {"block_l": 16}, 5),  # 1-D rows: 5 programs of 16 rows, the last partial
        ((5, 3, 13), {"block_l": 8, "block_n": 2}, 6),  # 2-D (n, l) tiles: 3 × 2 of them
    ],
    ids=["rows", "n-l-tiles"],
)
def test_many_row_programs_merge_exactly(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], tiles: dict[str, int], programs: int
) -> None:
    """Small tiles, several row programs and a 2-wide merge step: every Chan merge path runs,
    and the last program to arrive merges the partials of all the others."""

    def small_tiles(x3: torch.Tensor, batch: int, length: int, vec: int = 1) -> object:
        return tile_config(batch, length, x3.shape[1], False, 64, block_c=2, vec=vec, **tiles)

    monkeypatch.setattr(launch, "_config", small_tiles)
    monkeypatch.setattr(batchnorm_fwd, "merge_block_p", lambda row_programs: 2)
    x = th.make(shape, offset=3.0)
    dy = th.make(shape, seed=3)
    weight, bias = th.make((3,), seed=1), th.make((3,), seed=2)
    backend = resolve_backend("triton", CPU)
    batch, length, _vec, _ = launch._geometry(shape[0], shape[2], (x,))
    assert small_tiles(x, batch, length).row_programs == programs
    for _ in range(2):  # the second call finds the counters the first one left at zero
        result = backend.forward(x, weight, bias, 1e-5)
        expected = th.reference(x, weight, bias, None, dy)
        th.assert_close_to(result.y, expected["y"], torch.float32, "y")
        torch.testing.assert_close(result.var.double(), expected["var"], atol=1e-6, rtol=1e-5)
        dx, dweight, dbias = backend.backward(dy, Saved(x, weight, result.mean, result.invstd))
        th.assert_close_to(dx, expected["dx"], torch.float32, "dx")
        th.assert_close_to(dweight, expected["dweight"], torch.float32, "dweight")
        th.assert_close_to(dbias, expected["dbias"], torch.float32, "dbias")


def test_counters_are_left_at_zero(arrangement: str) -> None:
    """Every kernel that counts arrivals resets its counter: the cached buffer stays all zeros
    (arrivals) after forward and backward, so no launch ever needs a zero fill."""
    x = th.make((3, 5, 7)).requires_grad_()
    y = resolve_backend("triton", CPU).forward(x, None, None, 1e-5).y
    _partial, counter = launch.scratch(CPU, 1, 1)
    assert torch.equal(counter[0::2], torch.zeros_like(counter[0::2]))
    backend = resolve_backend("triton", CPU)
    result = backend.forward(x.detach(), None, None, 1e-5)
    backend.backward(torch.ones_like(y), Saved(x.detach(), None, result.mean, result.invstd))
    assert torch.equal(counter[0::2], torch.zeros_like(counter[0::2]))


def test_large_offset_keeps_precision() -> None:
    """Mean 1e4, std 1: Welford/Chan keep the variance (E[x²] − E[x]² would lose it all)."""
    x = th.make((4, 3, 50), offset=1e4)
    result = resolve_backend("triton", CPU).forward(x, None, None, 1e-5)
    var64 = x.double().var(dim=(0, 2), correction=0)
    torch.testing.assert_close(result.var.double(), var64, rtol=1e-4, atol=0)


def test_empty_batch_and_float64() -> None:
    """N = 0 gives empty outputs without launching; float64 is computed by the torch backend."""
    backend = resolve_backend("triton", CPU)
    empty = torch.empty(0, 3, 4)
    result = backend.forward(empty, None, None, 1e-5)
    assert result.y.shape == empty.shape
    dx, dweight, _dbias = backend.backward(empty, Saved(empty, None, result.mean, result.invstd))
    assert dx.shape == empty.shape
    assert torch.equal(dweight, torch.zeros(3))
    assert (
        tb.inference_op(
            empty, torch.zeros(3), torch.ones(3), None, None, None, 1e-5, "none", 0.0
        ).shape
        == empty.shape
    )
    x64 = th.make((4, 3, 5)).double()
    result64 = backend.forward(x64, None, None, 1e-5)
    assert result64.y.dtype == torch.float64
    assert not backend.supports_fusion(x64)
    expected = th.reference(x64, None, None, None, torch.ones_like(x64))
    torch.testing.assert_close(result64.y, expected["y"])
    dx64, _, _ = backend.backward(
        torch.ones_like(x64), Saved(x64, None, result64.mean, result64.invstd)
    )
    torch.testing.assert_close(dx64, expected["dx"])


def test_unknown_arrangement_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    """A misspelt ``BATCHNORM_TRITON_ARRANGEMENT`` is an error naming the variable."""
    monkeypatch.setenv(tb.ARRANGEMENT_ENV_VAR, "cooperative")
    with pytest.raises(ValueError, match="BATCHNORM_TRITON_ARRANGEMENT"):
        resolve_backend("triton", CPU).forward(th.make((2, 3, 4)), None, None, 1e-5)


@pytest.mark.parametrize(
    ("batch", "length", "channels", "contiguous", "target"),
    [
        (1, 1, 1, False, 4),
        (2, 35, 3, False, 4),
        (1, 13, 64, True, 528),
        (1, 10**6, 1000, True, 528),
        (256, 49, 2048, False, 528),
        (256, 196, 256, False, 528),
        (256, 3136, 64, False, 528),
        (5, 7, 7, False, 1),
    ],
)
def test_tile_config_covers_the_problem(
    batch: int, length: int, channels: int, contiguous: bool, target: int
) -> None:
    """Every (n, l) row and channel belongs to exactly one program; tiles are powers of two."""
    config = tile_config(batch, length, channels, contiguous, target)
    for block in (config.block_n, config.block_l, config.block_c, config.l_vec):
        assert block & (block - 1) == 0
    assert length % config.l_vec == 0
    assert (
        config.channel_blocks * config.block_c
        >= channels
        > (config.channel_blocks - 1) * config.block_c
    )
    tiles = -(-batch // config.block_n) * -(-length // config.block_l)
    assert config.row_programs * config.tiles_per_program >= tiles
    assert (config.row_programs - 1) * config.tiles_per_program < tiles
    assert config.grid == (config.channel_blocks, config.row_programs)
    if target == 1:
        assert config.row_programs == 1


@pytest.mark.parametrize(
    ("length", "block_l", "l_vec"),
    [(3136, 256, 8), (784, 64, 8), (12544, 1024, 8), (196, 256, 4), (49, 64, 1)],
)
def test_nchw_tiles_for_resnet_sizes(length: int, block_l: int, l_vec: int) -> None:
    """56², 28², 112² get tiles that mask at most 1/16 of the rows; 14² and 7² whole rows per
    tile; ``L_VEC`` divides L and the strides (the vector width the kernels may use along l),
    which are passed in units of it."""
    x3 = torch.empty(256, 256, length, device="meta")  # NCHW
    batch, length_, vec, strides = launch._geometry(256, length, (x3, x3))
    assert (batch, length_, vec) == (256, length, l_vec)
    assert strides[0] == (256 * length // l_vec, length // l_vec, 1)
    config = tile_config(batch, length, 256, False, 528, vec=vec)
    assert (config.block_l, config.l_vec) == (block_l, l_vec)
    assert config.block_n * config.block_l * config.block_c <= 4096
    # Batch rows 4 elements apart from a multiple of 8: at most 4-wide, whatever L allows.
    odd = torch.empty_strided((256, 256, length), (256 * length + 4, length, 1), device="meta")
    assert launch._geometry(256, length, (odd,))[2] == (1 if l_vec == 1 else min(l_vec, 4))


def test_geometry_merges_rows_only_when_every_tensor_allows() -> None:
    """channels_last and (M, C) take one row axis; NCHW, or any NCHW tensor, keeps (n, l)."""
    nchw = torch.empty(4, 3, 10)
    last = torch.empty(4, 10, 3).transpose(1, 2)  # (N, C, L) view of channels_last
    assert launch._geometry(4, 10, (last, last)) == (1, 40, 1, [(0, 1, 3), (0, 1, 3)])
    assert launch._geometry(4, 10, (nchw,)) == (4, 10, 2, [(15, 5, 1)])  # in units of L_VEC 2
    assert launch._geometry(4, 10, (last, nchw))[0] == 4
    flat = torch.empty(4, 3, 1)
    assert launch._geometry(4, 1, (flat,)) == (1, 4, 1, [(0, 1, 3)])


def test_resident_programs_follows_occupancy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Occupancy from registers, threads and shared memory, times the SM count."""

    class Props:
        multi_processor_count = 132
        regs_per_multiprocessor = 65536
        max_threads_per_multi_processor = 2048
        shared_memory_per_multiprocessor = 228 * 1024

    class Metadata:
        num_warps = 4
        shared = 0

    class Compiled:
        metadata = Metadata()
        n_regs = 128

        def _init_handles(self) -> None:
            pass

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    compiled = Compiled()
    # 128 registers × 128 threads = 16384 per program → 4 per SM.
    assert launch._resident_programs(compiled, torch.device("cuda")) == 4 * 132
    compiled.n_regs = 32  # 4096 per program → 16 by registers, but 2048 / 128 threads = 16
    assert launch._resident_programs(compiled, torch.device("cuda")) == 16 * 132
    Metadata.shared = 100 * 1024  # two programs' shared memory fit per SM
    assert launch._resident_programs(compiled, torch.device("cuda")) == 2 * 132


def test_cpu_tensor_without_interpreter_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside the interpreter a CPU tensor gets a clear error instead of a launch failure."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = th.make((2, 3, 4))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", CPU).forward(x, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="expected a CUDA tensor"):
        tb.inference_op(x, torch.zeros(3), torch.ones(3), None, None, None, 1e-5, "none", 0.0)
