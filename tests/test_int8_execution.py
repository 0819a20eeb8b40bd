"""Real INT8 execution: MXNet's native INT8 graph from a calibrated model, and the uint8
ONNX export for onnxruntime's integer kernels (same values as the int8 export)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
import onnx
import pytest

from quant_ops import QuantizedModel, QuantOpsError
from quant_ops.datasets import load_data
from quant_ops.export.onnx_qdq import export_onnx, quantize_layer_outputs
from quant_ops.export.ort import dequantized_outputs, kernels, quantize_points, session

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "examples" / "models"


def _bundled(name: str, policy: str, n_test: int = 2000):
    meta = json.loads((MODELS / f"{name}.json").read_text())["normalize"]
    norm = ((meta["mean"],), (meta["std"],))
    cal = load_data("fmnist", (1, 1, 28, 28), split="train", normalize=norm, limit=256,
                    progress=False)
    test = load_data("fmnist", (1, 1, 28, 28), split="test", normalize=norm, limit=n_test,
                     progress=False)
    q = QuantizedModel.load(MODELS / name).quantize(policy, fold_bn="deploy")
    q.calibrate(cal.x, "entropy", progress=False)
    return q, cal.x, test.x, test.y


@pytest.fixture(scope="module")
def resnet20():
    return _bundled("fmnist_resnet20", "trt_int8_shared")


def _predict(native, x) -> np.ndarray:
    blk = native.block()
    return np.concatenate([blk(mx.nd.array(x[i:i + 500])).asnumpy()
                           for i in range(0, len(x), 500)])


def test_native_int8_agrees_with_the_simulation(resnet20):
    q, cal, x, y = resnet20
    native = q.to_mxnet_int8(cal)
    sim = q.predict(x).argmax(1)
    got = _predict(native, x).argmax(1)
    assert (got == sim).mean() >= 0.985          # top-1 agreement (bench: 99.3% on 10k)
    assert abs((got == y).mean() - (sim == y).mean()) <= 0.005
    assert native.report["from_model"] and not native.report["excluded"]
    assert native.report["weights"] == "channel-wise"
    ops = {n["op"] for n in json.loads(native.symbol.tojson())["nodes"]}
    assert "_sg_mkldnn_conv" in ops and not any(o.startswith("Quantization") for o in ops)


def test_native_int8_needs_data_for_tensors_the_model_keeps_in_float(resnet20):
    q, cal, _, _ = resnet20
    with pytest.raises(QuantOpsError, match=r"also quantizes \d+ tensor\(s\) this model "
                                            r"keeps in float .*pass `data`"):
        q.to_mxnet_int8()
    with pytest.raises(QuantOpsError, match="do not fit the model"):
        q.to_mxnet_int8(np.zeros((4, 3, 28, 28), np.float32))


def test_saved_native_int8_runs_in_a_stock_mxnet(resnet20, tmp_path):
    q, cal, x, _ = resnet20
    native = q.to_mxnet_int8(cal)
    native.save(tmp_path / "m")
    np.save(tmp_path / "x.npy", x[:64])
    code = f"""
import sys, numpy as np, mxnet as mx
sym, args, aux = mx.model.load_checkpoint({str(tmp_path / 'm')!r}, 0)
blk = mx.gluon.SymbolBlock(sym, [mx.sym.var("data")])
for k, v in {{**args, **aux}}.items():
    blk.collect_params()[k]._load_init(v, mx.cpu(), cast_dtype=True, dtype_source="saved")
np.save({str(tmp_path / 'y.npy')!r}, blk(mx.nd.array(np.load({str(tmp_path / 'x.npy')!r}))).asnumpy())
assert not [m for m in sys.modules if m.startswith("quant_ops")]
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path,
                   env={"MXNET_SUBGRAPH_VERBOSE": "0", "PATH": "/usr/bin:/bin"})
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), _predict(native, x[:64]))


