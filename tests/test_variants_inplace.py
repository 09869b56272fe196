"""In-place activated batch norm against ``act(torch.nn.BatchNorm*d(x))`` with weight ``|γ| + ε_γ``.

A chain of independent checks: finite differences (float64 ``gradcheck``), the out-of-place
composition of ``torch.nn`` modules on every backend and dtype, the input's storage holding the
output, what autograd saves (counted by ``saved_tensors_hooks``), rejected inputs leaving
everything as it was, a short training run, and the ``state_dict`` both ways.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from batchnorm.modules import BatchNormAct2d, NonFiniteBatchWarning
from batchnorm.variants.inplace import (
    INVERTIBLE_ACTIVATIONS,
    InPlaceBatchNormAct1d,
    InPlaceBatchNormAct2d,
    InPlaceBatchNormAct3d,
    check_inplace_activation,
    inplace_batch_norm_act_train,
)
from conftest import BACKENDS, assert_bit_identical, assert_close, buffers_of

ACTIVATIONS = ("identity", "leaky_relu", "elu")
SLOPE = 0.1  # larger than the default, so that the negative side matters in every comparison
ALPHA = 0.7
CLASSES = {
    nn.BatchNorm1d: InPlaceBatchNormAct1d,
    nn.BatchNorm2d: InPlaceBatchNormAct2d,
    nn.BatchNorm3d: InPlaceBatchNormAct3d,
}
SHAPES = {nn.BatchNorm1d: (6, 3, 4), nn.BatchNorm2d: (3, 3, 4, 5), nn.BatchNorm3d: (2, 3, 2, 3, 4)}


class AbsPlusEps(nn.Module):
    """The parametrization ``γ ↦ |γ| + ε_γ``, applied to a ``torch.nn`` batch norm's weight."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.abs() + self.eps


def torch_activation(name: str) -> nn.Module:
    """The ``torch.nn`` module of an activation name, with this file's slope and alpha."""
    if name == "leaky_relu":
        return nn.LeakyReLU(SLOPE)
    if name == "elu":
        return nn.ELU(ALPHA)
    return nn.Identity()


def make_pair(torch_cls, activation, dtype=torch.float64, **kwargs):
    """An in-place layer with non-trivial γ (one negative), β, and its ``torch.nn`` twin."""
    layer = CLASSES[torch_cls](
        3, activation, dtype=dtype, negative_slope=SLOPE, alpha=ALPHA, **kwargs
    )
    if layer.weight is not None:
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([0.8, -1.3, 1.7]))
            if layer.bias is not None:
                layer.bias.copy_(torch.tensor([0.2, -0.4, 0.1]))
    bn = torch_cls(
        3, layer.eps, layer.momentum, layer.affine, layer.track_running_stats, dtype=dtype
    )
    bn.load_state_dict(layer.state_dict(), strict=layer.bias is not None)
    if layer.bias is None and layer.affine:
        bn.bias = None  # bias=False: β = 0 in both
    if layer.affine:
        parametrize.register_parametrization(bn, "weight", AbsPlusEps(layer.weight_eps))
    return layer, nn.Sequential(bn, torch_activation(activation))


def reference_params(reference):
    """``(γ, β)`` leaves of the reference (the parametrization's original γ)."""
    bn = reference[0]
    if not parametrize.is_parametrized(bn):
        return None, None
    return bn.parametrizations.weight.original, bn.bias


def run_step(layer, reference, x, seed):
    """One forward/backward through both; returns ``(y, y_ref, dx, dx_ref)``."""
    leaf = x.detach().clone().requires_grad_()
    leaf_ref = x.detach().clone().requires_grad_()
    h = leaf * 1  # a non-leaf, as a convolution's output would be
    y = layer(h)
    assert y is h
    y_ref = reference(leaf_ref)
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    y_copy = y.detach().clone()
    y.backward(dy)
    y_ref.backward(dy)
    return y_copy, y_ref.detach(), leaf.grad, leaf_ref.grad


