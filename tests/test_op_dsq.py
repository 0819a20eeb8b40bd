"""DSQ (Differentiable Soft Quantization, Gong et al., arXiv:1908.05033): the hard forward
and the soft backward bit for bit against the numpy reference (quant_ops/refs/dsq.py); the
reference's gradients of l, u, alpha and x against central differences of the paper's soft
function Q_S; the forward against the paper's sgn form; the straight-through baseline
(soft=False); edge values; the training-pass counter; nd / symbol / hybridized Gluon (a
training loop that moves l, u and alpha); errors."""
from __future__ import annotations

import math

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import quant_ops
from quant_ops.refs import dsq as ref
from quant_ops.refs.dsq import DSQAttrs

f32 = np.float32
TRAIN = np.array([0, 1], f32)
INFER = np.array([0, 0], f32)


def bits(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=f32).view(np.uint32)


def same(a, b) -> bool:
    """Bit-identical, except that any NaN equals any NaN (its sign and payload are not
    specified)."""
    a, b = np.asarray(a, f32), np.asarray(b, f32)
    if a.shape != b.shape or not np.array_equal(np.isnan(a), np.isnan(b)):
        return False
    return np.array_equal(bits(np.where(np.isnan(a), 0, a)), bits(np.where(np.isnan(b), 0, b)))


def p1(v) -> np.ndarray:
    return np.array([v], f32)


def run(x, lower, upper, alpha, grad, qstate=TRAIN, **attrs):
    """nd forward + backward with every input attached; returns numpy
    (y, dx, dl, du, dalpha, qstate after the pass)."""
    xs, lo, hi, al = (mx.nd.array(np.asarray(v, f32)) for v in (x, lower, upper, alpha))
    st = mx.nd.array(np.asarray(qstate, f32))
    for v in (xs, lo, hi, al):
        v.attach_grad()
    with autograd.record():
        y = mx.nd.DSQ(xs, lo, hi, al, st, **attrs)
    y.backward(mx.nd.array(np.asarray(grad, f32)))
    return (y.asnumpy(), xs.grad.asnumpy(), lo.grad.asnumpy(), hi.grad.asnumpy(),
            al.grad.asnumpy(), st.asnumpy())


def check_against_reference(x, lower, upper, alpha, grad, attrs: DSQAttrs):
    y, dx, dl, du, da, _ = run(x, lower, upper, alpha, grad, **attrs.as_kwargs())
    assert same(y, ref.dsq_forward(x, lower, upper, attrs))
    rdx, rdl, rdu, rda = ref.dsq_backward(grad, x, lower, upper, alpha, attrs)
    assert same(dx, rdx)
    assert same(dl, rdl) and same(du, rdu) and same(da, rda), (dl, rdl, du, rdu, da, rda)
    return y, dx, dl, du, da


