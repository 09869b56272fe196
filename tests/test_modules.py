"""Check 2 of the chain: ``batchnorm.BatchNorm1d/2d/3d`` vs ``torch.nn.BatchNorm1d/2d/3d``.

Every constructor flag combination, every rank, both layouts, float32 and float64; three training
steps then evaluation, comparing outputs, gradients, running buffers and ``num_batches_tracked``
after every step. Then state_dict layout and loading both ways, resets, repr, dtype/device moves,
and the ``backend=`` keyword.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.backends import BACKEND_ENV_VAR
from conftest import (
    BACKENDS,
    assert_bit_identical,
    assert_close,
    buffers_of,
    make_input,
    per_channel,
    torch_memory_format,
)

PAIRS = {
    1: (batchnorm.BatchNorm1d, nn.BatchNorm1d),
    2: (batchnorm.BatchNorm2d, nn.BatchNorm2d),
    3: (batchnorm.BatchNorm3d, nn.BatchNorm3d),
}

#: (module family, input shape, memory format); channel count is always 3.
CASES = [
    (1, (6, 3), "contiguous"),
    (1, (4, 3, 5), "contiguous"),
    (2, (3, 3, 4, 5), "contiguous"),
    (2, (3, 3, 4, 5), "channels_last"),
    (3, (2, 3, 3, 2, 4), "contiguous"),
    (3, (2, 3, 3, 2, 4), "channels_last"),
]
CASE_IDS = ["1d-NC", "1d-NCL", "2d", "2d-cl", "3d", "3d-cl"]


def _flag_params() -> list:
    """All 16 (affine, track_running_stats, momentum, bias) combinations as pytest params."""
    params = []
    for affine, track, momentum, bias in itertools.product(
        (True, False), (True, False), (0.1, None), (True, False)
    ):
        flags = {
            "affine": affine,
            "track_running_stats": track,
            "momentum": momentum,
            "bias": bias,
        }
        name = f"affine={affine}-track={track}-momentum={momentum}-bias={bias}"
        params.append(pytest.param(flags, id=name))
    return params


FLAGS = _flag_params()


def _pair(family: int, flags: dict, dtype=torch.float32, eps: float = 1e-3, **ours_kw):
    """(ours, torch's) with the same flags and the same random affine parameters."""
    ours_cls, ref_cls = PAIRS[family]
    ours = ours_cls(3, eps=eps, dtype=dtype, **flags, **ours_kw)
    ref = ref_cls(3, eps=eps, dtype=dtype, **flags)
    _randomize_parameters(ours, ref)
    return ours, ref


def _randomize_parameters(ours: nn.Module, ref: nn.Module, seed: int = 0) -> None:
    ours_params, ref_params = dict(ours.named_parameters()), dict(ref.named_parameters())
    assert ours_params.keys() == ref_params.keys()
    with torch.no_grad():
        for i, name in enumerate(ref_params):
            values = per_channel(ref_params[name].numel(), ref_params[name].dtype, seed=seed + i)
            ours_params[name].copy_(values + (1.0 if name == "weight" else 0.0))
            ref_params[name].copy_(values + (1.0 if name == "weight" else 0.0))


def _assert_state_matches(ours: nn.Module, ref: nn.Module, where: str) -> None:
    """Gradients of parameters and the running buffers of ours ≈ torch's (counter exactly)."""
    for name in ("weight", "bias"):
        p_ours, p_ref = getattr(ours, name), getattr(ref, name)
        if p_ref is None:
            assert p_ours is None, f"{where}: {name} should be None"
            continue
        assert_close(p_ours.grad, p_ref.grad, msg=f"{where} d{name}")
    for name in ("running_mean", "running_var"):
        assert_close(getattr(ours, name), getattr(ref, name), msg=f"{where} {name}")
    nbt_ours, nbt_ref = ours.num_batches_tracked, ref.num_batches_tracked
    if nbt_ref is None:
        assert nbt_ours is None, where
    else:
        assert nbt_ours.dtype == nbt_ref.dtype == torch.long
        assert torch.equal(nbt_ours, nbt_ref), f"{where}: {nbt_ours} vs {nbt_ref}"


def _step(ours, ref, shape, memory_format, dtype, seed: int, where: str) -> None:
    """One forward/backward on the same input; compares output, dx, grads and buffers."""
    kw = {"seed": seed, "scale": 1.0 + seed % 3, "offset": seed % 5 - 2.0, "requires_grad": True}
    x_ours = make_input(shape, memory_format, dtype, **kw)
    x_ref = make_input(shape, memory_format, dtype, **kw)
    y_ours, y_ref = ours(x_ours), ref(x_ref)
    assert_close(y_ours, y_ref, msg=f"{where} output")
    if memory_format == "channels_last":
        assert y_ours.is_contiguous(memory_format=torch_memory_format(len(shape), memory_format))
    dy = make_input(shape, "contiguous", dtype, seed=1000 + seed)
    y_ours.backward(dy)
    y_ref.backward(dy)
    assert_close(x_ours.grad, x_ref.grad, msg=f"{where} dx")
    _assert_state_matches(ours, ref, where)


@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(("family", "shape", "memory_format"), CASES, ids=CASE_IDS)
def test_matches_torch_train_then_eval(family, shape, memory_format, dtype, flags) -> None:
    ours, ref = _pair(family, flags, dtype)
    for step in range(3):
        _step(ours, ref, shape, memory_format, dtype, seed=step, where=f"train step {step}")
    ours.eval()
    ref.eval()
    for step in range(3, 5):
        before = buffers_of(ours)
        _step(ours, ref, shape, memory_format, dtype, seed=step, where=f"eval step {step}")
        assert_bit_identical(before, buffers_of(ours))
    # Back to training: the counter and the momentum=None schedule carry on.
    ours.train()
    ref.train()
    _step(ours, ref, shape, memory_format, dtype, seed=5, where="train again")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_backend_keyword(backend, momentum) -> None:
    flags = {"momentum": momentum}
    ours, ref = _pair(2, flags, backend=backend)
    assert ours.backend == backend
    for step in range(3):
        _step(ours, ref, (3, 3, 4, 5), "channels_last", torch.float32, step, f"step {step}")
    ours.eval()
    ref.eval()
    _step(ours, ref, (3, 3, 4, 5), "contiguous", torch.float32, 3, "eval")


def test_env_var_applies_to_modules_without_backend(monkeypatch) -> None:
    ours = batchnorm.BatchNorm1d(3)
    monkeypatch.setenv(BACKEND_ENV_VAR, "bogus")
    before = buffers_of(ours)
    with pytest.raises(ValueError, match=BACKEND_ENV_VAR):
        ours(torch.randn(4, 3))
    assert_bit_identical(before, buffers_of(ours))


def test_bogus_backend_keyword_raises_and_leaves_buffers(monkeypatch) -> None:
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    with pytest.raises(ValueError, match=r"\bbackend\b"):  # a named backend loads at construction
        batchnorm.BatchNorm2d(3, backend="bogus")
    ours = batchnorm.BatchNorm2d(3)
    ours.backend = "bogus"  # the attribute can still be changed later: checked at the call
    before = buffers_of(ours)
    with pytest.raises(ValueError, match=r"\bbackend\b"):
        ours(torch.randn(2, 3, 2, 2))
    assert_bit_identical(before, buffers_of(ours))


def test_frozen_parameters_match_torch() -> None:
    ours, ref = _pair(2, {})
    for module in (ours, ref):
        module.weight.requires_grad_(False)
        module.bias.requires_grad_(False)
    _step(ours, ref, (3, 3, 4, 5), "contiguous", torch.float32, 0, "frozen")
    assert ours.weight.grad is None
    assert ours.bias.grad is None


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(
    ("family", "shape"),
    [
        (2, (0, 3, 2, 2)),
        (1, (0, 3)),
        (1, (2, 3, 0)),
    ],
)
def test_empty_batch_matches_torch(family, shape, momentum) -> None:
    ours, ref = _pair(family, {"momentum": momentum})
    ordinary = make_input((4, *shape[1:2], *(s or 1 for s in shape[2:])), seed=3)
    ours(ordinary)  # one ordinary batch first, so the buffers are not at their initial values
    ref(ordinary)
    x_ours = torch.randn(shape, requires_grad=True)
    x_ref = x_ours.detach().clone().requires_grad_()
    y_ours, y_ref = ours(x_ours), ref(x_ref)
    assert y_ours.shape == y_ref.shape == shape
    y_ours.sum().backward()
    y_ref.sum().backward()
    assert torch.equal(ours.weight.grad, torch.zeros(3))
    _assert_state_matches(ours, ref, "empty batch")


# --------------------------------------------------------------------------- state_dict


@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("family", [1, 2, 3])
def test_state_dict_layout_matches_torch(family, flags) -> None:
    ours, ref = _pair(family, flags, dtype=torch.float64)
    sd_ours, sd_ref = ours.state_dict(), ref.state_dict()
    assert list(sd_ours) == list(sd_ref)
    for key, value in sd_ref.items():
        assert sd_ours[key].dtype == value.dtype, key
        assert sd_ours[key].shape == value.shape, key
    assert sd_ours._metadata[""]["version"] == sd_ref._metadata[""]["version"]
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]


