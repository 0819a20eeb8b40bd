"""NumPy reference of ``PACT``: the executable spec of operator_cxx/kernels/pact.h.

PACT (Choi et al., "PACT: Parameterized Clipping Activation for Quantized Neural Networks",
arXiv:1805.06085, section 2) replaces ReLU by a clip at a learned value ``alpha`` and
quantizes the result to ``k`` bits, unsigned:

* eq. 1: ``y = clip(x, 0, alpha)`` (0 on (-inf, 0), x on [0, alpha), alpha on [alpha, inf));
* eq. 2: ``y_q = round(y * (2^k - 1) / alpha) * alpha / (2^k - 1)``;
* eq. 3 with the straight-through estimator ``dy_q/dy = 1``: ``dy_q/dalpha`` is 1 on
  [alpha, inf) and 0 below; ``dy_q/dx`` is 1 on [0, alpha) and 0 elsewhere.

Numerics (float32, in this order; ``np.rint`` rounds half to even)::

    s   = f32(alpha) / f32(2^k - 1)
    q   = clip(rint(x / s), 0, 2^k - 1) + 0        # + 0: code 0 is +0
    y_q = q * s

which is eq. 2 written as an unsigned QuantizeLinear -> DequantizeLinear with zero point 0 and
scale ``s`` (bit for bit ONNX uint8 QDQ at k = 8).  Rounding the clamped value or clamping the
rounded code gives the same code, since ``rint(alpha / s) = 2^k - 1``.  The top code gives
``(2^k - 1) * s``, which may differ from ``alpha`` by an ulp: it is what the engine computes.

Edge cases: NaN in gives NaN out; ``+inf`` gives the top code, ``-inf`` gives +0.  An ``alpha``
without a usable scale (``s`` not in (0, FLT_MAX]: alpha <= 0, NaN, +inf, or a subnormal alpha
whose scale underflows to 0) gives +0 everywhere (NaN stays NaN); it is not an error, as the
value is data and cannot be checked before the forward runs.  The gradient is the estimator
as written for any ``alpha`` (x == alpha counts as saturated: its gradient goes to alpha);
NaN ``x`` or NaN ``alpha`` contribute no gradient.

Signed form (``signed=True``): the clip is ``[-alpha, alpha]``, as the seed toolkit's
``_contrib_PACT`` (``mshadow_op::clip(x, gamma)``) and its prototype ``PACT_V2_PY`` computed it,
on the symmetric narrow grid of ``m = 2^(k-1) - 1`` levels each side of 0::

    s   = f32(alpha) / f32(2^(k-1) - 1)
    q   = clip(rint(x / s), -m, m) + 0
    y_q = q * s

``k`` counts the sign bit: the seed's ``nbits = n`` (``2^n - 1`` levels each side) is
``k = n + 1`` here.  The estimator is mirrored: ``dy_q/dx`` is 1 on ``(-alpha, alpha)``;
``dy_q/dalpha`` is +1 on ``[alpha, inf)`` and -1 on ``(-inf, -alpha]`` (the exact derivative of
``clip(x, -alpha, alpha)``, and what autograd gives ``PACT_V2_PY``).  The seed's C++ backward
differs: it sent only ``x > alpha`` to alpha and passed ``x < -alpha`` on to x (its backward
was written for the unsigned clip).  ONNX's signed QDQ (int8) saturates at code
``-2^(k-1)``, one below ``-m``: inputs under ``-alpha - s/2`` differ there by one step.

``dL/dalpha`` is a sum, summed in a fixed order so that the C++ result is reproducible and
equal to this one bit for bit: masked gradients as float64, blocks of ``SUM_BLOCK``
consecutive elements, ``SUM_LANES`` interleaved lanes per block each summed in order, a
block's lanes added in order, the blocks added in order, one final rounding to float32.
"""
from __future__ import annotations

import numpy as np

f32 = np.float32
SUM_BLOCK = 2048
SUM_LANES = 8
NBITS_RANGE = (2, 16)
DEFAULT_NBITS = 4
FLT_MAX = np.finfo(f32).max


