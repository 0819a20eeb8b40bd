"""Test oracle: ONNX QuantizeLinear -> DequantizeLinear run by onnxruntime, the reference
that simulated quantization must equal bit for bit."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper


def ort_qdq(x: np.ndarray, scale, axis: int | None = None, opset: int = 13,
            unsigned: bool = False) -> np.ndarray:
    """dequant(quant(x)) with int8 zero point 0 (uint8 when ``unsigned``); per-axis when
    ``axis`` is given."""
    scale = np.asarray(scale, dtype=np.float32)
    shp = list(scale.shape)
    xi = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))
    yi = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))
    s = helper.make_tensor("s", TensorProto.FLOAT, shp, scale.ravel().tolist())
    z = helper.make_tensor("z", TensorProto.UINT8 if unsigned else TensorProto.INT8, shp,
                           [0] * scale.size)
    kw = {} if axis is None else {"axis": axis}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **kw),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **kw)]
    model = helper.make_model(helper.make_graph(nodes, "qdq", [xi], [yi], [s, z]),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": np.ascontiguousarray(x, dtype=np.float32)})[0]
