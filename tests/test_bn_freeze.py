"""BatchNorm statistics frozen after N training steps (FitConfig.freeze_bn_after)."""
from __future__ import annotations

import logging

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd
from mxnet.gluon import nn

from quant_ops.errors import QuantOpsError
from quant_ops.prepare import quantize_block
from quant_ops.train import FitConfig, fit
from quant_ops.train.bn import count_bn, freeze_bn, frozen_bn


def float_net(seed=0):
    mx.random.seed(seed)
    net = nn.HybridSequential(prefix="bnnet_")
    with net.name_scope():
        net.add(nn.Conv2D(6, 3, padding=1, use_bias=False), nn.BatchNorm(),
                nn.Activation("relu"), nn.Conv2D(6, 3, padding=1), nn.BatchNorm(),
                nn.Activation("relu"), nn.GlobalAvgPool2D(), nn.Flatten(), nn.Dense(3))
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1, 2, 8, 8)))
    return net


def make(kind, seed=0):
    net = float_net(seed)
    if kind == "float":
        net.hybridize(static_alloc=True)
        return net
    q = quantize_block(net, "trt_int8", fold_bn="qat" if kind == "qat_folded" else None)
    q.hybridize(static_alloc=True)
    return q


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, (96, 2, 8, 8)).astype(np.float32)
    y = (x[:, 0].mean(axis=(1, 2)) > 1.0).astype(np.float32) + (x[:, 1, 0, 0] > 1.0)
    return x, y.astype(np.float32)


def snapshot(net):
    return {k: p.data().asnumpy().copy() for k, p in net.collect_params().items()}


def record_steps(net, cfg):
    """Params after every step (index 0: before the first)."""
    snaps = [snapshot(net)]
    cfg.extra["on_step"] = lambda step, rank: snaps.append(snapshot(net))
    return snaps


def changed(a, b, suffix):
    keys = [k for k in a if k.endswith(suffix)]
    assert keys, suffix
    return any(not np.array_equal(a[k], b[k]) for k in keys)


CFG = dict(epochs=2, lr=0.05, batch_size=16, schedule="constant", seed=1, progress=False)


@pytest.mark.parametrize("kind", ["float", "quantized"])
def test_statistics_stop_after_freeze_step_weights_keep_training(kind, data, caplog):
    net = make(kind)
    assert count_bn(net) == 2 and frozen_bn(net) == [False, False]
    cfg = FitConfig(**CFG, freeze_bn_after=4)
    snaps = record_steps(net, cfg)
    with caplog.at_level(logging.INFO, logger="quant_ops.train.loop"):
        progress = fit(net, data, None, cfg)
    assert progress["step"] == 12 and progress["bn_frozen_at"] == 4
    assert frozen_bn(net) == [True, True]
    assert any("step 4: BatchNorm statistics frozen in 2 of 2 layers" in r.getMessage()
               for r in caplog.records)
    for s in range(1, len(snaps)):
        before, after = snaps[s - 1], snaps[s]
        stats = changed(before, after, "running_mean") and changed(before, after, "running_var")
        assert stats == (s <= 4), f"step {s}: statistics changed={stats}"
        assert changed(before, after, "conv0_weight"), f"step {s}: weights did not train"
        assert changed(before, after, "gamma") and changed(before, after, "beta"), s
    if kind == "quantized":   # the quantizers keep observing after the freeze
        assert changed(snaps[5], snaps[-1], "_minmax")


def test_frozen_float_net_normalizes_with_running_statistics(data):
    net = make("float")
    x = mx.nd.array(data[0][:16])
    with autograd.train_mode():
        batch_stats = net(x).asnumpy()
    inference = net(x).asnumpy()
    assert not np.allclose(batch_stats, inference, atol=1e-4)   # batch statistics differ
    assert freeze_bn(net) == 2 and freeze_bn(net) == 0           # idempotent
    with autograd.train_mode():
        frozen = net(x).asnumpy()
    np.testing.assert_allclose(frozen, inference, rtol=1e-5, atol=1e-5)
    assert freeze_bn(net, frozen=False) == 2
    with autograd.train_mode():
        np.testing.assert_allclose(net(x).asnumpy(), batch_stats, rtol=1e-5, atol=1e-5)


def test_symbolblock_inside_a_hybridized_parent(data):
    inner = quantize_block(float_net(), "trt_int8")
    outer = nn.HybridSequential(prefix="outer_")
    outer.add(inner)
    outer.hybridize()
    x = mx.nd.array(data[0][:16])
    stats = [p for k, p in outer.collect_params().items() if k.endswith("running_mean")]
    with autograd.record():
        outer(x)
    first = stats[0].data().asnumpy().copy()
    assert freeze_bn(outer) == 2
    with autograd.record():
        outer(x)
    np.testing.assert_array_equal(stats[0].data().asnumpy(), first)


@pytest.mark.parametrize("stop", [3, 7])   # killed before / after the freeze step
def test_resume_is_exact_across_the_freeze(stop, data, tmp_path, caplog):
    cfg = dict(CFG, checkpoint_every=2, freeze_bn_after=5)
    full_net = make("quantized")
    full = fit(full_net, data, None, FitConfig(**cfg))
    ck = str(tmp_path / "ck")
    part = fit(make("quantized"), data, None,
               FitConfig(**cfg, checkpoint_dir=ck, stop_after_steps=stop))
    assert part["step"] == stop and ("bn_frozen_at" in part) == (stop >= 5)
    net = make("quantized", seed=1)          # a fresh process: other initial weights
    rcfg = FitConfig(**cfg, checkpoint_dir=ck)
    snaps = record_steps(net, rcfg)
    with caplog.at_level(logging.INFO, logger="quant_ops.train.loop"):
        resumed = fit(net, data, None, rcfg)
    assert resumed["step"] == full["step"] == 12 and resumed["bn_frozen_at"] == 5
    assert frozen_bn(net) == [True, True]
    msgs = " ".join(r.getMessage() for r in caplog.records)
    steps = snaps[1:]   # snaps[0] predates loading the checkpoint; steps[i]: after step stop+1+i
    moved = [changed(a, b, "running_mean") for a, b in zip(steps, steps[1:])]
    if stop >= 5:
        assert "past freeze_bn_after=5" in msgs
        assert not any(moved)                  # frozen from the first resumed step on
    else:
        assert "step 5: BatchNorm statistics frozen" in msgs
        assert moved[0] and not any(moved[1:])  # step 5 still updates them, step 6 on not
    pf, pr = snapshot(full_net), snapshot(net)
    for k in pf:
        np.testing.assert_allclose(pr[k], pf[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_folded_graph_has_frozen_statistics_already(data, caplog):
    net = make("qat_folded")
    assert count_bn(net) == 0
    cfg = FitConfig(**dict(CFG, epochs=1), freeze_bn_after=2)
    snaps = record_steps(net, cfg)
    with caplog.at_level(logging.INFO, logger="quant_ops.train.loop"):
        fit(net, data, None, cfg)
    assert not changed(snaps[0], snaps[-1], "running_mean")
    assert changed(snaps[0], snaps[-1], "gamma")
    assert any("no BatchNorm layer" in r.getMessage() for r in caplog.records)


def test_negative_freeze_step_is_refused(data):
    with pytest.raises(QuantOpsError, match="freeze_bn_after"):
        fit(make("float"), data, None, FitConfig(**CFG, freeze_bn_after=-1))
