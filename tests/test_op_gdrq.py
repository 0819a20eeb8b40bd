"""GDRQ (group-based distribution reshaping quantization, Yu et al., arXiv:1908.01477, with the
seed toolkit's attributes): forward, clip values and qstate bit for bit against the numpy
reference (quant_ops/refs/gdrq.py), the backward against the reference and against central
differences of the clip, the activation update as gradient descent on its penalty (checked
by finite differences), groups, edge values, nd / symbol / hybridized Gluon, clear errors."""
from __future__ import annotations

import os
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import quant_ops
from quant_ops.refs import gdrq as ref
from quant_ops.refs.gdrq import GDRQAttrs

f32 = np.float32
INFER = np.array([0, 0], f32)
TRAIN = np.array([0, 1], f32)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bits(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=f32).view(np.uint32)


def same(a, b) -> bool:
    return np.array_equal(bits(a), bits(b))


def op(x, alpha, qstate, g=None, **attrs):
    """The operator imperatively: (y, alpha after, qstate after, dx or None) as numpy."""
    xs = mx.nd.array(x, dtype=f32)
    al, st = mx.nd.array(alpha, dtype=f32), mx.nd.array(qstate, dtype=f32)
    if g is None:
        y = mx.nd.GDRQ(xs, al, st, **attrs)
        return y.asnumpy(), al.asnumpy(), st.asnumpy(), None
    xs.attach_grad()
    with autograd.record():
        y = mx.nd.GDRQ(xs, al, st, **attrs)
    y.backward(mx.nd.array(g, dtype=f32))
    return y.asnumpy(), al.asnumpy(), st.asnumpy(), xs.grad.asnumpy()


