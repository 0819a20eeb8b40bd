"""DoReFa (arXiv 1606.06160): tanh-normalized weights on [-1, 1], activations clipped to
[0, 1]; nothing learned, no state."""
from __future__ import annotations

from .base import Method


class _DoReFa(Method):
    def unsigned(self, attrs):
        return True


METHOD = _DoReFa(
    name="dorefa", op="DoReFa", inputs=(), bits=(1, 16),
    qdq_reason="its levels are not an integer grid with zero point 0",
    doc="tanh-normalized weights, clipped activations")
