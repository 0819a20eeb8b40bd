"""QAT results table on Fashion-MNIST: the project's float ResNet-20 fine-tuned with each
method at W/A 8/8, 4/4, 3/3, 2/2 and W3A4, plus the train-step time of the quantized net
against the float net (W8A8 per-channel, hybridized, ratio in one run).

Writes ``docs/results.md`` (the QAT section) and ``bench/results/qat_table.json``.

    python bench/qat_table.py [--epochs 2] [--configs int8:8/8,lsq+pact:4/4] [--train-limit N]

Recipe (the seed toolkit's default): start from the float checkpoint, BatchNorm folded for
QAT, learning rate = float lr / 2 under the SineScheduler, ``--epochs`` epochs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
from mxnet import autograd, gluon  # noqa: E402

import quant_ops  # noqa: E402,F401
from quant_ops.datasets import fashion_mnist  # noqa: E402
from quant_ops.fileio import atomic_write_text  # noqa: E402
from quant_ops.prepare import quantize_block  # noqa: E402
from quant_ops.train import FitConfig, evaluate, fit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "models" / "fmnist_resnet20"
# name -> (weight method, activation method)
METHODS = {"int8": ("int8", "int8"), "lsq": ("lsq", "lsq"), "lsq+pact": ("lsq", "pact"),
           "dorefa+pact": ("dorefa", "pact"), "dorefa": ("dorefa", "dorefa")}
BITS = ["8/8", "4/4", "3/3", "2/2", "3/4"]


def load_float():
    info = json.loads((MODEL.parent / "fmnist_resnet20.json").read_text())
    net = gluon.SymbolBlock.imports(str(MODEL) + "-symbol.json", ["data"],
                                    str(MODEL) + "-0000.params")
    return net, info


def policy(name: str, bits: str) -> dict:
    w, a = METHODS[name]
    wb, ab = (int(b) for b in bits.split("/"))
    return {"weight": {"method": w, "bits": wb, "per_channel": w in ("int8", "lsq")},
            "activation": {"method": a, "bits": ab}}


def step_time(net, x, y, steps=20) -> float:
    """Median seconds of one SGD step (forward, backward, update) on a fixed batch."""
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 1e-4})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    xb, yb = mx.nd.array(x), mx.nd.array(y)
    times = []
    for i in range(steps + 3):
        t = time.perf_counter()
        with autograd.record():
            loss = loss_fn(net(xb), yb)
        loss.backward()
        trainer.step(len(x))
        mx.nd.waitall()
        if i >= 3:
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--configs", help="comma list of method:W/A (default: all)")
    ap.add_argument("--train-limit", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "qat_table.json")
    args = ap.parse_args(argv)
    float_net, info = load_float()
    mean, std = info["normalize"]["mean"], info["normalize"]["std"]
    xtr, ytr = fashion_mnist("train")
    xte, yte = fashion_mnist("test")
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    if args.train_limit:
        xtr, ytr = xtr[:args.train_limit], ytr[:args.train_limit]
    acc_float = evaluate(float_net, xte, yte)
    configs = ([c.split(":") for c in args.configs.split(",")] if args.configs else
               [(m, b) for m in METHODS for b in BITS])
    rows = []
    for name, bits in configs:
        net, _ = load_float()
        q = quantize_block(net, policy(name, bits), fold_bn="qat")
        if METHODS[name][1] == "int8":  # observe the int8 activation ranges first
            calibrate_into(q, xtr[:512])
        q.hybridize(static_alloc=True)
        t = time.time()
        fit(q, (xtr, ytr), None, FitConfig(epochs=args.epochs, lr=info["lr"] / 2,
                                           batch_size=128, seed=0))
        acc = evaluate(q, xte, yte)
        rows.append({"method": name, "bits": bits, "accuracy": acc,
                     "delta": acc - acc_float, "minutes": round((time.time() - t) / 60, 1)})
        print(json.dumps(rows[-1]), flush=True)
    # train-step time, W8A8 per-channel against float, hybridized, same batch
    fnet, _ = load_float()
    fnet.hybridize(static_alloc=True)
    qnet = quantize_block(load_float()[0], policy("int8", "8/8"), fold_bn="qat")
    qnet.hybridize(static_alloc=True)
    xb, yb = xtr[:128], ytr[:128]
    t_float, t_q = step_time(fnet, xb, yb), step_time(qnet, xb, yb)
    lines = ["## QAT on Fashion-MNIST (ResNet-20, test set of 10,000 images)", "",
             f"Float: {acc_float:.2f}%. Fine-tuned {args.epochs} epoch(s) from the float "
             "checkpoint, BN folded, lr = float lr / 2 with the SineScheduler.", "",
             "| method (W+A) | W/A bits | accuracy (%) | vs float (points) |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['bits']} | {r['accuracy']:.2f} | {r['delta']:+.2f} |"
              for r in rows]
    lines += ["", f"Train step (batch 128, hybridized): float {t_float * 1e3:.1f} ms, W8A8 "
              f"per-channel {t_q * 1e3:.1f} ms, ratio {t_q / t_float:.2f}x.", "",
              "Regenerate: `python bench/qat_table.py`."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.json, json.dumps({"float_accuracy": acc_float, "rows": rows,
                                             "step_ms": {"float": t_float * 1e3,
                                                         "w8a8": t_q * 1e3}}, indent=1))
    print("\n".join(lines))
    return 0


def calibrate_into(block, x) -> None:
    """Observe int8 activation ranges on a few batches (training mode, no update)."""
    with autograd.record():
        for i in range(0, len(x), 128):
            block(mx.nd.array(x[i:i + 128]))
    mx.nd.waitall()


if __name__ == "__main__":
    sys.exit(main())
