"""QuantizedModel carries a network from load to export in memory, and what it writes is
what the other tools read."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon

import quant_ops
from quant_ops import QuantizedModel, QuantOpsError
from quant_ops.graph.ir import Graph
from quant_ops.prepare import quantize_graph
from quant_ops.train import FitConfig

ROOT = Path(__file__).resolve().parents[1]


def _net():
    data = mx.sym.var("data")
    c1 = mx.sym.Convolution(data, num_filter=4, kernel=(3, 3), pad=(1, 1), name="c1")
    b1 = mx.sym.BatchNorm(c1, fix_gamma=False, name="bn1")
    r1 = mx.sym.Activation(b1, act_type="relu", name="r1")
    c2 = mx.sym.Convolution(r1, num_filter=4, kernel=(3, 3), pad=(1, 1), name="c2")
    r2 = mx.sym.Activation(c2, act_type="relu", name="r2")
    p = mx.sym.Pooling(r2, kernel=(2, 2), stride=(2, 2), pool_type="max", name="p")
    fc = mx.sym.FullyConnected(p, num_hidden=3, name="fc")
    rng = np.random.default_rng(0)
    shapes, _, aux_shapes = fc.infer_shape(data=(2, 1, 8, 8))
    params = {n: rng.normal(0, 0.3, s).astype(np.float32)
              for n, s in zip(fc.list_arguments(), shapes) if n != "data"}
    params.update({n: (np.abs(rng.normal(1, 0.2, s)) if "var" in n else rng.normal(0, 0.1, s))
                   .astype(np.float32) for n, s in zip(fc.list_auxiliary_states(), aux_shapes)})
    return fc, params


def _data(n=32, seed=1):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (n, 1, 8, 8)).astype(np.float32), rng.integers(0, 3, n)


@pytest.fixture
def saved(tmp_path):
    sym, params = _net()
    sym.save(str(tmp_path / "net-symbol.json"))
    mx.nd.save(str(tmp_path / "net-0000.params"),
               {f"{'aux' if k in sym.list_auxiliary_states() else 'arg'}:{k}": mx.nd.array(v)
                for k, v in params.items()})
    return tmp_path / "net", sym, params


def test_loads_from_files_and_from_a_prefixed_nd_load_dict(saved):
    prefix, sym, params = saved
    a = QuantizedModel.from_symbol(f"{prefix}-symbol.json", f"{prefix}-0000.params")
    b = QuantizedModel.from_symbol(sym, mx.nd.load(f"{prefix}-0000.params"))
    c = QuantizedModel.load(prefix)
    x, _ = _data()
    ref = a.predict(x)
    for m in (b, c):
        np.testing.assert_array_equal(m.predict(x), ref)
    assert a.name == "net" and set(a.params) == set(params)


def test_missing_params_name_the_culprit(saved):
    prefix, sym, params = saved
    del params["c2_weight"]
    with pytest.raises(QuantOpsError, match="missing c2_weight"):
        QuantizedModel.from_symbol(sym, params)
    with pytest.raises(QuantOpsError, match="file name or a dict"):
        QuantizedModel.from_symbol(sym, [1, 2])


def test_whole_flow_matches_the_pipeline_functions(saved, tmp_path):
    """quantize -> calibrate -> evaluate on the object equals the same stages called as
    functions, bit for bit."""
    prefix, sym, params = saved
    x, y = _data()
    m = QuantizedModel.load(prefix).quantize("trt_int8", fold_bn="deploy")
    m.calibrate(x, "entropy", batch_size=16, progress=False)
    from quant_ops.calib.graph_calib import calibrate_graph

    q = quantize_graph(Graph.from_symbol(sym), params, "trt_int8", fold_bn="deploy")
    p2, _ = calibrate_graph(q.graph, q.params, [x[:16], x[16:]], "entropy", progress=False)
    assert m.graph.to_json() == q.graph.to_json()
    for k in p2:
        np.testing.assert_array_equal(m.params[k], p2[k], err_msg=k)
    acc = m.evaluate(x, y)
    assert acc == pytest.approx(100 * float((m.predict(x).argmax(1) == y).mean()))
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]
    assert m.evaluate(batches) == pytest.approx(acc)
    # quantizing again changes nothing; the float model underneath is the original graph
    before = m.graph.to_json()
    assert m.quantize("trt_int8").graph.to_json() == before
    assert len(m.quantizers) == 6 and all(q.method.name == "int8" for q in m.quantizers)


def test_save_is_read_by_symbolblock_and_export_cli(saved, tmp_path):
    prefix, _, _ = saved
    x, _ = _data(4)
    m = QuantizedModel.load(prefix).quantize("trt_int8").calibrate(x, "minmax",
                                                                   progress=False)
    sym_path, par_path = m.save(tmp_path / "out" / "net-int8")
    assert sym_path.name == "net-int8-symbol.json" and par_path.name == "net-int8-0000.params"
    blk = gluon.SymbolBlock.imports(str(sym_path), ["data"], str(par_path))
    quant_ops.set_training(blk, False)
    np.testing.assert_array_equal(blk(mx.nd.array(x)).asnumpy(), m.predict(x))
    r = subprocess.run([sys.executable, str(ROOT / "utils" / "export_onnx.py"), "--symbol",
                        str(sym_path), "--params", str(par_path), "--input-shape", "1,1,8,8",
                        "--out", str(tmp_path / "cli")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cli" / "net-int8.onnx").is_file()


def test_export_writes_everything_and_is_bit_exact(saved, tmp_path):
    prefix, _, _ = saved
    x, _ = _data(8)
    m = QuantizedModel.load(prefix).quantize("trt_int8", fold_bn="deploy")
    with pytest.raises(QuantOpsError, match="input_shape"):
        m.export(tmp_path / "none")
    m.calibrate(x, "minmax", progress=False)
    ex = m.export(tmp_path / "deploy", name="net")
    names = sorted(p.name for p in (tmp_path / "deploy").iterdir())
    assert names == ["net.alignment.json", "net.calib.cache", "net.onnx", "net.ranges.json"]
    assert ex.onnx == tmp_path / "deploy" / "net.onnx"
    assert ex.alignment["identical_min"] == 1.0
    assert json.loads((tmp_path / "deploy" / "net.alignment.json").read_text()) \
        == ex.alignment


def test_uncalibrated_export_fails_and_writes_nothing(saved, tmp_path):
    prefix, _, _ = saved
    m = QuantizedModel.load(prefix).quantize("trt_int8")
    with pytest.raises(QuantOpsError, match="no range"):
        m.export(tmp_path / "deploy", input_shape=(1, 1, 8, 8))
    assert not (tmp_path / "deploy").exists()


def test_to_block_fit_from_block_round_trip(saved):
    prefix, _, _ = saved
    x, y = _data(64)
    m = QuantizedModel.load(prefix).quantize(
        {"weight": {"method": "lsq", "bits": 4, "per_channel": True},
         "activation": {"method": "pact", "bits": 4}}, fold_bn="qat")
    m.calibrate(x, "mse", progress=False)
    before = {k: v.copy() for k, v in m.params.items()}
    progress = m.fit((x, y), None, FitConfig(epochs=1, lr=0.01, batch_size=16,
                                             progress=False))
    assert progress["step"] == 4
    changed = [k for k in before if not np.array_equal(before[k], m.params[k])]
    assert any(k.endswith("_gamma") for k in changed) and any("step" in k for k in changed)
    # the block made from the trained model predicts what the model predicts
    blk = m.to_block()
    np.testing.assert_allclose(blk(mx.nd.array(x[:8])).asnumpy(), m.predict(x[:8]),
                               rtol=1e-5, atol=1e-6)


def test_from_gluon_and_one_call_quantize():
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(4, 3), gluon.nn.Activation("relu"), gluon.nn.Dense(3))
    net.initialize(mx.init.Xavier())
    x, _ = _data(4)
    m = quant_ops.quantize(net, "trt_int8", sample=mx.nd.array(x))
    assert isinstance(m, QuantizedModel) and len(m.quantizers) == 4
    m.calibrate(x, "minmax", progress=False)
    np.testing.assert_allclose(m.float_model().predict(x), net(mx.nd.array(x)).asnumpy(),
                               rtol=1e-5, atol=1e-5)


def test_one_call_quantize_takes_numpy_and_float64_samples():
    """The README's ``quant_ops.quantize(net, "trt_int8", sample=x)`` with ``x`` a numpy
    array (float32 or float64) or a float64 NDArray: the sample becomes float32."""
    x, _ = _data(4)
    for sample in (x, x.astype(np.float64), mx.nd.array(x, dtype="float64")):
        net = gluon.nn.HybridSequential()
        net.add(gluon.nn.Conv2D(4, 3), gluon.nn.Activation("relu"), gluon.nn.Dense(3))
        net.initialize(mx.init.Xavier())
        m = quant_ops.quantize(net, "trt_int8", sample=sample)
        assert len(m.quantizers) == 4 and m.input_shape == x.shape


def test_policies_built_in_code_may_hold_numpy_numbers():
    from quant_ops.policy import QuantPolicy

    p = QuantPolicy.from_dict({"weight": {"bits": np.int64(4), "per_channel": np.bool_(True)},
                               "activation": {"params": {"ema_decay": np.float32(0.9)}}})
    assert p.weight.bits == 4 and type(p.weight.bits) is int and p.weight.per_channel is True


def test_a_shorter_last_batch_runs_on_a_quantized_model():
    """Gluon exports weights with a partial __shape__ (4, 0, 3, 3); reshaping the executor
    for a last batch of 2 re-inferred them from it and the weight quantizer refused."""
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(4, 3), gluon.nn.Activation("relu"), gluon.nn.Dense(3))
    net.initialize(mx.init.Xavier())
    x, _ = _data(10)
    m = quant_ops.quantize(net, "trt_int8", sample=mx.nd.array(x[:4]))
    m.calibrate(x, "minmax", progress=False)
    whole = m.predict(x, batch_size=10)
    np.testing.assert_array_equal(m.predict(x, batch_size=4), whole)


def test_from_zoo_builds_offline():
    m = QuantizedModel.from_zoo("resnet18_v1", input_shape=(1, 3, 32, 32))
    m.quantize("trt_int8", fold_bn="deploy")
    assert len([q for q in m.quantizers if q.is_weight]) == 21
    assert np.isfinite(m.predict(np.zeros((1, 3, 32, 32), np.float32))).all()


def test_from_zoo_names_do_not_depend_on_what_was_built_before():
    """A policy names zoo nodes (resnetv10_stage4_*): those names hold inside an open Gluon
    name scope and after other zoo models were built."""
    first = {n.name for n in QuantizedModel.from_zoo("resnet18_v1", (1, 3, 32, 32)).graph.nodes}
    outer = gluon.nn.HybridSequential(prefix="outer_")
    with outer.name_scope():
        QuantizedModel.from_zoo("resnet18_v1", (1, 3, 32, 32))
        again = {n.name for n in
                 QuantizedModel.from_zoo("resnet18_v1", (1, 3, 32, 32)).graph.nodes}
    assert "resnetv10_stage4_conv0_fwd" in first and again == first


def test_ptq_passes_on_the_model_keep_their_reports(saved):
    prefix, _, _ = saved
    x, y = _data(32)
    m = QuantizedModel.load(prefix).dfq(bias_correction=None)
    assert m.reports["dfq"]["bn_folded"] == 1 and "cle" in m.reports["dfq"]
    m.quantize("trt_int8").calibrate(x, "minmax", progress=False)
    before = m.evaluate(x, y)
    m.easyquant(x, batch_size=16, rounds=1, points=10, progress=False)
    rows = m.reports["easyquant"]["layers"]
    assert len(rows) == 3 and m.copy().reports.keys() == {"dfq", "easyquant"}
    assert abs(m.evaluate(x, y) - before) <= 25     # 32 random labels: only sanity


@pytest.mark.parametrize("change,needle", [
    (lambda p: p.update(c1_weight=p["c1_weight"].astype(np.float64)), "'c1_weight' is float64"),
    (lambda p: p.update(c1_bias=p["c1_bias"].astype(np.float16)), "'c1_bias' is float16"),
    (lambda p: p["c2_weight"].__setitem__((0, 0, 0, 0), np.nan), "'c2_weight' has NaN"),
    (lambda p: p["fc_bias"].__setitem__(0, np.inf), "'fc_bias' has NaN or infinite"),
])
def test_bad_params_are_refused_where_they_enter(saved, change, needle):
    _, sym, params = saved
    change(params)
    with pytest.raises(QuantOpsError, match=needle):
        QuantizedModel.from_symbol(sym, params)


def test_cast_converts_float_params_on_request(saved):
    _, sym, params = saved
    m = QuantizedModel.from_symbol(sym, {k: v.astype(np.float64) for k, v in params.items()},
                                   cast=True)
    assert all(v.dtype == np.float32 for v in m.params.values())


def test_negative_batchnorm_variance_is_refused_where_it_enters(saved):
    """Folded or not, a negative running variance gives NaN outputs: refused on load."""
    _, sym, params = saved
    params["bn1_moving_var"][0] = -1.0
    with pytest.raises(QuantOpsError, match="BatchNorm 'bn1': running variance "
                                            "'bn1_moving_var' is negative"):
        QuantizedModel.from_symbol(sym, params)


def test_outputs_get_the_umask_mode(saved, tmp_path):
    import os

    prefix, _, _ = saved
    x, _ = _data(4)
    m = QuantizedModel.load(prefix).quantize("trt_int8").calibrate(x, "minmax", progress=False)
    old = os.umask(0o022)
    try:
        m.save(tmp_path / "s" / "net")
        m.export(tmp_path / "e", name="net")
    finally:
        os.umask(old)
    files = list((tmp_path / "s").iterdir()) + list((tmp_path / "e").iterdir())
    assert len(files) == 6
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} \
        == {f.name: "0o644" for f in files}


@pytest.mark.parametrize("fold", [None, "qat", "deploy"])
def test_3d_convolutions_and_a_repeated_op_name(fold, caplog):
    """Video nets (3-D kernels) fold BatchNorm either way; a graph that repeats an operator
    name (gluoncv xception, i3d) gets one quantizer state per tensor, not two of one name."""
    d = mx.sym.var("data")
    c = mx.sym.Convolution(d, num_filter=4, kernel=(3, 3, 3), pad=(1, 1, 1), name="c3")
    r = mx.sym.Activation(mx.sym.BatchNorm(c, fix_gamma=False, name="bn"), act_type="relu",
                          name="relu")
    c2 = mx.sym.Convolution(r, num_filter=4, kernel=(1, 1, 1), name="c4")
    r2 = mx.sym.Activation(c2, act_type="relu", name="relu")          # the same name again
    out = mx.sym.FullyConnected(r2, num_hidden=3, name="fc")
    shapes, _, aux = out.infer_shape(data=(2, 3, 4, 8, 8))
    rng = np.random.default_rng(0)
    params = {n: rng.normal(0, 0.3, s).astype(np.float32)
              for n, s in zip(out.list_arguments(), shapes) if n != "data"}
    params.update({n: np.abs(rng.normal(1, 0.2, s)).astype(np.float32)
                   for n, s in zip(out.list_auxiliary_states(), aux)})
    x = rng.normal(size=(2, 3, 4, 8, 8)).astype(np.float32)
    want = QuantizedModel.from_symbol(out, params).predict(x)
    m = QuantizedModel.from_symbol(out, params).quantize("trt_int8", fold_bn=fold)
    m.calibrate(x, "minmax", progress=False)
    names = [q.name for q in m.quantizers]
    assert len(names) == len(set(names)) == 6
    assert "share a name" in caplog.text
    got = m.predict(x)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert np.array_equal(m.float_model().predict(x), want) if fold is None else True


def test_from_zoo_builds_detection_nets_without_downloading_their_backbone():
    """gluoncv's detectors fetch ImageNet backbone weights unless told not to; offline that
    was a network error from graph_optimize --model ssd_..."""
    from quant_ops.zoo import get_model

    net = get_model("ssd_300_mobilenet0.25_voc")
    assert type(net).__name__ == "SSD"
    # its extra BatchNorm layers carry no initializer of their own (Xavier refused them)
    m = QuantizedModel.from_zoo("ssd_300_mobilenet0.25_voc", (1, 3, 300, 300))
    assert m.params["ssd0_expand_trans_bn0_gamma"].min() == 1.0
    # darknet53 refuses the flag with a bare Warning, not a TypeError
    assert type(get_model("darknet53")).__name__ == "DarknetV3"
    with pytest.raises(QuantOpsError, match="unknown gluoncv model 'resnet9'"):
        get_model("resnet9")
