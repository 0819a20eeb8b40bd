"""NumPy reference of ``LSQ``: the executable spec of operator_cxx/kernels/lsq.h.

LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020, arXiv:1902.08153) quantizes
with a step size ``s`` that is learned by backpropagation:

* section 2, eq. 1-2: ``v_bar = round(clip(v / s, -Qn, Qp))``, ``v_hat = v_bar * s``; signed
  data ``Qn = 2^(b-1)``, ``Qp = 2^(b-1) - 1``; unsigned data ``Qn = 0``, ``Qp = 2^b - 1``
  (default: weights signed, activations unsigned; the ``signed`` attribute overrides);
* eq. 3: ``d v_hat / d s`` is ``-v/s + round(v/s)`` inside the range, ``-Qn`` below it and
  ``Qp`` above it;
* eq. 5 (straight-through estimator): ``d v_hat / d v`` is 1 inside the range, 0 outside;
* section 2.2: the step gradient is multiplied by ``g = 1 / sqrt(N * Qp)``; ``N`` is the number
  of elements one step quantizes for weights (per channel for per-channel weights) and, for
  activations, the number of features of one example: ``data.size / data.shape[0]`` (axis 0
  is the batch axis);
* section 2.1 (initialization): ``s0 = 2 * mean(|v|) / sqrt(Qp)`` over the initial weights or
  the first batch of activations: ``init_step``.

"Inside" is ``-Qn <= v/s <= Qp`` (both ends included, as the gradient of the clamp in the
paper's reference code; eq. 3 writes strict inequalities; the two differ only for
``v/s`` exactly on a bound, where the code and so the forward are the same either way).

Numerics (float32, in this order; ``np.rint`` rounds half to even)::

    r     = v / s            (r = 0 where v == 0 and v / s is NaN: 0/0 is not NaN)
    v_bar = rint(clip(r, -Qn, Qp)) + 0          # + 0: the code 0 is +0
    v_hat = v_bar * s

Edge cases: NaN in gives NaN out.  The step is used as it is (it is data, so it cannot be
checked before the forward runs): ``s = 0`` is the limit ``s -> 0+`` (v > 0 -> Qp * 0, v < 0
-> -Qn * 0, v = 0 -> 0) and gets a gradient that can move it away from 0; a negative ``s`` is
the same formula (a mirrored grid).  In the backward a NaN ``r`` counts as outside for the data
gradient (0) and makes the step gradient NaN.

``dL/ds`` is a sum, summed in a fixed order so the C++ result equals this one bit for bit: the
terms ``dL/dv_hat * d v_hat/ds`` are float32 products, taken to float64; the elements of one
step form rows (the tensor viewed as (outer, channels, inner) around the channel axis; a
per-tensor step has one row, the whole tensor); a row is cut into chunks of ``SUM_CHUNK``
elements; within a chunk, lane j of ``SUM_LANES`` sums elements j, j+8, ... in order from 0;
a chunk adds its lanes in order, a row its chunks, a step its rows (each from 0.0); then
``dL/ds = f32(total) * g``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

f32 = np.float32
SUM_CHUNK = 4096
SUM_LANES = 8
NBITS_RANGE = (2, 16)


@dataclass(frozen=True)
class LSQAttrs:
    """Attributes of ``LSQ``; ``signed=None`` means the paper's default (= ``is_weight``)."""

    nbits: int = 4
    is_weight: bool = False
    is_weight_perchannel: bool = False
    channel_axis: int = 0
    signed: bool | None = None

    def __post_init__(self):
        if not NBITS_RANGE[0] <= self.nbits <= NBITS_RANGE[1]:
            raise ValueError(f"LSQ: nbits={self.nbits} is out of range {list(NBITS_RANGE)}")
        if self.is_weight_perchannel and not self.is_weight:
            raise ValueError("LSQ: is_weight_perchannel=True needs is_weight=True")

    @property
    def is_signed(self) -> bool:
        return self.is_weight if self.signed is None else bool(self.signed)

    @property
    def axis(self) -> int | None:
        return self.channel_axis if (self.is_weight and self.is_weight_perchannel) else None

    def as_kwargs(self) -> dict:
        """The attributes as keyword arguments of ``mx.nd.LSQ`` (``signed`` only when set)."""
        kw = dict(nbits=self.nbits, is_weight=self.is_weight,
                  is_weight_perchannel=self.is_weight_perchannel,
                  channel_axis=self.channel_axis)
        if self.signed is not None:
            kw["signed"] = self.signed
        return kw


