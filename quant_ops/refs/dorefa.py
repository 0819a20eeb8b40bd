"""NumPy reference of ``DoReFa``: the executable spec of ``operator_cxx/kernels/dorefa.h``.

DoReFa-Net (Zhou et al. 2016, arXiv:1606.06160), section 2.2 (``quantize_k``), 2.3 (weights)
and 2.4 (activations).  Attributes: ``nbits`` (k, 1..16, default 4) and ``is_weight``
(default False).  No learned parameters, no state.

``n = 2^k - 1`` and ``quantize_k(r) = rint(n * r) / n`` (half to even), all in float32:

* activations (section 2.4): ``y = quantize_k(clip(x, 0, 1))``;
  backward ``dx = g`` where ``0 <= x <= 1`` (both ends inclusive, as the subgradient of
  ``tf.clip_by_value``), else 0 (NaN: 0).
* weights, k >= 2 (section 2.3, eq. 9): ``t = tanh(w)``, ``M = max|t|`` over the whole
  tensor (NaN ignored), ``r = t / (2 M) + 0.5``, ``y = 2 quantize_k(r) - 1``;
  backward (straight-through for ``quantize_k``, ``M`` held constant, as the paper's code
  does by stopping the gradient at the max): ``dx = g * (sech^2(w) / M)``.
  A tensor with ``M == 0`` (all elements +-0, or NaN) passes through: ``y = w``, ``dx = g``.
* weights, k = 1 (section 2.3, the 1-bit case): ``E = mean|w|`` over the whole tensor
  (NaN ignored), ``y = -E`` where ``w < 0`` else ``+E`` (``sign(0) = +1`` as in the paper's
  code); backward ``dx = g`` (straight-through).

NaN in gives NaN out.  Two parts are defined here bit for bit so the C++ can match them
(libm's and numpy's float32 ``tanh`` disagree in ~20% of inputs):

* ``tanh`` and ``sech^2``: evaluated in float64 from ``expm1(-2|w|)`` (Cody-Waite range
  reduction by ln 2, degree-13 Taylor polynomial), then rounded to float32.  Within float64
  rounding noise of the exact values, so ``t`` is the correctly rounded ``tanh`` except in
  (vanishingly rare) near-halfway cases; |w| > 60 is evaluated at 60 (same float32 result);
  a NaN ``w`` gives that NaN for both.
* ``E`` (k = 1): |w| summed in float64, sequentially within blocks of ``SUM_BLOCK``
  elements, then the block sums sequentially; ``E = float32(sum / count)``.
"""
from __future__ import annotations

import math

import numpy as np

f32 = np.float32
f64 = np.float64

NBITS_RANGE = (1, 16)
SUM_BLOCK = 4096
TANH_CLAMP = 60.0
LN2_HI = float.fromhex("0x1.62e42feep-1")        # fdlibm's split of ln 2: k * LN2_HI is exact
LN2_LO = float.fromhex("0x1.a39ef35793c76p-33")
INV_LN2 = float.fromhex("0x1.71547652b82fep+0")
# 1/n!, n = 13 .. 1 (Horner order)
EXPM1_COEFS = tuple(1.0 / math.factorial(n) for n in range(13, 0, -1))


def levels(nbits: int) -> np.float32:
    """n = 2^k - 1."""
    return f32(2 ** nbits - 1)


def quantize_k(r: np.ndarray, nbits: int) -> np.ndarray:
    """rint(n * r) / n in float32; ``+ 0`` makes the code 0 a +0."""
    n = levels(nbits)
    r = np.asarray(r, dtype=f32)
    return ((np.rint(n * r) + f32(0)) / n).astype(f32)


