"""Readers for the data that exists offline (DESIGN.md section 5)."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from .errors import QuantOpsError

FASHION_MNIST_DIR = Path(os.environ.get("QO_FASHION_MNIST",
                                        "/usr/share/datasets/fashion-mnist"))
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise QuantOpsError(f"{path}: not an IDX file of the expected kind (magic {got:#x})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise QuantOpsError(f"{path}: truncated ({data.size} values for shape {dims})")
    return data.reshape(dims)


def fashion_mnist(split: str = "train", root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 (N, 1, 28, 28) in [0, 1] and labels as int64 (N,).

    The Debian package ``dataset-fashion-mnist`` installs the files (scripts/setup.sh does).
    """
    if split not in _FILES:
        raise QuantOpsError(f"unknown Fashion-MNIST split {split!r}: use 'train' or 'test'")
    root = Path(root or FASHION_MNIST_DIR)
    img_f, lbl_f = (root / f for f in _FILES[split])
    for f in (img_f, lbl_f):
        if not f.is_file():
            raise QuantOpsError(f"{f} not found: apt-get install dataset-fashion-mnist "
                                "(or set QO_FASHION_MNIST to the folder holding the files)")
    images = _read_idx(img_f, 0x803).astype(np.float32)[:, None] / np.float32(255)
    labels = _read_idx(lbl_f, 0x801).astype(np.int64)
    if len(images) != len(labels):
        raise QuantOpsError(f"{root}: {len(images)} images but {len(labels)} labels")
    return images, labels
