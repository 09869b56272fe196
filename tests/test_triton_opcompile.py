"""The ``torch.library.triton_op`` route (:mod:`batchnorm.backends.triton_compiled`) on CPU.

Under ``TRITON_INTERPRET=1`` the ops run their kernels in the interpreter; ``torch.compile``
with ``aot_eager`` decomposes them into ``triton_kernel_wrapper_functional`` nodes and runs
those in the interpreter too. Inductor cannot run here (it needs a GPU driver to build its
launcher), nor can torch's mutation analysis (it lowers the kernel to TTIR for the active
driver's target): the tests stand in a table of the pointers each kernel writes, the same
information that analysis gives on a GPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import torch

pytest.importorskip("triton")

from batchnorm.backends import triton_compiled as tc
from batchnorm.backends import triton_ops

if not tc.available():
    pytest.skip("torch.library.triton_op needs torch >= 2.6", allow_module_level=True)

from torch._dynamo.backends.common import aot_autograd
from torch._higher_order_ops import triton_kernel_wrap as tkw

#: Pointers each traced kernel writes, by its constexpr flags (what torch's TTIR analysis finds).
_WRITES = {
    "reduce_stats_kernel": lambda k: ["partial_ptr", "counter_ptr", "mean_ptr", "invstd_ptr",
                                      "var_ptr"]
    + (["new_running_mean_ptr", "new_running_var_ptr"] if k["UPDATE_RUNNING"] else []),
    "normalize_kernel": lambda k: ["y_ptr"] + (["positive_ptr"] if k["SAVE_MASK"] else []),
    "inference_kernel": lambda k: ["y_ptr"],
    "reduce_grads_kernel": lambda k: ["partial_ptr", "counter_ptr", "dweight_ptr", "dbias_ptr"],
    "input_grad_kernel": lambda k: ["dx_ptr"] + (["dz_ptr"] if k["WRITE_DZ"] else []),
}  # fmt: skip


def _mutated(kernel_idx: int, constant_args_idx: int, kwargs: dict[str, Any], _tma: Any) -> list:
    kernel = tkw.kernel_side_table.get_kernel(kernel_idx)
    constants = tkw.kernel_side_table.get_constant_args(constant_args_idx)
    while hasattr(kernel, "configs"):  # the one-config Autotuner that carries num_warps
        kernel = kernel.fn
    return _WRITES[kernel.fn.__name__]({**kwargs, **constants})


@pytest.fixture(autouse=True)
def _mutation_table(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(tkw, "get_mutated_tensors", _mutated)
    logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _capturing_backend(graphs: list[torch.fx.GraphModule]) -> Any:
    def compiler(gm: torch.fx.GraphModule, _inputs: Any) -> Any:
        graphs.append(gm)
        return torch._functorch.aot_autograd.make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler)


def _targets(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def _args(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 7, generator=g).requires_grad_()
    z = torch.randn(3, 5, 7, generator=g).requires_grad_()
    w = (torch.rand(5, generator=g) + 0.5).requires_grad_()
    b = torch.randn(5, generator=g).requires_grad_()
    return x, z, w, b


def test_fakes_give_the_custom_ops_shapes_dtypes_and_strides() -> None:
    """Under fake tensors the triton_op bodies give what the custom_op fakes give."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 6, 9, dtype=torch.bfloat16).transpose(0, 2).contiguous().transpose(0, 2)
        w, rm, rv = torch.empty(6), torch.empty(6), torch.empty(6)
        args = (x, w, w, x, rm, rv, 0.1, 1e-5, "relu", 0.0)
        ours, theirs = tc.train_compiled_op(*args), triton_ops.train_op(*args)
        bargs = (x, x, w, w, None, ours[4], ours[1], ours[2], "relu", 0.0, True)
        ours += tc.train_backward_compiled_op(*bargs)
        theirs += triton_ops.train_backward_op(*bargs)
        iargs = (x, rm, rv, w, None, x, 1e-5, "gelu", 0.0)
        ours += (tc.inference_compiled_op(*iargs),)
        theirs += (triton_ops.inference_op(*iargs),)
    assert len(ours) == len(theirs) == 12
    for a, b in zip(ours, theirs, strict=True):
        assert (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride())


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_aot_graph_holds_the_kernels_and_matches_eager(activation: str) -> None:
    """fullgraph ``torch.compile``: forward and backward graphs launch our kernels as
    ``triton_kernel_wrapper_functional`` (no opaque custom op), and agree with the eager
    custom op and with a float64 computation."""
    x, z, w, b = _args()
    rm, rv = torch.zeros(5), torch.ones(5)

    def f(x: torch.Tensor, z: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> Any:
        out = tc.train_compiled_op(x, w, b, z, rm, rv, 0.1, 1e-5, activation, 0.0)
        return out[0], out[5], out[6]

    graphs: list[torch.fx.GraphModule] = []
    y, new_rm, new_rv = torch.compile(f, backend=_capturing_backend(graphs), fullgraph=True)(
        x, z, w, b
    )
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, z, w, b), dy)
    assert len(graphs) == 2  # forward, backward
    for gm in graphs:
        names = _targets(gm)
        assert names.count("triton_kernel_wrapper_functional") == 2, names
        assert not any(n.startswith("batchnorm.") for n in names), names

    ref = triton_ops.train_op(x, w, b, z, rm, rv, 0.1, 1e-5, activation, 0.0)
    ref_grads = torch.autograd.grad(ref[0], (x, z, w, b), dy)
    torch.testing.assert_close(y, ref[0])
    torch.testing.assert_close((new_rm, new_rv), (ref[5], ref[6]))
    for ours, theirs in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(ours, theirs)

    xd, zd, wd, bd = (t.detach().double().requires_grad_() for t in (x, z, w, b))
    u = torch.nn.functional.batch_norm(xd, None, None, wd, bd, training=True, eps=1e-5) + zd
    y64 = torch.relu(u) if activation == "relu" else torch.nn.functional.gelu(u)
    torch.testing.assert_close(y.double(), y64, atol=1e-5, rtol=1e-5)
    exact_grads = torch.autograd.grad(y64, (xd, zd, wd, bd), dy.double())
    for ours, exact in zip(grads, exact_grads, strict=True):
        torch.testing.assert_close(ours.double(), exact, atol=1e-4, rtol=1e-4)