def bounds(nbits: int, signed: bool) -> tuple[int, int]:
    """(Qn, Qp) of paper section 2; the clip range is [-Qn, Qp]."""
    if signed:
        return 2 ** (nbits - 1), 2 ** (nbits - 1) - 1
    return 0, 2 ** nbits - 1


def _clip_range(attrs: LSQAttrs) -> tuple[np.float32, np.float32]:
    qn, qp = bounds(attrs.nbits, attrs.is_signed)
    return f32(-qn), f32(qp)  # -0 of an int is 0: the unsigned lower bound is +0


def _step_view(step, x: np.ndarray, attrs: LSQAttrs) -> np.ndarray:
    s = np.asarray(step, dtype=f32).reshape(-1)
    if attrs.axis is None:
        if s.size != 1:
            raise ValueError(f"LSQ: step must have shape (1,), got {np.shape(step)}")
        return s.reshape(())
    c = x.shape[attrs.axis]
    if s.size != c:
        raise ValueError(f"LSQ: step must have shape ({c},), got {np.shape(step)}")
    shape = [1] * x.ndim
    shape[attrs.axis] = c
    return s.reshape(shape)


def ratio(x, s) -> np.ndarray:
    """v / s in float32, with 0 where v == 0 and the quotient is NaN (s = 0 or NaN)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        r = (x / s).astype(f32)
    return np.where(np.isnan(r) & (x == 0), f32(0), r).astype(f32)


def _code(r: np.ndarray, qmin, qmax) -> np.ndarray:
    return (np.rint(np.clip(r, qmin, qmax)) + f32(0)).astype(f32)


def lsq_forward(x, step, attrs: LSQAttrs = LSQAttrs()) -> np.ndarray:
    """v_hat = rint(clip(v / s, -Qn, Qp)) * s, float32."""
    x = np.asarray(x, dtype=f32)
    s = _step_view(step, x, attrs)
    qmin, qmax = _clip_range(attrs)
    with np.errstate(invalid="ignore"):
        return (_code(ratio(x, s), qmin, qmax) * s).astype(f32)


def elements_per_step(shape, attrs: LSQAttrs) -> int:
    """N of the gradient scale: weights, the elements of one step (of one channel when
    per-channel); activations, the elements of one example (size / shape[0])."""
    n = int(np.prod(shape, dtype=np.int64))
    if attrs.axis is not None:
        c = shape[attrs.axis]
        return n // c if c else 0
    if not attrs.is_weight:
        return n // shape[0] if shape[0] else 0
    return n


def grad_scale(shape, attrs: LSQAttrs) -> np.float32:
    """g = 1 / sqrt(N * Qp), in float64, rounded once to float32 (section 2.2)."""
    n = elements_per_step(shape, attrs)
    qp = bounds(attrs.nbits, attrs.is_signed)[1]
    if n <= 0:
        return f32(0)
    return f32(1.0 / np.sqrt(np.float64(n) * np.float64(qp)))


def step_terms(x, step, attrs: LSQAttrs = LSQAttrs()) -> np.ndarray:
    """d v_hat / d s per element (eq. 3), float32."""
    x = np.asarray(x, dtype=f32)
    s = _step_view(step, x, attrs)
    qmin, qmax = _clip_range(attrs)
    r = ratio(x, s)
    with np.errstate(invalid="ignore"):
        q = _code(r, qmin, qmax)
        return np.where(r < qmin, qmin, np.where(r > qmax, qmax, q - r)).astype(f32)


def _ordered_sum(t: np.ndarray) -> np.float64:
    """Sum of a float64 row in the fixed chunk / lane order (cumsum adds strictly in order;
    the + 0.0 is the C++ accumulator's start, which turns a -0 sum into +0)."""
    n = t.size
    chunks = max(1, -(-n // SUM_CHUNK))
    t = np.concatenate([t, np.zeros(chunks * SUM_CHUNK - n)])  # + 0.0 changes no sum
    t = t.reshape(chunks, SUM_CHUNK // SUM_LANES, SUM_LANES)
    lanes = np.cumsum(t, axis=1)[:, -1, :] + 0.0
    chunk_sums = np.cumsum(np.concatenate([np.zeros((chunks, 1)), lanes], axis=1), axis=1)[:, -1]
    return np.cumsum(np.concatenate([[0.0], chunk_sums]))[-1]


def _rows_of_channels(a: np.ndarray, attrs: LSQAttrs) -> np.ndarray:
    """(channels, outer, inner) view of a tensor: rows of each step in memory order."""
    if attrs.axis is None:
        return a.reshape(1, 1, -1)
    ax = attrs.axis
    outer = int(np.prod(a.shape[:ax], dtype=np.int64))
    inner = int(np.prod(a.shape[ax + 1:], dtype=np.int64))
    return a.reshape(outer, a.shape[ax], inner).transpose(1, 0, 2)


def lsq_backward(grad, x, step, attrs: LSQAttrs = LSQAttrs()) -> tuple[np.ndarray, np.ndarray]:
    """(dL/dv, dL/ds): the straight-through data gradient inside the inclusive range and the
    scaled step gradient of eq. 3, summed in the fixed order (shape of ``step``: (1,)/(C,))."""
    grad = np.asarray(grad, dtype=f32)
    x = np.asarray(x, dtype=f32)
    s = _step_view(step, x, attrs)
    qmin, qmax = _clip_range(attrs)
    r = ratio(x, s)
    with np.errstate(invalid="ignore"):
        inside = (r >= qmin) & (r <= qmax)
        dx = np.where(inside, grad, f32(0)).astype(f32)
        terms = (grad * step_terms(x, step, attrs)).astype(f32).astype(np.float64)
    rows = _rows_of_channels(terms, attrs)
    totals = []
    for c in range(rows.shape[0]):
        row_sums = [_ordered_sum(rows[c, o]) for o in range(rows.shape[1])]
        totals.append(np.cumsum([0.0] + row_sums)[-1])
    g = grad_scale(x.shape, attrs)
    with np.errstate(invalid="ignore", over="ignore"):
        ds = (np.array(totals, dtype=np.float64).astype(f32) * g).astype(f32)
    return dx, ds


def init_step(x, attrs: LSQAttrs = LSQAttrs()) -> np.ndarray:
    """The paper's initial step (section 2.1): ``2 * mean(|v|) / sqrt(Qp)`` over the initial
    weights (per channel for per-channel weights) or a first batch of activations; float64
    mean, one rounding to float32.  Shape (1,) or (C,): ready to be the ``step`` input.
    All-zero data gives 0 (which the operator treats as the limit s -> 0+)."""
    a = np.abs(np.asarray(x, dtype=np.float64))
    qp = bounds(attrs.nbits, attrs.is_signed)[1]
    if attrs.axis is None:
        m = np.array([a.mean()])
    else:
        m = np.moveaxis(a, attrs.axis, 0).reshape(a.shape[attrs.axis], -1).mean(axis=1)
    return (2.0 * m / np.sqrt(np.float64(qp))).astype(f32)


# -- the estimator as a function (for finite-difference checks) -------------------------

def estimator_terms(x, step, grad, frozen, attrs: LSQAttrs = LSQAttrs()) -> np.ndarray:
    """Per-element terms ``grad * v_hat_est(v, s)`` in float64 of the estimator's loss
    ``L(v, s) = sum(grad * v_hat_est(v, s))``: v_hat_est is the quantizer with the rounding
    offset ``round(c) - c`` (c = clip(v / s)) held at its value at ``frozen = (v0, s0)``, the
    straight-through surrogate whose derivatives at (v0, s0) are eq. 3 (in s) and eq. 5 (in
    v).  Away from the clip bounds, central differences of L in ``step`` (summed per channel)
    equal ``lsq_backward``'s step gradient divided by ``g``, and in ``v`` its data gradient."""
    qn, qp = bounds(attrs.nbits, attrs.is_signed)
    x = np.asarray(x, dtype=np.float64)

    def view(st):
        st = np.asarray(st, dtype=np.float64).reshape(-1)
        if attrs.axis is None:
            return st.reshape(())
        shape = [1] * x.ndim
        shape[attrs.axis] = -1
        return st.reshape(shape)

    x0, s0 = frozen
    c0 = np.clip(np.asarray(x0, dtype=np.float64) / view(s0), -qn, qp)
    offset = np.rint(c0) - c0
    s = view(step)
    v_hat = (np.clip(x / s, -qn, qp) + offset) * s
    return v_hat * np.asarray(grad, dtype=np.float64)
