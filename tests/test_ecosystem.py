"""Drop-in for real: the PyTorch ecosystem treats our layers exactly as ``torch.nn``'s.

Compilers, exporters, tracers and the libraries that find batch norms by type (``update_bn``,
``convert_sync_batchnorm``, ``torch.func``, quantization fusion, timm) must give with our layers
what they give with ``torch.nn.BatchNorm*``. Every check is run for ``torch.nn``'s own layer too
(``kind="torch"``, the baseline that keeps the test honest) and compares against an eager
``torch.nn`` twin holding the same parameters and statistics.

Each ecosystem check runs in a fresh interpreter (:func:`run_fresh`), so no earlier test has
warmed a cache (Dynamo, Inductor, an imported backend) and the thing under test is the first call
made on the model; the script makes the assertions itself.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import batchnorm
from batchnorm.functional import batch_norm

# ---------------------------------------------------------------------------------------------
# Running a check in a fresh interpreter
# ---------------------------------------------------------------------------------------------


def run_fresh(script: str, timeout: float = 240) -> None:
    """Runs ``script`` with ``python -c`` in a new process; fails with its stderr unless it exits 0.

    The process gets ``TRITON_INTERPRET=1``, one OpenMP thread, one Inductor compile thread and
    empty Inductor/Triton cache folders of its own, so nothing compiled by an earlier run is reused.
    """
    with tempfile.TemporaryDirectory(prefix="bn-ecosystem-") as cache:
        env = os.environ.copy()
        env.update(
            TRITON_INTERPRET="1",
            OMP_NUM_THREADS="1",
            TORCHINDUCTOR_COMPILE_THREADS="1",
            TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
            TRITON_CACHE_DIR=os.path.join(cache, "triton"),
        )
        proc = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    if proc.returncode != 0:
        pytest.fail(
            f"fresh process exited with {proc.returncode}\n"
            f"--- stdout (tail) ---\n{proc.stdout[-2000:]}\n"
            f"--- stderr (tail) ---\n{proc.stderr[-6000:]}",
            pytrace=False,
        )


#: Helpers every script starts with: seeded tensors, the models (``torch.nn``'s or ours), an eager
#: ``torch.nn`` twin with the same state, and comparisons of outputs, gradients and buffers.
PRELUDE = textwrap.dedent(
    """
    import copy
    import io

    import torch
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm

    import batchnorm


    def seeded(*shape, seed=0, offset=0.0, scale=1.0, dtype=torch.float32):
        gen = torch.Generator().manual_seed(seed)
        return (offset + scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)


    def randomize(model, seed=10):
        # Non-trivial weight, bias and running statistics in every batch norm of ``model``.
        with torch.no_grad():
            for i, m in enumerate(model.modules()):
                if isinstance(m, _BatchNorm) or type(m).__name__.startswith("FrozenBatchNorm"):
                    c = m.num_features
                    if m.weight is not None:
                        m.weight.copy_(1 + 0.5 * seeded(c, seed=seed + 4 * i))
                        m.bias.copy_(0.5 * seeded(c, seed=seed + 4 * i + 1))
                    if m.running_mean is not None:
                        m.running_mean.copy_(0.5 * seeded(c, seed=seed + 4 * i + 2))
                        m.running_var.copy_(0.5 + seeded(c, seed=seed + 4 * i + 3).abs())
                    if getattr(m, "num_batches_tracked", None) is not None:
                        m.num_batches_tracked.fill_(3)
        return model


    def bn2d(kind, backend, c=3, **kw):
        if kind == "torch":
            return nn.BatchNorm2d(c, **kw)
        return batchnorm.BatchNorm2d(c, backend=backend, **kw)


    def make_seq(kind, backend, **kw):
        # Conv2d(3, 3, 3, padding=1) -> BatchNorm2d -> ReLU.
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), bn2d(kind, backend, **kw), nn.ReLU())
        return randomize(model)


    class Block(nn.Module):
        # relu(bn(conv(x)) + x): torch.nn's BatchNorm2d then the add and the ReLU, or ours fused.
        def __init__(self, kind, backend, **kw):
            super().__init__()
            torch.manual_seed(0)
            self.kind = kind
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            if kind == "torch":
                self.bn = nn.BatchNorm2d(3, **kw)
            else:
                self.bn = batchnorm.BatchNormAct2d(3, activation="relu", backend=backend, **kw)
            randomize(self)

        def forward(self, x):
            y = self.conv(x)
            if self.kind == "torch":
                return torch.relu(self.bn(y) + x)
            return self.bn(y, residual=x)


    FACTORIES = {"seq": make_seq, "block": Block}


    def twin(model, factory, **kw):
        # An eager torch.nn model holding ``model``'s parameters, buffers and mode.
        ref = FACTORIES[factory]("torch", None, **kw)
        ref.load_state_dict(model.state_dict())
        return ref.train(model.training)


    def check(actual, expected, what, atol=2e-5, rtol=1e-4):
        assert actual is not None, f"{what}: got None"
        torch.testing.assert_close(
            actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}"
        )


    def check_state(state, ref, what):
        # Every buffer of ``ref`` (running_mean, running_var, num_batches_tracked) in ``state``.
        for name, buffer in ref.named_buffers():
            assert name in state, f"{what}: no buffer {name!r} in {sorted(state)}"
            check(state[name], buffer, f"{what}: buffer {name}")


    def check_grads(model, ref, what):
        grads = {name: p.grad for name, p in model.named_parameters()}
        for name, p in ref.named_parameters():
            check(grads[name], p.grad, f"{what}: grad of {name}")


    def count(model, cls):
        return sum(isinstance(m, cls) for m in model.modules())
    """
)


def script(body: str, **params: object) -> str:
    """The prelude, one ``NAME = value`` line per parameter, then the dedented ``body``."""
    lines = "".join(f"{name} = {value!r}\n" for name, value in params.items())
    return f"{PRELUDE}\n{lines}\n{textwrap.dedent(body)}"


def _backend_usable(name: str) -> bool:
    """Whether a module can be built with ``backend=name`` here (``auto`` always can)."""
    if name == "auto" or name in batchnorm.available_backends():
        return True
    try:
        batchnorm.BatchNorm2d(1, backend=name)
    except Exception:  # any reason: an unknown name, a missing optional dependency
        return False
    return True


#: ``(kind, backend)`` with its test id: torch.nn's layer, then ours on a backend.
Impl = tuple[str, str | None, str]


def _impl_list(backends: tuple[str, ...]) -> list[Impl]:
    """torch.nn's layer, then ours on each of ``backends``."""
    return [("torch", None, "torch"), *(("ours", name, f"ours-{name}") for name in backends)]