def test_layers_the_policy_skips_stay_float_in_mxnet(resnet20):
    _, cal, x, _ = resnet20
    q = QuantizedModel.load(MODELS / "fmnist_resnet20").quantize(
        {"preset": "trt_int8_shared", "skip": {"first_layer": True}}, fold_bn="deploy")
    q.calibrate(cal, "entropy", progress=False)
    native = q.to_mxnet_int8(cal)
    assert len(native.report["excluded"]) == 1
    assert (_predict(native, x[:500]).argmax(1) == q.predict(x[:500]).argmax(1)).mean() > 0.98


def test_export_with_mxnet_int8_is_all_or_none(resnet20, tmp_path):
    q, cal, _, _ = resnet20
    ex = q.export(tmp_path / "ok", input_shape=(1, 1, 28, 28), mxnet_int8=True, data=cal[:64])
    names = sorted(p.name for p in (tmp_path / "ok").iterdir())
    assert f"{q.name}-int8-symbol.json" in names and f"{q.name}-int8-0000.params" in names
    assert ex.alignment["identical_all"] == 1.0
    with pytest.raises(QuantOpsError, match="pass `data`"):
        q.export(tmp_path / "none", input_shape=(1, 1, 28, 28), mxnet_int8=True)
    assert not (tmp_path / "none").exists()


# -- the uint8 export -------------------------------------------------------------------------

@pytest.mark.parametrize("name, policy", [("fmnist_resnet20", "trt_int8"),
                                          ("fmnist_mobilenetv2", "trt_int8_shared")])
def test_u8_export_dequantizes_to_the_int8_exports_values(name, policy, tmp_path):
    """At every quantizer of the int8 export the uint8 export gives the same codes (and
    the same floats wherever both dequantize), on inputs far outside the calibrated range
    (saturation included); the classifier, which reads the codes in the uint8 export
    (MatMulInteger), gives the same logits up to float32 rounding."""
    q, _, x, _ = _bundled(name, policy, n_test=16)
    x = np.concatenate([x, 4 * x]).astype(np.float32)
    s8, _, _ = export_onnx(q.run_graph, q.params, tmp_path / "s8.onnx", {"data": x.shape})
    u8, _, _ = export_onnx(q.run_graph, q.params, tmp_path / "u8.onnx", {"data": x.shape},
                           activations="u8")
    ca, cb = quantize_points(s8, {"data": x}), quantize_points(u8, {"data": x})
    assert ca and set(ca) <= set(cb)         # u8 adds layer-output quantizers
    for k in ca:
        np.testing.assert_array_equal(ca[k][1], cb[k][1], err_msg=k)
    a = dequantized_outputs(s8, {"data": x})
    b = dequantized_outputs(u8, {"data": x})
    assert len(set(a) & set(b)) >= len(a) - 2            # the classifier's input and weight
    for k in set(a) & set(b):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert np.abs(a["data_int8"]).max() < np.abs(x).max()      # the input range clips
    ya = session(s8).run(None, {"data": x})[0]
    yb = session(u8).run(None, {"data": x})[0]
    np.testing.assert_allclose(yb, ya, rtol=0, atol=1e-5 * np.abs(ya).max())
    zps = [t for t in onnx.load(str(u8)).graph.initializer if t.name.endswith("_zero_point")
           and t.data_type == onnx.TensorProto.UINT8]
    assert zps and all(onnx.numpy_helper.to_array(t).max() == 128 for t in zps)


