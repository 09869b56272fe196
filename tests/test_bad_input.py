"""Check 5 of the chain: bad input is rejected with a clear message and changes nothing.

Every case asserts the exception type, that the message names the offending argument, and that
``running_mean``, ``running_var`` and ``num_batches_tracked`` are bit-identical afterwards, on both
the functional path and the module path.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.functional import batch_norm, batch_norm_pure
from conftest import assert_bit_identical, buffers_of, make_input, per_channel

ONE_VALUE_MESSAGE = "Expected more than 1 value per channel when training"
MODULES = {1: batchnorm.BatchNorm1d, 2: batchnorm.BatchNorm2d, 3: batchnorm.BatchNorm3d}
FUNCTIONALS = [batch_norm, batch_norm_pure]
FUNCTIONAL_IDS = ["batch_norm", "batch_norm_pure"]


def _used_module(family: int, training: bool = True, **kw) -> nn.Module:
    """A module with 3 channels after one training step (buffers away from their init)."""
    module = MODULES[family](3, momentum=kw.pop("momentum", None), **kw)
    shape = {1: (4, 3, 2), 2: (4, 3, 2, 2), 3: (2, 3, 2, 2, 2)}[family]
    module(make_input(shape, seed=1, offset=2.0))
    module.train(training)
    return module


def _functional_buffers() -> dict[str, torch.Tensor]:
    return {
        "running_mean": per_channel(3, seed=3),
        "running_var": per_channel(3, seed=4, positive=True),
    }


def _snapshot(buffers: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    return {k: None if v is None else v.clone() for k, v in buffers.items()}


@contextlib.contextmanager
def _module_unchanged(module: nn.Module):
    """Asserts the module's buffers and parameters are bit-identical after the block."""
    before = buffers_of(module)
    params = {n: p.detach().clone() for n, p in module.named_parameters()}
    yield
    assert_bit_identical(before, buffers_of(module))
    for name, value in module.named_parameters():
        assert torch.equal(value, params[name]), name


# --------------------------------------------------------------------------- rank and channels


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    ("family", "shape", "expected_rank"),
    [
        (2, (4, 3, 5), "4D"),
        (2, (2, 3, 4, 5, 6), "4D"),
        (1, (2, 3, 4, 5), "2D or 3D"),
        (1, (3,), "2D or 3D"),
        (3, (2, 3, 4, 5), "5D"),
        (3, (2, 3), "5D"),
    ],
)
def test_module_rejects_wrong_rank(family, shape, expected_rank, training) -> None:
    module = _used_module(family, training)
    with _module_unchanged(module), pytest.raises(ValueError, match=r"\binput\b") as info:
        module(torch.randn(shape))
    assert expected_rank in str(info.value)
    assert str(len(shape)) + "D" in str(info.value)  # says what it got


@pytest.mark.parametrize("fn", FUNCTIONALS, ids=FUNCTIONAL_IDS)
@pytest.mark.parametrize("shape", [(3,), ()])
def test_functional_rejects_input_below_two_dims(fn, shape) -> None:
    buffers = _functional_buffers()
    before = _snapshot(buffers)
    with pytest.raises(ValueError, match=r"\binput\b"):
        fn(torch.randn(shape), buffers["running_mean"], buffers["running_var"], training=True)
    assert_bit_identical(before, buffers)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("family", "shape"), [(1, (4, 5)), (1, (4, 2, 3)), (2, (2, 4, 3, 3)),
                                               (3, (2, 1, 2, 2, 2))])  # fmt: skip
def test_module_rejects_wrong_channel_count(family, shape, training) -> None:
    module = _used_module(family, training)
    with _module_unchanged(module), pytest.raises(ValueError, match="num_features") as info:
        module(torch.randn(shape))
    assert "3" in str(info.value)
    assert str(shape[1]) in str(info.value)


# --------------------------------------------------------------------------- one value per channel


@pytest.mark.parametrize(("family", "shape"), [(1, (1, 3)), (1, (1, 3, 1)), (2, (1, 3, 1, 1)),
                                               (3, (1, 3, 1, 1, 1))])  # fmt: skip
