"""NumPy reference of ``QIL``: the executable spec of operator_cxx/kernels/qil.h.

QIL (Jung et al., "Learning to Quantize Deep Networks by Optimizing Quantization Intervals
with Task Loss", CVPR 2019, arXiv:1808.05779, section 3) learns a quantization interval
``[c - d, c + d]`` (center ``c``, distance ``d``) and, for weights, an exponent ``gamma``:

* transformer for weights (eq. 1)::

      w_hat = 0                                  if |w| < c - d
              sign(w)                            if |w| > c + d
              sign(w) * (alpha |w| + beta)^gamma  otherwise

  with ``alpha = 0.5 / d`` and ``beta = -0.5 c / d + 0.5``;
* transformer for activations (eq. 2, gamma = 1, one-sided)::

      x_hat = 0 if x < c - d;  1 if x > c + d;  alpha x + beta otherwise;

* discretizer (eq. 3): ``y = round(t * q_D) / q_D`` with ``q_D = 2^(N-1) - 1`` for weights
  (signed codes -q_D..q_D) and ``q_D = 2^N - 1`` for activations (codes 0..q_D);
* training: the straight-through estimator for the round (``dy/dt = 1``) and the chain
  rule through the transformer.

The output is the normalized value: in [-1, 1] for weights, [0, 1] for activations; the scale
of the interval is not multiplied back (the seed toolkit's ``_contrib_QIL`` does not either:
the following layer, e.g. a batch norm, absorbs it).

Numerics, float32 in this order (``np.rint`` rounds half to even)::

    low  = c - d;  high = c + d
    a    = |x|, s = sign(x) (sign(0) = 0)       weights
    a    = x,   s = 1                           activations
    u    = 0.5 * (a - c) / d + 0.5               (= alpha a + beta; the seed's order)
           u = 0.5 where d == 0 and a == c (0 / 0: the interval is the point c),
           then clamped to [0, 1] (selects: NaN passes)
    p    = u                                     when the effective gamma is 1
           f32(pow(f64(u), f64(gamma)))           otherwise (libm pow, in double)
    t    = 0 if a < low; s if a > high; s * p otherwise
    y    = (rint(t * q_D) + 0) / q_D             (+ 0: a zero output is +0)

The effective gamma is 1 for activations and whenever ``fix_gamma`` is set (as the seed's
operator, which requires fix_gamma and ignores the gamma input, and as MXNet's BatchNorm
fix_gamma); only ``is_weight=True, fix_gamma=False`` uses the gamma input.

Backward (the estimator).  "Inside" is ``low <= a <= high`` with ``d > 0`` (both ends
included, as the seed's gradient mask; NaN x, c or d is never inside).  Outside, t is
constant in x, c, d and gamma, so every gradient term is 0 there.  Inside::

    k   = 0.5 / d                                (alpha)
    D   = 1                                      when the effective gamma is 1
          f32(g64 * pow(u64, g64 - 1))            otherwise, where u > 0; 0 where u == 0
                                                 (the pruning end: the derivative from the
                                                 pruned side; for gamma > 1 it is the limit)
    dL/dx     = (g * D) * k                      (d t/dx = D alpha: s * s = 1; at x = 0,
                                                 inside when c - d <= 0, the same slope)
    e         = (g * s) * D
    dL/dc     = f32(sum e) * (-k)                (d t/dc = -s D alpha)
    dL/dd     = f32(sum e * (a - c)) * (-k / d)  (d t/dd = -s D alpha (a - c) / d)
    dL/dgamma = f32(sum (f64(g) * f64(s)) * (pow(u64, g64) * log(u64)))  over u > 0
                (d t/dgamma = s u^gamma ln u; 0 at u == 0, its limit for gamma > 0);
                written as +0 unless is_weight=True and fix_gamma=False.

A product ``f32(S) * f`` whose sum ``f32(S)`` is 0 is written as +0 (no NaN from 0 * inf
when d is 0 or subnormal).  ``pow`` and ``log`` are the C library's double functions (the
reference calls libm's through ctypes, the kernel calls the same ones), so the results agree
bit for bit.

The sums are taken in a fixed order (as PACT's), so the kernel's result is reproducible and
equal to this one: terms as float64; blocks of ``SUM_BLOCK`` consecutive elements; in a block
element i goes to lane ``i mod SUM_LANES``, each lane summed in order from +0.0; a block's
sum is lane 0 + lane 1 + ... from +0.0; blocks summed in order from +0.0; one rounding to
float32 at the end.

Edge cases: NaN x gives NaN out and no gradient; NaN c or d gives NaN out (interval branch)
and no gradient.  ``d <= 0`` is used as given (d < 0: low > high, a step at c - d; d == 0: a
step at c, the point a == c mapping to 0.5) and gives no gradient.  gamma <= 0 is used as given (the
paper assumes gamma > 0).

Differences from the seed toolkit (github XiaotaoChen/mx_quant_op, QIL-inl.h): (1) the seed
uses q_D = 2^N - 1 for weights too (N + 1 bits signed): a seed graph's weight QIL at nbits=N
equals this operator at nbits=N+1; (2) the seed applies the weight transformer (|x|, sign)
to activations as well: the same for x >= 0 (after a ReLU), the paper's 0 for x < c - d here;
(3) the seed rounds half away from zero, here half to even; (4) the seed maps a weight of
exactly 0 inside the interval to +beta (its sign(0) = 1), here to 0 (sign(0) = 0); (5) the
seed overwrites c = 0, d = max|x| at its first forward; this operator never writes its
inputs: initialize c and d (``init_interval``); (6) the seed has no gamma path (it aborts
unless fix_gamma); here is_weight=True, fix_gamma=False learns gamma as the paper does.
The gradients at gamma = 1 are the seed's (its data gradient g / (2d) inside, its center
and distance sums), up to the summation order and the sign of an exact 0.  (The seed's
Python op QIL_PY is another parameterization, pruning / clipping points, not this one.)
"""
from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

