"""GDRQ (arXiv 1908.01477): values clipped at ktimes * mean|x| (Scale-Clip), the clip
moving towards it in training, then quantized uniformly."""
from __future__ import annotations

import numpy as np

from .base import Input, Method, Param, boolean, choice, f32, is_num, positive


class _GDRQ(Method):
    def from_range(self, attrs, amax, signed):
        return {"gdrq_alpha": np.array([amax], f32)}


METHOD = _GDRQ(
    name="gdrq", op="GDRQ",
    inputs=(Input("gdrq_alpha", "state", "one", "(0,)"), Input("qstate", "state", 2, "(2,)")),
    bits=(1, 16),
    params={"group_size": Param(lambda v: v == -1,
                                "-1 (one group; grouped GDRQ is available on the operator, "
                                "not yet in the graph rewrite)"),
            "lamda": Param(lambda v: is_num(v) and 0 <= v <= 1, "a number in [0, 1]"),
            "do_quant": boolean(), "fix_alpha": boolean(),
            "ktimes": positive("a number > 0", attr=True),
            "grad_mode": choice("ste", "clip")},
    qdq_reason="its levels are not an integer grid with zero point 0",
    doc="group-based distribution reshaping")
