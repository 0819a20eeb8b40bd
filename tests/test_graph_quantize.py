"""Graph rewriting on real topologies (gluoncv model-zoo architectures, random weights):
quantizers where TensorRT INT8 runs the layer, bindable, close to float at 16 bits,
idempotent, and `strip` gives back the original graph exactly."""
from __future__ import annotations

import time

import mxnet as mx
import numpy as np
import pytest

import quant_ops
from quant_ops.errors import QuantOpsError
from quant_ops.graph.ir import Graph
from quant_ops.graph.quantize import insert_quantizers, strip_quantizers
from quant_ops.policy import QuantPolicy
from quant_ops.zoo import get_model

LAYERS = ("Convolution", "FullyConnected", "Deconvolution")


def zoo_graph(name, shape):
    net = get_model(name)
    net.initialize(mx.init.Xavier())
    x = mx.nd.random.uniform(shape=shape)
    net.hybridize()
    y = net(x)
    sym = net(mx.sym.var("data"))
    params = {p.name: p.data() for p in net.collect_params().values()}
    return net, x, y, sym, params


def bind(sym, params, new_params):
    blk = mx.gluon.SymbolBlock(sym, [mx.sym.var("data")])
    values = {**params, **new_params}
    for k, p in blk.collect_params().items():
        p._load_init(mx.nd.array(values[k]), mx.cpu())
    return blk


def policy(bits=8, **kw):
    d = {"preset": "trt_int8", "weight": {"bits": bits}, "activation": {"bits": bits}}
    d.update(kw)
    return QuantPolicy.from_dict(d)


@pytest.mark.parametrize("name,shape", [
    ("resnet18_v1", (1, 3, 224, 224)),
    ("mobilenetv2_0.25", (1, 3, 224, 224)),
    ("cifar_resnet20_v1", (2, 3, 32, 32)),
])
def test_trt_int8_quantizes_every_layer_and_strips_exactly(name, shape):
    net, x, y_float, sym, params = zoo_graph(name, shape)
    g = Graph.from_symbol(sym)
    shapes = {k: v.shape for k, v in params.items()}
    rw = insert_quantizers(g, policy(16), shapes)
    layers = [n for _, n in g.ops() if n.op in LAYERS]
    q = rw.graph
    qops = {n.name: n for _, n in q.ops()}
    for layer in layers:  # both inputs of every conv/FC go through a quantizer
        node = qops[layer.name]
        for pos in (0, 1):
            src = q.nodes[node.inputs[pos][0]]
            assert src.op == "Quantization_int8", (layer.name, pos)
            assert src.attrs["is_weight"] == ("True" if pos == 1 else "False")
    weights = [r for r in rw.table if r["input"] == "weight"]
    assert len(weights) == len(layers)
    assert all(r["granularity"] == "per-channel" for r in weights)
    # one quantizer per tensor
    assert len({r["tensor"] for r in rw.table}) == len(rw.table)

    blk = bind(q.to_symbol(), params, rw.new_params)
    quant_ops.set_training(blk, True)
    blk(x)                               # observe activation ranges once
    quant_ops.set_training(blk, False)
    y = blk(x).asnumpy()
    ref = y_float.asnumpy()
    assert np.abs(y - ref).max() <= 1e-3 * np.abs(ref).max()   # 16 bits: close to float

    again = insert_quantizers(q, policy(16), shapes)
    assert again.graph.to_json() == q.to_json() and not again.new_params   # idempotent
    back = strip_quantizers(q)
    assert back.to_symbol().tojson() == sym.tojson()
    y_back = mx.gluon.SymbolBlock(back.to_symbol(), [mx.sym.var("data")])
    for k, p in y_back.collect_params().items():
        p._load_init(params[k], mx.cpu())
    assert np.array_equal(y_back(x).asnumpy(), net(x).asnumpy())


def test_rewriting_resnet50_is_fast():
    _, _, _, sym, params = zoo_graph("resnet50_v1", (1, 3, 224, 224))
    g = Graph.from_symbol(sym)
    t = time.perf_counter()
    rw = insert_quantizers(g, policy(), {k: v.shape for k, v in params.items()})
    assert time.perf_counter() - t < 5.0  # generous; the bench measures it
    assert len([r for r in rw.table if r["input"] == "weight"]) == 54