import numpy as np

f32 = np.float32
SUM_BLOCK = 2048
SUM_LANES = 8
NBITS_RANGE = (2, 16)

_libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
_libm.pow.restype = ctypes.c_double
_libm.pow.argtypes = [ctypes.c_double, ctypes.c_double]
_libm.log.restype = ctypes.c_double
_libm.log.argtypes = [ctypes.c_double]
_vpow = np.frompyfunc(_libm.pow, 2, 1)
_vlog = np.frompyfunc(_libm.log, 1, 1)


def cpow(u, e) -> np.ndarray:
    """libm ``pow`` in double, element by element (the kernel's std::pow(double, double))."""
    u = np.asarray(u, dtype=np.float64)
    if u.size == 0:
        return np.zeros(u.shape, np.float64)
    return np.asarray(_vpow(u, float(e)), dtype=np.float64).reshape(u.shape)


def clog(u) -> np.ndarray:
    """libm ``log`` in double, element by element."""
    u = np.asarray(u, dtype=np.float64)
    if u.size == 0:
        return np.zeros(u.shape, np.float64)
    return np.asarray(_vlog(u), dtype=np.float64).reshape(u.shape)


@dataclass(frozen=True)
class QILAttrs:
    """Attributes of ``QIL`` (defaults as the seed toolkit's Python interface)."""

    nbits: int = 4
    is_weight: bool = False
    fix_gamma: bool = True

    def __post_init__(self):
        if not NBITS_RANGE[0] <= self.nbits <= NBITS_RANGE[1]:
            raise ValueError(f"QIL: nbits={self.nbits} is out of range {list(NBITS_RANGE)}")

    @property
    def levels(self) -> np.float32:
        """q_D: 2^(N-1) - 1 for weights, 2^N - 1 for activations (paper eq. 3)."""
        return f32(2 ** (self.nbits - 1) - 1 if self.is_weight else 2 ** self.nbits - 1)

    @property
    def learns_gamma(self) -> bool:
        return self.is_weight and not self.fix_gamma

    def as_kwargs(self) -> dict:
        return dict(nbits=self.nbits, is_weight=self.is_weight, fix_gamma=self.fix_gamma)


def _scalar(v, name: str) -> np.float32:
    a = np.asarray(v, dtype=f32).reshape(-1)
    if a.size != 1:
        raise ValueError(f"QIL: {name} must hold one value, got shape {np.shape(v)}")
    return a[0]


def _params(center, distance, gamma, attrs: QILAttrs):
    c, d, g = _scalar(center, "center"), _scalar(distance, "distance"), _scalar(gamma, "gamma")
    g_eff = g if attrs.learns_gamma else f32(1)
    return c, d, g_eff, f32(c - d), f32(c + d)


def _sign_abs(x: np.ndarray, attrs: QILAttrs):
    if attrs.is_weight:
        s = np.where(x > 0, f32(1), np.where(x < 0, f32(-1), f32(0))).astype(f32)
        return np.abs(x).astype(f32), s
    return x, np.ones_like(x, dtype=f32)


def unit(a, c, d) -> np.ndarray:
    """u = 0.5 (a - c) / d + 0.5 (alpha a + beta) in float32; 0.5 where d == 0 and a == c;
    clamped to [0, 1]."""
    a = np.asarray(a, dtype=f32)
    c, d = f32(c), f32(d)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        u = ((f32(0.5) * (a - c)).astype(f32) / d).astype(f32) + f32(0.5)
    u = np.where((d == 0) & (a == c), f32(0.5), u).astype(f32)
    u = np.where(u < 0, f32(0), u)
    return np.where(u > 1, f32(1), u).astype(f32)


def qil_transform(x, center, distance, gamma, attrs: QILAttrs = QILAttrs()) -> np.ndarray:
    """t = T(x): the transformer (eq. 1 / 2) in float32, before the discretizer."""
    x = np.asarray(x, dtype=f32)
    c, d, g, low, high = _params(center, distance, gamma, attrs)
    a, s = _sign_abs(x, attrs)
    u = unit(a, c, d)
    p = u if g == 1 else cpow(u, g).astype(f32)
    with np.errstate(invalid="ignore"):
        inner = (s * p).astype(f32)
        return np.where(a < low, f32(0), np.where(a > high, s, inner)).astype(f32)


