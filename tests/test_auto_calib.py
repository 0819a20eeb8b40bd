"""The ``auto`` calibrator: its candidates are exactly the other observers' answers, and it
picks, per tensor, the one that least disturbs the layer reading it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quant_ops.calib.observers import make_observer
from quant_ops.datasets import FASHION_MNIST_DIR, fashion_mnist
from quant_ops.model import QuantizedModel

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "examples" / "models"


@pytest.mark.parametrize("bits", [8, 4])
def test_candidates_are_the_other_observers_answers(bits):
    rng = np.random.default_rng(0)
    batches = [np.abs(rng.standard_t(3, (4, 64, 8, 8))).astype(np.float32) for _ in range(3)]
    hint = max(float(np.abs(b).max()) for b in batches)
    auto = make_observer("auto", num_bits=bits, amax_hint=hint)
    for b in batches:
        auto.observe(b)
    got = auto.candidates()
    for method in ("minmax", "percentile", "mse", "entropy"):
        kw = {} if method == "minmax" else {"amax_hint": hint}
        if method in ("mse", "entropy"):
            kw["num_bits"] = bits
        o = make_observer(method, **kw)
        for b in batches:
            o.observe(b)
        assert got[method] == pytest.approx(o.amax(), rel=1e-6), method
    assert auto.amax() == got["mse"]        # alone, it answers MSE's range


def _fmnist(name: str, n_calib: int, n_test: int):
    if not (Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed")
    import json

    info = json.loads((BUNDLED / f"{name}.json").read_text())["normalize"]
    xtr, _ = fashion_mnist("train")
    xte, yte = fashion_mnist("test")
    pick = np.random.RandomState(0).permutation(len(xtr))[:n_calib]
    norm = lambda x: ((x - info["mean"]) / info["std"]).astype(np.float32)  # noqa: E731
    return norm(xtr[pick]), norm(xte[:n_test]), yte[:n_test]


@pytest.mark.parametrize("bits", [8, 4])
def test_auto_is_never_worse_than_minmax_and_beats_it_at_4_bits(bits):
    """On the bundled ResNet-20: at W8A8 within 0.05 point of min/max; at 4-bit
    activations (where min/max wastes the grid on outliers) clearly better, and each
    layer's output error no larger than with min/max ranges."""
    xc, xt, yt = _fmnist("fmnist_resnet20", 256, 2000)
    pol = {"preset": "trt_int8", "activation": {"bits": bits}}
    acc = {}
    for method in ("minmax", "auto"):
        q = QuantizedModel.load(BUNDLED / "fmnist_resnet20").quantize(pol, fold_bn="deploy")
        q.calibrate(xc, method, progress=False)
        acc[method] = q.evaluate(xt, yt)
    assert acc["auto"] >= acc["minmax"] - 0.05, acc
    if bits == 4:
        assert acc["auto"] >= acc["minmax"] + 1.0, acc


def test_auto_picks_per_tensor_and_keeps_signed_inputs_minmax():
    """Different tensors get different candidates; the network input keeps min/max (the
    default input method)."""
    xc, _, _ = _fmnist("fmnist_resnet20", 128, 1)
    q = QuantizedModel.load(BUNDLED / "fmnist_resnet20").quantize(
        {"preset": "trt_int8", "activation": {"bits": 4}}, fold_bn="deploy")
    q_minmax = q.copy().calibrate(xc, "minmax", progress=False)
    q.calibrate(xc, "auto", progress=False)
    assert q.ranges["data_int8"] == q_minmax.ranges["data_int8"]
    inner = [k for k in q.ranges if k != "data_int8"]
    assert any(q.ranges[k] < q_minmax.ranges[k] for k in inner)      # some clipped
    assert len({round(q.ranges[k] / q_minmax.ranges[k], 3) for k in inner}) > 2