def test_shared_input_quantized_once_and_skips_apply():
    data = mx.sym.var("data")
    a = mx.sym.Convolution(data, num_filter=4, kernel=(3, 3), name="conv_a")
    b = mx.sym.Convolution(data, num_filter=4, kernel=(3, 3), name="conv_b")
    out = mx.sym.FullyConnected(a + b, num_hidden=3, name="fc")
    arg_shapes, _, _ = out.infer_shape(data=(1, 2, 8, 8))
    shapes = dict(zip(out.list_arguments(), arg_shapes))
    g = Graph.from_symbol(out)
    rw = insert_quantizers(g, policy(), shapes)
    data_q = [r for r in rw.table if r["tensor"] == "data"]
    assert len(data_q) == 1                      # `data` feeds two convs: one quantizer
    rw = insert_quantizers(g, policy(skip={"names": ["fc"]}), shapes)
    assert "fc" not in {r["node"] for r in rw.table}
    with pytest.raises(QuantOpsError, match="matches no node"):
        insert_quantizers(g, policy(skip={"names": ["nothing_*"]}), shapes)


def test_malformed_graph_json_names_the_problem():
    with pytest.raises(QuantOpsError, match="not valid JSON"):
        Graph.from_json("{", "model-symbol.json")
    with pytest.raises(QuantOpsError, match="model-symbol.json: node 'x' has a bad input"):
        Graph.from_json('{"nodes": [{"op": "relu", "name": "x", "inputs": [[5, 0, 0]]}], '
                        '"heads": [[0, 0, 0]]}', "model-symbol.json")


@pytest.mark.parametrize("mode", ["deploy", "qat"])
def test_bn_folding_keeps_float_outputs(mode):
    from quant_ops.graph.fold_bn import fold_batchnorm

    net, x, _, sym, params = zoo_graph("resnet18_v1", (1, 3, 224, 224))
    rng = np.random.default_rng(0)
    for k in params:  # statistics far from the identity, so folding has work to do
        if k.endswith(("running_mean", "running_var", "gamma", "beta")):
            params[k] = rng.uniform(0.5, 1.5, params[k].shape).astype(np.float32)
            net.collect_params()[k].set_data(mx.nd.array(params[k]))
    y = net(x).asnumpy()
    g = Graph.from_symbol(sym)
    fg, fp = fold_batchnorm(g, params, mode)
    assert sum(n.op == "BatchNorm" for n in fg.nodes) == 0
    yf = bind(fg.to_symbol(), fp, {})(x).asnumpy()
    assert np.abs(yf - y).max() <= 1e-5 * np.abs(y).max()
    if mode == "deploy":  # the statistics are gone from the deployed params
        assert not any(k.endswith("running_var") for k in fp)


def test_relu6_to_relu():
    from quant_ops.graph.relu6 import relu6_to_relu

    _, _, _, sym, _ = zoo_graph("mobilenetv2_0.25", (1, 3, 224, 224))
    g = Graph.from_symbol(sym)
    n6 = sum(n.op == "clip" for n in g.nodes)
    g2, count = relu6_to_relu(g)
    assert count == n6 > 0 and not any(n.op == "clip" for n in g2.nodes)
    assert [n.name for n in g2.nodes] == [n.name for n in g.nodes]


def test_quantize_block_gives_a_trainable_quantized_block():
    from mxnet import autograd

    from quant_ops.prepare import prepare

    net, x, y, _, _ = zoo_graph("cifar_resnet20_v1", (2, 3, 32, 32))
    q = prepare(net, "trt_int8")
    weights = [r for r in q.quant_table if r["input"] == "weight"]
    assert len(weights) == 22
    name = next(k for k in net.collect_params() if k.endswith("conv0_weight"))
    w = net.collect_params()[name]
    assert q.collect_params()[name] is w   # shared, not copied
    with autograd.record():
        loss = q(x).sum()
    loss.backward()
    assert float(mx.nd.abs(w.grad()).sum().asscalar()) > 0
    mm = q.collect_params()["data_int8_minmax"].data().asnumpy()
    assert mm[0] > 0                       # the training call observed the input range
    yq = q(x).asnumpy()                    # inference: 8-bit close to float
    yf = net(x).asnumpy()                  # (the training call moved the shared BN stats)
    assert np.abs(yq - yf).max() < 0.1 * np.abs(yf).max()