# --- finite differences --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend", [b for b in ("torch", "aten", "numba", "numpy") if b in BACKENDS]
)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_of_the_function(backend, activation):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([0.9, -1.4], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)

    def function(leaf, w, b):
        return inplace_batch_norm_act_train(
            leaf * 1, w, b, 1e-5, activation=activation, negative_slope=SLOPE, alpha=ALPHA,
            backend=backend,
        ).output  # fmt: skip

    assert torch.autograd.gradcheck(function, (x, weight, bias), eps=1e-6, atol=1e-7)


def test_gradcheck_without_affine_parameters():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)

    def function(leaf):
        return inplace_batch_norm_act_train(leaf * 1, None, None, activation="elu").output

    assert torch.autograd.gradcheck(function, (x,), eps=1e-6, atol=1e-7)


# --- against the torch.nn composition ------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_torch_nn_composition(backend, activation, dtype):
    layer, reference = make_pair(nn.BatchNorm2d, activation, dtype, backend=backend)
    gen = torch.Generator().manual_seed(2)
    for step in range(2):  # two steps: the running statistics move twice
        x = (torch.randn(4, 3, 3, 5, generator=gen, dtype=torch.float64) * 1.5 + 0.3).to(dtype)
        y, y_ref, dx, dx_ref = run_step(layer, reference, x, seed=step)
        msg = f"{backend} {activation} {dtype} step {step}"
        assert_close(y, y_ref, msg=f"{msg} y")
        assert_close(dx, dx_ref, msg=f"{msg} dx")
    weight_ref, bias_ref = reference_params(reference)
    assert_close(layer.weight.grad, weight_ref.grad, msg="dγ (with sign(γ))")
    assert_close(layer.bias.grad, bias_ref.grad, msg="dβ")
    bn = reference[0]
    assert_close(layer.running_mean, bn.running_mean, msg="running_mean")
    assert_close(layer.running_var, bn.running_var, msg="running_var")
    assert torch.equal(layer.num_batches_tracked, bn.num_batches_tracked)


@pytest.mark.parametrize("torch_cls", list(CLASSES))
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"momentum": None},
        {"affine": False},
        {"bias": False},
        {"track_running_stats": False},
    ],
)
def test_every_rank_and_option(torch_cls, kwargs):
    layer, reference = make_pair(torch_cls, "leaky_relu", **kwargs)
    gen = torch.Generator().manual_seed(3)
    for step in range(3):
        x = torch.randn(SHAPES[torch_cls], generator=gen, dtype=torch.float64) * 2 - 0.5
        y, y_ref, dx, dx_ref = run_step(layer, reference, x, seed=step)
        assert_close(y, y_ref, msg=f"y {kwargs}")
        assert_close(dx, dx_ref, msg=f"dx {kwargs}")
    weight_ref, bias_ref = reference_params(reference)
    if layer.weight is not None:
        assert_close(layer.weight.grad, weight_ref.grad, msg="dγ")
    if layer.bias is not None:
        assert_close(layer.bias.grad, bias_ref.grad, msg="dβ")
    assert_close(layer.running_mean, reference[0].running_mean, msg="running_mean")
    assert_close(layer.running_var, reference[0].running_var, msg="running_var")
    if layer.track_running_stats:
        assert int(layer.num_batches_tracked) == int(reference[0].num_batches_tracked) == 3


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(
    ("torch_cls", "memory_format"),
    [(nn.BatchNorm2d, torch.channels_last), (nn.BatchNorm3d, torch.channels_last_3d)],
)
def test_channels_last_input(activation, torch_cls, memory_format):
    layer, reference = make_pair(torch_cls, activation, torch.float32)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(SHAPES[torch_cls], generator=gen).contiguous(memory_format=memory_format)
    leaf = x.clone().requires_grad_()
    h = leaf * 1
    assert h.is_contiguous(memory_format=memory_format)
    pointer = h.data_ptr()
    y = layer(h)
    assert y is h
    assert y.data_ptr() == pointer
    leaf_ref = x.clone().requires_grad_()
    y_ref = reference(leaf_ref)
    assert_close(y.detach(), y_ref.detach())
    y.sum().backward()
    y_ref.sum().backward()
    assert_close(leaf.grad, leaf_ref.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_with_float32_parameters(dtype):
    # Mixed precision: γ, β and statistics in float32, y stored (and inverted) in the low dtype;
    # compared with the float32 composition at the low dtype's tolerance, grads a little wider
    # (x̂ is rebuilt from a y rounded to 8 or 11 bits).
    layer, reference = make_pair(nn.BatchNorm2d, "leaky_relu", torch.float32)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 4, 4, generator=gen)
    leaf = x.to(dtype).requires_grad_()
    h = leaf * 1
    y = layer(h)
    assert y is h
    assert y.dtype == dtype
    x_ref = leaf.detach().float().requires_grad_()
    y_ref = reference(x_ref)
    assert_close(y.detach().float(), y_ref.detach(), dtype=dtype)
    dy = torch.randn(x.shape, generator=gen)
    y.backward(dy.to(dtype))
    y_ref.backward(dy.to(dtype).float())
    atol, rtol = {torch.float16: (1e-2, 1e-2), torch.bfloat16: (8e-2, 5e-2)}[dtype]
    torch.testing.assert_close(leaf.grad.float(), x_ref.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(
        layer.weight.grad, reference_params(reference)[0].grad, atol=atol * 4, rtol=rtol
    )


# --- the in-place contract -----------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_input_storage_holds_the_output(activation):
    layer, reference = make_pair(nn.BatchNorm2d, activation)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)
    h = x.clone().requires_grad_() * 1
    pointer, version = h.data_ptr(), h._version
    y = layer(h)
    assert y is h
    assert h.data_ptr() == pointer
    assert h._version > version  # autograd knows the tensor was written to
    assert torch.equal(h.detach(), y.detach())
    assert_close(h.detach(), reference(x).detach())
    assert not torch.allclose(h.detach(), x)  # the input's values are gone


