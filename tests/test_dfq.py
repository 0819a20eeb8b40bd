"""Data-Free Quantization (quant_ops.ptq.dfq) on tiny symbol nets built here."""
from __future__ import annotations

import mxnet as mx
import numpy as np
import pytest

from quant_ops.errors import QuantOpsError
from quant_ops.graph.ir import Graph
from quant_ops.prepare import quantize_graph
from quant_ops.ptq import dfq
from quant_ops.ptq.common import runner



def _bn(x, name):
    return mx.sym.BatchNorm(x, fix_gamma=False, eps=1e-5, name=name)


def _conv(x, name, ch, k=1, groups=1):
    return mx.sym.Convolution(x, num_filter=ch, kernel=(k, k), pad=(k // 2, k // 2),
                              num_group=groups, no_bias=True, name=name)


def _mobile_net():
    """conv -> BN -> ReLU6 -> depthwise -> BN -> ReLU -> 1x1 (linear bottleneck) whose output
    feeds a residual branch (1x1 -> BN -> ReLU -> 1x1 -> BN) and the skip-add, then
    1x1 -> BN -> ReLU -> global pool -> flatten -> FC."""
    x = mx.sym.var("data")
    x = mx.sym.clip(_bn(_conv(x, "c0", 8, 3), "bn0"), 0, 6, name="relu6_0")
    x = mx.sym.Activation(_bn(_conv(x, "dw", 8, 3, groups=8), "bn1"), act_type="relu", name="r1")
    skip = _bn(_conv(x, "pw", 6), "bn2")
    y = mx.sym.Activation(_bn(_conv(skip, "res", 12), "bn3"), act_type="relu", name="r3")
    y = _bn(_conv(y, "res2", 6), "bn4")
    x = mx.sym.elemwise_add(skip, y, name="add")
    x = mx.sym.Activation(_bn(_conv(x, "c5", 16), "bn5"), act_type="relu", name="r5")
    x = mx.sym.Pooling(x, global_pool=True, kernel=(1, 1), pool_type="avg", name="pool")
    return mx.sym.FullyConnected(mx.sym.flatten(x, name="flat"), num_hidden=10, name="fc")


def _params(sym, shape, spread=True, seed=0):
    """Random weights whose output channels have ranges spread over three decades (what makes
    per-tensor quantization and CLE interesting) and plausible BN statistics."""
    rng = np.random.default_rng(seed)
    arg, _, aux = sym.infer_shape(data=shape)
    p = {}
    for name, s in list(zip(sym.list_arguments(), arg)) + \
            list(zip(sym.list_auxiliary_states(), aux)):
        if name == "data":
            continue
        if name.endswith("weight"):
            w = rng.normal(0, 1, s) / np.sqrt(np.prod(s[1:]))
            if spread:
                w *= 10 ** rng.uniform(-2, 1, (s[0],) + (1,) * (len(s) - 1))
            p[name] = w
        elif name.endswith("gamma"):
            p[name] = rng.uniform(0.5, 2.0, s)
        elif name.endswith("moving_var"):
            p[name] = rng.uniform(0.5, 2.0, s)
        else:  # beta, moving_mean, bias
            p[name] = rng.normal(0, 0.5, s)
    return {k: v.astype(np.float32) for k, v in p.items()}


def _run(graph, params, x, outputs=None):
    return runner(graph, params, x.shape, outputs=outputs)(x)


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def mobile():
    sym = _mobile_net()
    shape = (4, 3, 8, 8)
    x = np.random.default_rng(1).normal(0, 1, shape).astype(np.float32)
    return Graph.from_symbol(sym), _params(sym, shape), x


def _plain(graph, params):
    """ReLU6 -> ReLU and BN folded only: the float function DFQ must keep."""
    return dfq.apply_dfq(graph, params, equalize=False, absorb_bias=False, bias_correction=None)


def test_cle_keeps_the_output_and_equalizes_ranges(mobile):
    graph, params, x = mobile
    g0, p0 = _plain(graph, params)
    rep = {}
    g1, p1 = dfq.apply_dfq(graph, params, absorb_bias=False, bias_correction=None, report=rep)
    pairs = rep["cle"]["pairs"]
    assert ("c0", "dw") in pairs and ("dw", "pw") in pairs      # through a depthwise conv
    assert ("res", "res2") in pairs and ("c5", "fc") in pairs   # FC after global pool/flatten
    out0, out1 = _run(g0, p0, x)[0], _run(g1, p1, x)[0]
    assert _rel(out1, out0) < 1e-4
    # the weights did change, and each pair now has equal per-channel ranges
    assert not np.allclose(p1["c0_weight"], p0["c0_weight"])
    for a, b, groups, fc in (("c0", "dw", 8, False), ("dw", "pw", 1, False),
                             ("res", "res2", 1, False), ("c5", "fc", 1, True)):
        r1 = dfq._out_ranges(p1[f"{a}_weight"])
        r2 = dfq._in_ranges(p1[f"{b}_weight"], groups, len(r1), fc)
        np.testing.assert_allclose(r1, r2, rtol=1e-3, err_msg=f"{a} -> {b}")
    # before CLE the ranges were far apart
    r1 = dfq._out_ranges(p0["res_weight"])
    assert not np.allclose(r1, dfq._in_ranges(p0["res2_weight"], 1, len(r1), False), rtol=0.1)


def test_single_pair_is_equal_after_one_sweep():
    x = mx.sym.Activation(_conv(mx.sym.var("data"), "a", 5, 3), act_type="relu", name="r")
    sym = _conv(x, "b", 4, 3)
    params = _params(sym, (2, 3, 6, 6), seed=2)
    rep = {}
    g, p, _ = dfq.cross_layer_equalize(Graph.from_symbol(sym), params, report=rep)
    r1 = dfq._out_ranges(p["a_weight"])
    np.testing.assert_allclose(r1, dfq._in_ranges(p["b_weight"], 1, 5, False), rtol=1e-6)
    assert rep["sweeps"] <= 2
    xin = np.random.default_rng(3).normal(0, 1, (2, 3, 6, 6)).astype(np.float32)
    assert _rel(_run(g, p, xin)[0], _run(Graph.from_symbol(sym), params, xin)[0]) < 1e-5


def test_cle_leaves_the_residual_add_alone(mobile):
    graph, params, x = mobile
    g0, p0 = _plain(graph, params)
    _, skipped = dfq.find_pairs(g0, p0)
    reasons = dict(skipped)
    assert "2 consumers" in reasons["pw"] and "add" in reasons["pw"]
    assert "add" in reasons["res2"]
    g1, p1 = dfq.apply_dfq(graph, params, absorb_bias=False, bias_correction=None)
    # both inputs of the add are the float tensors, not rescaled ones
    names = ["pw_output", "res2_output"]
    for a, b in zip(_run(g0, p0, x, names), _run(g1, p1, x, names)):
        assert _rel(b, a) < 1e-5
    # res2's output channels were not touched (only its input channels, by the res pair)
    np.testing.assert_allclose(p1["res2_bias"], p0["res2_bias"], rtol=1e-6)


def test_inputs_are_not_modified(mobile):
    graph, params, _ = mobile
    before_json = graph.to_json()
    before = {k: v.copy() for k, v in params.items()}
    dfq.apply_dfq(graph, params, weight_clip=1.0)
    assert graph.to_json() == before_json
    assert all(np.array_equal(before[k], params[k]) for k in before)


def _absorb_net(bn_var_factor: float, beta_lo: float, k2: int = 1, seed: int = 4):
    """conv -> BN (statistics from the data) -> ReLU -> conv; the BN's beta is high."""
    rng = np.random.default_rng(seed)
    sym = _conv(mx.sym.Activation(_bn(_conv(mx.sym.var("data"), "c1", 6, 3), "bn"),
                                  act_type="relu", name="r"), "c2", 5, k2)
    shape = (8, 3, 8, 8)
    params = _params(sym, shape, spread=False, seed=seed)
    x = rng.normal(0, 1, shape).astype(np.float32)
    pre = _run(Graph.from_symbol(sym), params, x, ["c1_output"])[0]
    params["bn_moving_mean"] = pre.mean(axis=(0, 2, 3)).astype(np.float32)
    params["bn_moving_var"] = (pre.var(axis=(0, 2, 3)) * bn_var_factor).astype(np.float32)
    params["bn_beta"] = rng.uniform(beta_lo, beta_lo + 1, 6).astype(np.float32)
    params["bn_gamma"] = rng.uniform(0.5, 1.0, 6).astype(np.float32)
    return Graph.from_symbol(sym), params, x


def test_absorption_is_exact_when_pre_activations_exceed_c():
    # the BN's variance is 4x the data's: pre-ReLU values stay within ~2 sigma of beta
    graph, params, x = _absorb_net(4.0, 3.0)
    g0, p0 = _plain(graph, params)
    _, _, stats = dfq.fold_with_stats(graph, params)
    beta, sigma = stats["c1"]
    c = np.maximum(0, beta - 3 * sigma)
    pre = _run(g0, p0, x, ["c1_output"])[0]
    assert (c > 0).all() and (pre.min(axis=(0, 2, 3)) >= c).all()  # the premise
    rep = {}
    g1, p1 = dfq.apply_dfq(graph, params, equalize=False, bias_correction=None, report=rep)
    assert rep["absorption"]["absorbed"] == [("c1", "c2", 6)]
    np.testing.assert_allclose(p1["c1_bias"], p0["c1_bias"] - c, rtol=1e-5, atol=1e-5)
    assert _rel(_run(g1, p1, x)[0], _run(g0, p0, x)[0]) < 1e-5
    # the ReLU output (what gets quantized next) lost the offset c in every channel
    hi0, hi1 = (_run(g, p, x, ["r_output"])[0].max(axis=(0, 2, 3)) for g, p in ((g0, p0), (g1, p1)))
    np.testing.assert_allclose(hi1, hi0 - c, rtol=1e-5, atol=1e-5)


def test_absorption_changes_little_when_beta_is_high():
    graph, params, x = _absorb_net(1.0, 4.0)
    g0, p0 = _plain(graph, params)
    g1, p1 = dfq.apply_dfq(graph, params, equalize=False, bias_correction=None)
    y0, y1 = _run(g0, p0, x)[0], _run(g1, p1, x)[0]
    assert "c2_bias" not in p0 and np.abs(p1["c2_bias"]).max() > 0.1  # a bias was added
    assert np.abs(y1 - y0).mean() / np.abs(y0).mean() < 1e-3


def test_absorption_skips_a_padded_next_layer_unless_asked():
    graph, params, x = _absorb_net(4.0, 3.0, k2=3)
    rep = {}
    g0, p0 = _plain(graph, params)
    g1, p1 = dfq.apply_dfq(graph, params, equalize=False, bias_correction=None, report=rep)
    assert rep["absorption"]["absorbed"] == [] and rep["absorption"]["skipped"][0][0] == "c1"
    assert _rel(_run(g1, p1, x)[0], _run(g0, p0, x)[0]) < 1e-5
    rep = {}
    dfq.apply_dfq(graph, params, equalize=False, bias_correction=None, absorb_padded=True,
                  report=rep)
    assert rep["absorption"]["absorbed"] == [("c1", "c2", 6)]


def test_relu_normal_mean_matches_sampling():
    mu, sigma = np.array([-1.0, 0.0, 0.7, 3.0, 2.0]), np.array([1.0, 2.0, 0.5, 1.0, 0.0])
    z = np.random.default_rng(5).normal(0, 1, (200000, 1))
    np.testing.assert_allclose(dfq.relu_normal_mean(mu, sigma),
                               np.maximum(mu + sigma * z, 0).mean(axis=0), atol=0.01)


W4_ONLY = {"weight": {"method": "int8", "bits": 4, "per_channel": False},
           "skip": {"first_layer": True}, "overrides": [{"match": "*", "activation": None}]}


def _mean_bias_error(graph, params, g_ref, p_ref, x):
    q = quantize_graph(graph, params, W4_ONLY)
    err = _run(q.graph, q.params, x)[0] - _run(g_ref, p_ref, x)[0]
    return float(np.abs(err.mean(axis=(0, 2, 3))).mean())


@pytest.mark.parametrize("mode", ["data_free", "empirical"])
def test_bias_correction_reduces_the_mean_output_error(mode):
    graph, params, x = _absorb_net(1.0, 0.0)
    # a layer whose weights have a large per-tensor range: 4-bit rounding biases its output
    params["c2_weight"] = params["c2_weight"] * np.array([20, 1, 1, 1, 1], np.float32
                                                         ).reshape(5, 1, 1, 1)
    g0, p0 = _plain(graph, params)
    rep = {}
    g1, p1 = dfq.apply_dfq(graph, params, equalize=False, absorb_bias=False,
                           bias_correction=mode, policy=W4_ONLY, report=rep,
                           calib_batches=[x[:4], x[4:]])
    assert rep["bias_correction"]["corrected"] == ["c2"]  # c1 stays float (skip.first_layer)
    before = _mean_bias_error(g0, p0, g0, p0, x)
    after = _mean_bias_error(g1, p1, g0, p0, x)
    assert after < 0.5 * before, (before, after)


def test_bias_correction_matches_the_graph_quantizer():
    w = np.random.default_rng(6).normal(0, 1, (4, 3, 3, 3)).astype(np.float32)
    from quant_ops.policy import QuantSpec

    q = dfq.quantized_weight(w, QuantSpec("int8", 8, per_channel=False))
    s = np.float32(np.abs(w).max()) / np.float32(127)
    np.testing.assert_array_equal(q, np.clip(np.rint(w / s), -127, 127) * s)
    qc = dfq.quantized_weight(w, QuantSpec("int8", 8, per_channel=True))
    assert len(np.unique(np.abs(qc).reshape(4, -1).max(axis=1))) == 4


def test_data_free_correction_skips_layers_without_bn_input(mobile):
    graph, params, _ = mobile
    rep = {}
    dfq.apply_dfq(graph, params, report=rep)
    bc = rep["bias_correction"]
    assert "c0" in bc["uncorrected"]                  # reads the raw input
    assert {"dw", "pw", "res", "res2", "fc"} <= set(bc["corrected"])
    assert "c5" in bc["corrected"]                    # input: add of two BN outputs


def test_weight_clip_bounds(mobile):
    graph, params, _ = mobile
    g0, p0 = _plain(graph, params)
    _, p1 = dfq.clip_weights(g0, p0, 0.5)
    for k in ("c0_weight", "dw_weight", "fc_weight"):
        assert np.abs(p1[k]).max() <= 0.5
        inside = np.abs(p0[k]) <= 0.5
        np.testing.assert_array_equal(p1[k][inside], p0[k][inside])
    assert np.abs(p0["c0_weight"]).max() > 0.5
    _, p2 = dfq.apply_dfq(graph, params, weight_clip=0.5, bias_correction=None)
    assert max(np.abs(p2[k]).max() for k in p2 if k.endswith("weight")) <= 0.5


def test_bad_input_raises():
    relu_only = Graph.from_symbol(mx.sym.Activation(mx.sym.var("data"), act_type="relu",
                                                    name="only_relu"))
    with pytest.raises(QuantOpsError, match="no Convolution or FullyConnected"):
        dfq.apply_dfq(relu_only, {})
    sym = _conv(mx.sym.Activation(_conv(mx.sym.var("data"), "c1", 4, 3), act_type="relu"),
                "c2", 4)
    params = _params(sym, (1, 3, 6, 6))
    del params["c2_weight"]
    with pytest.raises(QuantOpsError, match="'c2_weight' of 'c2'"):
        dfq.apply_dfq(Graph.from_symbol(sym), params)
    graph, params, _ = _absorb_net(1.0, 0.0)
    del params["bn_moving_var"]
    with pytest.raises(QuantOpsError, match="'bn'.*bn_moving_var"):
        dfq.apply_dfq(graph, params)
    graph, params, _ = _absorb_net(1.0, 0.0)
    with pytest.raises(QuantOpsError, match="bias correction"):
        dfq.apply_dfq(graph, params, bias_correction="magic")
    with pytest.raises(QuantOpsError, match="calib_batches"):
        dfq.apply_dfq(graph, params, bias_correction="empirical")
    with pytest.raises(QuantOpsError, match="weight_clip"):
        dfq.apply_dfq(graph, params, weight_clip=-1)
    with pytest.raises(QuantOpsError, match="int8 weights only"):
        dfq.apply_dfq(graph, params, policy={"weight": {"method": "dorefa", "bits": 4}})


def test_real_mobilenet_cle_keeps_float_and_shrinks_per_tensor_error():
    from quant_ops.cli.common import EXAMPLE_MODELS as MODELS
    from quant_ops.ptq.common import load_fmnist_model

    if not (MODELS / "fmnist_mobilenetv2.json").is_file():
        pytest.skip("examples/models/fmnist_mobilenetv2 not trained yet")
    from quant_ops.datasets import fashion_mnist

    model = load_fmnist_model(MODELS / "fmnist_mobilenetv2")
    x = model.normalize(fashion_mnist("test")[0][:16])
    g0, p0 = _plain(model.graph, model.params)
    g1, p1 = dfq.apply_dfq(model.graph, model.params)
    ge, pe = dfq.apply_dfq(model.graph, model.params, absorb_bias=False, bias_correction=None)
    y0 = _run(g0, p0, x)[0]
    assert _rel(_run(ge, pe, x)[0], y0) < 1e-4
    w8 = {"weight": {"method": "int8", "bits": 8, "per_channel": False},
          "overrides": [{"match": "*", "activation": None}]}
    errs = []
    for g, p in ((g0, p0), (g1, p1)):
        q = quantize_graph(g, p, w8)
        errs.append(float(np.abs(_run(q.graph, q.params, x)[0] - y0).mean()))
    assert errs[1] < 0.25 * errs[0], errs
