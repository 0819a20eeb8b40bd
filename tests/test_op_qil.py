"""QIL (Jung et al., arXiv:1808.05779, section 3): forward bit for bit against the numpy
reference (quant_ops/refs/qil.py) and against the paper's formulas in float64; what it shares
with the seed toolkit's _contrib_QIL and where it differs; the estimator against the
reference bit for bit and against central differences of the transformer; fix_gamma; nd,
symbol and hybridized Gluon; a Trainer moving the interval; clear errors."""
from __future__ import annotations

import os
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import quant_ops  # noqa: F401  (loads the operator library)
from quant_ops.refs import qil as ref
from quant_ops.refs.qil import QILAttrs

f32 = np.float32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ACT = QILAttrs()
W = QILAttrs(is_weight=True)
W_GAMMA = QILAttrs(is_weight=True, fix_gamma=False)


def bits(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=f32).view(np.uint32)


def same_bits(a, b) -> bool:
    return np.array_equal(bits(a), bits(b))


def run(x, c, d, gamma=1.0, g=None, attrs: QILAttrs = ACT):
    """The operator imperatively: y, and with ``g`` also (dx, dc, dd, dgamma), as numpy."""
    xs = mx.nd.array(x, dtype=f32)
    ps = [mx.nd.array([v], dtype=f32) for v in (c, d, gamma)]
    if g is None:
        return mx.nd.QIL(xs, *ps, **attrs.as_kwargs()).asnumpy()
    for a in [xs] + ps:
        a.attach_grad()
    with autograd.record():
        y = mx.nd.QIL(xs, *ps, **attrs.as_kwargs())
    y.backward(mx.nd.array(g, dtype=f32))
    return (y.asnumpy(), xs.grad.asnumpy()) + tuple(p.grad.asnumpy() for p in ps)


