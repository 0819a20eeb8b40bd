"""Starting weight ranges searched at the layer's bit width.

A weight quantizer that learns its range trains from where it starts.  The whole range
[-max|w|, max|w|] wastes most levels on a few outliers, and at 2-3 bits it rounds nearly
every weight to zero (ternary weights on [0, max|w|] prune everything below max/2);
the clip with the least squared error on the layer's own grid keeps the bulk of the
distribution representable.  Each method supplies its grid; this module only searches.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

#: fake_quant(w, a): ``w`` quantized with clip ``a`` (broadcast against ``w``)
Grid = Callable[[np.ndarray, np.ndarray], np.ndarray]


def int_grid(qmin: int, qmax: int) -> Grid:
    """The integer grid ``clip(rint(w / s), qmin, qmax) * s`` with ``s = a / qmax``."""
    def fq(w: np.ndarray, a: np.ndarray) -> np.ndarray:
        s = a / qmax
        return np.clip(np.rint(w / s), qmin, qmax) * s
    return fq


def mse_clip(w: np.ndarray, grid: Grid, axis: int | None = None, points: int = 64,
             lowest: float = 0.05) -> np.ndarray:
    """The clip ``a`` among ``points`` fractions in [lowest, 1] of max|w| with the least
    mean squared error of ``grid(w, a)``: shape (1,), or (C,) per channel along ``axis``.
    An all-zero tensor (or channel) gets a clip of 1 (any clip represents it)."""
    w = np.asarray(w, np.float32)
    rows = (w.reshape(1, -1) if axis is None else np.moveaxis(w, axis, 0).reshape(
        w.shape[axis], -1)).astype(np.float32)
    amax = np.abs(rows).max(axis=1, keepdims=True) if rows.size else np.zeros((len(rows), 1))
    empty = ~(amax > 0)
    amax = np.where(empty, np.float32(1), amax).astype(np.float32)
    best_err = np.full((len(rows), 1), np.inf)
    best = amax.copy()
    for f in np.linspace(lowest, 1.0, points, dtype=np.float32):
        a = amax * f
        err = ((grid(rows, a) - rows) ** 2).mean(axis=1, keepdims=True)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, a, best)
    return np.where(empty, np.float32(1), best).reshape(-1).astype(np.float32)
