"""ONNX export with QuantizeLinear/DequantizeLinear pairs (explicit quantization, as
TensorRT and onnxruntime run it), through MXNet's own exporter plus a converter for the
quantizers.

Activations: per-tensor int8, zero point 0, scale = amax / 127.  Weights: per-axis int8
(axis 0; 1 for Deconvolution), scale = max|w| / 127 per channel.  Bit widths without an
ONNX format are refused with the node named.
"""
from __future__ import annotations

import logging
from pathlib import Path

import mxnet as mx
import numpy as np
import onnx
from mxnet.onnx.mx2onnx._export_onnx import MXNetGraph
from mxnet.onnx.mx2onnx._op_translations._op_translations_opset12 import get_inputs
from onnx import TensorProto, helper, numpy_helper

from ..errors import QuantOpsError
from ..fileio import atomic_write_bytes
from .. import methods
from ..graph.ir import Graph
from ..graph.quantizers import quantizers
from ..graph.deploy import deploy_graph
from .integer_layers import float_layers_as_integer

log = logging.getLogger(__name__)
ACTIVATION_CODES = ("s8", "u8")
OPSETS = (13, 14, 15, 16, 17, 18, 19, 20, 21)
# (bits, signed) -> (ONNX element type of the codes, first opset that has it)
CODE_TYPES = {(8, True): (TensorProto.INT8, 10), (8, False): (TensorProto.UINT8, 10),
              (4, True): (TensorProto.INT4, 21), (4, False): (TensorProto.UINT4, 21)}


def qdq_form(op: str, attrs: dict, value) -> tuple[np.ndarray, bool, bool]:
    """(scale, signed, per_axis) of an exportable quantizer, from its range input's value
    (a range amax, a clip, a step: the descriptor's ``qdq`` says), in float32 as the
    kernels compute it."""
    m = methods.of_op(op)
    if m is None or not m.exportable:
        raise QuantOpsError(f"{op} has no QDQ form")
    f = m.qdq(attrs, value)
    return f.scale, f.signed, f.per_axis