def _trained(module: nn.Module, shape=(4, 3, 2, 2), steps: int = 2) -> nn.Module:
    module.train()
    for step in range(steps):
        module(make_input(shape, seed=50 + step, scale=2.0, offset=1.0))
    return module


def _assert_state_dicts_equal(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), key


@pytest.mark.parametrize("flags", FLAGS)
def test_state_dict_from_torch_loads_into_ours_bit_for_bit(flags) -> None:
    ours, ref = _pair(2, flags)
    _trained(ref)
    _randomize_parameters(ref, ref, seed=7)  # parameters differ from ours' too
    result = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not result.missing_keys
    assert not result.unexpected_keys
    _assert_state_dicts_equal(ours.state_dict(), ref.state_dict())
    # And from there they behave identically.
    _step(ours, ref, (3, 3, 4, 5), "contiguous", torch.float32, 8, "after load")


@pytest.mark.parametrize("flags", FLAGS)
def test_state_dict_from_ours_loads_into_torch_bit_for_bit(flags) -> None:
    ours, ref = _pair(2, flags)
    _trained(ours)
    _randomize_parameters(ours, ours, seed=9)
    result = ref.load_state_dict(ours.state_dict(), strict=True)
    assert not result.missing_keys
    assert not result.unexpected_keys
    _assert_state_dicts_equal(ref.state_dict(), ours.state_dict())
    ours.eval()
    ref.eval()
    _step(ours, ref, (3, 3, 4, 5), "contiguous", torch.float32, 10, "after load")