def _params(impl: Impl, *leading: object, prefix: str = "") -> object:
    """A ``pytest.param`` of ``(*leading, kind, backend)``, skipped for an unusable backend."""
    kind, backend, ident = impl
    usable = backend is None or _backend_usable(backend)
    skip = pytest.mark.skipif(not usable, reason=f"backend {backend!r} unusable here")
    return pytest.param(*leading, kind, backend, id=prefix + ident, marks=skip)


#: For torch.compile: torch.nn's layer, then ours on every backend a CPU user may pick.
COMPILE_BACKENDS = _impl_list(("auto", "aten", "numba", "torch"))
#: For everything else (and Inductor): torch.nn's layer and ours with the default backend.
DEFAULT_BACKEND = _impl_list(("auto",))
COMPILE_IMPLS = [_params(impl) for impl in COMPILE_BACKENDS]
IMPLS = [_params(impl) for impl in DEFAULT_BACKEND]
KINDS = ("torch", "ours")

requires_timm = pytest.mark.skipif(
    importlib.util.find_spec("timm") is None, reason="timm is not installed"
)
requires_torchvision = pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed"
)


# ---------------------------------------------------------------------------------------------
# torch.compile, as the first call in the process
# ---------------------------------------------------------------------------------------------

COMPILE_TRAIN = """
model = FACTORIES[FACTORY](KIND, BACKEND, **KW).train()
refs = [copy.deepcopy(model), twin(model, FACTORY, **KW)]
compiled = torch.compile(model, backend=COMPILER, fullgraph=FULLGRAPH)
for step in range(STEPS):
    x = seeded(4, 3, 5, 5, seed=step, offset=1.0, scale=2.0)
    dy = seeded(4, 3, 5, 5, seed=100 + step)
    xa = x.clone().requires_grad_()
    out = compiled(xa)
    out.backward(dy)
    for r, ref in enumerate(refs):
        what = f"step {step}, reference {r}"
        xr = x.clone().requires_grad_()
        expected = ref(xr)
        expected.backward(dy)
        check(out, expected, f"{what}: output")
        check(xa.grad, xr.grad, f"{what}: input grad")
        check_grads(model, ref, what)
        check_state(model.state_dict(), ref, what)
"""

