"""NumPy reference of ``DSQ``: the executable spec of operator_cxx/kernels/dsq.h.

DSQ (Gong et al., "Differentiable Soft Quantization: Bridging Full-Precision and Low-Bit
Neural Networks", ICCV 2019, arXiv:1908.05033, section 3) quantizes ``x`` uniformly onto
``2^b`` levels of a learned range ``[l, u]`` and trains through a smooth, tanh-shaped
surrogate of the staircase whose softness ``alpha`` is learned too:

* the DSQ function: ``Delta = (u - l) / (2^b - 1)``; the interval of ``x`` in ``[l, u]``
  is ``P_i = [l + i Delta, l + (i + 1) Delta]`` with centre ``m_i = l + (i + 0.5) Delta``;
  ``phi(x) = s tanh(k (x - m_i))`` with ``s = 1 / tanh(0.5 k Delta)``;
  ``Q_S(x) = l`` below ``l``, ``u`` above ``u``, else ``l + Delta (i + (phi(x) + 1) / 2)``;
* the characteristic variable ``alpha = 1 - tanh(0.5 k Delta)`` sets the
  softness: ``k = log(2 / alpha - 1) / Delta`` and ``s = 1 / (1 - alpha)``; ``alpha -> 0``
  is the hard staircase; the paper keeps ``alpha`` in ``(0, 0.5)`` and learns it;
* training (Algorithm 1): the forward applies ``sgn`` to ``phi``, i.e. it
  outputs the *hard* value ``l + Delta (i + (sgn(phi(x)) + 1) / 2)``, and the backward uses
  the derivatives of the soft ``Q_S`` -- "hard output, soft gradient" (public
  implementations do the same: MQBench's DSQ rounds the soft code with a straight-through
  detach, the unofficial PyTorch DSQ applies ``sgn`` in training).  So training and
  inference compute the same forward; the mode flag only counts training passes.

Forward (both modes): ``sgn(phi)`` is +1 exactly where ``x`` lies above the centre ``m_i``,
so the hard value is ``l + Delta * round((x - l) / Delta)``: uniform quantization of the
clipped value.  Ties (``x`` exactly on a centre, where ``sgn(0) = 0`` would give the
midpoint ``m_i``, a value off the grid) round half to even, as the rest of the project.
Numerics (float32, in this order)::

    nl    = 2^b - 1
    Delta = (u - l) / nl
    c     = x < l ? l : x;   c = c > u ? u : c           # clip, NaN passes
    q     = rint((c - l) / Delta), clamped to [0, nl]
    y     = q * Delta + l

The top level is ``nl * Delta + l`` in float32, which may differ from ``u`` by an ulp.
A range without a usable step (``Delta`` not in ``(0, FLT_MAX]``: ``u <= l``, an infinite
bound, or a step that underflows to 0) gives the clip ``y = c`` (``u`` where ``u < l``);
a NaN ``l`` or ``u`` gives NaN everywhere; NaN data gives NaN.

Backward, the soft estimator (``soft=True``, the paper's).  Evaluated in float64 from the
float32 inputs, with ``a = k Delta = log(2 / alpha - 1)`` (a function of alpha only) and
``t = (x - l) / Delta`` (the position in steps, >= 0), both divisions done as
multiplications by the reciprocals ``1 / Delta`` and ``1 / nl``::

    i = floor(t) clamped to nl - 1;  z = (t - i) - 0.5 in [-0.5, 0.5];  k (x - m_i) = a z
    th = tanh(a z),  se = sech^2(a z),  phi = s th,  v = (i + 0.5) + 0.5 phi  (= (Q_S - l)/Delta)
    dQ_S/dx     = D = 0.5 s a se
    dQ_S/du     = (v - D t) / nl          (through Delta, m_i and k: d Delta/du = 1/nl)
    dQ_S/dl     = (1 - D) - dQ_S/du       (shifting x, l, u together shifts Q_S)
    dQ_S/dalpha = 0.5 Delta (s^2 th + s se z da),  da = d a/d alpha = -2 / (alpha (2 - alpha))

(``ds/dalpha = s^2``).  Inside means ``l <= x <= u``; below ``l`` the output is ``l``
(``dQ/dl = 1``), above ``u`` it is ``u`` (``dQ/du = 1``), and there ``dQ/dx = dQ/dalpha = 0``.
``alpha`` is evaluated at ``clip(alpha, ALPHA_MIN, ALPHA_MAX)`` = ``[1e-6, 0.5]`` (the
paper's ``(0, 0.5)``; log(2/alpha - 1) needs ``0 < alpha < 1``) and its gradient is that of
the clipped value, passed straight through the clip, so a parameter pushed past a bound can
come back.  The paper treats alpha's evolution with a bound of its own while alpha is
learned; here alpha receives the plain gradient of the task loss (clip the parameter after
each update for the projected-gradient form of the bound).

``soft=False`` is the uniform-quantization baseline: the same forward with the
straight-through estimator (``round`` passes the gradient as is, so ``y`` acts as ``clip``):
``dL/dx = g`` inside ``[l, u]``, ``dL/dl`` sums ``g`` below ``l``, ``dL/du`` sums ``g`` above
``u``, ``dL/dalpha = 0``.

In either mode a range without a usable step passes no gradient to ``x`` (nor alpha), and
the clip's gradients go to ``l`` (x below ``l`` and not above ``u``) and ``u`` (the clip's
output is ``u``); a NaN ``x`` gets 0 and adds nothing; a NaN ``l`` or ``u`` makes every
gradient NaN.

tanh, sech^2 and log are evaluated with basic float64 operations only (libm's and numpy's
transcendental functions differ by an ulp here and there, so neither can be the spec):
``expm1(-2|w|)`` from a degree-15 Taylor polynomial at ``-2|w| / 32`` followed by five
doublings ``e' = e (e + 2)``, ``exp`` by squaring ``1 + expm1`` five times,
``tanh|w| = -expm1 / (2 + expm1)``, ``sech^2 = 4 exp / (2 + expm1)^2`` (through one
reciprocal of ``2 + expm1``); ``log`` by ``frexp`` and the ``atanh`` series.  All within
float64 rounding noise of the exact values (|w| <= log(2/1e-6 - 1) / 2 < 7.3 here).

The parameter gradients are sums, taken in a fixed order so the C++ result equals this one
bit for bit: the float64 terms ``g * dQ/dp`` of a chunk of ``SUM_CHUNK`` consecutive
elements go to ``SUM_LANES`` lanes (element j to lane j mod 8), each summed in order from
0.0; a chunk is its lanes added in order from 0.0; the total is the chunks added in order
from 0.0, rounded once to float32.  ``dL/dx = f32(g * D)`` (float64 product).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

f32 = np.float32
f64 = np.float64
NBITS_RANGE = (1, 16)
ALPHA_MIN = f32(1e-6)
ALPHA_MAX = f32(0.5)
FLT_MAX = np.finfo(f32).max
SUM_CHUNK = 4096
SUM_LANES = 8

_h = float.fromhex
# 1/n! for n = 1..15 (expm1 Taylor), and 1/(2k+1) for k = 0..12 (atanh series)
EXPM1_COEF = tuple(_h(c) for c in (
    "0x1.0000000000000p+0", "0x1.0000000000000p-1", "0x1.5555555555555p-3",
    "0x1.5555555555555p-5", "0x1.1111111111111p-7", "0x1.6c16c16c16c17p-10",
    "0x1.a01a01a01a01ap-13", "0x1.a01a01a01a01ap-16", "0x1.71de3a556c734p-19",
    "0x1.27e4fb7789f5cp-22", "0x1.ae64567f544e4p-26", "0x1.1eed8eff8d898p-29",
    "0x1.6124613a86d09p-33", "0x1.93974a8c07c9dp-37", "0x1.ae7f3e733b81fp-41"))
ATANH_COEF = tuple(_h(c) for c in (
    "0x1.0000000000000p+0", "0x1.5555555555555p-2", "0x1.999999999999ap-3",
    "0x1.2492492492492p-3", "0x1.c71c71c71c71cp-4", "0x1.745d1745d1746p-4",
    "0x1.3b13b13b13b14p-4", "0x1.1111111111111p-4", "0x1.e1e1e1e1e1e1ep-5",
    "0x1.af286bca1af28p-5", "0x1.8618618618618p-5", "0x1.642c8590b2164p-5",
    "0x1.47ae147ae147bp-5"))
LN2_HI = _h("0x1.62e42fee00000p-1")  # e * LN2_HI is exact for |e| < 2^20
LN2_LO = _h("0x1.a39ef35793c76p-33")
SQRT_HALF = _h("0x1.6a09e667f3bcdp-1")


@dataclass(frozen=True)
class DSQAttrs:
    """Attributes of ``DSQ``.  ``is_weight`` does not change the math (the paper quantizes
    weights and activations with the same DSQ over their own learned ``[l, u]``)."""

    nbits: int = 4
    is_weight: bool = False
    soft: bool = True

    def __post_init__(self):
        if not NBITS_RANGE[0] <= self.nbits <= NBITS_RANGE[1]:
            raise ValueError(f"DSQ: nbits={self.nbits} is out of range {list(NBITS_RANGE)}")

    def as_kwargs(self) -> dict:
        return dict(nbits=self.nbits, is_weight=self.is_weight, soft=self.soft)


def _scalar(v, name: str) -> np.float32:
    a = np.asarray(v, dtype=f32).reshape(-1)
    if a.size != 1:
        raise ValueError(f"DSQ: '{name}' must have shape (1,), got {np.shape(v)}")
    return a[0]


def levels(nbits: int) -> np.float32:
    """nl = 2^b - 1: the number of intervals (the top code)."""
    return f32(2 ** int(nbits) - 1)


def step_of(lower, upper, nbits: int) -> np.float32:
    """Delta = (u - l) / (2^b - 1) in float32."""
    with np.errstate(over="ignore", invalid="ignore"):
        return f32(f32(_scalar(upper, "upper") - _scalar(lower, "lower")) / levels(nbits))


def usable_step(delta) -> bool:
    return bool(delta > 0 and delta <= FLT_MAX)


def _clip(x, lo, hi) -> np.ndarray:
    """x < l ? l : x, then > u ? u : that -- the kernel's ternaries (NaN passes)."""
    c = np.where(x < lo, lo, x)
    return np.where(c > hi, hi, c).astype(f32)


