"""PACT (Choi et al., arXiv:1805.06085): forward bit for bit against the numpy reference
(quant_ops/refs/pact.py) and onnxruntime's unsigned QDQ; the paper's estimator (eq. 3 + STE)
against the reference and against central differences; nd, symbol and hybridized Gluon;
a Trainer moving alpha the right way; clear errors.  The signed form (signed=True, the clip
to [-alpha, alpha] of the seed toolkit's _contrib_PACT) through the same checks, and its
int8 QDQ form against onnxruntime."""
from __future__ import annotations

import os
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import quant_ops  # noqa: F401  (loads the operator library)
from quant_ops.refs import pact as ref

f32 = np.float32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bits(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=f32).view(np.uint32)


def run(x, alpha, g=None, **attrs):
    """The operator imperatively: y, and with ``g`` also (dx, dalpha), as numpy."""
    xs, a = mx.nd.array(x, dtype=f32), mx.nd.array(np.reshape(alpha, (1,)), dtype=f32)
    if g is None:
        return mx.nd.PACT(xs, a, **attrs).asnumpy()
    xs.attach_grad()
    a.attach_grad()
    with autograd.record():
        y = mx.nd.PACT(xs, a, **attrs)
    y.backward(mx.nd.array(g, dtype=f32))
    return y.asnumpy(), xs.grad.asnumpy(), a.grad.asnumpy()


def tie_values(s: np.float32, n: int, qmax: int, rng) -> np.ndarray:
    """Values whose float32 quotient by ``s`` is exactly k + 0.5 (k from -2 to qmax + 1)."""
    k = rng.integers(-2, qmax + 2, size=n * 4).astype(f32)
    x = ((k + f32(0.5)) * s).astype(f32)
    return x[(x / s) == k + f32(0.5)][:n]


def sample(alpha: float, nbits: int, n: int, rng) -> np.ndarray:
    a = f32(alpha)
    s = ref.scale_of(a, nbits)
    qmax = 2 ** nbits - 1
    special = np.array([a, np.nextafter(a, f32(0)), np.nextafter(a, f32(np.inf)), -a, 0.0,
                        -0.0, np.inf, -np.inf, 1e-45, -1e-45, 0.5 * s, -0.5 * s,
                        (qmax + 0.5) * s, 3e38, -3e38], f32)
    parts = [rng.normal(a / 2, a, n // 2).astype(f32),              # both sides of 0 and alpha
             rng.uniform(-a, 3 * a, n // 4).astype(f32),
             tie_values(s, n // 8, qmax, rng),                       # exact ties
             special]
    x = np.concatenate(parts)
    return rng.permutation(np.concatenate([x, rng.normal(0, 3 * a, n - x.size).astype(f32)]))


# -- forward ---------------------------------------------------------------------------

@pytest.mark.parametrize("nbits", [2, 3, 4, 5, 8, 12, 16])
def test_forward_matches_reference_bit_for_bit(nbits):
    rng = np.random.default_rng(nbits)
    for alpha in (1.0, 3.7, 0.0123, 1000.5):
        x = sample(alpha, nbits, 60_000, rng)
        x[7] = np.nan
        y = run(x, alpha, nbits=nbits)
        want = ref.pact_forward(x, alpha, nbits)
        assert np.array_equal(bits(y), bits(want)), (nbits, alpha)
        assert np.isnan(y[7]) and np.isnan(want).sum() == 1          # NaN in, NaN out
        s = ref.scale_of(alpha, nbits)
        codes = np.rint(want[~np.isnan(want)] / s)
        assert codes.min() == 0 and codes.max() == 2 ** nbits - 1    # unsigned k-bit range
        assert np.array_equal(codes.astype(f32) * s, want[~np.isnan(want)])  # y = q * s
        assert not np.signbit(want[want == 0]).any()                 # code 0 is +0


def test_forward_is_the_papers_eq_1_2():
    """The QDQ order (clamp the rounded code) equals eq. 2 (round the clipped value):
    y_q = round(clip(x, 0, a) * (2^k - 1) / a) * a / (2^k - 1), here in float64 on values
    that are not within float32 noise of a rounding tie."""
    rng = np.random.default_rng(1)
    for nbits, alpha in ((2, 1.0), (4, 3.7), (8, 0.05), (16, 123.0)):
        x = rng.uniform(-2 * alpha, 3 * alpha, 100_000).astype(f32)
        lv = 2.0 ** nbits - 1
        t = np.clip(x.astype(np.float64), 0, alpha) * lv / alpha
        # float32 x / s is within ~2^-22 relative of t: only near-ties may round differently
        away = np.abs(t - np.floor(t) - 0.5) > 2.0 ** -20 * lv
        paper = np.round(t) * alpha / lv
        y = run(x, alpha, nbits=nbits).astype(np.float64)
        assert away.mean() > 0.8
        np.testing.assert_allclose(y[away], paper[away], rtol=1e-6, atol=0)


def _ort_qdq_unsigned(x: np.ndarray, s: np.float32, nbits: int) -> np.ndarray:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    ztype, opset = {8: (TensorProto.UINT8, 13), 4: (TensorProto.UINT4, 21)}[nbits]
    xi = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))
    yi = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))
    inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [float(s)]),
             helper.make_tensor("z", ztype, [], [0])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "qdq", [xi], [yi], inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": np.ascontiguousarray(x, dtype=f32)})[0]