COMPILE_EVAL = """
model = FACTORIES[FACTORY](KIND, BACKEND).eval()
refs = [copy.deepcopy(model), twin(model, FACTORY)]
compiled = torch.compile(model, backend=COMPILER, fullgraph=FULLGRAPH)
for step in range(2):
    x = seeded(4, 3, 5, 5, seed=step, offset=1.0, scale=2.0)
    out = compiled(x)
    for r, ref in enumerate(refs):
        what = f"step {step}, reference {r}"
        check(out, ref(x), f"{what}: output")
        check_state(model.state_dict(), ref, what)
"""


def _compile_cases(*configs: tuple[str, bool, list[Impl]]) -> list[object]:
    """``(compiler, fullgraph, kind, backend)`` parameters: each config over its impls."""
    return [
        _params(impl, compiler, fullgraph, prefix=f"{compiler}-{mode}-")
        for compiler, fullgraph, impls in configs
        for mode in ["fullgraph" if fullgraph else "graph_breaks"]
        for impl in impls
    ]


# Inductor compiles take 10-30 s each, so only torch.nn's layer and ours on the default backend
# go through it; AOTAutograd (what Inductor lowers from) sees every backend, with and without
# graph breaks.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("compiler", "fullgraph", "kind", "backend"),
    _compile_cases(
        ("aot_eager", True, COMPILE_BACKENDS),
        ("aot_eager", False, COMPILE_BACKENDS),
        ("inductor", True, DEFAULT_BACKEND),
    ),
)
def test_compile_train_backward(
    compiler: str, fullgraph: bool, kind: str, backend: str | None
) -> None:
    """Compiled training steps match eager torch.nn: output, grads and running statistics."""
    body = script(
        COMPILE_TRAIN, KIND=kind, BACKEND=backend, FACTORY="seq", KW={}, STEPS=2,
        COMPILER=compiler, FULLGRAPH=fullgraph,
    )  # fmt: skip
    run_fresh(body)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("compiler", "fullgraph", "kind", "backend"),
    _compile_cases(("aot_eager", True, COMPILE_BACKENDS), ("inductor", False, DEFAULT_BACKEND)),
)
def test_compile_eval(compiler: str, fullgraph: bool, kind: str, backend: str | None) -> None:
    """A compiled model in eval mode matches eager torch.nn and leaves the statistics alone."""
    body = script(
        COMPILE_EVAL, KIND=kind, BACKEND=backend, FACTORY="seq", COMPILER=compiler,
        FULLGRAPH=fullgraph,
    )  # fmt: skip
    run_fresh(body)


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "backend"), COMPILE_IMPLS)
def test_compile_fused_residual_train(kind: str, backend: str | None) -> None:
    """BatchNormAct2d with a residual, compiled whole, trains like torch.nn's BN + add + ReLU."""
    body = script(
        COMPILE_TRAIN, KIND=kind, BACKEND=backend, FACTORY="block", KW={}, STEPS=2,
        COMPILER="aot_eager", FULLGRAPH=True,
    )  # fmt: skip
    run_fresh(body)


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "backend"), COMPILE_IMPLS)
def test_compile_cumulative_momentum(kind: str, backend: str | None) -> None:
    """momentum=None (a cumulative average over num_batches_tracked) compiles like torch.nn's."""
    body = script(
        COMPILE_TRAIN, KIND=kind, BACKEND=backend, FACTORY="seq", KW={"momentum": None},
        STEPS=3, COMPILER="aot_eager", FULLGRAPH=False,
    )  # fmt: skip
    run_fresh(body)


# ---------------------------------------------------------------------------------------------
# torch.export
# ---------------------------------------------------------------------------------------------

