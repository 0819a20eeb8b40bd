"""QIL (arXiv 1808.05779): a learned interval (center, distance) and, for weights, a
learned transform exponent gamma.

Seed import (``from_seed``).  The seed's ``_contrib_QIL(data, center, distance, gamma,
is_weight=False, fix_gamma=True, nbits=8)`` applied the signed transform (|x|, sign) to every
tensor, whatever ``is_weight`` said, and discretized with ``round(t * L) / L``,
``L = 2^n - 1`` (half away from zero): that is ``QIL(is_weight=True, fix_gamma=True,
nbits=n + 1)`` with the stored center, distance and gamma (one finite value each), except at
an input of exactly 0 inside the interval (the seed's sign(0) = +1 gave it
``+round(L * (0.5 - 0.5 c / d)) / L``, here 0).  On a ReLU's output (>= 0) it is exactly the
activation form ``QIL(is_weight=False, nbits=n)``, 0 included.  ``fix_gamma=False`` is
refused (the seed's operator stopped at its first forward).  The seed overwrote center = 0,
distance = max|x| at the first forward of every executor; here the stored values are used.
The prototype ``QIL_PY(data, pruning_point, clipping_point, gamma, nbits=4)`` (sign(0) = 0,
as here) becomes the signed form at ``nbits=n + 1`` with ``center = (clip + prune) / 2``,
``distance = (clip - prune) / 2`` as new variables (computed from the stored points after the
clamps its forward applied: prune >= 0, clip <= 1; prune < clip).
"""
from __future__ import annotations

import numpy as np

from ..calib.weights import int_grid, mse_clip
from .base import Input, Method, SeedMapped, SeedNode, SeedState, boolean, f32, positive

TINY = 1e-8


class _QIL(Method):
    def initial(self, bits, per_channel, params, is_weight, channels, weight, axis):
        if is_weight and weight is not None:
            # the signed transform at gamma 1 is the integer grid on [-a, a] with
            # L = 2^(bits-1) - 1 levels a side when c = d = a / 2: a by least error
            levels = 2 ** (bits - 1) - 1
            c = d = mse_clip(weight, int_grid(-levels, levels)) / 2
        else:  # activations: [0, init_range] until calibration or training moves it
            c = d = np.array([params.get("init_range", 4.0) / 2], f32)
        return {"center": np.asarray(c, f32), "distance": np.asarray(d, f32),
                "gamma": np.ones(1, f32)}

    def unsigned(self, attrs):
        return True

    def from_range(self, attrs, amax, signed):
        return {"center": np.array([amax / 2], f32), "distance": np.array([amax / 2], f32)}

    # -- import from the seed toolkit -------------------------------------------------
    def from_seed(self, node: SeedNode) -> SeedMapped:
        if node.custom:
            return self._from_qil_py(node)
        a = node.known({"is_weight": "False", "fix_gamma": "True", "nbits": "8"})
        node.as_bool("is_weight", a["is_weight"])   # the seed's forward did not read it
        if not node.as_bool("fix_gamma", a["fix_gamma"]):
            node.fail("attribute 'fix_gamma' = False: the seed's operator stopped at its "
                      "first forward unless fix_gamma=True")
        n = node.as_int("nbits", a["nbits"])
        c = node.stored(0, 1, "center")
        d = node.stored(1, 1, "distance")
        node.stored(2, 1, "gamma")
        keep = {"center": SeedState(seed=0, shape=(1,)),
                "distance": SeedState(seed=1, shape=(1,)),
                "gamma": SeedState(seed=2, shape=(1,))}
        if node.nonnegative and n >= self.bits[0]:
            bits = node.bits("nbits", a["nbits"], 0, self.bits)
            node.note(f"input >= 0 (out of '{node.data_name}'): the seed's transform is the "
                      f"activation form there: is_weight=False, nbits={bits}")
            return SeedMapped({"nbits": str(bits), "is_weight": "False", "fix_gamma": "True"},
                              keep)
        bits = node.bits("nbits", a["nbits"], 1, self.bits)
        if c is None or c[0] - d[0] <= 0:
            node.note("an input of exactly 0 inside the interval gave the seed "
                      "+round(L * (0.5 - 0.5 c / d)) / L (its sign(0) = +1); it gives 0 here")
        return SeedMapped({"nbits": str(bits), "is_weight": "True", "fix_gamma": "True"}, keep)

    def _from_qil_py(self, node: SeedNode) -> SeedMapped:
        a = node.known({"is_weight": "False", "fix_gamma": "True", "nbits": "4"})
        node.as_bool("is_weight", a["is_weight"])   # its forward did not read it
        if not node.as_bool("fix_gamma", a["fix_gamma"]):
            node.note("fix_gamma=False: QIL_PY's forward ignored gamma (its backward "
                      "stopped): fix_gamma=True")
        bits = node.bits("nbits", a["nbits"], 1, self.bits)
        p = node.stored(0, 1, "pruning point")
        q = node.stored(1, 1, "clipping point")
        node.stored(2, 1, "gamma")
        center = distance = None
        if p is not None:
            p, q = np.maximum(p, f32(0)), np.minimum(q, f32(1))   # as its forward clamped
            if not p[0] < q[0]:
                node.fail(f"pruning point {p[0]} is not below clipping point {q[0]} (after "
                          "the seed's clamps to >= 0 and <= 1): its forward stopped there")
            center = (f32(0.5) * (q + p)).astype(f32)
            distance = (f32(0.5) * (q - p)).astype(f32)
        elif not node.has_params:
            node.note("no checkpoint: the new center and distance variables need values "
                      "((clip + prune) / 2, (clip - prune) / 2)")
        return SeedMapped({"nbits": str(bits), "is_weight": "True", "fix_gamma": "True"}, {
            "center": SeedState(shape=(1,), value=center),
            "distance": SeedState(shape=(1,), value=distance),
            "gamma": SeedState(seed=2, shape=(1,))})


METHOD = _QIL(
    # the paper's estimator sums over every element of the tensor: gradients of ~1e2-1e5
    # at the first step; weight decay would pull the range itself to zero
    lr_mult=0.01, wd_mult=0.0,
    keeps_weight_scale=False,
    name="qil", op="QIL",
    inputs=(Input("center", "learned"), Input("distance", "learned", domain=(TINY, None)),
            Input("gamma", "learned", domain=(TINY, None))),
    bits=(2, 16),
    params={"fix_gamma": boolean(),
            "init_range": positive("a number > 0 (activations: initial interval "
                                   "[0, init_range])")},
    qdq_reason="its levels are not an integer grid with zero point 0 (learned transform)",
    seed_ops={"_contrib_QIL": ("data", "center", "distance", "gamma"),
              "Custom:QIL_PY": ("data", "pruning_point", "clipping_point", "gamma")},
    doc="learned quantization interval")