# -- forward -------------------------------------------------------------------------

def dsq_forward(x, lower, upper, attrs: DSQAttrs = DSQAttrs()) -> np.ndarray:
    """The hard DSQ output (training and inference alike), float32."""
    x = np.asarray(x, dtype=f32)
    lo, hi = _scalar(lower, "lower"), _scalar(upper, "upper")
    if np.isnan(lo) or np.isnan(hi):
        return np.full(x.shape, np.nan, f32)
    delta = step_of(lo, hi, attrs.nbits)
    with np.errstate(invalid="ignore", over="ignore"):
        c = _clip(x, lo, hi)
        if not usable_step(delta):
            return c
        nl = levels(attrs.nbits)
        q = np.rint(((c - lo) / delta).astype(f32))
        q = np.where(q < 0, f32(0), q)
        q = np.where(q > nl, nl, q).astype(f32)
        return (q * delta + lo).astype(f32)


def dsq_forward_state(x, lower, upper, qstate, attrs: DSQAttrs = DSQAttrs()):
    """(y, qstate after the pass): a training pass (qstate[1] > 0.5) counts qstate[0] + 1."""
    st = np.array(qstate, dtype=f32).reshape(-1).copy()
    if st[1] > f32(0.5):
        st[0] = st[0] + f32(1)
    return dsq_forward(x, lower, upper, attrs), st