def _saved_tensors(run):
    """``(numel, storage data_ptr)`` of every tensor autograd saves while ``run()`` runs."""
    saved = []

    def pack(tensor):
        saved.append((tensor.numel(), tensor.untyped_storage().data_ptr()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return saved


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_saves_no_input_sized_tensor_but_the_output(activation):
    layer = InPlaceBatchNormAct2d(3, activation)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    h = x * 1
    saved = _saved_tensors(lambda: layer(h))
    big = [pointer for numel, pointer in saved if numel == h.numel()]
    assert big == [h.untyped_storage().data_ptr()], saved
    assert all(numel in (3, h.numel()) for numel, _ in saved), saved  # else per channel only

    # The counter is not blind: the torch.nn composition keeps two input-sized tensors.
    composition = nn.Sequential(nn.BatchNorm2d(3), nn.LeakyReLU())
    saved = _saved_tensors(lambda: composition(x * 1))
    assert len({p for numel, p in saved if numel == h.numel()}) == 2


def test_later_reader_of_the_saved_input_is_caught_by_autograd():
    layer = InPlaceBatchNormAct2d(3)
    x = torch.randn(4, 3, 3, 3, requires_grad=True)
    h = x * 1
    other = h.sin()  # saves h for its backward
    y = layer(h)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (y.sum() + other.sum()).backward()


def test_zero_weight_has_a_finite_forward_and_zero_gradient():
    layer = InPlaceBatchNormAct2d(3, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.0, 1.0, -2.0]))
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    y = layer(x * 1)
    y.sum().backward()
    assert torch.isfinite(y).all()
    assert torch.isfinite(x.grad).all()
    assert layer.weight.grad[0] == 0  # sign(0) = 0, as torch.abs
    assert layer.weight.grad[2] != 0


def test_saturated_elu_gives_finite_gradients():
    layer = InPlaceBatchNormAct2d(2, "elu", dtype=torch.float32)
    with torch.no_grad():
        layer.bias.fill_(-40.0)  # every pre-activation about −40: y rounds to −α
    x = torch.randn(4, 2, 3, 3, requires_grad=True)
    y = layer(x * 1)
    y.backward(torch.randn_like(y))
    for grad in (x.grad, layer.weight.grad, layer.bias.grad):
        assert torch.isfinite(grad).all()