def test_checkpoint_without_num_batches_tracked_loads_into_ours() -> None:
    """A torch checkpoint with the counter deleted loads strictly; the counter is kept (3)."""
    ref = _trained(nn.BatchNorm2d(3))
    checkpoint = ref.state_dict()
    del checkpoint["num_batches_tracked"]
    ours = _trained(batchnorm.BatchNorm2d(3), steps=3)
    ours.load_state_dict(checkpoint, strict=True)
    assert torch.equal(ours.num_batches_tracked, torch.tensor(3))
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(ours, key), checkpoint[key]), key
    assert "num_batches_tracked" not in checkpoint  # the caller's dict is not modified


@pytest.mark.parametrize("source", ["ours", "torch"])
def test_legacy_checkpoint_without_counter_loads_into_both(source) -> None:
    """A pre-version-2 checkpoint (no metadata, no counter) loads strictly into both."""
    trained = _trained(batchnorm.BatchNorm2d(3) if source == "ours" else nn.BatchNorm2d(3))
    legacy = {k: v.clone() for k, v in trained.state_dict().items() if k != "num_batches_tracked"}
    ours = _trained(batchnorm.BatchNorm2d(3), steps=2)
    ref = _trained(nn.BatchNorm2d(3), steps=2)
    ours.load_state_dict(legacy, strict=True)
    ref.load_state_dict(legacy, strict=True)
    _assert_state_dicts_equal(ours.state_dict(), ref.state_dict())
    assert torch.equal(ours.num_batches_tracked, torch.tensor(2))  # both keep their counter


def test_nested_checkpoint_with_prefix_loads_both_ways() -> None:
    def net(bn_cls):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(2, 3, 1), bn_cls(3), nn.ReLU())

    ref, ours = net(nn.BatchNorm2d), net(batchnorm.BatchNorm2d)
    _trained(ref, shape=(4, 2, 3, 3))
    ours.load_state_dict(ref.state_dict(), strict=True)
    _assert_state_dicts_equal(ours.state_dict(), ref.state_dict())
    x = make_input((2, 2, 3, 3), seed=60)
    ours.eval()
    ref.eval()
    assert_close(ours(x), ref(x))

    _trained(ours, shape=(4, 2, 3, 3), steps=3)
    ref.load_state_dict(ours.state_dict(), strict=True)
    _assert_state_dicts_equal(ref.state_dict(), ours.state_dict())

    checkpoint = ref.state_dict()
    del checkpoint["1.num_batches_tracked"]
    counter_before = ours[1].num_batches_tracked.clone()
    ours.load_state_dict(checkpoint, strict=True)
    assert torch.equal(ours[1].num_batches_tracked, counter_before)


