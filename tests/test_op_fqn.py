"""FQN (Li et al., CVPR 2019; the seed toolkit's _contrib_FQN): asymmetric min/max fake
quantization.  Forward bit for bit against the numpy reference (quant_ops/refs/fqn.py) and
against onnxruntime's uint8 QuantizeLinear -> DequantizeLinear (per tensor and per axis);
the range's training semantics (batch min/max, EMA, inference, weights); the straight-through
estimator of the clamp against the reference and against central differences; nd, symbol
and hybridized Gluon; clear errors.  FQN learns nothing: its range is auxiliary state.
``seed_grid=True`` (the seed toolkit's grid from min, no zero point, no clamp): forward,
state update and both estimators against the reference, the formula and central
differences; the default stays bit for bit what it was."""
from __future__ import annotations

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import quant_ops
from quant_ops.refs import fqn as ref
from quant_ops.refs.fqn import FQNAttrs

f32 = np.float32
INFER = np.array([0, 0], f32)
TRAIN = np.array([0, 1], f32)


def bits(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=f32).view(np.uint32)


def op(x, fmin, fmax, qstate, **attrs):
    """The operator imperatively: (y, fqn_min, fqn_max, qstate) as numpy."""
    mn, mx_, st = (mx.nd.array(np.reshape(v, -1), dtype=f32) for v in (fmin, fmax, qstate))
    y = mx.nd.FQN(mx.nd.array(x, dtype=f32), mn, mx_, st, **attrs)
    return y.asnumpy(), mn.asnumpy(), mx_.asnumpy(), st.asnumpy()


def op_grad(x, fmin, fmax, qstate, g, **attrs):
    """(y, dx, fqn_min, fqn_max) with autograd."""
    mn, mx_, st = (mx.nd.array(np.reshape(v, -1), dtype=f32) for v in (fmin, fmax, qstate))
    xs = mx.nd.array(x, dtype=f32)
    xs.attach_grad()
    with autograd.record():
        y = mx.nd.FQN(xs, mn, mx_, st, **attrs)
    y.backward(mx.nd.array(g, dtype=f32))
    return y.asnumpy(), xs.grad.asnumpy(), mn.asnumpy(), mx_.asnumpy()


def tie_values(s, zp, nbits, n, rng) -> np.ndarray:
    """Values whose float32 quotient by ``s`` is exactly k + 0.5, codes around [0, L]."""
    lv = 2 ** nbits - 1
    k = rng.integers(-int(zp) - 2, lv - int(zp) + 2, size=n * 4).astype(f32)
    x = ((k + f32(0.5)) * s).astype(f32)
    return x[(x / s) == k + f32(0.5)][:n]


