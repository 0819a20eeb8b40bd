"""PACT (arXiv 1805.06085): activations clipped to a learned [0, alpha], then uniform on
2^b - 1 levels; the clip's gradient is the paper's."""
from __future__ import annotations

import numpy as np

from .base import QDQ, Input, Method, f32, positive

TINY = 1e-8


class _PACT(Method):
    def initial(self, bits, per_channel, params, is_weight, channels, weight, axis):
        return {"gamma": np.array([params.get("alpha", 10.0)], f32)}

    def unsigned(self, attrs):
        return True

    def from_range(self, attrs, amax, signed):
        return {"gamma": np.array([amax], f32)}

    def qdq(self, attrs, value):
        v = np.asarray(value, f32).reshape(-1)
        return QDQ((v[:1] / f32(2 ** self.nbits(attrs) - 1)).reshape(()), False, False)


METHOD = _PACT(
    name="pact", op="PACT",
    inputs=(Input("gamma", "learned", "one", "(1,)", domain=(TINY, None)),),
    bits=(2, 16), roles=("activation",), weight_attr=False,
    params={"alpha": positive("a number > 0 (the initial clip)")},
    range_input="gamma", doc="learned activation clip alpha")
