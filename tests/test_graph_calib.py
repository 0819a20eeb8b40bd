"""Calibration of every activation quantizer of a graph over a calibration set."""
from __future__ import annotations

import mxnet as mx
import numpy as np
import pytest

from quant_ops.calib.graph_calib import activation_tensors, calibrate_graph
from quant_ops.errors import QuantOpsError
from quant_ops.graph.ir import Graph
from quant_ops.graph.quantize import strip_quantizers
from quant_ops.prepare import quantize_graph
from quant_ops.zoo import get_model


@pytest.fixture(scope="module")
def model():
    mx.random.seed(0)       # Xavier draws from MXNet's global generator: same net in any order
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


def test_residual_add_inputs_are_calibrated_on_their_own_values(model):
    """A conv output read by a residual add: with MXNet's MKL-DNN fusion on, the executor
    that returns inner tensors hands back conv + add (the fused sum) for the conv's output,
    so calibration must run unfused.  Reference: each tensor alone as a graph's head."""
    _, sym, params, batches = model
    q = quantize_graph(Graph.from_symbol(sym), params, "trt_int8_shared", fold_bn="deploy")
    qp, ranges = calibrate_graph(q.graph, q.params, batches, "minmax", progress=False)
    internals = strip_quantizers(q.graph).to_symbol().get_internals()
    names = set(internals.list_outputs())
    want: dict = {}
    for qname, (tensor, mm) in activation_tensors(q.graph).items():
        if tensor == "data":
            continue
        t = internals[tensor if tensor in names else f"{tensor}_output"]
        args = {k: mx.nd.array(q.params[k]) for k in t.list_arguments() if k != "data"}
        for b in batches:
            exe = t.bind(mx.cpu(), {**args, "data": mx.nd.array(b)})
            want[mm] = max(want.get(mm, 0.0), float(np.abs(exe.forward()[0].asnumpy()).max()))
    for mm, v in want.items():     # a shared range is the max over the tensors sharing it
        assert qp[mm][0] == pytest.approx(v, rel=1e-6), mm
    assert len(want) < len(activation_tensors(q.graph)) - 1   # the adds' inputs do share


def test_unsigned_tensors_are_calibrated_for_their_own_grid(model):
    """An unsigned b-bit quantizer has 2^b - 1 steps on [0, a]: MSE searches that grid (the
    signed (b+1)-bit one's positive half), so it keeps a wider range than for int8 codes;
    entropy stays TensorRT's (128 levels)."""
    from quant_ops.calib.observers import make_observer
    from quant_ops.graph.quantizers import quantizers

    _, sym, params, batches = model
    q = quantize_graph(Graph.from_symbol(sym), params, "cpu_int8", fold_bn="deploy")
    acts = [a for a in quantizers(q.graph) if not a.is_weight]
    unsigned = [a for a in acts if a.unsigned]
    assert unsigned
    _, mse = calibrate_graph(q.graph, q.params, batches, "mse", progress=False)
    _, ent = calibrate_graph(q.graph, q.params, batches, "entropy", progress=False)
    internals = strip_quantizers(q.graph).to_symbol().get_internals()
    names = set(internals.list_outputs())
    for a in unsigned[:3]:
        t = internals[a.tensor if a.tensor in names else f"{a.tensor}_output"]
        args = {k: mx.nd.array(q.params[k]) for k in t.list_arguments() if k != "data"}
        vals = [t.bind(mx.cpu(), {**args, "data": mx.nd.array(b)}).forward()[0].asnumpy()
                for b in batches]
        top = max(float(np.abs(v).max()) for v in vals)

        def observed(method, bits):
            o = make_observer(method, name=a.tensor, num_bits=bits, amax_hint=top)
            for v in vals:
                o.observe(v)
            return float(o.amax())
        assert mse[a.name] == pytest.approx(observed("mse", 9), rel=1e-6)
        assert mse[a.name] != pytest.approx(observed("mse", 8), rel=1e-6)
        assert ent[a.name] == pytest.approx(observed("entropy", 8), rel=1e-6)


