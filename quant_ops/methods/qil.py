"""QIL (arXiv 1808.05779): a learned interval (center, distance) and, for weights, a
learned transform exponent gamma."""
from __future__ import annotations

import numpy as np

from ..refs.qil import QILAttrs, init_interval
from .base import Input, Method, boolean, f32, positive

TINY = 1e-8


class _QIL(Method):
    def initial(self, bits, per_channel, params, is_weight, channels, weight, axis):
        if is_weight and weight is not None:
            c, d = init_interval(np.asarray(weight), QILAttrs(bits, True))
        else:  # activations: [0, init_range] until calibration or training moves it
            c = d = np.array([params.get("init_range", 4.0) / 2], f32)
        return {"center": np.asarray(c, f32), "distance": np.asarray(d, f32),
                "gamma": np.ones(1, f32)}

    def unsigned(self, attrs):
        return True

    def from_range(self, attrs, amax, signed):
        return {"center": np.array([amax / 2], f32), "distance": np.array([amax / 2], f32)}


METHOD = _QIL(
    name="qil", op="QIL",
    inputs=(Input("center", "learned"), Input("distance", "learned", domain=(TINY, None)),
            Input("gamma", "learned", domain=(TINY, None))),
    bits=(2, 16),
    params={"fix_gamma": boolean(),
            "init_range": positive("a number > 0 (activations: initial interval "
                                   "[0, init_range])")},
    qdq_reason="its levels are not an integer grid with zero point 0 (learned transform)",
    doc="learned quantization interval")