def test_load_rejects_wrong_size_like_torch() -> None:
    checkpoint = nn.BatchNorm2d(4).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch"):
        batchnorm.BatchNorm2d(3).load_state_dict(checkpoint)


# --------------------------------------------------------------------------- resets, repr, moves


@pytest.mark.parametrize("flags", FLAGS)
def test_reset_running_stats_and_parameters_match_torch(flags) -> None:
    ours, ref = _pair(2, flags)
    _trained(ours)
    _trained(ref)
    ours.reset_running_stats()
    ref.reset_running_stats()
    _assert_state_dicts_equal(ours.state_dict(), ref.state_dict())
    if flags["affine"]:
        assert not torch.equal(ours.weight, torch.ones(3))  # parameters were kept
    ours.reset_parameters()
    ref.reset_parameters()
    _assert_state_dicts_equal(ours.state_dict(), ref.state_dict())
    if flags["track_running_stats"]:
        assert torch.equal(ours.running_mean, torch.zeros(3))
        assert torch.equal(ours.running_var, torch.ones(3))
        assert torch.equal(ours.num_batches_tracked, torch.tensor(0))


@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("family", [1, 2, 3])
def test_repr_matches_torch(family, flags) -> None:
    ours_cls, ref_cls = PAIRS[family]
    for num_features, eps in ((3, 1e-5), (7, 1e-3)):
        ours = ours_cls(num_features, eps=eps, **flags)
        ref = ref_cls(num_features, eps=eps, **flags)
        assert ours.extra_repr() == ref.extra_repr()
        assert repr(ours) == repr(ref)


def test_constructor_defaults_match_torch() -> None:
    ours, ref = batchnorm.BatchNorm2d(5), nn.BatchNorm2d(5)
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    _assert_state_dicts_equal(ours.state_dict(), ref.state_dict())
    assert ours.training


def test_double_and_to_match_torch() -> None:
    ours, ref = _pair(2, {"momentum": None})
    ours.double()
    ref.double()
    for module in (ours, ref):
        assert module.weight.dtype == module.bias.dtype == torch.float64
        assert module.running_mean.dtype == module.running_var.dtype == torch.float64
        assert module.num_batches_tracked.dtype == torch.long
    for step in range(2):
        _step(ours, ref, (3, 3, 4, 5), "channels_last", torch.float64, step, f"double {step}")

    ours.to(torch.float32)
    ref.to(torch.float32)
    assert ours.weight.dtype == ours.running_var.dtype == torch.float32
    ours.to("cpu")
    ref.to(device="cpu")
    _step(ours, ref, (3, 3, 4, 5), "contiguous", torch.float32, 2, "float again")

    meta = copy.deepcopy(ours).to("meta")
    assert meta.weight.device.type == "meta"
    assert meta.running_mean.device.type == "meta"
    assert meta.num_batches_tracked.device.type == "meta"


def test_deepcopy_is_independent() -> None:
    ours = _trained(batchnorm.BatchNorm2d(3))
    clone = copy.deepcopy(ours)
    _assert_state_dicts_equal(clone.state_dict(), ours.state_dict())
    _trained(clone)
    assert not torch.equal(clone.running_mean, ours.running_mean)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_device_and_dtype_constructor_arguments(dtype) -> None:
    ours = batchnorm.BatchNorm1d(4, device="cpu", dtype=dtype)
    ref = nn.BatchNorm1d(4, device="cpu", dtype=dtype)
    _assert_state_dicts_equal(ours.state_dict(), ref.state_dict())
    meta = batchnorm.BatchNorm1d(4, device="meta")
    assert meta.weight.device.type == "meta"
    assert meta.num_batches_tracked.device.type == "meta"


def test_subclass_overriding_the_commit_is_called() -> None:
    """A subclass that overrides ``_commit_running_stats`` or ``_batch_norm_pure`` is called
    through them: the in-place training shortcut is for the base class's own behaviour."""
    calls = []

    class Counting(batchnorm.BatchNorm2d):
        def _batch_norm_pure(self, *args, **kwargs):
            calls.append("pure")
            return super()._batch_norm_pure(*args, **kwargs)

        def _commit_running_stats(self, result):
            calls.append("commit")
            super()._commit_running_stats(result)

    ours, theirs = Counting(3), torch.nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(ours(x), theirs(x))
    assert calls == ["pure", "commit"]
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert not ours._commits_in_place
    assert batchnorm.BatchNorm2d(3)._commits_in_place  # the base class takes the shortcut
