"""INT8 QAT, TensorRT-aligned (Jacob et al. 2017): symmetric, zero point 0, EMA activation
ranges, per-channel weights with narrow range, delayed start.  The deployment format."""
from __future__ import annotations

from typing import Any

import numpy as np

from .. import reference as ref
from .base import QDQ, Input, Method, Param, boolean, choice, f32, flag, is_int, is_num


class _Int8(Method):
    def from_range(self, attrs, amax, signed):
        return {"minmax": np.array([amax], f32)}

    def qdq(self, attrs, value):
        per_axis = self.per_axis(attrs)
        scale = np.asarray(value, f32).reshape(-1) / f32(2 ** (self.nbits(attrs) - 1) - 1)
        return QDQ(scale if per_axis else scale[:1].reshape(()), True, per_axis)

    def deploy_state(self, attrs, weight):
        axis = int(attrs.get("channel_axis", "0")) if self.per_axis(attrs) else None
        return {"minmax": ref.abs_max(np.asarray(weight), axis)}

    def fixed(self, x, attrs, state):
        import mxnet as mx

        kw = {k: v for k, v in attrs.items() if not k.startswith("__")}
        mm = np.asarray(state["minmax"], f32).reshape(-1)
        if not flag(attrs, "is_weight"):
            return super().fixed(x, attrs, {**state, "qstate": np.zeros(2, f32)})
        # a weight with its recorded ranges: the range is given, not recomputed
        kw["is_weight"] = "False"
        kw.pop("is_weight_perchannel", None)
        axis = int(kw.pop("channel_axis", 0))

        def run(xc: np.ndarray, m: np.ndarray) -> np.ndarray:
            return mx.nd.Quantization_int8(mx.nd.array(xc), mx.nd.array(m), mx.nd.zeros(2),
                                           **kw).asnumpy()

        if mm.size == 1:
            return run(x, mm)
        xs = np.moveaxis(x, axis, 0)
        return np.moveaxis(np.stack([run(xs[c], mm[c:c + 1]) for c in range(mm.size)]), 0,
                           axis)


def _delay(v: Any) -> bool:
    return is_int(v) and v >= 0


METHOD = _Int8(
    name="int8", op="Quantization_int8",
    inputs=(Input("minmax", "state", "channels", "(0,)"), Input("qstate", "state", 2, "(2,)")),
    bits=(2, 16), per_channel=True, default_bits=8, channel_attr="is_weight_perchannel",
    params={"ema_decay": Param(lambda v: is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
            "delay_quant": Param(_delay, "an integer >= 0"),
            "grad_mode": choice("ste", "clip"),
            "fix_act_scale": boolean()},
    range_input="minmax", linear=True, scale_follows_weight=True,
    doc="TensorRT INT8: symmetric, EMA activation ranges, per-channel weights")