EXPORT = """
model = make_seq(KIND, BACKEND).train(TRAIN)
start = copy.deepcopy(model)
x0 = seeded(4, 3, 5, 5, seed=0, offset=1.0, scale=2.0)
exported = torch.export.export(model, (x0,))
# The functional (decomposed) program lists the buffers it writes; the training IR that export
# returns first updates them in place instead.
decomposed = exported.run_decompositions()
mutated = sorted(decomposed.graph_signature.buffers_to_mutate.values())
expected_mutated = ["1.num_batches_tracked", "1.running_mean", "1.running_var"] if TRAIN else []
assert mutated == expected_mutated, f"buffers to mutate: {mutated}"
for label, program in (("exported", exported), ("decomposed", decomposed)):
    module = program.module()
    if label == "exported":
        check_state(module.state_dict(), start, "exported module before its first call")
    # Eager references starting where this module starts (the programs may share buffers).
    refs = [copy.deepcopy(start), twin(start, "seq")]
    for ref in refs:
        ref.load_state_dict(module.state_dict())
    for step in range(2):
        x = seeded(4, 3, 5, 5, seed=step + 1, offset=1.0, scale=2.0)
        out = module(x)
        for r, ref in enumerate(refs):
            what = f"{label}, step {step}, reference {r}"
            check(out, ref(x), f"{what}: output")
            check_state(module.state_dict(), ref, f"{what}: module")
"""


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(("kind", "backend"), IMPLS)
def test_export(kind: str, backend: str | None, train: bool) -> None:
    """torch.export.export: the exported module computes and updates buffers like eager."""
    run_fresh(script(EXPORT, KIND=kind, BACKEND=backend, TRAIN=train))


# ---------------------------------------------------------------------------------------------
# torch.fx: symbolic_trace, fuse, torchvision's feature extraction
# ---------------------------------------------------------------------------------------------

FX_TRACE = """
model = make_seq(KIND, BACKEND).train(TRAIN)
refs = [copy.deepcopy(model), twin(model, "seq")]
traced = torch.fx.symbolic_trace(model)
for step in range(2):
    x = seeded(4, 3, 5, 5, seed=step, offset=1.0, scale=2.0)
    out = traced(x)
    for r, ref in enumerate(refs):
        what = f"step {step}, reference {r}"
        check(out, ref(x), f"{what}: output")
        check_state(traced.state_dict(), ref, f"{what}: traced module")
"""

FX_FUSE = """
import torch.fx.experimental.optimization as fx_optimization

model = make_seq(KIND, BACKEND).eval()
ref = twin(model, "seq")
fused = fx_optimization.fuse(model)
x = seeded(4, 3, 5, 5, offset=1.0, scale=2.0)
check(fused(x), ref(x), "fused output", atol=1e-5)
check(model(x), ref(x), "the model itself after fuse", atol=1e-5)
left = [type(m).__name__ for m in fused.modules() if isinstance(m, _BatchNorm)]
expected_left = [type(m).__name__ for m in fx_optimization.fuse(ref).modules()
                 if isinstance(m, _BatchNorm)]
assert left == expected_left, f"batch norms left after fuse: {left}, torch.nn: {expected_left}"
"""

FEATURE_EXTRACTOR = """
from torchvision.models.feature_extraction import create_feature_extractor

model = make_seq(KIND, BACKEND).eval()
ref = twin(model, "seq")
extractor = create_feature_extractor(model, return_nodes={"1": "bn", "2": "act"})
x = seeded(4, 3, 5, 5, offset=1.0, scale=2.0)
features = extractor(x)
check(features["bn"], ref[1](ref[0](x)), "feature 'bn'")
check(features["act"], ref(x), "feature 'act'")
"""


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(("kind", "backend"), IMPLS)
def test_fx_symbolic_trace(kind: str, backend: str | None, train: bool) -> None:
    """torch.fx.symbolic_trace: the traced module computes and updates stats like eager."""
    run_fresh(script(FX_TRACE, KIND=kind, BACKEND=backend, TRAIN=train))


@pytest.mark.parametrize(("kind", "backend"), IMPLS)
def test_fx_fuse_conv_bn(kind: str, backend: str | None) -> None:
    """torch.fx.experimental.optimization.fuse folds the eval batch norm into the conv."""
    run_fresh(script(FX_FUSE, KIND=kind, BACKEND=backend))


@requires_torchvision
@pytest.mark.parametrize(("kind", "backend"), IMPLS)
def test_torchvision_feature_extractor(kind: str, backend: str | None) -> None:
    """torchvision's create_feature_extractor sees the batch norm as one node, like torch.nn's."""
    run_fresh(script(FEATURE_EXTRACTOR, KIND=kind, BACKEND=backend))


# ---------------------------------------------------------------------------------------------
# TorchScript: torch.jit.script and torch.jit.trace (+ save / load)
# ---------------------------------------------------------------------------------------------

