"""Layers whose output stays in float (a classifier: nothing quantizes its output) as
integer matrix products in the ONNX export for CPU runtimes.

onnxruntime fuses DequantizeLinear -> Gemm/Conv -> QuantizeLinear into one integer kernel
(QGemm, QLinearConv), but without the QuantizeLinear after it the layer stays a float
GEMM that dequantizes its whole weight at every call: on MobileNet-v2 at batch 32 the
1280x1000 classifier alone costs more than the convolutions gain.  Here such a layer reads
the codes directly: ``MatMulInteger(x_codes, w_codes) -> Cast -> Mul(s_x s_w) -> Add(b)``.
The sums are the same products summed exactly in int32, scaled once; the float output
differs from the float GEMM's only by where float32 rounds (as two float GEMMs summing in
different orders do).  No quantizer changes, so the alignment check's codes are unchanged.

Convolutions are left alone except a 1x1 convolution on a 1x1 map (gluoncv writes some
classifiers that way): onnxruntime's ConvInteger is slower than its float convolution.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _attr(node, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _const(inits: dict, name: str) -> np.ndarray | None:
    return numpy_helper.to_array(inits[name]) if name in inits else None


class _Wiring:
    """Producers, consumers, initializers and static shapes of an ONNX graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        from .onnx_qdq import _wiring    # (onnx_qdq imports this module)

        self.inits, self.made_by, self.used_by, self.outputs = _wiring(model.graph)
        inferred = onnx.shape_inference.infer_shapes(model)
        self.shapes = {}
        for v in list(inferred.graph.value_info) + list(inferred.graph.input):
            dims = v.type.tensor_type.shape.dim
            if all(d.HasField("dim_value") for d in dims):
                self.shapes[v.name] = tuple(d.dim_value for d in dims)

    def one_by_one(self, tensor: str) -> bool:
        """Whether ``tensor`` is a 4-d map of 1x1: by shape inference, or as the dequantized
        codes of a global pooling's output (export leaves the batch dimension open)."""
        shape = self.shapes.get(tensor)
        if shape is not None:
            return len(shape) == 4 and shape[2:] == (1, 1)
        dq = self.made_by.get(tensor)
        q = self.made_by.get(dq.input[0]) if dq is not None else None
        src = self.made_by.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" \
            else None
        return src is not None and src.op_type in ("GlobalAveragePool", "GlobalMaxPool")

    def dequantized(self, tensor: str):
        """The DequantizeLinear behind ``tensor``, looking through one Flatten (a value-only
        reshape), as (dq node, flatten node or None); None if there is none."""
        src = self.made_by.get(tensor)
        flat = None
        if src is not None and src.op_type == "Flatten":
            flat, src = src, self.made_by.get(src.input[0])
        if src is None or src.op_type != "DequantizeLinear":
            return None
        return src, flat


def _code_type(w: _Wiring, dq) -> int | None:
    """The ONNX element type of a DequantizeLinear's codes (its zero point's), or None.
    (Not numpy's dtype: onnx reads int4/uint4 zero points as int8/uint8 arrays.)"""
    zp = w.inits.get(dq.input[2]) if len(dq.input) > 2 else None
    return None if zp is None else zp.data_type


def _per_tensor_codes(w: _Wiring, dq) -> bool:
    """A per-tensor 8-bit activation DequantizeLinear with constant scale and zero point."""
    scale = _const(w.inits, dq.input[1])
    zp = _const(w.inits, dq.input[2]) if len(dq.input) > 2 else None
    return scale is not None and scale.size == 1 and zp is not None and zp.size == 1 \
        and _code_type(w, dq) in (TensorProto.UINT8, TensorProto.INT8) \
        and dq.input[0] not in w.inits


def _weight_scales(w: _Wiring, dq, out_axis: int, n_out: int) -> np.ndarray | None:
    """The per-output-channel scales of a weight DequantizeLinear with int8 codes and zero
    point 0, scaled along ``out_axis`` (or per tensor); None if it is not such a weight."""
    scale = _const(w.inits, dq.input[1])
    zp = _const(w.inits, dq.input[2]) if len(dq.input) > 2 else None
    if scale is None or zp is None or _code_type(w, dq) != TensorProto.INT8 or np.any(zp != 0):
        return None
    src = w.made_by.get(dq.input[0])
    if dq.input[0] not in w.inits and not (src is not None and src.op_type == "QuantizeLinear"
                                           and src.input[0] in w.inits):
        return None
    if scale.size == 1:
        return np.full(n_out, scale.reshape(-1)[0], np.float32)
    if scale.size != n_out or _attr(dq, "axis", 1) != out_axis:
        return None
    return scale.astype(np.float32)


