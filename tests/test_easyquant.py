"""EasyQuant scale search on tiny nets: what a user checks after running it."""
from __future__ import annotations

import copy

import mxnet as mx
import numpy as np
import pytest

from quant_ops.calib.graph_calib import calibrate_graph
from quant_ops.errors import QuantOpsError
from quant_ops.graph.ir import Graph
from quant_ops.graph.quantize import strip_quantizers
from quant_ops.prepare import quantize_graph
from quant_ops.ptq.common import runner
from quant_ops.ptq.easyquant import easyquant

INT7 = {"preset": "trt_int8", "weight": {"bits": 7}, "activation": {"bits": 7}}


def tiny_net(seed: int = 0):
    """conv -> relu -> grouped strided conv -> relu -> grouped deconv -> relu -> FC, with a
    weight outlier in one channel of the first conv (the case where clipping pays)."""
    d = mx.sym.var("data")
    x = mx.sym.Convolution(d, kernel=(3, 3), pad=(1, 1), num_filter=8, name="c0")
    x = mx.sym.Activation(x, act_type="relu", name="r0")
    x = mx.sym.Convolution(x, kernel=(3, 3), pad=(1, 1), stride=(2, 2), num_filter=8,
                           num_group=4, name="c1")
    x = mx.sym.Activation(x, act_type="relu", name="r1")
    x = mx.sym.Deconvolution(x, kernel=(3, 3), stride=(2, 2), pad=(1, 1), adj=(1, 1),
                             num_filter=6, num_group=2, no_bias=False, name="d0")
    x = mx.sym.Activation(x, act_type="relu", name="r2")
    x = mx.sym.FullyConnected(x, num_hidden=5, name="fc")
    rng = np.random.default_rng(seed)
    shapes, _, _ = x.infer_shape(data=(4, 3, 8, 8))
    params = {n: (rng.standard_normal(s) * 0.3).astype(np.float32)
              for n, s in zip(x.list_arguments(), shapes) if n != "data"}
    params["c0_weight"][2, 0, 0, 0] = 3.0
    return Graph.from_symbol(x), params


def one_conv(w: np.ndarray):
    x = mx.sym.Convolution(mx.sym.var("data"), kernel=w.shape[2:], num_filter=w.shape[0],
                           no_bias=True, name="conv")
    return Graph.from_symbol(x), {"conv_weight": w}


