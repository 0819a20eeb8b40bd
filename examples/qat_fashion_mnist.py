"""Main job: INT8 (TensorRT-aligned) quantization of a small CNN on Fashion-MNIST.

float training -> calibration of the INT8 quantizers (post-training ranges) -> short QAT
fine-tune -> accuracy of each, and a bit-exactness check of the simulated INT8 weights and
activations against onnxruntime's QuantizeLinear/DequantizeLinear.  Everything lands in
``--out``: summary.json, metrics.csv, report.md and the quantized model (symbol + params).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
from mxnet import autograd, gluon  # noqa: E402
from mxnet.gluon import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import quant_ops  # noqa: E402
from quant_ops.datasets import fashion_mnist  # noqa: E402
from quant_ops.export.ort_qdq import ort_qdq  # noqa: E402

log = logging.getLogger("qat_fashion_mnist")


class _Quantized:
    """Mixin: pass the layer's input and weight through Quantization_int8 (TensorRT INT8:
    per-tensor activations, per-output-channel weights)."""

    def _add_quantizers(self, channels: int) -> None:
        with self.name_scope():
            self.weight_q = quant_ops.FakeQuantInt8(channels, prefix="weight_int8_",
                                                    is_weight=True, is_weight_perchannel=True)
            self.data_q = quant_ops.FakeQuantInt8(1, prefix="data_int8_", ema_decay=0.99)

    def hybrid_forward(self, F, x, weight, bias=None):
        return super().hybrid_forward(F, self.data_q(x), self.weight_q(weight), bias)


class QConv2D(_Quantized, nn.Conv2D):
    def __init__(self, channels, *args, **kwargs):
        super().__init__(channels, *args, **kwargs)
        self._add_quantizers(channels)


class QDense(_Quantized, nn.Dense):
    def __init__(self, units, *args, **kwargs):
        super().__init__(units, *args, **kwargs)
        self._add_quantizers(units)


def build_net(quantized: bool) -> gluon.HybridBlock:
    conv, dense = (QConv2D, QDense) if quantized else (nn.Conv2D, nn.Dense)
    net = nn.HybridSequential(prefix="net_")
    with net.name_scope():
        net.add(conv(32, 3, padding=1, in_channels=1, activation="relu"), nn.MaxPool2D(2),
                conv(64, 3, padding=1, in_channels=32, activation="relu"), nn.MaxPool2D(2),
                nn.Flatten(), dense(128, in_units=64 * 7 * 7, activation="relu"),
                dense(10, in_units=128))
    return net


def batches(x, y, bs, shuffle, rng):
    idx = rng.permutation(len(x)) if shuffle else np.arange(len(x))
    for i in range(0, len(x), bs):
        j = idx[i:i + bs]
        yield mx.nd.array(x[j]), mx.nd.array(y[j])


def train(net, x, y, epochs, lr, bs, rng, desc):
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": lr})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    rows = []
    for ep in range(epochs):
        total, n = 0.0, 0
        for xb, yb in tqdm(batches(x, y, bs, True, rng), total=-(-len(x) // bs),
                           desc=f"{desc} epoch {ep + 1}/{epochs}", leave=False):
            with autograd.record():
                loss = loss_fn(net(xb), yb)
            loss.backward()
            trainer.step(xb.shape[0])
            total += float(loss.sum().asscalar())
            n += xb.shape[0]
        rows.append({"stage": desc, "epoch": ep + 1, "loss": total / n})
    return rows


def evaluate(net, x, y, bs=500) -> float:
    correct = 0
    for xb, yb in tqdm(batches(x, y, bs, False, None), total=-(-len(x) // bs), desc="eval",
                       leave=False):
        correct += int((net(xb).argmax(axis=1) == yb).sum().asscalar())
    return 100.0 * correct / len(x)


def calibrate(net, x, bs=256, nbatches=20) -> None:
    """Post-training ranges: forward passes in training mode with no weight update feed the
    EMA range of every activation quantizer."""
    with autograd.record():  # training mode for the quantizers; nothing is back-propagated
        for i, (xb, _) in enumerate(batches(x, np.zeros(len(x)), bs, False, None)):
            if i == nbatches:
                break
            net(xb)
    mx.nd.waitall()


def onnx_alignment(net, x) -> dict:
    """Run every quantizer on real tensors and compare with onnxruntime QDQ bit for bit."""
    report = {}
    feats = mx.nd.array(x)
    for layer in net:
        if isinstance(layer, _Quantized):
            wq, aq = layer.weight_q, layer.data_q
            w = layer.weight.data()
            sim_w = wq(w).asnumpy()
            amax_w = wq.minmax.data().asnumpy()
            ref_w = ort_qdq(w.asnumpy(), amax_w / np.float32(127), axis=0)
            sim_a = aq(feats).asnumpy()
            ref_a = ort_qdq(feats.asnumpy(), aq.minmax.data().asnumpy()[0] / np.float32(127))
            report[layer.name] = {
                "weight_values": int(sim_w.size),
                "weight_identical": float((sim_w.view(np.uint32) == ref_w.view(np.uint32)).mean()),
                "activation_values": int(sim_a.size),
                "activation_identical": float((sim_a.view(np.uint32) ==
                                               ref_a.view(np.uint32)).mean()),
            }
        feats = layer(feats)
    return report


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out/qat_fashion_mnist"))
    ap.add_argument("--float-epochs", type=int, default=2)
    ap.add_argument("--qat-epochs", type=int, default=1)
    ap.add_argument("--train-limit", type=int, default=0, help="use only N training images")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        xtr, ytr = fashion_mnist("train")
        xte, yte = fashion_mnist("test")
    except (OSError, quant_ops.QuantOpsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.train_limit:
        xtr, ytr = xtr[:args.train_limit], ytr[:args.train_limit]
    mx.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()

    fnet = build_net(False)
    fnet.initialize(mx.init.Xavier())
    fnet.hybridize(static_alloc=True)
    metrics = train(fnet, xtr, ytr, args.float_epochs, 1e-3, 128, rng, "float")
    acc_float = evaluate(fnet, xte, yte)
    log.info("float accuracy: %.2f%%", acc_float)
    params = args.out / "float.params"
    fnet.save_parameters(str(params))

    qnet = build_net(True)
    qnet.load_parameters(str(params), allow_missing=True)  # quantizer state starts empty
    qnet.collect_params(".*_minmax|.*_qstate").initialize(mx.init.Zero())
    quant_ops.track_training(qnet)
    qnet.hybridize(static_alloc=True)
    calibrate(qnet, xtr)
    acc_ptq = evaluate(qnet, xte, yte)
    log.info("INT8 after calibration: %.2f%%", acc_ptq)
    metrics += train(qnet, xtr, ytr, args.qat_epochs, 5e-4, 128, rng, "qat")
    acc_qat = evaluate(qnet, xte, yte)
    log.info("INT8 after QAT: %.2f%%", acc_qat)
    qnet.export(str(args.out / "qat_int8"), epoch=0)

    align = onnx_alignment(qnet, xte[:256])
    worst = min(min(v["weight_identical"], v["activation_identical"]) for v in align.values())
    summary = {
        "float_accuracy": acc_float, "int8_calibrated_accuracy": acc_ptq,
        "int8_qat_accuracy": acc_qat, "onnxruntime_identical_fraction_min": worst,
        "onnxruntime_alignment": align, "train_images": len(xtr), "test_images": len(xte),
        "seconds": round(time.time() - t0, 1), "mxnet": mx.__version__,
    }
    write_atomic(args.out / "summary.json", json.dumps(summary, indent=2))
    with open(args.out / ".metrics.csv.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["stage", "epoch", "loss"])
        w.writeheader()
        w.writerows(metrics)
    os.replace(args.out / ".metrics.csv.tmp", args.out / "metrics.csv")
    lines = ["# INT8 quantization of a small CNN on Fashion-MNIST", "",
             "| model | test accuracy (%) |", "|---|---|",
             f"| float | {acc_float:.2f} |", f"| INT8, calibrated ranges | {acc_ptq:.2f} |",
             f"| INT8, after {args.qat_epochs} QAT epoch(s) | {acc_qat:.2f} |", "",
             "Simulated INT8 vs onnxruntime QuantizeLinear/DequantizeLinear (identical values):",
             "", "| layer | weights | activations |", "|---|---|---|"]
    lines += [f"| {k} | {v['weight_identical']:.6f} | {v['activation_identical']:.6f} |"
              for k, v in align.items()]
    write_atomic(args.out / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\noutputs in {args.out}/ ({summary['seconds']} s)")
    return 0 if worst == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
