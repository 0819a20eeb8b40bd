"""FQN (Li et al. CVPR 2019): asymmetric [min, max] ranges kept by EMA (per channel for
weights), for detection networks; BN freezing and activation clipping are its recipe."""
from __future__ import annotations

import numpy as np

from .base import Input, Method, Param, choice, f32, is_num


class _FQN(Method):
    def from_range(self, attrs, amax, signed):
        return {"fqn_min": np.array([-amax if signed else 0.0], f32),
                "fqn_max": np.array([amax], f32)}


METHOD = _FQN(
    name="fqn", op="FQN",
    inputs=(Input("fqn_min", "state", "channels", "(0,)"),
            Input("fqn_max", "state", "channels", "(0,)"),
            Input("qstate", "state", 2, "(2,)")),
    bits=(2, 16), per_channel=True, channel_attr="is_perchannel",
    params={"ema_decay": Param(lambda v: is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
            "grad_mode": choice("ste", "clip")},
    sign_aware=True,
    qdq_reason="its levels are not an integer grid with zero point 0 (asymmetric range)",
    doc="EMA min/max ranges, per-channel weights")