JIT_SCRIPT = """
def make_layer(kind):
    bn = nn.BatchNorm2d(3) if kind == "torch" else batchnorm.BatchNorm2d(3)
    if ACT:
        bn = nn.Sequential(bn, nn.ReLU()) if kind == "torch" else batchnorm.BatchNormAct2d(3)
    return randomize(bn)


def bn_of(layer):
    return layer[0] if isinstance(layer, nn.Sequential) else layer


def bn_state(layer):
    # The batch norm's entries of a (scripted) layer's state_dict, without the "0." of Sequential.
    prefix = "0." if KIND == "torch" and ACT else ""
    state = layer.state_dict()
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


layer = make_layer(KIND).train()
ref = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU() if ACT else nn.Identity()).train()
ref[0].load_state_dict(bn_of(layer).state_dict())
scripted = torch.jit.script(layer)
for step in range(2):
    x = seeded(4, 3, 5, 5, seed=step, offset=1.0, scale=2.0)
    check(scripted(x), ref(x), f"train step {step}: output")
    check_state(bn_state(scripted), ref[0], f"train step {step}")
scripted.eval()
ref.eval()
x = seeded(4, 3, 5, 5, seed=5, offset=1.0, scale=2.0)
check(scripted(x), ref(x), "eval: output")
check_state(bn_state(scripted), ref[0], "eval")
buffer = io.BytesIO()
torch.jit.save(scripted, buffer)
buffer.seek(0)
loaded = torch.jit.load(buffer)
check(loaded(x), ref(x), "eval, saved and loaded: output")
"""

JIT_TRACE_EVAL = """
model = make_seq(KIND, BACKEND).eval()
ref = twin(model, "seq")
x0 = seeded(4, 3, 5, 5, seed=0, offset=1.0, scale=2.0)
traced = torch.jit.trace(model, (x0,))
graph = str(traced.inlined_graph)
assert "aten::batch_norm" in graph, graph
buffer = io.BytesIO()
torch.jit.save(traced, buffer)
buffer.seek(0)
loaded = torch.jit.load(buffer)
for step in range(2):
    x = seeded(4, 3, 5, 5, seed=step + 1, offset=1.0, scale=2.0)
    check(traced(x), ref(x), f"step {step}: traced output")
    check(loaded(x), ref(x), f"step {step}: loaded output")
check_state(loaded.state_dict(), ref, "loaded module")
"""

JIT_TRACE_TRAIN = """
model = make_seq(KIND, BACKEND).train()
x0 = seeded(4, 3, 5, 5, seed=0, offset=1.0, scale=2.0)
traced = torch.jit.trace(model, (x0,))
buffer = io.BytesIO()
torch.jit.save(traced, buffer)
buffer.seek(0)
loaded = torch.jit.load(buffer)
assert loaded.training
ref = make_seq("torch", None).train()
ref.load_state_dict(loaded.state_dict())  # where tracing left the statistics
for step in range(2):
    x = seeded(4, 3, 5, 5, seed=step + 1, offset=1.0, scale=2.0)
    check(loaded(x), ref(x), f"step {step}: loaded output")
    check_state(loaded.state_dict(), ref, f"step {step}: loaded module")
"""


@pytest.mark.parametrize("act", [False, True], ids=["BatchNorm2d", "BatchNormAct2d-relu"])
@pytest.mark.parametrize("kind", KINDS)
def test_jit_script(kind: str, act: bool) -> None:
    """torch.jit.script compiles the layer; train (stats too), eval and save/load match torch.nn."""
    run_fresh(script(JIT_SCRIPT, KIND=kind, ACT=act))


@pytest.mark.parametrize(("kind", "backend"), IMPLS)
def test_jit_trace_eval_save_load(kind: str, backend: str | None) -> None:
    """torch.jit.trace in eval records aten::batch_norm; the saved and loaded trace matches."""
    run_fresh(script(JIT_TRACE_EVAL, KIND=kind, BACKEND=backend))


@pytest.mark.parametrize(("kind", "backend"), IMPLS)
def test_jit_trace_train_save_load(kind: str, backend: str | None) -> None:
    """A training-mode trace saves, loads and trains on: output and running stats like eager."""
    run_fresh(script(JIT_TRACE_TRAIN, KIND=kind, BACKEND=backend))