def qil_forward(x, center, distance, gamma, attrs: QILAttrs = QILAttrs()) -> np.ndarray:
    """y = round(T(x) q_D) / q_D, float32 (eq. 1-3)."""
    t = qil_transform(x, center, distance, gamma, attrs)
    qd = attrs.levels
    with np.errstate(invalid="ignore", over="ignore"):
        return ((np.rint(t * qd) + f32(0)).astype(f32) / qd).astype(f32)


def ordered_sum(v) -> np.float32:
    """Sum of float64 terms in the kernel's fixed order (module docstring), to float32."""
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    if v.size == 0:
        return f32(0)
    nblocks = -(-v.size // SUM_BLOCK)
    pad = np.zeros(nblocks * SUM_BLOCK, np.float64)  # + 0.0 at a lane's end changes nothing
    pad[:v.size] = v
    lanes = np.cumsum(pad.reshape(nblocks, SUM_BLOCK // SUM_LANES, SUM_LANES), axis=1)[:, -1]
    lanes = lanes + 0.0                                 # each lane starts from +0.0
    blocks = np.cumsum(np.concatenate([np.zeros((nblocks, 1)), lanes], axis=1), axis=1)[:, -1]
    total = np.cumsum(np.concatenate([[0.0], blocks]))[-1]
    return f32(total)


def _scaled(s: np.float32, factor: np.float32) -> np.float32:
    with np.errstate(invalid="ignore", over="ignore"):
        return f32(0) if s == 0 else f32(s * factor)


def qil_backward(grad, x, center, distance, gamma, attrs: QILAttrs = QILAttrs()):
    """(dL/dx, dL/dc, dL/dd, dL/dgamma) of the estimator (module docstring); the parameter
    gradients have shape (1,)."""
    grad = np.asarray(grad, dtype=f32)
    x = np.asarray(x, dtype=f32)
    c, d, g, low, high = _params(center, distance, gamma, attrs)
    a, s = _sign_abs(x, attrs)
    u = unit(a, c, d)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        inside = (a >= low) & (a <= high) & (d > 0)
        k = f32(f32(0.5) / d)
        if g == 1:
            dt = np.ones_like(u)
        else:
            g64 = np.float64(g)
            dt = np.where(u > 0, (g64 * cpow(u, g64 - 1.0)).astype(f32), f32(0)).astype(f32)
        dx = np.where(inside, ((grad * dt).astype(f32) * k).astype(f32), f32(0)).astype(f32)
        e = np.where(inside, ((grad * s).astype(f32) * dt).astype(f32), f32(0)).astype(f32)
        td = (e * (a - c).astype(f32)).astype(f32)
        dc = _scaled(ordered_sum(e), f32(-k))
        dd = _scaled(ordered_sum(np.where(inside, td, f32(0))), f32(f32(-k) / d))
        dg = f32(0)
        if attrs.learns_gamma:
            g64 = np.float64(_scalar(gamma, "gamma"))
            pos = inside & (u > 0)
            uu = np.where(pos, u, f32(1)).astype(np.float64)
            tg = (grad.astype(np.float64) * s.astype(np.float64)) * (cpow(uu, g64) * clog(uu))
            dg = ordered_sum(np.where(pos, tg, 0.0))
    one = lambda v: np.array([v], dtype=f32)  # noqa: E731
    return dx, one(dc), one(dd), one(dg)


# -- the estimator as a function (for finite-difference checks) ----------------------------

def transform64(x, center, distance, gamma, attrs: QILAttrs = QILAttrs()) -> np.ndarray:
    """The paper's transformer T in float64 (alpha x + beta form, no discretizer): the
    function whose exact gradient the estimator is away from the interval ends (the
    straight-through estimator holds the round as the identity)."""
    x = np.asarray(x, dtype=np.float64)
    c, d = float(np.reshape(center, -1)[0]), float(np.reshape(distance, -1)[0])
    g = float(np.reshape(gamma, -1)[0]) if attrs.learns_gamma else 1.0
    alpha, beta = 0.5 / d, -0.5 * c / d + 0.5
    if attrs.is_weight:
        a, s = np.abs(x), np.sign(x)
        inner = s * np.clip(alpha * a + beta, 0.0, 1.0) ** g
        return np.where(a < c - d, 0.0, np.where(a > c + d, s, inner))
    return np.where(x < c - d, 0.0, np.where(x > c + d, 1.0, alpha * x + beta))


def init_interval(x, attrs: QILAttrs = QILAttrs()) -> tuple[np.ndarray, np.ndarray]:
    """A starting interval (center, distance), each shape (1,): ``[0, max]`` with max the
    largest |x| (weights) or x (activations), i.e. c = d = max / 2, so that nothing is
    pruned and T starts as x / max.  (The seed's first forward sets c = 0, d = max|x|, which
    maps |w| -> 0.5 + 0.5 |w| / max.)"""
    x = np.asarray(x, dtype=np.float64)
    m = float(np.abs(x).max() if attrs.is_weight else max(x.max(), 0.0)) if x.size else 0.0
    half = np.array([m / 2], dtype=f32)
    return half, half.copy()