def test_empty_batch_leaves_the_statistics():
    layer, reference = make_pair(nn.BatchNorm2d, "elu")
    x = torch.randn(0, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    y = layer(x * 1)
    y_ref = reference(x * 1)
    assert y.shape == y_ref.shape == (0, 3, 2, 2)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(layer, name), getattr(reference[0], name)), name


def test_nonfinite_skip_reads_the_overwritten_input():
    layer = InPlaceBatchNormAct2d(3, nonfinite="skip")
    layer(torch.randn(4, 3, 2, 2) * 1)
    before = buffers_of(layer)
    x = torch.randn(4, 3, 2, 2)
    x[0, 1, 0, 0] = float("nan")
    with pytest.warns(NonFiniteBatchWarning, match="skipped a batch"):
        y = layer(x.requires_grad_() * 1)
    assert torch.isnan(y[:, 1]).all()  # the NaN channel's output, which the check read
    assert_bit_identical(before, buffers_of(layer))


# --- rejected inputs and arguments ---------------------------------------------------------------


def _leaf_requiring_grad():
    return torch.randn(4, 3, 3, 3, requires_grad=True)


def _view():
    return (torch.randn(4, 3, 3, 6, requires_grad=True) * 1)[..., :3]


def _not_dense():
    x = torch.empty_strided((4, 3, 3, 3), (27, 1, 3, 9))  # (N, W, H, C) order: neither layout
    return x.copy_(torch.randn(4, 3, 3, 3))


def _not_dense_3d():
    x = torch.empty_strided((4, 3, 5), (15, 1, 3))  # (N, L, C) order: not contiguous
    return x.copy_(torch.randn(4, 3, 5))


def _inference_tensor():
    with torch.inference_mode():
        return torch.randn(4, 3, 3, 3)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (_leaf_requiring_grad, ValueError, "input: a leaf tensor that requires grad"),
        (_view, ValueError, r"input: a view of another tensor \(input._base is not None\)"),
        (_not_dense, ValueError, "input: expected a contiguous or channels-last tensor"),
        (_not_dense_3d, ValueError, "input: expected a contiguous or channels-last tensor"),
        (_inference_tensor, ValueError, "input: an inference tensor"),
        (lambda: torch.randn(4, 5, 3, 3) * 1, ValueError, "expected input with 3 channels"),
        (lambda: torch.randn(4, 3, 3, 2, 2) * 1, ValueError, "expected 4D input"),
        (lambda: torch.randn(1, 3, 1, 1) * 1, ValueError, "more than 1 value per channel"),
        (
            lambda: torch.ones(4, 3, 2, 2, dtype=torch.int64),
            TypeError,
            "input: expected a floating",
        ),
    ],
)
def test_rejected_inputs_change_nothing(make, error, match):
    x = make()
    if x.dim() == 3:
        layer, warm_up = InPlaceBatchNormAct1d(3), torch.randn(4, 3, 5)
    else:
        layer, warm_up = InPlaceBatchNormAct2d(3), torch.randn(4, 3, 3, 3)
    layer(warm_up * 1)  # non-trivial buffers
    before = buffers_of(layer)
    values = x.detach().clone()
    with pytest.raises(error, match=match):
        layer(x)
    assert_bit_identical(before, buffers_of(layer))
    assert torch.equal(x.detach(), values)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"activation": "relu"}, ValueError, "activation: ReLU is not invertible.*BatchNormAct2d"),
        ({"activation": "silu"}, ValueError, "activation: SiLU is not invertible"),
        ({"activation": "gelu"}, ValueError, "activation: GELU is not invertible"),
        ({"activation": "tanh"}, ValueError, "activation: expected None or one of"),
        ({"negative_slope": 0.0}, ValueError, "negative_slope: leaky_relu is invertible only"),
        ({"negative_slope": -0.2}, ValueError, "negative_slope"),
        ({"negative_slope": float("nan")}, TypeError, "negative_slope: expected a finite"),
        ({"activation": "elu", "alpha": 0.0}, ValueError, "alpha: elu is invertible only"),
        ({"weight_eps": -1.0}, ValueError, "weight_eps"),
        ({"weight_eps": "1"}, TypeError, "weight_eps"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        InPlaceBatchNormAct2d(3, **kwargs)


def test_error_names_the_layer_of_the_same_rank():
    with pytest.raises(ValueError, match=r"BatchNormAct3d\(activation='relu'\)"):
        InPlaceBatchNormAct3d(3, "relu")
    assert check_inplace_activation(None, 0.01, 1.0) == "identity"
    assert set(INVERTIBLE_ACTIVATIONS) == set(ACTIVATIONS)


def test_functional_checks_its_input():
    weight = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="input: a leaf tensor"):
        inplace_batch_norm_act_train(_leaf_requiring_grad(), weight, None)
    with pytest.raises(ValueError, match="activation: ReLU"):
        inplace_batch_norm_act_train(torch.randn(2, 3) * 1, weight, None, activation="relu")
    with pytest.raises(ValueError, match="weight_eps"):
        inplace_batch_norm_act_train(torch.randn(2, 3) * 1, weight, None, weight_eps=-1.0)