def test_shared_scale_at_residual_adds():
    net, x, y, sym, params = zoo_graph("cifar_resnet20_v1", (2, 3, 32, 32))
    g = Graph.from_symbol(sym)
    shapes = {k: v.shape for k, v in params.items()}
    rw = insert_quantizers(g, QuantPolicy.preset("trt_int8_shared"), shapes)
    q = rw.graph
    adds = [n for _, n in q.ops() if n.op in ("elemwise_add", "_Plus", "broadcast_add")]
    assert adds
    for a in adds:  # both inputs quantized, reading one range variable
        srcs = [q.nodes[e[0]] for e in a.inputs]
        assert all(s.op == "Quantization_int8" for s in srcs), a.name
        assert len({q.nodes[s.inputs[1][0]].name for s in srcs}) == 1, a.name
    assert len({r["tensor"] for r in rw.table}) == len(rw.table)   # still one per tensor
    blk = bind(q.to_symbol(), params, rw.new_params)
    quant_ops.set_training(blk, True)
    blk(x)
    quant_ops.set_training(blk, False)
    yq = blk(x).asnumpy()
    assert np.abs(yq - y.asnumpy()).max() < 0.1 * np.abs(y.asnumpy()).max()
    assert strip_quantizers(q).to_symbol().tojson() == sym.tojson()


@pytest.mark.parametrize("preset", ["cpu_int8", "trt_int8_shared"])
def test_adds_of_parameters_are_biases_not_activations_to_share_a_scale(preset):
    """BN folded for QAT computes each layer's bias in-graph (an elemwise_add of two values
    of the parameters), and a graph may add a bias variable after a layer: neither adds
    activations, so neither gets quantizers under a preset that shares scales at adds.
    The QAT fold quantizes the same activations as the deployment fold."""
    from quant_ops.prepare import quantize_graph

    _, _, _, sym, params = zoo_graph("cifar_resnet20_v1", (2, 3, 32, 32))
    fc = sym.name                                    # the classifier is the output
    bias = mx.sym.var("extra_bias", shape=(1, 10))
    sym = mx.sym.broadcast_add(sym, bias, name="bias_add")
    params = {k: v.asnumpy() for k, v in params.items()}
    params["extra_bias"] = np.ones((1, 10), np.float32)
    seen = {}
    for fold in ("qat", "deploy"):
        q = quantize_graph(Graph.from_symbol(sym), params, preset, fold_bn=fold)
        acts = {(r["tensor"], r["node"], r["shared_range"]) for r in q.table
                if r["input"] != "weight"}
        assert not any(t in ("extra_bias", fc) or "batchnorm" in t for t, _, _ in acts), acts
        assert any(g for _, _, g in acts)            # the residual adds still share
        seen[fold] = acts
    assert seen["qat"] == seen["deploy"]


def test_cpu_int8_is_unsigned_exactly_where_a_tensor_cannot_be_negative():
    """ReLU outputs get codes 0..255; a residual add's conv input (signed) and the network
    input keep int8; the one range a group shares stays one variable."""
    from quant_ops.graph.quantizers import quantizers
    from quant_ops.graph.sign import nonnegative

    _, _, _, sym, params = zoo_graph("cifar_resnet20_v1", (2, 3, 32, 32))
    g = Graph.from_symbol(sym)
    rw = insert_quantizers(g, QuantPolicy.preset("cpu_int8"), {k: v.shape for k, v in
                                                                params.items()})
    nonneg = nonnegative(rw.graph)
    acts = [q for q in quantizers(rw.graph) if not q.is_weight]
    safe = {q.tensor for q in acts if tuple(q.node.inputs[0][:2]) in nonneg}
    unsigned = {q.tensor for q in acts if q.unsigned}
    assert unsigned and unsigned <= safe
    assert {q.tensor for q in acts if not q.unsigned} & safe == set()
    assert "data" not in unsigned
    assert not any(q.unsigned for q in quantizers(rw.graph) if q.is_weight)
    signed_notes = [r for r in rw.table if r["note"]]
    assert signed_notes and all("signed form" in r["note"] for r in signed_notes)
    groups: dict = {}
    for q in acts:
        groups.setdefault(q.range_var, set()).add(q.unsigned)
    assert any(v == {True, False} for v in groups.values())   # a residual add's two inputs