@pytest.mark.parametrize("nbits", [8, 4])
@pytest.mark.parametrize("alpha", [6.0, 3.7, 0.0123])
def test_forward_bit_identical_to_onnxruntime_unsigned_qdq(nbits, alpha):
    """uint8 QDQ (opset 13) at k = 8, uint4 QDQ (opset 21) at k = 4, zero point 0, scale
    alpha / (2^k - 1).  (NaN is left out: the engine turns it into a code, we keep NaN.)"""
    rng = np.random.default_rng(2)
    x = sample(alpha, nbits, 300_000, rng)
    s = ref.scale_of(alpha, nbits)
    with np.errstate(over="ignore"):
        ties = (x / s) == np.floor(x / s) + f32(0.5)
    assert ties.sum() > 20_000
    y = run(x, alpha, nbits=nbits)
    assert np.array_equal(bits(y), bits(_ort_qdq_unsigned(x, s, nbits)))


@pytest.mark.parametrize("alpha", [0.0, -0.0, -1.5, np.nan, np.inf, 1e-44])
def test_alpha_without_a_usable_scale_gives_zeros(alpha):
    """alpha <= 0, NaN, +inf, or so small that alpha / (2^k - 1) underflows: +0 everywhere
    (NaN stays NaN); not an error, alpha is data.  The estimator is still the paper's."""
    x = np.array([np.nan, 2.0, -1.0, 0.0, -0.0, 5.0, np.inf, -3.0], f32)
    g = np.arange(1, 9, dtype=f32)
    y, dx, da = run(x, alpha, g, nbits=4)
    want = ref.pact_forward(x, alpha, 4)
    assert np.array_equal(bits(y), bits(want))
    assert np.isnan(y[0]) and np.array_equal(bits(y[1:]), np.zeros(7, np.uint32))
    rdx, rda = ref.pact_backward(g, x, alpha)
    assert np.array_equal(dx, rdx) and np.array_equal(bits(da), bits(rda))
    if alpha == -1.5:   # nothing lies in [0, alpha); all but x = -3 (and NaN) saturate
        assert not dx.any() and da[0] == g[1:7].sum()


# -- backward: the paper's estimator ----------------------------------------------------

@pytest.mark.parametrize("n", [1, 7, 8, 2047, 2048, 2049, 100_003])
def test_backward_matches_reference_bit_for_bit(n):
    rng = np.random.default_rng(n)
    alpha = f32(1.5)
    x = rng.normal(1, 2, n).astype(f32)
    x[:min(n, 4)] = [alpha, 0.0, -0.0, np.nan][:min(n, 4)]
    # gradients of very different magnitudes: any other summation order would differ
    g = (rng.normal(0, 1, n) * 10.0 ** rng.uniform(-6, 6, n)).astype(f32)
    for nbits in (2, 4, 8):
        y, dx, da = run(x, alpha, g, nbits=nbits)
        rdx, rda = ref.pact_backward(g, x, alpha)
        assert np.array_equal(bits(dx), bits(rdx))
        assert np.array_equal(bits(da), bits(rda))
    # the estimator itself: x on [0, alpha) passes, x == alpha and above feed alpha
    inside = (x >= 0) & (x < alpha)
    assert np.array_equal(dx, np.where(inside, g, f32(0)))
    np.testing.assert_allclose(da[0], g[x >= alpha].astype(np.float64).sum(), rtol=1e-6,
                               atol=1e-6 * np.abs(g).max())
    if n >= 4:
        assert dx[0] == 0 and dx[1] == g[1] and dx[2] == g[2] and dx[3] == 0  # a, 0, -0, NaN