# MobileNet's last conv feeds the float classifier (pooled), no quantizer: it stays float
@pytest.mark.parametrize("name, convs", [("fmnist_resnet20", 21), ("fmnist_mobilenetv2", 24)])
def test_u8_export_runs_every_conv_and_rectifier_as_an_integer_kernel(name, convs, tmp_path):
    """With residual-add inputs quantized (trt_int8_shared), onnxruntime's optimized u8
    model has no float convolution left, and no ReLU or ReLU6 between a DQ and a Q: they
    run as QLinearLeakyRelu tables."""
    import onnxruntime as ort

    q, _, x, _ = _bundled(name, "trt_int8_shared", n_test=8)
    u8, _, _ = export_onnx(q.run_graph, q.params, tmp_path / "u8.onnx", {"data": (8, 1, 28, 28)},
                           activations="u8")
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(u8), so, providers=["CPUExecutionProvider"])
    nodes = onnx.load(str(tmp_path / "opt.onnx")).graph.node
    ops = [n.op_type for n in nodes]
    assert ops.count("QLinearConv") == convs and "Conv" not in ops
    assert ops.count("FusedConv") == (name == "fmnist_mobilenetv2")
    assert ops.count("QLinearLeakyRelu") >= 8
    quantized = {o for n in nodes if n.op_type == "QuantizeLinear" for o in n.input[:1]}
    assert not [n.name for n in nodes if n.op_type in ("Relu", "Clip")
                and n.output[0] in quantized]        # no float rectifier before a Q