def sample(c: float, d: float, n: int, rng) -> np.ndarray:
    """Both signs, the interval ends and their neighbours, exact zeros, specials."""
    low, high = f32(f32(c) - f32(d)), f32(f32(c) + f32(d))
    ends = np.array([low, high, np.nextafter(low, f32(-np.inf)), np.nextafter(low, f32(np.inf)),
                     np.nextafter(high, f32(-np.inf)), np.nextafter(high, f32(np.inf))], f32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 3e38, -3e38, c, -c], f32)
    x = np.concatenate([ends, -ends, special,
                        rng.uniform(-1.5 * (c + d), 1.5 * (c + d), n // 2).astype(f32),
                        rng.normal(0, c + d, n - n // 2).astype(f32)])
    return rng.permutation(x)


MODES = [ACT, W, W_GAMMA, QILAttrs(nbits=2), QILAttrs(nbits=2, is_weight=True),
         QILAttrs(nbits=3, is_weight=True, fix_gamma=False), QILAttrs(nbits=8),
         QILAttrs(nbits=16, is_weight=True)]
INTERVALS = [(1.0, 0.7, 1.0), (0.4, 0.6, 0.7), (1.2, 0.5, 1.6), (0.5, 0.5, 2.5),
             (0.03, 0.02, 1.0)]


# -- forward -------------------------------------------------------------------------------

@pytest.mark.parametrize("attrs", MODES, ids=str)
def test_forward_matches_reference_bit_for_bit(attrs):
    rng = np.random.default_rng(attrs.nbits)
    for c, d, gamma in INTERVALS:
        x = sample(c, d, 20_000, rng)
        x[5] = np.nan
        y = run(x, c, d, gamma, attrs=attrs)
        want = ref.qil_forward(x, c, d, gamma, attrs)
        assert same_bits(y, want), (attrs, c, d, gamma)
        assert np.isnan(y[5]) and np.isnan(want).sum() == 1              # NaN in, NaN out
        qd = attrs.levels
        codes = want[~np.isnan(want)] * qd
        assert np.array_equal(codes, np.rint(codes))                     # on the grid
        lo = -qd if attrs.is_weight else 0
        assert codes.min() == lo and codes.max() == qd                   # the full range
        assert not np.signbit(want[want == 0]).any()                     # a zero is +0


def test_levels_are_the_papers():
    """q_D = 2^(N-1) - 1 for weights (signed codes), 2^N - 1 for activations (eq. 3)."""
    x = np.linspace(-2, 2, 40_001, dtype=f32)
    for nbits in (2, 3, 4, 8):
        yw = run(x, 0.5, 0.5, attrs=QILAttrs(nbits=nbits, is_weight=True))
        ya = run(x, 0.5, 0.5, attrs=QILAttrs(nbits=nbits))
        assert len(np.unique(yw)) == 2 * (2 ** (nbits - 1) - 1) + 1
        assert len(np.unique(ya)) == 2 ** nbits
        assert yw.min() == -1 and yw.max() == 1 and ya.min() == 0 and ya.max() == 1


def _paper64(x, c, d, gamma, attrs):
    """Eq. 1-3 in float64 (alpha |x| + beta form) with round half to even."""
    return np.round(ref.transform64(x, c, d, gamma, attrs) * float(attrs.levels)) / float(
        attrs.levels)


@pytest.mark.parametrize("attrs", [ACT, W, W_GAMMA, QILAttrs(nbits=8, is_weight=True,
                                                             fix_gamma=False)], ids=str)
def test_forward_is_the_papers_eq_1_to_3(attrs):
    """On values not within float32 noise of a rounding tie or an interval end, the operator
    is the paper's transformer and discretizer evaluated in float64."""
    rng = np.random.default_rng(1)
    for c, d, gamma in ((1.0, 0.7, 1.0), (0.4, 0.6, 0.7), (1.2, 0.5, 1.6)):
        x = rng.uniform(-2.5, 2.5, 50_000).astype(f32)
        t = ref.transform64(x, c, d, gamma, attrs) * float(attrs.levels)
        a = np.abs(x) if attrs.is_weight else x.astype(np.float64)
        away = ((np.abs(t - np.floor(t) - 0.5) > 1e-4) & (np.abs(a - (c - d)) > 1e-5)
                & (np.abs(a - (c + d)) > 1e-5))
        assert away.mean() > 0.95
        y = run(x, c, d, gamma, attrs=attrs).astype(np.float64)
        np.testing.assert_array_equal(y[away], _paper64(x, c, d, gamma, attrs)[away]
                                      .astype(f32))


def test_ties_round_half_to_even():
    """c = d = 0.5 makes the activation transformer the identity on [0.25, 1] in float32
    ((x - 0.5) is exact there), so x * q_D can be an exact half: it rounds to the even code
    (MXNet's round would not)."""
    qd = 15
    k = np.arange(4, 15)
    x = ((k + 0.5) / qd).astype(f32)
    x = x[(x * f32(qd)) == (k + 0.5).astype(f32)]
    assert x.size >= 5
    y = run(x, 0.5, 0.5)
    codes = np.rint(y * qd)
    assert np.array_equal(codes, np.rint(x * f32(qd))) and (codes % 2 == 0).all()
    assert same_bits(y, ref.qil_forward(x, 0.5, 0.5, 1.0))


def _seed_forward(x, c, d, nbits):
    """The seed toolkit's _contrib_QIL forward (QIL-inl.h), in float64: the weight transformer
    for every input, q = 2^nbits - 1, MXNet's round (half away from zero)."""
    a, s = np.abs(x.astype(np.float64)), np.where(x < 0, -1.0, 1.0)
    t = np.where(a < c - d, 0.0, np.where(a > c + d, s, s * (0.5 * (a - c) / d + 0.5)))
    q = 2.0 ** nbits - 1
    return np.sign(t) * np.floor(np.abs(t) * q + 0.5) / q, t * q


def test_relation_to_the_seed_operator():
    """Activations after a ReLU (x >= 0) give the seed's output; weights at nbits = N + 1 give
    the seed's weights at N (the seed's q = 2^N - 1 for weights); negative activations are
    the paper's 0 here (the seed mirrors them).  Compared away from rounding ties."""
    rng = np.random.default_rng(2)
    c, d = 0.6, 0.45
    x = rng.uniform(-1.5, 1.5, 40_000).astype(f32)
    x = x[x != 0]  # the seed maps an exact 0 weight inside the interval to +beta (sign 1)
    for nbits in (2, 4):
        seed, tq = _seed_forward(x, c, d, nbits)
        away = np.abs(np.abs(tq) - np.floor(np.abs(tq)) - 0.5) > 1e-4
        ya = run(x, c, d, attrs=QILAttrs(nbits=nbits))
        pos = away & (x >= 0)
        np.testing.assert_allclose(ya[pos], seed[pos], rtol=0, atol=1e-6)
        assert (ya[x < 0] == 0).all() and (seed[(x < 0) & (x < -(c + d))] == -1).all()
        yw = run(x, c, d, attrs=QILAttrs(nbits=nbits + 1, is_weight=True))
        np.testing.assert_allclose(yw[away], seed[away], rtol=0, atol=1e-6)


def test_fix_gamma_uses_gamma_one_and_writes_a_zero_gradient():
    """fix_gamma=True (the default, and the only mode of the seed) is the exponent 1 whatever
    the gamma input holds, and gamma's gradient is +0; activations never use gamma."""
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, 5000).astype(f32)
    g = rng.normal(0, 1, 5000).astype(f32)
    for attrs in (W, ACT, QILAttrs(fix_gamma=False)):
        base = run(x, 0.8, 0.5, 1.0, g, attrs=attrs)
        for gamma in (0.3, 2.0, np.nan):
            other = run(x, 0.8, 0.5, gamma, g, attrs=attrs)
            for a, b in zip(base[:4], other[:4]):
                assert same_bits(a, b)
            assert bits(other[4])[0] == 0                                   # +0
    # a free gamma changes the weights inside the interval, nothing outside
    y1 = run(x, 0.8, 0.5, 1.0, attrs=W_GAMMA)
    y2 = run(x, 0.8, 0.5, 2.0, attrs=W_GAMMA)
    inside = (np.abs(x) >= 0.3) & (np.abs(x) <= 1.3)
    assert same_bits(y1[~inside], y2[~inside]) and (np.abs(y2[inside]) <= np.abs(y1[inside])).all()
    assert (y1 != y2).any()


def test_degenerate_parameters():
    """d == 0: a step at c (0.5 at a == c); d < 0: an empty interval; NaN c or d: NaN out;
    none of them gives a gradient (nothing is inside)."""
    x = np.array([0.5, 1.0, 1.5, -1.0, 0.0, np.nan, 2.0, -2.0], f32)
    g = np.arange(1, 9, dtype=f32)
    for attrs in (ACT, W, W_GAMMA):
        for c, d, gamma in ((1.0, 0.0, 1.0), (1.0, -0.5, 1.0), (1.0, 0.0, 2.0),
                            (np.nan, 0.5, 1.0), (1.0, np.nan, 1.0)):
            y, dx, dc, dd, dgamma = run(x, c, d, gamma, g, attrs=attrs)
            assert same_bits(y, ref.qil_forward(x, c, d, gamma, attrs))
            want = ref.qil_backward(g, x, c, d, gamma, attrs)
            for a, b in zip((dx, dc, dd, dgamma), want):
                assert same_bits(a, b)
            assert not dx.any() and dc[0] == 0 and dd[0] == 0 and dgamma[0] == 0
            if np.isnan(c) or np.isnan(d):
                assert np.isnan(y).all()
        y = run(x, 1.0, 0.0, attrs=attrs)
        qd = attrs.levels
        assert y[1] == f32(np.rint(f32(0.5) * qd) / qd) and y[0] == 0 and y[2] == 1


# -- backward: the estimator -----------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 7, 8, 2047, 2048, 2049, 60_001])
def test_backward_matches_reference_bit_for_bit(n):
    rng = np.random.default_rng(n)
    c, d = 0.9, 0.6
    x = rng.normal(0, 1.2, n).astype(f32)
    x[:min(n, 6)] = np.array([0.3, 1.5, -0.3, 0.0, np.nan, -1.5], f32)[:min(n, 6)]  # ends
    # gradients of very different magnitudes: any other summation order would differ
    g = (rng.normal(0, 1, n) * 10.0 ** rng.uniform(-5, 5, n)).astype(f32)
    for attrs, gamma in ((ACT, 1.0), (W, 1.0), (W_GAMMA, 0.7), (W_GAMMA, 1.0),
                         (QILAttrs(nbits=2, is_weight=True, fix_gamma=False), 1.8)):
        y, *grads = run(x, c, d, gamma, g, attrs=attrs)
        for a, b in zip(grads, ref.qil_backward(g, x, c, d, gamma, attrs)):
            assert same_bits(a, b), (attrs, gamma)
        dx = grads[0]
        a = np.abs(x) if attrs.is_weight else x
        inside = (a >= f32(c) - f32(d)) & (a <= f32(c) + f32(d))
        assert not dx[~inside].any()                       # no gradient outside
        if gamma == 1.0:                                   # inside: straight through * alpha
            assert np.array_equal(dx[inside], g[inside] * (f32(0.5) / f32(d)))
        if n >= 6 and gamma == 1.0:
            assert dx[0] != 0 and dx[1] != 0 and dx[4] == 0  # both ends inside, NaN not


def test_parameter_gradients_do_not_depend_on_the_thread_count():
    """The sums are taken in a fixed order (refs/qil.py): one OpenMP thread gives the same
    bits as many."""
    code = ("import numpy as np, mxnet as mx, quant_ops\n"
            "from mxnet import autograd\n"
            "rng = np.random.default_rng(4); n = 500_003\n"
            "x = rng.normal(0, 1, n).astype('f4')\n"
            "g = (rng.normal(0, 1, n) * 10.0 ** rng.uniform(-5, 5, n)).astype('f4')\n"
            "ps = [mx.nd.array([v]) for v in (0.9, 0.6, 1.3)]\n"
            "for p in ps: p.attach_grad()\n"
            "with autograd.record():\n"
            "    y = mx.nd.QIL(mx.nd.array(x), *ps, is_weight=True, fix_gamma=False)\n"
            "y.backward(mx.nd.array(g))\n"
            "print(' '.join(str(p.grad.asnumpy().view('u4')[0]) for p in ps))\n")
    outs = []
    for threads in ("1", "3"):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=ROOT, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout.split()[-3:])
    assert outs[0] == outs[1]


FD_CASES = [(ACT, 0.0, 1.0, 1.0), (ACT, 1.0, 0.6, 1.0), (W, 0.9, 0.6, 1.0),
            (W, 0.2, 0.5, 1.0), (W_GAMMA, 0.9, 0.6, 0.7), (W_GAMMA, 0.9, 0.6, 1.6),
            (W_GAMMA, 0.9, 0.6, 1.0)]


@pytest.mark.parametrize("attrs,c,d,gamma", FD_CASES)
def test_estimator_equals_central_differences_of_the_transformer(attrs, c, d, gamma):
    """The estimator is the exact gradient of L = sum(g * T(x; c, d, gamma)), T the paper's
    transformer (eq. 1 / 2) with the round held as the identity (the straight-through
    estimator): central differences of L in float64 in c, d and gamma, and of T in x, at
    points at least 1e-3 from the interval ends (and from x = 0 for weights, where T jumps
    when 0 is inside), equal the operator's gradients (which equal the reference's)."""
    rng = np.random.default_rng(5)
    x = rng.uniform(-2.0, 2.0, 6000).astype(f32)
    a = np.abs(x) if attrs.is_weight else x
    keep = (np.abs(a - (c - d)) > 1e-3) & (np.abs(a - (c + d)) > 1e-3) & (np.abs(x) > 1e-3)
    x = x[keep]
    g = rng.uniform(0.5, 1.5, x.size).astype(f32) * np.where(rng.random(x.size) < 0.2, -1, 1)
    g = g.astype(f32)
    _, dx, dc, dd, dgamma = run(x, c, d, gamma, g, attrs=attrs)
    for got, want in zip((dx, dc, dd, dgamma), ref.qil_backward(g, x, c, d, gamma, attrs)):
        assert same_bits(got, want)
    g64, h = g.astype(np.float64), 1e-6

    def loss(cc=c, dd_=d, gg=gamma):
        return float((g64 * ref.transform64(x, cc, dd_, gg, attrs)).sum())

    fd_c = (loss(cc=c + h) - loss(cc=c - h)) / (2 * h)
    fd_d = (loss(dd_=d + h) - loss(dd_=d - h)) / (2 * h)
    np.testing.assert_allclose(dc[0], fd_c, rtol=2e-5, atol=1e-3)
    np.testing.assert_allclose(dd[0], fd_d, rtol=2e-5, atol=1e-3)
    assert abs(dc[0]) > 1 and abs(dd[0]) > 1                  # the checks are not vacuous
    if attrs.learns_gamma:
        fd_g = (loss(gg=gamma + h) - loss(gg=gamma - h)) / (2 * h)
        np.testing.assert_allclose(dgamma[0], fd_g, rtol=2e-5, atol=1e-3)
        assert abs(dgamma[0]) > 1
    else:
        assert dgamma[0] == 0
    x64 = x.astype(np.float64)
    fd_x = (ref.transform64(x64 + h, c, d, gamma, attrs)
            - ref.transform64(x64 - h, c, d, gamma, attrs)) / (2 * h) * g64
    # (float32 u loses relative precision next to the pruning end: u - 0.5 + 0.5)
    np.testing.assert_allclose(dx, fd_x, rtol=1e-4, atol=1e-5)


def test_estimator_at_the_interval_ends():
    """The boundary convention: both ends are inside (the seed's gradient mask); at the
    pruning end u = 0 the exponent's derivative is taken from the pruned side for gamma < 1
    (0 instead of +inf), its limit for gamma >= 1, and d t/d gamma = 0 (u^gamma ln u -> 0)."""
    c, d = f32(1.0), f32(0.5)
    x = np.array([c - d, c + d, -(c - d), -(c + d)], f32)   # exact ends: u = 0, 1, 0, 1
    g = np.ones(4, f32)
    k = f32(0.5) / d
    _, dx, dc, dd, dgamma = run(x, c, d, 1.0, g, attrs=W)
    assert np.array_equal(dx, np.full(4, k, f32))
    for gamma, d0 in ((0.5, 0.0), (2.0, 0.0)):
        _, dx, dc, dd, dgamma = run(x, c, d, gamma, g, attrs=W_GAMMA)
        np.testing.assert_array_equal(dx[[0, 2]], [d0, d0])
        np.testing.assert_allclose(dx[[1, 3]], [gamma * k, gamma * k], rtol=1e-6)
        assert dgamma[0] == 0  # ln 1 = 0 at the clipping end, 0 at the pruning end


# -- symbol, Gluon, Trainer ----------------------------------------------------------------

def _batches(n=3, shape=(4, 5, 6)):
    rng = np.random.default_rng(6)
    xs = [rng.normal(0.5, 1, shape).astype(f32) for _ in range(n)]
    gs = [rng.normal(0, 1, shape).astype(f32) for _ in range(n)]
    return xs, gs


PARAMS = dict(center=0.8, distance=0.5, gamma=1.4)


def _ref_all(x, g, attrs):
    p = (PARAMS["center"], PARAMS["distance"], PARAMS["gamma"])
    return ref.qil_forward(x, *p, attrs), ref.qil_backward(g, x, *p, attrs)


@pytest.mark.parametrize("attrs", [ACT, W_GAMMA], ids=str)
def test_symbol_executor_matches_reference(attrs):
    xs, gs = _batches()
    names = ["q_center", "q_distance", "q_gamma"]
    sym = mx.sym.QIL(mx.sym.var("data"), *[mx.sym.var(n, shape=(1,)) for n in names],
                     name="q", **attrs.as_kwargs())
    assert sym.list_auxiliary_states() == []
    assert [s for s in sym.list_arguments() if s.startswith("q_")][-3:] == names
    exe = sym.simple_bind(mx.cpu(), data=xs[0].shape, grad_req="write")
    for n, k in zip(names, ("center", "distance", "gamma")):
        exe.arg_dict[n][:] = PARAMS[k]
    for x, g in zip(xs, gs):
        exe.arg_dict["data"][:] = x
        exe.forward(is_train=True)
        exe.backward(mx.nd.array(g))
        y, grads = _ref_all(x, g, attrs)
        assert same_bits(exe.outputs[0].asnumpy(), y)
        for n, want in zip(["data"] + names, grads):
            assert same_bits(exe.grad_dict[n].asnumpy(), want), n


def test_symbol_executor_with_gradients_not_requested():
    x, g = (b[0] for b in _batches(1))
    names = ["q_center", "q_distance", "q_gamma"]
    sym = mx.sym.QIL(mx.sym.var("data"), *[mx.sym.var(n, shape=(1,)) for n in names],
                     name="q", is_weight=True, fix_gamma=False)
    req = {"data": "null", "q_center": "write", "q_distance": "null", "q_gamma": "write"}
    exe = sym.simple_bind(mx.cpu(), data=x.shape, grad_req=req)
    exe.arg_dict["data"][:] = x
    for n, k in zip(names, ("center", "distance", "gamma")):
        exe.arg_dict[n][:] = PARAMS[k]
    exe.forward(is_train=True)
    exe.backward(mx.nd.array(g))
    _, grads = _ref_all(x, g, W_GAMMA)
    assert same_bits(exe.grad_dict["q_center"].asnumpy(), grads[1])
    assert same_bits(exe.grad_dict["q_gamma"].asnumpy(), grads[3])


class QilNet(gluon.HybridBlock):
    """QIL on an input, with the interval (and gamma) as trained (1,) parameters."""

    def __init__(self, center=0.8, distance=0.5, gamma=1.4, **attrs):
        super().__init__()
        self._attrs = attrs
        with self.name_scope():
            init = mx.init.Constant
            self.center = self.params.get("center", shape=(1,), init=init(center))
            self.distance = self.params.get("distance", shape=(1,), init=init(distance))
            self.gamma = self.params.get("gamma", shape=(1,), init=init(gamma))

    def hybrid_forward(self, F, x, center, distance, gamma):  # noqa: N803 (Gluon's signature)
        return F.QIL(x, center, distance, gamma, **self._attrs)


@pytest.mark.parametrize("hybrid", [None, {}, {"static_alloc": True, "static_shape": True}])
def test_gluon_matches_reference(hybrid):
    xs, gs = _batches()
    net = QilNet(**W_GAMMA.as_kwargs())
    net.initialize()
    if hybrid is not None:
        net.hybridize(**hybrid)
    for x, g in zip(xs, gs):
        xin = mx.nd.array(x)
        xin.attach_grad()
        with autograd.record():
            y = net(xin)
        y.backward(mx.nd.array(g))
        want_y, want = _ref_all(x, g, W_GAMMA)
        assert same_bits(y.asnumpy(), want_y)
        assert same_bits(xin.grad.asnumpy(), want[0])
        for p, w in zip((net.center, net.distance, net.gamma), want[1:]):
            assert same_bits(p.grad().asnumpy(), w), p.name
    y = net(mx.nd.array(xs[0])).asnumpy()  # outside autograd: the same function
    assert same_bits(y, ref.qil_forward(xs[0], 0.8, 0.5, 1.4, W_GAMMA))


def test_trainer_learns_the_interval():
    """Activations, target clip(x / 4, 0, 1) quantized: SGD on the interval from [0, 2]
    (c = d = 1) moves it towards [0, 4] (c = d = 2) and the loss drops."""
    rng = np.random.default_rng(8)
    x = rng.uniform(-1, 5, (64, 32)).astype(f32)
    target = mx.nd.array(np.clip(x / 4, 0, 1))
    net = QilNet(center=1.0, distance=1.0, gamma=1.0, nbits=4)
    net.initialize()
    net.hybridize()
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 2.0})
    xin, losses = mx.nd.array(x), []
    for _ in range(150):
        with autograd.record():
            loss = ((net(xin) - target) ** 2).mean()
        loss.backward()
        trainer.step(1)
        losses.append(loss.asscalar())
    c, d = net.center.data().asscalar(), net.distance.data().asscalar()
    assert losses[-1] < 0.05 * losses[0]
    assert abs((c - d) - 0) < 0.15 and abs((c + d) - 4) < 0.15, (c, d)
    assert net.gamma.data().asscalar() == 1.0  # fix_gamma: no gradient