def sample(shape, seed, lo=-1.1, hi=1.7):
    """Data over and beyond [lo, hi] with zeros, the bounds themselves and exact centres."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(lo - 1, hi + 1, shape).astype(f32)
    x.flat[::13] = 0
    x.flat[5::17] = lo
    x.flat[7::19] = hi
    return x, rng.normal(0, 1, shape).astype(f32)


# -- forward -------------------------------------------------------------------------

def test_forward_levels_ties_and_clip():
    # 3 bits over [0, 7]: Delta = 1, levels 0..7; ties round half to even
    x = np.array([-3, -0.0, 0.4, 0.5, 1.5, 2.5, 3.49, 6.5, 7, 7.5, 100], f32)
    y, *_ = run(x, p1(0), p1(7), p1(0.2), np.ones_like(x), nbits=3)
    assert same(y, np.array([0, 0, 0, 0, 2, 2, 3, 6, 7, 7, 7], f32))
    # 2 bits over [-1, 2]: levels -1, 0, 1, 2 (the paper's grid need not contain 0)
    x = np.array([-5, -0.6, -0.5, 0.2, 0.5, 1.51, 9], f32)
    y, *_ = run(x, p1(-1), p1(2), p1(0.2), np.ones_like(x), nbits=2)
    assert same(y, np.array([-1, -1, -1, 0, 1, 2, 2], f32))  # t = 0.5 -> 0, 1.5 -> 2
    # 1 bit: the two levels l and u
    y, *_ = run(np.array([-1, 0.2, 0.3, 4], f32), p1(0.1), p1(0.5), p1(0.2),
                np.ones(4, f32), nbits=1)
    assert same(y, np.array([0.1, 0.1, 0.5, 0.5], f32))


def test_forward_is_the_papers_sgn_output_and_ignores_alpha():
    """Away from the interval centres the hard output equals l + Delta (i + (sgn(phi) + 1)
    / 2) (Algorithm 1's forward); alpha changes the backward only."""
    rng = np.random.default_rng(1)
    lo, hi, nbits = f32(-0.8), f32(1.3), 3
    x = rng.uniform(-1.2, 1.7, 4000).astype(f32)
    delta = (float(hi) - float(lo)) / 7
    frac = ((x.astype(np.float64) - float(lo)) / delta) % 1.0
    x = x[np.abs(frac - 0.5) > 1e-3]
    ys = [run(x, p1(lo), p1(hi), p1(a), np.ones_like(x), nbits=nbits)[0]
          for a in (1e-6, 0.2, 0.5)]
    assert same(ys[0], ys[1]) and same(ys[0], ys[2])
    want = ref.sign_quantize(x, lo, hi, 0.2, nbits)
    np.testing.assert_allclose(ys[0], want, rtol=0, atol=4e-7)
    assert len(np.unique(ys[0])) == 8


def test_soft_function_evolves_to_the_hard_one():
    """Q_S approaches the staircase as alpha -> 0 (the paper's characteristic variable) and
    is continuous across interval boundaries (phi = +-1 there)."""
    lo, hi, nbits = -1.0, 2.5, 2
    x = np.linspace(-1.5, 3.0, 9001)
    hard = ref.sign_quantize(x, lo, hi, 0.1, nbits)
    delta = (hi - lo) / 3
    z = ((x - lo) / delta) % 1.0 - 0.5
    far = (np.abs(z) > 0.25) & (x > lo) & (x < hi)
    errs = [np.max(np.abs(ref.soft_quantize(x, lo, hi, a, nbits) - hard)[far])
            for a in (0.5, 0.1, 1e-3, 1e-6)]
    assert all(e1 > e2 for e1, e2 in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-3 * delta and errs[0] > 0.1 * delta
    edges = lo + delta * np.arange(4)
    for a in (0.5, 0.05):
        left = ref.soft_quantize(edges - 1e-12, lo, hi, a, nbits)
        right = ref.soft_quantize(edges + 1e-12, lo, hi, a, nbits)
        np.testing.assert_allclose(left, right, atol=1e-9)
        np.testing.assert_allclose(right, edges, atol=1e-9)  # Q_S(l + i Delta) = l + i Delta


# -- reference equality ---------------------------------------------------------------

# (attrs, shape, alpha): every bit width class, both estimators, a tensor longer than one
# summation chunk with a tail, alpha inside, on and beyond its bounds
CONFIGS = [
    (DSQAttrs(), (8, 3, 17, 5), 0.2),
    (DSQAttrs(nbits=1), (300,), 0.4),
    (DSQAttrs(nbits=2, is_weight=True), (64, 3, 3), 0.05),
    (DSQAttrs(nbits=3), (3, 5000), 0.5),
    (DSQAttrs(nbits=8), (2, 4100), 1e-3),
    (DSQAttrs(nbits=16), (999,), 0.3),
    (DSQAttrs(nbits=4), (4, 1000), 0.9),
    (DSQAttrs(nbits=4), (4, 1000), -2.0),
    (DSQAttrs(soft=False), (8, 3, 17, 5), 0.2),
    (DSQAttrs(nbits=2, soft=False, is_weight=True), (3, 5000), 0.2),
]
IDS = [f"{'w' if a.is_weight else 'a'}{a.nbits}{'' if a.soft else 'ste'}-"
       f"{'x'.join(map(str, s))}-al{al}" for a, s, al in CONFIGS]


@pytest.mark.parametrize("attrs,shape,alpha", CONFIGS, ids=IDS)
def test_forward_and_backward_match_reference(attrs, shape, alpha):
    x, g = sample(shape, seed=sum(shape) + attrs.nbits)
    check_against_reference(x, p1(-1.1), p1(1.7), p1(alpha), g, attrs)


def test_alpha_is_evaluated_in_its_bounds_and_passed_straight_through():
    x, g = sample((500,), seed=3)
    lo, hi = p1(-1.1), p1(1.7)
    for outside, bound in ((0.9, 0.5), (0.5000001, 0.5), (-1.0, 1e-6), (0.0, 1e-6)):
        got = run(x, lo, hi, p1(outside), g)[1:5]
        want = run(x, lo, hi, p1(bound), g)[1:5]
        assert all(same(a, b) for a, b in zip(got, want)), outside
        assert want[3][0] != 0


def test_parameter_gradients_do_not_depend_on_the_layout():
    """The sums run in a fixed order over the flattened tensor: a reshape changes nothing,
    and the result is the reference's for a tensor of several summation chunks."""
    x, g = sample((3 * ref.SUM_CHUNK + 77,), seed=4)
    a = run(x, p1(-1.1), p1(1.7), p1(0.3), g)
    b = run(x.reshape(-1, 5), p1(-1.1), p1(1.7), p1(0.3), g.reshape(-1, 5))
    assert all(same(u.reshape(-1), v.reshape(-1)) for u, v in zip(a, b))
    check_against_reference(x, p1(-1.1), p1(1.7), p1(0.3), g, DSQAttrs())


# -- the estimator -----------------------------------------------------------------------

def away_from_boundaries(nbits, lo, hi, n, seed, margin=0.02):
    """Points over and beyond [lo, hi], none within margin * Delta of an interval boundary
    or of the clip bounds (Q_S is smooth in x, l, u and alpha there)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(lo - 0.6, hi + 0.6, 4 * n).astype(f32)
    delta = (float(hi) - float(lo)) / (2 ** nbits - 1)
    t = (x.astype(np.float64) - float(lo)) / delta
    ok = (np.abs(t - np.rint(t)) > margin) | (t < -margin) | (t > 2 ** nbits - 1 + margin)
    ok &= (np.abs(x - lo) > margin * delta) & (np.abs(x - hi) > margin * delta)
    x = x[ok][:n]
    return x, rng.normal(0, 1, x.shape).astype(f32)


@pytest.mark.parametrize("nbits,lo,hi,alpha", [
    (4, -0.9, 1.3, 0.25), (2, 0.0, 3.0, 0.45), (3, -2.0, 0.5, 0.02), (1, -0.4, 0.6, 0.3)])
def test_gradients_are_central_differences_of_the_soft_function(nbits, lo, hi, alpha):
    """L(x, l, u, alpha) = sum(g * Q_S(x; l, u, alpha)) with Q_S written as the paper does
    (np.tanh, k = log(2/alpha - 1)/Delta, s = 1/tanh(0.5 k Delta)).  Central differences in
    float64 of L in l, u and alpha equal the reference's gradients (and the operator equals
    the reference bit for bit); in each x they equal dL/dx."""
    lo, hi, alpha = f32(lo), f32(hi), f32(alpha)
    x, g = away_from_boundaries(nbits, lo, hi, 600, seed=nbits)
    attrs = DSQAttrs(nbits=nbits)
    _, dx, dl, du, da = check_against_reference(x, p1(lo), p1(hi), p1(alpha), g, attrs)
    inside = (x >= lo) & (x <= hi)
    assert inside.any() and (~inside).any()

    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    L, U, A = float(lo), float(hi), float(alpha)

    def loss(l_, u_, a_):
        return float(np.sum(g64 * ref.soft_quantize(x64, l_, u_, a_, nbits)))

    h = 1e-6
    num = [(loss(L + h, U, A) - loss(L - h, U, A)) / (2 * h),
           (loss(L, U + h, A) - loss(L, U - h, A)) / (2 * h),
           (loss(L, U, A + h) - loss(L, U, A - h)) / (2 * h)]
    scale = float(np.sum(np.abs(g64)))
    for got, want in zip((dl, du, da), num):
        np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6 * scale)
    hx = 1e-7
    num_x = g64 * (ref.soft_quantize(x64 + hx, L, U, A, nbits)
                   - ref.soft_quantize(x64 - hx, L, U, A, nbits)) / (2 * hx)
    np.testing.assert_allclose(dx, num_x, rtol=1e-5, atol=1e-6)
    assert not dx[~inside].any() and dx[inside].all()


def test_derivative_identities():
    """Inside [l, u]: dQ/dx + dQ/dl + dQ/du = 1 (moving x, l and u together moves Q_S) and
    x dQ/dx + l dQ/dl + u dQ/du = Q_S (Q_S is homogeneous of degree 1 in (x, l, u))."""
    lo, hi, al, nbits = f32(-0.7), f32(2.2), f32(0.15), 3
    x = np.linspace(lo, hi, 2001, dtype=f32)
    d, dl, du, _ = ref.soft_derivatives(x, lo, hi, al, nbits)
    np.testing.assert_allclose(d + dl + du, 1.0, rtol=0, atol=1e-12)
    q = ref.soft_quantize(x, lo, hi, al, nbits)
    xd = x.astype(np.float64)
    np.testing.assert_allclose(xd * d + float(lo) * dl + float(hi) * du, q, rtol=0, atol=1e-12)


def test_straight_through_baseline():
    """soft=False: dL/dx = g inside [l, u] (inclusive), dL/dl and dL/du sum g below and
    above the range, alpha gets 0; the forward is the same."""
    x = np.array([-2, -1, -0.3, 0, 0.9, 2, 2.5, np.nan], f32)
    g = np.array([1, 2, 4, 8, 16, 32, 64, 128], f32)
    y, dx, dl, du, da, _ = run(x, p1(-1), p1(2), p1(0.2), g, nbits=2, soft=False)
    assert same(dx, np.array([0, 2, 4, 8, 16, 32, 0, 0], f32))
    assert (dl[0], du[0], da[0]) == (1, 64, 0)
    ys = run(x, p1(-1), p1(2), p1(0.2), g, nbits=2)[0]
    assert same(y, ys)
    # the soft estimator spreads the gradient of l and u over the elements inside
    _, sdx, sdl, sdu, sda, _ = run(x, p1(-1), p1(2), p1(0.2), g, nbits=2)
    assert sdl[0] != 1 and sdu[0] != 64 and sda[0] != 0 and not same(sdx, dx)


def test_edge_values():
    x = np.array([np.nan, np.inf, -np.inf, 0, -0.0, 1e-30, -1.1, 1.7, 3e38, -3e38, 0.3], f32)
    g = np.arange(1, x.size + 1, dtype=f32)
    for lo, hi in [(-1.1, 1.7), (0.5, 0.5), (1.0, 0.0), (np.nan, 1.0), (0.0, np.nan),
                   (-np.inf, 1.0), (0.0, np.inf), (-3e38, 3e38), (0.0, 1e-44)]:
        for al in (0.2, np.nan):
            for soft in (True, False):
                check_against_reference(x, p1(lo), p1(hi), p1(al), g,
                                        DSQAttrs(nbits=3, soft=soft))
    y, dx, dl, du, da, _ = run(x, p1(-1.1), p1(1.7), p1(0.2), g, nbits=3)
    assert np.isnan(y[0]) and dx[0] == 0 and not np.isnan([dl, du, da]).any()
    assert y[1] == y[7] and y[2] == y[6] == f32(-1.1)  # +-inf clip to the end levels
    # an empty range clips to l (= u); u < l clips to u; no gradient reaches x
    y, dx, *_ = run(x, p1(0.5), p1(0.5), p1(0.2), g, nbits=3)
    assert np.all(y[1:] == f32(0.5)) and not dx.any()
    y, *_ = run(x, p1(1.0), p1(0.0), p1(0.2), g, nbits=3)
    assert np.all(y[1:] == 0)
    # a NaN bound: NaN out, NaN gradients
    y, dx, dl, du, da, _ = run(x, p1(np.nan), p1(1.0), p1(0.2), g, nbits=3)
    assert np.isnan(y).all() and np.isnan(dx).all() and np.isnan([dl, du, da]).all()


def test_elementary_functions():
    w = np.linspace(-7.5, 7.5, 30001)
    th, se = ref.tanh_sech2(w)
    np.testing.assert_allclose(th, np.tanh(w), rtol=1e-14, atol=1e-300)
    np.testing.assert_allclose(se, 1 / np.cosh(w) ** 2, rtol=1e-13)
    for v in (3.0, 3.0000001, 7.5, 1e3, 1999999.0):
        assert abs(ref.log_pos(v) - math.log(v)) <= 2e-16 * math.log(v)


# -- training state, symbol, Gluon ------------------------------------------------------

def test_qstate_counts_training_passes_only():
    x, _ = sample((4, 5), seed=5)
    st = mx.nd.array(TRAIN)
    args = [mx.nd.array(v) for v in (x, p1(-1), p1(1), p1(0.2))]
    ys = [mx.nd.DSQ(*args, st).asnumpy() for _ in range(3)]
    assert np.array_equal(st.asnumpy(), [3, 1])
    quant_ops.set_training([st], False)
    y_inf = mx.nd.DSQ(*args, st).asnumpy()
    assert np.array_equal(st.asnumpy(), [3, 0])
    assert all(same(y, y_inf) for y in ys)  # the same forward in both modes
    assert same(y_inf, ref.dsq_forward(x, p1(-1), p1(1)))
    assert np.array_equal(ref.dsq_forward_state(x, p1(-1), p1(1), [7, 1])[1], [8, 1])
    assert np.array_equal(ref.dsq_forward_state(x, p1(-1), p1(1), [7, 0])[1], [7, 0])


def test_symbol_simple_bind():
    attrs = DSQAttrs(nbits=3)
    x, g = sample((6, 4, 3), seed=9)
    params = [mx.sym.var(f"q_dsq_{n}", shape=(1,)) for n in ("lower", "upper", "alpha")]
    sym = mx.sym.DSQ(mx.sym.var("data"), *params, mx.sym.var("q_qstate", shape=(2,)), name="q",
                     **attrs.as_kwargs())
    assert sym.list_arguments() == ["data", "q_dsq_lower", "q_dsq_upper", "q_dsq_alpha"]
    assert sym.list_auxiliary_states() == ["q_qstate"]
    exe = sym.simple_bind(mx.cpu(), data=x.shape, grad_req="write")
    vals = dict(data=x, q_dsq_lower=p1(-1.1), q_dsq_upper=p1(1.7), q_dsq_alpha=p1(0.3))
    for k, v in vals.items():
        exe.arg_dict[k][:] = v
    quant_ops.set_training(exe.aux_dict, True)
    for _ in range(2):
        exe.forward(is_train=True)
        exe.backward(mx.nd.array(g))
    rdx, rdl, rdu, rda = ref.dsq_backward(g, x, p1(-1.1), p1(1.7), p1(0.3), attrs)
    assert same(exe.outputs[0].asnumpy(), ref.dsq_forward(x, p1(-1.1), p1(1.7), attrs))
    assert same(exe.grad_dict["data"].asnumpy(), rdx)
    for name, want in (("q_dsq_lower", rdl), ("q_dsq_upper", rdu), ("q_dsq_alpha", rda)):
        assert same(exe.grad_dict[name].asnumpy(), want), name
    assert np.array_equal(exe.aux_dict["q_qstate"].asnumpy(), [2, 1])
    # only the parameters learn (the data gradient is not requested)
    exe = sym.simple_bind(mx.cpu(), data=x.shape,
                          grad_req={"data": "null", "q_dsq_lower": "write",
                                    "q_dsq_upper": "write", "q_dsq_alpha": "write"})
    for k, v in vals.items():
        exe.arg_dict[k][:] = v
    exe.forward(is_train=True)
    exe.backward(mx.nd.array(g))
    assert same(exe.grad_dict["q_dsq_alpha"].asnumpy(), rda)


class DSQBlock(gluon.HybridBlock):
    """A DSQ quantizer with l, u and alpha as trained parameters and qstate as state (test
    helper)."""

    def __init__(self, lower=-1.0, upper=1.0, alpha=0.2, **attrs):
        super().__init__()
        self._attrs = attrs
        with self.name_scope():
            self.lower = self.params.get("dsq_lower", shape=(1,), init=mx.init.Constant(lower))
            self.upper = self.params.get("dsq_upper", shape=(1,), init=mx.init.Constant(upper))
            self.alpha = self.params.get("dsq_alpha", shape=(1,), init=mx.init.Constant(alpha))
            self.qstate = self.params.get("qstate", shape=(2,), init="zeros", grad_req="null",
                                          differentiable=False)

    def hybrid_forward(self, F, x, lower, upper, alpha, qstate):  # noqa: N803
        return F.DSQ(x, lower, upper, alpha, qstate, **self._attrs)


def reconstruction_run(hybrid, iters=20):
    """Quantize data ~ N(0, 1) to 2 bits from a range that is too narrow and learn l, u and
    alpha (SGD) on the reconstruction loss mean((y - x)^2)."""
    rng = np.random.default_rng(12)
    xs = [rng.normal(0, 1, (16, 32)).astype(f32) for _ in range(iters)]
    net = DSQBlock(lower=-0.2, upper=0.3, alpha=0.3, nbits=2)
    net.initialize()
    if hybrid is not None:
        net.hybridize(**hybrid)
    quant_ops.track_training(net)  # after hybridize: Gluon warns about hooks present then
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    attrs = DSQAttrs(nbits=2)
    hist = []
    for x in xs:
        lo, hi, al = (p.data().asnumpy().copy() for p in (net.lower, net.upper, net.alpha))
        xin = mx.nd.array(x)
        xin.attach_grad()
        with autograd.record():
            y = net(xin)
        yv = y.asnumpy()
        head = (f32(2 / x.size) * (yv - x)).astype(f32)
        y.backward(mx.nd.array(head))
        assert same(yv, ref.dsq_forward(x, lo, hi, attrs))
        rdx, rdl, rdu, rda = ref.dsq_backward(head, x, lo, hi, al, attrs)
        assert same(xin.grad.asnumpy(), rdx)
        assert same(net.lower.grad().asnumpy(), rdl)
        assert same(net.upper.grad().asnumpy(), rdu)
        assert same(net.alpha.grad().asnumpy(), rda)
        trainer.step(1)
        hist.append((lo[0], hi[0], al[0], float(np.mean((yv - x) ** 2))))
    return np.array(hist), net.qstate.data().asnumpy()


def test_gluon_training_moves_the_range_and_alpha():
    runs = [reconstruction_run(h) for h in (None, {}, {"static_alloc": True,
                                                       "static_shape": True})]
    hist, st = runs[0]
    for h2, st2 in runs[1:]:  # imperative and hybridized runs are the same, bit for bit
        assert np.array_equal(h2, hist) and np.array_equal(st2, st)
    assert np.array_equal(st, [len(hist), 1])
    lo, hi, al, loss = hist.T
    assert lo[-1] < lo[0] - 0.3 and hi[-1] > hi[0] + 0.3  # the range opened up
    assert al[-1] != al[0] and np.all((al > 0) & (al < 0.5))
    assert loss[-1] < 0.5 * loss[0]


@pytest.mark.skipif("DSQ" not in quant_ops.ops.OP_INPUTS,
                    reason="DSQ is not yet in ops.OP_INPUTS / LEARNED_INPUTS")
@pytest.mark.parametrize("hybrid", [None, {}])
def test_gradient_accumulation_gluon(hybrid):
    x = np.linspace(-1, 3, 12, dtype=f32).reshape(3, 4)
    _, rdl, rdu, rda = ref.dsq_backward(np.ones_like(x), x, p1(-0.5), p1(2), p1(0.2))
    net = DSQBlock(lower=-0.5, upper=2.0, alpha=0.2)
    net.initialize()
    if hybrid is not None:
        net.hybridize(**hybrid)
    for p in (net.lower, net.upper, net.alpha):
        p.grad_req = "add"
        p.zero_grad()
    for _ in range(2):
        with autograd.record():
            y = net(mx.nd.array(x))
        y.backward()
    for p, want in ((net.lower, rdl), (net.upper, rdu), (net.alpha, rda)):
        assert p.grad().asnumpy()[0] == want[0] * f32(2)


# -- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("attrs,needle", [
    (dict(nbits="four"), "'nbits' must be an integer"),
    (dict(soft="maybe"), "'soft' must be True or False"),
    (dict(is_weight="yes please"), "'is_weight' must be True or False"),
])
def test_bad_attribute_is_a_clear_error(attrs, needle):
    args = [mx.nd.ones((2, 3)), mx.nd.zeros(1), mx.nd.ones(1), mx.nd.ones(1) * 0.2,
            mx.nd.zeros(2)]
    with pytest.raises(mx.base.MXNetError, match="DSQ") as e:
        mx.nd.DSQ(*args, **attrs).wait_to_read()
    assert needle in str(e.value), str(e.value)


def test_bad_shapes_and_dtypes_are_clear_errors():
    x, one, st = mx.nd.ones((4, 3)), mx.nd.ones(1), mx.nd.zeros(2)
    cases = [
        ((x, mx.nd.ones(3), one, one, st), "'dsq_lower' (the learned lower clip value l) must "
                                           "have shape (1,), got (3,)"),
        ((x, one, mx.nd.ones((1, 1)), one, st), "'dsq_upper' (the learned upper clip value u) "
                                                "must have shape (1,), got (1,1)"),
        ((x, one, one, mx.nd.ones(4), st), "'dsq_alpha' (the learned softness alpha) must "
                                           "have shape (1,)"),
        ((x, one, one, one, mx.nd.zeros(3)), "'qstate' must have shape (2,)"),
        ((x.astype("int32"), one, one, one, st), "input 'data' must be float32, got int32"),
        ((x, one, one, one.astype("float16"), st),
         "input 'dsq_alpha' must be float32, got float16"),
        ((x, one, one.astype("float64"), one, st),
         "input 'dsq_upper' must be float32, got float64"),
    ]
    for args, needle in cases:
        with pytest.raises(mx.base.MXNetError) as e:
            mx.nd.DSQ(*args).wait_to_read()
        assert needle in str(e.value), str(e.value)
        assert "DSQ" in str(e.value)