def test_layer_output_quantizers_keep_values_through_relu6_and_maxpool(tmp_path):
    """Q(f(DQ(Q(y)))) = Q(f(y)) for the monotone ops the pass looks through."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (4, 2, 3, 3)).astype(np.float32)
    init = [numpy_helper.from_array(np.float32(0.05), "s"),
            numpy_helper.from_array(np.uint8(128), "z"),
            numpy_helper.from_array(np.full(4, 0.02, np.float32), "ws"),
            numpy_helper.from_array(np.zeros(4, np.int8), "wz"),
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.float32(0.0), "lo"),
            numpy_helper.from_array(np.float32(6.0), "hi")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("QuantizeLinear", ["w", "ws", "wz"], ["wq"], axis=0),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["y", "lo", "hi"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2]),
             helper.make_node("QuantizeLinear", ["p", "s", "z"], ["pq"]),
             helper.make_node("DequantizeLinear", ["pq", "s", "z"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 2, 6, 6])], [helper.make_tensor_value_info(
            "out", TensorProto.FLOAT, None)], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    before = model.SerializeToString()
    assert quantize_layer_outputs(model) == ["conv"]
    x = rng.normal(0, 4, (1, 2, 6, 6)).astype(np.float32)
    a = session(before).run(None, {"x": x})[0]
    b = session(model.SerializeToString()).run(None, {"x": x})[0]
    assert np.abs(a).max() == pytest.approx(6.0, abs=0.05)   # the clip and saturation bite
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("scale, dropped", [(6.0 / 255, True), (0.03, False)])
def test_rectifiers_before_unsigned_quantizers_go_without_changing_a_code(scale, dropped):
    """A Relu, or a Clip [0, 6], that feeds only uint8 zero-point-0 quantizers is removed
    when the quantizer saturates at or below the clip (255 s <= 6); the codes are the same
    on inputs far beyond the range.  A quantizer that reaches above 6 keeps the Clip."""
    from onnx import TensorProto, helper, numpy_helper

    from quant_ops.export.onnx_qdq import drop_rectifiers_before_unsigned

    init = [numpy_helper.from_array(np.float32(scale), "s"),
            numpy_helper.from_array(np.uint8(0), "z"),
            numpy_helper.from_array(np.float32(0.0), "lo"),
            numpy_helper.from_array(np.float32(6.0), "hi")]
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("QuantizeLinear", ["r", "s", "z"], ["rq"]),
             helper.make_node("DequantizeLinear", ["rq", "s", "z"], ["a"]),
             helper.make_node("Clip", ["x", "lo", "hi"], ["c"], name="relu6"),
             helper.make_node("QuantizeLinear", ["c", "s", "z"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "s", "z"], ["b"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [4096])], [helper.make_tensor_value_info(
            o, TensorProto.FLOAT, None) for o in ("a", "b")], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    before = model.SerializeToString()
    assert drop_rectifiers_before_unsigned(model) == (["relu", "relu6"] if dropped
                                                       else ["relu"])
    x = np.random.default_rng(0).normal(0, 8, 4096).astype(np.float32)
    want = session(before).run(None, {"x": x})
    got = session(model.SerializeToString()).run(None, {"x": x})
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w, g)
    assert want[1].max() == pytest.approx(min(6.0, 255 * scale), rel=1e-3)


def test_native_int8_takes_unsigned_learned_ranges_at_their_full_width(resnet20):
    """An unsigned 8-bit activation quantizer (PACT: scale alpha/255) gives MXNet the
    threshold alpha, not half of it (the first version read 127 codes: 91.4% against 93.9%
    simulated on these images)."""
    _, cal, x, y = resnet20
    q = QuantizedModel.load(MODELS / "fmnist_resnet20").quantize(
        {"preset": "trt_int8_shared", "activation": {"method": "pact", "bits": 8},
         "weight": {"method": "lsq", "bits": 8}}, fold_bn="deploy")
    q.calibrate(cal, "entropy", progress=False)
    native = q.to_mxnet_int8(cal)
    sim = q.predict(x).argmax(1)
    got = _predict(native, x).argmax(1)
    assert (got == sim).mean() >= 0.985
    assert (got == y).mean() >= (sim == y).mean() - 0.006


def test_adaround_lowers_each_layers_error_and_keeps_the_weight_scales(resnet20):
    """AdaRound at 4-bit weights: every layer's reconstruction error on the sample is at
    most the nearest rounding's, and the rounded weights sit on the grid of the scale the
    weight quantizer derives from them (max|W| per channel unchanged)."""
    from quant_ops.ptq.adaround import adaround

    _, cal, _, _ = resnet20
    q = QuantizedModel.load(MODELS / "fmnist_resnet20").quantize(
        {"preset": "trt_int8", "weight": {"bits": 4}}, fold_bn="deploy")
    q.calibrate(cal, "entropy", progress=False)
    new, rep = adaround(q.run_graph, q.params, [cal[:128]], iters=100, progress=False)
    assert rep["layers"] and all(r["mse_adaround"] <= r["mse_nearest"] for r in rep["layers"])
    assert any(r["kept_learned"] for r in rep["layers"])
    for r in rep["layers"]:
        w0, w = q.params[r["weight"]], new[r["weight"]]
        m0 = np.abs(w0).reshape(len(w0), -1).max(1)
        np.testing.assert_allclose(np.abs(w).reshape(len(w), -1).max(1), m0, rtol=1e-6)
        codes = w.reshape(len(w), -1) / (m0[:, None] / 7)
        np.testing.assert_allclose(codes, np.rint(codes), atol=1e-3)


# -- the CPU preset: unsigned activations ------------------------------------------------------

@pytest.mark.parametrize("name, convs", [("fmnist_resnet20", 21), ("fmnist_mobilenetv2", 25)])
def test_cpu_int8_runs_every_conv_in_integers_with_no_rectifier_left(name, convs, tmp_path):
    """cpu_int8: post-ReLU tensors are uint8 with zero point 0 in both exports, so
    onnxruntime folds every ReLU/ReLU6 into the layer before it (no float rectifier and no
    lookup table left), and it computes what the simulation computes."""
    q, _, x, _ = _bundled(name, "cpu_int8", n_test=200)
    s8, _, _ = export_onnx(q.run_graph, q.params, tmp_path / "s8.onnx", {"data": (1, 1, 28, 28)})
    zps = {t.name: t for t in onnx.load(str(s8)).graph.initializer
           if t.name.endswith("_zero_point")}
    assert any(t.data_type == onnx.TensorProto.UINT8 for t in zps.values())
    assert all(onnx.numpy_helper.to_array(t).max() == 0 for t in zps.values())
    ex = q.export(tmp_path / "cpu", input_shape=(1, 1, 28, 28), activations="u8")
    a = ex.alignment       # each quantizer alone is exact; a layer's float sums may differ
    assert a["isolated_identical_min"] == 1.0, a
    assert a["per_layer_identical_all"] >= 0.999, a
    k = kernels(ex.onnx)
    ops = k["ops"]
    assert ops.get("QLinearConv") == convs
    assert not {"Conv", "FusedConv", "Relu", "Clip", "QLinearLeakyRelu"} & set(ops)
    # the classifier (no quantizer after it) multiplies codes: no float GEMM, and the
    # alignment still checks its input and weight quantizers
    assert ops.get("MatMulInteger") == 1 and not {"Gemm", "FusedGemm", "MatMul"} & set(ops)
    assert k["float_layers"] == [] and k["integer_nodes"] >= convs + 1
    assert set(a["quantizers_isolated"]) == set(a["quantizers"])
    assert any("dense0_weight" in k for k in a["quantizers_isolated"])
    sess = session(ex.onnx, optimize=True)
    got = np.array([sess.run(None, {"data": x[i:i + 1]})[0].argmax(1)[0] for i in range(len(x))])
    assert (got == q.predict(x).argmax(1)).mean() >= 0.99


def test_cpu_int8_native_int8_agrees_with_its_simulation():
    q, cal, x, y = _bundled("fmnist_mobilenetv2", "cpu_int8")
    sim = q.predict(x).argmax(1)
    got = _predict(q.to_mxnet_int8(cal), x).argmax(1)
    assert (got == sim).mean() >= 0.985
    assert abs((got == y).mean() - (sim == y).mean()) <= 0.005


def _conv_classifier(tmp_path):
    """conv -> relu -> global average pool -> 1x1 conv (the classifier, as gluoncv writes
    MobileNet's) -> flatten, quantized with cpu_int8 and calibrated."""
    d = mx.sym.var("data")
    x = mx.sym.Convolution(d, kernel=(3, 3), pad=(1, 1), num_filter=16, name="c0")
    x = mx.sym.Activation(x, act_type="relu", name="r0")
    x = mx.sym.Pooling(x, global_pool=True, pool_type="avg", kernel=(1, 1), name="gap")
    x = mx.sym.Convolution(x, kernel=(1, 1), num_filter=10, name="pred")
    x = mx.sym.Flatten(x, name="flat")
    rng = np.random.default_rng(0)
    shapes, _, _ = x.infer_shape(data=(8, 3, 12, 12))
    params = {n: (rng.standard_normal(s) * 0.3).astype(np.float32)
              for n, s in zip(x.list_arguments(), shapes) if n != "data"}
    from quant_ops.graph.ir import Graph

    q = QuantizedModel(Graph.from_symbol(x), params).quantize("cpu_int8")
    cal = rng.standard_normal((32, 3, 12, 12)).astype(np.float32)
    q.calibrate(cal, "minmax", progress=False)
    return q, rng.standard_normal((8, 3, 12, 12)).astype(np.float32) * 1.5


def test_a_classifier_written_as_a_1x1_convolution_multiplies_codes(tmp_path):
    """A 1x1 convolution on a 1x1 map with no quantizer after it runs as MatMulInteger in
    the u8 export, with the logits of the s8 export (float convolution) up to float32
    rounding; every quantizer still matches MXNet exactly."""
    import onnxruntime as ort

    q, x = _conv_classifier(tmp_path)
    s8, _, _ = export_onnx(q.run_graph, q.params, tmp_path / "s8.onnx", {"data": x.shape})
    ex = q.export(tmp_path / "u8", input_shape=x.shape, check_input=x, activations="u8")
    ops = [n.op_type for n in onnx.load(str(ex.onnx)).graph.node]
    assert "MatMulInteger" in ops and ops.count("Conv") == 1       # only c0 is a Conv
    ya = session(s8).run(None, {"data": x})[0]
    yb = session(ex.onnx).run(None, {"data": x})[0]
    assert ya.shape == yb.shape == (8, 10)
    np.testing.assert_allclose(yb, ya, rtol=0, atol=1e-5 * np.abs(ya).max())
    np.testing.assert_allclose(yb, q.predict(x), rtol=0, atol=1e-4 * np.abs(ya).max())
    assert ex.alignment["isolated_identical_min"] == 1.0
    assert any("pred_weight" in k for k in ex.alignment["quantizers_isolated"])
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(ex.onnx), so, providers=["CPUExecutionProvider"])
    opt = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert "MatMulInteger" in opt and not {"Conv", "FusedConv", "Gemm"} & set(opt)