def test_init_interval():
    w = np.array([[-3.0, 1.0], [0.5, 2.0]], f32)
    c, d = ref.init_interval(w, W)
    assert c.shape == d.shape == (1,) and c[0] == d[0] == 1.5
    c, d = ref.init_interval(w, ACT)
    assert c[0] == d[0] == 1.0
    y = run(w, c[0], d[0], attrs=QILAttrs(nbits=8))
    assert y.max() == 1 and y.min() == 0  # nothing above the interval is lost


# -- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("attrs,needle", [
    (dict(nbits="four"), "'nbits' must be an integer, got 'four'"),
    (dict(is_weight="yes please"), "'is_weight' must be True or False, got 'yes please'"),
    (dict(fix_gamma="maybe"), "'fix_gamma' must be True or False, got 'maybe'"),
])
def test_bad_attribute_is_a_clear_error(attrs, needle):
    with pytest.raises(mx.base.MXNetError) as e:
        mx.nd.QIL(mx.nd.ones((2, 3)), mx.nd.ones(1), mx.nd.ones(1), mx.nd.ones(1),
                  **attrs).wait_to_read()
    assert "QIL: " in str(e.value) and needle in str(e.value), str(e.value)


def test_bad_shapes_and_dtypes_are_clear_errors():
    x, one = mx.nd.ones((4, 3)), mx.nd.ones(1)
    cases = [
        ((x, mx.nd.ones(2), one, one), "'center' must have shape (1,), got (2,)"),
        ((x, one, mx.nd.ones((1, 1)), one), "'distance' must have shape (1,), got (1,1)"),
        ((x, one, one, mx.nd.ones(3)), "'gamma' must have shape (1,), got (3,)"),
        ((x.astype("int32"), one, one, one), "input 'data' must be float32, got int32"),
        ((x, one.astype("float16"), one, one), "input 'center' must be float32, got float16"),
        ((x, one, one.astype("float64"), one), "input 'distance' must be float32, got float64"),
        ((x, one, one, one.astype("int32")), "input 'gamma' must be float32, got int32"),
    ]
    for args, needle in cases:
        with pytest.raises(mx.base.MXNetError) as e:
            mx.nd.QIL(*args).wait_to_read()
        assert "QIL: " in str(e.value) and needle in str(e.value), str(e.value)


def test_shapes_are_inferred_forward_through_the_graph():
    fc = mx.sym.FullyConnected(mx.sym.var("x"), mx.sym.var("w"), num_hidden=4, no_bias=True)
    out = mx.sym.QIL(fc, *[mx.sym.var(n, shape=s) for n, s in
                           (("c", (1,)), ("d", (0,)), ("g", (1,)))], nbits=2)
    arg_shapes, out_shapes, _ = out.infer_shape(x=(2, 3))
    assert out_shapes == [(2, 4)] and arg_shapes == [(2, 3), (4, 3), (1,), (1,), (1,)]
