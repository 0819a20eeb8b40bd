"""PACT (arXiv 1805.06085): activations clipped to a learned [0, alpha], then uniform on
2^b - 1 levels; the clip's gradient is the paper's.  ``signed=True`` clips to
[-alpha, alpha] on 2^(b-1) - 1 levels each side (b counts the sign bit): the seed toolkit's
form, and the form for a tensor that has negative values.

Seed import (``from_seed``).  The seed's ``_contrib_PACT(data, gamma, nbits=4)`` computed
``round(clip(x, -gamma, gamma) / u) * u`` with ``u = gamma * f32(1 / (2^n - 1))``: a signed
clip (``mshadow_op::clip``) on ``2^n - 1`` levels each side, rounding half away from zero;
its Python prototype ``PACT_V2_PY`` (default ``nbits=8``) the same with ``u = gamma / L``.
Both become ``PACT(signed=True, nbits=n + 1)`` with the stored ``gamma`` as alpha (one value,
finite, > 0).  Where the input is a ReLU's output (>= 0 by construction) the clip is
[0, gamma] and the operator is the unsigned ``PACT(nbits=n)``: the same values, and an
unsigned QDQ form.  ``PACT_PY`` clipped only above (``min(x, gamma)``: negative values
unclipped, on an unbounded grid): converted only on a ReLU's output, refused elsewhere.
``CLIP_RELU_PY(nbits=8, threshold=8.0)`` (a fixed clip [0, threshold]) becomes
``PACT(nbits=n)`` with alpha = threshold, now learned.  What differs and is kept: rounding
half to even (half away from zero in the seed), ``s = alpha / L`` divided (the C++ seed
multiplied by a rounded 1/L: the step may differ by an ulp), the gradients (the seed's C++
backward treated the signed clip as unsigned: quant_ops/refs/pact.py).
"""
from __future__ import annotations

import numpy as np

from .base import QDQ, Input, Method, SeedMapped, SeedNode, SeedState, boolean, f32, flag, positive

TINY = 1e-8


class _PACT(Method):
    def initial(self, bits, per_channel, params, is_weight, channels, weight, axis):
        return {"gamma": np.array([params.get("alpha", 10.0)], f32)}

    def signed_params(self, params):
        return {**params, "signed": True}

    def unsigned(self, attrs):
        return not flag(attrs, "signed")

    def from_range(self, attrs, amax, signed):
        return {"gamma": np.array([amax], f32)}

    def qdq(self, attrs, value):
        """uint<b> codes 0..2^b - 1; signed: int<b> codes, scale alpha / (2^(b-1) - 1).
        (QuantizeLinear saturates at -2^(b-1), one code below the operator's -(2^(b-1) - 1):
        an input under -alpha - s/2 lands one step lower there.)"""
        v = np.asarray(value, f32).reshape(-1)
        b = self.nbits(attrs)
        if flag(attrs, "signed"):
            return QDQ((v[:1] / f32(2 ** (b - 1) - 1)).reshape(()), True, False, narrow=True)
        return QDQ((v[:1] / f32(2 ** b - 1)).reshape(()), False, False)

    # -- import from the seed toolkit -------------------------------------------------
    def from_seed(self, node: SeedNode) -> SeedMapped:
        if node.key == "Custom:CLIP_RELU_PY":
            a = node.known({"nbits": "8", "threshold": "8.0"})
            bits = node.bits("nbits", a["nbits"], 0, self.bits)
            t = node.as_float("threshold", a["threshold"])
            if not (np.isfinite(t) and t > 0):
                node.fail(f"attribute 'threshold' = {a['threshold']!r} must be a number > 0")
            node.note(f"CLIP_RELU_PY's fixed clip [0, {t}] is PACT's alpha, now learned "
                      "(its gradient: the paper's)")
            return SeedMapped({"nbits": str(bits)},
                              {"gamma": SeedState(shape=(1,), value=np.array([t], f32))})
        a = node.known({"nbits": "4" if not node.custom else "8"})
        n = node.as_int("nbits", a["nbits"])
        gamma = node.stored(0, 1, "clip value 'gamma'")
        if gamma is not None and not gamma[0] > 0:
            node.fail(f"its clip value '{node.inputs[0].name}' is {gamma[0]}: the seed's "
                      "PACT needs gamma > 0 (its step gamma / (2^nbits - 1) is 0 or negative)")
        keep = {"gamma": SeedState(seed=0, shape=(1,))}
        if node.nonnegative and n >= self.bits[0]:
            bits = node.bits("nbits", a["nbits"], 0, self.bits)
            node.note(f"input >= 0 (out of '{node.data_name}'): the seed's clip is [0, gamma] "
                      f"there, which is the unsigned PACT at nbits={bits}")
            return SeedMapped({"nbits": str(bits)}, keep)
        if node.key == "Custom:PACT_PY":
            node.fail("PACT_PY clipped only above (min(x, gamma)): negative values passed "
                      "unclipped onto an unbounded grid, and this input is not a ReLU's "
                      "output; no quant_ops operator computes that")
        bits = node.bits("nbits", a["nbits"], 1, self.bits)
        node.note(f"the seed clipped to [-gamma, gamma] on 2^{n} - 1 levels each side: "
                  f"PACT signed=True, nbits={bits}")
        return SeedMapped({"nbits": str(bits), "signed": "True"}, keep)


METHOD = _PACT(
    name="pact", op="PACT",
    inputs=(Input("gamma", "learned", "one", "(1,)", domain=(TINY, None)),),
    bits=(2, 16), roles=("activation",), weight_attr=False,
    params={"alpha": positive("a number > 0 (the initial clip)"), "signed": boolean()},
    range_input="gamma",
    seed_ops={"_contrib_PACT": ("data", "gamma"), "Custom:PACT_V2_PY": ("data", "gamma"),
              "Custom:PACT_PY": ("data", "gamma"), "Custom:CLIP_RELU_PY": ("data",)},
    doc="learned activation clip alpha (signed: [-alpha, alpha])")
