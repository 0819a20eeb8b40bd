"""Calibration of every activation quantizer of a graph over a calibration set."""
from __future__ import annotations

import mxnet as mx
import numpy as np
import pytest

from quant_ops.calib.graph_calib import activation_tensors, calibrate_graph
from quant_ops.errors import QuantOpsError
from quant_ops.graph.ir import Graph
from quant_ops.prepare import quantize_graph
from quant_ops.zoo import get_model


@pytest.fixture(scope="module")
def model():
    net = get_model("cifar_resnet20_v1")
    net.initialize(mx.init.Xavier())
    net.hybridize()
    rng = np.random.default_rng(0)
    batches = [rng.uniform(0, 1, (8, 3, 32, 32)).astype(np.float32) for _ in range(3)]
    net(mx.nd.array(batches[0]))
    sym = net(mx.sym.var("data"))
    params = {p.name: p.data().asnumpy() for p in net.collect_params().values()}
    q = quantize_graph(Graph.from_symbol(sym), params, "trt_int8")
    return q, sym, params, batches


def test_minmax_ranges_are_the_float_tensors_max(model):
    q, sym, params, batches = model
    qp, ranges = calibrate_graph(q.graph, q.params, batches, "minmax", progress=False)
    internals = sym.get_internals()
    for qname, (tensor, mm) in activation_tensors(q.graph).items():
        if tensor == "data":
            continue
        t = internals[tensor]
        args = {k: mx.nd.array(params[k]) for k in t.list_arguments() if k != "data"}
        aux = {k: mx.nd.array(params[k]) for k in t.list_auxiliary_states()}
        want = 0.0
        for b in batches:
            exe = t.bind(mx.cpu(), {**args, "data": mx.nd.array(b)}, aux_states=aux)
            want = max(want, float(np.abs(exe.forward()[0].asnumpy()).max()))
        assert qp[mm][0] == pytest.approx(want, rel=1e-6) == ranges[qname]
    # the network input's range is the max over the calibration images
    assert ranges["data_int8"] == pytest.approx(max(float(np.abs(b).max()) for b in batches))


@pytest.mark.parametrize("method", ["entropy", "percentile", "mse"])
def test_histogram_methods_clip_below_minmax(model, method):
    q, _, _, batches = model
    _, mm = calibrate_graph(q.graph, q.params, batches, "minmax", progress=False)
    _, r = calibrate_graph(q.graph, q.params, batches, method, progress=False)
    assert r.keys() == mm.keys()
    assert all(0 < r[k] <= mm[k] * (1 + 1e-6) for k in r)
    assert any(r[k] < 0.99 * mm[k] for k in r)


def test_bad_calibration_sets_are_clear_errors(model):
    q, _, _, batches = model
    with pytest.raises(QuantOpsError, match="calibration set is empty"):
        calibrate_graph(q.graph, q.params, [], progress=False)
    with pytest.raises(QuantOpsError, match="do not fit the model"):
        calibrate_graph(q.graph, q.params, [np.zeros((2, 1, 28, 28), np.float32)],
                        progress=False)
    with pytest.raises(QuantOpsError, match="expected"):
        calibrate_graph(q.graph, q.params, [batches[0], batches[0][:4]], progress=False)
    bad = batches[0].copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(QuantOpsError, match="NaN"):
        calibrate_graph(q.graph, q.params, [bad], "entropy", progress=False)
    with pytest.raises(QuantOpsError, match="NaN"):
        calibrate_graph(q.graph, q.params, [bad], "minmax", progress=False)