def batches_for(shape=(4, 3, 8, 8), n=3, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


def calibrated(graph, params, batches, policy="trt_int8"):
    q = quantize_graph(graph, params, policy)
    cp, _ = calibrate_graph(q.graph, q.params, batches, "minmax", progress=False)
    return q.graph, cp


def layer_cosines(qgraph, qparams, fparams, batches, layers):
    """Cosine between each layer's float output and its output in the quantized network,
    run by MXNet with the toolkit's operators (the deployed numerics)."""
    x = np.concatenate(batches)
    names = [f"{n}_output" for n in layers]
    f = runner(strip_quantizers(qgraph), fparams, x.shape, outputs=names)(x)
    q = runner(qgraph, qparams, x.shape, outputs=names)(x)
    res = []
    for a, b in zip(f, q):
        a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        res.append(float(a @ b / np.sqrt((a @ a) * (b @ b))))
    return res


@pytest.fixture(autouse=True)
def _no_mkldnn_fusion(monkeypatch):
    # reading pre-ReLU outputs beside later ones needs MXNet's subgraph fusion off
    monkeypatch.setenv("MXNET_SUBGRAPH_BACKEND", "NONE")


@pytest.mark.parametrize("policy", ["trt_int8", INT7])
def test_layer_cosines_improve_and_match_the_runtime(policy):
    graph, params = tiny_net()
    batches = batches_for()
    qg, cp = calibrated(graph, params, batches, policy)
    new, report = easyquant(qg, cp, batches, points=30, progress=False)
    rows = report["layers"]
    assert [r["layer"] for r in rows] == ["c0", "c1", "d0", "fc"]
    bits = 8 if policy == "trt_int8" else 7
    assert report["bits"] == [bits]
    assert all(r["act_bits"] == bits and r["weight_bits"] == bits for r in rows)
    for r in rows:
        assert r["cosine_after"] >= r["cosine_before"], r["layer"]
    assert any(r["cosine_after"] > r["cosine_before"] + 1e-6 for r in rows)
    # the tiny net is sampled whole: the report's cosines are the deployed model's
    real = layer_cosines(qg, new, params, batches, [r["layer"] for r in rows])
    np.testing.assert_allclose(real, [r["cosine_after"] for r in rows], atol=1e-6)
    # the last layer's quantized output moves closer to the float one
    before = layer_cosines(qg, cp, params, batches, ["fc"])[0]
    assert real[-1] > before


def test_params_change_only_in_clipped_weights_and_ranges():
    graph, params = tiny_net()
    batches = batches_for()
    qg, cp = calibrated(graph, params, batches)
    new, report = easyquant(qg, cp, batches, points=30, progress=False)
    assert set(new) == set(cp)
    changed = {k for k in cp if not np.array_equal(np.asarray(new[k]), np.asarray(cp[k]))}
    weights = {f"{n}_weight" for n in ("c0", "c1", "d0", "fc")}
    minmax = {r["minmax"] for r in report["layers"]}
    assert changed <= weights | minmax
    assert changed & weights and changed & minmax
    for k in changed & weights:
        w0, w1 = np.asarray(cp[k]), np.asarray(new[k])
        assert w1.shape == w0.shape and w1.dtype == np.float32
        assert np.all(np.abs(w1) <= np.abs(w0))
        # a clip: each weight is kept, or cut to its channel's new max |w| with its sign
        axis = 1 if k == "d0_weight" else 0
        cut = np.moveaxis(np.abs(w1), axis, 0).reshape(w1.shape[axis], -1).max(1)
        shape = [1] * w0.ndim
        shape[axis] = -1
        np.testing.assert_array_equal(w1, np.clip(w0, -cut.reshape(shape), cut.reshape(shape)))
    for r in report["layers"]:
        assert new[r["minmax"]].shape == (1,) and new[r["minmax"]][0] > 0
        assert new[r["minmax"]][0] == pytest.approx(r["amax_after"])
        assert r["amax_after"] == pytest.approx(r["amax_before"] * r["act_factor"])
        assert all(0.5 * 0.5 - 1e-9 <= f <= 1.0 for f in r["weight_factors"])


def test_per_channel_factors_are_chosen_channel_by_channel():
    # 4-bit weights: clipping a Gaussian channel then clearly pays
    w4 = {"preset": "trt_int8", "weight": {"bits": 4}}
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((4, 8, 3, 3)) * 0.2).astype(np.float32)
    w[0, 0, 1, 1] = 1.0
    batches = batches_for((8, 8, 6, 6))
    g, p = one_conv(w)
    qg, cp = calibrated(g, p, batches, w4)
    _, rep = easyquant(qg, cp, batches, rounds=1, points=50, progress=False)
    f1 = rep["layers"][0]["weight_factors"]
    assert len(f1) == 4 and min(f1) < 0.95 and len(set(f1)) > 1
    w2 = w.copy()
    w2[2] = rng.standard_normal(w2[2].shape) * 0.5     # another channel changes
    g, p = one_conv(w2)
    qg, cp = calibrated(g, p, batches, w4)
    _, rep2 = easyquant(qg, cp, batches, rounds=1, points=50, progress=False)
    f2 = rep2["layers"][0]["weight_factors"]
    assert [f2[i] for i in (0, 1, 3)] == [f1[i] for i in (0, 1, 3)]
    assert f2[2] != f1[2]


