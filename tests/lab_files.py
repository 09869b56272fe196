"""Small IDX files for the lab's tests, written with NumPy (independent of the loader)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, type_code: int) -> None:
    """Writes ``array`` as an IDX file (gzip-compressed if the name ends in .gz)."""
    header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    content = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as handle:
        handle.write(content)


def write_mnist(folder: Path, compressed: bool, train: int = 90, test: int = 30) -> None:
    """A tiny MNIST-like set of 8×8 images whose class is visible in the mean brightness."""
    rng = np.random.default_rng(0)
    suffix = ".gz" if compressed else ""
    for prefix, count in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, count).astype(np.uint8)
        images = rng.integers(0, 60, (count, 8, 8)) + 19 * labels[:, None, None]
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images.astype(np.uint8), 0x08)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, 0x08)
