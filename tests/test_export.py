"""ONNX QDQ export, TensorRT cache and the alignment check against onnxruntime."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
import onnx
import pytest

from quant_ops.errors import QuantOpsError
from quant_ops.export import export_model
from quant_ops.export.align import check_alignment
from quant_ops.export.trt_cache import read_cache, read_ranges_json
from quant_ops.graph.ir import Graph
from quant_ops.model import QuantizedModel
from quant_ops.prepare import quantize_graph
from quant_ops.zoo import get_model

ROOT = Path(__file__).resolve().parents[1]


def calibrated(graph: Graph, params: dict, x: np.ndarray, policy="trt_int8", fold_bn=None):
    q = quantize_graph(graph, params, policy, fold_bn)
    return q.graph, QuantizedModel(q.graph, q.params).calibrate([x], "ema").params


def zoo(name, shape):
    mx.random.seed(0)   # the same weights whatever ran before
    net = get_model(name)
    net.initialize(mx.init.Xavier())
    net.hybridize()
    x = np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32)
    net(mx.nd.array(x))
    sym = net(mx.sym.var("data"))
    return Graph.from_symbol(sym), {p.name: p.data().asnumpy()
                                    for p in net.collect_params().values()}, x


@pytest.mark.parametrize("name,shape,fold", [("cifar_resnet20_v1", (4, 3, 32, 32), None),
                                             ("mobilenetv2_0.25", (2, 3, 224, 224), "qat")])
def test_export_matches_onnxruntime(name, shape, fold, tmp_path):
    g, params, x = zoo(name, shape)
    qg, qp = calibrated(g, params, x, fold_bn=fold)
    ex = export_model(qg, qp, tmp_path, "m", {"data": shape})
    model = onnx.load(str(ex.onnx))
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" not in ops                      # folded for deployment
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(q) == sum(n.op == "Quantization_int8" for n in qg.nodes)
    assert [i.name for i in model.graph.input] == ["data"]
    r = check_alignment(ex.onnx, ex.graph, ex.params, {"data": x})
    assert r["isolated_identical_min"] == 1.0      # the quantizer arithmetic: bit for bit
    assert r["identical_all"] > 0.99               # end to end (float sums ordered differently)
    assert r["outputs"][0]["cosine"] > 0.9999
    # cache and JSON carry the activation ranges under the ONNX tensor names
    cache, header = read_cache(ex.cache)
    assert header["algorithm"] == "EntropyCalibration2"
    assert cache.keys() == ex.ranges.keys() == read_ranges_json(ex.ranges_json).keys()
    onnx_tensors = {o for n in model.graph.node for o in n.output} | {"data"}
    assert set(cache) <= onnx_tensors
    for k, amax in ex.ranges.items():
        assert cache[k] == pytest.approx(amax, rel=1e-6)


def test_deconvolution_weights_are_per_axis_1(tmp_path):
    data = mx.sym.var("data")
    y = mx.sym.Deconvolution(data, num_filter=6, kernel=(3, 3), stride=(2, 2), name="up")
    y = mx.sym.Convolution(mx.sym.relu(y), num_filter=4, kernel=(3, 3), name="conv")
    shapes = dict(zip(y.list_arguments(), y.infer_shape(data=(2, 3, 8, 8))[0]))
    rng = np.random.default_rng(1)
    params = {k: rng.normal(0, 0.3, s).astype(np.float32) for k, s in shapes.items()
              if k != "data"}
    x = rng.uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)
    qg, qp = calibrated(Graph.from_symbol(y), params, x)
    ex = export_model(qg, qp, tmp_path, "d", {"data": x.shape})
    model = onnx.load(str(ex.onnx))
    axes = {n.name: [a.i for a in n.attribute if a.name == "axis"]
            for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert axes["up_weight_int8_quantize"] == [1] and axes["conv_weight_int8_quantize"] == [0]
    r = check_alignment(ex.onnx, ex.graph, ex.params, {"data": x})
    assert r["isolated_identical_min"] == 1.0 and r["identical_min"] > 0.999


def low_bit(bits):
    g, params, x = zoo("cifar_resnet20_v1", (2, 3, 32, 32))
    qg, qp = calibrated(g, params, x, policy={"preset": "trt_int8", "overrides": [
        {"match": "*dense0_fwd", "weight": {"bits": bits}, "activation": {"bits": bits}}]})
    return qg, qp, x


def test_int4_exports_at_opset_21_bit_exact(tmp_path):
    qg, qp, x = low_bit(4)
    ex = export_model(qg, qp, tmp_path, "m", {"data": x.shape}, opset=21)
    model = onnx.load(str(ex.onnx))
    zps = {t.name: t.data_type for t in model.graph.initializer if t.name.endswith("_zero_point")}
    assert sum(t == onnx.TensorProto.INT4 for t in zps.values()) == 2
    r = check_alignment(ex.onnx, ex.graph, ex.params, {"data": x})
    assert r["isolated_identical_min"] == 1.0
    assert not any(k.endswith("pool0_fwd") for k in ex.ranges)   # the cache is INT8 only


@pytest.mark.parametrize("bits,opset,needle", [(4, 13, "from opset 21"),
                                               (3, 21, "no format holds")])
def test_low_bit_without_format_is_refused_without_files(bits, opset, needle, tmp_path):
    qg, qp, x = low_bit(bits)
    out = tmp_path / "o"
    with pytest.raises(QuantOpsError, match=f"dense0_weight_int8' is {bits}-bit|"
                                            f"pool0_fwd_int8' is {bits}-bit") as e:
        export_model(qg, qp, out, "m", {"data": x.shape}, opset=opset)
    assert needle in str(e.value)
    assert not out.exists()


def test_uncalibrated_is_refused_without_files(tmp_path):
    g, params, _ = zoo("cifar_resnet20_v1", (2, 3, 32, 32))
    out = tmp_path / "o"
    q = quantize_graph(g, params, "trt_int8")
    with pytest.raises(QuantOpsError, match="no range"):
        export_model(q.graph, q.params, out, "m", {"data": (2, 3, 32, 32)})
    assert not out.exists()


def test_export_cli(tmp_path):
    g, params, x = zoo("cifar_resnet20_v1", (2, 3, 32, 32))
    qg, qp = calibrated(g, params, x)
    (tmp_path / "m-symbol.json").write_text(qg.to_json())
    sym = qg.to_symbol()
    from quant_ops.graph.params import save_params

    save_params(tmp_path / "m-0000.params", sym, qp)
    np.save(tmp_path / "x.npy", x)
    cmd = [sys.executable, str(ROOT / "utils" / "export_onnx.py"), "--symbol",
           str(tmp_path / "m-symbol.json"), "--params", str(tmp_path / "m-0000.params"),
           "--check-input", str(tmp_path / "x.npy"), "--out", str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "quantizer alone min 1.000000" in r.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "m.alignment.json", "m.calib.cache", "m.onnx", "m.ranges.json"]
    bad = cmd[:]
    bad[bad.index("--params") + 1] = str(tmp_path / "missing.params")
    bad[-1] = str(tmp_path / "out2")
    r = subprocess.run(bad, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "missing.params" in r.stderr
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("weight,activation,opset", [
    ({"method": "lsq", "bits": 8, "per_channel": True}, {"method": "pact", "bits": 8}, 13),
    ({"method": "lsq", "bits": 4, "per_channel": True}, {"method": "lsq", "bits": 4}, 21),
])
def test_pact_and_lsq_export_bit_exact(weight, activation, opset, tmp_path):
    g, params, x = zoo("cifar_resnet20_v1", (2, 3, 32, 32))
    q = quantize_graph(g, params, {"weight": weight, "activation": activation}, fold_bn="qat")
    ex = export_model(q.graph, q.params, tmp_path, "m", {"data": x.shape}, opset=opset)
    model = onnx.load(str(ex.onnx))
    zp = {t.data_type for t in model.graph.initializer if t.name.endswith("_zero_point")}
    assert len(zp) == 2                                  # signed weights, unsigned/other acts
    r = check_alignment(ex.onnx, ex.graph, ex.params, {"data": x})
    assert r["isolated_identical_min"] == 1.0
    assert r["outputs"][0]["cosine"] > 0.999


def test_dorefa_has_no_onnx_format(tmp_path):
    g, params, x = zoo("cifar_resnet20_v1", (2, 3, 32, 32))
    q = quantize_graph(g, params, {"weight": {"method": "dorefa", "bits": 4},
                                   "activation": {"method": "pact", "bits": 8}})
    with pytest.raises(QuantOpsError, match="DoReFa\\) has no ONNX format"):
        export_model(q.graph, q.params, tmp_path / "o", "m", {"data": x.shape})
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bits,opset", [(8, 13), (4, 21)])
def test_stored_weight_clip_exports_bit_exact(bits, opset, tmp_path):
    """int8 weights with a stored clip under max|w| (``fix_weight_scale``, what a training
    policy gives below 8 bits): the weights beyond the clip take the narrow code -qmax in
    onnxruntime too, per channel."""
    g, params, x = zoo("cifar_resnet20_v1", (4, 3, 32, 32))
    pol = {"preset": "trt_int8", "weight": {"params": {"fix_weight_scale": True}},
           "overrides": [{"match": "*dense0_fwd", "weight": {"bits": bits},
                          "activation": {"bits": bits}}]}
    qg, qp = calibrated(g, params, x, policy=pol, fold_bn="qat")   # a stored clip: BN first
    model = QuantizedModel(qg, qp)
    clipped = 0
    for q in model.quantizers:           # clip every weight at half its range
        if q.is_weight:
            qp[q.inputs["minmax"]] = np.asarray(qp[q.inputs["minmax"]]) * np.float32(0.5)
            clipped += 1
    assert clipped > 20 and all(q.attrs.get("fix_weight_scale") == "True"
                                for q in model.quantizers if q.is_weight)
    ex = export_model(qg, qp, tmp_path, "m", {"data": x.shape}, opset=opset)
    r = check_alignment(ex.onnx, ex.graph, ex.params, {"data": x})
    assert r["isolated_identical_min"] == 1.0
    assert r["outputs"][0]["cosine"] > 0.9999
    assert r["identical_all"] > 0.99
    # the engine gets each weight clipped at its stored range (many lay beyond it)
    beyond = 0
    for q in QuantizedModel(ex.graph, ex.params).quantizers:
        if q.is_weight:
            w = np.asarray(ex.params[ex.graph.nodes[q.source[0]].name])
            bound = np.asarray(ex.params[q.inputs["minmax"]]).reshape(-1)
            rows = w.reshape(len(bound), -1) if bound.size > 1 else w
            assert np.all(np.abs(rows) <= (bound[:, None] if bound.size > 1 else bound[0]))
            beyond += int((np.abs(rows) == (bound[:, None] if bound.size > 1
                                             else bound[0])).sum())
    assert beyond > 100
