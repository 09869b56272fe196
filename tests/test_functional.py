"""``batchnorm.functional`` vs ``torch.nn.functional.batch_norm``, for every backend.

Outputs, gradients of input/weight/bias and the running buffers are compared after each of
several steps, over every rank, both memory layouts, float32/float64, training and evaluation,
with and without affine parameters and running buffers. Then the low-precision path, the pure
form under ``torch.func``, empty batches and backend selection.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as TF

from batchnorm import backends
from batchnorm.backends import BACKEND_ENV_VAR, resolve_backend
from batchnorm.backends.torch_backend import TorchBackend
from batchnorm.functional import batch_norm, batch_norm_pure
from conftest import (
    BACKENDS,
    SHAPE_FORMATS,
    assert_bit_identical,
    assert_close,
    clone_or_none,
    leaf,
    make_input,
    per_channel,
    torch_memory_format,
)

MOMENTA = (0.1, 0.5, 1.0)  # one per step, so every step's update is visible
EPS = 1e-3  # not the default, so an implementation that ignores eps fails


def _params(channels: int, dtype: torch.dtype, affine: str):
    """(weight, bias) for the affine setting: "both", "none", "weight" or "bias"."""
    weight = per_channel(channels, dtype, seed=1) + 1.0
    bias = per_channel(channels, dtype, seed=2)
    return (
        weight if affine in ("both", "weight") else None,
        bias if affine in ("both", "bias") else None,
    )


def _buffers(channels: int, dtype: torch.dtype):
    return per_channel(channels, dtype, seed=3), per_channel(channels, dtype, seed=4, positive=True)


def _grads(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.grad for t in tensors]


SHAPES_WITH_STRIDED = [*SHAPE_FORMATS, ((3, 3, 4, 5), "noncontiguous")]


# (training, running buffers given); evaluation without buffers is an error (test_bad_input).
MODES = [(True, True), (True, False), (False, True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", ["both", "none", "weight", "bias"])
@pytest.mark.parametrize(("training", "buffers"), MODES, ids=["train", "train_nobuf", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(("shape", "memory_format"), SHAPES_WITH_STRIDED)
def test_matches_torch_over_steps(
    shape, memory_format, dtype, training, buffers, affine, backend
) -> None:
    channels = shape[1]
    weight, bias = _params(channels, dtype, affine)
    w_ours, b_ours, w_ref, b_ref = leaf(weight), leaf(bias), leaf(weight), leaf(bias)
    rm, rv = _buffers(channels, dtype) if buffers else (None, None)
    rm_ours, rv_ours, rm_ref, rv_ref = (clone_or_none(t) for t in (rm, rv, rm, rv))

    for step, momentum in enumerate(MOMENTA):
        make = functools.partial(
            make_input, shape, memory_format, dtype,
            seed=10 + step, scale=1.0 + step, offset=step - 1.0, requires_grad=True,
        )  # fmt: skip
        x_ours, x_ref = make(), make()
        y_ours = batch_norm(
            x_ours, rm_ours, rv_ours, w_ours, b_ours, training, momentum, EPS, backend=backend
        )
        y_ref = TF.batch_norm(x_ref, rm_ref, rv_ref, w_ref, b_ref, training, momentum, EPS)
        where = f"step {step}"
        assert_close(y_ours, y_ref, msg=f"{where} output")
        assert_close(rm_ours, rm_ref, msg=f"{where} running_mean")
        assert_close(rv_ours, rv_ref, msg=f"{where} running_var")

        dy = make_input(shape, "contiguous", dtype, seed=100 + step)
        y_ours.backward(dy)
        y_ref.backward(dy)
        assert_close(x_ours.grad, x_ref.grad, msg=f"{where} dx")
        # Gradients of weight and bias accumulate over the steps in both.
        assert_close(*_grads(w_ours, w_ref), msg=f"{where} dweight")
        assert_close(*_grads(b_ours, b_ref), msg=f"{where} dbias")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(3, 4, 5, 2), (2, 4, 3, 2, 2)])
def test_output_memory_format_matches_torch(shape, training, backend) -> None:
    x = make_input(shape, "channels_last", torch.float32, seed=5)
    fmt = torch_memory_format(len(shape), "channels_last")
    rm, rv = _buffers(shape[1], torch.float32)
    y_ours = batch_norm(x, rm.clone(), rv.clone(), training=training, backend=backend)
    y_ref = TF.batch_norm(x, rm.clone(), rv.clone(), training=training)
    assert y_ref.is_contiguous(memory_format=fmt)  # the convention we follow
    assert y_ours.is_contiguous(memory_format=fmt)
    assert y_ours.stride() == y_ref.stride()
    assert_close(y_ours, y_ref)


# --------------------------------------------------------------------------- float16 / bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("shape", "memory_format"),
    [((8, 3), "contiguous"), ((4, 3, 5, 6), "contiguous"), ((4, 3, 5, 6), "channels_last")],
)
def test_low_precision_input_with_float32_parameters(
    shape, memory_format, dtype, training, backend
) -> None:
    """fp16/bf16 input, fp32 γ, β and buffers: compare with F.batch_norm on the fp32 upcast."""
    channels = shape[1]
    weight, bias = _params(channels, torch.float32, "both")
    w_ours, b_ours, w_ref, b_ref = leaf(weight), leaf(bias), leaf(weight), leaf(bias)
    rm, rv = _buffers(channels, torch.float32)
    rm_ours, rv_ours, rm_ref, rv_ref = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    for step in range(2):
        x_ours = make_input(
            shape, memory_format, dtype, seed=20 + step, scale=2.0, offset=1.0, requires_grad=True
        )
        x_ref = x_ours.detach().float().requires_grad_()  # exact: every fp16/bf16 is an fp32
        y_ours = batch_norm(
            x_ours, rm_ours, rv_ours, w_ours, b_ours, training, 0.1, 1e-5, backend=backend
        )
        y_ref = TF.batch_norm(x_ref, rm_ref, rv_ref, w_ref, b_ref, training, 0.1, 1e-5)
        assert y_ours.dtype == dtype
        assert_close(y_ours.float(), y_ref, dtype, msg=f"step {step} output")
        assert rm_ours.dtype == torch.float32
        assert rv_ours.dtype == torch.float32
        assert_close(rm_ours, rm_ref, msg=f"step {step} running_mean")
        assert_close(rv_ours, rv_ref, msg=f"step {step} running_var")

        dy = make_input(shape, "contiguous", dtype, seed=200 + step)
        y_ours.backward(dy)
        y_ref.backward(dy.float())
        assert x_ours.grad.dtype == dtype
        assert_close(x_ours.grad.float(), x_ref.grad, dtype, msg=f"step {step} dx")
        assert w_ours.grad.dtype == torch.float32
        assert b_ours.grad.dtype == torch.float32
        assert_close(w_ours.grad, w_ref.grad, msg=f"step {step} dweight")
        assert_close(b_ours.grad, b_ref.grad, msg=f"step {step} dbias")


# --------------------------------------------------------------------------- batch_norm_pure


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("shape", "memory_format"), [((5, 3, 4), "contiguous"),
                                                      ((3, 3, 4, 5), "channels_last")])  # fmt: skip
def test_pure_matches_inplace_and_does_not_mutate(shape, memory_format, training, backend) -> None:
    channels = shape[1]
    x = make_input(shape, memory_format, torch.float64, seed=30, scale=3.0, offset=2.0)
    weight, bias = _params(channels, torch.float64, "both")
    rm, rv = _buffers(channels, torch.float64)
    rm_given, rv_given = rm.clone(), rv.clone()
    snapshot = {"running_mean": rm.clone(), "running_var": rv.clone()}

    out, new_mean, new_var = batch_norm_pure(
        x, rm_given, rv_given, weight, bias, training, 0.3, EPS, backend=backend
    )
    assert_bit_identical(snapshot, {"running_mean": rm_given, "running_var": rv_given})

    rm_inplace, rv_inplace = rm.clone(), rv.clone()
    y = batch_norm(x, rm_inplace, rv_inplace, weight, bias, training, 0.3, EPS, backend=backend)
    torch.testing.assert_close(out, y, rtol=0, atol=0)
    torch.testing.assert_close(new_mean, rm_inplace, rtol=0, atol=0)
    torch.testing.assert_close(new_var, rv_inplace, rtol=0, atol=0)

    # ... and both agree with PyTorch.
    rm_ref, rv_ref = rm.clone(), rv.clone()
    y_ref = TF.batch_norm(x, rm_ref, rv_ref, weight, bias, training, 0.3, EPS)
    assert_close(out, y_ref)
    assert_close(new_mean, rm_ref)
    assert_close(new_var, rv_ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pure_without_buffers_returns_none(backend) -> None:
    x = make_input((4, 3, 2), seed=31)
    out, new_mean, new_var = batch_norm_pure(x, None, None, training=True, backend=backend)
    assert new_mean is None
    assert new_var is None
    assert_close(out, TF.batch_norm(x, None, None, training=True))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_pure_under_vmap_matches_loop(training) -> None:
    """vmap over a leading dim of independent batches (each with its own buffers)."""
    batches, shape = 4, (5, 3, 6)
    xs = make_input((batches, *shape), dtype=torch.float64, seed=40, scale=2.0, offset=1.0)
    weight, bias = _params(3, torch.float64, "both")
    rms = torch.stack([per_channel(3, torch.float64, seed=50 + i) for i in range(batches)])
    rvs = torch.stack(
        [per_channel(3, torch.float64, seed=60 + i, positive=True) for i in range(batches)]
    )
    fn = functools.partial(batch_norm_pure, training=training, momentum=0.2, backend="torch")
    out, new_means, new_vars = torch.func.vmap(
        lambda x, rm, rv: fn(x, rm, rv, weight, bias), in_dims=(0, 0, 0)
    )(xs, rms, rvs)

    for i in range(batches):
        rm_ref, rv_ref = rms[i].clone(), rvs[i].clone()
        y_ref = TF.batch_norm(xs[i], rm_ref, rv_ref, weight, bias, training, 0.2, 1e-5)
        assert_close(out[i], y_ref, msg=f"batch {i} output")
        assert_close(new_means[i], rm_ref, msg=f"batch {i} running_mean")
        assert_close(new_vars[i], rv_ref, msg=f"batch {i} running_var")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (2, 3, 2, 3)])
def test_pure_under_func_grad_matches_autograd(shape, training) -> None:
    channels = shape[1]
    x = make_input(shape, dtype=torch.float64, seed=70, scale=2.0, offset=-1.0)
    weight, bias = _params(channels, torch.float64, "both")
    dy = make_input(shape, dtype=torch.float64, seed=71)
    rm, rv = _buffers(channels, torch.float64)
    snapshot = {"running_mean": rm.clone(), "running_var": rv.clone()}

    def loss(x, w, b):
        out = batch_norm_pure(x, rm, rv, w, b, training, 0.1, EPS, backend="torch").output
        return (out * dy).sum()

    dx, dw, db = torch.func.grad(loss, argnums=(0, 1, 2))(x, weight, bias)
    assert_bit_identical(snapshot, {"running_mean": rm, "running_var": rv})

    xr, wr, br = leaf(x), leaf(weight), leaf(bias)
    y_ref = TF.batch_norm(xr, rm.clone(), rv.clone(), wr, br, training, 0.1, EPS)
    dx_ref, dw_ref, db_ref = torch.autograd.grad((y_ref * dy).sum(), (xr, wr, br))
    assert_close(dx, dx_ref, msg="dx")
    assert_close(dw, dw_ref, msg="dweight")
    assert_close(db, db_ref, msg="dbias")


def test_per_sample_gradients_vmap_of_grad() -> None:
    """vmap(grad(...)): per-batch weight gradients of independent batches."""
    xs = make_input((3, 4, 2, 5), dtype=torch.float64, seed=80, scale=1.5)
    dys = make_input((3, 4, 2, 5), dtype=torch.float64, seed=81)
    weight, bias = _params(2, torch.float64, "both")

    def loss(w, x, dy):
        out = batch_norm_pure(x, None, None, w, bias, True, 0.1, EPS, backend="torch").output
        return (out * dy).sum()

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(weight, xs, dys)
    for i in range(3):
        w = leaf(weight)
        y = TF.batch_norm(xs[i], None, None, w, bias, True, 0.1, EPS)
        (expected,) = torch.autograd.grad((y * dys[i]).sum(), w)
        assert_close(grads[i], expected, msg=f"batch {i}")


# --------------------------------------------------------------------------- empty batch

EMPTY_SHAPES = [
    (0, 3),
    (0, 3, 4),
    (0, 3, 2, 2),
    (0, 3, 2, 1, 2),
    (2, 3, 0),  # N > 0 but L = 0: also no values per channel
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_empty_batch_behaves_like_torch(shape, training, backend) -> None:
    channels = shape[1]
    weight, bias = _params(channels, torch.float32, "both")
    w_ours, b_ours, w_ref, b_ref = leaf(weight), leaf(bias), leaf(weight), leaf(bias)
    rm, rv = _buffers(channels, torch.float32)
    rm_ours, rv_ours, rm_ref, rv_ref = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    x_ours = torch.randn(shape, requires_grad=True)
    x_ref = x_ours.detach().clone().requires_grad_()

    y_ours = batch_norm(x_ours, rm_ours, rv_ours, w_ours, b_ours, training, backend=backend)
    y_ref = TF.batch_norm(x_ref, rm_ref, rv_ref, w_ref, b_ref, training)
    assert y_ours.shape == y_ref.shape == shape
    assert y_ours.dtype == y_ref.dtype
    # Running buffers untouched, bit for bit (PyTorch skips the update for an empty batch).
    assert torch.equal(rm_ours, rm)
    assert torch.equal(rv_ours, rv)
    assert torch.equal(rm_ref, rm)
    assert torch.equal(rv_ref, rv)

    y_ours.sum().backward()
    y_ref.sum().backward()
    assert x_ours.grad.shape == shape
    assert torch.equal(w_ours.grad, torch.zeros(channels)), w_ours.grad
    assert torch.equal(b_ours.grad, torch.zeros(channels)), b_ours.grad
    assert torch.equal(w_ref.grad, w_ours.grad)
    assert torch.equal(b_ref.grad, b_ours.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_pure_returns_buffers_unchanged(backend) -> None:
    rm, rv = _buffers(3, torch.float32)
    out, new_mean, new_var = batch_norm_pure(
        torch.empty(0, 3, 4), rm, rv, training=True, backend=backend
    )
    assert out.shape == (0, 3, 4)
    assert torch.equal(new_mean, rm)
    assert torch.equal(new_var, rv)


# --------------------------------------------------------------------------- backend selection


def test_backend_argument_bogus_raises_naming_backend(monkeypatch) -> None:
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match=r"\bbackend\b") as info:
        batch_norm(torch.randn(4, 3), rm, rv, training=True, backend="bogus")
    assert "bogus" in str(info.value)
    assert torch.equal(rm, torch.zeros(3))
    assert torch.equal(rv, torch.ones(3))


def test_backend_env_var_bogus_raises_naming_variable(monkeypatch) -> None:
    monkeypatch.setenv(BACKEND_ENV_VAR, "bogus")
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="BATCHNORM_BACKEND") as info:
        batch_norm(torch.randn(4, 3), rm, rv, training=True)
    assert "bogus" in str(info.value)
    assert torch.equal(rm, torch.zeros(3))
    assert torch.equal(rv, torch.ones(3))


@pytest.mark.parametrize("name", BACKENDS)
def test_backend_env_var_selects_backend(monkeypatch, name) -> None:
    monkeypatch.setenv(BACKEND_ENV_VAR, name)
    assert resolve_backend(None, torch.device("cpu")).name == name
    x = make_input((5, 3, 2), seed=90)
    assert_close(
        batch_norm(x, None, None, training=True), TF.batch_norm(x, None, None, None, None, True)
    )


def test_backend_argument_wins_over_env_var(monkeypatch) -> None:
    monkeypatch.setenv(BACKEND_ENV_VAR, "bogus")
    x = make_input((5, 3, 2), seed=91)
    y = batch_norm(x, None, None, training=True, backend="torch")
    assert_close(y, TF.batch_norm(x, None, None, training=True))
    assert resolve_backend("numpy", torch.device("cpu")).name == "numpy"


@pytest.mark.parametrize("value", ["auto", ""])
def test_backend_auto_and_empty_env_var(monkeypatch, value) -> None:
    monkeypatch.setenv(BACKEND_ENV_VAR, value)
    cpu_auto = "cpu" if "cpu" in backends.available_backends() else "aten"  # issue 8
    assert resolve_backend(None, torch.device("cpu")).name == cpu_auto
    assert resolve_backend("auto", torch.device("cpu")).name == cpu_auto
    x = make_input((5, 3, 2), seed=92)
    assert_close(
        batch_norm(x, None, None, training=True), TF.batch_norm(x, None, None, training=True)
    )


def test_backend_that_cannot_import_is_not_available(monkeypatch) -> None:
    """A registered backend whose module fails to import is left out, and asking names it."""
    monkeypatch.setitem(backends._REGISTRY, "ghost", ("batchnorm_no_such_module", "Ghost"))
    with backends.fresh():
        assert "ghost" not in backends.available_backends()
        assert "torch" in backends.available_backends()
        with pytest.raises(ImportError, match=r"backend.*'ghost'"):
            resolve_backend("ghost", torch.device("cpu"))


@pytest.mark.parametrize("importable", [True, False])
def test_auto_picks_the_cuda_backend_only_when_it_imports(monkeypatch, importable) -> None:
    """``auto`` on CUDA: the ``cuda`` backend when it imports, else ATen; CPU: cpu or aten."""
    module = "batchnorm.backends.torch_backend" if importable else "batchnorm_no_such_module"
    monkeypatch.setitem(backends._REGISTRY, "cuda", (module, "TorchBackend"))
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    with backends.fresh():
        cuda_choice = resolve_backend("auto", torch.device("cuda"))
        assert isinstance(cuda_choice, TorchBackend) == importable  # the stand-in class
        assert cuda_choice is resolve_backend("cuda" if importable else "aten", torch.device("cpu"))
        cpu_choice = resolve_backend(None, torch.device("cpu"))
        assert cpu_choice.name in ("cpu", "aten")  # the fast CPU backends (issue 8)


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_per_channel_argument_must_be_a_tensor(name) -> None:
    args = {"running_mean": torch.zeros(3), "running_var": torch.ones(3), name: [1.0, 1.0, 1.0]}
    with pytest.raises(TypeError, match=name):
        batch_norm(torch.randn(4, 3), training=True, **args)
