"""Quantization_int8: numerics against onnxruntime and the numpy reference, training
semantics in nd / symbol / hybridized Gluon, gradient accumulation, checkpoints, errors."""
from __future__ import annotations

import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import quant_ops
from quant_ops import reference as ref
from quant_ops.reference import Int8Attrs
from ort_qdq import ort_qdq

f32 = np.float32
INFER = np.array([0, 0], f32)
TRAIN = np.array([0, 1], f32)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=f32).view(np.uint32)


def op(x, minmax, qstate, **attrs):
    """Run the operator imperatively; returns (y, minmax, qstate) as numpy."""
    mm, st = mx.nd.array(minmax), mx.nd.array(qstate)
    y = mx.nd.Quantization_int8(mx.nd.array(x), mm, st, **attrs)
    return y.asnumpy(), mm.asnumpy(), st.asnumpy()


def tie_values(scale: np.float32, n: int, rng, qmax=127) -> np.ndarray:
    """Values whose float32 quotient by ``scale`` is exactly k + 0.5."""
    k = rng.integers(-qmax - 1, qmax, size=n * 4).astype(f32)
    x = ((k + f32(0.5)) * scale).astype(f32)
    return x[(x / scale) == k + f32(0.5)][:n]


def activation_sample(amax: float, n: int, rng) -> np.ndarray:
    s = f32(amax) / f32(127)
    parts = [
        rng.normal(0, amax / 3, n // 2).astype(f32),               # in range
        rng.uniform(-3 * amax, 3 * amax, n // 4).astype(f32),      # beyond the range too
        tie_values(s, n // 8, rng),                                # exact ties
        np.zeros(n // 16, f32), -np.zeros(n // 32, f32),           # zeros of both signs
        np.array([amax, -amax, 127.5 * s, -128.5 * s, 1e-30, -1e-30, np.inf, -np.inf], f32),
    ]
    x = np.concatenate(parts)
    x = np.concatenate([x, rng.normal(0, amax, n - x.size).astype(f32)])
    return rng.permutation(x)


# -- bit-exactness against onnxruntime (the acceptance item) ---------------------------

@pytest.mark.parametrize("amax", [3.7, 127 / 16.0, 0.0123])
def test_activation_inference_bit_identical_to_onnxruntime(amax):
    rng = np.random.default_rng(0)
    x = activation_sample(amax, 1_000_000, rng)
    assert x.size == 1_000_000
    s = f32(amax) / f32(127)
    with np.errstate(invalid="ignore"):
        ties = np.abs(x / s - np.floor(x / s)) == 0.5
    assert ties.sum() > 100_000  # the sample really has exact ties
    y, mm, _ = op(x, [amax], INFER)
    want = ort_qdq(x, s)
    assert np.array_equal(bits(y), bits(want))
    assert np.array_equal(bits(y), bits(ref.fake_quant(x, amax)))
    assert mm[0] == f32(amax)  # inference leaves the range alone


@pytest.mark.parametrize("channel_axis,shape", [(0, (512, 128, 4, 4)), (1, (64, 256, 8, 8))])
def test_perchannel_weight_bit_identical_to_onnxruntime(channel_axis, shape):
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.05, shape).astype(f32)
    w = np.moveaxis(w, channel_axis, 0)  # view: channel first while we edit it
    w[3] = 0.0                            # all-zero channels
    w[17] = 0.0
    w[5] *= 1000                          # channels of very different ranges
    w[6] *= 1e-4
    for c in range(0, w.shape[0], 7):     # exact ties inside channel c's own range
        flat = w[c].reshape(-1)
        s = np.abs(flat).max() / f32(127)
        t = tie_values(s, 50, rng, qmax=126)
        flat[1:1 + t.size] = t
        w[c] = flat.reshape(w[c].shape)
    w = np.ascontiguousarray(np.moveaxis(w, 0, channel_axis))
    assert w.size >= 1_000_000
    amax = ref.abs_max(w, channel_axis)
    nch = w.shape[channel_axis]
    y, mm, _ = op(w, np.zeros(nch), INFER, is_weight=True, is_weight_perchannel=True,
                  channel_axis=channel_axis)
    assert np.array_equal(mm, amax)
    want = ort_qdq(w, amax / f32(127), axis=channel_axis)
    assert np.array_equal(bits(y), bits(want))
    zero_ch = np.take(y, [3, 17], axis=channel_axis)
    assert np.all(zero_ch == 0) and not np.isnan(y).any()


def test_per_tensor_weight_narrow_range_bit_identical_to_onnxruntime():
    rng = np.random.default_rng(2)
    w = rng.normal(0, 1, (256, 256, 3, 3)).astype(f32)
    y, mm, _ = op(w, [0], INFER, is_weight=True)
    assert mm[0] == np.abs(w).max()
    assert np.array_equal(bits(y), bits(ort_qdq(w, mm[0] / f32(127))))
    # narrow range: no code -128
    assert (np.rint(y / (mm[0] / f32(127))) >= -127).all()


@pytest.mark.parametrize("amax", [3.7, 6.0, 0.0123])
def test_unsigned_activation_bit_identical_to_onnxruntime_uint8(amax):
    """signed=False is uint8 QDQ with zero point 0: codes 0..255, scale amax / 255;
    negative values give +0, ties round to even."""
    rng = np.random.default_rng(3)
    s = f32(amax) / f32(255)
    k = rng.integers(0, 255, 200_000).astype(f32)
    ties = ((k + f32(0.5)) * s).astype(f32)
    ties = ties[(ties / s) == k + f32(0.5)]
    x = np.concatenate([activation_sample(amax, 400_000, rng), ties,
                        np.array([255.5 * s, 254.5 * s, -0.4 * s, -0.5 * s], f32)])
    assert ties.size > 50_000
    y, mm, _ = op(x, [amax], INFER, signed=False)
    want = ort_qdq(x, s, unsigned=True)
    assert np.array_equal(bits(y), bits(want))
    assert np.array_equal(bits(y), bits(ref.fake_quant(x, amax, signed=False)))
    finite = y[np.isfinite(y)]
    assert finite.min() == 0 and finite.max() == f32(255) * s
    assert len(np.unique(finite)) == 256          # every code in use, twice int8's levels
    assert mm[0] == f32(amax)


# -- the numpy reference is the spec ---------------------------------------------------

@pytest.mark.parametrize("nbits", [2, 3, 4, 5, 8, 12, 16])
@pytest.mark.parametrize("mode", ["act", "act_unsigned", "weight", "weight_pc",
                                  "weight_pc_axis1"])
def test_forward_matches_reference(nbits, mode):
    rng = np.random.default_rng(nbits)
    x = rng.normal(0, 2, (8, 6, 5, 5)).astype(f32)
    x[0, 0, 0, :3] = [np.nan, 0.0, -0.0]
    attrs = {
        "act": {},
        "act_unsigned": dict(signed=False),
        "weight": dict(is_weight=True),
        "weight_pc": dict(is_weight=True, is_weight_perchannel=True),
        "weight_pc_axis1": dict(is_weight=True, is_weight_perchannel=True, channel_axis=1),
    }[mode]
    a = Int8Attrs(nbits=nbits, **attrs)
    nch = x.shape[a.axis] if a.axis is not None else 1
    for qstate in (INFER, TRAIN):
        mm0 = np.full(nch, 3.3, f32)
        y, mm, st = op(x, mm0, qstate, nbits=nbits, **attrs)
        ry, rmm, rst = ref.quantization_int8_forward(x, mm0, qstate, a)
        assert np.array_equal(bits(y), bits(ry)), (nbits, mode, qstate)
        assert np.array_equal(mm, rmm) and np.array_equal(st, rst)
        assert np.isnan(y[0, 0, 0, 0])  # NaN in, NaN out
        if a.is_weight:
            s = rmm / f32(2 ** (nbits - 1) - 1)
            codes = np.rint(ry / (s if a.axis is None else ref._broadcast(s, 4, a.axis)))
            assert np.nanmin(codes) >= -(2 ** (nbits - 1) - 1)  # narrow range


def test_zero_range_gives_zeros_like_onnxruntime():
    x = np.array([-2.0, -0.0, 0.0, 3.0, np.nan], f32)
    y, _, _ = op(x, [0.0], INFER)
    assert np.array_equal(bits(y[:4]), bits(ort_qdq(x[:4], f32(0))))
    assert np.isnan(y[4])


# -- training semantics ----------------------------------------------------------------

def test_ema_initialized_by_first_batch_then_averaged():
    rng = np.random.default_rng(3)
    a = Int8Attrs(ema_decay=0.9)
    mm, st = mx.nd.zeros(1), mx.nd.array(TRAIN)
    rmm, rst = np.zeros(1, f32), TRAIN.copy()
    history = []
    for i in range(6):
        x = rng.normal(0, 1 + i, (4, 3, 8, 8)).astype(f32)
        y = mx.nd.Quantization_int8(mx.nd.array(x), mm, st, ema_decay=0.9).asnumpy()
        ry, rmm, rst = ref.quantization_int8_forward(x, rmm, rst, a)
        assert np.array_equal(bits(y), bits(ry))
        history.append(mm.asnumpy()[0])
        assert mm.asnumpy()[0] == rmm[0]
        if i == 0:
            assert rmm[0] == np.abs(x).max()
    assert st.asnumpy()[0] == 6
    assert len(set(history)) == 6
    # inference: frozen, step not counted
    quant_ops.set_training([st], False)
    mx.nd.Quantization_int8(mx.nd.array(rng.normal(0, 50, 10)), mm, st).wait_to_read()
    assert mm.asnumpy()[0] == history[-1] and st.asnumpy()[0] == 6


def test_loaded_range_is_kept_and_fix_act_scale_freezes():
    x = np.linspace(-10, 10, 101, dtype=f32)
    _, mm, _ = op(x, [2.0], TRAIN, ema_decay=0.5)
    assert mm[0] == f32(0.5) * f32(2.0) + f32(0.5) * f32(10.0)  # continues from the loaded 2.0
    y, mm, st = op(x, [2.0], TRAIN, fix_act_scale=True)
    assert mm[0] == 2.0 and st[0] == 1
    assert np.array_equal(bits(y), bits(ref.fake_quant(x, 2.0)))
    _, mm, _ = op(x, [0.0], TRAIN, fix_act_scale=True)  # never calibrated: first batch sets it
    assert mm[0] == 10.0


def test_delay_quant_passes_float_then_quantizes():
    x = np.random.default_rng(4).normal(0, 1, 1000).astype(f32)
    mm, st = mx.nd.zeros(1), mx.nd.array(TRAIN)
    outs = [mx.nd.Quantization_int8(mx.nd.array(x), mm, st, delay_quant=3).asnumpy()
            for _ in range(5)]
    for y in outs[:3]:
        assert np.array_equal(y, x)
    for y in outs[3:]:
        assert not np.array_equal(y, x)
        assert np.array_equal(bits(y), bits(ref.fake_quant(x, mm.asnumpy()[0])))
    assert mm.asnumpy()[0] > 0  # the range was observed during the delay
    # inference never delays: it runs what the engine will run
    y, _, _ = op(x, [3.0], INFER, delay_quant=100)
    assert np.array_equal(bits(y), bits(ref.fake_quant(x, 3.0)))


@pytest.mark.parametrize("grad_mode", ["ste", "clip"])
@pytest.mark.parametrize("is_weight", [False, True])
def test_backward_matches_reference(grad_mode, is_weight):
    rng = np.random.default_rng(5)
    x = rng.normal(0, 2, (6, 4, 3)).astype(f32)
    g = rng.normal(0, 1, x.shape).astype(f32)
    attrs = dict(grad_mode=grad_mode, is_weight=is_weight, is_weight_perchannel=is_weight)
    a = Int8Attrs(**attrs)
    mm0 = np.full(6 if is_weight else 1, 1.5, f32)  # activations: x beyond 1.5 gets clipped
    xs = mx.nd.array(x)
    xs.attach_grad()
    mm, st = mx.nd.array(mm0), mx.nd.array(INFER)
    with autograd.record():
        y = mx.nd.Quantization_int8(xs, mm, st, **attrs)
    y.backward(mx.nd.array(g))
    _, rmm, rst = ref.quantization_int8_forward(x, mm0, INFER, a)
    want = ref.quantization_int8_backward(g, x, rmm, rst, a)
    assert np.array_equal(xs.grad.asnumpy(), want)
    if grad_mode == "clip" and not is_weight:
        assert (want == 0).sum() > 10  # the clip mode really clipped
    if grad_mode == "ste" or is_weight:
        assert np.array_equal(want, g)  # weights: their own max, nothing outside


def test_unsigned_clip_gradient_is_zero_below_zero_and_above_the_range():
    rng = np.random.default_rng(6)
    x = rng.normal(0, 2, (5, 40)).astype(f32)
    g = rng.normal(0, 1, x.shape).astype(f32)
    a = Int8Attrs(grad_mode="clip", signed=False)
    xs = mx.nd.array(x)
    xs.attach_grad()
    with autograd.record():
        y = mx.nd.Quantization_int8(xs, mx.nd.array([1.5]), mx.nd.array(INFER),
                                    grad_mode="clip", signed=False)
    y.backward(mx.nd.array(g))
    _, rmm, rst = ref.quantization_int8_forward(x, [1.5], INFER, a)
    want = ref.quantization_int8_backward(g, x, rmm, rst, a)
    assert np.array_equal(xs.grad.asnumpy(), want)
    s = f32(1.5) / f32(255)
    passed = (x >= -0.5 * s) & (x <= 1.5 + 0.5 * s)
    assert np.array_equal(want != 0, passed & (g != 0))


def test_clip_gradient_not_applied_during_delay():
    x = np.array([-5, 0.5, 5], f32)
    xs = mx.nd.array(x)
    xs.attach_grad()
    mm, st = mx.nd.array([1.0]), mx.nd.array(TRAIN)
    with autograd.record():
        y = mx.nd.Quantization_int8(xs, mm, st, grad_mode="clip", delay_quant=1,
                                    fix_act_scale=True)
    y.backward()
    assert np.array_equal(xs.grad.asnumpy(), np.ones(3, f32))
    with autograd.record():
        y = mx.nd.Quantization_int8(xs, mm, st, grad_mode="clip", delay_quant=1,
                                    fix_act_scale=True)
    y.backward()
    assert np.array_equal(xs.grad.asnumpy(), np.array([0, 1, 0], f32))


# -- the same semantics in symbol executors and hybridized Gluon ---------------------

ATTRS = dict(is_weight=False, ema_decay=0.8, grad_mode="clip", delay_quant=1)


def reference_run(xs, gs, attrs):
    a = Int8Attrs(**attrs)
    mm, st = np.zeros(1, f32), TRAIN.copy()
    outs, grads = [], []
    for x, g in zip(xs, gs):
        y, mm, st = ref.quantization_int8_forward(x, mm, st, a)
        outs.append(y)
        grads.append(ref.quantization_int8_backward(g, x, mm, st, a))
    return outs, grads, mm, st


def batches(n=3, shape=(4, 5, 6)):
    rng = np.random.default_rng(6)
    xs = [rng.normal(0, 1 + i, shape).astype(f32) for i in range(n)]
    gs = [rng.normal(0, 1, shape).astype(f32) for _ in range(n)]
    return xs, gs


def test_symbol_executor_training_matches_reference():
    xs, gs = batches()
    data = mx.sym.var("data")
    sym = mx.sym.Quantization_int8(data, mx.sym.var("q_minmax"), mx.sym.var("q_qstate"),
                                   name="q", **ATTRS)
    assert sym.list_auxiliary_states() == ["q_minmax", "q_qstate"]
    exe = sym.simple_bind(mx.cpu(), data=xs[0].shape, grad_req="write")
    quant_ops.set_training(exe.aux_dict, True)
    outs, grads, mm, st = reference_run(xs, gs, ATTRS)
    for x, g, want_y, want_g in zip(xs, gs, outs, grads):
        exe.arg_dict["data"][:] = x
        exe.forward(is_train=True)
        exe.backward(mx.nd.array(g))
        assert np.array_equal(bits(exe.outputs[0].asnumpy()), bits(want_y))
        assert np.array_equal(exe.grad_dict["data"].asnumpy(), want_g)
    assert np.array_equal(exe.aux_dict["q_minmax"].asnumpy(), mm)
    assert np.array_equal(exe.aux_dict["q_qstate"].asnumpy(), st)


class ActNet(gluon.HybridBlock):
    def __init__(self, **attrs):
        super().__init__()
        with self.name_scope():
            self.fq = quant_ops.FakeQuantInt8(**attrs)

    def hybrid_forward(self, F, x):
        return self.fq(x)


@pytest.mark.parametrize("hybrid", [None, {}, {"static_alloc": True, "static_shape": True}])
def test_gluon_training_matches_reference(hybrid):
    xs, gs = batches()
    net = ActNet(**ATTRS)
    net.initialize()
    quant_ops.track_training(net)
    if hybrid is not None:
        net.hybridize(**hybrid)
    outs, grads, mm, st = reference_run(xs, gs, ATTRS)
    for x, g, want_y, want_g in zip(xs, gs, outs, grads):
        xin = mx.nd.array(x)
        xin.attach_grad()
        with autograd.record():
            y = net(xin)
        y.backward(mx.nd.array(g))
        assert np.array_equal(bits(y.asnumpy()), bits(want_y))
        assert np.array_equal(xin.grad.asnumpy(), want_g)
    assert np.array_equal(net.fq.minmax.data().asnumpy(), mm)
    assert np.array_equal(net.fq.qstate.data().asnumpy(), st)
    # outside autograd.record(): inference, frozen range, step not counted
    y = net(mx.nd.array(xs[0] * 100)).asnumpy()
    assert np.array_equal(net.fq.minmax.data().asnumpy(), mm)
    assert net.fq.qstate.data().asnumpy()[0] == st[0]
    assert np.array_equal(bits(y), bits(ref.fake_quant(xs[0] * 100, mm[0])))


# -- gradient accumulation (grad_req='add') -------------------------------------------

class WeightNet(gluon.HybridBlock):
    def __init__(self):
        super().__init__()
        with self.name_scope():
            self.weight = self.params.get("weight", shape=(4, 3))
            self.fq = quant_ops.FakeQuantInt8(channels=4, is_weight=True,
                                              is_weight_perchannel=True)

    def hybrid_forward(self, F, x, weight):
        return F.sum(self.fq(weight) * x)


@pytest.mark.parametrize("hybrid", [None, {}, {"static_alloc": True}])
def test_gradient_accumulation_gluon(hybrid):
    net = WeightNet()
    net.initialize()
    quant_ops.track_training(net)
    if hybrid is not None:
        net.hybridize(**hybrid)
    net.weight.grad_req = "add"
    net.weight.zero_grad()
    xs = [mx.nd.array(np.full((4, 3), i + 1, f32)) for i in range(3)]
    for x in xs:
        with autograd.record():
            loss = net(x)
        loss.backward()
    assert np.array_equal(net.weight.grad().asnumpy(), np.full((4, 3), 6, f32))


# -- checkpoints -------------------------------------------------------------------

def test_checkpoint_save_parameters_and_export_keep_ranges(tmp_path):
    xs, _ = batches()
    net = ActNet(ema_decay=0.7)
    net.initialize()
    quant_ops.track_training(net)
    net.hybridize()
    for x in xs:
        with autograd.record():
            net(mx.nd.array(x))
    mm = net.fq.minmax.data().asnumpy()
    st = net.fq.qstate.data().asnumpy()
    assert mm[0] > 0 and st[0] == 3
    net.save_parameters(str(tmp_path / "net.params"))
    net2 = ActNet(ema_decay=0.7)
    net2.load_parameters(str(tmp_path / "net.params"))
    assert np.array_equal(net2.fq.minmax.data().asnumpy(), mm)
    assert np.array_equal(net2.fq.qstate.data().asnumpy()[:1], st[:1])

    probe = mx.nd.array(xs[0] * 3)
    want = net(probe).asnumpy()
    net.export(str(tmp_path / "act"), epoch=0)
    blk = gluon.SymbolBlock.imports(str(tmp_path / "act-symbol.json"), ["data"],
                                    str(tmp_path / "act-0000.params"))
    loaded = {p.name: p.data().asnumpy() for p in blk.collect_params().values()}
    mm_name = [k for k in loaded if k.endswith("_minmax")][0]
    assert np.array_equal(loaded[mm_name], mm)
    assert np.array_equal(bits(blk(probe).asnumpy()), bits(want))
    # a saved .params is an ordinary MXNet file with the state under predictable names
    saved = mx.nd.load(str(tmp_path / "act-0000.params"))
    assert any(k.startswith("aux:") and k.endswith("_minmax") for k in saved)


@pytest.mark.parametrize("nbits", [2, 4, 8])
@pytest.mark.parametrize("per_channel,axis", [(False, 0), (True, 0), (True, 1)])
def test_fix_weight_scale_keeps_the_stored_clip(nbits, per_channel, axis):
    """A stored weight clip is used as it is (values beyond it saturate), in training and in
    inference; only an unset channel (range 0) takes max|w|; the reference agrees."""
    rng = np.random.default_rng(nbits)
    w = rng.normal(0, 1, (6, 5, 3, 3)).astype(f32)
    attrs = dict(is_weight=True, fix_weight_scale=True, nbits=nbits)
    if per_channel:
        attrs.update(is_weight_perchannel=True, channel_axis=axis)
    a = Int8Attrs(**attrs)
    nch = w.shape[axis] if per_channel else 1
    clip = (ref.abs_max(w, a.axis) * f32(0.4)).astype(f32)
    if per_channel:
        clip[1] = 0.0                       # not set yet: from max|w|
    qmax = 2 ** (nbits - 1) - 1
    for qstate in (INFER, TRAIN):
        y, mm, st = op(w, clip, qstate, **attrs)
        ry, rmm, rst = ref.quantization_int8_forward(w, clip, qstate, a)
        assert np.array_equal(bits(y), bits(ry)) and np.array_equal(mm, rmm)
        want = clip.copy()
        if per_channel:
            want[1] = ref.abs_max(w, axis)[1]
        assert np.array_equal(mm, want)
        s = want / f32(qmax)
        s_b = s[0] if a.axis is None else ref._broadcast(s, 4, a.axis)
        assert np.nanmax(np.abs(y / s_b)) == pytest.approx(qmax)    # saturated at the clip
        assert np.array_equal(bits(y), bits(ref.fake_quant(w, want if a.axis is not None
                                                           else want[0], nbits, True, a.axis)))
    # without the flag the range is max|w| again, whatever was stored
    plain = {k: v for k, v in attrs.items() if k != "fix_weight_scale"}
    _, mm, _ = op(w, clip, TRAIN, **plain)
    assert np.array_equal(mm, ref.abs_max(w, a.axis))
    assert nch == mm.size


def test_fix_weight_scale_backward_is_straight_through_like_ref():
    rng = np.random.default_rng(7)
    w = rng.normal(0, 1, (4, 3, 3, 3)).astype(f32)
    g = rng.normal(0, 1, w.shape).astype(f32)
    clip = np.full(4, 0.5, f32)
    xs = mx.nd.array(w)
    xs.attach_grad()
    mm, st = mx.nd.array(clip), mx.nd.array(TRAIN)
    with autograd.record():
        y = mx.nd.Quantization_int8(xs, mm, st, is_weight=True, is_weight_perchannel=True,
                                    fix_weight_scale=True, nbits=3)
    y.backward(mx.nd.array(g))
    a = Int8Attrs(nbits=3, is_weight=True, is_weight_perchannel=True, fix_weight_scale=True)
    want = ref.quantization_int8_backward(g, w, clip, np.array([1, 1], f32), a)
    assert np.array_equal(xs.grad.asnumpy(), want)
    assert np.array_equal(want, g)                    # weights: straight through, also beyond


# -- bad input ---------------------------------------------------------------------

@pytest.mark.parametrize("attrs,needle", [
    (dict(nbits="eight"), "'nbits' must be an integer"),
    (dict(grad_mode="round"), "'grad_mode' must be one of {ste, clip}"),
    (dict(is_weight="maybe"), "'is_weight' must be True or False"),
    (dict(ema_decay=1.5), "'ema_decay' must be a number in"),
    (dict(is_weight_perchannel=True), "needs is_weight=True"),
    (dict(is_weight=True, signed=False), "signed=False needs is_weight=False"),
    (dict(signed="no"), "'signed' must be True or False"),
    (dict(fix_weight_scale=True), "fix_weight_scale=True needs is_weight=True"),
])
def test_bad_attribute_is_a_clear_error(attrs, needle):
    x = mx.nd.ones((2, 3))
    with pytest.raises(quant_ops.OperatorError, match="Quantization_int8") as e:
        mx.nd.Quantization_int8(x, mx.nd.zeros(1), mx.nd.zeros(2), **attrs)
    assert needle in str(e.value)
    assert isinstance(e.value, mx.base.MXNetError)


def test_bad_shapes_and_dtypes_are_clear_errors():
    x = mx.nd.ones((4, 3))
    cases = [
        ((x, mx.nd.zeros(3), mx.nd.zeros(2)), {}, "'minmax' must have shape (1,)"),
        ((x, mx.nd.zeros(1), mx.nd.zeros(2)), dict(is_weight=True, is_weight_perchannel=True),
         "'minmax' must have shape (4,)"),
        ((x, mx.nd.zeros(1), mx.nd.zeros(3)), {}, "'qstate' must have shape (2,)"),
        ((x.astype("int32"), mx.nd.zeros(1), mx.nd.zeros(2)), {}, "must be float32, got int32"),
        ((x.astype("float16"), mx.nd.zeros(1), mx.nd.zeros(2)), {},
         "must be float32, got float16"),
        ((x, mx.nd.zeros(4), mx.nd.zeros(2)),
         dict(is_weight=True, is_weight_perchannel=True, channel_axis=3), "channel_axis=3"),
    ]
    for args, attrs, needle in cases:
        with pytest.raises(quant_ops.OperatorError) as e:
            mx.nd.Quantization_int8(*args, **attrs)
        assert needle in str(e.value), str(e.value)
    # one error does not leak into the next message
    assert "qstate" not in str(e.value)


def test_unknown_weight_shape_in_symbol_is_a_clear_error():
    w = mx.sym.var("w")
    q = mx.sym.Quantization_int8(w, mx.sym.var("m"), mx.sym.var("s"), is_weight=True)
    out = mx.sym.FullyConnected(mx.sym.var("x"), q, num_hidden=4, no_bias=True)
    with pytest.raises(mx.base.MXNetError, match="shape of 'data' is not known"):
        out.infer_shape(x=(2, 3))
    # with the weight's shape declared it binds
    w = mx.sym.var("w", shape=(4, 3))
    q = mx.sym.Quantization_int8(w, mx.sym.var("m"), mx.sym.var("s"), is_weight=True)
    out = mx.sym.FullyConnected(mx.sym.var("x"), q, num_hidden=4, no_bias=True)
    assert out.infer_shape(x=(2, 3))[1] == [(2, 4)]


def test_import_in_a_fresh_interpreter():
    code = "import quant_ops, mxnet as mx; print(mx.nd.Quantization_int8)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=str(quant_ops.ops.__file__).rsplit("/quant_ops/", 1)[0])
    assert r.returncode == 0, r.stderr
    assert "Quantization_int8" in r.stdout


@pytest.mark.parametrize("per_channel", [False, True])
def test_values_a_few_ulps_from_code_boundaries(per_channel):
    """The kernel multiplies by 1/s and redoes by division any block holding a value near a
    rounding boundary; values 0..4 ulps around k+0.5 must still match the division."""
    rng = np.random.default_rng(11)
    ch = 64
    amax = rng.uniform(0.01, 50, ch).astype(f32)
    s = amax / f32(127)
    k = rng.integers(-127, 127, (ch, 4096)).astype(f32)
    base = ((k + f32(0.5)) * s[:, None]).astype(f32)
    steps = rng.integers(-4, 5, base.shape)
    x = base.copy()
    for n in range(1, 5):  # walk |steps| ulps away from the tie
        x = np.where(np.abs(steps) >= n, np.nextafter(x, np.sign(steps) * np.inf), x)
    x = x.astype(f32)
    x[:, 0] = amax  # each channel's own maximum sets its range
    if per_channel:
        y, mm, _ = op(x, np.zeros(ch), INFER, is_weight=True, is_weight_perchannel=True)
        want = ref.fake_quant(x, mm, narrow=True, axis=0)
    else:
        y, _, _ = op(x, [amax[0]], INFER)
        want = ref.fake_quant(x, amax[0])
    assert np.array_equal(bits(y), bits(want))


def _stream_threshold_bytes() -> int:
    import ctypes

    lib = ctypes.CDLL(str(quant_ops.LIBRARY_PATH))
    lib.qo_stream_threshold_bytes.restype = ctypes.c_int64
    return int(lib.qo_stream_threshold_bytes())


def test_activation_larger_than_cache_bit_identical_to_onnxruntime():
    """Outputs above the last-level cache size take the streaming-store path: still
    bit-identical, in inference and in training (EMA range), with a ragged tail."""
    limit = _stream_threshold_bytes()
    if limit > 256 << 20:
        pytest.skip(f"streaming threshold {limit} bytes: too large a tensor for the suite")
    n = limit // 4 + 4099
    amax = 3.7
    x = activation_sample(amax, n, np.random.default_rng(5))
    s = f32(amax) / f32(127)
    y, _, _ = op(x, [amax], INFER)
    assert np.array_equal(bits(y), bits(ort_qdq(x, s)))
    y, mm, _ = op(x, [0.0], TRAIN)  # first batch: the range is the batch max |x| (finite)
    want, want_mm, _ = ref.quantization_int8_forward(x, np.zeros(1, f32), TRAIN, Int8Attrs())
    assert mm[0] == want_mm[0] and np.array_equal(bits(y), bits(want))


def test_streaming_kernel_on_unaligned_output():
    """The streaming path falls back to plain stores for an output that is not 16-byte aligned."""
    import ctypes

    limit = _stream_threshold_bytes()
    if limit > 256 << 20:
        pytest.skip(f"streaming threshold {limit} bytes: too large a tensor for the suite")
    n = limit // 4 + 37
    x = activation_sample(2.5, n, np.random.default_rng(6))
    buf = np.zeros(n + 1, f32)
    y = buf[1:]  # 4 bytes past an aligned start
    assert y.ctypes.data % 16 != 0
    lib = ctypes.CDLL(str(quant_ops.LIBRARY_PATH))
    fp = ctypes.POINTER(ctypes.c_float)
    lib.qo_kernel_activation(x.ctypes.data_as(fp), y.ctypes.data_as(fp), ctypes.c_int64(n),
                             ctypes.c_float(2.5), 8)
    assert np.array_equal(bits(y), bits(ref.fake_quant(x, 2.5)))