# ---------------------------------------------------------------------------------------------
# Batch norms by type: isinstance, weight-decay groups
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda: batchnorm.BatchNorm1d(3), nn.BatchNorm1d),
        (lambda: batchnorm.BatchNorm2d(3), nn.BatchNorm2d),
        (lambda: batchnorm.BatchNorm3d(3), nn.BatchNorm3d),
        (lambda: batchnorm.BatchNormAct2d(3, activation="relu"), nn.BatchNorm2d),
        (lambda: batchnorm.GhostBatchNorm2d(3, virtual_batch_size=2), nn.BatchNorm2d),
        (lambda: batchnorm.BatchRenorm2d(3), nn.BatchNorm2d),
    ],
    ids=["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct2d", "Ghost2d", "Renorm2d"],
)
def test_isinstance_torch_batch_norm(
    ours: Callable[[], nn.Module], theirs: type[nn.Module]
) -> None:
    """Our batch norms are torch's by isinstance: _BatchNorm and the nn class of their rank."""
    module = ours()
    assert isinstance(theirs(3), _BatchNorm)  # the baseline
    assert isinstance(module, _BatchNorm)
    assert isinstance(module, theirs)


def test_frozen_is_not_a_torch_batch_norm() -> None:
    """FrozenBatchNorm2d is no _BatchNorm, so libraries that retrain batch norms leave it alone."""
    frozen = batchnorm.FrozenBatchNorm2d(3)
    assert not isinstance(frozen, _BatchNorm)
    assert isinstance(nn.BatchNorm2d(3), _BatchNorm)  # the criterion does find torch's layer


def _weight_decay_exempt(model: nn.Module) -> list[str]:
    """Names of the parameters a typical optimizer setup exempts from weight decay."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [
        names[id(p)]
        for m in model.modules()
        if isinstance(m, _BatchNorm)
        for p in m.parameters(recurse=False)
    ]


def test_weight_decay_grouping() -> None:
    """Grouping parameters by isinstance(m, _BatchNorm) finds ours exactly as torch.nn's."""

    def build(kind: str) -> nn.Module:
        pick = 0 if kind == "torch" else 1
        pairs = [
            (nn.BatchNorm1d(3), batchnorm.BatchNorm1d(3)),
            (nn.BatchNorm2d(3), batchnorm.BatchNorm2d(3)),
            (nn.BatchNorm3d(3), batchnorm.BatchNorm3d(3)),
            (nn.BatchNorm2d(3), batchnorm.BatchNormAct2d(3)),
            (nn.BatchNorm2d(3, affine=False), batchnorm.BatchNorm2d(3, affine=False)),
        ]
        return nn.ModuleList([nn.Conv2d(3, 3, 1), *(p[pick] for p in pairs), nn.Linear(3, 2)])

    expected = _weight_decay_exempt(build("torch"))
    assert len(expected) == 8
    assert _weight_decay_exempt(build("ours")) == expected


# ---------------------------------------------------------------------------------------------
# Libraries that find batch norms by type
# ---------------------------------------------------------------------------------------------

UPDATE_BN = """
model = make_seq(KIND, BACKEND).train()
ref = twin(model, "seq")
loader = [seeded(4, 3, 5, 5, seed=s, offset=s, scale=1.0 + s) for s in range(3)]
torch.optim.swa_utils.update_bn(loader, model)
torch.optim.swa_utils.update_bn(loader, ref)
check_state(model.state_dict(), ref, "after update_bn")
assert model[1].momentum == 0.1 and model.training
# Independently: the plain average of the batch means and unbiased variances.
with torch.no_grad():
    hidden = [ref[0](x) for x in loader]
    mean = torch.stack([h.mean((0, 2, 3)) for h in hidden]).mean(0)
    var = torch.stack([h.transpose(0, 1).flatten(1).var(1) for h in hidden]).mean(0)
check(model[1].running_mean, mean, "running_mean vs the average of batch means")
check(model[1].running_var, var, "running_var vs the average of batch variances")
assert int(model[1].num_batches_tracked) == len(loader)
"""