def test_module_rejects_one_value_per_channel_in_training(family, shape) -> None:
    module = _used_module(family)
    with _module_unchanged(module), pytest.raises(ValueError, match=ONE_VALUE_MESSAGE):
        module(torch.randn(shape))
    # Same type as PyTorch raises.
    with pytest.raises(ValueError, match=ONE_VALUE_MESSAGE):
        {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[family](3)(torch.randn(shape))


def test_module_without_running_stats_rejects_one_value_in_eval_too() -> None:
    """Without running buffers evaluation uses batch statistics, so M = 1 is an error there too."""
    module = batchnorm.BatchNorm1d(3, track_running_stats=False).eval()
    with pytest.raises(ValueError, match=ONE_VALUE_MESSAGE):
        module(torch.randn(1, 3))
    with pytest.raises(ValueError, match=ONE_VALUE_MESSAGE):
        nn.BatchNorm1d(3, track_running_stats=False).eval()(torch.randn(1, 3))


def test_module_accepts_one_value_per_channel_in_eval() -> None:
    module = _used_module(2, training=False)
    ref = nn.BatchNorm2d(3).eval()
    ref.load_state_dict(module.state_dict())
    x = torch.randn(1, 3, 1, 1)
    with _module_unchanged(module):
        torch.testing.assert_close(module(x), ref(x))


@pytest.mark.parametrize("fn", FUNCTIONALS, ids=FUNCTIONAL_IDS)
@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1, 1)])
def test_functional_rejects_one_value_per_channel_in_training(fn, shape) -> None:
    buffers = _functional_buffers()
    before = _snapshot(buffers)
    with pytest.raises(ValueError, match=ONE_VALUE_MESSAGE):
        fn(torch.randn(shape), buffers["running_mean"], buffers["running_var"], training=True)
    assert_bit_identical(before, buffers)


# --------------------------------------------------------------------------- dtypes


NON_FLOAT = [torch.int64, torch.int32, torch.uint8, torch.bool]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", NON_FLOAT, ids=str)
def test_module_rejects_non_float_input(dtype, training) -> None:
    module = _used_module(2, training)
    x = torch.ones(2, 3, 2, 2).to(dtype)
    with _module_unchanged(module), pytest.raises(TypeError, match=r"\binput\b"):
        module(x)


