"""ZeroQ distilled data: batches whose BN-input statistics match the BN running statistics
of a float net, usable as a calibration set."""
from __future__ import annotations

import mxnet as mx
import numpy as np
import pytest

from quant_ops.calib.graph_calib import calibrate_graph
from quant_ops.errors import QuantOpsError
from quant_ops.graph.ir import Graph
from quant_ops.prepare import quantize_graph
from quant_ops.ptq.common import runner
from quant_ops.ptq.zeroq import StatisticLoss, distill_batches, statistic_loss

SHAPE = (8, 1, 10, 10)
EPS = 1e-5


@pytest.fixture(scope="module")
def net():
    """conv-BN-relu-conv-BN-relu-FC whose running statistics are those of "training" images
    far from N(0, 1) noise (uniform on [0, 3]), as a trained net's are of its data."""
    data = mx.sym.var("data")
    x = mx.sym.Convolution(data, num_filter=4, kernel=(3, 3), pad=(1, 1), name="c1")
    x = mx.sym.BatchNorm(x, eps=EPS, fix_gamma=False, name="bn1")
    x = mx.sym.Activation(x, act_type="relu", name="r1")
    x = mx.sym.Convolution(x, num_filter=6, kernel=(3, 3), name="c2")
    x = mx.sym.BatchNorm(x, eps=EPS, fix_gamma=False, name="bn2")
    x = mx.sym.Activation(x, act_type="relu", name="r2")
    x = mx.sym.FullyConnected(x, num_hidden=3, name="fc")
    rng = np.random.default_rng(1)
    arg_shapes, _, aux_shapes = x.infer_shape(data=SHAPE)
    params = {k: rng.normal(0, 0.5, s).astype(np.float32)
              for k, s in zip(x.list_arguments(), arg_shapes) if k != "data"}
    params.update({k: np.full(s, 0.0 if "mean" in k else 1.0, np.float32)
                   for k, s in zip(x.list_auxiliary_states(), aux_shapes)})
    g = Graph.from_symbol(x)
    g.source = "tiny.json"
    train = rng.uniform(0, 3, (256,) + SHAPE[1:]).astype(np.float32)
    for bn, t in (("bn1", "c1_output"), ("bn2", "c2_output")):  # in order: bn2 sees bn1
        v = runner(g, params, train.shape, outputs=[t])(train)[0]
        params[f"{bn}_moving_mean"] = v.mean(axis=(0, 2, 3)).astype(np.float32)
        params[f"{bn}_moving_var"] = v.var(axis=(0, 2, 3)).astype(np.float32)
    return g, params


def bn_input_stats(graph, params, xb):
    """Per-channel (mean, std) of what reaches bn1 and bn2, computed in numpy."""
    # one tensor per runner: MKL-DNN's conv+BN fusion breaks a bind that groups c1 and c2
    ts = [runner(graph, params, xb.shape, outputs=[t])(xb)[0] for t in ("c1_output",
                                                                         "c2_output")]
    return [(t.mean(axis=(0, 2, 3)), np.sqrt(t.var(axis=(0, 2, 3)) + EPS)) for t in ts]


def paper_loss(graph, params, xb):
    total = 0.0
    for bn, (mu, sd) in zip(("bn1", "bn2"), bn_input_stats(graph, params, xb)):
        total += np.linalg.norm(mu - params[f"{bn}_moving_mean"])
        total += np.linalg.norm(sd - np.sqrt(params[f"{bn}_moving_var"] + EPS))
    return total


def test_loss_is_the_papers_statistic_loss(net):
    g, p = net
    x = np.random.default_rng(5).normal(0.3, 1.5, SHAPE).astype(np.float32)
    assert statistic_loss(g, p, x) == pytest.approx(paper_loss(g, p, x), rel=1e-4)
    st = StatisticLoss(g, p, SHAPE)
    total, per_bn = st.loss(x)
    assert per_bn.shape == (2,) and total == pytest.approx(per_bn.sum(), rel=1e-5)
    # the gradient is the gradient of that loss (central difference on one pixel)
    _, grad = st.loss_and_grad(x)
    i = np.unravel_index(np.argmax(np.abs(grad)), SHAPE)
    h = 1e-2
    xp, xm = x.copy(), x.copy()
    xp[i] += h
    xm[i] -= h
    fd = (paper_loss(g, p, xp) - paper_loss(g, p, xm)) / (2 * h)
    assert grad[i] == pytest.approx(fd, rel=0.05)


