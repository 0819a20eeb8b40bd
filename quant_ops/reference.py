"""NumPy reference of every operator: the executable spec the C++ kernels are tested against.

All arithmetic is float32, in the order the engine (TensorRT, ONNX QuantizeLinear ->
DequantizeLinear) performs it: ``s = amax / qmax``; ``q = clip(rint(x / s), qmin, qmax)``;
``y = q * s``.  ``np.rint`` rounds half to even.  See DESIGN.md section 3.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

f32 = np.float32


def qrange(nbits: int, narrow: bool, signed: bool = True) -> tuple[float, float]:
    """(qmin, qmax) of a symmetric signed quantizer; ``narrow`` drops -2^(b-1) (weights).
    Unsigned (``signed`` False): codes 0..2^b - 1, uint8 with zero point 0 at 8 bits."""
    if not signed:
        return 0.0, float(2 ** nbits - 1)
    qmax = float(2 ** (nbits - 1) - 1)
    return (-qmax if narrow else -qmax - 1.0), qmax


def scale_of(amax, nbits: int, signed: bool = True) -> np.ndarray:
    """Scale in float32, as the engine computes it (not in double, then rounded)."""
    return np.asarray(amax, dtype=f32) / f32(qrange(nbits, False, signed)[1])


def _broadcast(v: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None:
        return v.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def fake_quant(x: np.ndarray, amax, nbits: int = 8, narrow: bool = False,
               axis: int | None = None, signed: bool = True) -> np.ndarray:
    """dequant(quant(x)) with one range (``axis=None``) or one range per slice along ``axis``.

    ``+ 0`` turns a rounded -0 into +0 (the integer code 0 dequantizes to +0).  A zero range
    gives the signed zeros ONNX Runtime gives (+0 for x > 0, else -0); NaN stays NaN.
    ``signed`` False: codes 0..2^b - 1 on [0, amax] (negative values give 0).
    """
    x = np.asarray(x, dtype=f32)
    qmin, qmax = qrange(nbits, narrow, signed)
    s = _broadcast(scale_of(amax, nbits, signed), x.ndim, axis)
    ok = (s > 0) & np.isfinite(s)
    safe = np.where(ok, s, f32(1))
    with np.errstate(invalid="ignore"):
        q = np.clip(np.rint(x / safe), f32(qmin), f32(qmax)).astype(f32) + f32(0)
        zero = np.where(np.isnan(x), x, np.where(x > 0, f32(0), f32(-0.0)))
        return np.where(ok, q * safe, zero).astype(f32)


def abs_max(x: np.ndarray, axis: int | None = None) -> np.ndarray:
    """max |x| over everything (axis=None) or over all dimensions but ``axis``; NaN ignored."""
    a = np.abs(np.asarray(x, dtype=f32))
    a = np.where(np.isnan(a), f32(0), a)
    if axis is None:
        return np.array([a.max(initial=0.0)], dtype=f32)
    a = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)
    return a.max(axis=1, initial=0.0).astype(f32)


def ema_update(current: float, batch: float, decay: float) -> np.float32:
    """EMA of a range; an uninitialized range (<= 0) takes the batch value."""
    current, batch, decay = f32(current), f32(batch), f32(decay)
    if not current > 0:
        return batch
    return f32(decay * current) + f32(f32(1) - decay) * batch


@dataclass(frozen=True)
class Int8Attrs:
    """Attributes of ``Quantization_int8`` (names and defaults of the seed toolkit)."""

    nbits: int = 8
    is_weight: bool = False
    is_weight_perchannel: bool = False
    delay_quant: int = 0
    ema_decay: float = 0.99
    grad_mode: str = "ste"
    fix_act_scale: bool = False
    fix_weight_scale: bool = False   # weights: a stored range > 0 is kept (0: from max|w|)
    channel_axis: int = 0
    signed: bool = True          # False: unsigned activation codes 0..2^b - 1

    @property
    def axis(self) -> int | None:
        return self.channel_axis if (self.is_weight and self.is_weight_perchannel) else None


def quantization_int8_forward(x, minmax, qstate, attrs: Int8Attrs):
    """Forward of ``Quantization_int8``; returns ``(y, new_minmax, new_qstate)``.

    ``qstate = [step, training]``.  Weights: range = max|w| (per channel on ``channel_axis``
    when per-channel), narrow range; with ``fix_weight_scale`` a stored range > 0 is kept
    (a calibrated clip) and only an unset one (0) is taken from max|w|.  Activations: in training, EMA of the batch max|x|
    (initialized by the first batch; ``fix_act_scale`` keeps an initialized range); frozen in
    inference.  During the first ``delay_quant`` training steps the output is ``x``.
    ``signed`` False (activations only): codes 0..2^b - 1, scale amax / (2^b - 1).
    """
    if attrs.is_weight and not attrs.signed:
        raise ValueError("signed=False is for activations (weights are symmetric)")
    if attrs.fix_weight_scale and not attrs.is_weight:
        raise ValueError("fix_weight_scale is for weights (activations: fix_act_scale)")
    x = np.asarray(x, dtype=f32)
    minmax = np.array(minmax, dtype=f32).reshape(-1)
    qstate = np.array(qstate, dtype=f32).reshape(-1)
    training = qstate[1] > 0.5
    step = qstate[0]
    if attrs.is_weight:
        now = abs_max(x, attrs.axis)
        minmax = np.where(minmax > 0, minmax, now).astype(f32) if attrs.fix_weight_scale \
            else now
    elif training:
        batch = abs_max(x)[0]
        if not (attrs.fix_act_scale and minmax[0] > 0):
            minmax = np.array([ema_update(minmax[0], batch, attrs.ema_decay)], dtype=f32)
    if training:
        qstate[0] = step + f32(1)
    if training and step < attrs.delay_quant:
        return x.copy(), minmax, qstate
    amax = minmax if attrs.axis is not None else minmax[0]
    return (fake_quant(x, amax, attrs.nbits, attrs.is_weight, attrs.axis, attrs.signed),
            minmax, qstate)


def quantization_int8_backward(grad, x, minmax, qstate, attrs: Int8Attrs) -> np.ndarray:
    """Gradient w.r.t. data, given the state *after* forward.  Straight-through; ``clip``
    zeroes it where the clamp acted (the rounded code left [qmin, qmax]), except during the
    delayed start and where the scale is unusable (zero range)."""
    grad = np.asarray(grad, dtype=f32)
    x = np.asarray(x, dtype=f32)
    qstate = np.asarray(qstate, dtype=f32).reshape(-1)
    delayed = qstate[1] > 0.5 and qstate[0] - 1 < attrs.delay_quant
    if attrs.grad_mode == "ste" or delayed:
        return grad.copy()
    qmin, qmax = qrange(attrs.nbits, attrs.is_weight, attrs.signed)
    mm = np.asarray(minmax, dtype=f32).reshape(-1)
    s = _broadcast(scale_of(mm if attrs.axis is not None else mm[0], attrs.nbits,
                            attrs.signed), x.ndim, attrs.axis)
    ok = (s > 0) & np.isfinite(s)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.rint(x / np.where(ok, s, f32(1)))
    inside = ~ok | ((q >= qmin) & (q <= qmax))
    return np.where(inside, grad, f32(0)).astype(f32)