def sample(shape, seed, scale=1.0):
    """Normal data with zeros of both signs and a few large values; magnitudes spread so that
    the sum of |x| depends on its order."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(0, scale, shape) * 10.0 ** rng.uniform(-3, 1, shape)).astype(f32)
    x.flat[::17] = 0
    x.flat[5::31] = -0.0
    x.flat[::23] *= 8
    return x


# (attrs, data shape): per tensor and grouped, weights and activations, rows longer than one
# summation chunk with a tail, every grad_mode, ternary weights, 8 and 16 bits
CONFIGS = [
    (GDRQAttrs(), (8, 3, 5, 5)),
    (GDRQAttrs(do_quant=True, nbits=2), (4, 10000)),
    (GDRQAttrs(group_size=2, lamda=0.1, ktimes=3.0), (3, 6, 7, 5)),
    (GDRQAttrs(group_size=3, nbits=8, do_quant=True), (2, 9, 4100)),
    (GDRQAttrs(is_weight=True), (16, 3, 3, 3)),
    (GDRQAttrs(is_weight=True, nbits=1, grad_mode="clip"), (9000,)),
    (GDRQAttrs(is_weight=True, group_size=4, do_quant=True), (16, 8, 3, 3)),
    (GDRQAttrs(is_weight=True, group_size=1, nbits=16, grad_mode="clip"), (6, 5000)),
    (GDRQAttrs(fix_alpha=True, do_quant=True), (5, 7)),
    (GDRQAttrs(is_weight=True, fix_alpha=True, group_size=2), (4, 3)),
]
IDS = [f"{'w' if a.is_weight else 'a'}{a.nbits}g{a.group_size}"
       f"{'q' if a.do_quant else ''}{'f' if a.fix_alpha else ''}{a.grad_mode}-"
       f"{'x'.join(map(str, s))}" for a, s in CONFIGS]


# -- forward, state and backward against the reference ----------------------------------

@pytest.mark.parametrize("attrs,shape", CONFIGS, ids=IDS)
def test_forward_state_and_backward_match_reference(attrs, shape):
    x = sample(shape, seed=sum(shape))
    g = np.random.default_rng(1).normal(0, 1, shape).astype(f32)
    groups = ref.num_groups(shape, attrs)
    alpha0 = np.linspace(0.5, 1.5, groups).astype(f32)
    for qstate in (INFER, np.array([7, 1], f32)):
        y, al, st, dx = op(x, alpha0, qstate, g, **attrs.as_kwargs())
        ry, ral, rst = ref.gdrq_forward(x, alpha0, qstate, attrs)
        assert same(y, ry) and same(al, ral) and same(st, rst), qstate
        assert same(dx, ref.gdrq_backward(g, x, ral, attrs)), qstate
        training = qstate[1] == 1
        assert st[0] == qstate[0] + training
        # the state moved exactly when the seed's rules say so
        moved = not attrs.fix_alpha and (attrs.is_weight or training)
        assert (not np.array_equal(al, alpha0)) == moved
        if training and not attrs.do_quant:
            assert same(y, ref.clip(x, al, attrs))        # the reshaping alone
        else:
            assert same(y, ref.quantize(x, al, attrs))
            assert len(np.unique(y)) <= 2 * ref.levels(attrs.nbits) * groups + 1
        if attrs.pass_all:
            assert same(dx, g)
        else:
            assert 0 < (dx == 0).sum() < dx.size          # some values were clipped


def test_the_seed_semantics_on_a_small_example():
    """Scale-Clip of a weight: alpha = ktimes * mean|w| (seed GDRQ-inl.h lines 186-196), codes
    -L..L with L = 2^nbits - 1 and step alpha / L; training without do_quant outputs the
    clipped float value (line 207), inference quantizes."""
    w = np.array([[0.1, -0.2, 0.3, -0.4], [2.0, -0.5, 0.0, 1.0]], f32)
    t = f32(2) * f32(4.5 / 8)                                  # 2 * mean|w| = 1.125
    y, al, _, _ = op(w, [0.0], INFER, is_weight=True, nbits=2)
    assert al[0] == t
    s = t / f32(3)
    assert np.array_equal(y, np.array([[0, -1, 1, -1], [3, -1, 0, 3]], f32) * s)
    y, al, _, _ = op(w, [0.0], TRAIN, is_weight=True, nbits=2)  # reshaping only
    assert np.array_equal(y, np.clip(w, -t, t)) and al[0] == t
    y, _, _, _ = op(w, [0.0], TRAIN, is_weight=True, nbits=2, do_quant=True)
    assert np.array_equal(y, np.array([[0, -1, 1, -1], [3, -1, 0, 3]], f32) * s)
    # ternary weights (nbits=1): {-alpha, 0, alpha}
    y, al, _, _ = op(w, [0.0], INFER, is_weight=True, nbits=1, ktimes=0.5)
    a = f32(0.5) * f32(4.5 / 8)
    assert np.array_equal(y, np.array([[0, -a, a, -a], [a, -a, 0, a]], f32))
    # fix_alpha keeps the stored clip value, also for a weight
    y, al, _, _ = op(w, [0.3], INFER, is_weight=True, nbits=2, fix_alpha=True)
    assert al[0] == f32(0.3) and y.max() == f32(0.3) / f32(3) * f32(3)


def test_activation_clip_value_moves_in_training_only():
    """alpha <- alpha - lamda * (alpha - t) in training forwards (an alpha that is not > 0 is
    uninitialized and takes t); inference forwards leave it as it is."""
    x = np.abs(sample((64, 8), seed=3))
    t = ref.threshold(x)[0]
    _, al, st, _ = op(x, [0.0], TRAIN)
    assert al[0] == t and st[0] == 1
    _, al, st, _ = op(x, [2.0], TRAIN, lamda=0.25)
    assert al[0] == f32(2) - f32(0.25) * (f32(2) - t) and st[0] == 1
    _, al, st, _ = op(x, [2.0], INFER, lamda=0.25)
    assert al[0] == f32(2) and st[0] == 0
    _, al, _, _ = op(x, [2.0], TRAIN, lamda=0.25, fix_alpha=True)
    assert al[0] == f32(2)


def test_ties_round_half_to_even():
    a = f32(1.5)
    s = a / f32(15)
    k = np.arange(-15, 15, dtype=f32)
    x = ((k + f32(0.5)) * s).astype(f32)
    x = x[(x / s) == k + f32(0.5)]
    assert x.size > 10
    y, _, _, _ = op(x, [a], INFER, fix_alpha=True)
    assert same(y, ref.quantize(x, [a]))
    assert np.array_equal(y, (np.rint(x / s) * s).astype(f32))
    assert not np.array_equal(np.rint(x / s), np.trunc(x / s + np.sign(x) * 0.5))  # not away


def test_edge_values():
    """NaN in gives NaN out and is left out of the mean; infinities clip; a clip value
    without a usable step (0, negative, NaN, +inf, underflowing) quantizes to +0; all-zero
    weights give alpha = 0 and zeros, not NaN."""
    x = np.array([np.nan, np.inf, -np.inf, 0, -0.0, 1e-30, 3, -3, 1e30, 0.5], f32)
    g = np.linspace(-1, 1, x.size).astype(f32)
    for attrs in (GDRQAttrs(), GDRQAttrs(fix_alpha=True, do_quant=True),
                  GDRQAttrs(is_weight=True, grad_mode="clip")):
        for a in (1.0, 0.0, -1.0, np.nan, np.inf, 1e-44):
            for st in (INFER, TRAIN):
                y, al, _, dx = op(x, [a], st, g, **attrs.as_kwargs())
                ry, ral, _ = ref.gdrq_forward(x, [a], st, attrs)
                assert same(y, ry) and same(al, ral), (attrs, a, st)
                assert same(dx, ref.gdrq_backward(g, x, ral, attrs)), (attrs, a, st)
                assert np.isnan(y[0]) and dx[0] == 0
    finite = np.array([np.nan, 1.0, -3.0, 0.0], f32)
    _, al, _, _ = op(finite, [0.0], INFER, is_weight=True)
    assert al[0] == f32(2) * f32(4 / 4)                       # NaN counts 0 in the sum
    for a in (0.0, -1.0, np.inf, 1e-44):
        y, _, _, _ = op(finite, [a], INFER, fix_alpha=True)
        assert np.isnan(y[0]) and same(y[1:], np.zeros(3, f32))
    y, al, _, _ = op(np.zeros((3, 4), f32), [1.0], INFER, is_weight=True)
    assert al[0] == 0 and same(y, np.zeros((3, 4), f32))


def test_mean_sum_does_not_depend_on_the_thread_count():
    """The sum of |x| runs in a fixed order (refs/gdrq.py): one OpenMP thread gives the same
    clip value as many, and both equal the reference."""
    n = 1_000_003
    rng = np.random.default_rng(3)
    x = (rng.normal(0, 1, n) * 10.0 ** rng.uniform(-6, 6, n)).astype(f32)
    _, al, _, _ = op(x, [0.0], INFER, is_weight=True)
    assert same(al, ref.threshold(x, GDRQAttrs(is_weight=True)))
    code = ("import numpy as np, mxnet as mx, quant_ops\n"
            "rng = np.random.default_rng(3); n = 1_000_003\n"
            "x = (rng.normal(0, 1, n) * 10.0 ** rng.uniform(-6, 6, n)).astype('f4')\n"
            "a = mx.nd.zeros(1)\n"
            "mx.nd.GDRQ(mx.nd.array(x), a, mx.nd.zeros(2), is_weight=True).wait_to_read()\n"
            "print(a.asnumpy().view('u4')[0])\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[-1]) == bits(al)[0]


# -- groups ---------------------------------------------------------------------------------

def test_groups_are_consecutive_output_channels_of_a_weight():
    """group_size g: weights group g consecutive filters (axis 0), one alpha each; a group
    quantized alone per tensor gives the same bits (a weight group is one contiguous row)."""
    attrs = GDRQAttrs(is_weight=True, group_size=3, nbits=3)
    w = sample((12, 4, 3, 3), seed=5)
    y, al, _, _ = op(w, np.zeros(4, f32), INFER, **attrs.as_kwargs())
    assert al.shape == (4,) and len(np.unique(al)) == 4
    one = GDRQAttrs(is_weight=True, nbits=3)
    for k in range(4):
        part = w[3 * k:3 * k + 3]
        yk, ak, _, _ = op(part, [0.0], INFER, **one.as_kwargs())
        assert ak[0] == al[k] and same(y[3 * k:3 * k + 3], yk)
        np.testing.assert_allclose(al[k], 2 * np.abs(part.astype(np.float64)).mean(), rtol=1e-6)


def test_groups_are_channels_of_an_activation():
    """Activations group channels on axis 1 (the mean runs over batch, spatial and the group's
    channels); with fixed clip values each group is the per-tensor operator on its slice."""
    attrs = GDRQAttrs(group_size=2, lamda=1.0, do_quant=True)
    x = sample((3, 6, 4, 5), seed=6)
    _, al, _, _ = op(x, np.ones(3, f32), TRAIN, **attrs.as_kwargs())
    for k in range(3):
        part = x[:, 2 * k:2 * k + 2]
        np.testing.assert_allclose(al[k], 2 * np.abs(part.astype(np.float64)).mean(), rtol=1e-6)
    fixed = GDRQAttrs(group_size=2, fix_alpha=True)
    y, _, _, _ = op(x, al, INFER, **fixed.as_kwargs())
    for k in range(3):
        yk, _, _, _ = op(x[:, 2 * k:2 * k + 2], al[k:k + 1], INFER, fix_alpha=True)
        assert same(y[:, 2 * k:2 * k + 2], yk)


# -- the gradient and the lamda term --------------------------------------------------------

def test_gradient_is_central_differences_of_the_clip():
    """The clip-mode gradient (activations; weights with grad_mode 'clip') is the exact
    derivative of L = sum(g * clip(x, -alpha, alpha)) (the reshaping, unquantized): central
    differences at points 2h away from the kinks x = +-alpha equal the reference gradient
    and so the operator's (the quantizer's rounding is passed straight through).  Weights
    with 'ste' pass the gradient everywhere, also beyond alpha."""
    rng = np.random.default_rng(8)
    h = 1e-3
    for attrs, shape in ((GDRQAttrs(group_size=2, fix_alpha=True), (4, 6, 50)),
                         (GDRQAttrs(is_weight=True, grad_mode="clip", fix_alpha=True), (60, 9))):
        x = rng.uniform(-3, 3, shape).astype(f32)
        alpha = rng.uniform(0.5, 2.0, ref.num_groups(shape, attrs)).astype(f32)
        a_el = np.broadcast_to(alpha.reshape(1, -1, 1), ref.view(shape, attrs)).reshape(shape)
        x = np.where(np.abs(np.abs(x) - a_el) < 2 * h, x * f32(0.9), x).astype(f32)
        g = rng.normal(0, 1, shape).astype(f32)
        _, _, _, dx = op(x, alpha, TRAIN, g, **attrs.as_kwargs())
        rdx = ref.gdrq_backward(g, x, alpha, attrs)
        assert same(dx, rdx)
        x64 = x.astype(np.float64)
        fd = (ref.clip_f64(x64 + h, alpha, attrs) - ref.clip_f64(x64 - h, alpha, attrs)) / (2 * h)
        np.testing.assert_allclose(dx, fd * g, rtol=1e-6, atol=1e-7)
        assert (dx == 0).any() and (dx != 0).any()
    x = rng.normal(0, 1, (20, 5)).astype(f32)
    g = rng.normal(0, 1, x.shape).astype(f32)
    _, al, _, dx = op(x, [0.0], TRAIN, g, is_weight=True)
    assert (np.abs(x) > al[0]).any() and same(dx, g)


def test_activation_update_is_gradient_descent_on_the_threshold_penalty():
    """The lamda term: one training forward moves each group's clip value by -lamda times the
    derivative of P(alpha) = 1/2 sum (alpha - t)^2 (t = ktimes * mean|x|), checked against
    central differences of P; so P decreases and alpha converges to t (the seed's
    alpha + lamda * (alpha - t) would be gradient ascent: P would grow)."""
    attrs = GDRQAttrs(group_size=2, lamda=0.05, ktimes=3.0)
    x = np.abs(sample((4, 6, 10), seed=9))
    t = ref.threshold(x, attrs)
    alpha = np.array([0.2, 5.0, 1.0], f32)
    h = 1e-4
    for _ in range(3):
        _, new, _, _ = op(x, alpha, TRAIN, **attrs.as_kwargs())
        assert same(new, ref.gdrq_forward(x, alpha, TRAIN, attrs)[1])
        fd = np.array([(ref.threshold_penalty(alpha + h * e, t)
                        - ref.threshold_penalty(alpha - h * e, t)) / (2 * h)
                       for e in np.eye(alpha.size)])
        np.testing.assert_allclose(alpha - new, attrs.lamda * fd, rtol=1e-5, atol=1e-7)
        assert ref.threshold_penalty(new, t) < ref.threshold_penalty(alpha, t)
        seed_sign = alpha + f32(attrs.lamda) * (alpha - t)
        assert ref.threshold_penalty(seed_sign, t) > ref.threshold_penalty(alpha, t)
        alpha = new
    st = mx.nd.array(TRAIN)
    al = mx.nd.array(alpha)
    xs = mx.nd.array(x)
    for _ in range(300):
        mx.nd.GDRQ(xs, al, st, **attrs.as_kwargs())
    np.testing.assert_allclose(al.asnumpy(), t, rtol=1e-5)
    assert st.asnumpy()[0] == 300


# -- symbol and Gluon -------------------------------------------------------------------------

def reference_run(xs, gs, attrs, alpha0, qstate=TRAIN):
    alpha, st = np.asarray(alpha0, f32), qstate.copy()
    outs, grads = [], []
    for x, g in zip(xs, gs):
        y, alpha, st = ref.gdrq_forward(x, alpha, st, attrs)
        outs.append(y)
        grads.append(ref.gdrq_backward(g, x, alpha, attrs))
    return outs, grads, alpha, st


def batches(n=3, shape=(4, 6, 5)):
    rng = np.random.default_rng(10)
    xs = [np.abs(rng.normal(0, 1 + i, shape)).astype(f32) for i in range(n)]
    return xs, [rng.normal(0, 1, shape).astype(f32) for _ in range(n)]


def test_symbol_executor_matches_reference():
    attrs = GDRQAttrs(group_size=3, lamda=0.2)
    xs, gs = batches()
    sym = mx.sym.GDRQ(mx.sym.var("data"), mx.sym.var("q_gdrq_alpha", shape=(2,)),
                      mx.sym.var("q_qstate", shape=(2,)), name="q", **attrs.as_kwargs())
    assert sym.list_arguments() == ["data"]
    assert sym.list_auxiliary_states() == ["q_gdrq_alpha", "q_qstate"]
    exe = sym.simple_bind(mx.cpu(), data=xs[0].shape, grad_req="write")
    exe.aux_dict["q_gdrq_alpha"][:] = 0
    quant_ops.set_training(exe.aux_dict, True)
    outs, grads, alpha, st = reference_run(xs, gs, attrs, np.zeros(2, f32))
    for x, g, want_y, want_g in zip(xs, gs, outs, grads):
        exe.arg_dict["data"][:] = x
        exe.forward(is_train=True)
        exe.backward(mx.nd.array(g))
        assert same(exe.outputs[0].asnumpy(), want_y)
        assert same(exe.grad_dict["data"].asnumpy(), want_g)
    assert same(exe.aux_dict["q_gdrq_alpha"].asnumpy(), alpha)
    assert same(exe.aux_dict["q_qstate"].asnumpy(), st)
    # inference: quantized with the frozen clip values
    quant_ops.set_training(exe.aux_dict, False)
    exe.arg_dict["data"][:] = xs[0] * 10
    exe.forward(is_train=False)
    assert same(exe.aux_dict["q_gdrq_alpha"].asnumpy(), alpha)
    assert same(exe.outputs[0].asnumpy(), ref.quantize(xs[0] * 10, alpha, attrs))


class GDRQBlock(gluon.HybridBlock):
    """GDRQ with its clip values and mode as non-trained parameters (test helper)."""

    def __init__(self, groups=1, **attrs):
        super().__init__()
        self._attrs = attrs
        with self.name_scope():
            self.gdrq_alpha = self.params.get("gdrq_alpha", shape=(groups,), init="zeros",
                                              grad_req="null", differentiable=False)
            self.qstate = self.params.get("qstate", shape=(2,), init="zeros",
                                          grad_req="null", differentiable=False)

    def hybrid_forward(self, F, x, gdrq_alpha, qstate):  # noqa: N803
        return F.GDRQ(x, gdrq_alpha, qstate, **self._attrs)


class QuantDense(gluon.HybridBlock):
    """A Dense layer with GDRQ on its weight (groups of output units) and on its input."""

    def __init__(self, units, in_units, **act_attrs):
        super().__init__()
        self._units = units
        with self.name_scope():
            self.weight = self.params.get("weight", shape=(units, in_units))
            self.wq = GDRQBlock(groups=units // 2, is_weight=True, group_size=2, do_quant=True,
                                nbits=2)
            self.aq = GDRQBlock(**act_attrs)

    def hybrid_forward(self, F, x, weight):  # noqa: N803
        return F.FullyConnected(self.aq(x), self.wq(weight), num_hidden=self._units,
                                no_bias=True)


@pytest.mark.parametrize("hybrid", [None, {}, {"static_alloc": True, "static_shape": True}])
def test_gluon_matches_reference(hybrid):
    """Training steps (autograd.record) move the clip values and count steps; a call outside
    record is inference (track_training keeps qstate's flag): quantized, state frozen."""
    act = GDRQAttrs(lamda=0.3, ktimes=3.0)
    wq = GDRQAttrs(is_weight=True, group_size=2, do_quant=True, nbits=2)
    rng = np.random.default_rng(11)
    w = rng.normal(0, 0.3, (4, 6)).astype(f32)
    net = QuantDense(4, 6, **act.as_kwargs())
    net.initialize()
    net.weight.set_data(mx.nd.array(w))
    quant_ops.track_training(net)
    if hybrid is not None:
        net.hybridize(**hybrid)
    xs = [np.abs(rng.normal(0, 1, (5, 6))).astype(f32) for _ in range(3)]
    alpha, st = np.zeros(1, f32), TRAIN.copy()
    for x in xs:
        xin = mx.nd.array(x)
        xin.attach_grad()
        with autograd.record():
            y = net(xin)
        y.backward()
        xq, alpha, st = ref.gdrq_forward(x, alpha, st, act)
        wqv, walpha, _ = ref.gdrq_forward(w, np.zeros(2, f32), TRAIN, wq)
        want = xq.astype(np.float64) @ wqv.astype(np.float64).T
        np.testing.assert_allclose(y.asnumpy(), want, rtol=1e-5, atol=1e-6)
        # d out / d x = ones @ Wq, through the activation's clip gradient
        dq = np.ones((5, 4), f32) @ wqv
        assert np.allclose(xin.grad.asnumpy(), ref.gdrq_backward(dq.astype(f32), x, alpha, act))
        assert same(net.aq.gdrq_alpha.data().asnumpy(), alpha)
        assert same(net.wq.gdrq_alpha.data().asnumpy(), walpha)
        # the weight's gradient passes straight through its quantizer (grad_mode 'ste')
        np.testing.assert_allclose(net.weight.grad().asnumpy(),
                                   np.ones((5, 4)).T @ xq.astype(np.float64), rtol=1e-5)
    assert same(net.aq.qstate.data().asnumpy(), st) and st[0] == 3
    x = xs[0] * 5
    y = net(mx.nd.array(x)).asnumpy()
    assert same(net.aq.gdrq_alpha.data().asnumpy(), alpha)
    assert net.aq.qstate.data().asnumpy()[0] == 3
    want = (ref.quantize(x, alpha, act).astype(np.float64)
            @ ref.quantize(w, walpha, wq).astype(np.float64).T)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_shapes_are_inferred_forward_through_the_graph():
    fc = mx.sym.FullyConnected(mx.sym.var("x"), mx.sym.var("w"), num_hidden=6, no_bias=True)
    for shape in ((3,), (0,)):
        out = mx.sym.GDRQ(fc, mx.sym.var("a", shape=shape), mx.sym.var("s", shape=(2,)),
                          group_size=2)
        _, out_shapes, aux_shapes = out.infer_shape(x=(2, 5))
        assert out_shapes == [(2, 6)] and aux_shapes == [(3,), (2,)]


# -- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("attrs,needle", [
    (dict(nbits="four"), "'nbits' must be an integer, got 'four'"),
    (dict(group_size=0), "'group_size' must be -1 (one group) or a positive number"),
    (dict(group_size=-2), "'group_size' = -2 is out of range"),
    (dict(lamda=1.5), "'lamda' must be a number in [0"),
    (dict(ktimes=0), "'ktimes' must be a positive number, got '0'"),
    (dict(ktimes="inf"), "'ktimes' must be a positive number, got 'inf'"),
    (dict(grad_mode="round"), "'grad_mode' must be one of {ste, clip}, got 'round'"),
    (dict(fix_alpha="maybe"), "'fix_alpha' must be True or False"),
])
def test_bad_attribute_is_a_clear_error(attrs, needle):
    with pytest.raises(mx.base.MXNetError) as e:
        mx.nd.GDRQ(mx.nd.ones((2, 4)), mx.nd.ones(1), mx.nd.zeros(2), **attrs).wait_to_read()
    assert "GDRQ: " in str(e.value) and needle in str(e.value), str(e.value)


