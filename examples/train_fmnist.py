"""Train the project's float models on Fashion-MNIST (the models PTQ/QAT recipes start
from) and save them as examples/models/fmnist_<arch>-{symbol.json,0000.params} + .json.

    python examples/train_fmnist.py --arch resnet20      # 6 epochs, lr 0.2 (93.50%)
    python examples/train_fmnist.py --arch mobilenetv2 --epochs 4 --lr 0.1

Architectures are in ``examples/fmnist_models.py``; the 1x28x28 images go in as they are.
Recipe: SGD with momentum and the SineScheduler over all steps.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402

import quant_ops  # noqa: E402,F401
from quant_ops.datasets import fashion_mnist  # noqa: E402
from quant_ops.fileio import atomic_write_text  # noqa: E402
from quant_ops.train import FitConfig, evaluate, fit  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fmnist_models import build  # noqa: E402

MODELS = Path(__file__).resolve().parent / "models"
DESCRIPTION = {"resnet20": "cifar_resnet20_v1 (gluoncv) on Fashion-MNIST 1x28x28",
               "mobilenetv2": "MobileNetV2Small (examples/fmnist_models.py, ReLU6) on "
                              "Fashion-MNIST 1x28x28"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet20", choices=["resnet20", "mobilenetv2"])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--out", type=Path, default=MODELS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    mx.random.seed(args.seed)
    np.random.seed(args.seed)
    xtr, ytr = fashion_mnist("train")
    xte, yte = fashion_mnist("test")
    mean, std = float(xtr.mean()), float(xtr.std())
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    net = build(args.arch)
    net.initialize(mx.init.Xavier(magnitude=2))
    net.hybridize(static_alloc=True)
    t = time.time()
    prog = fit(net, (xtr, ytr), (xte, yte),
               FitConfig(epochs=args.epochs, lr=args.lr, batch_size=128, wd=1e-4,
                         seed=args.seed))
    acc = evaluate(net, xte, yte)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"fmnist_{args.arch}"
    net.export(str(args.out / name), epoch=0)
    atomic_write_text(args.out / f"{name}.json", json.dumps({
        "model": DESCRIPTION[args.arch],
        "normalize": {"mean": mean, "std": std}, "test_accuracy": acc,
        "epochs": args.epochs, "lr": args.lr, "history": prog["history"],
        "train_seconds": round(time.time() - t, 1), "script": f"examples/train_fmnist.py --arch {args.arch}",
    }, indent=1))
    print(f"test accuracy {acc:.2f}% -> {args.out}/{name}-*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