def test_distilled_batches_match_the_running_statistics(net):
    g, p = net
    batches = distill_batches(g, p, SHAPE, num_batches=2, steps=150, lr=0.1, progress=False)
    assert len(batches) == 2
    assert all(b.shape == SHAPE and b.dtype == np.float32 for b in batches)
    assert all(np.isfinite(b).all() for b in batches)
    noise = distill_batches(g, p, SHAPE, num_batches=2, steps=0, progress=False)
    for b, n in zip(batches, noise):
        before, after = paper_loss(g, p, n), paper_loss(g, p, b)
        assert after < before / 20, (before, after)
        for bn, (mu, sd) in zip(("bn1", "bn2"), bn_input_stats(g, p, b)):
            target_sd = np.sqrt(p[f"{bn}_moving_var"] + EPS)
            assert np.abs(mu - p[f"{bn}_moving_mean"]).max() < 0.1 * target_sd.mean()
            assert np.abs(sd / target_sd - 1).max() < 0.1


def test_steps_zero_is_the_gaussian_start_and_seeds_are_deterministic(net):
    g, p = net
    start = distill_batches(g, p, SHAPE, num_batches=1, steps=0, seed=3, progress=False)[0]
    np.testing.assert_array_equal(
        start, np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32))
    a = distill_batches(g, p, SHAPE, num_batches=2, steps=5, seed=7, progress=False)
    b = distill_batches(g, p, SHAPE, num_batches=2, steps=5, seed=7, progress=False)
    c = distill_batches(g, p, SHAPE, num_batches=2, steps=5, seed=8, progress=False)
    for u, v, w in zip(a, b, c):
        np.testing.assert_array_equal(u, v)
        assert not np.array_equal(u, w)
    assert not np.array_equal(a[0], a[1])  # each batch starts from its own noise


def test_input_range_keeps_pixels_inside(net):
    g, p = net
    lo, hi = np.float32(-0.8), np.float32(2.0)
    (b,) = distill_batches(g, p, SHAPE, num_batches=1, steps=40, lr=0.2,
                           input_range=(lo, hi), progress=False)
    assert b.min() >= lo and b.max() <= hi
    assert (b == hi).any() or (b == lo).any()  # the constraint was active
    with pytest.raises(QuantOpsError, match="empty"):
        distill_batches(g, p, SHAPE, num_batches=1, steps=1, input_range=(1, 1),
                        progress=False)
    with pytest.raises(QuantOpsError, match="schedule 'step'"):
        distill_batches(g, p, SHAPE, num_batches=1, steps=1, schedule="step", progress=False)


def test_distilled_batches_calibrate_a_quantized_graph(net):
    g, p = net
    batches = distill_batches(g, p, SHAPE, num_batches=2, steps=30, progress=False)
    q = quantize_graph(g, p, "trt_int8", fold_bn="deploy")
    qp, ranges = calibrate_graph(q.graph, q.params, batches, "minmax", progress=False)
    assert ranges and all(np.isfinite(v) and v > 0 for v in ranges.values())
    assert ranges["data_int8"] == pytest.approx(max(float(np.abs(b).max()) for b in batches))


def test_graph_without_batchnorm_is_refused():
    x = mx.sym.Convolution(mx.sym.var("data"), num_filter=2, kernel=(3, 3), name="c")
    g = Graph.from_symbol(mx.sym.Activation(x, act_type="relu"))
    g.source = "nobn-symbol.json"
    with pytest.raises(QuantOpsError, match=r"nobn-symbol\.json.*no BatchNorm"):
        distill_batches(g, {"c_weight": np.ones((2, 1, 3, 3), np.float32),
                            "c_bias": np.zeros(2, np.float32)}, SHAPE, progress=False)