def test_average_pooling_inputs_are_quantized_and_max_pooling_inputs_are_not():
    """A max pooling passes codes through (the quantizer after it serves); an average
    pooling's input gets one, so the engine can pool in integers."""
    _, _, _, sym, params = zoo_graph("resnet18_v1", (1, 3, 224, 224))
    g = Graph.from_symbol(sym)
    rw = insert_quantizers(g, QuantPolicy.preset("cpu_int8"), {k: v.shape for k, v in
                                                                params.items()})
    pools = {n.name: n for _, n in rw.graph.ops() if n.op == "Pooling"}
    kinds = {n.attrs.get("pool_type", "max") for n in pools.values()}
    assert kinds == {"max", "avg"}
    for n in pools.values():
        src = rw.graph.nodes[n.inputs[0][0]]
        assert (src.op == "Quantization_int8") == (n.attrs.get("pool_type") == "avg"), n.name


@pytest.mark.parametrize("weight,activation", [
    ({"method": "lsq", "bits": 4, "per_channel": True}, {"method": "pact", "bits": 4}),
    ({"method": "dorefa", "bits": 4}, {"method": "lsq", "bits": 4}),
    ({"method": "int8", "bits": 8, "per_channel": True}, {"method": "pact", "bits": 8}),
    ({"method": "fqn", "bits": 4, "per_channel": True}, {"method": "fqn", "bits": 4}),
    ({"method": "gdrq", "bits": 4, "params": {"do_quant": True}},
     {"method": "gdrq", "bits": 4, "params": {"do_quant": True}}),
    ({"method": "qil", "bits": 4, "params": {"fix_gamma": False}}, {"method": "qil", "bits": 4}),
    ({"method": "dsq", "bits": 4}, {"method": "dsq", "bits": 4}),
])
def test_low_bit_methods_rewrite_train_and_strip(weight, activation):
    from mxnet import autograd

    from quant_ops.prepare import quantize_block

    net, x, y, sym, params = zoo_graph("cifar_resnet20_v1", (2, 3, 32, 32))
    # the stem and the first block read signed tensors (the input; the stem has no ReLU),
    # which [0, a] activation methods without a signed form cannot quantize: INT8 there
    policy = QuantPolicy.from_dict({"weight": weight, "activation": activation, "overrides": [
        {"match": "*conv0_fwd", "activation": {"method": "int8", "bits": 8, "params": {}}}]})
    g = Graph.from_symbol(sym)
    rw = insert_quantizers(g, policy, {k: v.shape for k, v in params.items()},
                           {k: v.asnumpy() for k, v in params.items()})
    ops = {n.op for _, n in rw.graph.ops()}
    names = {"int8": "Quantization_int8", "pact": "PACT", "lsq": "LSQ", "dorefa": "DoReFa",
             "fqn": "FQN", "gdrq": "GDRQ", "qil": "QIL", "dsq": "DSQ"}
    assert {names[weight["method"]], names[activation["method"]]} <= ops
    assert insert_quantizers(rw.graph, policy, {k: v.shape for k, v in params.items()}) \
        .graph.to_json() == rw.graph.to_json()                     # idempotent
    assert strip_quantizers(rw.graph).to_symbol().tojson() == sym.tojson()
    q = quantize_block(net, policy)
    learned = [p for k, p in q.collect_params().items()
               if k.endswith(("_gamma", "_step", "_center", "_distance", "_dsq_upper"))]
    assert all(p.grad_req == "write" for p in learned)
    with autograd.record():
        loss = q(x).sum()
    loss.backward()
    assert not learned or any(float(mx.nd.abs(p.grad()).sum().asscalar()) > 0
                              for p in learned)
    assert np.isfinite(q(x).asnumpy()).all()
