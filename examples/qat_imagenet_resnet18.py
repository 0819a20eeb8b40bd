"""QAT recipe: ImageNet ResNet-18 (gluoncv ``resnet18_v1``) to TensorRT-aligned INT8.

float checkpoint -> ``quantize_block`` with the policy (``trt_int8``: per-channel weights,
per-tensor EMA activation ranges) -> fine-tuning with SGD + momentum and the SineScheduler
(peak lr = half the float recipe's: 0.1 per 256 images -> 0.05 per 256), BatchNorm
statistics frozen after ``--freeze-bn-after`` steps -> export (MXNet symbol + params, ONNX
QDQ, TensorRT calibration cache, ranges) and ``summary.json`` in ``--out``.

Data: an ImageNet-style folder, ``<data>/train/<class>/*.JPEG`` and
``<data>/val/<class>/*.JPEG`` (class folders sorted by name give the labels: the standard
``n01440764 ...`` synset folders match the pretrained 1000-class head).  Nothing can be
downloaded here: pass the gluoncv pretrained weights file with ``--params`` (e.g.
``~/.mxnet/models/resnet18_v1-a0666292.params``), or ``--random-init`` for smoke runs.
The exported ONNX model is run in onnxruntime on one validation image against MXNet.

Training resumes from ``--checkpoint-dir`` when it holds a checkpoint (same images in the
same order; random crops and flips drawn afresh), and a run resumed past the BN-freeze step
resumes with frozen statistics.  CPU only (the operator library has no GPU kernels yet).

    python examples/qat_imagenet_resnet18.py --data /data/imagenet \\
        --params ~/.mxnet/models/resnet18_v1-a0666292.params --epochs 3 --batch-size 256
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
from mxnet import gluon  # noqa: E402
from mxnet.gluon.data.vision import ImageFolderDataset, transforms  # noqa: E402

from quant_ops.errors import QuantOpsError  # noqa: E402
from quant_ops.export import export_model  # noqa: E402
from quant_ops.export.align import check_alignment  # noqa: E402
from quant_ops.fileio import atomic_write_text  # noqa: E402
from quant_ops.graph.ir import load_graph  # noqa: E402
from quant_ops.graph.params import load_params  # noqa: E402
from quant_ops.policy import QuantPolicy  # noqa: E402
from quant_ops.prepare import as_policy, quantize_block  # noqa: E402
from quant_ops.train import FitConfig, evaluate, fit  # noqa: E402
from quant_ops.train.data import IndexBatchSampler  # noqa: E402
from quant_ops.zoo import get_model  # noqa: E402

log = logging.getLogger("qat_imagenet_resnet18")

MODEL = "resnet18_v1"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FLOAT_LR_PER_256 = 0.1       # the float ImageNet ResNet recipe
IMAGENET_CLASSES = 1000


class UsageError(Exception):
    """Bad input from the command line: one line on stderr, exit code 2."""


def default_lr(batch_size: int) -> float:
    """Half the float recipe's learning rate, scaled linearly with the batch size."""
    return FLOAT_LR_PER_256 / 2 * batch_size / 256


def image_folder(root: Path, split: str) -> ImageFolderDataset:
    path = root / split
    if not path.is_dir():
        raise UsageError(f"no {split} folder: {path} does not exist (expected "
                         f"{root}/{split}/<class>/*.JPEG)")
    with warnings.catch_warnings():   # stray files are skipped; say nothing per file
        warnings.simplefilter("ignore")
        ds = ImageFolderDataset(str(path), flag=1)
    if not ds.synsets:
        raise UsageError(f"no class folders in {path} (expected {path}/<class>/*.JPEG)")
    if len(ds) == 0:
        raise UsageError(f"no images (.jpg, .jpeg, .png) in the class folders of {path}")
    return ds


def transforms_for(size: int):
    """(train, val) transforms: the standard ImageNet ones at ``size`` (224 normally)."""
    normalize = transforms.Normalize(MEAN, STD)
    train = transforms.Compose([transforms.RandomResizedCrop(size),
                                transforms.RandomFlipLeftRight(), transforms.ToTensor(),
                                normalize])
    val = transforms.Compose([transforms.Resize(int(round(size / 0.875)), keep_ratio=True),
                              transforms.CenterCrop(size), transforms.ToTensor(), normalize])
    return train, val