def test_bad_shapes_and_dtypes_are_clear_errors():
    x = mx.nd.ones((4, 6))
    cases = [
        ((x, mx.nd.ones(2), mx.nd.zeros(2)), {},
         "'gdrq_alpha' must have shape (1,) for data of shape (4,6) (one clip value), got (2,)"),
        ((x, mx.nd.ones(1), mx.nd.zeros(2)), dict(group_size=2),
         "'gdrq_alpha' must have shape (3,) for data of shape (4,6) (one clip value per group "
         "of 2 channels), got (1,)"),
        ((x, mx.nd.ones(1), mx.nd.zeros(2)), dict(group_size=2, is_weight=True),
         "'gdrq_alpha' must have shape (2,)"),
        ((x, mx.nd.ones(1), mx.nd.zeros(3)), {}, "'qstate' must have shape (2,)"),
        ((x, mx.nd.ones(1), mx.nd.zeros(2)), dict(group_size=4),
         "group_size=4 does not divide the 6 channels on axis 1"),
        ((mx.nd.ones(6), mx.nd.ones(3), mx.nd.zeros(2)), dict(group_size=2),
         "has no axis 1"),
        ((x.astype("int32"), mx.nd.ones(1), mx.nd.zeros(2)), {},
         "input 'data' must be float32, got int32"),
        ((x, mx.nd.ones(1, dtype="float64"), mx.nd.zeros(2)), {},
         "input 'gdrq_alpha' must be float32, got float64"),
        ((x, mx.nd.ones(1), mx.nd.zeros(2, dtype="float16")), {},
         "input 'qstate' must be float32, got float16"),
    ]
    for args, attrs, needle in cases:
        with pytest.raises(mx.base.MXNetError) as e:
            mx.nd.GDRQ(*args, **attrs).wait_to_read()
        assert "GDRQ: " in str(e.value) and needle in str(e.value), str(e.value)
    assert "gdrq_alpha" not in str(e.value)  # one error does not leak into the next message
