"""Main job: INT8 (TensorRT-aligned) quantization of a small CNN on Fashion-MNIST.

float training -> graph rewrite by the ``trt_int8`` policy (BatchNorm folded, quantizers on
every conv/FC input) -> calibration of the ranges -> short QAT fine-tune -> export to ONNX
QDQ + TensorRT calibration cache -> onnxruntime against MXNet (int8 codes at every
QuantizeLinear, logits, test accuracy).  Everything lands in ``--out``: report.md,
summary.json, metrics.csv, quantizers.md, the quantized model (symbol + params), the .onnx,
.calib.cache and .ranges.json, and pictures of the float and quantized graphs.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import io
import sys
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
from quant_ops.cli import summary_markdown  # noqa: E402
from quant_ops.export import export_model  # noqa: E402
from quant_ops.fileio import atomic_write_text  # noqa: E402
from quant_ops.export.align import check_alignment, session  # noqa: E402
from quant_ops.graph.ir import Graph, load_graph  # noqa: E402
from quant_ops.graph.params import load_params  # noqa: E402
from quant_ops.prepare import quantize_block  # noqa: E402
from quant_ops.viz import draw  # noqa: E402

log = logging.getLogger("qat_fashion_mnist")


def build_net() -> gluon.HybridBlock:
    """Conv-BN-ReLU blocks, the shape TensorRT fuses (and the policy folds)."""
    net = nn.HybridSequential(prefix="net_")
    with net.name_scope():
        for ch in (32, 64):
            net.add(nn.Conv2D(ch, 3, padding=1, use_bias=False), nn.BatchNorm(),
                    nn.Activation("relu"), nn.MaxPool2D(2))
        net.add(nn.Flatten(), nn.Dense(128, activation="relu"), nn.Dense(10))
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


def onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray, bs: int = 500) -> float:
    """Test accuracy of the exported model in onnxruntime."""
    sess = session(path)
    name = sess.get_inputs()[0].name
    correct = 0
    for i in tqdm(range(0, len(x), bs), desc="onnxruntime eval", leave=False):
        logits = sess.run(None, {name: x[i:i + bs]})[0]
        correct += int((logits.argmax(axis=1) == y[i:i + bs]).sum())
    return 100.0 * correct / len(x)


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

    fnet = build_net()
    fnet.initialize(mx.init.Xavier())
    fnet.hybridize(static_alloc=True)
    metrics = train(fnet, xtr, ytr, args.float_epochs, 1e-3, 128, rng, "float")
    acc_float = evaluate(fnet, xte, yte)
    log.info("float accuracy: %.2f%%", acc_float)

    # the graph pipeline: BN folded into the convs, quantizers where TensorRT INT8 runs
    float_graph = Graph.from_symbol(fnet(mx.sym.var("data")))
    qnet = quantize_block(fnet, "trt_int8", fold_bn="deploy")
    qnet.hybridize(static_alloc=True)
    calibrate(qnet, xtr)
    acc_ptq = evaluate(qnet, xte, yte)
    log.info("INT8 after calibration: %.2f%%", acc_ptq)
    metrics += train(qnet, xtr, ytr, args.qat_epochs, 5e-4, 128, rng, "qat")
    acc_qat = evaluate(qnet, xte, yte)
    log.info("INT8 after QAT: %.2f%%", acc_qat)
    qnet.export(str(args.out / "qat_int8"), epoch=0)
    qgraph = load_graph(args.out / "qat_int8-symbol.json")
    atomic_write_text(args.out / "quantizers.md",
                 summary_markdown("fashion-mnist cnn", qnet.quant_table,
                                  ["BatchNorm folded (deploy)"], "trt_int8"))
    draw(float_graph, args.out / "graph-float", title="Fashion-MNIST CNN (float)")
    draw(qgraph, args.out / "graph-quantized",
         title=f"Fashion-MNIST CNN, trt_int8: {len(qnet.quant_table)} quantizers")

    # deployment: ONNX QDQ + TensorRT cache + ranges, checked against onnxruntime
    qparams = load_params(args.out / "qat_int8-0000.params")
    ex = export_model(qgraph, qparams, args.out, "qat_int8", {"data": (500, 1, 28, 28)})
    align = check_alignment(ex.onnx, ex.graph, ex.params, {"data": xte[:500]})
    acc_onnx = onnx_accuracy(ex.onnx, xte, yte)
    log.info("onnxruntime accuracy of the exported model: %.2f%%", acc_onnx)
    worst = align["identical_min"]
    summary = {
        "float_accuracy": acc_float, "int8_calibrated_accuracy": acc_ptq,
        "int8_qat_accuracy": acc_qat, "onnxruntime_accuracy": acc_onnx,
        "onnxruntime_identical_fraction_min": worst,
        "onnxruntime_alignment": align, "train_images": len(xtr), "test_images": len(xte),
        "seconds": round(time.time() - t0, 1), "mxnet": mx.__version__,
    }
    atomic_write_text(args.out / "summary.json", json.dumps(summary, indent=2))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["stage", "epoch", "loss"])
    writer.writeheader()
    writer.writerows(metrics)
    atomic_write_text(args.out / "metrics.csv", buf.getvalue())
    lines = ["# INT8 quantization of a small CNN on Fashion-MNIST", "",
             "| model | test accuracy (%) |", "|---|---|",
             f"| float | {acc_float:.2f} |", f"| INT8, calibrated ranges | {acc_ptq:.2f} |",
             f"| INT8, after {args.qat_epochs} QAT epoch(s) | {acc_qat:.2f} |",
             f"| INT8 exported (ONNX QDQ), in onnxruntime | {acc_onnx:.2f} |", "",
             "MXNet vs onnxruntime on 500 test images, int8 codes at every QuantizeLinear "
             "(fraction identical; 'alone' = the quantizer on onnxruntime's own input):", "",
             "| quantizer | values | identical | alone |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['values']} | {v['identical']:.6f} | "
              f"{align['quantizers_isolated'][k]['identical']:.6f} |"
              for k, v in align["quantizers"].items()]
    lines += ["", f"logits: max |mxnet - onnxruntime| = {align['outputs'][0]['max_abs_diff']:.3g}, "
              f"cosine {align['outputs'][0]['cosine']:.9f}", "",
              f"files: {ex.onnx.name}, {ex.cache.name} (TensorRT calibration cache), "
              f"{ex.ranges_json.name}, qat_int8-symbol.json/-0000.params, graph-*.svg/png"]
    atomic_write_text(args.out / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\noutputs in {args.out}/ ({summary['seconds']} s)")
    return 0 if align["isolated_identical_min"] == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
