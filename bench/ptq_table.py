"""PTQ results table on Fashion-MNIST: every calibration method of quant_ops beside MXNet's
built-in ``quantize_net_v2`` (naive, entropy) and onnxruntime's ``quantize_static`` (MinMax,
Entropy, Percentile), on the same float model, calibration images and test set.

Writes the PTQ section of ``docs/results.md`` and ``bench/results/ptq_table.json``.

    python bench/ptq_table.py [--models resnet20,mobilenetv2] [--calib-images 512]

All rows are W8A8 with per-channel weights and per-tensor symmetric activations (TensorRT's
scheme) unless the row says otherwise; onnxruntime is given the same scheme (QDQ,
per-channel INT8 weights, symmetric INT8 activations).  Calibration time is wall time of
the calibration call alone (model export excluded), all in one run.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402

import quant_ops  # noqa: E402,F401
from quant_ops.datasets import fashion_mnist  # noqa: E402
from quant_ops.export.onnx_qdq import export_onnx  # noqa: E402
from quant_ops.fileio import atomic_write_text  # noqa: E402
from quant_ops.graph.fold_bn import fold_batchnorm  # noqa: E402
from quant_ops.cli.common import bundled_model  # noqa: E402
from quant_ops.ptq.common import FloatModel, accuracy, load_fmnist_model  # noqa: E402
from quant_ops.model import QuantizedModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64
PER_TENSOR_W = {"preset": "trt_int8", "weight": {"per_channel": False}}


def timed(fn: Callable):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


# -- quant_ops -------------------------------------------------------------------------------
def ours(m: FloatModel, calib: list, test: tuple, method: str, policy="trt_int8",
         graph_params=None, input_method="minmax") -> tuple[float, float]:
    qm = QuantizedModel(*(graph_params or (m.graph, m.params))).quantize(policy, "deploy")
    _, sec = timed(lambda: qm.calibrate(calib, method, progress=False,
                                        input_method=input_method))
    return qm.evaluate(*test), sec


def ours_easyquant(m: FloatModel, calib: list, test: tuple, bits: int) -> list:
    pol = {"preset": "trt_int8", "weight": {"bits": bits}, "activation": {"bits": bits}}
    qm = QuantizedModel(m.graph, m.params).quantize(pol, fold_bn="deploy")
    _, t_cal = timed(lambda: qm.calibrate(calib, "minmax", progress=False))
    start = qm.evaluate(*test)
    _, t_eq = timed(lambda: qm.easyquant(calib, progress=False))
    return [(f"minmax, W{bits}A{bits}", start, t_cal),
            (f"EasyQuant from minmax, W{bits}A{bits}", qm.evaluate(*test), t_cal + t_eq)]


def ours_zeroq(m: FloatModel, calib: list, test: tuple) -> list:
    from quant_ops.ptq.zeroq import distill_batches

    shape = (BATCH,) + calib[0].shape[1:]
    # pixels in [0, 1] before normalization: the one thing known about inputs without data
    lo, hi = (0 - m.mean) / m.std, (1 - m.mean) / m.std
    distilled, sec = timed(lambda: distill_batches(m.graph, m.params, shape,
                                                   num_batches=len(calib), steps=60,
                                                   input_range=(lo, hi), progress=False))
    rows = []
    for method in ("minmax", "entropy"):
        acc, sec2 = ours(m, distilled, test, method)
        rows.append((f"ZeroQ distilled data (no real image), {method}", acc, sec + sec2))
    return rows


def ours_dfq(m: FloatModel, calib: list, test: tuple) -> list:
    from quant_ops.ptq.dfq import apply_dfq

    rows = []
    for name, kw in (("DFQ: CLE + bias absorption", {"bias_correction": None}),
                     ("DFQ: CLE + absorption + bias correction (data-free)",
                      {"bias_correction": "data_free"}),
                     ("DFQ: CLE + absorption + bias correction (empirical)",
                      {"bias_correction": "empirical", "calib_batches": calib})):
        (gp, sec) = timed(lambda: apply_dfq(m.graph, m.params, policy=PER_TENSOR_W, **kw))
        acc, sec2 = ours(m, calib, test, "minmax", PER_TENSOR_W, graph_params=gp)
        rows.append((name + ", per-tensor W", acc, sec + sec2))
    return rows


# -- MXNet -----------------------------------------------------------------------------------
def mxnet_builtin(m: FloatModel, prefix: Path, calib: list, test: tuple, mode: str):
    net = mx.gluon.SymbolBlock.imports(f"{prefix}-symbol.json", ["data"], f"{prefix}-0000.params")
    x = np.concatenate(calib)
    loader = [[mx.nd.array(b)] for b in calib]   # data only: the net has one input
    qnet, sec = timed(lambda: mx.contrib.quantization.quantize_net_v2(
        net, quantized_dtype="auto", quantize_mode="full", calib_mode=mode,
        calib_data=loader, num_calib_examples=len(x), ctx=mx.cpu(),
        data_shapes=[mx.io.DataDesc("data", (BATCH,) + x.shape[1:])],
        logger=logging.getLogger("mxnet_quantize")))
    xt, yt = test
    correct = 0
    for i in range(0, len(xt), 500):
        correct += int((qnet(mx.nd.array(xt[i:i + 500])).argmax(axis=1).asnumpy()
                        == yt[i:i + 500]).sum())
    return 100.0 * correct / len(xt), sec


# -- onnxruntime -----------------------------------------------------------------------------
def ort_static(m: FloatModel, calib: list, test: tuple, method: str, tmp: Path):
    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod,
                                          QuantFormat, QuantType, quantize_static)

    g, p = fold_batchnorm(m.graph, m.params, "deploy")
    fp = tmp / "float.onnx"
    if not fp.exists():
        export_onnx(g, p, fp, {"data": (BATCH,) + calib[0].shape[1:]})

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"data": x}

    out = tmp / f"q_{method}.onnx"
    _, sec = timed(lambda: quantize_static(
        str(fp), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, method),
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True}))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    xt, yt = test
    correct = 0
    for i in range(0, len(xt), BATCH):
        xb = xt[i:i + BATCH]
        n = len(xb)
        if n < BATCH:
            xb = np.concatenate([xb, np.zeros((BATCH - n,) + xb.shape[1:], xb.dtype)])
        correct += int((sess.run(None, {"data": xb})[0][:n].argmax(1) == yt[i:i + n]).sum())
    return 100.0 * correct / len(xt), sec


def run_model(name: str, args) -> dict:
    prefix = bundled_model(f"fmnist_{name}")
    m = load_fmnist_model(prefix)
    xtr, _ = fashion_mnist("train")
    xte, yte = fashion_mnist("test")
    pick = np.random.RandomState(0).permutation(len(xtr))[:args.calib_images]
    xc = m.normalize(xtr[pick])
    calib = [xc[i:i + BATCH] for i in range(0, len(xc), BATCH)]
    test = (m.normalize(xte[:args.test_images]), yte[:args.test_images])
    acc_float = accuracy(m.graph, m.params, *test)
    rows = []

    def add(tool, method, fn):
        try:
            acc, sec = fn()
            rows.append({"tool": tool, "method": method, "accuracy": acc, "seconds": sec})
        except Exception as e:  # a peer that fails is reported, not hidden
            logging.exception("%s %s failed", tool, method)
            rows.append({"tool": tool, "method": method, "accuracy": None, "seconds": None,
                         "error": f"{type(e).__name__}: {str(e)[:200]}"})
        print(json.dumps({"model": name, **rows[-1]}), flush=True)

    for method in ("minmax", "percentile", "mse", "entropy"):
        add("quant_ops", f"{method} (trt_int8)", lambda: ours(m, calib, test, method))
    add("quant_ops", "entropy on the input too (TensorRT's choice)",
        lambda: ours(m, calib, test, "entropy", input_method=None))
    add("quant_ops", "minmax, per-tensor W", lambda: ours(m, calib, test, "minmax", PER_TENSOR_W))
    def add_rows(label, fn):   # one call that yields several (method, accuracy, seconds)
        try:
            for method, acc, sec in fn():
                add("quant_ops", method, lambda acc=acc, sec=sec: (acc, sec))
        except Exception as e:
            add("quant_ops", label, lambda e=e: (_ for _ in ()).throw(e))

    if "dfq" in args.extras:
        add_rows("DFQ", lambda: ours_dfq(m, calib, test))
    if "zeroq" in args.extras:
        add_rows("ZeroQ", lambda: ours_zeroq(m, calib, test))
    if "easyquant" in args.extras:
        for bits in (8, 7):
            add_rows(f"EasyQuant W{bits}A{bits}", lambda: ours_easyquant(m, calib, test, bits))
    for mode in ("naive", "entropy"):
        add("mxnet quantize_net_v2", mode, lambda: mxnet_builtin(m, prefix, calib, test, mode))
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("MinMax", "Entropy", "Percentile"):
            add("onnxruntime quantize_static", method,
                lambda: ort_static(m, calib, test, method, Path(tmp)))
    return {"model": name, "float_accuracy": acc_float, "rows": rows}


def render(results: list, args) -> str:
    lines = ["## PTQ on Fashion-MNIST (test set of 10,000 images)", "",
             f"Calibration: the same {args.calib_images} training images (batches of {BATCH}) "
             "for every tool. W8A8, per-channel weights and symmetric per-tensor "
             "activations unless the method says otherwise; network inputs calibrated by "
             "min/max in quant_ops rows unless the row says otherwise.", ""]
    for res in results:
        lines += [f"### {res['model']} (float {res['float_accuracy']:.2f}%)", "",
                  "| tool | method | accuracy (%) | vs float | calibration (s) |",
                  "|---|---|---|---|---|"]
        for r in res["rows"]:
            if r["accuracy"] is None:
                lines.append(f"| {r['tool']} | {r['method']} | failed: {r['error']} | | |")
                continue
            lines.append(f"| {r['tool']} | {r['method']} | {r['accuracy']:.2f} | "
                         f"{r['accuracy'] - res['float_accuracy']:+.2f} | {r['seconds']:.2f} |")
        lines.append("")
    lines.append("Regenerate: `python bench/ptq_table.py`.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,mobilenetv2")
    ap.add_argument("--calib-images", type=int, default=512)
    ap.add_argument("--test-images", type=int, default=10000)
    ap.add_argument("--extras", default="dfq,zeroq,easyquant",
                    help="comma list of dfq, zeroq, easyquant ('' for none)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "ptq_table.json")
    args = ap.parse_args(argv)
    args.extras = [e for e in args.extras.split(",") if e]
    logging.basicConfig(level=logging.WARNING)
    results = [run_model(name, args) for name in args.models.split(",")]
    section = render(results, args)
    from qat_table import write_section

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_section(args.out, section, marker="## PTQ on Fashion-MNIST")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.json, json.dumps({"calib_images": args.calib_images,
                                             "results": results}, indent=1))
    print(section)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