UPDATE_BN_FROZEN = """
torch.manual_seed(0)
frozen = batchnorm.FrozenBatchNorm2d.from_batchnorm(randomize(nn.BatchNorm2d(3)).eval())
model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), frozen, nn.ReLU(), nn.BatchNorm2d(3))
before = {name: t.clone() for name, t in model[1].state_dict().items()}
loader = [seeded(4, 3, 5, 5, seed=s, offset=s) for s in range(3)]
torch.optim.swa_utils.update_bn(loader, model)
assert int(model[3].num_batches_tracked) == len(loader), "update_bn did not run"
after = model[1].state_dict()
assert before.keys() == after.keys()
for name, old in before.items():
    assert after[name].dtype == old.dtype and torch.equal(after[name], old), name
assert isinstance(model[1], batchnorm.FrozenBatchNorm2d)
"""

SYNC_BN = """
torch.manual_seed(0)
model = randomize(nn.Sequential(
    nn.Conv2d(3, 3, 3, padding=1), bn2d(KIND, BACKEND), nn.ReLU(),
    nn.Conv2d(3, 3, 3, padding=1), bn2d(KIND, BACKEND),
)).eval()
ref = copy.deepcopy(model)
synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
assert count(synced, nn.SyncBatchNorm) == 2, synced
assert count(synced, _BatchNorm) == 2, synced
x = seeded(4, 3, 5, 5, offset=1.0, scale=2.0)
check(synced.eval()(x), ref(x), "eval output after convert_sync_batchnorm")
"""

SYNC_BN_FROZEN = """
torch.manual_seed(0)
frozen = batchnorm.FrozenBatchNorm2d.from_batchnorm(randomize(nn.BatchNorm2d(3)).eval())
model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), frozen, nn.ReLU(), nn.BatchNorm2d(3))
synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
assert synced[1] is frozen, synced
assert isinstance(synced[3], nn.SyncBatchNorm), synced
"""

FUNC_REPLACE = """
model = make_seq(KIND, BACKEND).train(TRAIN)
ref = twin(model, "seq")
for m in (model, ref):
    torch.func.replace_all_batch_norm_modules_(m)
bn = model[1]
assert bn.running_mean is None and bn.running_var is None and bn.num_batches_tracked is None
assert not bn.track_running_stats
xs = seeded(2, 4, 3, 5, 5, offset=1.0, scale=2.0)
out = torch.func.vmap(model)(xs)
expected = torch.stack([ref(x) for x in xs])
check(out, expected, "vmapped output")
check(model(xs[0]), expected[0], "plain call output")
"""

FUSE_MODULES = """
model = make_seq(KIND, BACKEND).eval()
ref = twin(model, "seq")
fused = torch.ao.quantization.fuse_modules(model, [["0", "1"]])
assert type(fused[1]) is nn.Identity, fused
assert type(fused[0]) is nn.Conv2d, fused
x = seeded(4, 3, 5, 5, offset=1.0, scale=2.0)
check(fused(x), ref(x), "fused output", atol=1e-5)
check(fused(x), model(x), "fused vs unfused output", atol=1e-5)
"""


@pytest.mark.parametrize(("kind", "backend"), IMPLS)
def test_swa_update_bn(kind: str, backend: str | None) -> None:
    """torch.optim.swa_utils.update_bn recomputes our running statistics as torch.nn's."""
    run_fresh(script(UPDATE_BN, KIND=kind, BACKEND=backend))


def test_swa_update_bn_leaves_frozen_alone() -> None:
    """update_bn retrains the torch.nn batch norm and leaves FrozenBatchNorm2d bit-identical."""
    run_fresh(script(UPDATE_BN_FROZEN))


@pytest.mark.parametrize(("kind", "backend"), IMPLS)
def test_convert_sync_batchnorm(kind: str, backend: str | None) -> None:
    """SyncBatchNorm.convert_sync_batchnorm converts each of our BatchNorm2d like torch.nn's."""
    run_fresh(script(SYNC_BN, KIND=kind, BACKEND=backend))


def test_convert_sync_batchnorm_leaves_frozen_alone() -> None:
    """convert_sync_batchnorm converts the torch.nn layer and leaves FrozenBatchNorm2d as is."""
    run_fresh(script(SYNC_BN_FROZEN))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(("kind", "backend"), IMPLS)
def test_func_replace_all_batch_norm_modules(kind: str, backend: str | None, train: bool) -> None:
    """torch.func.replace_all_batch_norm_modules_ drops our buffers; vmap over the model runs."""
    run_fresh(script(FUNC_REPLACE, KIND=kind, BACKEND=backend, TRAIN=train))


