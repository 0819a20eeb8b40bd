"""``utils/qat_train.py``: QAT fine-tuning, float model -> policy -> fit -> params.

Runs alone (``--kvstore local|device``) or as one worker of a ``dist_sync`` /
``dist_device_sync`` job started by ``python -m quant_ops.cli.launch`` (or MXNet's ssh/mpi
launch modes on several machines, which set the same ``DMLC_*`` variables).

``run(args, models=..., on_step=...)`` takes more models and a per-step hook, for tests.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Mapping

from ..errors import QuantOpsError
from .common import BUNDLED_MODELS, bundled_model, error

#: a model loader: () -> (float Gluon block, (input mean, std), the float training lr)
ModelLoader = Callable[[], tuple]


def load_bundled(name: str) -> tuple:
    """A bundled float checkpoint as (SymbolBlock, (mean, std), float lr)."""
    from mxnet import gluon

    from ..ptq.common import read_model_info

    prefix = bundled_model(name)
    info = read_model_info(prefix)
    if "lr" not in info:
        raise QuantOpsError(f"{prefix}.json: has no \"lr\" (the float training lr)")
    net = gluon.SymbolBlock.imports(f"{prefix}-symbol.json", ["data"], f"{prefix}-0000.params")
    return net, (info["normalize"]["mean"], info["normalize"]["std"]), info["lr"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="QAT fine-tuning: float model -> policy -> fit "
                                             "-> params.")
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
    return ap


def run(args: argparse.Namespace, models: Mapping[str, ModelLoader] | None = None,
        on_step: Callable[[int, int], None] | None = None) -> int:
    """Fine-tune ``args.model`` (a bundled model, or one of ``models``); ``on_step(step,
    rank)`` is called after every optimizer step.  Writes the trained model
    (``rank<r>/final-symbol.json`` + ``final-0000.params``) and
    ``rank<r>/result.json`` under ``args.out``; exit code 2 when the model or the data
    cannot be loaded."""
    import mxnet as mx

    from ..datasets import fashion_mnist
    from ..fileio import atomic_write_text
    from ..model import QuantizedModel
    from ..ops import set_training
    from ..train.loop import FitConfig, fit

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    loaders = {**{n: (lambda n=n: load_bundled(n)) for n in BUNDLED_MODELS}, **(models or {})}
    try:
        if args.model not in loaders:
            raise QuantOpsError(f"unknown model {args.model!r}: use one of "
                                f"{', '.join(loaders)}")
        net, (mean, std), float_lr = loaders[args.model]()
        xtr, ytr = fashion_mnist("train")
        xte, yte = fashion_mnist("test")
    except (QuantOpsError, OSError) as e:
        return error(e)
    if args.train_limit:
        xtr, ytr = xtr[:args.train_limit], ytr[:args.train_limit]
    if args.test_limit:
        xte, yte = xte[:args.test_limit], yte[:args.test_limit]
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    mx.random.seed(args.seed)
    model = QuantizedModel.from_gluon(net, mx.nd.array(xtr[:1]), name=args.model)
    model.quantize(args.preset, fold_bn=args.fold_bn)
    if args.calib_images:
        model.calibrate(xtr[:args.calib_images], "mse", batch_size=128, progress=False)
    q = model.to_block()
    q.hybridize(static_alloc=True)
    kv_rank = int(os.environ.get("DMLC_WORKER_ID", "0")) if "dist" in args.kvstore else 0
    lr = args.lr if args.lr is not None else float_lr / 2
    cfg = FitConfig(epochs=args.epochs, lr=lr, batch_size=args.batch_size, seed=args.seed,
                    freeze_bn_after=args.freeze_bn_after,
                    checkpoint_dir=str(args.out / "checkpoint"),
                    checkpoint_every=args.checkpoint_every, kvstore=args.kvstore,
                    progress=False)
    if on_step is not None:
        cfg.extra["on_step"] = on_step
    progress = fit(q, (xtr, ytr), None, cfg)
    set_training(q, False)
    model.from_block(q)
    rank = progress.get("rank", kv_rank)
    acc = model.evaluate(xte, yte)
    out = args.out / f"rank{rank}"
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "final")        # final-symbol.json + final-0000.params
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


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))