@pytest.mark.parametrize("shape,match", [
    ((8, 3, 10, 10), "does not fit"),      # 3 channels into a 1-channel conv
    ((8, 1, 2, 2), "does not fit"),        # smaller than the 3x3 kernel
    ((1, 1, 10, 10), "batch of one"),      # no batch statistics
    ((8, 100), "does not fit"),            # not an image batch
])
def test_shapes_that_do_not_fit_are_refused(net, shape, match):
    g, p = net
    with pytest.raises(QuantOpsError, match=match):
        distill_batches(g, p, shape, num_batches=1, steps=1, progress=False)


def test_bn_after_a_multi_output_op():
    """The BN input is found when it is one output of several (here a SliceChannel)."""
    data = mx.sym.var("data")
    x = mx.sym.Convolution(data, num_filter=4, kernel=(3, 3), pad=(1, 1), name="c")
    parts = mx.sym.SliceChannel(x, num_outputs=2, axis=1, name="sp")
    y = mx.sym.BatchNorm(parts[1], eps=EPS, fix_gamma=False, name="bn")
    rng = np.random.default_rng(2)
    p = {"c_weight": rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32),
         "c_bias": np.zeros(4, np.float32), "bn_gamma": np.ones(2, np.float32),
         "bn_beta": np.zeros(2, np.float32), "bn_moving_mean": np.array([0.5, -0.5], np.float32),
         "bn_moving_var": np.array([2.0, 0.5], np.float32)}
    g = Graph.from_symbol(y)
    noise = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    (b,) = distill_batches(g, p, SHAPE, num_batches=1, steps=100, progress=False)
    assert statistic_loss(g, p, b) < statistic_loss(g, p, noise) / 10


def relu6_net(gamma0: float = 1.0):
    """conv-BN-ReLU6-conv-BN-ReLU6-FC (MobileNet's ReLU6 is ``clip(x, 0, 6)``), names as in
    ``net`` for ``paper_loss``; ``gamma0``: bn1's first gamma (0 makes it unfoldable)."""
    data = mx.sym.var("data")
    x = mx.sym.Convolution(data, num_filter=4, kernel=(3, 3), pad=(1, 1), name="c1")
    x = mx.sym.BatchNorm(x, eps=EPS, fix_gamma=False, name="bn1")
    x = mx.sym.clip(x, 0, 6, name="r1")
    x = mx.sym.Convolution(x, num_filter=6, kernel=(3, 3), name="c2")
    x = mx.sym.BatchNorm(x, eps=EPS, fix_gamma=False, name="bn2")
    x = mx.sym.clip(x, 0, 6, name="r2")
    x = mx.sym.FullyConnected(x, num_hidden=3, name="fc")
    rng = np.random.default_rng(4)
    arg_shapes, _, aux_shapes = x.infer_shape(data=SHAPE)
    p = {k: rng.normal(0, 0.5, s).astype(np.float32)
         for k, s in zip(x.list_arguments(), arg_shapes) if k != "data"}
    p.update({k: (rng.uniform(0.5, 2, s) if "var" in k else rng.normal(0, 0.5, s))
              .astype(np.float32) for k, s in zip(x.list_auxiliary_states(), aux_shapes)})
    p["bn1_gamma"][0] = gamma0
    return Graph.from_symbol(x), p


@pytest.mark.parametrize("gamma0", [1.0, 0.0])
def test_relu6_and_folded_bns_keep_the_papers_loss_and_gradient(gamma0):
    """ReLU6 rewritten and the BNs folded (or, with a zero gamma, not): the same loss, and
    the gradient matches a central difference."""
    g, p = relu6_net(gamma0)
    st = StatisticLoss(g, p, SHAPE)
    folded = {n for n in ("bn1", "bn2") if f"{n}_zeroq_inv_scale" in st._exe.arg_dict}
    assert folded == ({"bn1", "bn2"} if gamma0 else set())
    x = np.random.default_rng(6).normal(0.5, 1.0, SHAPE).astype(np.float32)
    total, grad = st.loss_and_grad(x)
    assert total == pytest.approx(paper_loss(g, p, x), rel=1e-5)
    h = 1e-2
    for i in np.argsort(-np.abs(grad).ravel())[:3]:
        i = np.unravel_index(i, SHAPE)
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        fd = (paper_loss(g, p, xp) - paper_loss(g, p, xm)) / (2 * h)
        assert grad[i] == pytest.approx(fd, rel=0.05)
