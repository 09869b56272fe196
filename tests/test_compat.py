"""``batchnorm._compat``'s faster spellings give the answers of the plain ones they replace.

``call_kind`` (one question per call) against the three questions it replaces
(``is_fx_proxy``, ``jit_tracing``, ``traced``) on plain, meta and fake tensors, under a dispatch
mode, inside ``torch.fx.symbolic_trace``, ``torch.jit.trace`` and ``torch.compile``; and
``environ_get`` against ``os.environ.get`` for unset, set, changed and removed variables.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from batchnorm import _compat


def _old_answer(x: object) -> int:
    """What the three questions said, as one of call_kind's answers."""
    if _compat.is_fx_proxy(x) or _compat.jit_tracing():
        return _compat.SYMBOLIC
    return _compat.TRACED if _compat.traced(x) else _compat.EAGER


class _Recording(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return func(*args, **(kwargs or {}))


def test_call_kind_on_tensors_and_modes() -> None:
    x = torch.randn(2, 3)
    assert _compat.call_kind(x) == _old_answer(x) == _compat.EAGER
    parameter = torch.nn.Parameter(x.clone())
    assert _compat.call_kind(parameter) == _old_answer(parameter) == _compat.EAGER
    meta = torch.empty(2, 3, device="meta")
    assert _compat.call_kind(meta) == _old_answer(meta) == _compat.TRACED
    with _Recording():
        assert _compat.call_kind(x) == _old_answer(x) == _compat.TRACED
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        assert _compat.call_kind(fake) == _old_answer(fake) == _compat.TRACED


def _kinds_seen(run) -> list[tuple[int, int]]:
    """``(call_kind, the old answer)`` inside the function ``run(function)`` records."""
    seen: list[tuple[int, int]] = []

    def record(x: torch.Tensor) -> torch.Tensor:
        seen.append((_compat.call_kind(x), _old_answer(x)))
        return x + 1

    run(record)
    return seen


def test_call_kind_while_recording() -> None:
    x = torch.randn(2, 3)
    assert _kinds_seen(torch.fx.symbolic_trace) == [(_compat.SYMBOLIC, _compat.SYMBOLIC)]
    seen = _kinds_seen(lambda f: torch.jit.trace(f, x, check_trace=False))
    assert seen == [(_compat.SYMBOLIC, _compat.SYMBOLIC)]
    torch._dynamo.reset()
    seen = _kinds_seen(lambda f: torch.compile(f, backend="eager", fullgraph=True)(x))
    assert seen == [(_compat.TRACED, _compat.TRACED)]


@pytest.mark.parametrize("value", [None, "", "aten", "cpu", "ümlaut-ß"])
def test_environ_get_reads_what_os_environ_holds(monkeypatch, value) -> None:
    name = "BATCHNORM_TEST_COMPAT_VARIABLE"
    encoded = os.fsencode(name)
    monkeypatch.delenv(name, raising=False)
    assert _compat.environ_get(name, encoded) is None
    if value is None:
        return
    monkeypatch.setenv(name, value)
    assert _compat.environ_get(name, encoded) == os.environ.get(name) == value
    os.environ[name] = value + "-changed"
    assert _compat.environ_get(name, encoded) == value + "-changed"
    del os.environ[name]
    assert _compat.environ_get(name, encoded) is None