# --- the out-of-place paths ----------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_eval_and_no_grad_run_out_of_place(activation):
    layer, reference = make_pair(nn.BatchNorm2d, activation)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)
    with torch.no_grad():  # training mode: batch statistics, running update, input kept
        h = x.clone()
        y = layer(h)
        assert y is not h
        assert torch.equal(h, x)
        assert_close(y, reference(x))
    assert_close(layer.running_mean, reference[0].running_mean, msg="running_mean")
    assert_close(layer.running_var, reference[0].running_var, msg="running_var")
    assert int(layer.num_batches_tracked) == int(reference[0].num_batches_tracked) == 1
    layer.eval()
    reference.eval()
    leaf = x.clone().requires_grad_()
    h = leaf * 1
    y = layer(h)  # eval with grad: out of place, differentiable through torch ops
    assert y is not h
    assert torch.equal(h.detach(), x)
    assert_close(y.detach(), reference(x).detach())
    y.sum().backward()
    assert leaf.grad is not None


def test_nothing_requires_grad_runs_out_of_place():
    layer = InPlaceBatchNormAct2d(3).requires_grad_(False)
    x = torch.randn(4, 3, 3, 3)
    y = layer(x)
    assert y is not x
    assert int(layer.num_batches_tracked) == 1


def test_data_input_with_trainable_parameters_is_overwritten():
    # Parameters require grad, the input (a plain tensor) does not: it is overwritten too.
    layer = InPlaceBatchNormAct2d(3)
    x = torch.randn(4, 3, 3, 3)
    y = layer(x)
    assert y is x
    assert y.requires_grad
    y.sum().backward()
    assert layer.weight.grad is not None


def test_torch_compile_takes_the_out_of_place_path():
    layer, reference = make_pair(nn.BatchNorm2d, "elu", torch.float32)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 3, 3, 3)
    leaf = x.clone().requires_grad_()
    h = leaf * 1
    y = compiled(h)
    assert torch.equal(h.detach(), x)  # not overwritten
    leaf_ref = x.clone().requires_grad_()
    y_ref = reference(leaf_ref)
    assert_close(y.detach(), y_ref.detach())
    y.sum().backward()
    y_ref.sum().backward()
    assert_close(leaf.grad, leaf_ref.grad)
    assert_close(layer.running_var, reference[0].running_var)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.trace's own, since 2.10
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # F.batch_norm's size check
def test_jit_trace_takes_the_out_of_place_path():
    layer, reference = make_pair(nn.BatchNorm2d, "leaky_relu")
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    h = x.clone().requires_grad_() * 1
    traced = torch.jit.trace(layer, (h,), check_trace=False)  # training mode, grad recorded
    assert torch.equal(h.detach(), x)  # not overwritten while tracing
    assert_close(traced(x), reference(x))  # batch statistics in both


@pytest.mark.parametrize("activation", ["leaky_relu", "elu"])
def test_fx_trace_in_eval_records_the_weight(activation):
    layer, reference = make_pair(nn.BatchNorm2d, activation)
    layer.eval()
    reference.eval()
    traced = torch.fx.symbolic_trace(layer)
    with torch.no_grad():  # a change after tracing must reach the graph (no baked constant)
        layer.weight.mul_(-2.0)
        reference[0].parametrizations.weight.original.mul_(-2.0)
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    assert_close(traced(x), reference(x))
    with pytest.raises(RuntimeError, match="symbolic_trace"):
        torch.fx.symbolic_trace(layer.train())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script's own, since 2.10