def _convert_quantizer(node, **kwargs):
    """A quantizer -> QuantizeLinear + DequantizeLinear (output keeps the node name); a
    narrow signed one (codes down to -qmax) is clipped to [-qmax s, qmax s] first, where
    QuantizeLinear alone would saturate one code lower."""
    name, inputs, attrs = get_inputs(node, kwargs)
    m = methods.of_op(node["op"])
    value = kwargs["weights"][inputs[m.input_names.index(m.range_input)]]
    form = m.qdq(attrs, value)
    scale, signed, per_axis = form.scale, form.signed, form.per_axis
    init = kwargs["initializer"]
    nodes = []
    if form.narrow and signed and not per_axis:
        bound = np.float32(scale * np.float32(2 ** (m.nbits(attrs) - 1) - 1))
        init.append(numpy_helper.from_array(np.array(-bound, np.float32), f"{name}_clip_min"))
        init.append(numpy_helper.from_array(np.array(bound, np.float32), f"{name}_clip_max"))
        nodes.append(helper.make_node("Clip", [inputs[0], f"{name}_clip_min",
                                               f"{name}_clip_max"], [f"{name}_clipped"],
                                      name=f"{name}_clip"))
        inputs = [f"{name}_clipped"] + list(inputs[1:])
    init.append(numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"))
    code_type = CODE_TYPES[(m.nbits(attrs), signed)][0]
    init.append(helper.make_tensor(f"{name}_zero_point", code_type, list(scale.shape),
                                   [0] * max(scale.size, 1)))
    axis = {"axis": int(attrs.get("channel_axis", 0))} if per_axis else {}
    q = helper.make_node("QuantizeLinear", [inputs[0], f"{name}_scale", f"{name}_zero_point"],
                         [f"{name}_quantized"], name=f"{name}_quantize", **axis)
    dq = helper.make_node("DequantizeLinear",
                          [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"], [name],
                          name=name, **axis)
    return nodes + [q, dq]


def _register_converter(m: methods.Method) -> None:
    if m.exportable:
        for opset in OPSETS:
            MXNetGraph.register(m.op, opset)(_convert_quantizer)


methods.on_register(_register_converter)


def check_exportable(graph: Graph, params: dict | None = None, opset: int = 13) -> None:
    """Every quantizer has an ONNX QDQ format at this opset (8 bits; 4 bits from opset 21)
    and, given params, a range; otherwise name the node."""
    qs = quantizers(graph)
    empty = [q.name for q in qs if params is not None and not q.is_weight
             and q.range_var is not None and not q.method.input(q.method.range_input).learned
             and not float(np.max(params[q.range_var])) > 0]
    if empty:
        more = f" and {len(empty) - 3} more" if len(empty) > 3 else ""
        raise QuantOpsError(f"{graph.source}: activation quantizer(s) {', '.join(empty[:3])}"
                            f"{more} have no range (amax = 0): calibrate or fine-tune the "
                            "model before export")
    for q in qs:
        if not q.method.exportable:
            names = ", ".join(m.op for m in methods.REGISTRY.values() if m.exportable)
            raise QuantOpsError(f"{graph.source}: quantizer '{q.name}' ({q.node.op}) has no "
                                f"ONNX format: {q.method.qdq_reason} (QDQ export covers "
                                f"{names})")
        bits = q.bits
        if (bits, True) not in CODE_TYPES:
            raise QuantOpsError(
                f"{graph.source}: quantizer '{q.name}' is {bits}-bit: ONNX QDQ has 8 bits, "
                "and 4 bits from opset 21; no format holds this width")
        first = CODE_TYPES[(bits, True)][1]
        if opset < first:
            raise QuantOpsError(
                f"{graph.source}: quantizer '{q.name}' is {bits}-bit, which ONNX QDQ "
                f"has from opset {first}: export with opset >= {first}")
    for n in graph.nodes:
        if n.op.startswith("_contrib_") and methods.of_op(n.op[len("_contrib_"):]):
            raise QuantOpsError(f"{graph.source}: node '{n.name}' ({n.op}) has no export path")


def _prune_initializers(model: onnx.ModelProto) -> None:
    """Drop initializers nothing reads (quantizer state that only training uses), and list
    as graph inputs only the real inputs (MXNet's exporter lists every parameter too)."""
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    consts = {t.name for t in keep}
    inputs = [i for i in model.graph.input if i.name in used and i.name not in consts]
    del model.graph.input[:]
    model.graph.input.extend(inputs)


def activations_as_uint8(model: onnx.ModelProto) -> int:
    """Rewrite every 8-bit activation QDQ pair as uint8 with zero point 128 and the same
    scale; returns how many.  uint8 codes ``clamp(round(x/s) + 128, 0, 255)`` dequantize to
    exactly the values of int8's ``clamp(round(x/s), -128, 127)`` (bit-identical), and
    onnxruntime runs U8S8 integer kernels on them, its fast path on x86, where S8S8 is
    slower than float.  (uint8 with zero point 0 on non-negative tensors would saturate at
    255 s, not 127 s: other values wherever the calibrated range clips.)  Weights stay int8."""
    inits = {t.name: t for t in model.graph.initializer}
    done = 0
    for n in model.graph.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in inits:
            continue
        zp = inits.get(n.input[2]) if len(n.input) > 2 else None
        if zp is None or zp.data_type != TensorProto.INT8:
            continue
        codes = numpy_helper.to_array(zp).astype(np.int16) + 128
        zp.CopyFrom(numpy_helper.from_array(codes.astype(np.uint8), zp.name))
        done += 1
    return done


def _wiring(g) -> tuple:
    """(initializers by name, producer of each tensor, consumers of each tensor, the graph
    outputs) of an ONNX graph."""
    inits = {t.name: t for t in g.initializer}
    made_by = {o: n for n in g.node for o in n.output}
    used_by: dict = {}
    for n in g.node:
        for i in n.input:
            used_by.setdefault(i, []).append(n)
    return inits, made_by, used_by, {o.name for o in g.output}


#: ops a layer's output may pass on its way to the next quantizer without changing which
#: code it gets: elementwise non-decreasing maps that keep the grid (Relu, a Clip with
#: constant bounds), a max over values (MaxPool) and value-preserving reshapes
_MONOTONE = ("Relu", "Clip", "MaxPool", "Flatten", "Reshape")
_FUSABLE = ("Conv", "Gemm", "MatMul", "ConvTranspose", "Add")


def quantize_layer_outputs(model: onnx.ModelProto) -> list[str]:
    """Give each layer (Conv, Gemm, MatMul, Add) whose inputs are dequantized an output
    QuantizeLinear/DequantizeLinear pair with the scale and zero point of the quantizer its
    output reaches, when it reaches only such quantizers (all with the same parameters)
    through the ops of ``_MONOTONE``; returns the layers.

    The values do not change: rounding and saturation are non-decreasing, so
    ``Q(f(DQ(Q(y)))) = Q(f(y))`` for each such ``f``.  What changes is that onnxruntime
    now sees DQ -> layer -> Q, which it runs as one integer kernel (QLinearConv,
    QLinearAdd...)."""
    g = model.graph
    inits, made_by, used_by, outputs = _wiring(g)

    def reaches(tensor: str) -> list | None:
        """The QuantizeLinear nodes ``tensor`` reaches through monotone ops, or None."""
        qs, todo = [], [tensor]
        while todo:
            t = todo.pop()
            if t in outputs or not used_by.get(t):
                return None
            for c in used_by[t]:
                if c.op_type == "QuantizeLinear" and c.input[0] == t:
                    qs.append(c)
                elif c.op_type in _MONOTONE and c.input[0] == t \
                        and all(i in inits for i in c.input[1:] if i):
                    todo.append(c.output[0])
                else:
                    return None
        return qs

    def params_of(q) -> tuple:
        return tuple(numpy_helper.to_array(inits[i]).tobytes() + bytes([inits[i].data_type])
                     for i in q.input[1:3])

    done, new_nodes = [], []
    for n in g.node:
        if n.op_type not in _FUSABLE or len(n.input) < 2 \
                or any(made_by.get(i) is None or made_by[i].op_type != "DequantizeLinear"
                       for i in n.input[:2]):
            continue
        qs = reaches(n.output[0])
        if not qs or any(inits[q.input[1]].dims for q in qs) \
                or len({params_of(q) for q in qs}) != 1:
            continue
        y, name = n.output[0], f"{n.name or n.output[0]}_outq"
        for c in used_by[y]:
            c.input[:] = [f"{name}" if i == y else i for i in c.input]
        scale, zero = qs[0].input[1], qs[0].input[2]
        new_nodes.append((n, [
            helper.make_node("QuantizeLinear", [y, scale, zero], [f"{name}_quantized"],
                             name=f"{name}_quantize"),
            helper.make_node("DequantizeLinear", [f"{name}_quantized", scale, zero], [name],
                             name=name)]))
        done.append(n.name)
    for n, pair in new_nodes:       # keep the node list in topological order
        at = list(g.node).index(n) + 1
        for k, node in enumerate(pair):
            g.node.insert(at + k, node)
    return done


def _uint8_zero_top(inits: dict, q) -> float | None:
    """The largest value of a per-tensor uint8 QuantizeLinear with zero point 0, else None."""
    if q.op_type != "QuantizeLinear" or len(q.input) < 3:
        return None
    scale, zp = inits.get(q.input[1]), inits.get(q.input[2])
    if scale is None or zp is None \
            or zp.data_type != TensorProto.UINT8 or len(zp.dims) or len(scale.dims) \
            or int(numpy_helper.to_array(zp)) != 0:
        return None
    return float(np.float32(255) * numpy_helper.to_array(scale).astype(np.float32))


def _rectifier_fits(n, inits: dict, top: float) -> bool:
    """A Relu, or a Clip with constant bounds [0, M] and M >= ``top`` (the largest value its
    quantizers give): then the quantizers alone give the same codes."""
    if n.op_type == "Relu":
        return True
    lo_name, hi_name = (list(n.input[1:3]) + ["", ""])[:2]   # opset >= 11: bounds are inputs
    if lo_name not in inits or (hi_name and hi_name not in inits):
        return False
    lo = float(numpy_helper.to_array(inits[lo_name]))
    return lo == 0.0 and (not hi_name or top <= float(numpy_helper.to_array(inits[hi_name])))


def drop_rectifiers_before_unsigned(model: onnx.ModelProto) -> list[str]:
    """Remove each Relu, or Clip with bounds [0, M], whose output goes only to uint8
    quantizers with zero point 0 (all saturating at or below M); returns their names.

    Exact: such a quantizer maps every negative value to code 0 and saturates at 255 s <= M,
    so it gives the same codes with or without the rectifier.  The layer before then feeds
    its quantizer directly, which onnxruntime runs as one integer kernel (a rectifier left
    between a DequantizeLinear and a QuantizeLinear otherwise stays a float pair)."""
    g = model.graph
    inits, _, used_by, outputs = _wiring(g)
    done = []
    for n in list(g.node):
        if n.op_type not in ("Relu", "Clip") or n.output[0] in outputs:
            continue
        consumers = used_by.get(n.output[0], [])
        tops = [_uint8_zero_top(inits, c) for c in consumers]
        if not consumers or None in tops or any(c.input[0] != n.output[0] for c in consumers) \
                or not _rectifier_fits(n, inits, max(tops)):
            continue
        for c in consumers:
            c.input[0] = n.input[0]
        g.node.remove(n)
        done.append(n.name)
    return done


def rectifiers_as_lookups(model: onnx.ModelProto) -> list[str]:
    """Turn each Relu, or Clip with bounds [0, M], that reads a uint8 DequantizeLinear and
    feeds only uint8 QuantizeLinear nodes into LeakyRelu with alpha 0; returns their names.

    onnxruntime has no quantized Relu or Clip for zero point 128 (it drops them only before
    a zero point of 0), so they stay float between a DQ and a Q; a LeakyRelu there becomes
    one QLinearLeakyRelu (a 256-entry table on the codes).  (One that feeds only zero-point-0
    quantizers is gone already: ``drop_rectifiers_before_unsigned``.)  The values are the
    same: max(x, 0) with the sign of zero aside, which no quantizer sees; a Clip's upper
    bound M is dropped only where every quantizer it feeds saturates at or below it
    (127 x scale <= M for zero point 128)."""
    g = model.graph
    inits, made_by, used_by, outputs = _wiring(g)

    def const(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(inits[name]) if name in inits else None

    def u8_top(q) -> float | None:
        """The largest value a uint8 quantizer gives, or None for any other quantizer."""
        zp, scale = (const(q.input[2]) if len(q.input) > 2 else None), const(q.input[1])
        if zp is None or scale is None or zp.dtype != np.uint8 or zp.size != 1 \
                or scale.size != 1:
            return None
        return float((255 - int(zp.reshape(-1)[0])) * np.float32(scale.reshape(-1)[0]))

    done = []
    for n in g.node:
        src = made_by.get(n.input[0]) if n.input else None
        if n.op_type not in ("Relu", "Clip") or src is None \
                or src.op_type != "DequantizeLinear" or n.output[0] in outputs:
            continue
        zp = const(src.input[2]) if len(src.input) > 2 else None
        consumers = used_by.get(n.output[0], [])
        tops = [u8_top(c) if c.op_type == "QuantizeLinear" else None for c in consumers]
        if zp is None or zp.dtype != np.uint8 or not consumers or None in tops:
            continue
        if not _rectifier_fits(n, inits, max(tops)):
            continue
        del n.input[1:]
        n.op_type = "LeakyRelu"
        n.ClearField("attribute")
        n.attribute.append(helper.make_attribute("alpha", 0.0))
        done.append(n.name)
    return done


def export_onnx(graph: Graph, params: dict, path: str | Path,
                input_shapes: dict | None = None, opset: int = 13,
                deploy: bool = True, activations: str = "s8") -> tuple[Path, Graph, dict]:
    """Write ``path`` (.onnx) atomically; returns it with the deployment graph and params
    that MXNet runs to match it.  ``input_shapes`` maps input names to shapes;
    ``activations`` "s8" (as the quantizers are: TensorRT's int8, and uint8 for unsigned
    ones) or "u8" (``activations_as_uint8``, ``drop_rectifiers_before_unsigned``,
    ``quantize_layer_outputs``, ``rectifiers_as_lookups`` and
    ``integer_layers.float_layers_as_integer``: the same quantized values, laid out for
    onnxruntime's integer kernels on CPUs)."""
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) \
            or opset not in OPSETS:
        raise QuantOpsError(f"opset {opset!r} is not supported (use one of the integers "
                            f"{OPSETS[0]}..{OPSETS[-1]})")
    if activations not in ACTIVATION_CODES:
        raise QuantOpsError(f"activations {activations!r}: use one of "
                            f"{', '.join(ACTIVATION_CODES)}")
    input_shapes = input_shapes or {"data": (1, 3, 224, 224)}
    check_exportable(graph, None, opset)  # formats first: name the node before any work
    if deploy:
        graph, params = deploy_graph(graph, params)
    check_exportable(graph, params, opset)
    sym = graph.to_symbol()
    unknown = [n for n in input_shapes if n not in sym.list_arguments()]
    if unknown:
        raise QuantOpsError(f"inputs {unknown} are not inputs of the graph")
    nd_params = {k: mx.nd.array(v) for k, v in params.items()
                 if k in set(sym.list_arguments()) | set(sym.list_auxiliary_states())}
    try:
        proto = MXNetGraph().create_onnx_graph_proto(
            sym, nd_params, list(input_shapes.values()),
            [TensorProto.FLOAT] * len(input_shapes), opset_version=opset)
    except (AssertionError, AttributeError, KeyError, NotImplementedError, ValueError) as e:
        op = str(e).rsplit(" ", 2)[-2] if "No conversion function" in str(e) else None
        where = [n.name for n in graph.nodes if n.op == op][:3] if op else []
        raise QuantOpsError(f"{graph.source}: ONNX export failed"
                            f"{' at node ' + ', '.join(where) if where else ''}: {e}") from None
    model = helper.make_model(proto, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="quant_ops")
    model.ir_version = 8  # what onnxruntime and TensorRT 8.x read
    _prune_initializers(model)
    if activations == "u8":
        activations_as_uint8(model)
        drop_rectifiers_before_unsigned(model)
        quantize_layer_outputs(model)
        rectifiers_as_lookups(model)
        float_layers_as_integer(model)
    onnx.checker.check_model(model)
    p = atomic_write_bytes(path, model.SerializeToString())
    return p, graph, params


def activation_ranges(graph: Graph, params: dict) -> dict:
    """{tensor name in the exported ONNX graph: amax} for every 8-bit activation quantizer
    whose range is calibrated state (TensorRT's implicit INT8 has no other width): the
    tensor a quantizer reads keeps its producer's name in the export."""
    ranges = {}
    for q in quantizers(graph):
        if q.is_weight or q.bits != 8 or q.range_var is None \
                or q.method.input(q.method.range_input).learned:
            continue
        src = graph.nodes[q.node.inputs[0][0]]
        out = q.node.inputs[0][1]
        tensor = src.name if src.is_var or out == 0 else f"{src.name}{out}"
        ranges[tensor] = float(np.asarray(params[q.range_var]).reshape(-1)[0])
    return ranges