def _check_nbits(nbits: int) -> int:
    if not NBITS_RANGE[0] <= int(nbits) <= NBITS_RANGE[1]:
        raise ValueError(f"PACT: nbits={nbits} is out of range {list(NBITS_RANGE)}")
    return int(nbits)


def _alpha(alpha) -> np.float32:
    a = np.asarray(alpha, dtype=f32).reshape(-1)
    if a.size != 1:
        raise ValueError(f"PACT: alpha must hold one value, got shape {np.shape(alpha)}")
    return a[0]


def levels(nbits: int, signed: bool = False) -> np.float32:
    """2^k - 1: the top code of the k-bit unsigned quantizer (signed: 2^(k-1) - 1)."""
    k = _check_nbits(nbits)
    return f32(2 ** (k - 1) - 1) if signed else f32(2 ** k - 1)


def scale_of(alpha, nbits: int = DEFAULT_NBITS, signed: bool = False) -> np.float32:
    """s = alpha / (2^k - 1) in float32 (signed: alpha / (2^(k-1) - 1))."""
    return f32(_alpha(alpha) / levels(nbits, signed))


def usable_scale(s) -> bool:
    return bool(s > 0 and s <= FLT_MAX)


def pact_forward(x, alpha, nbits: int = DEFAULT_NBITS, signed: bool = False) -> np.ndarray:
    """y_q = PACT_k(x) (eq. 1-2), float32; ``signed``: clipped to [-alpha, alpha]."""
    x = np.asarray(x, dtype=f32)
    s = scale_of(alpha, nbits, signed)
    if not usable_scale(s):
        return np.where(np.isnan(x), x, f32(0)).astype(f32)
    top = levels(nbits, signed)
    with np.errstate(invalid="ignore", over="ignore"):
        q = np.clip(np.rint(x / s), -top if signed else f32(0), top).astype(f32) + f32(0)
        return (q * s).astype(f32)


def ordered_sum(v) -> np.float32:
    """Sum of float32 values in the order the kernel sums them (module docstring)."""
    v = np.asarray(v, dtype=f32).reshape(-1).astype(np.float64)
    if v.size == 0:
        return f32(0)
    nblocks = -(-v.size // SUM_BLOCK)
    pad = np.zeros(nblocks * SUM_BLOCK, np.float64)  # +0.0 added at the end of a lane: exact
    pad[:v.size] = v
    lanes = np.cumsum(pad.reshape(nblocks, SUM_BLOCK // SUM_LANES, SUM_LANES), axis=1)[:, -1]
    blocks = np.cumsum(lanes, axis=1)[:, -1]        # lane 0 + lane 1 + ... in order
    total = np.cumsum(blocks)[-1] + 0.0             # + 0.0: the kernel starts from +0.0
    return f32(total)


def pact_backward(grad, x, alpha, signed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(dL/dx, dL/dalpha of shape (1,)) of the paper's estimator (eq. 3 with the STE);
    ``signed``: the mirrored estimator of the clip to [-alpha, alpha].

    It does not depend on k: the straight-through estimator ignores the rounding."""
    grad = np.asarray(grad, dtype=f32)
    x = np.asarray(x, dtype=f32)
    a = _alpha(alpha)
    with np.errstate(invalid="ignore"):
        if signed:
            dx = np.where((x > -a) & (x < a), grad, f32(0)).astype(f32)
            term = np.where(x >= a, grad, np.where(x <= -a, -grad, f32(0))).astype(f32)
        else:
            dx = np.where((x >= 0) & (x < a), grad, f32(0)).astype(f32)
            term = np.where(x >= a, grad, f32(0))
        dalpha = ordered_sum(term)
    return dx, np.array([dalpha], dtype=f32)


def pact_clip(x, alpha, signed: bool = False) -> np.ndarray:
    """eq. 1 unquantized, in float64: the function whose exact gradient the estimator is
    (central differences of it check ``pact_backward``); ``signed``: clip(x, -alpha, alpha)."""
    x = np.asarray(x, dtype=np.float64)
    a = float(np.asarray(alpha, dtype=np.float64).reshape(-1)[0])
    return np.minimum(np.maximum(x, -a if signed else 0.0), a)