@pytest.mark.parametrize(("kind", "backend"), IMPLS)
def test_quantization_fuse_modules(kind: str, backend: str | None) -> None:
    """torch.ao.quantization.fuse_modules folds our BatchNorm2d into the conv like torch.nn's."""
    run_fresh(script(FUSE_MODULES, KIND=kind, BACKEND=backend))


# ---------------------------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------------------------

TIMM_FREEZE = """
from timm.layers import freeze_batch_norm_2d
from timm.layers.norm_act import FrozenBatchNorm2d as TimmFrozen  # torchvision's in timm 1.0

torch.manual_seed(0)
model = randomize(nn.Sequential(
    nn.Conv2d(3, 3, 3, padding=1), bn2d(KIND, BACKEND), nn.ReLU(),
    nn.Conv2d(3, 3, 3, padding=1), bn2d(KIND, BACKEND),
)).eval()
x = seeded(4, 3, 5, 5, offset=1.0, scale=2.0)
expected = model(x)
frozen = freeze_batch_norm_2d(model)
assert count(frozen, TimmFrozen) == 2, frozen
assert count(frozen, _BatchNorm) == 0, frozen
check(frozen(x), expected, "frozen output")
"""

TIMM_CONVERT = """
import timm
from timm.layers import BatchNormAct2d as TimmBatchNormAct2d

from batchnorm.tools import convert

torch.manual_seed(0)
model = randomize(timm.create_model(MODEL, pretrained=False)).double()


def exactly(model, cls):
    return sum(type(m) is cls for m in model.modules())


timm_layers = exactly(model, TimmBatchNormAct2d)
torch_layers = exactly(model, nn.BatchNorm2d)
assert torch_layers + timm_layers == count(model, _BatchNorm) > 0
converted = convert(model, to="batchnorm")
assert count(converted, TimmBatchNormAct2d) == 0, "timm BatchNormAct2d left after convert"
assert exactly(converted, nn.BatchNorm2d) == 0, "torch.nn BatchNorm2d left after convert"
assert exactly(converted, batchnorm.BatchNormAct2d) == timm_layers
assert exactly(converted, batchnorm.BatchNorm2d) == torch_layers
back = convert(converted, to="torch")
assert exactly(back, TimmBatchNormAct2d) == timm_layers
assert exactly(back, nn.BatchNorm2d) == torch_layers
assert count(back, batchnorm.BatchNormActBase) + count(back, batchnorm.BatchNormBase) == 0
for step, train in enumerate((False, True, True)):
    x = seeded(2, 3, 64, 64, seed=step, dtype=torch.float64)
    models = [m.train(train) for m in (model, converted, back)]
    expected = models[0](x)
    for name, m in zip(("converted", "converted back"), models[1:]):
        what = f"step {step} ({'train' if train else 'eval'}), {name}"
        check(m(x), expected, f"{what}: output", atol=1e-9, rtol=1e-7)
        state = m.state_dict()
        for key, value in model.state_dict().items():
            check(state[key], value, f"{what}: {key}", atol=1e-9, rtol=1e-7)
"""


@requires_timm
@pytest.mark.parametrize(("kind", "backend"), IMPLS)
def test_timm_freeze_batch_norm_2d(kind: str, backend: str | None) -> None:
    """timm.layers.freeze_batch_norm_2d freezes our BatchNorm2d layers as it does torch.nn's."""
    run_fresh(script(TIMM_FREEZE, KIND=kind, BACKEND=backend))


@requires_timm
@pytest.mark.slow
@pytest.mark.parametrize("model", ["efficientnet_b0", "resnet50"])
def test_timm_convert_round_trip(model: str) -> None:
    """convert() swaps a timm model's batch norms (BatchNormAct2d too) both ways, same outputs."""
    run_fresh(script(TIMM_CONVERT, MODEL=model))


# ---------------------------------------------------------------------------------------------
# The empty 1-D input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_empty_1d_input(training: bool) -> None:
    """batch_norm of the empty 1-D input returns what F.batch_norm returns: an empty (0,)."""
    args = (torch.empty(0), torch.empty(0), torch.empty(0))
    expected = F.batch_norm(*args, training=training)
    assert expected.shape == (0,)
    got = batch_norm(torch.empty(0), torch.empty(0), torch.empty(0), training=training)
    assert got.shape == expected.shape
    assert got.dtype == expected.dtype
