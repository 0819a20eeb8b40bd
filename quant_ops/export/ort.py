"""onnxruntime as the reference engine: a session, the values at every
QuantizeLinear / DequantizeLinear of an exported model, and which layers its optimized
graph runs on integers."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def session(model, optimize: bool = False):
    """onnxruntime session.  Unoptimized by default: its QDQ fusions (QLinearConv...) compute
    in integers with requantization, a different arithmetic from the graph as written."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


#: operators of onnxruntime's optimized graphs that compute on integer codes
INTEGER_OPS = ("QLinear", "QGemm", "ConvInteger", "MatMulInteger", "DynamicQuantize")
#: the layers that, left in an optimized graph, compute in float
FLOAT_LAYERS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul",
                "ConvTranspose")


def kernel_summary(model: onnx.ModelProto) -> dict:
    """Of an optimized graph (``session(..., optimize=True)`` writes one with
    ``optimized_model_filepath``): operator counts, the number of integer operators, and
    the layers left in float, by name."""
    ops: dict = {}
    float_layers = []
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
        if n.op_type in FLOAT_LAYERS:
            float_layers.append(n.name or n.output[0])
    return {"integer_nodes": sum(v for k, v in ops.items() if k.startswith(INTEGER_OPS)),
            "float_layers": float_layers, "ops": ops}


def kernels(model_path: str | Path) -> dict:
    """``kernel_summary`` of the graph onnxruntime runs for ``model_path`` with all its
    optimizations on: whether the QDQ placement let it fuse integer kernels, and which
    layers fell back to float."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="ort_opt_") as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(Path(d) / "optimized.onnx")
        ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        return kernel_summary(onnx.load(so.optimized_model_filepath))


def quantize_points(model_path: str | Path, feeds: dict, optimize: bool = False) -> dict:
    """onnxruntime's float input and integer codes at every QuantizeLinear, by quantizer
    name: ``{name: (input, codes)}``.  The codes are read off the DequantizeLinear output
    (``y / scale`` is exact), which works for every code width numpy can't hold (int4)."""
    model = onnx.load(str(model_path))
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
             if t.data_type == TensorProto.FLOAT}
    wanted = {n.input[0] for n in qs} - {i.name for i in model.graph.input}
    vals = dict(feeds)
    vals.update({k: v for k, v in inits.items() if k in wanted})
    vals.update(_run_with_outputs(model, [w for w in wanted if w not in vals], feeds, optimize))
    deq = dequantized_outputs(model_path, feeds, optimize)
    # a quantizer whose dequantized values nothing reads (its layer reads the codes:
    # ``integer_layers``) is read at its QuantizeLinear: codes minus zero point, times scale
    bare = [n for n in qs if n.name[: -len("_quantize")] not in deq]
    zps = {t.name: t for t in model.graph.initializer}
    raw = _run_with_outputs(model, [n.output[0] for n in bare], feeds, optimize,
                            [zps[n.input[2]].data_type for n in bare])
    for n in bare:
        zp = numpy_helper.to_array(zps[n.input[2]]).astype(np.float32)
        scale = inits[n.input[1]]
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        codes = raw[n.output[0]].astype(np.float32)
        if scale.ndim:
            shape = [1] * codes.ndim
            shape[axis] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        deq[n.name[: -len("_quantize")]] = (codes - zp) * scale
    res = {}
    for n in qs:
        name = n.name[: -len("_quantize")]
        scale = inits[n.input[1]]
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        y = deq[name]
        if scale.ndim:
            shape = [1] * y.ndim
            shape[axis] = -1
            scale = scale.reshape(shape)
        with np.errstate(invalid="ignore", divide="ignore"):
            res[name] = (vals[n.input[0]], np.where(scale > 0, np.rint(y / np.where(
                scale > 0, scale, 1)), 0))
    return res


def _run_with_outputs(model: onnx.ModelProto, names: list, feeds: dict,
                      optimize: bool, types: list | None = None) -> dict:
    """Values of intermediate tensors (float unless ``types`` says), made graph outputs for
    one run."""
    if not names:
        return {}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for t, kind in zip(names, types or [TensorProto.FLOAT] * len(names)):
        if t not in have:
            m.graph.output.append(helper.make_tensor_value_info(t, kind, None))
    return dict(zip(names, session(m.SerializeToString(), optimize).run(names, feeds)))


def dequantized_outputs(model_path: str | Path, feeds: dict, optimize: bool = False) -> dict:
    """onnxruntime's output of every DequantizeLinear (named like its quantizer)."""
    model = onnx.load(str(model_path))
    names = [n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    return _run_with_outputs(model, names, feeds, optimize)