def test_layers_with_an_output_quantizer_are_left_to_onnxruntime_fusion():
    """A Gemm that feeds a QuantizeLinear (QGemm material) and one that reads float values
    are not rewritten; one reading codes with no quantizer after it is."""
    from onnx import TensorProto as T, helper as h, numpy_helper as nh

    from quant_ops.export.integer_layers import float_layers_as_integer

    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (4, 6)).astype(np.float32)
    inits = [nh.from_array(w, "w"), nh.from_array(np.full(4, 0.01, np.float32), "ws"),
             nh.from_array(np.zeros(4, np.int8), "wz"), nh.from_array(np.float32(0.1), "xs"),
             nh.from_array(np.uint8(0), "xz"), nh.from_array(np.zeros(4, np.float32), "b")]
    nodes = [h.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="x_int8_quantize"),
             h.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="x_int8"),
             h.make_node("QuantizeLinear", ["w", "ws", "wz"], ["wq"], name="w_int8_quantize",
                         axis=0),
             h.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="w_int8", axis=0),
             h.make_node("Gemm", ["xd", "wd", "b"], ["y1"], name="to_q", transB=1),
             h.make_node("QuantizeLinear", ["y1", "xs", "xz"], ["y1q"], name="y_quantize"),
             h.make_node("DequantizeLinear", ["y1q", "xs", "xz"], ["y1d"], name="y"),
             h.make_node("Gemm", ["x", "wd", "b"], ["y2"], name="float_input", transB=1),
             h.make_node("Gemm", ["xd", "wd", "b"], ["y3"], name="codes", transB=1)]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [2, 6])],
                     [h.make_tensor_value_info(n, T.FLOAT, [2, 4]) for n in ("y1d", "y2", "y3")],
                     inits)
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 13)])
    x = rng.random((2, 6), np.float32) * 5
    before = session(model.SerializeToString()).run(None, {"x": x})
    assert float_layers_as_integer(model) == ["codes"]
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Gemm") == 2 and ops.count("MatMulInteger") == 1
    assert "w_int8" in {n.name for n in model.graph.node}      # still read by two Gemms
    after = session(model.SerializeToString()).run(None, {"x": x})
    for a, b in zip(before, after):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6 * np.abs(a).max())