def test_torch_jit_script_is_refused():
    with pytest.raises(RuntimeError, match=r"torch.jit.script: InPlaceBatchNormAct2d.*compile"):
        torch.jit.script(nn.Sequential(nn.Conv2d(3, 3, 1), InPlaceBatchNormAct2d(3)))


# --- in a network, and checkpoints ---------------------------------------------------------------


def _net(norm: nn.Module) -> nn.Sequential:
    torch.manual_seed(8)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), norm, nn.Conv2d(6, 2, 3))


@pytest.mark.slow
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_training_run_matches_the_out_of_place_model(activation):
    layer = InPlaceBatchNormAct2d(6, activation, negative_slope=SLOPE, alpha=ALPHA)
    bn = nn.BatchNorm2d(6)
    parametrize.register_parametrization(bn, "weight", AbsPlusEps(layer.weight_eps))
    ours, theirs = _net(layer), _net(nn.Sequential(bn, torch_activation(activation)))
    gen = torch.Generator().manual_seed(9)
    images = torch.randn(8, 3, 6, 6, generator=gen)
    targets = torch.randn(8, 2, 4, 4, generator=gen)
    curves = []
    for model in (ours, theirs):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses = []
        for _ in range(20):
            optimizer.zero_grad()
            loss = F.mse_loss(model(images), targets)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        curves.append(losses)
    torch.testing.assert_close(torch.tensor(curves[0]), torch.tensor(curves[1]), atol=1e-5, rtol=0)
    assert curves[0][-1] < 0.8 * curves[0][0]  # it did learn something
    assert_close(layer.running_var, bn.running_var)


def test_state_dict_loads_into_torch_batch_norm_and_back():
    layer = InPlaceBatchNormAct2d(4, "elu")
    layer(torch.randn(3, 4, 2, 2) * 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, -1.0, 2.0, 1.5]))
    assert isinstance(layer, nn.BatchNorm2d)
    plain = nn.BatchNorm2d(4)
    plain.load_state_dict(layer.state_dict(), strict=True)
    for key, value in layer.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key
    back = InPlaceBatchNormAct2d(4, "elu")
    back.load_state_dict(plain.state_dict(), strict=True)
    assert set(back.state_dict()) == set(plain.state_dict())
    for key, value in plain.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_repr_and_effective_weight():
    layer = InPlaceBatchNormAct2d(2, "elu", alpha=0.5, weight_eps=1e-3)
    text = repr(layer)
    assert "activation=elu" in text
    assert "alpha=0.5" in text
    assert "weight_eps=0.001" in text
    assert "negative_slope=0.2" in repr(InPlaceBatchNormAct1d(2, negative_slope=0.2))
    assert "activation=identity" in repr(InPlaceBatchNormAct3d(2, None))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([-2.0, 0.0]))
    torch.testing.assert_close(layer.effective_weight(), torch.tensor([2.001, 0.001]))
    assert InPlaceBatchNormAct2d(2, affine=False).effective_weight() is None


def test_same_values_as_fused_batch_norm_act_out_of_place():
    # The eval path is BatchNormAct2d's with the weight |γ| + ε_γ.
    layer = InPlaceBatchNormAct2d(3, "leaky_relu", negative_slope=SLOPE).eval()
    fused = BatchNormAct2d(3, "leaky_relu", negative_slope=SLOPE).eval()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, -2.0, 0.5]))
        layer.running_var.fill_(2.0)
        fused.load_state_dict(layer.state_dict())
        fused.weight.copy_(layer.effective_weight())
    x = torch.randn(4, 3, 3, 3)
    assert_close(layer(x), fused(x))


def test_double_backward_is_refused():
    layer = InPlaceBatchNormAct2d(3)
    x = torch.randn(4, 3, 3, 3, requires_grad=True)
    y = layer(x * 1)
    (dx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dx.sum().backward()