def test_per_tensor_weights_get_one_factor():
    graph, params = tiny_net()
    batches = batches_for()
    qg, cp = calibrated(graph, params, batches,
                        {"preset": "trt_int8", "weight": {"per_channel": False}})
    new, report = easyquant(qg, cp, batches, points=20, progress=False)
    for r in report["layers"]:
        assert not r["per_channel"] and len(r["weight_factors"]) == 1
        assert r["cosine_after"] >= r["cosine_before"]
        f = r["weight_factors"][0]
        assert np.abs(new[r["weight"]]).max() == pytest.approx(
            f * np.abs(cp[r["weight"]]).max(), rel=1e-6)


def test_inputs_are_not_mutated():
    graph, params = tiny_net()
    batches = batches_for()
    qg, cp = calibrated(graph, params, batches)
    json_before = qg.to_json()
    params_before = copy.deepcopy(cp)
    batches_before = copy.deepcopy(batches)
    new, _ = easyquant(qg, cp, batches, points=20, progress=False)
    assert qg.to_json() == json_before
    assert set(cp) == set(params_before)
    for k, v in params_before.items():
        np.testing.assert_array_equal(cp[k], v)
    for a, b in zip(batches, batches_before):
        np.testing.assert_array_equal(a, b)
    assert any(new[k] is not cp[k] for k in cp)


def test_nbits_must_match_the_graph():
    graph, params = tiny_net()
    batches = batches_for()
    qg, cp = calibrated(graph, params, batches, INT7)
    _, report = easyquant(qg, cp, batches, nbits=7, points=10, rounds=1, progress=False)
    assert report["bits"] == [7]
    with pytest.raises(QuantOpsError, match="7-bit|bits"):
        qg8, cp8 = calibrated(graph, params, batches)
        easyquant(qg8, cp8, batches, nbits=7, progress=False)


def test_clear_errors():
    graph, params = tiny_net()
    batches = batches_for()
    q = quantize_graph(graph, params, "trt_int8")
    with pytest.raises(QuantOpsError, match="data_int8_minmax.*calibrate"):
        easyquant(q.graph, q.params, batches, progress=False)     # ranges still zero
    _, cp = calibrated(graph, params, batches)
    with pytest.raises(QuantOpsError, match="empty"):
        easyquant(q.graph, cp, [], progress=False)
    with pytest.raises(QuantOpsError, match="search"):
        easyquant(q.graph, cp, batches, search=(1.2, 0.5), progress=False)
    with pytest.raises(QuantOpsError, match="batch 1"):
        easyquant(q.graph, cp, [batches[0], batches[1][:, :, :4]], progress=False)
    with pytest.raises(QuantOpsError, match="no Convolution"):
        easyquant(graph, params, batches, progress=False)        # not quantized


# -- the vectorized steps against plain loops -------------------------------------------
def random_layer(k: int, og: int, rows: int = 300, seed: int = 0, bias: bool = True):
    """A 1x1 convolution as a search layer (per-channel 8-bit weights, 8-bit input) with
    quantized-network inputs ``x`` and float outputs ``out`` a little off them."""
    from quant_ops.ptq.easyquant import _State
    from quant_ops.ptq.layers import Geometry, Layer

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((og, k, 1, 1)) * 0.3).astype(np.float32)
    b = (rng.standard_normal((1, og)) * 0.1).astype(np.float32) if bias else None
    x = np.maximum(rng.standard_normal((rows, 1, k)), 0).astype(np.float32)
    x[rng.integers(rows), 0, rng.integers(k)] = 6.0                # an outlier to clip
    xf = x + rng.standard_normal(x.shape).astype(np.float32) * 0.01
    out = (xf[:, 0] @ w.reshape(og, k).T.astype(np.float64))[None]
    if bias:
        out = out + b[:, None, :]
    geo = Geometry("Convolution", (1, 1), (1, 1), (1, 1), (0, 0), (0, 0), 1)
    ly = Layer(0, "l", "Convolution", geo, "w", "b" if bias else None, act_q="q",
               minmax="mm", w_q="wq", w_axis=0, w_search=True)
    ly.x, ly.out = x, np.ascontiguousarray(out)
    wmax = np.abs(w.reshape(og, -1)).max(1).astype(np.float32)
    return ly, _State(w, wmax, np.ones(og), b)