def test_4_bit_layers_keep_their_qdq_in_the_u8_export(tmp_path):
    """MatMulInteger takes 8-bit codes only: a classifier with 4-bit weights (opset 21)
    stays DQ -> layer, and onnxruntime loads and runs the model."""
    from quant_ops.graph.ir import Graph

    d = mx.sym.var("data")
    x = mx.sym.FullyConnected(mx.sym.Flatten(d), num_hidden=6, name="fc0")
    x = mx.sym.Activation(x, act_type="relu", name="r0")
    x = mx.sym.FullyConnected(x, num_hidden=3, name="fc1")
    rng = np.random.default_rng(0)
    shapes, _, _ = x.infer_shape(data=(4, 1, 4, 4))
    params = {n: (rng.standard_normal(s) * 0.3).astype(np.float32)
              for n, s in zip(x.list_arguments(), shapes) if n != "data"}
    q = QuantizedModel(Graph.from_symbol(x), params).quantize(
        {"preset": "cpu_int8", "weight": {"bits": 4}})
    xs = rng.standard_normal((4, 1, 4, 4)).astype(np.float32)
    q.calibrate(xs, "minmax", progress=False)
    ex = q.export(tmp_path / "e", input_shape=xs.shape, opset=21, activations="u8",
                  check_input=xs)
    ops = [n.op_type for n in onnx.load(str(ex.onnx)).graph.node]
    assert "MatMulInteger" not in ops and ops.count("Gemm") == 2
    y = session(ex.onnx).run(None, {"data": xs})[0]
    np.testing.assert_allclose(y, q.predict(xs), rtol=0, atol=1e-4 * np.abs(y).max())
