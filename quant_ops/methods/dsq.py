"""DSQ (arXiv 1908.05033): a hard forward over a learned range [lower, upper] with a
soft-quantization (tanh) gradient of learned softness alpha."""
from __future__ import annotations

import numpy as np

from ..calib.weights import mse_clip
from .base import Input, Method, Param, f32, is_num, positive

MIN_WIDTH = 1e-4   # smallest DSQ range kept


def _grid(bits: int):
    """DSQ's hard forward on [-a, a]: 2^bits levels from -a to a (no level at 0)."""
    steps = 2 ** bits - 1

    def fq(w, a):
        d = 2 * a / steps
        return np.rint((np.clip(w, -a, a) + a) / d) * d - a
    return fq


class _DSQ(Method):
    def initial(self, bits, per_channel, params, is_weight, channels, weight, axis):
        if is_weight and weight is not None:   # [-a, a] with the least error on its grid
            hi = mse_clip(weight, _grid(bits))
            lo = -hi
        else:  # activations: [0, init_range] until calibration or training moves it
            lo, hi = np.zeros(1, f32), np.array([params.get("init_range", 4.0)], f32)
        return {"dsq_lower": np.asarray(lo, f32).reshape(1),
                "dsq_upper": np.asarray(hi, f32).reshape(1),
                "dsq_alpha": np.array([params.get("alpha", 0.2)], f32),
                "qstate": np.zeros(2, f32)}

    def unsigned(self, attrs):
        return True

    def from_range(self, attrs, amax, signed):
        return {"dsq_upper": np.array([amax], f32)}

    def project(self, values):
        out = super().project(values)
        if "dsq_lower" in values and "dsq_upper" in values:
            lo, hi = values["dsq_lower"], values["dsq_upper"]
            bad = hi - lo < MIN_WIDTH / 2   # (set to MIN_WIDTH: float32 rounding safe)
            if bad.any():
                mid = (lo + hi) / 2
                out["dsq_lower"] = np.where(bad, mid - MIN_WIDTH / 2, lo)
                out["dsq_upper"] = np.where(bad, mid + MIN_WIDTH / 2, hi)
        return out


METHOD = _DSQ(
    # the paper's estimator sums over every element of the tensor: gradients of ~1e2-1e5
    # at the first step; weight decay would pull the range itself to zero
    lr_mult=0.01, wd_mult=0.0,
    name="dsq", op="DSQ",
    inputs=(Input("dsq_lower", "learned"), Input("dsq_upper", "learned"),
            Input("dsq_alpha", "learned", domain=(1e-3, 0.5 - 1e-3)),
            Input("qstate", "state", 2, "(2,)")),
    bits=(1, 16),
    params={"soft": Param(lambda v: isinstance(v, bool),
                          "true or false (false: the uniform baseline)"),
            "alpha": Param(lambda v: is_num(v) and 0 < v < 0.5,
                           "a number in (0, 0.5) (initial softness)", attr=False),
            "init_range": positive("a number > 0 (activations: initial range [0, init_range])")},
    qdq_reason="its levels are not an integer grid with zero point 0 (learned range)",
    doc="differentiable soft quantization")