def val_loader(ds, batch_size: int, limit: int | None, workers: int, seed: int):
    """(loader, images): all of ``ds`` in order, or ``limit`` batches of a fixed random
    subset of it."""
    n = len(ds)
    idx = (np.arange(n) if not limit else
           np.sort(np.random.default_rng(seed).permutation(n)[:limit * batch_size]))
    batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    return gluon.data.DataLoader(ds, batch_sampler=IndexBatchSampler(batches),
                                 num_workers=workers), len(idx)


def load_policy(spec: str) -> QuantPolicy:
    p = Path(spec)
    if p.suffix in (".json", ".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise UsageError(f"policy file {p} does not exist")
        return QuantPolicy.load(p)
    return as_policy(spec)


def float_model(args, classes: int) -> gluon.HybridBlock:
    if args.params is None and not args.random_init:
        raise UsageError("no float weights: pass --params <gluoncv resnet18_v1 .params file> "
                         "(nothing can be downloaded here), or --random-init for a smoke run")
    if args.params is not None and not args.params.is_file():
        raise UsageError(f"float weights {args.params} do not exist (nothing can be "
                         "downloaded here: copy gluoncv's resnet18_v1-*.params file, or pass "
                         "--random-init for a smoke run)")
    if args.params is not None and classes != IMAGENET_CLASSES:
        raise UsageError(f"{args.data}/train has {classes} class folders; the pretrained "
                         f"{MODEL} head has {IMAGENET_CLASSES}")
    net = get_model(MODEL, classes=classes)
    if args.params is not None:
        try:
            net.load_parameters(str(args.params), ctx=mx.cpu())
        except (mx.base.MXNetError, AssertionError, ValueError, KeyError) as e:
            raise UsageError(f"{args.params}: not {MODEL} weights "
                             f"({str(e).strip().splitlines()[0]})") from None
        log.info("float weights: %s", args.params)
    else:
        net.initialize(mx.init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2))
        log.info("float weights: random (--random-init): accuracy numbers mean nothing")
    return net


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True,
                    help="ImageNet-style folder with train/<class>/ and val/<class>/")
    ap.add_argument("--params", type=Path, help="float weights (gluoncv resnet18_v1 .params)")
    ap.add_argument("--random-init", action="store_true",
                    help="random float weights (smoke runs; no --params needed)")
    ap.add_argument("--preset", default="trt_int8", help="policy preset name or policy file")
    ap.add_argument("--fold-bn", choices=("none", "qat"), default="none",
                    help="'qat': fold BN into the convs in-graph (statistics frozen from the "
                         "start); 'none': keep BN and freeze it after --freeze-bn-after")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=None,
                    help="peak lr of the SineScheduler (default: 0.05 * batch/256)")
    ap.add_argument("--wd", type=float, default=1e-4)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--freeze-bn-after", type=int, default=None, metavar="STEPS",
                    help="freeze BN statistics from this global step on (default: after "
                         "the first epoch; -1: never)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                    help="DataLoader worker processes")
    ap.add_argument("--limit", type=int, default=None, metavar="STEPS",
                    help="at most STEPS training steps per epoch and STEPS validation batches")
    ap.add_argument("--checkpoint-dir", type=Path, default=None,
                    help="where checkpoints go and resume from (default: <out>/checkpoint)")
    ap.add_argument("--checkpoint-every", type=int, default=500, metavar="STEPS")
    ap.add_argument("--out", type=Path, default=Path("out/qat_imagenet_resnet18"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        for name in ("epochs", "batch_size", "image_size", "checkpoint_every"):
            if getattr(args, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
        if args.limit is not None and args.limit < 1:
            raise UsageError("--limit must be >= 1")
        if not args.data.is_dir():
            raise UsageError(f"data folder {args.data} does not exist")
        train_ds, val_ds = image_folder(args.data, "train"), image_folder(args.data, "val")
        if val_ds.synsets != train_ds.synsets:
            raise UsageError(f"{args.data}: the class folders of train "
                             f"({len(train_ds.synsets)}) and val ({len(val_ds.synsets)}) differ")
        policy = load_policy(args.preset)
        net = float_model(args, len(train_ds.synsets))
    except (UsageError, QuantOpsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run(args, net, policy, train_ds, val_ds)


def run(args, net, policy, train_ds, val_ds) -> int:
    t0 = time.time()
    random.seed(args.seed)
    np.random.seed(args.seed)
    mx.random.seed(args.seed)
    size, bs = args.image_size, args.batch_size
    lr = args.lr if args.lr is not None else default_lr(bs)
    t_train, t_val = transforms_for(size)
    train = train_ds.transform_first(t_train)
    val, n_val = val_loader(val_ds.transform_first(t_val), bs, args.limit, args.workers,
                            args.seed)
    steps_per_epoch = -(-len(train_ds) // bs)
    if args.limit:
        steps_per_epoch = min(steps_per_epoch, args.limit)
    freeze = args.freeze_bn_after
    freeze = steps_per_epoch if freeze is None else (None if freeze < 0 else freeze)
    if args.fold_bn == "qat":
        freeze = None   # no BatchNorm left: the folded statistics are frozen from the start
    bn = ("folded (fold_bn=qat)" if args.fold_bn == "qat" else
          f"frozen after step {freeze}" if freeze is not None else "never frozen")
    log.info("%d training images, %d validation images, %d classes; %d steps/epoch, "
             "batch %d, peak lr %g, BN %s", len(train_ds), n_val, len(train_ds.synsets),
             steps_per_epoch, bs, lr, bn)

    summary = {"model": MODEL, "preset": args.preset, "fold_bn": args.fold_bn,
               "image_size": size, "batch_size": bs, "lr": lr, "epochs": args.epochs,
               "random_init": args.params is None}
    if args.params is not None:
        net.hybridize(static_alloc=True)
        summary["float_accuracy"] = evaluate(net, val, progress=not args.no_progress)
        log.info("float top-1: %.2f%%", summary["float_accuracy"])
    try:   # a policy file that names layers this net lacks fails here
        qnet = quantize_block(net, policy, sample=mx.nd.zeros((1, 3, size, size)),
                              fold_bn=None if args.fold_bn == "none" else args.fold_bn)
    except QuantOpsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    qnet.hybridize(static_alloc=True)
    log.info("%d quantizers inserted (%s)", len(qnet.quant_table), args.preset)

    ckpt = args.checkpoint_dir or args.out / "checkpoint"
    cfg = FitConfig(epochs=args.epochs, lr=lr, batch_size=bs, momentum=args.momentum,
                    wd=args.wd, schedule="sine", seed=args.seed, checkpoint_dir=str(ckpt),
                    checkpoint_every=args.checkpoint_every, progress=not args.no_progress,
                    freeze_bn_after=freeze, max_steps_per_epoch=args.limit,
                    num_workers=args.workers)
    progress = fit(qnet, train, val, cfg)
    hist = progress["history"]
    summary.update(steps=progress["step"], history=hist,
                   bn_frozen_at=progress.get("bn_frozen_at"),
                   final_loss=hist[-1]["loss"] if hist else progress.get("last_loss"),
                   int8_accuracy=hist[-1].get("val_accuracy") if hist else None,
                   checkpoint=str(ckpt))
    log.info("INT8 (QAT) top-1: %.2f%% after %d steps", summary["int8_accuracy"],
             progress["step"])

    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{MODEL}_int8"
    qnet.export(str(args.out / name), epoch=0)
    try:
        ex = export_model(load_graph(args.out / f"{name}-symbol.json"),
                          load_params(args.out / f"{name}-0000.params"), args.out, name,
                          {"data": (1, 3, size, size)})
        # the exported model against MXNet's deployment graph on one validation image
        x0 = next(iter(val))[0][:1].asnumpy()
        align = check_alignment(ex.onnx, ex.graph, ex.params, {"data": x0})
    except QuantOpsError as e:
        print(f"error: export failed: {e}", file=sys.stderr)
        return 1
    summary["onnxruntime"] = {"cosine": align["outputs"][0]["cosine"],
                              "max_abs_diff": align["outputs"][0]["max_abs_diff"],
                              "int8_codes_identical_min": align["isolated_identical_min"]}
    log.info("onnxruntime vs MXNet on one image: logits cosine %.6f, int8 codes identical "
             "(each quantizer on onnxruntime's own input) %.4f",
             summary["onnxruntime"]["cosine"], align["isolated_identical_min"])
    summary["files"] = sorted(p.name for p in (
        args.out / f"{name}-symbol.json", args.out / f"{name}-0000.params", ex.onnx, ex.cache,
        ex.ranges_json))
    summary["seconds"] = round(time.time() - t0, 1)
    atomic_write_text(args.out / "summary.json", json.dumps(summary, indent=1))
    log.info("outputs in %s: %s", args.out, ", ".join(summary["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