# -- the elementary functions, float64 with basic operations only ------------------

def log_pos(v: float) -> float:
    """log(v) for a finite v > 0 (a Python float: IEEE float64 operations, like the C++)."""
    m, e = math.frexp(v)  # v = m 2^e, m in [0.5, 1)
    if m < SQRT_HALF:
        m = m * 2.0
        e = e - 1
    f = (m - 1.0) / (m + 1.0)
    f2 = f * f
    p = ATANH_COEF[-1]
    for c in reversed(ATANH_COEF[:-1]):
        p = p * f2 + c
    log_m = (2.0 * f) * p
    ef = float(e)
    return ef * LN2_HI + (ef * LN2_LO + log_m)


def tanh_sech2(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tanh(w), sech^2(w)) in float64 for |w| <= ~8 (the kernel's algorithm)."""
    w = np.asarray(w, dtype=f64)
    r = (-2.0 * np.abs(w)) * 0.03125
    p = np.full(w.shape, EXPM1_COEF[-1])
    for c in reversed(EXPM1_COEF[:-1]):
        p = p * r + c
    em = p * r           # expm1(r)
    ex = 1.0 + em        # exp(r)
    for _ in range(5):
        em = em * (em + 2.0)
        ex = ex * ex
    rd = 1.0 / (2.0 + em)
    th = np.copysign(-em * rd, w)
    se = (4.0 * ex) * (rd * rd)
    return th, se


# -- backward --------------------------------------------------------------------------

def soft_constants(lower, upper, alpha, nbits: int) -> dict:
    """The per-call float64 scalars of the soft estimator."""
    a32 = _scalar(alpha, "alpha")
    a32 = ALPHA_MIN if a32 < ALPHA_MIN else a32
    a32 = ALPHA_MAX if a32 > ALPHA_MAX else a32
    ad = float(a32)
    ld, ud = float(_scalar(lower, "lower")), float(_scalar(upper, "upper"))
    nl = float(levels(nbits))
    delta = (ud - ld) / nl
    k = log_pos(2.0 / ad - 1.0) if ad == ad else math.nan  # a = k Delta
    s = 1.0 / (1.0 - ad)
    dadal = -2.0 / (ad * (2.0 - ad))
    return dict(l=ld, nl=nl, imax=nl - 1.0, delta=delta, inv_delta=1.0 / delta,
                inv_nl=1.0 / nl, a=k, s=s,
                half_sa=(0.5 * s) * k, c1=s * s, c2=s * dadal, half_delta=0.5 * delta)


def soft_derivatives(c, lower, upper, alpha, nbits: int):
    """(D, dQ/dl, dQ/du, dQ/dalpha) of Q_S at points ``c`` of [l, u] (float32), float64."""
    k = soft_constants(lower, upper, alpha, nbits)
    cd = np.asarray(c, dtype=f32).astype(f64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        t = (cd - k["l"]) * k["inv_delta"]
        i = np.floor(t)
        i = np.where(i > k["imax"], k["imax"], i)
        z = (t - i) - 0.5
        th, se = tanh_sech2(k["a"] * z)
        d = k["half_sa"] * se
        phi = k["s"] * th
        v = (i + 0.5) + 0.5 * phi
        du = (v - d * t) * k["inv_nl"]
        dl = (1.0 - d) - du
        da = k["half_delta"] * (k["c1"] * th + k["c2"] * (se * z))
    return d, dl, du, da


def _ordered_sum(terms: np.ndarray) -> np.float64:
    """Sum of float64 terms in the fixed chunk / lane order (cumsum adds strictly in
    order; padding with +0.0 changes no lane, as a lane starting at +0.0 is never -0.0)."""
    t = terms.reshape(-1)
    n = t.size
    chunks = max(1, -(-n // SUM_CHUNK))
    t = np.concatenate([t, np.zeros(chunks * SUM_CHUNK - n)])
    t = t.reshape(chunks, SUM_CHUNK // SUM_LANES, SUM_LANES)
    zero = np.zeros((chunks, 1, SUM_LANES))
    lanes = np.cumsum(np.concatenate([zero, t], axis=1), axis=1)[:, -1, :]
    chunk = np.cumsum(np.concatenate([np.zeros((chunks, 1)), lanes], axis=1), axis=1)[:, -1]
    return np.cumsum(np.concatenate([[0.0], chunk]))[-1]


def dsq_backward(grad, x, lower, upper, alpha, attrs: DSQAttrs = DSQAttrs()):
    """(dL/dx, dL/dl, dL/du, dL/dalpha); the last three have shape (1,), float32."""
    grad = np.asarray(grad, dtype=f32)
    x = np.asarray(x, dtype=f32)
    lo, hi = _scalar(lower, "lower"), _scalar(upper, "upper")
    if np.isnan(lo) or np.isnan(hi):
        nan = np.full(1, np.nan, f32)
        return np.full(x.shape, np.nan, f32), nan, nan.copy(), nan.copy()
    usable = usable_step(step_of(lo, hi, attrs.nbits))
    gd = grad.astype(f64)
    with np.errstate(invalid="ignore", over="ignore"):
        below = x < lo
        above = np.where(below, lo, x) > hi
        below_only = below & ~above
        inside = ~below & ~above & ~np.isnan(x) & usable
        tl = np.where(below_only, gd, 0.0)
        tu = np.where(above, gd, 0.0)
        ta = np.zeros(x.shape)
        if attrs.soft and usable:
            # elements outside [l, u] are evaluated at l (and discarded)
            d, dl, du, da = soft_derivatives(np.where(inside, x, lo), lo, hi, alpha,
                                             attrs.nbits)
            dx = np.where(inside, (gd * d).astype(f32), f32(0)).astype(f32)
            tl = np.where(inside, gd * dl, tl)
            tu = np.where(inside, gd * du, tu)
            ta = np.where(inside, gd * da, ta)
        else:
            dx = np.where(inside, grad, f32(0)).astype(f32)
        sums = [f32(_ordered_sum(t)) for t in (tl, tu, ta)]
    return (dx,) + tuple(np.array([s], f32) for s in sums)


# -- the paper's functions, written directly (for tests) --------------------------------

def soft_quantize(x, lower, upper, alpha, nbits: int) -> np.ndarray:
    """Q_S(x) in float64 as the paper writes it (np.tanh / np.log, k and s from
    the characteristic variable, s = 1 / tanh(0.5 k Delta)); alpha is used as given."""
    x = np.asarray(x, dtype=f64)
    lo, hi, al = (float(np.asarray(v, f64).reshape(-1)[0]) for v in (lower, upper, alpha))
    nl = 2.0 ** nbits - 1
    delta = (hi - lo) / nl
    k = np.log(2.0 / al - 1.0) / delta
    s = 1.0 / np.tanh(0.5 * k * delta)
    c = np.clip(x, lo, hi)
    i = np.minimum(np.floor((c - lo) / delta), nl - 1)
    m = lo + (i + 0.5) * delta
    phi = s * np.tanh(k * (c - m))
    return np.where(x < lo, lo, np.where(x > hi, hi, lo + delta * (i + (phi + 1) / 2)))


def sign_quantize(x, lower, upper, alpha, nbits: int) -> np.ndarray:
    """The paper's hard output l + Delta (i + (sgn(phi(x)) + 1) / 2), float64."""
    x = np.asarray(x, dtype=f64)
    lo, hi, al = (float(np.asarray(v, f64).reshape(-1)[0]) for v in (lower, upper, alpha))
    nl = 2.0 ** nbits - 1
    delta = (hi - lo) / nl
    k = np.log(2.0 / al - 1.0) / delta
    c = np.clip(x, lo, hi)
    i = np.minimum(np.floor((c - lo) / delta), nl - 1)
    phi = np.tanh(k * (c - (lo + (i + 0.5) * delta)))
    return lo + delta * (i + (np.sign(phi) + 1) / 2)


def init_range(x) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) = (min, max) of the data, each of shape (1,): a starting range that
    clips nothing (a convenience, as public DSQ implementations start from the data range;
    the clip values are then learned).  NaN is ignored; all-NaN data gives (0, 0)."""
    a = np.asarray(x, dtype=f32)
    a = a[~np.isnan(a)]
    if a.size == 0:
        return np.zeros(1, f32), np.zeros(1, f32)
    return np.array([a.min()], f32), np.array([a.max()], f32)