def sample(lo, hi, nbits, n, rng, nan=True) -> np.ndarray:
    """Inside and beyond [lo, hi], exact ties of the grid, zeros of both signs, extremes."""
    s, z, *_ = ref.qparams([lo], [hi], nbits)
    w = max(hi - lo, 1e-6)
    special = [lo, hi, np.nextafter(f32(lo), f32(-np.inf)), np.nextafter(f32(hi), f32(np.inf)),
               0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 3e38, -3e38]
    parts = [rng.uniform(lo, hi, n // 2).astype(f32),
             rng.uniform(lo - w, hi + w, n // 4).astype(f32),
             tie_values(s[0], z[0], nbits, n // 8, rng),
             np.array(special + ([np.nan] if nan else []), f32)]
    x = np.concatenate(parts)
    return rng.permutation(np.concatenate([x, rng.normal(0, w, n - x.size).astype(f32)]))


def ort_qdq_uint8(x, scale, zero_point, axis=None) -> np.ndarray:
    """onnxruntime: QuantizeLinear -> DequantizeLinear, uint8 code, per tensor or per axis."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    s = np.asarray(scale, f32)
    z = np.asarray(zero_point).astype(np.uint8)
    assert np.array_equal(z, np.asarray(zero_point))  # integral, in [0, 255]
    xi = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))
    yi = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))
    inits = [helper.make_tensor("s", TensorProto.FLOAT, list(s.shape), s.ravel().tolist()),
             helper.make_tensor("z", TensorProto.UINT8, list(s.shape), z.ravel().tolist())]
    kw = {} if axis is None else {"axis": axis}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **kw),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **kw)]
    model = helper.make_model(helper.make_graph(nodes, "qdq", [xi], [yi], inits),
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": np.ascontiguousarray(x, dtype=f32)})[0]


RANGES = [(-1.3, 4.1), (0.0, 6.0), (-2.0, 2.0), (-5.0, -0.5), (0.7, 3.0), (-1e-3, 7e-3),
          (-1000.0, 3.0)]


# -- bit-exactness against onnxruntime (uint8 QDQ at k = 8) ------------------------------

@pytest.mark.parametrize("lo,hi", RANGES)
def test_per_tensor_bit_identical_to_onnxruntime_uint8(lo, hi):
    """Inference with a stored range: the same bits as ONNX uint8 QDQ with the reference's
    scale and zero point (ranges not containing 0 are widened to contain it).  (NaN is left
    out: the engine turns it into a code, we keep NaN.)"""
    rng = np.random.default_rng(0)
    x = sample(lo, hi, 8, 200_000, rng, nan=False)
    s, z, *_ = ref.qparams([lo], [hi], 8)
    with np.errstate(over="ignore"):
        assert ((x / s[0]) == np.floor(x / s[0]) + f32(0.5)).sum() > 10_000  # exact ties
    y, mn, mx_, st = op(x, [lo], [hi], INFER, nbits=8)
    assert np.array_equal(bits(y), bits(ort_qdq_uint8(x, s[0], z[0])))
    assert mn[0] == f32(lo) and mx_[0] == f32(hi) and np.array_equal(st, INFER)  # untouched


@pytest.mark.parametrize("channel_axis,shape", [(0, (64, 32, 3, 3)), (1, (16, 48, 3, 3))])
def test_per_channel_weight_bit_identical_to_onnxruntime_uint8_per_axis(channel_axis, shape):
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.05, shape).astype(f32)
    w = np.moveaxis(w, channel_axis, 0)  # view: channel first while we edit it
    w[5] *= 1000                         # channels of very different ranges
    w[6] = np.abs(w[6]) + 0.1            # all positive: widened to [0, max]
    w[7] = -np.abs(w[7]) - 1             # all negative: widened to [min, 0]
    w[8] = 0.25                          # constant
    w[9] = 0.0                           # all zero: no usable scale, +0
    for c in range(0, w.shape[0], 5):    # exact ties inside channel c's own range
        flat = w[c].reshape(-1)
        s, z, *_ = ref.qparams([flat.min()], [flat.max()], 8)
        if s[0] > 0:
            t = tie_values(s[0], z[0], 8, 40, rng)
            t = t[(t >= flat.min()) & (t <= flat.max())][:flat.size - 2]
            flat[1:1 + t.size] = t
        w[c] = flat.reshape(w[c].shape)
    w = np.ascontiguousarray(np.moveaxis(w, 0, channel_axis))
    nch = w.shape[channel_axis]
    y, mn, mx_, _ = op(w, np.zeros(nch), np.zeros(nch), INFER, nbits=8, is_weight=True,
                       is_perchannel=True, channel_axis=channel_axis)
    rmn, rmx = ref.batch_min_max(w, channel_axis)
    assert np.array_equal(bits(mn), bits(rmn)) and np.array_equal(bits(mx_), bits(rmx))
    s, z, _, _, ok = ref.qparams(mn, mx_, 8)
    assert ok.sum() == nch - 1 and not ok[9]
    # the all-zero channel: any scale gives +0 in the engine; we give +0 too
    want = ort_qdq_uint8(w, np.where(ok, s, f32(1)), z, axis=channel_axis)
    assert np.array_equal(bits(y), bits(want))
    assert not np.take(bits(y), 9, axis=channel_axis).any()


# -- the numpy reference is the spec -------------------------------------------------------

@pytest.mark.parametrize("nbits", [2, 3, 4, 5, 8, 12, 16])
def test_forward_matches_reference_activation(nbits):
    rng = np.random.default_rng(nbits)
    for lo, hi in RANGES[:5]:
        x = sample(lo, hi, nbits, 20_000, rng)
        for qstate in (INFER, TRAIN):
            for decay in (0.0, 0.9):
                a = FQNAttrs(nbits=nbits, ema_decay=decay)
                got = op(x, [lo], [hi], qstate, **a.as_kwargs())
                want = ref.fqn_forward(x, [lo], [hi], qstate, a)
                for g, w in zip(got, want):
                    assert np.array_equal(bits(g), bits(w)), (nbits, lo, hi, qstate, decay)
        assert np.isnan(got[0]).sum() == 1  # NaN in, NaN out


@pytest.mark.parametrize("nbits", [2, 4, 8, 16])
@pytest.mark.parametrize("per_channel,channel_axis", [(False, 0), (True, 0), (True, 1),
                                                      (True, 2)])
def test_forward_matches_reference_weight(nbits, per_channel, channel_axis):
    rng = np.random.default_rng(10 + nbits)
    w = rng.normal(0.1, 1, (6, 7, 9)).astype(f32)
    wv = np.moveaxis(w, channel_axis, 0)
    wv[1] = 0.0
    wv[2] = np.nan          # a channel without a number: range [0, 0]
    wv[3, 0, 0] = np.nan    # NaN is ignored by the range
    wv[4] = 3.0
    a = FQNAttrs(nbits=nbits, is_weight=True, is_perchannel=per_channel,
                 channel_axis=channel_axis)
    nch = w.shape[channel_axis] if per_channel else 1
    for qstate in (INFER, TRAIN):   # a weight's range is its own, in both modes
        got = op(w, np.full(nch, 7.0), np.full(nch, 9.0), qstate, **a.as_kwargs())
        want = ref.fqn_forward(w, np.full(nch, 7.0), np.full(nch, 9.0), qstate, a)
        for g, r in zip(got, want):
            assert np.array_equal(bits(g), bits(r)), (nbits, per_channel, channel_axis)
    if per_channel:
        assert got[1][2] == 0 and got[2][2] == 0 and got[1][1] == 0 and got[2][1] == 0


def test_quantizer_properties():
    """The grid is {(q - zp) * s : q = 0..L}: 0 exactly representable (code zp), the range
    widened to contain 0, error at most s/2 inside [lo, hi], saturation outside."""
    rng = np.random.default_rng(3)
    for nbits in (2, 4, 8):
        lv = 2 ** nbits - 1
        for lo0, hi0 in RANGES:
            x = rng.uniform(lo0 - 1, hi0 + 1, 50_000).astype(f32)
            y = op(x, [lo0], [hi0], INFER, nbits=nbits)[0]
            s, z, lo, hi, _ = (v[0] for v in ref.qparams([lo0], [hi0], nbits))
            assert lo == min(f32(lo0), 0) and hi == max(f32(hi0), 0)
            codes = y.astype(np.float64) / float(s) + float(z)
            assert np.allclose(codes, np.rint(codes), atol=1e-3)
            assert codes.min() >= -1e-3 and codes.max() <= lv + 1e-3
            assert op(np.zeros(3, f32), [lo0], [hi0], INFER, nbits=nbits)[0].tolist() == [0] * 3
            inside = (x >= lo) & (x <= hi)
            err = np.abs(y[inside].astype(np.float64) - x[inside])
            assert err.max() <= float(s) * (0.5 + 1e-4)
            assert np.array_equal(y[x > hi + s], np.full((x > hi + s).sum(), y.max()))
            assert np.array_equal(y[x < lo - s], np.full((x < lo - s).sum(), y.min()))


def test_no_usable_scale_gives_zeros():
    """The range [0, 0] (a state never set, an all-zero tensor), infinite or NaN bounds: +0
    everywhere, NaN stays NaN; not an error (the range is data)."""
    x = np.array([np.nan, 2.0, -1.0, 0.0, -0.0, np.inf, -np.inf], f32)
    for mn, mx_ in ((0.0, 0.0), (-np.inf, 1.0), (0.0, np.inf), (np.nan, 1.0), (-3e38, 3e38)):
        y = op(x, [mn], [mx_], INFER, nbits=4)[0]
        assert np.array_equal(bits(y), bits(ref.fqn_forward(x, [mn], [mx_], INFER)[0]))
        assert np.isnan(y[0]) and not bits(y[1:]).any(), (mn, mx_)


# -- the range in training ----------------------------------------------------------------

def test_training_takes_batch_min_max_like_the_seed():
    """ema_decay = 0 (default): each training forward stores the batch's min and max (NaN
    ignored, -0 stored as +0) and quantizes with them; inference leaves the range alone and
    does not count the step."""
    rng = np.random.default_rng(4)
    mn, mx_, st = mx.nd.zeros(1), mx.nd.zeros(1), mx.nd.array(TRAIN)
    for i in range(3):
        x = rng.normal(i, 1 + i, (8, 16)).astype(f32)
        x[0, 0] = np.nan
        y = mx.nd.FQN(mx.nd.array(x), mn, mx_, st, nbits=4).asnumpy()
        assert mn.asnumpy()[0] == np.nanmin(x) and mx_.asnumpy()[0] == np.nanmax(x)
        assert np.array_equal(bits(y), bits(ref.fake_quant(x, [np.nanmin(x)], [np.nanmax(x)])))
    assert st.asnumpy().tolist() == [3, 1]
    x = np.array([-0.0, 0.0, 1.0], f32)
    mx.nd.FQN(mx.nd.array(x), mn, mx_, st).wait_to_read()
    assert bits(mn.asnumpy())[0] == 0  # +0
    quant_ops.set_training([st], False)
    before = (mn.asnumpy(), mx_.asnumpy())
    y = mx.nd.FQN(mx.nd.array(x * 100), mn, mx_, st).asnumpy()
    assert mn.asnumpy() == before[0] and mx_.asnumpy() == before[1]
    assert st.asnumpy().tolist() == [4, 0]
    assert np.array_equal(bits(y), bits(ref.fake_quant(x * 100, before[0], before[1])))
    assert y[2] == y.max() and y.max() < 1.01  # saturates at the stored max


def test_ema_initialized_by_first_batch_then_averaged():
    rng = np.random.default_rng(5)
    d = 0.9
    mn, mx_, st = mx.nd.zeros(1), mx.nd.zeros(1), mx.nd.array(TRAIN)
    want_mn, want_mx = f32(0), f32(0)
    for i in range(4):
        x = rng.normal(0.5, 1 + i, (4, 32)).astype(f32)
        mx.nd.FQN(mx.nd.array(x), mn, mx_, st, ema_decay=d).wait_to_read()
        if i == 0:
            want_mn, want_mx = x.min(), x.max()
        else:
            want_mn, want_mx = ref.ema(want_mn, x.min(), d), ref.ema(want_mx, x.max(), d)
        assert bits(mn.asnumpy())[0] == bits(want_mn) and bits(mx_.asnumpy())[0] == bits(want_mx)
    # a calibrated (loaded) range is kept and averaged from, not replaced
    mn2, mx2 = mx.nd.array([-2.0]), mx.nd.array([5.0])
    x = np.array([[-1.0, 1.0]], f32)
    mx.nd.FQN(mx.nd.array(x), mn2, mx2, mx.nd.array(TRAIN), ema_decay=d).wait_to_read()
    assert mn2.asnumpy()[0] == ref.ema(-2.0, -1.0, d) and mx2.asnumpy()[0] == ref.ema(5, 1, d)
    # ema_decay = 1: the loaded range is frozen; a batch of NaN changes nothing
    for decay, data in ((1.0, x), (0.0, np.full((2, 2), np.nan, f32))):
        mn3, mx3 = mx.nd.array([-2.0]), mx.nd.array([5.0])
        mx.nd.FQN(mx.nd.array(data), mn3, mx3, mx.nd.array(TRAIN), ema_decay=decay).wait_to_read()
        assert mn3.asnumpy()[0] == -2.0 and mx3.asnumpy()[0] == 5.0


# -- backward: straight-through inside the range, zero outside ------------------------------

@pytest.mark.parametrize("grad_mode", ["clip", "ste"])
@pytest.mark.parametrize("kind", ["act_train", "act_infer", "weight", "weight_pc1"])
def test_backward_matches_reference(grad_mode, kind):
    rng = np.random.default_rng(6)
    x = rng.normal(0.5, 2, (5, 6, 7)).astype(f32)
    x[0, 0, :4] = [np.nan, -1.0, 3.0, 0.0]  # NaN, and the stored bounds themselves
    g = rng.normal(0, 1, x.shape).astype(f32)
    attrs = {"act_train": dict(), "act_infer": dict(),
             "weight": dict(is_weight=True),
             "weight_pc1": dict(is_weight=True, is_perchannel=True, channel_axis=1)}[kind]
    a = FQNAttrs(nbits=3, grad_mode=grad_mode, **attrs)
    nch = x.shape[1] if a.is_perchannel else 1
    qstate = INFER if kind == "act_infer" else TRAIN
    y, dx, mn, mx_ = op_grad(x, np.full(nch, -1.0), np.full(nch, 3.0), qstate, g,
                             **a.as_kwargs())
    ry, rmn, rmx, _ = ref.fqn_forward(x, np.full(nch, -1.0), np.full(nch, 3.0), qstate, a)
    assert np.array_equal(bits(y), bits(ry))
    rdx = ref.fqn_backward(g, x, rmn, rmx, a)
    assert np.array_equal(bits(dx), bits(rdx))
    if grad_mode == "ste":
        assert np.array_equal(dx, g)
    elif kind == "act_infer":   # stored range [-1, 3]: bounds included, NaN and outside: 0
        inside = (x >= -1) & (x <= 3)
        assert np.array_equal(dx, np.where(inside, g, f32(0)))
        assert dx[0, 0, 0] == 0 and dx[0, 0, 1] == g[0, 0, 1] and dx[0, 0, 2] == g[0, 0, 2]
        assert (~inside).sum() > 20
    else:                       # the range is the batch's own: everything but NaN passes
        assert np.array_equal(dx, np.where(np.isnan(x), f32(0), g))


def test_estimator_equals_central_differences_of_the_clamp():
    """FQN has no learned parameter; its data gradient is the straight-through estimator of
    q(clamp(x, lo, hi)): the exact derivative of the clamp (rounding treated as identity).
    Central differences of L = sum(g * clamp(x, lo, hi)), at points at least 2h from the
    kinks lo and hi, equal the operator's gradient.  The range widened to contain 0 is the
    one used: [0.5, 2] clamps at [0, 2]."""
    rng = np.random.default_rng(7)
    h = 1e-3
    for mn, mx_ in ((-1.0, 2.0), (0.5, 2.0), (-3.0, -1.0)):
        lo, hi = min(mn, 0.0), max(mx_, 0.0)
        x = rng.uniform(lo - 2, hi + 2, 5000).astype(f32)
        x = x[(np.abs(x - lo) > 2 * h) & (np.abs(x - hi) > 2 * h)]
        g = rng.normal(0, 1, x.size).astype(f32)
        _, dx, _, _ = op_grad(x, [mn], [mx_], INFER, g, nbits=4)
        x64 = x.astype(np.float64)
        fd = (ref.clamp_surrogate(x64 + h, lo, hi) - ref.clamp_surrogate(x64 - h, lo, hi)) / (
            2 * h) * g.astype(np.float64)
        np.testing.assert_allclose(dx, fd, rtol=1e-6, atol=1e-6)
        assert (dx == 0).any() and (dx != 0).any()


# -- symbol, Gluon ------------------------------------------------------------------------

ATTRS = dict(nbits=4, ema_decay=0.5)


def _batches(n=3, shape=(4, 5, 6)):
    rng = np.random.default_rng(8)
    xs = [rng.normal(0.3 * i, 1 + i, shape).astype(f32) for i in range(n)]
    gs = [rng.normal(0, 1, shape).astype(f32) for _ in range(n)]
    return xs, gs


def _reference_run(xs, gs, attrs):
    a = FQNAttrs(**attrs)
    mn, mx_, st = np.zeros(1, f32), np.zeros(1, f32), TRAIN.copy()
    outs, grads = [], []
    for x, g in zip(xs, gs):
        y, mn, mx_, st = ref.fqn_forward(x, mn, mx_, st, a)
        outs.append(y)
        grads.append(ref.fqn_backward(g, x, mn, mx_, a))
    return outs, grads, mn, mx_, st


def test_symbol_executor_training_then_inference():
    xs, gs = _batches()
    sym = mx.sym.FQN(mx.sym.var("data"), mx.sym.var("q_fqn_min", shape=(0,)),
                     mx.sym.var("q_fqn_max", shape=(0,)), mx.sym.var("q_qstate", shape=(2,)),
                     name="q", **ATTRS)
    assert sym.list_arguments() == ["data"]
    assert sym.list_auxiliary_states() == ["q_fqn_min", "q_fqn_max", "q_qstate"]
    assert sym.infer_shape(data=(4, 5, 6))[2] == [(1,), (1,), (2,)]
    exe = sym.simple_bind(mx.cpu(), data=xs[0].shape, grad_req="write")
    quant_ops.set_training(exe.aux_dict, True)
    outs, grads, mn, mx_, st = _reference_run(xs, gs, ATTRS)
    for x, g, want_y, want_g in zip(xs, gs, outs, grads):
        exe.arg_dict["data"][:] = x
        exe.forward(is_train=True)
        exe.backward(mx.nd.array(g))
        assert np.array_equal(bits(exe.outputs[0].asnumpy()), bits(want_y))
        assert np.array_equal(bits(exe.grad_dict["data"].asnumpy()), bits(want_g))
    assert np.array_equal(bits(exe.aux_dict["q_fqn_min"].asnumpy()), bits(mn))
    assert np.array_equal(bits(exe.aux_dict["q_fqn_max"].asnumpy()), bits(mx_))
    assert np.array_equal(exe.aux_dict["q_qstate"].asnumpy(), st)
    quant_ops.set_training(exe.aux_dict, False)
    exe.arg_dict["data"][:] = xs[0] * 10
    exe.forward(is_train=False)
    assert np.array_equal(bits(exe.outputs[0].asnumpy()),
                          bits(ref.fake_quant(xs[0] * 10, mn, mx_, 4)))
    assert np.array_equal(bits(exe.aux_dict["q_fqn_min"].asnumpy()), bits(mn))


def test_symbol_per_channel_weight_shapes():
    w = mx.sym.var("w", shape=(8, 3, 3, 3))
    q = mx.sym.FQN(w, mx.sym.var("q_fqn_min", shape=(0,)), mx.sym.var("q_fqn_max", shape=(0,)),
                   mx.sym.var("q_qstate", shape=(2,)), is_weight=True, is_perchannel=True,
                   name="q")
    out = mx.sym.Convolution(mx.sym.var("x"), q, num_filter=8, kernel=(3, 3), no_bias=True)
    _, out_shapes, aux_shapes = out.infer_shape(x=(2, 3, 8, 8))
    assert out_shapes == [(2, 8, 6, 6)] and aux_shapes == [(8,), (8,), (2,)]


class FQNBlock(gluon.HybridBlock):
    """FQN on the input, its range and mode as non-trained parameters (auxiliary states)."""

    def __init__(self, channels=1, **attrs):
        super().__init__()
        self._attrs = attrs
        with self.name_scope():
            kw = dict(shape=(channels,), init="zeros", grad_req="null", differentiable=False)
            self.fqn_min = self.params.get("fqn_min", **kw)
            self.fqn_max = self.params.get("fqn_max", **kw)
            self.qstate = self.params.get("qstate", shape=(2,), init="zeros", grad_req="null",
                                          differentiable=False)

    def hybrid_forward(self, F, x, fqn_min, fqn_max, qstate):  # noqa: N803
        return F.FQN(x, fqn_min, fqn_max, qstate, **self._attrs)


def _train_steps_match(net, xs, gs, outs, grads) -> None:
    """Training steps of a Gluon block give the reference's outputs and input gradients,
    bit for bit."""
    for x, g, want_y, want_g in zip(xs, gs, outs, grads):
        xin = mx.nd.array(x)
        xin.attach_grad()
        with autograd.record():
            y = net(xin)
        y.backward(mx.nd.array(g))
        assert np.array_equal(bits(y.asnumpy()), bits(want_y))
        assert np.array_equal(bits(xin.grad.asnumpy()), bits(want_g))


@pytest.mark.parametrize("hybrid", [None, {}, {"static_alloc": True, "static_shape": True}])
def test_gluon_training_matches_reference(hybrid):
    xs, gs = _batches()
    net = FQNBlock(**ATTRS)
    net.initialize()
    quant_ops.track_training(net)
    if hybrid is not None:
        net.hybridize(**hybrid)
    outs, grads, mn, mx_, st = _reference_run(xs, gs, ATTRS)
    _train_steps_match(net, xs, gs, outs, grads)
    assert np.array_equal(bits(net.fqn_min.data().asnumpy()), bits(mn))
    assert np.array_equal(bits(net.fqn_max.data().asnumpy()), bits(mx_))
    assert np.array_equal(net.qstate.data().asnumpy(), st)
    # outside autograd.record(): inference, the stored range, the step not counted
    y = net(mx.nd.array(xs[0] * 100)).asnumpy()
    assert np.array_equal(bits(net.fqn_min.data().asnumpy()), bits(mn))
    assert net.qstate.data().asnumpy().tolist() == [st[0], 0]
    assert np.array_equal(bits(y), bits(ref.fake_quant(xs[0] * 100, mn, mx_, 4)))


def test_gluon_per_channel_weight_hybridized():
    rng = np.random.default_rng(9)
    w = rng.normal(0, 1, (6, 4)).astype(f32)
    net = FQNBlock(channels=6, nbits=8, is_weight=True, is_perchannel=True)
    net.initialize()
    net.hybridize()
    y = net(mx.nd.array(w)).asnumpy()   # inference mode: a weight's range is still its own
    a = FQNAttrs(nbits=8, is_weight=True, is_perchannel=True)
    ry, rmn, rmx, _ = ref.fqn_forward(w, np.zeros(6), np.zeros(6), INFER, a)
    assert np.array_equal(bits(y), bits(ry))
    assert np.array_equal(net.fqn_min.data().asnumpy(), rmn)
    assert np.array_equal(net.fqn_max.data().asnumpy(), rmx)


# -- seed_grid=True: the seed toolkit's grid (no zero point, no clamp) ------------------------

SEED_RANGES = [(-1.3, 4.1), (0.7, 3.0), (-5.0, -0.5), (-1e-3, 7e-3), (-1000.0, 3.0),
               (2.0, -1.0)]   # the last: max < min, a negative step (the same grid, from min)


def seed_sample(lo, hi, nbits, n, rng) -> np.ndarray:
    """Inside and far beyond the range (no clamp), exact ties of the seed grid, zeros, NaN,
    infinities and extremes."""
    s = f32(f32(hi) - f32(lo)) / f32(2 ** nbits - 1)
    w = abs(hi - lo)
    k = rng.integers(-3, 2 ** nbits + 3, n // 8).astype(f32)
    ties = (f32(lo) + (k + f32(0.5)) * s).astype(f32)
    ties = ties[((ties - f32(lo)) / s).astype(f32) == k + f32(0.5)]
    special = np.array([lo, hi, 0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, 3e38, -3e38], f32)
    parts = [rng.uniform(min(lo, hi), max(lo, hi), n // 2).astype(f32),
             rng.uniform(min(lo, hi) - 3 * w, max(lo, hi) + 3 * w, n // 4).astype(f32),
             ties, special]
    return rng.permutation(np.concatenate(parts))


def seed_formula(x, lo, hi, nbits) -> np.ndarray:
    """The seed grid written out in float32 numpy: rint((x - min) / s) * s + min."""
    lo, hi = f32(lo), f32(hi)
    s = f32((hi - lo) / f32(2 ** nbits - 1))
    return np.rint((x - lo) / s) * s + lo


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 8, 16])
def test_seed_grid_forward_matches_reference(nbits):
    """Activations, per tensor, training (the batch's range) and inference (the stored one),
    with and without EMA: bit for bit against the reference; NaN stays NaN."""
    rng = np.random.default_rng(100 + nbits)
    for lo, hi in SEED_RANGES:
        x = seed_sample(lo, hi, nbits, 20_000, rng)
        for qstate in (INFER, TRAIN):
            for decay in (0.0, 0.9):
                a = FQNAttrs(nbits=nbits, ema_decay=decay, seed_grid=True)
                got = op(x, [lo], [hi], qstate, **a.as_kwargs())
                want = ref.fqn_forward(x, [lo], [hi], qstate, a)
                for g, w in zip(got, want):
                    assert np.array_equal(bits(g), bits(w)), (nbits, lo, hi, qstate, decay)
                assert np.isnan(got[0]).sum() == 1


def test_seed_grid_is_the_seeds_formula_without_clamp_or_zero_point():
    """y = rint((x - min) / s) * s + min, s = (max - min) / L: the levels start at min (0 is
    not one of them unless it falls on the grid), values beyond the range continue along the
    grid (no saturation), and the reference is that formula."""
    rng = np.random.default_rng(101)
    for nbits in (1, 2, 4, 8):
        for lo, hi in SEED_RANGES:
            x = rng.uniform(min(lo, hi) - 2 * abs(hi - lo), max(lo, hi) + 2 * abs(hi - lo),
                            30_000).astype(f32)
            y = op(x, [lo], [hi], INFER, nbits=nbits, seed_grid=True)[0]
            np.testing.assert_array_equal(bits(y), bits(seed_formula(x, lo, hi, nbits)))
            s = np.float64(f32(f32(hi) - f32(lo)) / f32(2 ** nbits - 1))  # < 0: max < min
            codes = (y.astype(np.float64) - f32(lo)) / s
            assert np.allclose(codes, np.rint(codes), atol=1e-2)
            inside = (x >= min(lo, hi)) & (x <= max(lo, hi))
            err = np.abs(y.astype(np.float64) - x)
            assert err.max() <= abs(s) * (0.5 + 1e-3) + 1e-6 * abs(hi - lo)   # never clamped
            assert codes[inside].min() > -1e-2 and codes[inside].max() < 2 ** nbits - 1 + 1e-2
            assert (np.abs(codes) > 2 ** nbits).any()                    # beyond the range
    # 0 is not on the grid [-1.3, 4.1] at 4 bits: it moves to the nearest level
    y0 = op(np.zeros(1, f32), [-1.3], [4.1], INFER, nbits=4, seed_grid=True)[0][0]
    assert y0 != 0 and abs(y0) <= f32(5.4) / 15 / 2
    # the default operator on the same range keeps 0 exact and saturates
    assert op(np.array([0.0, 100.0], f32), [-1.3], [4.1], INFER, nbits=4)[0].tolist() == \
        [0.0, op(np.array([4.1], f32), [-1.3], [4.1], INFER, nbits=4)[0][0]]


def test_seed_grid_negative_step_is_the_same_grid_from_min():
    """A stored range with max < min: the step is negative and rint is odd, so the levels
    are min + k |s| ... as for a positive step (the seed's formula gives the same)."""
    x = np.random.default_rng(102).uniform(-4, 4, 5000).astype(f32)
    y = op(x, [2.0], [-1.0], INFER, nbits=3, seed_grid=True)[0]
    s = f32(-3.0) / f32(7)
    want = (np.rint((x - f32(2)) / s).astype(f32) * s + f32(2)).astype(f32)
    np.testing.assert_array_equal(bits(y), bits(want))


def test_seed_grid_unusable_step_gives_zeros():
    """max == min, an infinite or NaN bound: +0 everywhere, NaN stays NaN (the seed: 0 / 0,
    NaN everywhere)."""
    x = np.array([np.nan, 2.0, -1.0, 0.0, -0.0, np.inf, -np.inf], f32)
    for mn, mx_ in ((0.0, 0.0), (1.5, 1.5), (-np.inf, 1.0), (0.0, np.inf), (np.nan, 1.0),
                    (-3e38, 3e38)):
        a = FQNAttrs(seed_grid=True)
        y = op(x, [mn], [mx_], INFER, **a.as_kwargs())[0]
        assert np.array_equal(bits(y), bits(ref.fqn_forward(x, [mn], [mx_], INFER, a)[0]))
        assert np.isnan(y[0]) and not bits(y[1:]).any(), (mn, mx_)


@pytest.mark.parametrize("nbits", [1, 4, 8])
@pytest.mark.parametrize("per_channel,channel_axis", [(False, 0), (True, 0), (True, 1)])
def test_seed_grid_weight_range_batch_in_training_stored_in_inference(nbits, per_channel,
                                                                       channel_axis):
    """A weight under the seed grid: training stores its min and max (per channel: max +
    float32(1e-6), as the seed), inference uses the stored range as it is (the seed's
    checkpoints hold the range of the last training step, which the weights have left)."""
    rng = np.random.default_rng(103 + nbits)
    w = rng.normal(0.1, 1, (6, 7, 9)).astype(f32)
    wv = np.moveaxis(w, channel_axis, 0)
    wv[1] = 0.0
    wv[2] = np.nan
    wv[3, 0, 0] = np.nan
    wv[4] = 3.0
    a = FQNAttrs(nbits=nbits, is_weight=True, is_perchannel=per_channel,
                 channel_axis=channel_axis, seed_grid=True)
    nch = w.shape[channel_axis] if per_channel else 1
    stored_mn, stored_mx = np.full(nch, -0.7, f32), np.full(nch, 0.9, f32)
    y, mn, mx_, st = op(w, stored_mn, stored_mx, TRAIN, **a.as_kwargs())
    ry, rmn, rmx, rst = ref.fqn_forward(w, stored_mn, stored_mx, TRAIN, a)
    for g, r in ((y, ry), (mn, rmn), (mx_, rmx), (st, rst)):
        assert np.array_equal(bits(g), bits(r))
    bmn, bmx = ref.batch_min_max(w, a.axis)
    empty = ~(bmn <= bmx)
    assert np.array_equal(mn, np.where(empty, f32(0), bmn))
    eps = f32(1e-6) if per_channel else f32(0)
    assert np.array_equal(bits(mx_), bits((np.where(empty, f32(0), bmx) + eps).astype(f32)))
    if per_channel:
        assert mx_[4] == f32(3) + f32(1e-6) and mn[4] == 3   # a constant channel has a step
    # inference: the stored range, not the weight's, and nothing written
    w2 = (w * f32(1.5)).astype(f32)
    y, mn2, mx2, st2 = op(w2, stored_mn, stored_mx, INFER, **a.as_kwargs())
    assert np.array_equal(mn2, stored_mn) and np.array_equal(mx2, stored_mx)
    assert np.array_equal(st2, INFER)
    want = ref.seed_fake_quant(w2, stored_mn, stored_mx, nbits, a.axis)
    assert np.array_equal(bits(y), bits(want))
    assert np.array_equal(bits(y), bits(ref.fqn_forward(w2, stored_mn, stored_mx, INFER, a)[0]))
    assert np.nanmax(np.abs(y)) > 2.5       # beyond the stored range: not clamped


def test_seed_grid_activation_range_is_ours():
    """Activations keep their range rule under the option: each training batch's min/max
    with ema_decay = 0 (the seed's rule), EMA above 0, stored in inference."""
    rng = np.random.default_rng(104)
    for decay in (0.0, 0.9):
        mn, mx_, st = mx.nd.zeros(1), mx.nd.zeros(1), mx.nd.array(TRAIN)
        rmn, rmx, rst = np.zeros(1, f32), np.zeros(1, f32), TRAIN.copy()
        a = FQNAttrs(nbits=3, ema_decay=decay, seed_grid=True)
        for i in range(3):
            x = rng.normal(i, 1 + i, (8, 16)).astype(f32)
            x[0, 0] = np.nan
            y = mx.nd.FQN(mx.nd.array(x), mn, mx_, st, **a.as_kwargs()).asnumpy()
            ry, rmn, rmx, rst = ref.fqn_forward(x, rmn, rmx, rst, a)
            assert np.array_equal(bits(y), bits(ry))
            assert np.array_equal(bits(mn.asnumpy()), bits(rmn))
            assert np.array_equal(bits(mx_.asnumpy()), bits(rmx))
            if decay == 0:
                assert rmn[0] == np.nanmin(x) and rmx[0] == np.nanmax(x)
        assert st.asnumpy().tolist() == [3, 1]


@pytest.mark.parametrize("grad_mode", ["clip", "ste"])
@pytest.mark.parametrize("kind", ["act_train", "act_infer", "weight_infer", "weight_pc1_train",
                                  "negative_step"])
def test_seed_grid_backward_matches_reference(grad_mode, kind):
    """ste: the seed's backward (dL/dy everywhere, NaN too).  clip: dL/dy where x lies
    between min and max (not widened to 0; ends included), 0 elsewhere and for NaN."""
    rng = np.random.default_rng(105)
    x = rng.normal(1.0, 2, (5, 6, 7)).astype(f32)
    x[0, 0, :5] = [np.nan, 0.5, 3.0, 0.0, 0.2]   # NaN, the bounds, and 0 outside [0.5, 3]
    g = rng.normal(0, 1, x.shape).astype(f32)
    attrs = {"act_train": dict(), "act_infer": dict(), "negative_step": dict(),
             "weight_infer": dict(is_weight=True),
             "weight_pc1_train": dict(is_weight=True, is_perchannel=True, channel_axis=1)}[kind]
    a = FQNAttrs(nbits=3, grad_mode=grad_mode, seed_grid=True, **attrs)
    nch = x.shape[1] if a.is_perchannel else 1
    lo, hi = (3.0, 0.5) if kind == "negative_step" else (0.5, 3.0)
    qstate = TRAIN if kind.endswith("train") else INFER
    y, dx, mn, mx_ = op_grad(x, np.full(nch, lo), np.full(nch, hi), qstate, g, **a.as_kwargs())
    ry, rmn, rmx, _ = ref.fqn_forward(x, np.full(nch, lo), np.full(nch, hi), qstate, a)
    assert np.array_equal(bits(y), bits(ry))
    rdx = ref.fqn_backward(g, x, rmn, rmx, a)
    assert np.array_equal(bits(dx), bits(rdx))
    if grad_mode == "ste":
        assert np.array_equal(dx, g)
    elif qstate is INFER:
        inside = (x >= 0.5) & (x <= 3.0)
        assert np.array_equal(dx, np.where(inside, g, f32(0)))
        assert dx[0, 0, 0] == 0 and dx[0, 0, 1] == g[0, 0, 1] and dx[0, 0, 2] == g[0, 0, 2]
        assert dx[0, 0, 3] == 0 and dx[0, 0, 4] == 0 and (~inside).sum() > 20
    else:   # the batch's own range holds every value but NaN
        assert np.array_equal(dx, np.where(np.isnan(x), f32(0), g))


def test_seed_grid_estimator_equals_central_differences_of_the_clamp():
    """The clip estimator is the exact derivative of clamp(x, min, max) with the range as
    stored (not widened to contain 0: [0.5, 2] clamps at [0.5, 2]); ste is that of the
    identity (the seed's)."""
    rng = np.random.default_rng(106)
    h = 1e-3
    for mn, mx_ in ((-1.0, 2.0), (0.5, 2.0), (-3.0, -1.0)):
        x = rng.uniform(mn - 2, mx_ + 2, 5000).astype(f32)
        x = x[(np.abs(x - mn) > 2 * h) & (np.abs(x - mx_) > 2 * h)]
        g = rng.normal(0, 1, x.size).astype(f32)
        x64 = x.astype(np.float64)
        for mode, surrogate in (("clip", lambda v: ref.clamp_surrogate(v, mn, mx_)),
                                ("ste", lambda v: v)):
            _, dx, _, _ = op_grad(x, [mn], [mx_], INFER, g, nbits=4, seed_grid=True,
                                  grad_mode=mode)
            fd = (surrogate(x64 + h) - surrogate(x64 - h)) / (2 * h) * g.astype(np.float64)
            np.testing.assert_allclose(dx, fd, rtol=1e-6, atol=1e-6)
        _, dx, _, _ = op_grad(x, [mn], [mx_], INFER, g, nbits=4, seed_grid=True)
        assert (dx == 0).any() and (dx != 0).any()


def test_seed_grid_false_is_the_default_bit_for_bit():
    rng = np.random.default_rng(107)
    x = sample(-1.3, 4.1, 4, 10_000, rng)
    w = rng.normal(0, 1, (6, 5)).astype(f32)
    for args, attrs in (((x, [-1.3], [4.1], TRAIN), dict(ema_decay=0.5)),
                        ((x, [-1.3], [4.1], INFER), dict()),
                        ((w, np.zeros(6), np.zeros(6), INFER),
                         dict(is_weight=True, is_perchannel=True))):
        got = op(*args, **attrs)
        for explicit in ("False", "0", False):
            for g, r in zip(got, op(*args, seed_grid=explicit, **attrs)):
                assert np.array_equal(bits(g), bits(r))


def test_seed_grid_symbol_training_then_inference_per_channel_weight():
    """A per-channel weight in an executor: training forwards store the seed's ranges and
    the gradient passes straight through (ste); inference uses the stored ranges."""
    rng = np.random.default_rng(108)
    attrs = dict(nbits=3, is_weight=True, is_perchannel=True, seed_grid=True, grad_mode="ste")
    a = FQNAttrs(**attrs)
    sym = mx.sym.FQN(mx.sym.var("w"), mx.sym.var("q_fqn_min", shape=(0,)),
                     mx.sym.var("q_fqn_max", shape=(0,)), mx.sym.var("q_qstate", shape=(2,)),
                     name="q", **attrs)
    exe = sym.simple_bind(mx.cpu(), w=(4, 3, 2, 2), grad_req="write")
    assert [v.shape for v in exe.aux_arrays] == [(4,), (4,), (2,)]
    quant_ops.set_training(exe.aux_dict, True)
    mn, mx_, st = np.zeros(4, f32), np.zeros(4, f32), TRAIN.copy()
    for _ in range(2):
        w = rng.normal(0, 1, (4, 3, 2, 2)).astype(f32)
        g = rng.normal(0, 1, w.shape).astype(f32)
        exe.arg_dict["w"][:] = w
        exe.forward(is_train=True)
        exe.backward(mx.nd.array(g))
        ry, mn, mx_, st = ref.fqn_forward(w, mn, mx_, st, a)
        assert np.array_equal(bits(exe.outputs[0].asnumpy()), bits(ry))
        assert np.array_equal(exe.grad_dict["w"].asnumpy(), g)
    assert np.array_equal(bits(exe.aux_dict["q_fqn_max"].asnumpy()), bits(mx_))
    quant_ops.set_training(exe.aux_dict, False)
    exe.arg_dict["w"][:] = w * 2
    exe.forward(is_train=False)
    assert np.array_equal(bits(exe.outputs[0].asnumpy()),
                          bits(ref.seed_fake_quant(w * 2, mn, mx_, 3, 0)))
    assert np.array_equal(bits(exe.aux_dict["q_fqn_min"].asnumpy()), bits(mn))


def test_seed_grid_gluon_hybridized_matches_reference():
    xs, gs = _batches()
    attrs = dict(nbits=2, seed_grid=True)
    net = FQNBlock(**attrs)
    net.initialize()
    quant_ops.track_training(net)
    net.hybridize()
    outs, grads, mn, mx_, st = _reference_run(xs, gs, attrs)
    _train_steps_match(net, xs, gs, outs, grads)
    assert np.array_equal(bits(net.fqn_max.data().asnumpy()), bits(mx_))
    y = net(mx.nd.array(xs[0] * 100)).asnumpy()
    assert np.array_equal(bits(y), bits(ref.seed_fake_quant(xs[0] * 100, mn, mx_, 2)))


def test_seed_grid_reference_checks_its_attributes():
    FQNAttrs(nbits=1, seed_grid=True)
    for kw in (dict(nbits=1), dict(nbits=0, seed_grid=True), dict(nbits=17, seed_grid=True)):
        with pytest.raises(ValueError, match="nbits"):
            FQNAttrs(**kw)


# -- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("attrs,needle", [
    (dict(nbits="four"), "'nbits' must be an integer, got 'four'"),
    (dict(is_perchannel=True), "is_perchannel=True needs is_weight=True"),
    (dict(is_perchannel="maybe"), "'is_perchannel' must be True or False, got 'maybe'"),
    (dict(ema_decay=1.5), "'ema_decay' must be a number in [0"),
    (dict(grad_mode="round"), "'grad_mode' must be one of {clip, ste}, got 'round'"),
    (dict(is_weight=True, is_perchannel=True, channel_axis=2), "channel_axis=2 is outside"),
    (dict(seed_grid="maybe"), "'seed_grid' must be True or False, got 'maybe'"),
    (dict(nbits=1), "'nbits' = 1 is out of range [2, 16]"),
    (dict(nbits=0, seed_grid=True), "'nbits' = 0 is out of range [1, 16]"),
    (dict(nbits=17, seed_grid=True), "'nbits' = 17 is out of range [1, 16]"),
    (dict(seed_grid=True, is_perchannel=True), "is_perchannel=True needs is_weight=True"),
    (dict(seed_grid=True, grad_mode="identity"), "'grad_mode' must be one of {clip, ste}"),
    (dict(seed_grid=True, ema_decay=-0.1), "'ema_decay' must be a number in [0"),
])
def test_bad_attribute_is_a_clear_error(attrs, needle):
    with pytest.raises(mx.base.MXNetError) as e:
        mx.nd.FQN(mx.nd.ones((2, 3)), mx.nd.zeros(1), mx.nd.zeros(1), mx.nd.zeros(2),
                  **attrs).wait_to_read()
    assert "FQN: " in str(e.value) and needle in str(e.value), str(e.value)


def test_bad_shapes_and_dtypes_are_clear_errors():
    x = mx.nd.ones((4, 3))
    z1, st = mx.nd.zeros(1), mx.nd.zeros(2)
    cases = [
        ((x, mx.nd.zeros(2), z1, st), {}, "'fqn_min' must have shape (1,) for data of shape "
                                          "(4,3) (one range), got (2,)"),
        ((x, z1, mx.nd.zeros((1, 1)), st), {}, "'fqn_max' must have shape (1,)"),
        ((x, z1, z1, z1, ), {}, "'qstate' must have shape (2,) ([step, training]), got (1,)"),
        ((x, z1, z1, st), dict(is_weight=True, is_perchannel=True),
         "'fqn_min' must have shape (4,) for data of shape (4,3) (one range per channel)"),
        ((x.astype("float16"), z1, z1, st), {}, "input 'data' must be float32, got float16"),
        ((x, z1, z1.astype("float64"), st), {}, "input 'fqn_max' must be float32, got float64"),
        ((x, z1, z1, st.astype("int32")), {}, "input 'qstate' must be float32, got int32"),
    ]
    for args, attrs, needle in cases:
        with pytest.raises(mx.base.MXNetError) as e:
            mx.nd.FQN(*args, **attrs).wait_to_read()
        assert "FQN: " in str(e.value) and needle in str(e.value), str(e.value)
    assert "fqn_min" not in str(e.value)  # one error does not leak into the next message
