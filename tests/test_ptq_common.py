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


def _small_net():
    data = mx.sym.var("data")
    c = mx.sym.Convolution(data, num_filter=3, kernel=(3, 3), pad=(1, 1), name="c")
    out = mx.sym.FullyConnected(mx.sym.Activation(c, act_type="relu"), num_hidden=5, name="fc")
    rng = np.random.default_rng(1)
    shapes = dict(zip(out.list_arguments(), out.infer_shape(data=(1, 2, 5, 5))[0]))
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items() if k != "data"}
    return Graph.from_symbol(out), params, rng


def test_batches_of_any_size_give_what_one_sample_at_a_time_gives():
    """A shorter last batch (and a larger one) runs on a reshaped executor: the numbers
    are those of each sample alone, and the first shape still works afterwards."""
    from quant_ops.graph.runner import Runner

    g, params, rng = _small_net()
    x = rng.normal(size=(17, 2, 5, 5)).astype(np.float32)
    one = Runner(g, params, (1, 2, 5, 5))
    expect = np.concatenate([one(x[i:i + 1])[0] for i in range(len(x))])
    run = Runner(g, params, (4, 2, 5, 5), copies=2)
    sizes = [4, 3, 4, 1, 5]               # 17 images, one batch above the bound size
    bounds = np.cumsum([0] + sizes)
    got = [run(x[a:b])[0] for a, b in zip(bounds[:-1], bounds[1:])]
    np.testing.assert_allclose(np.concatenate(got), expect, rtol=1e-5, atol=1e-5)
    streamed = list(run.stream(x[a:b] for a, b in zip(bounds[:-1], bounds[1:])))
    np.testing.assert_allclose(np.concatenate([s[0] for s in streamed]), expect,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(predict(g, params, x, batch_size=4), expect, rtol=1e-5, atol=1e-5)


def test_a_batch_of_another_sample_shape_names_the_shapes():
    import pytest

    from quant_ops.errors import QuantOpsError
    from quant_ops.graph.runner import Runner

    g, params, _ = _small_net()
    run = Runner(g, params, (4, 2, 5, 5))
    with pytest.raises(QuantOpsError, match=r"batch of shape \(4, 2, 6, 6\)"):
        run(np.zeros((4, 2, 6, 6), np.float32))
    with pytest.raises(QuantOpsError, match="batch of shape"):
        run(np.zeros((0, 2, 5, 5), np.float32))


def test_tensors_past_the_memory_bound_are_read_op_by_op_with_the_same_values():
    """Requested tensors beyond ``max_bytes`` (a Mask R-CNN head: 5.7 GB per image) are
    read through MXNet's monitor from one executor of the plain graph: the same numbers as
    the grouped outputs, for every batch size, in ``stream`` too, a variable included."""
    from quant_ops.graph.runner import Runner

    g, params, rng = _small_net()
    names = ["data", "c_output", "fc_output"]
    x = rng.normal(size=(9, 2, 5, 5)).astype(np.float32)
    grouped = Runner(g, params, (4, 2, 5, 5), outputs=names, copies=2)
    tapped = Runner(g, params, (4, 2, 5, 5), outputs=names, copies=2, max_bytes=0)
    assert grouped._tap is None and tapped._tap == names and len(tapped._exes) == 1
    batches = [x[:4], x[4:8], x[8:]]
    for a, b in zip(grouped.stream(batches), tapped.stream(batches)):
        assert len(a) == len(b) == 3
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
    for u, v in zip(grouped(x[:2]), tapped(x[:2])):
        np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(tapped(x[:2])[0], x[:2])