def test_a_shorter_last_batch_counts_like_any_other(model):
    q, _, _, batches = model
    whole = np.concatenate(batches)                        # 24 images
    _, even = calibrate_graph(q.graph, q.params, [whole[:12], whole[12:]], "minmax",
                              progress=False)
    _, uneven = calibrate_graph(q.graph, q.params, [whole[:16], whole[16:21], whole[21:]],
                                "minmax", progress=False)
    assert uneven.keys() == even.keys()
    assert all(uneven[k] == pytest.approx(even[k], rel=1e-6) for k in even)


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
    with pytest.raises(QuantOpsError, match="expected"):   # another image size
        calibrate_graph(q.graph, q.params, [batches[0], batches[0][:4, :, :14]],
                        progress=False)
    bad = batches[0].copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(QuantOpsError, match="NaN"):
        calibrate_graph(q.graph, q.params, [bad], "entropy", progress=False)
    with pytest.raises(QuantOpsError, match="NaN"):
        calibrate_graph(q.graph, q.params, [bad], "minmax", progress=False)


def _data_histogram_range(batches):
    return max(float(np.abs(b).max()) for b in batches)


def test_network_input_is_calibrated_by_minmax_unless_asked(model):
    q, _, _, _ = model
    rng = np.random.default_rng(1)   # long-tailed inputs, which entropy clips
    batches = [rng.standard_exponential((8, 3, 32, 32)).astype(np.float32) for _ in range(3)]
    _, default = calibrate_graph(q.graph, q.params, batches, "entropy", progress=False)
    _, same = calibrate_graph(q.graph, q.params, batches, "entropy", progress=False,
                              input_method=None)
    assert default["data_int8"] == pytest.approx(_data_histogram_range(batches))
    assert same["data_int8"] < 0.9 * default["data_int8"]
    others = [k for k in default if k != "data_int8"]
    assert all(default[k] == same[k] for k in others)


@pytest.mark.parametrize("method", ["entropy", "percentile", "mse"])
def test_cached_first_pass_gives_the_same_ranges(model, method):
    """Keeping the first pass's tensors (one network run) must not change any range."""
    q, _, _, batches = model
    _, cached = calibrate_graph(q.graph, q.params, batches, method, progress=False)
    _, rerun = calibrate_graph(q.graph, q.params, batches, method, progress=False,
                               cache_bytes=0)
    assert cached == rerun
    # one pass (growing histograms): percentile and MSE land within a few bins
    _, one = calibrate_graph(q.graph, q.params, batches, method, progress=False, passes=1)
    _, top = calibrate_graph(q.graph, q.params, batches, "minmax", progress=False)
    if method != "entropy":   # entropy's divergence curve can be flat: no bound promised
        for k in one:
            assert abs(one[k] - cached[k]) <= 4 * top[k] / 2048, k
    with pytest.raises(QuantOpsError, match="passes"):
        calibrate_graph(q.graph, q.params, batches, method, progress=False, passes=3)


def test_learned_range_quantizers_start_from_the_calibrated_range(model):
    """PACT clips, LSQ steps, QIL intervals and DSQ ranges are set from calibration (not
    left at their generic defaults), and MSE follows each quantizer's bit width."""
    _, sym, params, batches = model
    pol = {"weight": {"method": "lsq", "bits": 4, "per_channel": True},
           "activation": {"method": "lsq", "bits": 4},
           "overrides": [{"match": "*stage2*", "activation": {"method": "pact", "bits": 4}},
                         {"match": "*stage3*", "activation": {"method": "qil", "bits": 4}},
                         {"match": "*dense*", "activation": {"method": "dsq", "bits": 4}}]}
    q = quantize_graph(Graph.from_symbol(sym), params, pol)
    qp, ranges = calibrate_graph(q.graph, q.params, batches, "mse", progress=False)
    _, top = calibrate_graph(q.graph, q.params, batches, "minmax", progress=False)
    seen = set()
    for node in q.graph.nodes:
        if node.name not in ranges:
            continue
        amax = ranges[node.name]
        assert 0 < amax <= top[node.name] * 1.0001
        state = {q.graph.nodes[e[0]].name.replace("_qo_gradsum", "") for e in node.inputs[1:]}
        if node.op == "LSQ" and node.name != "data_lsq":
            step = qp[next(s for s in state if s.endswith("_step"))][0]
            # 4-bit: Qp = 15 unsigned, 7 in the signed form a signed tensor gets (the stem
            # output, no ReLU)
            qp_ = 7 if node.attrs.get("signed") == "True" else 15
            assert step == pytest.approx(amax / qp_, rel=1e-6)
        elif node.op == "PACT":
            assert qp[next(iter(state))][0] == pytest.approx(amax)
        elif node.op == "QIL":
            c = qp[next(s for s in state if s.endswith("_center"))][0]
            d = qp[next(s for s in state if s.endswith("_distance"))][0]
            assert (c, d) == (pytest.approx(amax / 2), pytest.approx(amax / 2))
        elif node.op == "DSQ":
            assert qp[next(s for s in state if s.endswith("_dsq_upper"))][0] == \
                pytest.approx(amax)
        seen.add(node.op)
    assert seen >= {"LSQ", "PACT", "QIL", "DSQ"}
    # 4-bit MSE clips harder than 8-bit MSE on the same tensors
    q8 = quantize_graph(Graph.from_symbol(sym), params, "trt_int8")
    _, r8 = calibrate_graph(q8.graph, q8.params, batches, "mse", progress=False)
    assert np.mean(list(ranges.values())) < np.mean(list(r8.values()))


