"""GDRQ (arXiv 1908.01477): values clipped at ktimes * mean|x| (Scale-Clip), the clip
moving towards it in training, then quantized uniformly.

Seed import (``from_seed``).  The operator keeps the seed's ``_contrib_GDRQ`` attributes,
defaults and bit count (``2^nbits - 1`` levels each side); its aux state ``alpha`` is
``gdrq_alpha`` here (the variable and its stored value kept: one finite value), and a
``qstate`` is added (zeros: inference).  The prototype ``GDRQ_PY(nbits=4, group_size=-1,
is_weight=False, lamda=0.99)`` is the same operator with ``ktimes=3``, always quantizing
(``do_quant=True``) and never fixing alpha.  Refused: ``group_size`` other than -1 (the
seed's C++ stopped at its first forward; grouped GDRQ is not in the graph passes here) and
values outside what the seed's parameters meant.  Kept as documented fixes (noted when they
matter): an activation's alpha is frozen in inference and moves towards ``ktimes *
mean|x|`` in training (the seed moved it away from it, in every forward), rounding half to
even, the two-sided clip gradient (quant_ops/refs/gdrq.py).
"""
from __future__ import annotations

import numpy as np

from .base import (Input, Method, Param, SeedMapped, SeedNode, SeedState, boolean, choice, f32,
                   is_num, positive)

SEED_DEFAULTS = {"nbits": "4", "group_size": "-1", "is_weight": "False", "lamda": "0.001",
                 "do_quant": "False", "fix_alpha": "False", "ktimes": "2", "grad_mode": "ste"}
SEED_PY_DEFAULTS = {"nbits": "4", "group_size": "-1", "is_weight": "False", "lamda": "0.99"}


class _GDRQ(Method):
    def from_range(self, attrs, amax, signed):
        return {"gdrq_alpha": np.array([amax], f32)}

    def from_seed(self, node: SeedNode) -> SeedMapped:
        if node.custom:
            a = {**node.known(SEED_PY_DEFAULTS), "do_quant": "True", "fix_alpha": "False",
                 "ktimes": "3", "grad_mode": "ste"}
        else:
            a = node.known(SEED_DEFAULTS)
        bits = node.bits("nbits", a["nbits"], 0, self.bits)
        group = node.as_int("group_size", a["group_size"])
        if group != -1:
            node.fail(f"attribute 'group_size' = {a['group_size']!r}: only -1 (one clip value "
                      "per tensor) converts (the seed's C++ operator stopped at its first "
                      "forward otherwise; grouped GDRQ is not in quant_ops' graph passes)")
        is_weight = node.as_bool("is_weight", a["is_weight"])
        lamda = node.as_float("lamda", a["lamda"])
        if not 0.0 <= lamda <= 1.0:
            node.fail(f"attribute 'lamda' = {a['lamda']!r} is outside [0, 1]")
        do_quant = node.as_bool("do_quant", a["do_quant"])
        fix_alpha = node.as_bool("fix_alpha", a["fix_alpha"])
        ktimes = node.as_float("ktimes", a["ktimes"])
        if not (np.isfinite(ktimes) and 0 < ktimes <= np.finfo(f32).max):
            node.fail(f"attribute 'ktimes' = {a['ktimes']!r} must be a number > 0")
        grad = a["grad_mode"].strip()
        if grad not in ("ste", "clip"):
            node.fail(f"attribute 'grad_mode' = {a['grad_mode']!r} is not 'ste' or 'clip'")
        node.stored(0, 1, "clip value 'alpha'")
        if not is_weight and not fix_alpha and lamda > 0:
            node.note("the seed also moved an activation's alpha in inference, away from "
                      "ktimes * mean|x| (alpha + lamda * (alpha - t)); here the stored alpha "
                      "is used in inference and moves towards t in training")
        attrs = {"nbits": str(bits), "group_size": "-1", "is_weight": str(is_weight),
                 "lamda": a["lamda"].strip(), "do_quant": str(do_quant),
                 "fix_alpha": str(fix_alpha), "ktimes": a["ktimes"].strip(), "grad_mode": grad}
        return SeedMapped(attrs, {
            "gdrq_alpha": SeedState(seed=0, shape=(1,)),
            "qstate": SeedState(shape=(2,), value=np.zeros(2, np.float32))})


METHOD = _GDRQ(
    keeps_weight_scale=False,
    # quantize in training as in inference (the operator's own default, do_quant=False,
    # kept for seed graphs, trains on the clip alone and deploys something else)
    defaults={"weight": {"do_quant": True}, "activation": {"do_quant": True}},
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
    seed_ops={"_contrib_GDRQ": ("data", "alpha"), "Custom:GDRQ_PY": ("data", "alpha")},
    doc="group-based distribution reshaping")
