"""The runner the PTQ passes share: inner tensors of a graph, read without MKL-DNN fusing
them away."""
from __future__ import annotations

import mxnet as mx
import numpy as np

from quant_ops.graph.ir import Graph
from quant_ops.ptq.common import predict, runner


def test_inner_outputs_of_a_fusable_conv_bn_relu_chain():
    data = mx.sym.var("data")
    c1 = mx.sym.Convolution(data, num_filter=4, kernel=(3, 3), pad=(1, 1), name="c1")
    b1 = mx.sym.BatchNorm(c1, name="b1", fix_gamma=False)
    r1 = mx.sym.Activation(b1, act_type="relu", name="r1")
    c2 = mx.sym.Convolution(r1, num_filter=3, kernel=(1, 1), name="c2")
    out = mx.sym.Activation(c2, act_type="relu", name="r2")
    rng = np.random.default_rng(0)
    shapes = dict(zip(out.list_arguments(), out.infer_shape(data=(2, 2, 6, 6))[0]))
    aux_shapes = dict(zip(out.list_auxiliary_states(), out.infer_shape(data=(2, 2, 6, 6))[2]))
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items() if k != "data"}
    params.update({k: (rng.uniform(0.5, 2, s) if "var" in k else rng.normal(size=s))
                   .astype(np.float32) for k, s in aux_shapes.items()})
    g = Graph.from_symbol(out)
    x = rng.normal(size=(2, 2, 6, 6)).astype(np.float32)
    run = runner(g, params, x.shape, outputs=["c1_output", "c2_output", "r2_output"])
    c1v, c2v, r2v = run(x)
    # the same tensors from separate unfused executors
    for sym, got in ((c1, c1v), (c2, c2v)):
        args = {k: mx.nd.array(params[k]) for k in sym.list_arguments() if k != "data"}
        aux = {k: mx.nd.array(params[k]) for k in sym.list_auxiliary_states()}
        exe = sym.bind(mx.cpu(), {**args, "data": mx.nd.array(x)}, aux_states=aux,
                       grad_req="null")
        np.testing.assert_allclose(got, exe.forward(is_train=False)[0].asnumpy(),
                                   rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(r2v, np.maximum(c2v, 0), rtol=1e-6)
    np.testing.assert_allclose(predict(g, params, x, batch_size=2), r2v, rtol=1e-4, atol=1e-5)