@pytest.mark.parametrize("fn", FUNCTIONALS, ids=FUNCTIONAL_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", NON_FLOAT, ids=str)
def test_functional_rejects_non_float_input(fn, dtype, training) -> None:
    buffers = _functional_buffers()
    before = _snapshot(buffers)
    x = torch.ones(4, 3, 2).to(dtype)
    with pytest.raises(TypeError, match=r"\binput\b"):
        fn(x, buffers["running_mean"], buffers["running_var"], training=training)
    assert_bit_identical(before, buffers)


@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
def test_functional_rejects_integer_per_channel_tensor(name) -> None:
    args = {**_functional_buffers(), "weight": torch.ones(3), "bias": torch.zeros(3)}
    args[name] = torch.ones(3, dtype=torch.long)
    before = _snapshot(args)
    with pytest.raises(TypeError, match=name):
        batch_norm(torch.randn(4, 3), training=True, **args)
    assert_bit_identical(before, args)


@pytest.mark.parametrize("fn", FUNCTIONALS, ids=FUNCTIONAL_IDS)
def test_rejects_non_tensor_input(fn) -> None:
    with pytest.raises(TypeError, match=r"\binput\b"):
        fn([[1.0, 2.0], [3.0, 4.0]], None, None, training=True)
    module = _used_module(1)
    with _module_unchanged(module), pytest.raises(TypeError, match=r"\binput\b"):
        module([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])


# --------------------------------------------------------------------------- per-channel tensors


@pytest.mark.parametrize("fn", FUNCTIONALS, ids=FUNCTIONAL_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("bad_shape", [(2,), (4,), (1, 3), ()], ids=str)
@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
def test_functional_rejects_per_channel_of_wrong_length(fn, name, bad_shape, training) -> None:
    args = {**_functional_buffers(), "weight": per_channel(3, seed=5), "bias": per_channel(3)}
    args[name] = torch.ones(bad_shape)
    before = _snapshot(args)
    with pytest.raises(ValueError, match=name) as info:
        fn(torch.randn(4, 3, 2), training=training, **args)
    assert "(3,)" in str(info.value)  # says what it expected
    assert_bit_identical(before, args)


@pytest.mark.parametrize("fn", FUNCTIONALS, ids=FUNCTIONAL_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
def test_functional_rejects_per_channel_on_another_device(fn, name, training) -> None:
    args = {**_functional_buffers(), "weight": per_channel(3, seed=5), "bias": per_channel(3)}
    args[name] = torch.ones(3, device="meta")
    cpu_before = _snapshot({k: v for k, v in args.items() if k != name})
    with pytest.raises(RuntimeError, match=name):
        fn(torch.randn(4, 3, 2), training=training, **args)
    assert_bit_identical(cpu_before, {k: v for k, v in args.items() if k != name})


def test_functional_rejects_input_on_another_device() -> None:
    buffers = _functional_buffers()
    before = _snapshot(buffers)
    with pytest.raises(RuntimeError, match="running_mean"):
        batch_norm(torch.ones(4, 3, device="meta"), training=True, **buffers)
    assert_bit_identical(before, buffers)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["weight", "bias"])
def test_module_rejects_parameter_on_another_device(name, training) -> None:
    module = _used_module(2, training)
    with torch.no_grad():
        setattr(module, name, nn.Parameter(torch.ones(3, device="meta")))
    before = buffers_of(module)
    with pytest.raises(RuntimeError, match=name):
        module(torch.randn(2, 3, 2, 2))
    assert_bit_identical(before, buffers_of(module))


@pytest.mark.parametrize("fn", FUNCTIONALS, ids=FUNCTIONAL_IDS)
@pytest.mark.parametrize(
    ("missing", "named"),
    [(("running_mean",), "running_mean"), (("running_var",), "running_var"),
     (("running_mean", "running_var"), "running_mean")],
)  # fmt: skip
def test_functional_eval_needs_running_buffers(fn, missing, named) -> None:
    buffers: dict[str, torch.Tensor | None] = dict(_functional_buffers())
    for name in missing:
        buffers[name] = None
    before = _snapshot(buffers)
    with pytest.raises(ValueError, match=named):
        fn(torch.randn(4, 3), training=False, **buffers)
    assert_bit_identical(before, buffers)


# --------------------------------------------------------------------------- scalar arguments


@pytest.mark.parametrize("fn", FUNCTIONALS, ids=FUNCTIONAL_IDS)
@pytest.mark.parametrize(
    ("kwargs", "exceptions", "named"),
    [
        ({"momentum": None}, TypeError, "momentum"),
        ({"momentum": "x"}, TypeError, "momentum"),
        ({"momentum": True}, TypeError, "momentum"),
        ({"eps": math.nan}, (TypeError, ValueError), "eps"),
        ({"eps": "x"}, (TypeError, ValueError), "eps"),
        ({"training": "yes"}, TypeError, "training"),
    ],
    ids=["momentum=None", "momentum=str", "momentum=bool", "eps=nan", "eps=str", "training=str"],
)
def test_functional_rejects_bad_scalar_arguments(fn, kwargs, exceptions, named) -> None:
    buffers = _functional_buffers()
    before = _snapshot(buffers)
    call = {"training": True, **kwargs}
    with pytest.raises(exceptions, match=named):
        fn(torch.randn(4, 3), buffers["running_mean"], buffers["running_var"], **call)
    assert_bit_identical(before, buffers)


@pytest.mark.parametrize("family", [1, 2, 3])
@pytest.mark.parametrize(
    ("kwargs", "exception", "named"),
    [
        ({"num_features": 0}, ValueError, "num_features"),
        ({"num_features": -2}, ValueError, "num_features"),
        ({"num_features": 2.5}, (TypeError, ValueError), "num_features"),
        ({"num_features": True}, (TypeError, ValueError), "num_features"),
        ({"num_features": 3, "eps": -1}, ValueError, "eps"),
        ({"num_features": 3, "eps": math.nan}, ValueError, "eps"),
        ({"num_features": 3, "momentum": "x"}, TypeError, "momentum"),
        ({"num_features": 3, "momentum": True}, TypeError, "momentum"),
    ],
    ids=["C=0", "C=-2", "C=2.5", "C=True", "eps=-1", "eps=nan", "momentum=str", "momentum=bool"],
)
def test_constructor_rejects_bad_arguments(family, kwargs, exception, named) -> None:
    with pytest.raises(exception, match=named):
        MODULES[family](**kwargs)


def test_constructor_accepts_boundary_values_like_torch() -> None:
    """The boundary of the checks above: eps = 0 and an int momentum construct (as in torch)."""
    assert batchnorm.BatchNorm1d(3, eps=0).eps == nn.BatchNorm1d(3, eps=0).eps == 0
    module = batchnorm.BatchNorm1d(3, momentum=1)
    ref = nn.BatchNorm1d(3, momentum=1)
    x = make_input((5, 3), seed=2)
    torch.testing.assert_close(module(x), ref(x))
    torch.testing.assert_close(module.running_var, ref.running_var)


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_training_rejects_non_positive_eps_and_keeps_buffers(eps) -> None:
    """eps <= 0 in training divides by zero on a constant channel; torch 2.13 refuses it too."""
    module = batchnorm.BatchNorm1d(3, eps=0.0 if eps == 0 else 1e-5)
    module.eps = eps
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match="eps: expected a positive float in training"):
        module(make_input((5, 3), seed=3))
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_mask_with_fused_arguments_is_rejected() -> None:
    """mask with activation or residual: a ValueError naming mask, buffers unchanged."""
    x = torch.randn(4, 3, 5)
    mask = torch.ones(4, 5, dtype=torch.bool)
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    for extra in ({"activation": "relu"}, {"residual": torch.randn(4, 3, 5)}):
        with pytest.raises(ValueError, match="mask: cannot be combined"):
            batch_norm(x, running_mean, running_var, training=True, mask=mask, **extra)
    assert torch.equal(running_mean, torch.zeros(3))
    assert torch.equal(running_var, torch.ones(3))