def test_inference_op_compiles_to_one_kernel() -> None:
    """Evaluation forward: one ``triton_kernel_wrapper_functional``, the eager result."""
    x, z, w, b = _args(1)
    rm, rv = torch.randn(5), torch.rand(5) + 0.5

    def f(x: torch.Tensor) -> torch.Tensor:
        return tc.inference_compiled_op(x, rm, rv, w, b, z, 1e-5, "silu", 0.0)

    graphs: list[torch.fx.GraphModule] = []
    with torch.no_grad():
        y = torch.compile(f, backend=_capturing_backend(graphs), fullgraph=True)(x)
        ref = triton_ops.inference_op(x, rm, rv, w, b, z, 1e-5, "silu", 0.0)
    assert _targets(graphs[0]).count("triton_kernel_wrapper_functional") == 1
    torch.testing.assert_close(y, ref)


def test_route_selection() -> None:
    """The triton_op ops serve compiled CUDA calls; eager and CPU calls keep their routes."""
    assert not tc.use_triton_op(torch.empty(1))  # not compiling
    seen: list[bool] = []

    def f(x: torch.Tensor) -> torch.Tensor:
        seen.append(tc.use_triton_op(x))
        return x + 1

    torch.compile(f, backend="eager", fullgraph=True)(torch.empty(2))
    assert seen == [tc._ROUTE == "triton_op"]


_FRESH = """
import os, sys, torch
sys.path.insert(0, {tests!r})
import test_triton_opcompile as t
t.tkw.get_mutated_tensors = t._mutated
from batchnorm.backends.triton_backend import TritonBackend
seen = []
def f(x, w, b, rm, rv):
    out = TritonBackend().forward_act(x, w, b, None, 1e-5, "relu", 0.0, rm, rv, 0.1)
    return out.y
def count(gm, inputs):
    seen.extend(str(n.target) for n in gm.graph.nodes)
    return gm.forward
from torch._dynamo.backends.common import aot_autograd
x, w, b = torch.randn(2, 3, 4), torch.rand(3) + 0.5, torch.randn(3)
y = torch.compile(f, backend=aot_autograd(fw_compiler=count), fullgraph=True)(
    x, w, b, torch.zeros(3), torch.ones(3))
ref = TritonBackend().forward_act(x, w, b, None, 1e-5, "relu", 0.0, None, None, 0.1).y
torch.testing.assert_close(y, ref)
print("kernels", seen.count("triton_kernel_wrapper_functional"),
      "custom", sum(n.startswith("batchnorm.") for n in seen))
"""


def test_backend_takes_the_triton_op_route_first_call_in_a_fresh_process() -> None:
    """With ``BATCHNORM_TRITON_COMPILED=triton_op``, the backend's compiled call (fullgraph,
    first call of a fresh process) launches the kernels as wrapper nodes."""
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "TRITON_INTERPRET": "1", tc.ROUTE_ENV_VAR: "triton_op"}
    done = subprocess.run(
        [sys.executable, "-c", _FRESH.format(tests=tests)], env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("kernels 2 custom 0"), done.stdout