def _plan(w: _Wiring, n) -> dict | None:
    """How to rewrite layer ``n`` (a Gemm, or a 1x1 Conv on a 1x1 map), or None."""
    if len(n.input) < 2 or any(c.op_type == "QuantizeLinear"
                               for c in w.used_by.get(n.output[0], [])):
        return None
    x = w.dequantized(n.input[0])
    wdq = w.made_by.get(n.input[1])
    if x is None or wdq is None or wdq.op_type != "DequantizeLinear" \
            or not _per_tensor_codes(w, x[0]):
        return None
    bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
    if bias is not None and bias not in w.inits:
        return None
    wshape = w.shapes.get(wdq.output[0]) or w.shapes.get(wdq.input[0])
    if wshape is None:
        src = w.made_by.get(wdq.input[0])
        name = src.input[0] if src is not None else wdq.input[0]
        wshape = tuple(w.inits[name].dims) if name in w.inits else None
    if wshape is None:
        return None
    if n.op_type == "Gemm":
        if _attr(n, "transA", 0) or _attr(n, "alpha", 1.0) != 1.0 \
                or _attr(n, "beta", 1.0) != 1.0 or len(wshape) != 2:
            return None
        trans_b = bool(_attr(n, "transB", 0))
        n_out = wshape[0] if trans_b else wshape[1]
        out_axis = 0 if trans_b else 1
        reshape_to = None
    elif n.op_type == "Conv":
        if x[1] is not None or not w.one_by_one(n.input[0]) \
                or len(wshape) != 4 or wshape[2:] != (1, 1) or _attr(n, "group", 1) != 1 \
                or any(_attr(n, "pads", [0])) \
                or _attr(n, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return None
        trans_b, n_out, out_axis = True, wshape[0], 0
        reshape_to = (0, wshape[0], 1, 1)
    else:
        return None
    scales = _weight_scales(w, wdq, out_axis, n_out)
    if scales is None:
        return None
    b = _const(w.inits, bias) if bias else None
    if b is not None and b.size != n_out:
        return None
    return {"x": x, "wdq": wdq, "trans_b": trans_b, "scales": scales, "bias": bias,
            "reshape_to": reshape_to, "n_out": n_out, "weight_2d": len(wshape) == 2}


def float_layers_as_integer(model: onnx.ModelProto) -> list[str]:
    """Rewrite each Gemm (and 1x1 Conv on a 1x1 map) that reads dequantized codes and feeds
    no QuantizeLinear as ``MatMulInteger -> Cast -> Mul -> Add``; returns their names."""
    w = _Wiring(model)
    g = model.graph
    done, replace = [], {}
    for n in g.node:
        if n.op_type not in ("Gemm", "Conv"):
            continue
        plan = _plan(w, n)
        if plan is None:
            continue
        name = n.name or n.output[0]
        dq, flat = plan["x"]
        x_codes, new, inits = dq.input[0], [], []
        if flat is not None or plan["reshape_to"] is not None:
            axis = _attr(flat, "axis", 1) if flat is not None else 1
            new.append(helper.make_node("Flatten", [x_codes], [f"{name}_codes_2d"],
                                        name=f"{name}_codes_flatten", axis=axis))
            x_codes = f"{name}_codes_2d"
        b_codes = plan["wdq"].input[0]
        if not plan["weight_2d"]:
            inits.append(numpy_helper.from_array(np.array([plan["n_out"], -1], np.int64),
                                                 f"{name}_weight_2d_shape"))
            new.append(helper.make_node("Reshape", [b_codes, f"{name}_weight_2d_shape"],
                                        [f"{name}_weight_codes_2d"], name=f"{name}_weight_2d"))
            b_codes = f"{name}_weight_codes_2d"
        if plan["trans_b"]:
            new.append(helper.make_node("Transpose", [b_codes], [f"{name}_weight_codes_t"],
                                        name=f"{name}_weight_t", perm=[1, 0]))
            b_codes = f"{name}_weight_codes_t"
        sx = np.float32(_const(w.inits, dq.input[1]).reshape(-1)[0])
        inits.append(numpy_helper.from_array((plan["scales"] * sx).astype(np.float32),
                                             f"{name}_product_scale"))
        new += [helper.make_node("MatMulInteger", [x_codes, b_codes, dq.input[2]],
                                 [f"{name}_int32"], name=f"{name}_integer"),
                helper.make_node("Cast", [f"{name}_int32"], [f"{name}_sums"],
                                 name=f"{name}_cast", to=TensorProto.FLOAT)]
        y = f"{name}_scaled"
        new.append(helper.make_node("Mul", [f"{name}_sums", f"{name}_product_scale"], [y],
                                    name=f"{name}_scale"))
        if plan["bias"] is not None:
            new.append(helper.make_node("Add", [y, plan["bias"]], [f"{name}_biased"],
                                        name=f"{name}_bias"))
            y = f"{name}_biased"
        if plan["reshape_to"] is not None:
            inits.append(numpy_helper.from_array(np.array(plan["reshape_to"], np.int64),
                                                 f"{name}_out_shape"))
            new.append(helper.make_node("Reshape", [y, f"{name}_out_shape"], [n.output[0]],
                                        name=f"{name}_out"))
        else:
            new[-1].output[0] = n.output[0]
        replace[id(n)] = new
        g.initializer.extend(inits)
        done.append(name)
    if not done:
        return done
    nodes = []
    for n in g.node:
        nodes.extend(replace.get(id(n), [n]))
    # the DequantizeLinear nodes (and Flattens of dequantized values) nothing reads now
    while True:
        read = {i for n in nodes for i in n.input} | w.outputs
        dead = [n for n in nodes if n.op_type in ("DequantizeLinear", "Flatten")
                and not any(o in read for o in n.output)]
        if not dead:
            break
        nodes = [n for n in nodes if all(n is not d for d in dead)]
    del g.node[:]
    g.node.extend(nodes)
    return done