def test_alpha_gradient_does_not_depend_on_the_thread_count():
    """The kernel sums dL/dalpha in a fixed order (refs/pact.py): one OpenMP thread gives
    the same bits as many."""
    rng = np.random.default_rng(3)
    n = 1_000_003
    x = rng.normal(1, 2, n).astype(f32)
    g = (rng.normal(0, 1, n) * 10.0 ** rng.uniform(-6, 6, n)).astype(f32)
    _, _, da = run(x, 1.5, g)
    assert bits(da)[0] == bits(ref.pact_backward(g, x, 1.5)[1])[0]
    code = ("import sys, numpy as np, mxnet as mx, quant_ops\n"
            "from mxnet import autograd\n"
            "rng = np.random.default_rng(3); n = 1_000_003\n"
            "x = rng.normal(1, 2, n).astype('f4')\n"
            "g = (rng.normal(0, 1, n) * 10.0 ** rng.uniform(-6, 6, n)).astype('f4')\n"
            "xs, a = mx.nd.array(x), mx.nd.array([1.5]); a.attach_grad()\n"
            "with autograd.record(): y = mx.nd.PACT(xs, a)\n"
            "y.backward(mx.nd.array(g))\n"
            "print(a.grad.asnumpy().view('u4')[0])\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[-1]) == bits(da)[0]


def test_estimator_equals_central_differences_of_the_clip():
    """The paper's estimator (eq. 3 + STE) is the exact gradient of L = sum(g * clip(x, 0, a))
    (eq. 1, unquantized): central differences of it, at points at least 2h from the kinks
    x = 0 and x = a, equal the reference gradients and so the operator's.  For saturated
    inputs (x > a) the quantized forward itself is (2^k - 1) * a / (2^k - 1) = a up to
    float32 rounding, so its central difference in alpha is sum(g) there too.  (Below alpha
    the STE ignores that alpha also sets the step: the quantized forward is piecewise
    constant in x, and its alpha derivative there, round(x/s)/(2^k-1), is deliberately not
    part of the paper's estimator.)"""
    rng = np.random.default_rng(4)
    alpha, h = f32(2.0), 1e-3
    x = rng.uniform(-3, 6, 4000).astype(f32)
    x = x[(np.abs(x) > 2 * h) & (np.abs(x - alpha) > 2 * h)]
    g = rng.normal(0, 1, x.size).astype(f32)
    _, dx, da = run(x, alpha, g, nbits=4)
    rdx, rda = ref.pact_backward(g, x, alpha)
    assert np.array_equal(dx, rdx) and np.array_equal(da, rda)

    g64 = g.astype(np.float64)

    def loss_a(a):
        return float((g64 * ref.pact_clip(x, a)).sum())

    fd_alpha = (loss_a(float(alpha) + h) - loss_a(float(alpha) - h)) / (2 * h)
    np.testing.assert_allclose(da[0], fd_alpha, rtol=1e-5, atol=1e-6)
    x64 = x.astype(np.float64)
    fd_x = (ref.pact_clip(x64 + h, alpha) - ref.pact_clip(x64 - h, alpha)) / (2 * h) * g64
    np.testing.assert_allclose(dx, fd_x, rtol=1e-6, atol=1e-6)

    # saturated inputs: the quantized forward, differenced in alpha, gives the estimator
    xs = rng.uniform(3, 6, 2000).astype(f32)
    gs = rng.normal(0, 1, xs.size).astype(f32)
    for nbits in (2, 4, 8):
        lq = [float((gs.astype(np.float64) * ref.pact_forward(xs, f32(a), nbits)).sum())
              for a in (alpha + f32(0.01), alpha - f32(0.01))]
        fd = (lq[0] - lq[1]) / float(f32(alpha + f32(0.01)) - f32(alpha - f32(0.01)))
        _, _, da_s = run(xs, alpha, gs, nbits=nbits)
        np.testing.assert_allclose(da_s[0], fd, rtol=1e-3)


# -- symbol, Gluon, Trainer ----------------------------------------------------------------

def _batches(n=3, shape=(4, 5, 6)):
    rng = np.random.default_rng(6)
    xs = [rng.normal(1, 2, shape).astype(f32) for _ in range(n)]
    gs = [rng.normal(0, 1, shape).astype(f32) for _ in range(n)]
    return xs, gs


@pytest.mark.parametrize("gamma_shape", [(1,), (0,)])
def test_symbol_executor_matches_reference(gamma_shape):
    xs, gs = _batches()
    gamma = mx.sym.var("p_gamma", shape=gamma_shape)
    sym = mx.sym.PACT(mx.sym.var("data"), gamma, nbits=3, name="p")
    assert sym.list_arguments() == ["data", "p_gamma"] and sym.list_auxiliary_states() == []
    assert sym.infer_shape(data=(4, 5, 6))[0][1] == (1,)
    exe = sym.simple_bind(mx.cpu(), data=xs[0].shape, grad_req="write")
    exe.arg_dict["p_gamma"][:] = 2.5
    for x, g in zip(xs, gs):
        exe.arg_dict["data"][:] = x
        exe.forward(is_train=True)
        exe.backward(mx.nd.array(g))
        assert np.array_equal(bits(exe.outputs[0].asnumpy()), bits(ref.pact_forward(x, 2.5, 3)))
        dx, da = ref.pact_backward(g, x, 2.5)
        assert np.array_equal(exe.grad_dict["data"].asnumpy(), dx)
        assert np.array_equal(bits(exe.grad_dict["p_gamma"].asnumpy()), bits(da))


@pytest.mark.parametrize("req", [{"data": "write", "p_gamma": "null"},
                                 {"data": "null", "p_gamma": "write"}])
def test_symbol_executor_with_one_gradient_not_requested(req):
    x, g = (b[0] for b in _batches(1))
    sym = mx.sym.PACT(mx.sym.var("data"), mx.sym.var("p_gamma", shape=(1,)), name="p")
    exe = sym.simple_bind(mx.cpu(), data=x.shape, grad_req=req)
    exe.arg_dict["data"][:] = x
    exe.arg_dict["p_gamma"][:] = 1.25
    exe.forward(is_train=True)
    exe.backward(mx.nd.array(g))
    dx, da = ref.pact_backward(g, x, 1.25)
    name, want = ("data", dx) if req["data"] == "write" else ("p_gamma", da)
    assert np.array_equal(bits(exe.grad_dict[name].asnumpy()), bits(want))


class PactNet(gluon.HybridBlock):
    """PACT after a ReLU-free input, alpha a trained (1,) parameter."""

    def __init__(self, alpha=2.5, nbits=4):
        super().__init__()
        self._nbits = nbits
        with self.name_scope():
            self.alpha = self.params.get("alpha", shape=(1,), init=mx.init.Constant(alpha))

    def hybrid_forward(self, F, x, alpha):  # noqa: N803 (Gluon's signature)
        return F.PACT(x, alpha, nbits=self._nbits)


@pytest.mark.parametrize("hybrid", [None, {}, {"static_alloc": True, "static_shape": True}])
def test_gluon_matches_reference(hybrid):
    xs, gs = _batches()
    net = PactNet(alpha=2.5, nbits=3)
    net.initialize()
    if hybrid is not None:
        net.hybridize(**hybrid)
    for x, g in zip(xs, gs):
        xin = mx.nd.array(x)
        xin.attach_grad()
        with autograd.record():
            y = net(xin)
        y.backward(mx.nd.array(g))
        assert np.array_equal(bits(y.asnumpy()), bits(ref.pact_forward(x, 2.5, 3)))
        dx, da = ref.pact_backward(g, x, 2.5)
        assert np.array_equal(xin.grad.asnumpy(), dx)
        assert np.array_equal(bits(net.alpha.grad().asnumpy()), bits(da))
    y = net(mx.nd.array(xs[0])).asnumpy()  # outside autograd: the same function
    assert np.array_equal(bits(y), bits(ref.pact_forward(xs[0], 2.5, 3)))


def _train_alpha(alpha0, target, x, steps=60, lr=0.05, hybrid=True):
    """SGD on L = mean((PACT(x) - target)^2); returns the alpha trajectory."""
    net = PactNet(alpha=alpha0, nbits=4)
    net.initialize()
    if hybrid:
        net.hybridize()
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": lr})
    xin = mx.nd.array(x)
    path = [float(net.alpha.data().asscalar())]
    for _ in range(steps):
        with autograd.record():
            loss = ((net(xin) - target) ** 2).mean()
        loss.backward()
        trainer.step(1)
        path.append(float(net.alpha.data().asscalar()))
    return np.array(path)


@pytest.mark.parametrize("hybrid", [False, True])
def test_trainer_moves_alpha_the_right_way(hybrid):
    """Activations mostly above alpha, target above alpha: alpha grows; target below alpha:
    it shrinks.  Both converge to the target (saturated outputs equal alpha)."""
    rng = np.random.default_rng(7)
    x = np.abs(rng.normal(8, 1, (32, 16))).astype(f32)   # all above alpha
    x[0, :4] = [0.5, -1.0, 0.0, 0.25]                     # a few not saturated
    up = _train_alpha(1.0, 3.0, x, hybrid=hybrid)
    assert (np.diff(up) >= 0).all() and up[-1] > up[0] + 1.5
    assert abs(up[-1] - 3.0) < 0.1
    down = _train_alpha(5.0, 2.0, x, hybrid=hybrid)
    assert (np.diff(down) <= 0).all() and down[-1] < down[0] - 2.5
    assert abs(down[-1] - 2.0) < 0.1
    # activations all below alpha: no saturated input, alpha gets no gradient and stays
    still = _train_alpha(20.0, 3.0, x, steps=5, hybrid=hybrid)
    assert (still == 20.0).all()


# -- signed=True: the clip to [-alpha, alpha] (the seed toolkit's _contrib_PACT) -----------

def signed_sample(alpha: float, nbits: int, n: int, rng) -> np.ndarray:
    a = f32(alpha)
    s = ref.scale_of(a, nbits, signed=True)
    m = 2 ** (nbits - 1) - 1
    special = np.array([a, -a, np.nextafter(a, f32(0)), np.nextafter(-a, f32(0)),
                        np.nextafter(a, f32(np.inf)), np.nextafter(-a, f32(-np.inf)), 0.0, -0.0,
                        np.inf, -np.inf, 1e-45, -1e-45, 0.5 * s, -0.5 * s, (m + 0.5) * s,
                        -(m + 0.5) * s, 3e38, -3e38], f32)
    k = rng.integers(-m - 2, m + 2, size=n // 2).astype(f32)
    ties = ((k + f32(0.5)) * s).astype(f32)
    ties = ties[(ties / s) == k + f32(0.5)][: n // 8]
    x = np.concatenate([rng.normal(0, a, n // 2).astype(f32),
                        rng.uniform(-3 * a, 3 * a, n // 4).astype(f32), ties, special])
    return rng.permutation(x)


@pytest.mark.parametrize("nbits", [2, 3, 5, 8, 16])
def test_signed_forward_matches_reference_bit_for_bit(nbits):
    rng = np.random.default_rng(10 + nbits)
    m = 2 ** (nbits - 1) - 1
    for alpha in (1.0, 3.7, 0.0123, 1000.5):
        x = signed_sample(alpha, nbits, 40_000, rng)
        x[5] = np.nan
        y = run(x, alpha, nbits=nbits, signed=True)
        want = ref.pact_forward(x, alpha, nbits, signed=True)
        assert np.array_equal(bits(y), bits(want)), (nbits, alpha)
        assert np.isnan(y[5])
        s = ref.scale_of(alpha, nbits, signed=True)
        assert s == f32(f32(alpha) / f32(m))
        ok = ~np.isnan(want)
        codes = np.rint(want[ok] / s)
        assert codes.min() == -m and codes.max() == m               # symmetric narrow range
        assert np.array_equal(codes.astype(f32) * s, want[ok])       # y = q * s
        assert not np.signbit(want[want == 0]).any()                 # code 0 is +0
        # the clip is [-alpha, alpha]: the form is odd (y(-x) = -y(x)) away from ties
        away = ok & (np.abs(x / s - np.floor(x / s) - 0.5) > 1e-3)
        neg = run(-x[away], alpha, nbits=nbits, signed=True)
        assert np.array_equal(neg + 0, -y[away] + 0)
    # unsigned is unchanged by the attribute's presence
    x = signed_sample(2.0, nbits, 5000, rng)
    assert np.array_equal(bits(run(x, 2.0, nbits=nbits, signed=False)),
                          bits(run(x, 2.0, nbits=nbits)))


def test_signed_forward_is_the_seed_clip():
    """The seed's y = round(clip(x, -a, a) * L / a) * a / L with L = 2^(k-1) - 1 levels each
    side, in float64, on values not within float32 noise of a rounding tie."""
    rng = np.random.default_rng(11)
    for nbits, alpha in ((2, 1.0), (5, 3.7), (8, 0.05), (16, 123.0)):
        x = rng.uniform(-3 * alpha, 3 * alpha, 100_000).astype(f32)
        lv = 2.0 ** (nbits - 1) - 1
        t = np.clip(x.astype(np.float64), -alpha, alpha) * lv / alpha
        away = np.abs(np.abs(t) - np.floor(np.abs(t)) - 0.5) > 2.0 ** -20 * lv
        seed = np.sign(t) * np.floor(np.abs(t) + 0.5) * alpha / lv       # half away from 0
        y = run(x, alpha, nbits=nbits, signed=True).astype(np.float64)
        assert away.mean() > 0.8
        np.testing.assert_allclose(y[away], seed[away], rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("n", [1, 9, 2048, 2049, 50_001])
def test_signed_backward_matches_reference_bit_for_bit(n):
    rng = np.random.default_rng(20 + n)
    alpha = f32(1.5)
    x = rng.normal(0, 2, n).astype(f32)
    x[:min(n, 6)] = [alpha, -alpha, 0.0, -0.0, np.nan, np.nextafter(-alpha, f32(0))][:min(n, 6)]
    g = (rng.normal(0, 1, n) * 10.0 ** rng.uniform(-6, 6, n)).astype(f32)
    for nbits in (2, 5, 8):
        _, dx, da = run(x, alpha, g, nbits=nbits, signed=True)
        rdx, rda = ref.pact_backward(g, x, alpha, signed=True)
        assert np.array_equal(bits(dx), bits(rdx))
        assert np.array_equal(bits(da), bits(rda))
    inside = (x > -alpha) & (x < alpha)
    assert np.array_equal(dx, np.where(inside, g, f32(0)))
    want = g[x >= alpha].astype(np.float64).sum() - g[x <= -alpha].astype(np.float64).sum()
    np.testing.assert_allclose(da[0], want, rtol=1e-6, atol=1e-6 * np.abs(g).max())
    if n >= 6:   # alpha and -alpha saturate, 0 and -0 pass, NaN gives nothing
        assert list(dx[:6] == 0) == [True, True, False, False, True, False]


def test_signed_estimator_equals_central_differences_of_the_clip():
    """The gradients are those of L = sum(g * clip(x, -a, a)): dL/da = sum(g, x > a) -
    sum(g, x < -a), dL/dx = g on (-a, a); checked by central differences away from the kinks,
    and against the quantized forward differenced in alpha on saturated inputs (both
    sides)."""
    rng = np.random.default_rng(12)
    alpha, h = f32(2.0), 1e-3
    x = rng.uniform(-6, 6, 4000).astype(f32)
    x = x[np.abs(np.abs(x) - alpha) > 2 * h]
    g = rng.normal(0, 1, x.size).astype(f32)
    _, dx, da = run(x, alpha, g, nbits=5, signed=True)
    g64 = g.astype(np.float64)

    def loss_a(a):
        return float((g64 * ref.pact_clip(x, a, signed=True)).sum())

    fd_alpha = (loss_a(float(alpha) + h) - loss_a(float(alpha) - h)) / (2 * h)
    np.testing.assert_allclose(da[0], fd_alpha, rtol=1e-5, atol=1e-6)
    x64 = x.astype(np.float64)
    fd_x = (ref.pact_clip(x64 + h, alpha, True) - ref.pact_clip(x64 - h, alpha, True)) \
        / (2 * h) * g64
    np.testing.assert_allclose(dx, fd_x, rtol=1e-6, atol=1e-6)
    xs = np.concatenate([rng.uniform(3, 6, 1000), rng.uniform(-6, -3, 1000)]).astype(f32)
    gs = rng.normal(0, 1, xs.size).astype(f32)
    for nbits in (2, 5, 8):
        lq = [float((gs.astype(np.float64) * ref.pact_forward(xs, f32(a), nbits, True)).sum())
              for a in (alpha + f32(0.01), alpha - f32(0.01))]
        fd = (lq[0] - lq[1]) / float(f32(alpha + f32(0.01)) - f32(alpha - f32(0.01)))
        _, _, da_s = run(xs, alpha, gs, nbits=nbits, signed=True)
        np.testing.assert_allclose(da_s[0], fd, rtol=1e-3)


def test_signed_symbol_and_gluon_match_reference():
    xs, gs = _batches()
    xs = [x - 1 for x in xs]     # both signs
    sym = mx.sym.PACT(mx.sym.var("data"), mx.sym.var("p_gamma", shape=(1,)), nbits=4,
                      signed=True, name="p")
    exe = sym.simple_bind(mx.cpu(), data=xs[0].shape, grad_req="write")
    exe.arg_dict["p_gamma"][:] = 2.5
    for x, g in zip(xs, gs):
        exe.arg_dict["data"][:] = x
        exe.forward(is_train=True)
        exe.backward(mx.nd.array(g))
        assert np.array_equal(bits(exe.outputs[0].asnumpy()),
                              bits(ref.pact_forward(x, 2.5, 4, signed=True)))
        dx, da = ref.pact_backward(g, x, 2.5, signed=True)
        assert np.array_equal(exe.grad_dict["data"].asnumpy(), dx)
        assert np.array_equal(bits(exe.grad_dict["p_gamma"].asnumpy()), bits(da))

    class Signed(PactNet):
        def hybrid_forward(self, F, x, alpha):  # noqa: N803
            return F.PACT(x, alpha, nbits=self._nbits, signed=True)

    net = Signed(alpha=2.5, nbits=4)
    net.initialize()
    net.hybridize()
    xin = mx.nd.array(xs[0])
    with autograd.record():
        y = net(xin)
    y.backward(mx.nd.array(gs[0]))
    assert np.array_equal(bits(y.asnumpy()), bits(ref.pact_forward(xs[0], 2.5, 4, signed=True)))
    assert np.array_equal(bits(net.alpha.grad().asnumpy()),
                          bits(ref.pact_backward(gs[0], xs[0], 2.5, signed=True)[1]))


def test_signed_trainer_learns_alpha_from_both_sides():
    """Most values beyond -alpha (negative side only): alpha grows towards a larger target
    magnitude, as the mirrored estimator says (the seed's C++ backward, which sent only
    x > alpha to alpha, would leave it where it is)."""
    rng = np.random.default_rng(13)
    x = -np.abs(rng.normal(8, 1, (32, 16))).astype(f32)
    alpha = mx.nd.array([1.0])
    alpha.attach_grad()
    xin = mx.nd.array(x)
    for _ in range(60):
        with autograd.record():
            loss = ((mx.nd.PACT(xin, alpha, nbits=4, signed=True) + 3.0) ** 2).mean()
        loss.backward()
        alpha[:] = alpha - 0.05 * alpha.grad
    assert abs(float(alpha.asscalar()) - 3.0) < 0.1


def _ort_qdq_signed(x: np.ndarray, s: np.float32) -> np.ndarray:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    xi = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))
    yi = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))
    inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [float(s)]),
             helper.make_tensor("z", TensorProto.INT8, [], [0])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "qdq", [xi], [yi], inits),
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": np.ascontiguousarray(x, dtype=f32)})[0]


@pytest.mark.parametrize("alpha", [6.0, 0.0123])
def test_signed_qdq_form_is_int8_and_matches_onnxruntime_above_minus_alpha(alpha):
    """The descriptor's QDQ form of signed PACT at 8 bits: int8 codes, scale alpha / 127.
    onnxruntime agrees bit for bit on every input > -alpha - s/2 (ties included); from
    there down (the tie -127.5 rounds to the even -128), QuantizeLinear saturates at -128
    where the operator's clip stops at -127."""
    from quant_ops import methods

    m = methods.get("pact")
    assert "signed" in m.params and m.unsigned({}) and not m.unsigned({"signed": "True"})
    form = m.qdq({"nbits": "8", "signed": "True"}, np.array([alpha], f32))
    assert form.signed and not form.per_axis
    assert form.scale == ref.scale_of(alpha, 8, signed=True) == f32(f32(alpha) / f32(127))
    assert not m.qdq({"nbits": "8"}, np.array([alpha], f32)).signed
    rng = np.random.default_rng(14)
    x = signed_sample(alpha, 8, 200_000, rng)
    x = x[~np.isnan(x)]
    y = run(x, alpha, nbits=8, signed=True)
    ort_y = _ort_qdq_signed(x, form.scale)
    above = x > -f32(127.5) * form.scale
    assert np.array_equal(bits(y[above]), bits(ort_y[above]))
    below = ~above & np.isfinite(x)
    assert below.any() and (ort_y[below] == f32(-128) * form.scale).all()
    assert (y[below] == f32(-127) * form.scale).all()


# -- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("attrs,needle", [
    (dict(nbits="four"), "'nbits' must be an integer, got 'four'"),
    (dict(signed="maybe"), "'signed'"),
    (dict(sign="True"), "unknown attribute 'sign'"),
])
def test_bad_attribute_is_a_clear_error(attrs, needle):
    with pytest.raises(mx.base.MXNetError) as e:
        mx.nd.PACT(mx.nd.ones((2, 3)), mx.nd.ones(1), **attrs).wait_to_read()
    assert "PACT: " in str(e.value) and needle in str(e.value), str(e.value)


