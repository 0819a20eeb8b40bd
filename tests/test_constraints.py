"""Learned quantizer parameters are projected back into their domains after each step."""
from __future__ import annotations

import mxnet as mx
import numpy as np
from mxnet.gluon import nn

from quant_ops.prepare import quantize_block
from quant_ops.train import FitConfig, fit
from quant_ops import methods
from quant_ops.methods.dsq import MIN_WIDTH
from quant_ops.train.constraints import Projector


def _net(policy):
    net = nn.HybridSequential()
    # every layer reads a ReLU's output: [0, a] activation methods (DSQ) may quantize it
    net.add(nn.Activation("relu"), nn.Conv2D(4, 3, activation="relu"),
            nn.Conv2D(4, 3, activation="relu"), nn.Dense(3))
    net.initialize(mx.init.Xavier())
    x = mx.nd.random.uniform(shape=(8, 1, 8, 8))
    net(x)
    return quantize_block(net, policy), x


def test_projection_restores_every_domain():
    q, _ = _net({"weight": {"method": "dsq", "bits": 2}, "activation": {"method": "dsq", "bits": 2}})
    params = q.collect_params()
    alphas = [p for n, p in params.items() if n.endswith("_dsq_alpha")]
    uppers = [p for n, p in params.items() if n.endswith("_dsq_upper")]
    assert alphas and uppers
    alphas[0].set_data(mx.nd.array([3.0]))
    alphas[1].set_data(mx.nd.array([-1.0]))
    lower = params[uppers[0].name[:-len("_upper")] + "_lower"]
    lower.set_data(mx.nd.array([2.0]))
    uppers[0].set_data(mx.nd.array([1.0]))
    project = Projector(q)
    assert project() == 4 and project() == 0          # 4 arrays; idempotent
    lo, hi = methods.get("dsq").input("dsq_alpha").domain
    assert alphas[0].data().asscalar() == np.float32(hi)
    assert alphas[1].data().asscalar() == np.float32(lo)
    width = uppers[0].data().asscalar() - lower.data().asscalar()
    assert abs(width - MIN_WIDTH) < 1e-6 and abs(lower.data().asscalar() - 1.5) < 1e-3


def test_training_keeps_dsq_and_lsq_parameters_valid_at_a_hot_learning_rate():
    q, _ = _net({"weight": {"method": "lsq", "bits": 2},
                 "activation": {"method": "dsq", "bits": 2}})
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(64, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 64)
    fit(q, (x, y), None, FitConfig(epochs=2, lr=5.0, batch_size=16, schedule="constant",
                                   progress=False))
    for n, p in q.collect_params().items():
        v = p.data().asnumpy()
        if n.endswith("_dsq_alpha"):
            assert 0 < v.min() and v.max() < 0.5, (n, v)
        if n.endswith("_lsq_step"):
            assert v.min() > 0, (n, v)
