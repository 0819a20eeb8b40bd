"""LSQ (arXiv 1902.08153): a learned step size per tensor (per channel for weights) with
the paper's gradient scale 1 / sqrt(N Qp)."""
from __future__ import annotations

import numpy as np

from ..calib.weights import int_grid, mse_clip
from ..refs.lsq import LSQAttrs, bounds
from .base import QDQ, Input, Method, boolean, f32, flag, positive

TINY = 1e-8


class _LSQ(Method):
    def initial(self, bits, per_channel, params, is_weight, channels, weight, axis):
        attrs = LSQAttrs(nbits=bits, is_weight=is_weight,
                         is_weight_perchannel=is_weight and per_channel,
                         channel_axis=axis, signed=params.get("signed"))
        if is_weight and weight is not None:   # the step with the least error on its grid
            qn, qp = bounds(bits, True)
            step = mse_clip(weight, int_grid(-qn, qp), axis if attrs.is_weight_perchannel
                            else None) / qp
        else:  # activations: from the expected range until calibration or training moves it
            qp = bounds(bits, attrs.is_signed)[1]
            step = np.full(channels, params.get("init_range", 4.0) / qp, f32)
        return {"step": np.asarray(step, f32).reshape(channels)}

    def _signed(self, attrs) -> bool:
        return flag(attrs, "signed", flag(attrs, "is_weight"))

    def signed_params(self, params):
        return {**params, "signed": True}

    def unsigned(self, attrs):
        return not self._signed(attrs)

    def from_range(self, attrs, amax, signed):
        qp = bounds(self.nbits(attrs), flag(attrs, "signed"))[1]
        return {"step": np.array([amax / qp], f32)}

    def qdq(self, attrs, value):
        per_axis = self.per_axis(attrs)
        v = np.asarray(value, f32).reshape(-1)
        return QDQ(v if per_axis else v[:1].reshape(()), self._signed(attrs), per_axis)


METHOD = _LSQ(
    name="lsq", op="LSQ",
    inputs=(Input("step", "learned", "channels", "(0,)", domain=(TINY, None)),),
    bits=(2, 16), per_channel=True, channel_attr="is_weight_perchannel",
    params={"signed": boolean(),
            "init_range": positive("a number > 0 (activations: initial step = init_range / Qp)")},
    range_input="step", doc="learned step size")