def test_learned_weight_quantizers_start_from_bn_folded_weights():
    """With BN folded for QAT the weight is computed in-graph; LSQ's step must still come
    from that weight (the clip with the least error on its 4-bit grid, per channel), not
    from a generic default or the unfolded weight."""
    from mxnet.gluon import nn

    from quant_ops.calib.weights import int_grid, mse_clip

    net = nn.HybridSequential()
    net.add(nn.Conv2D(4, 3, use_bias=False), nn.BatchNorm(), nn.Activation("relu"),
            nn.Dense(3))
    net.initialize(mx.init.Xavier())
    x = mx.nd.random.normal(shape=(2, 1, 8, 8))
    net(x)
    bn = net[1]
    bn.gamma.set_data(mx.nd.array([0.5, 2.0, 1.0, 3.0]))
    bn.running_var.set_data(mx.nd.array([4.0, 1.0, 0.25, 1.0]))
    sym = net(mx.sym.var("data"))
    params = {p.name: p.data().asnumpy() for p in net.collect_params().values()}
    pol = {"weight": {"method": "lsq", "bits": 4, "per_channel": True},
           "activation": {"method": "lsq", "bits": 4}}
    q = quantize_graph(Graph.from_symbol(sym), params, pol, fold_bn="qat")
    w = params[net[0].weight.name]
    scale = params[bn.gamma.name] / np.sqrt(params[bn.running_var.name] + 1e-5)
    folded = w * scale.reshape(-1, 1, 1, 1)
    want = mse_clip(folded, int_grid(-8, 7), axis=0) / 7
    step = next(v for k, v in q.params.items() if "weight_folded" in k and k.endswith("_step"))
    np.testing.assert_allclose(step, np.asarray(want).reshape(-1), rtol=1e-5)


def test_unsigned_methods_on_a_signed_tensor_take_their_signed_form_or_are_refused():
    """PACT or LSQ on a tensor that can be negative (a conv output, no ReLU) take their
    signed form, and the notes say so; a method without one (DoReFa) is refused naming the
    node."""
    data = mx.sym.var("data")
    c1 = mx.sym.Convolution(data, num_filter=4, kernel=(3, 3), name="c1")   # no ReLU: signed
    c2 = mx.sym.Convolution(c1, num_filter=2, kernel=(1, 1), name="c2")
    rng = np.random.default_rng(0)
    params = {"c1_weight": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
              "c1_bias": np.zeros(4, np.float32),
              "c2_weight": rng.normal(size=(2, 4, 1, 1)).astype(np.float32),
              "c2_bias": np.zeros(2, np.float32)}
    for method in ("pact", "lsq", "dorefa"):
        pol = {"weight": {"method": "int8"}, "activation": {"method": method, "bits": 4},
               "overrides": [{"match": "c1", "activation": {"method": "int8", "params": {}}}]}
        if method == "dorefa":
            with pytest.raises(QuantOpsError, match="'c1', the input of 'c2', can be "
                                                    "negative"):
                quantize_graph(Graph.from_symbol(c2), params, pol)
            continue
        q = quantize_graph(Graph.from_symbol(c2), params, pol)
        (node,) = [n for n in q.graph.nodes if n.name == f"c1_{method}"]
        assert node.attrs["signed"] == "True"
        assert any("signed form" in n and "c1" in n for n in q.notes)
