"""Shared helpers: tolerances per dtype, inputs in a given memory format, the backends to loop over.

Every comparison in this suite is against an independent computation (``torch.nn`` /
``torch.nn.functional``, a float64 NumPy or torch formula, or finite differences), never against
another path of this library.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

# Before torch or Triton is imported by anything: Triton's kernels run in its interpreter on CPU
# tensors, and Inductor compiles into a cache of this run only (one left by an older version of
# the library can hold code that no longer matches its ops). xdist's workers inherit both.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="batchnorm-inductor-"))
# The CPU routing tables a machine measures for itself live in a cache of this run, never in the
# user's home; and nothing is measured unless a test asks for it (routing stays the committed
# tables', which the routing tests check).
os.environ.setdefault("BATCHNORM_CACHE_DIR", tempfile.mkdtemp(prefix="batchnorm-cache-"))
os.environ.setdefault("BATCHNORM_CALIBRATE", "0")
from collections.abc import Callable, Iterator, Sequence

import pytest
import torch

import batchnorm
from batchnorm import backends
from tolerances import TOLERANCES, tol  # noqa: F401  (re-exported: tests import them from here)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One intra-op thread per xdist worker: the tensors here are tiny, and two workers with two
    # threads each on two cores spend more time spinning than computing.
    torch.set_num_threads(1)

#: Backends to loop over: whatever the library reports as usable on this machine.
BACKENDS: tuple[str, ...] = batchnorm.available_backends()

#: Memory formats a test can ask for. "channels_last" means channels_last for 4D input and
#: channels_last_3d for 5D input; "noncontiguous" is a strided slice of a larger tensor.
MEMORY_FORMATS = ("contiguous", "channels_last", "noncontiguous")

#: (shape, memory format) pairs covering every rank the modules accept and both layouts.
SHAPE_FORMATS: list[tuple[tuple[int, ...], str]] = [
    ((6, 3), "contiguous"),
    ((4, 3, 5), "contiguous"),
    ((3, 3, 4, 5), "contiguous"),
    ((3, 3, 4, 5), "channels_last"),
    ((2, 3, 3, 2, 4), "contiguous"),
    ((2, 3, 3, 2, 4), "channels_last"),
]


def assert_close(
    actual: torch.Tensor | None,
    expected: torch.Tensor | None,
    dtype: torch.dtype | None = None,
    msg: str = "",
) -> None:
    """Asserts ``actual ≈ expected`` with the tolerance of ``dtype`` (default: ``expected``'s).

    ``None`` must match ``None``. Dtypes must match exactly.
    """
    if expected is None or actual is None:
        assert actual is None, f"{msg}: expected None, got {actual!r}"
        assert expected is None, f"{msg}: expected {expected!r}, got None"
        return
    dtype = expected.dtype if dtype is None else dtype
    assert actual.dtype == expected.dtype, f"{msg}: dtype {actual.dtype} vs {expected.dtype}"
    assert actual.shape == expected.shape, f"{msg}: shape {actual.shape} vs {expected.shape}"
    torch.testing.assert_close(actual, expected, **tol(dtype), msg=lambda m: f"{msg}: {m}")


def torch_memory_format(ndim: int, memory_format: str) -> torch.memory_format:
    """The ``torch.memory_format`` for a named format and an input rank."""
    if memory_format == "channels_last":
        if ndim == 4:
            return torch.channels_last
        if ndim == 5:
            return torch.channels_last_3d
        raise ValueError(f"channels_last needs 4D or 5D input, got {ndim}D")
    return torch.contiguous_format


def make_input(
    shape: Sequence[int],
    memory_format: str = "contiguous",
    dtype: torch.dtype = torch.float32,
    *,
    seed: int = 0,
    scale: float = 1.0,
    offset: float = 0.0,
    requires_grad: bool = False,
) -> torch.Tensor:
    """A random leaf tensor ``offset + scale·randn(shape)`` in the requested memory format.

    Values are drawn in float64 from a seeded generator and then cast, so the same seed gives the
    same numbers (up to rounding) in every dtype and layout.
    """
    shape = tuple(shape)
    gen = torch.Generator().manual_seed(seed)
    if memory_format == "noncontiguous":
        # Every other element of a twice-as-long last axis: strided, no layout torch names.
        big = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen, dtype=torch.float64)
        x = (offset + scale * big).to(dtype)[..., ::2]
        assert not x.is_contiguous() or shape[-1] <= 1
    else:
        x = (offset + scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
        x = x.contiguous(memory_format=torch_memory_format(len(shape), memory_format))
        if memory_format == "channels_last":
            assert x.is_contiguous(memory_format=torch_memory_format(len(shape), memory_format))
    x = x.detach()
    return x.requires_grad_(requires_grad)


def per_channel(
    channels: int, dtype: torch.dtype = torch.float32, *, seed: int = 1, positive: bool = False
) -> torch.Tensor:
    """A random ``(C,)`` tensor (positive, in ``[0.5, 1.5)``, for variances)."""
    gen = torch.Generator().manual_seed(seed)
    if positive:
        values = 0.5 + torch.rand(channels, generator=gen, dtype=torch.float64)
    else:
        values = torch.randn(channels, generator=gen, dtype=torch.float64)
    return values.to(dtype)


def leaf(t: torch.Tensor | None, requires_grad: bool = True) -> torch.Tensor | None:
    """A fresh leaf copy of ``t`` (same strides) that requires grad, or ``None``."""
    if t is None:
        return None
    return t.detach().clone().requires_grad_(requires_grad)


def clone_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t.clone()`` or ``None``."""
    return None if t is None else t.detach().clone()


def buffers_of(module: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    """Snapshot (clones) of the three running buffers of a batch-norm module."""
    return {
        name: clone_or_none(getattr(module, name))
        for name in ("running_mean", "running_var", "num_batches_tracked")
    }


def assert_bit_identical(
    before: dict[str, torch.Tensor | None], after: dict[str, torch.Tensor | None]
) -> None:
    """Asserts each snapshot entry is unchanged bit for bit (``torch.equal``, same dtype)."""
    assert before.keys() == after.keys()
    for name, old in before.items():
        new = after[name]
        if old is None:
            assert new is None, name
            continue
        assert new is not None, name
        assert new.dtype == old.dtype, name
        assert torch.equal(new, old), f"{name} changed: {old} -> {new}"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each backend name from :func:`batchnorm.available_backends`."""
    return request.param


@pytest.fixture
def use_backend() -> Iterator[Callable[[str, backends.Backend], backends.Backend]]:
    """``use_backend(name, instance)`` makes ``instance`` the backend ``name`` for one test.

    Through the public seam :func:`batchnorm.backends.override`; undone when the test ends.
    """
    with contextlib.ExitStack() as stack:

        def install(name: str, instance: backends.Backend) -> backends.Backend:
            return stack.enter_context(backends.override(name, instance))

        yield install
