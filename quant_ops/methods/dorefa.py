"""DoReFa (arXiv 1606.06160): tanh-normalized weights on [-1, 1], activations clipped to
[0, 1]; nothing learned, no state.

Seed import (``from_seed``).  The seed's ``_contrib_DoReFa(data, nbits=4)`` and its prototype
``DoReFa_PY`` (default ``nbits=8``) computed the weight form on every tensor it was put on:
``2 round((tanh(x) / (2 max|tanh(x)|) + 0.5) L) / L - 1`` with ``L = 2^n - 1`` (the C++ one
dividing and multiplying by ``f32(1 / L)``), rounding half away from zero.  That is
``DoReFa(is_weight=True, nbits=n)`` (also on an activation); the seed's ``nbits=1`` (outputs
+-1) is refused: at one bit this operator is the paper's ``sign(w) * mean|w|``.
"""
from __future__ import annotations

from .base import Method, SeedMapped, SeedNode


class _DoReFa(Method):
    def unsigned(self, attrs):
        return True

    def from_seed(self, node: SeedNode) -> SeedMapped:
        a = node.known({"nbits": "8" if node.custom else "4"})
        if node.as_int("nbits", a["nbits"]) == 1:
            node.fail("attribute 'nbits' = 1: the seed's tanh form at one bit gives +-1, "
                      "quant_ops' DoReFa at one bit is the paper's sign(w) * mean|w|; no "
                      "exact mapping")
        bits = node.bits("nbits", a["nbits"], 0, (2, self.bits[1]))
        if not node.data_is_var:
            node.note("the seed applied DoReFa's weight (tanh) form to this activation: "
                      "kept, as is_weight=True")
        return SeedMapped({"nbits": str(bits), "is_weight": "True"}, {})


METHOD = _DoReFa(
    keeps_weight_scale=False,
    name="dorefa", op="DoReFa", inputs=(), bits=(1, 16),
    qdq_reason="its levels are not an integer grid with zero point 0",
    seed_ops={"_contrib_DoReFa": ("data",), "Custom:DoReFa_PY": ("data",)},
    doc="tanh-normalized weights, clipped activations")
