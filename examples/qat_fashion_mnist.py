"""Main job: quantize the bundled pretrained ResNet-20 (Fashion-MNIST, 93.50%) and tell the
true story: float, PTQ INT8 (calibrated, no training), QAT INT8, one low-bit QAT row (W4A4,
LSQ weights / PACT activations), and the exported ONNX model in onnxruntime.

Every stage runs on one ``QuantizedModel`` in memory.  Everything lands in ``--out``:
report.md, summary.json, metrics.csv, quantizers.md, the INT8 model (symbol + params), the
.onnx, .calib.cache, .ranges.json and .alignment.json, and pictures of the float and
quantized graphs.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from quant_ops import QuantizedModel, QuantOpsError  # noqa: E402
from quant_ops.datasets import fashion_mnist  # noqa: E402
from quant_ops.export.ort import session  # noqa: E402
from quant_ops.fileio import atomic_write_text, staged_dir  # noqa: E402
from quant_ops.policy import QuantPolicy  # noqa: E402
from quant_ops.train import FitConfig  # noqa: E402
from quant_ops.train.recipe import Recipe, default_recipe  # noqa: E402
from quant_ops.viz import draw  # noqa: E402

log = logging.getLogger("qat_fashion_mnist")
MODEL = ROOT / "examples" / "models" / "fmnist_resnet20"
LOW_BIT = {"weight": {"method": "lsq", "bits": 4, "per_channel": True},
           "activation": {"method": "pact", "bits": 4},
           # the stem reads the signed, normalized image: keep it on a signed 8-bit grid
           "overrides": [{"match": "cifarresnetv10_conv0_fwd",
                          "activation": {"method": "int8", "bits": 8},
                          "weight": {"method": "int8", "bits": 8, "per_channel": True}}]}


def onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray, bs: int = 500) -> float:
    """Test accuracy of the exported model in onnxruntime."""
    sess = session(path)
    name = sess.get_inputs()[0].name
    correct = 0
    for i in tqdm(range(0, len(x), bs), desc="onnxruntime eval", leave=False):
        correct += int((sess.run(None, {name: x[i:i + bs]})[0].argmax(1) == y[i:i + bs]).sum())
    return 100.0 * correct / len(x)


def qat(model: QuantizedModel, x, y, rec: Recipe, epochs: int, seed: int, stage: str) -> list:
    """Fine-tune with the default recipe's lr, batch and weight decay."""
    progress = model.fit((x, y), None, FitConfig(epochs=epochs, lr=rec.lr, wd=rec.wd,
                                                 batch_size=rec.batch_size, seed=seed))
    return [{"stage": stage, **row} for row in progress["history"]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out/qat_fashion_mnist"))
    ap.add_argument("--train-images", type=int, default=8192,
                    help="training images for each QAT run (default 8192)")
    ap.add_argument("--calib-images", type=int, default=512)
    ap.add_argument("--qat-epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        info = json.loads(MODEL.with_suffix(".json").read_text())
        mean, std = info["normalize"]["mean"], info["normalize"]["std"]
        xtr, ytr = fashion_mnist("train")
        xte, yte = fashion_mnist("test")
        base = QuantizedModel.load(MODEL)
    except (OSError, QuantOpsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    rng = np.random.default_rng(args.seed)
    pick = rng.permutation(len(xtr))
    calib = xtr[pick[:args.calib_images]]
    train = xtr[pick[:args.train_images]], ytr[pick[:args.train_images]]
    mx.random.seed(args.seed)
    t0 = time.time()

    acc = {"float": base.evaluate(xte, yte)}
    log.info("float: %.2f%%", acc["float"])
    # the recipes are the library's defaults (quant_ops/train/recipe.py), nothing tuned here
    rec8 = default_recipe(QuantPolicy.preset("trt_int8"), info["lr"])
    int8 = base.copy().quantize("trt_int8", fold_bn="deploy").calibrate(calib, rec8.calib_method)
    acc["ptq_int8"] = int8.evaluate(xte, yte)
    log.info("PTQ INT8 (%s, %d images): %.2f%%", rec8.calib_method, len(calib), acc["ptq_int8"])
    # QAT from the calibrated model, gently (the recipe: float lr / 400 at 8 bits)
    metrics = qat(int8, *train, rec8, args.qat_epochs, args.seed, "qat_int8")
    acc["qat_int8"] = int8.evaluate(xte, yte)
    log.info("QAT INT8: %.2f%%", acc["qat_int8"])
    low_policy = QuantPolicy.from_dict(LOW_BIT, "LOW_BIT")
    rec4 = default_recipe(low_policy, info["lr"])
    low = base.copy().quantize(low_policy, fold_bn=rec4.fold_bn).calibrate(calib,
                                                                          rec4.calib_method)
    acc["ptq_w4a4"] = low.evaluate(xte, yte)
    methods = {"int8": rec8.calib_method, "w4a4": rec4.calib_method}
    metrics += qat(low, *train, rec4, args.qat_epochs, args.seed, "qat_w4a4")
    acc["qat_w4a4"] = low.evaluate(xte, yte)
    log.info("W4A4 (LSQ / PACT): %.2f%% calibrated, %.2f%% after QAT", acc["ptq_w4a4"],
             acc["qat_w4a4"])

    out = args.out
    with staged_dir(out) as tmp:
        int8.save(tmp / "qat_int8")
        ex = int8.export(tmp, "qat_int8", check_input=xte[:500])
        acc["onnxruntime_int8"] = onnx_accuracy(tmp / ex.onnx.name, xte, yte)
        log.info("onnxruntime, exported INT8 model: %.2f%%", acc["onnxruntime_int8"])
        atomic_write_text(tmp / "quantizers.md", int8.summary("ResNet-20, trt_int8"))
        draw(base.graph, tmp / "graph-float", title="ResNet-20 (float)")
        draw(int8.graph, tmp / "graph-quantized",
             title=f"ResNet-20, trt_int8: {len(int8.table)} quantizers")
        align = ex.alignment
        summary = {"accuracy": acc, "train_images": len(train[0]), "calib_images": len(calib),
                   "test_images": len(xte), "qat_epochs": args.qat_epochs,
                   "calibration": methods,
                   "onnxruntime_identical_fraction_min": align["identical_min"],
                   "seconds": round(time.time() - t0, 1), "mxnet": mx.__version__}
        atomic_write_text(tmp / "summary.json", json.dumps(summary, indent=2))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["stage", "epoch", "loss", "lr"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(metrics)
        atomic_write_text(tmp / "metrics.csv", buf.getvalue())
        lines = report(acc, align, args, len(calib), len(train[0]), methods)
        atomic_write_text(tmp / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\noutputs in {out}/ ({summary['seconds']} s)")
    return 0 if align["isolated_identical_min"] == 1.0 else 1


def report(acc: dict, align: dict, args, n_calib: int, n_train: int,
           methods: dict) -> list[str]:
    o = align["outputs"][0]
    lines = ["# Quantizing the pretrained ResNet-20 (Fashion-MNIST)", "",
             "| model | test accuracy (%, 10,000 images) |", "|---|---|",
             f"| float (bundled, pretrained) | {acc['float']:.2f} |",
             f"| PTQ INT8: trt_int8, BN folded, {methods['int8']} ranges on {n_calib} images | "
             f"{acc['ptq_int8']:.2f} |",
             f"| QAT INT8: {args.qat_epochs} epoch(s) on {n_train} images | "
             f"{acc['qat_int8']:.2f} |",
             f"| W4A4 (LSQ weights, PACT activations), calibrated ({methods['w4a4']}) | "
             f"{acc['ptq_w4a4']:.2f} |",
             f"| W4A4 after QAT ({args.qat_epochs} epoch(s) on {n_train} images) | "
             f"{acc['qat_w4a4']:.2f} |",
             f"| QAT INT8 exported (ONNX QDQ), in onnxruntime | {acc['onnxruntime_int8']:.2f} |",
             "", "MXNet against onnxruntime on 500 test images: int8 codes identical at every "
             "QuantizeLinear (fraction; 'alone' = the quantizer on onnxruntime's own input):",
             "", "| quantizer | values | identical | alone |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['values']} | {v['identical']:.6f} | "
              f"{align['quantizers_isolated'][k]['identical']:.6f} |"
              for k, v in align["quantizers"].items()]
    lines += ["", f"logits: max |mxnet - onnxruntime| = {o['max_abs_diff']:.3g}, cosine "
              f"{o['cosine']:.9f}", "",
              "files: qat_int8.onnx, qat_int8.calib.cache (TensorRT calibration cache), "
              "qat_int8.ranges.json, qat_int8.alignment.json, qat_int8-symbol.json / "
              "-0000.params, quantizers.md, graph-*.svg/png"]
    return lines


if __name__ == "__main__":
    sys.exit(main())
