"""Block reconstruction (BRECQ / QDrop): the blocks it cuts a network into, the gradient
of its learned activation step, and that what it returns is an ordinary quantized model
(weights on their grid, QDQ export bit-exact with onnxruntime)."""
from __future__ import annotations

import mxnet as mx
import numpy as np
import onnx
import pytest

from quant_ops.errors import QuantOpsError
from quant_ops.export import export_model
from quant_ops.export.align import check_alignment
from quant_ops.graph.ir import Graph, Node
from quant_ops.model import QuantizedModel
from quant_ops.ptq.blocks import ActStep, _fake_quant_nodes, find_blocks
from quant_ops.ptq.brecq import brecq

from test_export import zoo

W4A4 = {"preset": "trt_int8", "weight": {"bits": 4}, "activation": {"bits": 4}}


@pytest.fixture(scope="module")
def resnet():
    """CIFAR ResNet-20 (zoo, fixed random weights), quantized W4A4 with BN folded and
    calibrated on 64 random images."""
    g, params, _ = zoo("cifar_resnet20_v1", (2, 3, 32, 32))
    x = np.random.default_rng(3).normal(0, 1, (64, 3, 32, 32)).astype(np.float32)
    q = QuantizedModel(g, params).quantize(W4A4, fold_bn="deploy")
    q.calibrate([x[:32], x[32:]], "mse", progress=False)
    return q, x


def _layers(graph: Graph) -> list:
    return [n.name for n in graph.nodes if n.op in ("Convolution", "FullyConnected")]


def test_resnet_blocks_are_whole_residual_blocks(resnet):
    q, _ = resnet
    blocks = find_blocks(q.run_graph)
    # every layer in exactly one block, in graph order
    assert [name for b in blocks for name in b.layers] == _layers(q.run_graph)
    # nine residual blocks (two convs, the first of a stage also its 1x1 shortcut): the
    # stem conv joins the first, the classifier the last; nothing splits a block
    sizes = [len(b.layers) for b in blocks]
    assert sizes == [3, 2, 2, 3, 2, 2, 3, 2, 3], sizes
    for b in blocks:
        assert b.end == b.nodes[-1] and len(set(b.nodes)) == len(b.nodes)


def test_chain_blocks_merge_up_to_max_layers():
    x = mx.sym.var("data")
    for i in range(5):
        x = mx.sym.relu(mx.sym.Convolution(x, num_filter=4, kernel=(3, 3), pad=(1, 1),
                                           name=f"c{i}"))
    g = Graph.from_symbol(mx.sym.FullyConnected(x, num_hidden=3, name="fc"))
    assert [b.layers for b in find_blocks(g, max_layers=2)] == [
        ["c0", "c1"], ["c2", "c3"], ["c4", "fc"]]
    assert len(find_blocks(g, max_layers=1)) == 6
    assert find_blocks(g, data_name="nothing") == []


def test_learned_step_gradient_is_lsq():
    """The block's activation quantizer: forward is fake-quantization with step s, and its
    gradient to s is LSQ's (round(x/s) - x/s inside the range, the clip bound outside),
    to x the straight-through estimator (1 inside, 0 outside)."""
    nodes = [Node("null", "x")]

    def add(node):
        nodes.append(node)
        return [len(nodes) - 1, 0, 0]

    st = ActStep("q", "q_minmax", 4, -7.0, 7.0, "s", None)
    head = _fake_quant_nodes(add, [0, 0, 0], st)
    sym = Graph(nodes, [head], {}).to_symbol()
    rng = np.random.default_rng(0)
    xv = rng.normal(0, 1, (64,)).astype(np.float32)
    s = np.float32(0.21)
    gx, gs = mx.nd.zeros((64,)), mx.nd.zeros((1,))
    exe = sym.bind(mx.cpu(), {"x": mx.nd.array(xv), "s": mx.nd.array([s])},
                   args_grad={"x": gx, "s": gs})
    y = exe.forward(is_train=True)[0].asnumpy()
    z = xv / s
    np.testing.assert_allclose(y, np.clip(np.rint(z), -7, 7) * s, rtol=1e-6, atol=1e-7)
    dy = rng.normal(0, 1, (64,)).astype(np.float32)
    exe.backward([mx.nd.array(dy)])
    inside = (np.rint(z) >= -7) & (np.rint(z) <= 7)
    dyds = np.where(inside, np.rint(z) - z, np.clip(np.rint(z), -7, 7))
    np.testing.assert_allclose(gs.asnumpy()[0], (dy * dyds).sum(), rtol=1e-4)
    np.testing.assert_allclose(gx.asnumpy(), dy * inside, rtol=1e-6)