def test_bad_shapes_and_dtypes_are_clear_errors():
    x = mx.nd.ones((4, 3))
    cases = [
        ((x, mx.nd.ones(2)), "'gamma' (the learned clip value alpha) must have shape (1,), "
                             "got (2,)"),
        ((x, mx.nd.ones((1, 1))), "'gamma' (the learned clip value alpha) must have shape "
                                  "(1,), got (1,1)"),
        ((x, mx.nd.ones(1, dtype="float64")), "input 'gamma' must be float32, got float64"),
        ((x.astype("float16"), mx.nd.ones(1)), "input 'data' must be float32, got float16"),
        ((x.astype("int32"), mx.nd.ones(1)), "input 'data' must be float32, got int32"),
    ]
    for args, needle in cases:
        with pytest.raises(mx.base.MXNetError) as e:
            mx.nd.PACT(*args).wait_to_read()
        assert "PACT: " in str(e.value) and needle in str(e.value), str(e.value)
    assert "gamma" not in str(e.value)  # one error does not leak into the next message


def test_shapes_are_inferred_forward_through_the_graph():
    """data's shape comes from the layer before; gamma's rank must be given ((1,), or (0,):
    one dimension of unknown size).  (A data input of unknown rank cannot be supported:
    MXNet 1.9.1 sizes its shape buffer by the sum of the input ranks, an unknown rank
    counting -1, and crashes before the operator is asked.)"""
    fc = mx.sym.FullyConnected(mx.sym.var("x"), mx.sym.var("w"), num_hidden=4, no_bias=True)
    for shape in ((1,), (0,)):
        out = mx.sym.PACT(fc, mx.sym.var("a", shape=shape), nbits=2)
        arg_shapes, out_shapes, _ = out.infer_shape(x=(2, 3))
        assert out_shapes == [(2, 4)] and arg_shapes == [(2, 3), (4, 3), (1,)]


def test_signed_pact_exports_bit_exact_below_minus_alpha(tmp_path):
    """The export clips a narrow signed quantizer before QuantizeLinear, so inputs far
    below -alpha give code -127 in onnxruntime as in the operator."""
    from quant_ops.export import export_model
    from quant_ops.export.align import check_alignment
    from quant_ops.graph.ir import Graph

    data = mx.sym.var("data")
    g = mx.sym.var("q_gamma", shape=(1,))
    y = mx.sym.PACT(data, g, nbits=8, signed=True, name="q")
    y = mx.sym.FullyConnected(y, num_hidden=2, name="fc")
    rng = np.random.default_rng(3)
    params = {"q_gamma": np.array([1.5], f32), "fc_weight": rng.normal(0, 1, (2, 16)).astype(f32),
              "fc_bias": np.zeros(2, f32)}
    x = rng.uniform(-6, 6, (8, 16)).astype(f32)       # many inputs far below -alpha
    ex = export_model(Graph.from_symbol(y), params, tmp_path, "m", {"data": x.shape})
    r = check_alignment(ex.onnx, ex.graph, ex.params, {"data": x})
    assert r["identical_min"] == 1.0 and r["isolated_identical_min"] == 1.0
    assert (x < -1.6).sum() > 10