def tanh_sech2(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tanh(w), sech^2(w)) as float32, evaluated in float64 as the kernel does."""
    w = np.asarray(w, dtype=f32)
    nan = np.isnan(w)
    with np.errstate(invalid="ignore", over="ignore"):
        a = np.abs(w).astype(f64)
        a = np.where(nan | (a > TANH_CLAMP), TANH_CLAMP, a)  # NaN: evaluated at 60, restored
        y = -2.0 * a
        k = np.rint(y * INV_LN2)
        r = (y - k * LN2_HI) - k * LN2_LO
        p = np.full_like(r, EXPM1_COEFS[0])
        for c in EXPM1_COEFS[1:]:
            p = p * r + c
        p = p * r                                   # expm1(r)
        two_k = np.ldexp(1.0, k.astype(np.int64))
        u = two_k * (1.0 + p)                       # exp(-2a)
        em = two_k * p + (two_k - 1.0)              # expm1(-2a)
        d = 2.0 + em
        t = -em / d
        s = (4.0 * u) / (d * d)
    return (np.where(nan, w, np.copysign(t.astype(f32), w)),
            np.where(nan, w, s.astype(f32)))


def mean_abs(w: np.ndarray) -> np.float32:
    """E = mean |w| over the non-NaN elements (0 when there are none), summed as the kernel
    sums: float64, sequential within blocks of SUM_BLOCK, then over the blocks."""
    a = np.abs(np.asarray(w, dtype=f32).reshape(-1)).astype(f64)
    ok = ~np.isnan(a)
    count = int(ok.sum())
    if count == 0:
        return f32(0)
    a = np.where(ok, a, 0.0)
    a = np.concatenate([a, np.zeros((-a.size) % SUM_BLOCK)]).reshape(-1, SUM_BLOCK)
    block_sums = np.cumsum(a, axis=1)[:, -1]        # cumsum: strictly left to right
    total = np.cumsum(block_sums)[-1]
    return f32(total / f64(count))


def tanh_max(t: np.ndarray) -> np.float32:
    """M = max |t| over the non-NaN elements (0 when there are none)."""
    a = np.abs(np.asarray(t, dtype=f32))
    return f32(np.where(np.isnan(a), f32(0), a).max(initial=0.0))


def _check(nbits: int) -> None:
    if not NBITS_RANGE[0] <= nbits <= NBITS_RANGE[1]:
        raise ValueError(f"nbits={nbits} outside {NBITS_RANGE}")


def dorefa_forward(x: np.ndarray, nbits: int = 4, is_weight: bool = False) -> np.ndarray:
    """Forward of ``DoReFa``."""
    _check(nbits)
    x = np.asarray(x, dtype=f32)
    if not is_weight:
        c = np.where(x < 0, f32(0), x)
        c = np.where(c > 1, f32(1), c)
        return quantize_k(c, nbits)
    if nbits == 1:
        e = mean_abs(x)
        return np.where(np.isnan(x), x, np.where(x < 0, -e, e)).astype(f32)
    t, _ = tanh_sech2(x)
    m = tanh_max(t)
    if not m > 0:
        return x.copy()
    r = t / (f32(2) * m) + f32(0.5)
    return (f32(2) * quantize_k(r, nbits) - f32(1)).astype(f32)


def dorefa_backward(grad: np.ndarray, x: np.ndarray, nbits: int = 4,
                    is_weight: bool = False) -> np.ndarray:
    """The paper's straight-through estimator: gradient w.r.t. ``x`` given ``grad``."""
    _check(nbits)
    grad = np.asarray(grad, dtype=f32)
    x = np.asarray(x, dtype=f32)
    if not is_weight:
        return np.where((x >= 0) & (x <= 1), grad, f32(0)).astype(f32)
    if nbits == 1:
        return grad.copy()
    t, s = tanh_sech2(x)
    m = tanh_max(t)
    if not m > 0:
        return grad.copy()
    return (grad * (s / m)).astype(f32)


def weight_surrogate(w: np.ndarray, m: float) -> np.ndarray:
    """The smooth function whose derivative the weight estimator is (k >= 2), in float64:
    ``2 * (tanh(w) / (2 M) + 0.5) - 1`` with ``M`` a constant (quantize_k taken as identity)."""
    return 2.0 * (np.tanh(np.asarray(w, dtype=f64)) / (2.0 * f64(m)) + 0.5) - 1.0