def test_brecq_lowers_block_error_and_keeps_an_ordinary_model(resnet, tmp_path):
    q, x = resnet
    before = q.predict(x)
    new, rep = brecq(q.run_graph, q.params, [x[:32], x[32:]], iters=30, batch_size=16,
                     progress=False)
    rows = rep["blocks"]
    assert len(rows) == 9 and any(r["kept_learned"] for r in rows)
    assert all(min(r["mse_learned"], r["mse_before"]) <= r["mse_before"] for r in rows)
    changed = {k for k in new if not np.array_equal(np.asarray(new[k]), np.asarray(q.params[k]))}
    ranges = {qq.range_var for qq in q.quantizers if not qq.is_weight}
    weights = {w for r in rows if r["kept_learned"] for w in r["weights"]}
    assert changed and changed <= weights | ranges
    # weights on the 4-bit grid of the scale their quantizer derives from them
    for w in weights:
        v = np.asarray(new[w]).reshape(len(new[w]), -1)
        amax = np.abs(np.asarray(q.params[w])).reshape(len(v), -1).max(1)
        np.testing.assert_allclose(np.abs(v).max(1), amax, rtol=1e-6)
        codes = v / (amax[:, None] / 7)
        np.testing.assert_allclose(codes, np.rint(codes), atol=1e-3)
    m = QuantizedModel(q.graph, new)
    after = m.predict(x)
    assert not np.array_equal(after, before)
    # an ordinary quantized model: QDQ at opset 21 (INT4), bit-exact with onnxruntime
    ex = export_model(m.run_graph, m.params, tmp_path, "b", {"data": (2, 3, 32, 32)},
                      opset=21)
    onnx.checker.check_model(onnx.load(str(ex.onnx)))
    r = check_alignment(ex.onnx, ex.graph, ex.params, {"data": x[:2]})
    assert r["isolated_identical_min"] == 1.0
    assert r["identical_all"] > 0.99 and r["outputs"][0]["cosine"] > 0.9999


def test_qdrop_and_fixed_steps(resnet):
    q, x = resnet
    new, rep = brecq(q.run_graph, q.params, [x], iters=10, batch_size=16, qdrop=0.5,
                     learn_steps=False, max_layers=1, progress=False)
    assert rep["qdrop"] == 0.5 and all(not r["activations"] for r in rep["blocks"])
    ranges = {qq.range_var for qq in q.quantizers if not qq.is_weight}
    assert all(np.array_equal(new[k], q.params[k]) for k in ranges)


@pytest.mark.parametrize("kw,needle", [({"iters": 0}, "iters = 0"),
                                       ({"qdrop": 1.0}, "qdrop = 1.0"),
                                       ({"batch_size": 1000}, "batch_size = 1000"),
                                       ({"lr": float("nan")}, "lr = nan")])
def test_bad_arguments(resnet, kw, needle):
    q, x = resnet
    with pytest.raises(QuantOpsError, match=needle):
        brecq(q.run_graph, q.params, [x], progress=False, **kw)
    with pytest.raises(QuantOpsError, match="calibration set is empty"):
        brecq(q.run_graph, q.params, [], progress=False)


def test_model_brecq_needs_calibration():
    g, params, x = zoo("cifar_resnet20_v1", (2, 3, 32, 32))
    m = QuantizedModel(g, params)
    with pytest.raises(QuantOpsError, match="quantize\\(\\) and calibrate\\(\\) first"):
        m.brecq(x)
    m.quantize(W4A4)
    with pytest.raises(QuantOpsError, match="activation quantizers have no range"):
        m.brecq(x)

