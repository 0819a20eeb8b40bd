"""NumPy reference of ``FQN``: the executable spec of operator_cxx/kernels/fqn.h.

FQN (Li et al., "Fully Quantized Network for Object Detection", CVPR 2019) quantizes weights
and activations asymmetrically between a lower and an upper bound taken from the data: the
``k``-bit grid has ``2^k - 1`` steps from the minimum to the maximum (per output channel for
weights).  Here it is written as the deployable affine (zero point) quantizer, i.e. ONNX
QuantizeLinear -> DequantizeLinear with an unsigned ``k``-bit code (bit for bit uint8 QDQ at
k = 8, per tensor, or per axis for per-channel weights).

Range ``[min, max]`` (auxiliary state ``fqn_min`` / ``fqn_max``; ``qstate = [step, training]``):

* weights (``is_weight``): the current tensor's min and max (per channel along
  ``channel_axis`` when ``is_perchannel``), in training and in inference;
* activations: in training, from the batch's min and max: ``ema_decay = 0`` (default, as the
  seed toolkit) takes the batch's values; ``0 < ema_decay`` keeps an exponential moving
  average ``d * old + (1 - d) * batch`` (a range still at its initial [0, 0], or NaN, takes
  the batch's values); a batch with no non-NaN value leaves the range alone.  In inference
  the stored range is used as it is.

Numerics (float32, in this order; ``np.rint`` rounds half to even; L = 2^k - 1)::

    lo = min(min, 0);  hi = max(max, 0)          # the grid must hold 0 (exact zero point)
    s  = (hi - lo) / L
    zp = clip(rint(-lo / s), 0, L) + 0
    q  = clip(rint(x / s) + zp, 0, L)            # QuantizeLinear
    y  = (q - zp) * s                            # DequantizeLinear (q - zp exact: the code
                                                 # zp gives +0)

Edge cases: NaN in gives NaN out; +-inf saturate.  A range without a usable scale (``s`` not
in (0, FLT_MAX]: the range [0, 0] of an all-zero tensor or of a state never set, an infinite
or NaN bound, a scale that underflows) gives +0 everywhere (NaN stays NaN).  Batch minima and
maxima ignore NaN and are stored with ``+ 0`` (no -0).  A weight (channel) without a non-NaN
value gets the range [0, 0].

Backward (the straight-through estimator of the clamp): ``dL/dx = dL/dy`` where
``lo <= x <= hi`` (the range actually used, widened to contain 0; both ends included), 0
elsewhere and for NaN ``x``; ``grad_mode="ste"`` passes ``dL/dy`` everywhere (the seed's
backward).  Nothing is learned: the range is state, never differentiated.

Seed grid (``seed_grid=True``; default False, which leaves everything above unchanged): the
seed toolkit's ``_contrib_FQN`` / ``FQN_PY`` (XiaotaoChen/mx_quant_op, FQN-inl.h, FQN_PY.py),
a grid of ``L + 1`` levels that starts at ``min``, with no zero point (0 is in general not on
it) and no clamp (values beyond the range go on along the grid)::

    s = (max - min) / L                           # negative when max < min: the same grid
    y = rint((x - min) / s) * s + min             # the product rounded, then the sum

``nbits`` means what it meant in the seed (``L = 2^nbits - 1``) and may be 1 (two levels,
min and max).  A step that is not usable (``|s|`` not in (0, FLT_MAX]: max == min, an infinite
or NaN bound) gives +0 everywhere, NaN stays NaN (the seed divided 0 by 0: NaN everywhere).

* Range, weights (``is_weight``): in training the batch's min and max (NaN ignored; per
  channel along ``channel_axis`` with ``is_perchannel``, where the seed then added 1e-6 to
  each max, in float32, and so does this); **in inference the stored range**, as the seed (its
  checkpoints hold the range of the last training forward, which the final weights may leave).
  Activations: as without the option (``ema_decay = 0``, the default, stores each training
  batch's min and max, which is what the seed did; ``0 < ema_decay`` averages, an extension).
* Backward: ``grad_mode="ste"`` passes ``dL/dy`` everywhere: the seed's backward (an identity
  copy), which the import sets.  ``"clip"`` (the default) passes it where ``x`` lies between
  ``min`` and ``max`` (both ends included, not widened to 0), 0 elsewhere and for NaN ``x``: in
  training the batch's own range holds every value, so it differs from ``"ste"`` only on NaN
  (and, with ``0 < ema_decay``, outside the averaged range).
* What differs from the seed, kept: ``rint`` rounds half to even (the seed half away from
  zero: ``roundf`` / ``mx.nd.round``), because every quantizer of this library rounds so
  (TensorRT / ONNX QuantizeLinear do, and the PACT import keeps it too) and an exact tie
  (``x - min`` an odd multiple of ``s / 2``) is the only place the two roundings differ; ``s`` is
  divided by ``L``, as ``FQN_PY`` did (the C++ ``_contrib_FQN`` multiplied by ``float(1 / L)``,
  so its step may be an ulp off, and an output a few ulp); NaN is ignored by the batch range
  (mshadow's min/max reductions propagate it: the seed's range and outputs became NaN); a
  step of 0 gives +0 instead of NaN.  Nothing here is ONNX-exportable (FQN has no QDQ form).

Differences of the default (``seed_grid=False``) from the seed's ``_contrib_FQN``: the seed
computes the grid above (no zero point; no clamp), rounds half away from zero, stores the
batch's min/max (no EMA) in training for weights and activations alike and uses the stored
range in inference (weights too), adds 1e-6 to the per-channel max (a constant per-tensor
input divides by 0), allows per-channel on any input (axis 0, data viewed as 4-D) and passes
the gradient straight through everywhere.  Its aux states ``min`` / ``max`` are ``fqn_min`` /
``fqn_max`` here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

f32 = np.float32
NBITS_RANGE = (2, 16)
SEED_NBITS_RANGE = (1, 16)     # with seed_grid=True
FLT_MAX = np.finfo(f32).max
GRAD_MODES = ("clip", "ste")
SEED_EPS = f32(1e-6)           # the seed's per-channel max + 1e-6


@dataclass(frozen=True)
class FQNAttrs:
    """Attributes of ``FQN`` (``nbits`` / ``is_perchannel`` as in the seed toolkit)."""

    nbits: int = 4
    is_weight: bool = False
    is_perchannel: bool = False
    channel_axis: int = 0
    ema_decay: float = 0.0
    grad_mode: str = "clip"
    seed_grid: bool = False

    def __post_init__(self):
        lo, hi = SEED_NBITS_RANGE if self.seed_grid else NBITS_RANGE
        if not lo <= self.nbits <= hi:
            raise ValueError(f"FQN: nbits={self.nbits} is out of range {[lo, hi]}")
        if self.is_perchannel and not self.is_weight:
            raise ValueError("FQN: is_perchannel=True needs is_weight=True")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"FQN: ema_decay={self.ema_decay} is out of range [0, 1]")
        if self.grad_mode not in GRAD_MODES:
            raise ValueError(f"FQN: grad_mode={self.grad_mode!r} is not one of {GRAD_MODES}")

    @property
    def axis(self) -> int | None:
        return self.channel_axis if (self.is_weight and self.is_perchannel) else None

    def as_kwargs(self) -> dict:
        return dict(nbits=self.nbits, is_weight=self.is_weight,
                    is_perchannel=self.is_perchannel, channel_axis=self.channel_axis,
                    ema_decay=self.ema_decay, grad_mode=self.grad_mode,
                    seed_grid=self.seed_grid)


def levels(nbits: int) -> np.float32:
    """L = 2^k - 1, the top code."""
    return f32(2 ** int(nbits) - 1)


def qparams(fqn_min, fqn_max, nbits: int):
    """(scale, zero_point, lo, hi, usable), float32 arrays shaped like the range.

    ``zero_point`` is an integer-valued float in [0, L] (0 where unusable): with ``scale`` it
    is what an ONNX export writes (uint8 at k = 8)."""
    mn = np.asarray(fqn_min, dtype=f32)
    mx = np.asarray(fqn_max, dtype=f32)
    lv = levels(nbits)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        lo = np.where(mn > 0, f32(0), mn).astype(f32)        # NaN stays NaN
        hi = np.where(mx < 0, f32(0), mx).astype(f32)
        s = ((hi - lo).astype(f32) / lv).astype(f32)
        ok = (s > 0) & (s <= FLT_MAX)
        safe = np.where(ok, s, f32(1)).astype(f32)
        z = np.where(ok, np.rint((-lo).astype(f32) / safe), f32(0)).astype(f32)
        z = (np.where(z < 0, f32(0), np.where(z > lv, lv, z)) + f32(0)).astype(f32)
    return s, z, lo, hi, ok


def _bcast(v: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    v = np.asarray(v)
    if axis is None:
        return v.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def fake_quant(x, fqn_min, fqn_max, nbits: int = 4, axis: int | None = None) -> np.ndarray:
    """y = (clip(rint(x / s) + zp, 0, L) - zp) * s with the range [min, max] (one, or one per
    slice along ``axis``)."""
    x = np.asarray(x, dtype=f32)
    mn = np.asarray(fqn_min, dtype=f32).reshape(-1)
    mx = np.asarray(fqn_max, dtype=f32).reshape(-1)
    if axis is None:
        mn, mx = mn[:1], mx[:1]
    s, z, _, _, ok = (_bcast(a, x.ndim, axis) for a in qparams(mn, mx, nbits))
    lv = levels(nbits)
    safe = np.where(ok, s, f32(1)).astype(f32)
    with np.errstate(invalid="ignore", over="ignore"):
        q = (np.rint(x / safe) + z).astype(f32)
        q = np.where(q < 0, f32(0), np.where(q > lv, lv, q)).astype(f32)   # NaN stays NaN
        y = ((q - z).astype(f32) * safe).astype(f32)
    zero = np.where(np.isnan(x), x, f32(0)).astype(f32)
    return np.where(ok, y, zero).astype(f32)


def seed_step(fqn_min, fqn_max, nbits: int):
    """(step, usable) of the seed grid: ``(max - min) / L`` in float32 and ``0 < |s| <=
    FLT_MAX``, arrays shaped like the range."""
    mn = np.asarray(fqn_min, dtype=f32)
    mx = np.asarray(fqn_max, dtype=f32)
    with np.errstate(invalid="ignore", over="ignore"):
        s = ((mx - mn).astype(f32) / levels(nbits)).astype(f32)
        a = np.abs(s)
        ok = (a > 0) & (a <= FLT_MAX)
    return s, ok


def seed_fake_quant(x, fqn_min, fqn_max, nbits: int = 4, axis: int | None = None) -> np.ndarray:
    """The seed grid: y = rint((x - min) / s) * s + min, s = (max - min) / L, no clamp."""
    x = np.asarray(x, dtype=f32)
    mn = np.asarray(fqn_min, dtype=f32).reshape(-1)
    mx = np.asarray(fqn_max, dtype=f32).reshape(-1)
    if axis is None:
        mn, mx = mn[:1], mx[:1]
    s, ok = seed_step(mn, mx, nbits)
    s, ok, lo = (_bcast(a, x.ndim, axis) for a in (s, ok, mn))
    safe = np.where(ok, s, f32(1)).astype(f32)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        q = np.rint(((x - lo).astype(f32) / safe).astype(f32)).astype(f32)
        y = ((q * safe).astype(f32) + lo).astype(f32)
    zero = np.where(np.isnan(x), x, f32(0)).astype(f32)
    return np.where(ok, y, zero).astype(f32)


def batch_min_max(x, axis: int | None = None):
    """(min, max) of a batch ignoring NaN (per slice along ``axis``), float32 arrays of shape
    (1,) or (C,), + 0 (no -0).  Where there is no non-NaN value: (+inf, -inf)."""
    x = np.asarray(x, dtype=f32)
    if axis is None:
        rows = x.reshape(1, -1)
    else:
        rows = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
    with np.errstate(invalid="ignore"):
        mn = np.where(np.isnan(rows), f32(np.inf), rows).min(axis=1, initial=np.inf)
        mx = np.where(np.isnan(rows), f32(-np.inf), rows).max(axis=1, initial=-np.inf)
    return (mn.astype(f32) + f32(0)).astype(f32), (mx.astype(f32) + f32(0)).astype(f32)


def ema(current, batch, decay) -> np.float32:
    """d * current + (1 - d) * batch in float32 (each product rounded, then the sum)."""
    d = f32(decay)
    return f32(f32(d * f32(current)) + f32(f32(f32(1) - d) * f32(batch)))


def _uninitialized(mn: np.float32, mx: np.float32) -> bool:
    return bool(np.isnan(mn) or np.isnan(mx) or (mn == 0 and mx == 0))


def fqn_forward(x, fqn_min, fqn_max, qstate, attrs: FQNAttrs = FQNAttrs()):
    """Forward of ``FQN``; returns ``(y, new_min, new_max, new_qstate)``."""
    x = np.asarray(x, dtype=f32)
    mn = np.array(fqn_min, dtype=f32).reshape(-1)
    mx = np.array(fqn_max, dtype=f32).reshape(-1)
    qstate = np.array(qstate, dtype=f32).reshape(-1)
    training = qstate[1] > 0.5
    if attrs.is_weight and (training or not attrs.seed_grid):
        bmn, bmx = batch_min_max(x, attrs.axis)
        empty = ~(bmn <= bmx)
        mn = np.where(empty, f32(0), bmn).astype(f32)
        mx = np.where(empty, f32(0), bmx).astype(f32)
        if attrs.seed_grid and attrs.axis is not None:
            mx = (mx + SEED_EPS).astype(f32)
    elif training:
        bmn, bmx = batch_min_max(x)
        if bmn[0] <= bmx[0]:
            if attrs.ema_decay == 0 or _uninitialized(mn[0], mx[0]):
                mn, mx = bmn, bmx
            else:
                mn = np.array([ema(mn[0], bmn[0], attrs.ema_decay)], f32)
                mx = np.array([ema(mx[0], bmx[0], attrs.ema_decay)], f32)
    if training:
        qstate[0] = qstate[0] + f32(1)
    quant = seed_fake_quant if attrs.seed_grid else fake_quant
    return quant(x, mn, mx, attrs.nbits, attrs.axis), mn, mx, qstate


def fqn_backward(grad, x, fqn_min, fqn_max, attrs: FQNAttrs = FQNAttrs()) -> np.ndarray:
    """dL/dx given the range *after* the forward: straight through where lo <= x <= hi
    (``grad_mode="clip"``; with ``seed_grid``: between min and max, not widened to 0), or
    everywhere (``"ste"``)."""
    grad = np.asarray(grad, dtype=f32)
    x = np.asarray(x, dtype=f32)
    if attrs.grad_mode == "ste":
        return grad.copy()
    mn = np.asarray(fqn_min, dtype=f32).reshape(-1)
    mx = np.asarray(fqn_max, dtype=f32).reshape(-1)
    if attrs.axis is None:
        mn, mx = mn[:1], mx[:1]
    if attrs.seed_grid:
        with np.errstate(invalid="ignore"):
            lo = np.where(mn <= mx, mn, mx).astype(f32)
            hi = np.where(mn <= mx, mx, mn).astype(f32)
    else:
        _, _, lo, hi, _ = qparams(mn, mx, attrs.nbits)
    lo, hi = _bcast(lo, x.ndim, attrs.axis), _bcast(hi, x.ndim, attrs.axis)
    with np.errstate(invalid="ignore"):
        return np.where((x >= lo) & (x <= hi), grad, f32(0)).astype(f32)


def clamp_surrogate(x, lo, hi) -> np.ndarray:
    """clip(x, lo, hi) in float64: the function whose exact derivative (away from the kinks)
    the estimator is (central differences check ``fqn_backward``)."""
    return np.minimum(np.maximum(np.asarray(x, dtype=np.float64), float(lo)), float(hi))
