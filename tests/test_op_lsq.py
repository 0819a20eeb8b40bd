"""LSQ (Learned Step Size Quantization, Esser et al., arXiv:1902.08153): forward and backward
bit for bit against the numpy reference (quant_ops/refs/lsq.py), the step gradient against
finite differences of the paper's estimator, the gradient scale, the initialization helper,
edge values, nd / symbol / hybridized Gluon (a training loop that moves the step) and errors."""
from __future__ import annotations

import math

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import quant_ops  # noqa: F401  (loads the operator library)
from quant_ops.refs import lsq as ref
from quant_ops.refs.lsq import LSQAttrs

f32 = np.float32


def bits(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=f32).view(np.uint32)


def same(a, b) -> bool:
    return np.array_equal(bits(a), bits(b))


def run(x, step, grad, **attrs):
    """nd forward + backward with both inputs attached; returns (y, dx, dstep) as numpy."""
    xs, st = mx.nd.array(x), mx.nd.array(step)
    xs.attach_grad()
    st.attach_grad()
    with autograd.record():
        y = mx.nd.LSQ(xs, st, **attrs)
    y.backward(mx.nd.array(grad))
    return y.asnumpy(), xs.grad.asnumpy(), st.grad.asnumpy()


# (attrs, data shape): per tensor (activations unsigned, weights signed), per channel on axes
# 0, 1, 2 (rows longer than one summation chunk, with a tail), explicit ``signed``, 2 and 8 bits
CONFIGS = [
    (LSQAttrs(), (8, 3, 17, 5)),
    (LSQAttrs(nbits=2, signed=True), (4, 1000)),
    (LSQAttrs(nbits=8), (3, 5000)),
    (LSQAttrs(is_weight=True), (2500, 7)),
    (LSQAttrs(is_weight=True, nbits=3, signed=False), (300,)),
    (LSQAttrs(is_weight=True, is_weight_perchannel=True), (16, 3, 3, 3)),
    (LSQAttrs(is_weight=True, is_weight_perchannel=True, channel_axis=1), (3, 5, 9001)),
    (LSQAttrs(is_weight=True, is_weight_perchannel=True, channel_axis=2, nbits=2), (5, 7, 9, 3)),
]
IDS = [f"{'w' if a.is_weight else 'a'}{a.nbits}"
       f"{'' if a.axis is None else 'pc' + str(a.channel_axis)}"
       f"{'' if a.signed is None else ('s' if a.signed else 'u')}-{'x'.join(map(str, s))}"
       for a, s in CONFIGS]


