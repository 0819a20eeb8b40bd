"""QAT fine-tuning entry (``utils/qat_train.py``): float model -> policy -> fit -> params.

Runs alone (``--kvstore local|device``) or as one worker of a ``dist_sync`` /
``dist_device_sync`` job started by ``quant_ops.train.launch`` (or MXNet's ssh/mpi launch
modes on several machines, which set the same ``DMLC_*`` variables).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet import gluon
from mxnet.gluon import nn

from ..datasets import fashion_mnist
from ..errors import QuantOpsError
from ..fileio import atomic_write_text
from ..prepare import quantize_block
from .loop import FitConfig, evaluate, fit

ROOT = Path(__file__).resolve().parents[2]
FLOAT_MODEL = ROOT / "examples" / "models" / "fmnist_resnet20"


def _tiny() -> gluon.HybridBlock:
    mx.random.seed(0)
    net = nn.HybridSequential(prefix="tiny_")
    with net.name_scope():
        net.add(nn.Conv2D(8, 3, padding=1, activation="relu"), nn.MaxPool2D(2),
                nn.Flatten(), nn.Dense(10))
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1, 1, 28, 28)))
    return net


MODELS = ("fmnist_resnet20", "fmnist_mobilenetv2", "tiny")
TINY_LR = 0.1   # what the tiny test model would have been trained with


def load_model(name: str):
    """(float block, input normalization, float training lr) for a model name."""
    if name == "tiny":  # for tests: a small CNN from a fixed seed
        return _tiny(), (0.0, 1.0), TINY_LR
    if name in MODELS:
        prefix = FLOAT_MODEL.parent / name
        info = json.loads(prefix.with_suffix(".json").read_text())
        net = gluon.SymbolBlock.imports(f"{prefix}-symbol.json", ["data"],
                                        f"{prefix}-0000.params")
        return net, (info["normalize"]["mean"], info["normalize"]["std"]), info["lr"]
    raise QuantOpsError(f"unknown model {name!r}: use one of {', '.join(MODELS)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kvstore", default="device",
                    choices=("local", "device", "dist_sync", "dist_device_sync"))
    ap.add_argument("--model", default="fmnist_resnet20")
    ap.add_argument("--preset", default="trt_int8")
    ap.add_argument("--fold-bn", choices=("qat",), default=None)
    ap.add_argument("--epochs", type=int, default=2, help="seed recipe: 2")
    ap.add_argument("--lr", type=float, default=None,
                    help="peak lr (default, the seed recipe: the float model's lr / 2)")
    ap.add_argument("--calib-images", type=int, default=0,
                    help="start from ranges calibrated (MSE) on this many training images")
    ap.add_argument("--freeze-bn-after", type=int, default=None,
                    help="freeze BatchNorm statistics after this many steps")
    ap.add_argument("--batch-size", type=int, default=64, help="per worker")
    ap.add_argument("--train-limit", type=int, default=0)
    ap.add_argument("--test-limit", type=int, default=0)
    ap.add_argument("--checkpoint-every", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--fail-at-step", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--fail-rank", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        net, (mean, std), float_lr = load_model(args.model)
        xtr, ytr = fashion_mnist("train")
        xte, yte = fashion_mnist("test")
    except (QuantOpsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.train_limit:
        xtr, ytr = xtr[:args.train_limit], ytr[:args.train_limit]
    if args.test_limit:
        xte, yte = xte[:args.test_limit], yte[:args.test_limit]
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    mx.random.seed(args.seed)
    calib = ([xtr[i:i + 128] for i in range(0, args.calib_images, 128)]
             if args.calib_images else None)
    q = quantize_block(net, args.preset, fold_bn=args.fold_bn, calib_data=calib)
    q.hybridize(static_alloc=True)
    kv_rank = int(os.environ.get("DMLC_WORKER_ID", "0")) if "dist" in args.kvstore else 0
    lr = args.lr if args.lr is not None else float_lr / 2
    cfg = FitConfig(epochs=args.epochs, lr=lr, batch_size=args.batch_size, seed=args.seed,
                    freeze_bn_after=args.freeze_bn_after,
                    checkpoint_dir=str(args.out / "checkpoint"),
                    checkpoint_every=args.checkpoint_every, kvstore=args.kvstore,
                    progress=False)
    if args.fail_at_step is not None:
        cfg.extra["on_step"] = (lambda step, rank: os.kill(os.getpid(), signal.SIGKILL)
                                if rank == args.fail_rank and step == args.fail_at_step
                                else None)
    progress = fit(q, (xtr, ytr), None, cfg)
    rank = progress.get("rank", kv_rank)
    acc = evaluate(q, xte, yte)
    out = args.out / f"rank{rank}"
    out.mkdir(parents=True, exist_ok=True)
    q.save_parameters(str(out / "final.params"))
    atomic_write_text(out / "result.json", json.dumps(
        {"rank": rank, "accuracy": acc, "steps": progress["step"], "kvstore": args.kvstore,
         "history": progress["history"]}, indent=1))
    print(f"rank {rank}: accuracy {acc:.2f}% after {progress['step']} steps", flush=True)
    if "dist" in args.kvstore:
        # MXNet 1.9.1's kvstore teardown can hang or crash the server once the work is
        # done (seen with convolutional nets): results are written, leave without it
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
