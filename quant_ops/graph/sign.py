"""Which tensors of a graph can never be negative, from the ops alone.

An unsigned activation quantizer (a method whose descriptor says ``unsigned``) represents
[0, a] only: put on a tensor that can be negative (a network input, a linear bottleneck, a
pre-activation) it silently zeroes half of it.  The rewrite asks this module before it
places one; a tensor not proven non-negative gets the method's signed form or is refused.
"""
from __future__ import annotations

from .. import methods
from .ir import Graph, Node

#: ops whose output is >= 0 whatever their input
_ALWAYS = {"relu", "sigmoid", "softmax", "SoftmaxActivation", "SoftmaxOutput", "exp",
           "abs", "square", "sqrt", "norm"}
_ACT_NONNEG = {"relu", "sigmoid", "softrelu"}
#: ops whose output is >= 0 when every data input is
_KEEPS = {"Pooling", "Flatten", "flatten", "Reshape", "reshape", "transpose", "identity",
          "_copy", "Dropout", "expand_dims", "squeeze", "slice", "slice_axis", "SliceChannel",
          "split", "Concat", "concat", "elemwise_add", "_Plus", "_plus", "broadcast_add",
          "add_n", "ElementWiseSum", "elemwise_mul", "broadcast_mul", "_contrib_AdaptiveAvgPooling2D",
          "UpSampling", "Crop", "max", "mean", "sum", "BlockGrad", "stop_gradient"}


def _nonneg_op(n: Node, inputs_nonneg: list[bool]) -> bool:
    if n.op in _ALWAYS:
        return True
    if n.op == "Activation":
        return n.attrs.get("act_type") in _ACT_NONNEG
    if n.op == "clip":
        try:
            return float(n.attrs.get("a_min", "-1")) >= 0
        except ValueError:
            return False
    if n.op in ("_mul_scalar", "_div_scalar", "_plus_scalar", "_maximum_scalar"):
        try:
            scalar_nonneg = float(n.attrs.get("scalar", "-1")) >= 0
        except ValueError:
            return False
        if n.op == "_maximum_scalar":
            return scalar_nonneg
        return scalar_nonneg and all(inputs_nonneg)
    m = methods.of_op(n.op)
    if m is not None:  # a quantizer keeps the sign of what it reads, or clips negatives
        return inputs_nonneg[0] or (not m.is_weight(n.attrs) and m.unsigned(n.attrs))
    if n.op in _KEEPS:
        return bool(inputs_nonneg) and all(inputs_nonneg)
    if n.op == "LeakyReLU":
        return False
    return False


def nonnegative(graph: Graph) -> set[tuple[int, int]]:
    """(node, output) of every tensor proven >= 0 (variables never are: their values are
    data)."""
    known: set = set()
    for i, n in enumerate(graph.nodes):
        if n.is_var:
            continue
        data_inputs = n.inputs[:1] if methods.of_op(n.op) is not None else n.inputs
        if _nonneg_op(n, [(e[0], e[1]) in known for e in data_inputs]):
            known.update((i, k) for k in range(_outputs(n)))
    return known


def _outputs(n: Node) -> int:
    if n.op in ("SliceChannel", "split"):
        try:
            return int(n.attrs.get("num_outputs", "1"))
        except ValueError:
            return 1
    return 1