def sample(attrs: LSQAttrs, shape, seed, scale=0.7):
    """Data with zeros, both signs, some values beyond the range; its step (init * scale)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, shape).astype(f32)
    x.flat[::13] = 0
    x.flat[::29] *= 6
    step = ref.init_step(x, attrs) * f32(scale)
    return x, step, rng.normal(0, 1, shape).astype(f32)


# -- forward ----------------------------------------------------------------------------

def test_bounds_follow_the_paper():
    assert ref.bounds(4, signed=True) == (8, 7)
    assert ref.bounds(4, signed=False) == (0, 15)
    assert ref.bounds(2, signed=True) == (2, 1)
    x = np.array([-5, -0.26, -0.25, 0, 0.25, 0.75, 1.25, 7.4, 100], f32)
    # activations default to unsigned (Qn = 0, Qp = 15): codes 0..15, ties to even
    y, _, _ = run(x, [0.5], np.ones_like(x))
    assert np.array_equal(y, np.array([0, 0, 0, 0, 0, 1, 1, 7.5, 7.5], f32))
    # weights default to signed (Qn = 8, Qp = 7); signed=False / True override the default
    want_signed = np.array([-4, -0.5, 0, 0, 0, 1, 1, 3.5, 3.5], f32)
    y, _, _ = run(x, [0.5], np.ones_like(x), is_weight=True)
    assert same(y, want_signed)  # rint(-0.5) = -0 comes out as +0
    y2, _, _ = run(x, [0.5], np.ones_like(x), signed=True)
    assert same(y2, want_signed)
    y3, _, _ = run(x, [0.5], np.ones_like(x), is_weight=True, signed=False)
    assert np.array_equal(y3, np.array([0, 0, 0, 0, 0, 1, 1, 7.5, 7.5], f32))


@pytest.mark.parametrize("attrs,shape", CONFIGS, ids=IDS)
def test_forward_and_backward_match_reference(attrs, shape):
    x, step, g = sample(attrs, shape, seed=len(shape) + shape[-1])
    y, dx, ds = run(x, step, g, **attrs.as_kwargs())
    assert same(y, ref.lsq_forward(x, step, attrs))
    rdx, rds = ref.lsq_backward(g, x, step, attrs)
    assert same(dx, rdx)
    assert same(ds, rds)
    assert ds.shape == step.shape
    assert 0 < (dx == 0).sum() < dx.size  # some values were clipped, most not


def test_ties_round_half_to_even():
    s = f32(0.37)
    k = np.arange(-10, 20, dtype=f32)
    x = ((k + f32(0.5)) * s).astype(f32)
    x = x[(x / s) == k + f32(0.5)]  # only exact ties in float32
    assert x.size > 10
    for signed in (False, True):
        a = LSQAttrs(signed=signed)
        y, _, _ = run(x, [s], np.ones_like(x), signed=signed)
        assert same(y, ref.lsq_forward(x, [s], a))
        qn, qp = ref.bounds(4, signed)
        want = np.clip(np.rint(x / s), -qn, qp) * s
        assert np.array_equal(y, want.astype(f32))


def test_edge_values():
    """NaN in gives NaN out; infinities saturate; a zero step is the limit s -> 0+ (no NaN
    from 0/0, and a gradient that moves it); a negative step is the same formula."""
    x = np.array([np.nan, np.inf, -np.inf, 0, -0.0, 1e-30, 3, -3, 1e30], f32)
    g = np.linspace(-1, 1, x.size).astype(f32)
    for attrs in (LSQAttrs(), LSQAttrs(is_weight=True)):
        for s in (0.5, 0.0, -0.5, 1e-38, np.inf):
            y, dx, ds = run(x, [s], g, **attrs.as_kwargs())
            ry = ref.lsq_forward(x, [s], attrs)
            rdx, rds = ref.lsq_backward(g, x, [s], attrs)
            assert same(y, ry) and same(dx, rdx), (attrs, s)
            assert same(ds, rds) or (np.isnan(ds).all() and np.isnan(rds).all()), (attrs, s)
            assert np.isnan(y[0]) and dx[0] == 0 and np.isnan(ds[0])  # NaN data
    # the zero step: all zeros out, and dL/ds = g * (Qp * sum(g over v > 0) - Qn * sum(v < 0))
    x = np.array([-2, -1, 0, 1, 2, 3], f32)
    g = np.array([1, 2, 3, 4, 5, 6], f32)
    y, dx, ds = run(x, [0.0], g, is_weight=True)
    assert np.array_equal(y, np.zeros(6, f32)) and not np.isnan(y).any()
    assert np.array_equal(dx, np.array([0, 0, 3, 0, 0, 0], f32))
    gs = ref.grad_scale(x.shape, LSQAttrs(is_weight=True))
    assert ds[0] == f32(7 * (4 + 5 + 6) - 8 * (1 + 2)) * gs


# -- the gradient is the paper's estimator ----------------------------------------------

def away_from_boundaries(attrs: LSQAttrs, shape, seed):
    """Data whose v/s stays 0.05 away from the clip bounds and 0.02 from rounding ties."""
    rng = np.random.default_rng(seed)
    qn, qp = ref.bounds(attrs.nbits, attrs.is_signed)
    c = shape[attrs.axis] if attrs.axis is not None else 1
    step = rng.uniform(0.05, 2.0, c).astype(f32)
    lo, hi = -qn - 3, qp + 3
    r = rng.uniform(lo, hi, shape)
    frac = r - np.floor(r)
    r = np.where(np.abs(frac - 0.5) < 0.02, r + 0.1, r)
    r = np.where(np.abs(r + qn) < 0.05, -qn + 0.2, r)
    r = np.where(np.abs(r - qp) < 0.05, qp - 0.2, r)
    x = (r * broadcast(step, attrs, len(shape))).astype(f32)
    return x, step, rng.normal(0, 1, shape).astype(f32)


def broadcast(step, attrs: LSQAttrs, ndim: int) -> np.ndarray:
    if attrs.axis is None:
        return np.asarray(step).reshape(())
    return np.asarray(step).reshape([-1 if i == attrs.axis else 1 for i in range(ndim)])


def per_channel_sum(a: np.ndarray, attrs: LSQAttrs) -> np.ndarray:
    if attrs.axis is None:
        return np.array([a.sum()])
    return np.moveaxis(a, attrs.axis, 0).reshape(a.shape[attrs.axis], -1).sum(axis=1)


@pytest.mark.parametrize("attrs,shape", [
    (LSQAttrs(), (6, 4, 5)),
    (LSQAttrs(nbits=3, signed=True), (10, 30)),
    (LSQAttrs(is_weight=True), (40, 9)),
    (LSQAttrs(is_weight=True, is_weight_perchannel=True), (6, 2, 3, 3)),
    (LSQAttrs(is_weight=True, is_weight_perchannel=True, channel_axis=1, nbits=2), (4, 5, 7)),
], ids=["act4u", "act3s", "w4", "w4pc0", "w2pc1"])
def test_gradients_are_central_differences_of_the_estimator(attrs, shape):
    """L(v, s) = sum(g_out * v_hat(v, s)) with the rounding offset round(c) - c held at its
    value at s (the straight-through surrogate).  Away from the clip bounds it is linear in s
    and in v, so central differences in float64 are exact up to rounding: the reference's
    dL/ds must equal them times g = 1/sqrt(N Qp), its dL/dv must equal them, and the
    operator must equal the reference bit for bit."""
    x, step, g = away_from_boundaries(attrs, shape, seed=sum(shape))
    rdx, rds = ref.lsq_backward(g, x, step, attrs)
    y, dx, ds = run(x, step, g, **attrs.as_kwargs())
    assert same(ds, rds) and same(dx, rdx)

    s64 = step.astype(np.float64)
    h = 1e-3 * s64

    def loss_s(s):
        return per_channel_sum(ref.estimator_terms(x, s, g, (x, step), attrs), attrs)

    num_s = (loss_s(s64 + h) - loss_s(s64 - h)) / (2 * h)
    gs = float(ref.grad_scale(x.shape, attrs))
    np.testing.assert_allclose(rds, num_s * gs, rtol=2e-5, atol=1e-6 * gs * x.size)

    hx = 1e-3
    x64 = x.astype(np.float64)
    num_x = (ref.estimator_terms(x64 + hx, step, g, (x, step), attrs)
             - ref.estimator_terms(x64 - hx, step, g, (x, step), attrs)) / (2 * hx)
    np.testing.assert_allclose(rdx, num_x, rtol=1e-6, atol=1e-6)
    assert (rdx == 0).any() and (rdx != 0).any()  # both sides of the clip were exercised

    # LSQ is not the derivative of the quantizer itself: where no value crosses a rounding
    # boundary, d(sum g * v_hat)/ds = sum g * code; LSQ subtracts v/s inside the range (eq. 3)
    qn, qp = ref.bounds(attrs.nbits, attrs.is_signed)

    g64 = g.astype(np.float64)

    def codes(s):
        return np.clip(np.rint(x64 / broadcast(s, attrs, x.ndim)), -qn, qp)

    def loss(s):
        return per_channel_sum(g64 * codes(s) * broadcast(s, attrs, x.ndim), attrs)

    sp, sm = s64 * (1 + 5e-4), s64 * (1 - 5e-4)
    assert np.array_equal(codes(sp), codes(sm))
    d_true = (loss(sp) - loss(sm)) / (sp - sm)
    np.testing.assert_allclose(d_true, per_channel_sum(g64 * codes(s64), attrs), rtol=1e-9)
    assert not np.allclose(rds / gs, d_true, rtol=1e-3)


def test_gradient_scale():
    """g = 1/sqrt(N Qp); N = elements of one step for weights (of one channel per channel),
    features of one example (size / shape[0]) for activations.  With every value above the
    range dL/dv_hat = 1 gives dL/ds = (elements of the step) * Qp * g."""
    shape = (8, 3, 4, 4)
    x = np.full(shape, 100.0, f32)
    g = np.ones(shape, f32)
    for attrs, n, c in [(LSQAttrs(), 48, 1), (LSQAttrs(is_weight=True), 384, 1),
                        (LSQAttrs(is_weight=True, is_weight_perchannel=True), 48, 8),
                        (LSQAttrs(is_weight=True, is_weight_perchannel=True,
                                  channel_axis=1), 128, 3)]:
        qp = ref.bounds(attrs.nbits, attrs.is_signed)[1]
        assert ref.elements_per_step(shape, attrs) == n
        assert ref.grad_scale(shape, attrs) == f32(1 / math.sqrt(n * qp))
        _, dx, ds = run(x, np.ones(c, f32), g, **attrs.as_kwargs())
        per_step = x.size // c
        np.testing.assert_allclose(ds, np.full(c, per_step * qp / math.sqrt(n * qp)), rtol=1e-6)
        assert not dx.any()


def test_init_step():
    """s0 = 2 mean|v| / sqrt(Qp) (paper section 2.1), per tensor or per channel."""
    w = np.array([[1, -3], [0, 0.5]], f32)
    assert ref.init_step(w, LSQAttrs(is_weight=True))[0] == f32(2 * 1.125 / math.sqrt(7))
    pc = ref.init_step(w, LSQAttrs(is_weight=True, is_weight_perchannel=True))
    assert np.array_equal(pc, np.array([2 * 2 / math.sqrt(7), 2 * 0.25 / math.sqrt(7)], f32))
    a = np.abs(np.random.default_rng(1).normal(size=(4, 10))).astype(f32)
    s0 = ref.init_step(a, LSQAttrs(nbits=3))
    assert s0.shape == (1,) and s0.dtype == f32
    assert s0[0] == f32(2 * a.astype(np.float64).mean() / math.sqrt(7))
    assert ref.init_step(np.zeros(5, f32))[0] == 0


# -- symbol and Gluon -------------------------------------------------------------------

def test_symbol_simple_bind():
    attrs = LSQAttrs(is_weight=True, is_weight_perchannel=True)
    x, step, g = sample(attrs, (6, 4, 3), seed=9)
    sym = mx.sym.LSQ(mx.sym.var("data"), mx.sym.var("q_step", shape=(6,)), name="q",
                     **attrs.as_kwargs())
    assert sym.list_arguments() == ["data", "q_step"] and sym.list_auxiliary_states() == []
    exe = sym.simple_bind(mx.cpu(), data=x.shape, grad_req="write")
    assert exe.arg_dict["q_step"].shape == (6,)
    exe.arg_dict["data"][:] = x
    exe.arg_dict["q_step"][:] = step
    exe.forward(is_train=True)
    exe.backward(mx.nd.array(g))
    rdx, rds = ref.lsq_backward(g, x, step, attrs)
    assert same(exe.outputs[0].asnumpy(), ref.lsq_forward(x, step, attrs))
    assert same(exe.grad_dict["data"].asnumpy(), rdx)
    assert same(exe.grad_dict["q_step"].asnumpy(), rds)
    # only the step learns (the data gradient is not requested)
    exe = sym.simple_bind(mx.cpu(), data=x.shape, grad_req={"data": "null", "q_step": "write"})
    exe.arg_dict["data"][:] = x
    exe.arg_dict["q_step"][:] = step
    exe.forward(is_train=True)
    exe.backward(mx.nd.array(g))
    assert same(exe.grad_dict["q_step"].asnumpy(), rds)


def test_nd_gradient_of_one_input_only():
    x, step, g = sample(LSQAttrs(), (4, 50), seed=10)
    rdx, rds = ref.lsq_backward(g, x, step)
    st = mx.nd.array(step)
    st.attach_grad()
    with autograd.record():
        y = mx.nd.LSQ(mx.nd.array(x), st)
    y.backward(mx.nd.array(g))
    assert same(st.grad.asnumpy(), rds)
    xs = mx.nd.array(x)
    xs.attach_grad()
    with autograd.record():
        y = mx.nd.LSQ(xs, mx.nd.array(step))
    y.backward(mx.nd.array(g))
    assert same(xs.grad.asnumpy(), rdx)


class LSQBlock(gluon.HybridBlock):
    """An LSQ quantizer with its step as a trained parameter (test helper)."""

    def __init__(self, channels=1, init=1.0, **attrs):
        super().__init__()
        self._attrs = attrs
        with self.name_scope():
            self.step = self.params.get("step", shape=(channels,),
                                        init=mx.init.Constant(init))

    def hybrid_forward(self, F, x, step):  # noqa: N803
        return F.LSQ(x, step, **self._attrs)


@pytest.mark.parametrize("hybrid", [None, {}, {"static_alloc": True}])
def test_gradient_accumulation_gluon(hybrid):
    x = np.linspace(-1, 3, 12, dtype=f32).reshape(3, 4)
    _, rds = ref.lsq_backward(np.ones_like(x), x, [0.3])
    net = LSQBlock(init=0.3)
    net.initialize()
    if hybrid is not None:
        net.hybridize(**hybrid)
    net.step.grad_req = "add"
    net.step.zero_grad()
    for _ in range(2):
        with autograd.record():
            y = net(mx.nd.array(x))
        y.backward()
    assert net.step.grad().asnumpy()[0] == rds[0] * f32(2)


def reconstruction_run(hybrid, iters=25):
    """Quantize data ~ N(0, 4) (signed activations) from a step 100x too small, and learn the
    step on the reconstruction loss mean((v_hat - v)^2) with SGD."""
    rng = np.random.default_rng(12)
    xs = [rng.normal(0, 4, (16, 32)).astype(f32) for _ in range(iters)]
    net = LSQBlock(init=0.01, signed=True)
    net.initialize()
    if hybrid is not None:
        net.hybridize(**hybrid)
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.05})
    attrs = LSQAttrs(signed=True)
    steps, losses = [], []
    for x in xs:
        s = net.step.data().asnumpy()
        xin = mx.nd.array(x)
        xin.attach_grad()
        with autograd.record():
            y = net(xin)
        yv = y.asnumpy()
        head = (f32(2 / x.size) * (yv - x)).astype(f32)
        y.backward(mx.nd.array(head))
        rdx, rds = ref.lsq_backward(head, x, s, attrs)
        assert same(yv, ref.lsq_forward(x, s, attrs))
        assert same(net.step.grad().asnumpy(), rds)
        assert same(xin.grad.asnumpy(), rdx)
        trainer.step(1)
        steps.append(s[0])
        losses.append(float(np.mean((yv - x) ** 2)))
    return np.array(steps), np.array(losses)


def test_gluon_training_moves_the_step():
    runs = {str(h): reconstruction_run(h)
            for h in (None, {}, {"static_alloc": True, "static_shape": True})}
    steps, losses = runs["None"]
    for s2, l2 in runs.values():  # imperative and hybridized runs are the same, bit for bit
        assert same(s2, steps) and np.array_equal(l2, losses)
    assert steps[0] == f32(0.01)
    assert np.all(np.diff(steps[:10]) > 0)  # every value saturates: the step can only grow
    assert steps[-1] > 50 * steps[0]
    assert losses[-1] < 0.1 * losses[0]
    # it settles near the paper's initialization's order of magnitude for this data
    s0 = ref.init_step(np.random.default_rng(0).normal(0, 4, 10000), LSQAttrs(signed=True))
    assert 0.2 * s0[0] < steps[-1] < 5 * s0[0]


class QuantDense(gluon.HybridBlock):
    """Dense layer with LSQ on its weight (per output channel) and on its input."""

    def __init__(self, units, in_units):
        super().__init__()
        self._units = units
        with self.name_scope():
            self.weight = self.params.get("weight", shape=(units, in_units))
            self.wq = LSQBlock(channels=units, init=0.05, is_weight=True,
                               is_weight_perchannel=True)
            self.aq = LSQBlock(init=0.05, signed=True, nbits=8)

    def hybrid_forward(self, F, x, weight):  # noqa: N803
        return F.FullyConnected(self.aq(x), self.wq(weight), num_hidden=self._units,
                                no_bias=True)


def test_gluon_quantized_layer_trains():
    """A Dense layer with 4-bit per-channel weights and 8-bit inputs learns a linear map; the
    steps start at the paper's initialization (weights at init, activations at the first
    batch) and are trained with the weight (Adam)."""
    rng = np.random.default_rng(13)
    w_true = rng.normal(0, 1, (4, 8)).astype(f32)
    net = QuantDense(4, 8)
    net.initialize()
    net.weight.set_data(mx.nd.array(rng.normal(0, 0.1, (4, 8))))
    x0 = rng.normal(0, 1, (32, 8)).astype(f32)
    net.wq.step.set_data(mx.nd.array(ref.init_step(
        net.weight.data().asnumpy(), LSQAttrs(is_weight=True, is_weight_perchannel=True))))
    net.aq.step.set_data(mx.nd.array(ref.init_step(x0, LSQAttrs(signed=True, nbits=8))))
    wstep0 = net.wq.step.data().asnumpy().copy()
    net.hybridize()
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 0.03})
    losses = []
    for i in range(200):
        x = x0 if i == 0 else rng.normal(0, 1, (32, 8)).astype(f32)
        with autograd.record():
            loss = ((net(mx.nd.array(x)) - mx.nd.array(x @ w_true.T)) ** 2).mean()
        loss.backward()
        trainer.step(1)
        losses.append(loss.asscalar())
    assert np.mean(losses[-10:]) < 0.05 * np.mean(losses[:10])
    # the weights grew from N(0, 0.1) towards N(0, 1), and their steps followed
    assert np.all(net.wq.step.data().asnumpy() > 1.5 * wstep0)


# -- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("attrs,needle", [
    (dict(nbits="four"), "'nbits' must be an integer"),
    (dict(signed="maybe"), "'signed' must be True or False"),
    (dict(is_weight="yes please"), "'is_weight' must be True or False"),
    (dict(channel_axis=-1), "'channel_axis' = -1 is out of range"),
    (dict(is_weight_perchannel=True), "needs is_weight=True"),
])
def test_bad_attribute_is_a_clear_error(attrs, needle):
    with pytest.raises(mx.base.MXNetError, match="LSQ") as e:
        mx.nd.LSQ(mx.nd.ones((2, 3)), mx.nd.ones(1), **attrs).wait_to_read()
    assert needle in str(e.value), str(e.value)


def test_bad_shapes_and_dtypes_are_clear_errors():
    x = mx.nd.ones((4, 3))
    pc = dict(is_weight=True, is_weight_perchannel=True)
    cases = [
        ((x, mx.nd.ones(3)), {}, "'step' must have shape (1,)"),
        ((x, mx.nd.ones((1, 1))), {}, "'step' must have shape (1,)"),
        ((x, mx.nd.ones(1)), pc, "'step' must have shape (4,)"),
        ((x, mx.nd.ones(4)), dict(pc, channel_axis=1), "'step' must have shape (3,)"),
        ((x, mx.nd.ones(4)), dict(pc, channel_axis=2), "channel_axis=2"),
        ((x.astype("int32"), mx.nd.ones(1)), {}, "input 'data' must be float32, got int32"),
        ((x, mx.nd.ones(1, dtype="float16")), {}, "input 'step' must be float32, got float16"),
        ((x.astype("float64"), mx.nd.ones(1)), {}, "input 'data' must be float32, got float64"),
    ]
    for args, attrs, needle in cases:
        with pytest.raises(mx.base.MXNetError) as e:
            mx.nd.LSQ(*args, **attrs).wait_to_read()
        assert needle in str(e.value), str(e.value)
        assert "LSQ" in str(e.value)