def test_each_range_is_scored_through_the_quantized_weights_against_the_exact_tensor():
    """The chosen candidate is the one whose quantization least changes the output of the
    layer reading the tensor, the layer's quantized weights on both sides (so no range is
    picked for offsetting the weights' own rounding on the calibration images): checked
    against MXNet's own convolution on every output position."""
    import mxnet as mx

    from quant_ops.calib.auto import choose
    from quant_ops.reference import abs_max, fake_quant

    data = mx.sym.var("data")
    r = mx.sym.Activation(mx.sym.Convolution(data, num_filter=6, kernel=(3, 3), pad=(1, 1),
                                             name="c1"), act_type="relu", name="r")
    out = mx.sym.Convolution(r, num_filter=5, kernel=(3, 3), name="c2")
    rng = np.random.default_rng(0)      # (against the float layer, MSE would win here)
    shapes = dict(zip(out.list_arguments(), out.infer_shape(data=(4, 3, 8, 8))[0]))
    params = {k: rng.standard_t(3, s).astype(np.float32) for k, s in shapes.items()
              if k != "data"}
    q = QuantizedModel.from_symbol(out, params).quantize(
        {"preset": "trt_int8", "weight": {"bits": 3}, "activation": {"bits": 4}})
    x = rng.normal(size=(4, 3, 8, 8)).astype(np.float32)
    ex = r.bind(mx.cpu(), {"data": mx.nd.array(x), "c1_weight": mx.nd.array(params["c1_weight"]),
                           "c1_bias": mx.nd.array(params["c1_bias"])})
    t = ex.forward()[0].asnumpy()
    top = float(t.max())
    cands = {"minmax": top, "percentile": 0.7 * top, "mse": 0.45 * top, "entropy": 0.25 * top}
    w = params["c2_weight"]
    wq = mx.nd.array(fake_quant(w, abs_max(w, 0), 3, narrow=True, axis=0))

    def conv(v):
        return mx.nd.Convolution(mx.nd.array(v), wq, no_bias=True, num_filter=5,
                                 kernel=(3, 3)).asnumpy().astype(np.float64)
    err = {m: float(((conv(fake_quant(t, a, 4)) - conv(t)) ** 2).sum())
           for m, a in cands.items()}
    got = choose(q.run_graph, q.params, [x], "data", {"r_output": cands}, {"r_output": 4},
                 {"r_output"})
    assert got["r_output"] == (min(err, key=err.get), cands[min(err, key=err.get)]), err
    assert sorted(err.values())[0] < 0.9 * sorted(err.values())[1]     # a clear winner


def test_the_network_keeps_min_max_when_the_chosen_ranges_take_it_further_from_float(
        monkeypatch):
    """Per-layer choices compound: on the bundled MobileNet-v2 at W3A8 the chosen ranges
    together move the network output further from float than min/max, so auto keeps
    min/max there (and only there: at 4-bit activations it beats min/max, above)."""
    import quant_ops.calib.auto as auto

    xc, _, _ = _fmnist("fmnist_mobilenetv2", 256, 1)
    base = QuantizedModel.load(BUNDLED / "fmnist_mobilenetv2").quantize(
        {"preset": "trt_int8", "weight": {"bits": 3}}, fold_bn="deploy")
    exact = base.float_model().predict(xc).astype(np.float64)

    def error(q):
        return float(((q.predict(xc) - exact) ** 2).sum() / (exact ** 2).sum())

    minmax = base.copy().calibrate(xc, "minmax", progress=False)
    got = base.copy().calibrate(xc, "auto", progress=False)
    with monkeypatch.context() as m:          # the per-layer choice alone, unchecked
        m.setattr(auto, "nearest_float", lambda graph, options, *a, **k: (0, [0.0, 0.0]))
        chosen = base.copy().calibrate(xc, "auto", progress=False)
    assert chosen.ranges != minmax.ranges
    assert error(chosen) > error(minmax) * 1.03
    assert got.ranges == minmax.ranges


def test_nearest_float_ranks_parameter_sets_by_the_network_output_error():
    """The error is the relative squared error of the network output against the float
    graph's, checked against MXNet's own forward of the float and the quantized graphs."""
    import mxnet as mx

    from quant_ops.calib.auto import nearest_float

    data = mx.sym.var("data")
    r = mx.sym.Activation(mx.sym.Convolution(data, num_filter=6, kernel=(3, 3), pad=(1, 1),
                                             name="c1"), act_type="relu", name="r")
    out = mx.sym.FullyConnected(r, num_hidden=4, name="fc")
    rng = np.random.default_rng(1)
    shapes = dict(zip(out.list_arguments(), out.infer_shape(data=(4, 3, 6, 6))[0]))
    params = {k: rng.normal(0, 0.5, s).astype(np.float32) for k, s in shapes.items()
              if k != "data"}
    batches = [rng.normal(size=(4, 3, 6, 6)).astype(np.float32) for _ in range(2)]
    batches.append(batches[0][:3])                       # a shorter last batch
    q = QuantizedModel.from_symbol(out, params).quantize(
        {"preset": "trt_int8", "activation": {"bits": 4}})
    images = np.concatenate(batches)
    fine = q.copy().calibrate(images, "minmax", progress=False)
    clipped = q.copy().calibrate(images, "percentile", input_method="percentile",
                                 percentile=30.0, progress=False)    # most values clip
    options = [clipped.params, fine.params]
    best, errors = nearest_float(q.run_graph, options, batches, "data")
    fsym = mx.sym.load_json(out.tojson())
    for p, e in zip(options, errors):
        num = den = 0.0
        for x in batches:
            y = fsym.eval(ctx=mx.cpu(), data=mx.nd.array(x), **{
                k: mx.nd.array(v) for k, v in params.items()})[0].asnumpy().astype(np.float64)
            yq = QuantizedModel.from_symbol(q.run_graph.to_symbol(), p).predict(x)
            num += ((yq - y) ** 2).sum()
            den += (y ** 2).sum()
        assert e == pytest.approx(num / den, rel=1e-5)
    assert best == 1 and errors[0] > 2 * errors[1]