def plain_cosines(ly, st, amaxes) -> np.ndarray:
    """Each candidate's cosine the obvious way: the reference quantizers, float64 products."""
    from quant_ops.reference import fake_quant

    w = fake_quant(st.w0, st.wmax, 8, narrow=True, axis=0).reshape(len(st.wmax), -1)
    res = []
    for a in amaxes:
        q = fake_quant(ly.x, a, 8)[:, 0].astype(np.float64) @ w.T.astype(np.float64)
        if st.bias is not None:
            q += st.bias[0]
        o = ly.out[0]
        res.append(float((q * o).sum() / np.sqrt((q * q).sum() * (o * o).sum())))
    return np.array(res)


@pytest.mark.parametrize("k,og,bias", [(24, 8, True), (6, 20, True), (6, 20, False)])
def test_activation_step_picks_what_a_loop_over_the_candidates_picks(k, og, bias):
    """The direct product (k >= og) and the Gram form (k < og: 1x1 expansions) both pick
    the candidate a plain loop over the reference quantizer picks, with its cosine."""
    from quant_ops.ptq.easyquant import _act_step

    ly, st = random_layer(k, og, bias=bias)
    amax = np.float32(np.abs(ly.x).max())
    ratios = np.concatenate([[1.0], np.linspace(0.3, 1.2, 60)])
    amaxes = (ratios * float(amax)).astype(np.float32)
    amaxes[0] = amax
    plain = plain_cosines(ly, st, amaxes)
    chosen = _act_step([ly], [st], amax, ratios, 8)
    assert chosen == amaxes[int(plain.argmax())]
    assert st.cos == pytest.approx(plain.max(), abs=1e-9)
    assert np.ptp(plain) > 1e-4             # the candidates differ: a real choice


def test_clamping_the_tail_is_clamping_everything():
    from quant_ops.ptq.easyquant import _act_quant, _tail

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((500, 2, 9)) * 0.5).astype(np.float32)
    x.reshape(-1)[rng.integers(0, x.size, 20)] *= 40
    amaxes = (np.linspace(0.2, 1.2, 30) * np.abs(x).max()).astype(np.float32)
    for bits in (8, 4):
        tail = _tail(x, amaxes, bits)
        assert tail is not None and 0 < len(tail) < x.size // 8
        for a in amaxes:
            np.testing.assert_array_equal(_act_quant(x, a, bits, np.empty_like(x), tail),
                                          _act_quant(x, a, bits))


def test_quantized_tensors_are_the_networks_after_changes():
    """The tensors a search reads, computed piecewise, equal a run of the whole network,
    before and after the params change."""
    from quant_ops.ptq.layers import QuantizedTensors, find_layers, inference_params

    graph, params = tiny_net()
    batches = batches_for()
    qg, cp = calibrated(graph, params, batches)
    layers, _ = find_layers(qg)
    run = inference_params(qg, cp)
    cache = QuantizedTensors(qg, run, batches)

    def check():
        for ly in layers:
            got = cache.get([ly.entry])[ly.entry]
            for b, v in zip(batches, got):
                want = runner(qg, run, b.shape, outputs=[ly.tensor])(b)[0]
                np.testing.assert_array_equal(v, want)

    check()
    first = layers[0]
    run[first.minmax] = run[first.minmax] * np.float32(0.5)
    run[first.weight] = np.clip(run[first.weight], -0.2, 0.2)
    cache.changed([first.minmax, first.weight])
    check()
