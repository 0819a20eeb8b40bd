"""``utils/qat_train.py``: QAT fine-tuning of any float model with any policy.

float model (bundled, a checkpoint prefix, ``--symbol/--params``, or a gluoncv name) ->
policy (a preset or a file) -> calibrated starting ranges -> fit -> the trained quantized
model, ``result.json``, ``metrics.csv`` and ``curves.png``.  With no tuning flags the run
follows ``quant_ops.train.recipe.default_recipe``: the defaults are the recipe.

Runs alone (``--kvstore local|device``) or as one worker of a ``dist_sync`` /
``dist_device_sync`` job started by ``python -m quant_ops.cli.launch`` (or MXNet's ssh/mpi
launch modes on several machines, which set the same ``DMLC_*`` variables).

``run(args, models=..., on_step=...)`` takes more models and a per-step hook, for tests.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Mapping

from ..errors import QuantOpsError
from .common import BUNDLED_MODELS, error, no_overwrite, stoppable
from .model_data import (DATA_HELP, add_model_args, check_fits, load_policy,
                         model_source)

#: a model loader: () -> (float Gluon block, (input mean, std), the float training lr)
ModelLoader = Callable[[], tuple]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="QAT fine-tuning: float model -> policy -> calibrated ranges -> fit -> "
                    "the quantized model, result.json, metrics.csv, curves.png.  Without "
                    "tuning flags the recipe is the default one (quant_ops/train/recipe.py).")
    add_model_args(ap, "fmnist_resnet20")
    ap.add_argument("--policy", "--preset", dest="policy", default="trt_int8",
                    help="a preset name or a policy file (.yaml/.json); default trt_int8")
    d = ap.add_argument_group("data")
    d.add_argument("--data", help=f"training data: {DATA_HELP}; a folder with train/ and "
                                  "val/ (ImageNet layout) gives both sets (default: fmnist "
                                  "for Fashion-MNIST models)")
    d.add_argument("--test", help="evaluation data with labels (default: --data's val/ or "
                                  "fmnist:test)")
    d.add_argument("--train-limit", type=int, default=0, help="at most this many training "
                                                              "images (0: all)")
    d.add_argument("--test-limit", type=int, default=0, help="at most this many test images")
    r = ap.add_argument_group("recipe (defaults: quant_ops/train/recipe.py)")
    r.add_argument("--float-lr", type=float,
                   help="the lr the float model was trained with (default: PREFIX.json's, "
                        "else 0.1); the recipe's lr derives from it")
    r.add_argument("--lr", type=float, help="peak lr (default: the recipe's)")
    r.add_argument("--epochs", type=int, help="default: the recipe's (1)")
    r.add_argument("--calib-images", type=int,
                   help="images the starting ranges are calibrated on (0: none; default 512)")
    r.add_argument("--calib-method", help="auto, entropy, minmax, percentile or mse "
                                          "(default: auto)")
    r.add_argument("--fold-bn", choices=("auto", "qat", "none"), default="auto",
                   help="auto (default): folded with frozen statistics where the weight "
                        "methods keep the weight scale")
    r.add_argument("--freeze-bn-after", type=int, default=None,
                   help="freeze BatchNorm statistics after N steps (BN not folded)")
    r.add_argument("--batch-size", type=int, help="per worker (default: the recipe's, 128)")
    r.add_argument("--progressive", type=_widths, metavar="BITS",
                   help="lower the widths in stages, e.g. 8,4,3,2: each stage is the recipe "
                        "at max(stage, policy) bits per role, calibrated again, starting from "
                        "the weights the stage before trained (off by default; the budget is "
                        "the recipe's epochs per stage)")
    ap.add_argument("--kvstore", default="device",
                    help="local | device | dist_sync | dist_device_sync")
    ap.add_argument("--checkpoint-every", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--out", type=Path, required=True)
    return ap


def _widths(text: str) -> tuple:
    """argparse type of ``--progressive``: ``8,4,3,2`` -> (8, 4, 3, 2)."""
    try:
        bits = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of bit widths: {text!r} (e.g. 8,4,3,2)")
    if not bits or any(not 2 <= b <= 16 for b in bits):
        raise argparse.ArgumentTypeError(f"bit widths must be within 2..16, got {text!r}")
    return bits


def _check_numbers(args: argparse.Namespace) -> None:
    from ..train.loop import KVSTORES

    for flag, v, low in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1),
                         ("--calib-images", args.calib_images, 0),
                         ("--train-limit", args.train_limit, 0),
                         ("--test-limit", args.test_limit, 0),
                         ("--checkpoint-every", args.checkpoint_every, 1),
                         ("--freeze-bn-after", args.freeze_bn_after, 0)):
        if v is not None and v < low:
            raise QuantOpsError(f"{flag} must be >= {low}, got {v}")
    if args.progressive and "dist" in args.kvstore:
        raise QuantOpsError("--progressive runs its stages in one process: use --kvstore "
                            "local or device")
    if not 0 <= args.seed < 2 ** 32:
        raise QuantOpsError(f"--seed must be in 0..{2 ** 32 - 1}, got {args.seed}")
    if args.kvstore not in KVSTORES:
        raise QuantOpsError(f"--kvstore {args.kvstore!r}: use one of {', '.join(KVSTORES)}")
    for flag, v in (("--lr", args.lr), ("--float-lr", args.float_lr)):
        if v is not None and not (v > 0 and v < float("inf")):
            raise QuantOpsError(f"{flag} must be a number > 0, got {v}")


def _load_model(args, models: Mapping[str, ModelLoader]):
    """(float QuantizedModel, normalization, float lr or None, name, Fashion-MNIST model)."""
    import mxnet as mx

    from ..model import QuantizedModel

    if args.model in models:      # test models: a Gluon block
        net, norm, float_lr = models[args.model]()
        return QuantizedModel.from_gluon(net, mx.nd.zeros((1, 1, 28, 28)), name=args.model), \
            norm, float_lr, args.model, True
    if args.model is not None and args.symbol is None and args.model not in BUNDLED_MODELS \
            and "/" not in args.model and not Path(f"{args.model}-symbol.json").exists():
        # neither bundled nor a checkpoint prefix: a gluoncv architecture (random weights)
        if args.input_shape is None:
            raise QuantOpsError(f"unknown model {args.model!r}: not bundled "
                                f"({', '.join(BUNDLED_MODELS)}), no checkpoint "
                                f"{args.model}-symbol.json; a gluoncv name needs "
                                "--input-shape")
        m = QuantizedModel.from_zoo(args.model, args.input_shape)
        norm = None if args.mean is None else (args.mean, args.std)
        return m, norm, None, args.model, False
    src = model_source(args, "fmnist_resnet20")
    args.input_files = [src.symbol, src.params]
    m = src.load()
    float_lr = src.info.get("lr") if src.info else None
    return m, src.normalize, float_lr, src.name, src.fmnist


def _data_specs(args, fmnist: bool) -> tuple[str, str]:
    from ..datasets import BUNDLED_SETS

    train, test = args.data, args.test
    if train is not None and Path(train).is_dir() and (Path(train) / "train").is_dir():
        root = Path(train)
        train = str(root / "train")
        if test is None:
            test = next((str(root / s) for s in ("val", "test") if (root / s).is_dir()), None)
    if train is None:
        if not fmnist:
            raise QuantOpsError(f"the model's training data is unknown: pass --data "
                                f"({DATA_HELP})")
        train = "fmnist:train"
    if train not in BUNDLED_SETS and not Path(train).exists():
        raise QuantOpsError(f"{train}: no such file or folder (--data: {DATA_HELP})")
    if test is None:
        if train not in ("fmnist", "fmnist:train"):
            raise QuantOpsError("no evaluation data: pass --test (or --data DIR with "
                                "train/ and val/)")
        test = "fmnist:test"
    return train, test


def _load_sets(args, model, norm, fmnist: bool, progress: bool):
    from ..datasets import align_classes, load_data

    train_spec, test_spec = _data_specs(args, fmnist)
    shape = args.input_shape or model.input_shape
    train = load_data(train_spec, shape, split="train", normalize=norm,
                      limit=args.train_limit or None, progress=progress)
    test = load_data(test_spec, shape, split="test", normalize=norm,
                     limit=args.test_limit or None, progress=progress)
    for d in (train, test):
        if d.y is None:
            raise QuantOpsError(f"{d.source}: no labels (an .npz with 'y' or 'label', or "
                                "an image folder with class subfolders)")
    test = align_classes(train, test)
    for d in (train, test):
        check_fits(model, d, labels=True)
    return train, test


def recipe_for(args, policy, float_lr):
    """The default recipe with the user's explicit choices over it."""
    from dataclasses import replace

    from ..train.recipe import default_recipe

    rec = default_recipe(policy, args.float_lr or float_lr)
    over = {k: v for k, v in (("lr", args.lr), ("epochs", args.epochs),
                              ("calib_images", args.calib_images),
                              ("calib_method", args.calib_method),
                              ("batch_size", args.batch_size)) if v is not None}
    if args.fold_bn != "auto":
        over["fold_bn"] = None if args.fold_bn == "none" else args.fold_bn
    return replace(rec, **over)


#: what a run writes into ``--out/rank<r>/``
OUTPUTS = ("final-symbol.json", "final-0000.params", "result.json", "metrics.csv",
           "curves.png")


def _env_rank(args) -> int:
    return int(os.environ.get("DMLC_WORKER_ID", "0")) if "dist" in args.kvstore else 0


def _digest(arrays) -> str:
    """SHA-256 over named arrays (name, dtype, shape and bytes), in name order."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for k, v in sorted(arrays):
        a = np.ascontiguousarray(v)
        h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def run_manifest(args, model, policy, rec, train) -> dict:
    """What makes a run the same run: the float model, policy, recipe, seed, data and the
    options that change training.  A checkpoint only continues a run with all of these
    the same."""
    return {"model": _digest([("graph", model.graph.to_json().encode()),
                              *model.params.items()]),
            "policy": policy.for_training().to_dict(), "recipe": rec.to_dict(),
            "seed": args.seed, "kvstore": args.kvstore,
            "freeze_bn_after": args.freeze_bn_after,
            "progressive": list(args.progressive or []),
            "train": {"images": len(train), "digest": _digest([("x", train.x),
                                                               ("y", train.y)])}}


def check_resume(out: Path, manifest: dict):
    """Record the run's settings beside its checkpoints, or, when ``out`` holds the
    checkpoints of an interrupted run, refuse unless that run had the same settings.
    Returns False for a resume, else the folders it made (for ``_forget_record``)."""
    from ..fileio import atomic_write_text, missing_folders, remove_empty

    record, ckpt = out / "checkpoint.json", out / "checkpoint"
    if ckpt.is_dir() and any(ckpt.iterdir()):
        try:
            saved = json.loads(record.read_text())
            if not isinstance(saved, dict):
                raise ValueError("not a record")
        except (OSError, ValueError):
            raise QuantOpsError(f"{ckpt}: checkpoints without a readable record of their run "
                                f"({record}): cannot tell whether this is the same run; use "
                                f"another --out, or delete {ckpt} to start over") from None
        differ = _differences(saved, json.loads(json.dumps(manifest)))
        if differ:
            raise QuantOpsError(f"{ckpt}: holds the checkpoints of a run with a different "
                                f"{'; '.join(differ)}; resuming would not continue it: "
                                f"run it with the same settings, use another --out, or "
                                f"delete {ckpt} to start over")
        return False
    made = missing_folders(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps(manifest, indent=1))
    except BaseException:
        remove_empty(made)
        raise
    return made


def _differences(saved: dict, now: dict, path: str = "") -> list[str]:
    """What differs between two run records, by key ("recipe.lr 0.0005 -> 0.1"); a model
    or data digest is named without its value."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b, where = saved.get(k), now.get(k), f"{path}{k}"
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{where}.")
        elif k == "digest" or path == "" and k == "model":
            out.append(where)
        else:
            out.append(f"{where} {json.dumps(a)} -> {json.dumps(b)}")
    return out


def _forget_record(out: Path, made) -> None:
    """After a run that failed before its first checkpoint: no record of it, and no folder
    this run made, is left behind."""
    from ..fileio import remove_empty

    if made is False or any((out / "checkpoint").glob("*")):
        return
    (out / "checkpoint.json").unlink(missing_ok=True)
    remove_empty([out / "checkpoint", *made])


def run(args: argparse.Namespace, models: Mapping[str, ModelLoader] | None = None,
        on_step: Callable[[int, int], None] | None = None) -> int:
    """Fine-tune the model; ``on_step(step, rank)`` is called after every optimizer step.
    Writes ``rank<r>/`` under ``args.out`` (``final-symbol.json`` + ``final-0000.params``,
    ``result.json``, ``metrics.csv``, ``curves.png``), all or none; exit code 2 with one
    ``error:`` line on bad input."""
    import mxnet as mx

    from ..train.recipe import calibrated_start

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    progress_bars = not args.no_progress
    try:
        _check_numbers(args)
        policy = load_policy(args.policy)
        args.input_files = []
        model, norm, float_lr, name, fmnist = _load_model(args, models or {})
        inputs = args.input_files + [args.policy, args.data, args.test]
        no_overwrite(args.out / f"rank{_env_rank(args)}", list(OUTPUTS), inputs,
                     "another --out")
        no_overwrite(args.out, ["checkpoint.json", "checkpoint", ".checkpoint.old"], inputs,
                     "another --out")   # the run record and its checkpoints (resume)
        rec = recipe_for(args, policy, float_lr)
        train, test = _load_sets(args, model, norm, fmnist, progress_bars)
        manifest = run_manifest(args, model, policy, rec, train)
        mx.random.seed(args.seed)
        float_model = model.copy()
        model.quantize(policy.for_training(), fold_bn=rec.fold_bn)
        if not model.quantizers:
            raise QuantOpsError(f"{args.policy}: the policy quantizes no layer of {name}: "
                                "nothing to fine-tune")
        calibrated_start(model, rec, train.x, progress_bars)
        before = model.evaluate(test.x, test.y) if rec.calib_images else None
        made = check_resume(args.out, manifest)
        try:
            if not args.progressive:
                progress = _fit(args, model, rec, train, on_step, args.out / "checkpoint")
                return _write(args, model, rec, train, test, before, name, progress)
            return _progressive(args, float_model, policy, float_lr, train, test, before,
                                name, on_step)
        except BaseException:
            _forget_record(args.out, made)
            raise
    except (QuantOpsError, OSError, mx.base.MXNetError) as e:
        return error(e)


def _progressive(args, float_model, policy, float_lr, train, test, before, name,
                 on_step) -> int:
    """``--progressive``: one recipe run per stage (``train.progressive``), each with its
    own checkpoints, so a resume continues the stage it was in."""
    from ..train.progressive import fit_progressive
    from ..train.recipe import calibrated_start

    stages = []

    def run_stage(model, stage_policy, i, widths):
        rec = recipe_for(args, stage_policy, float_lr)
        calibrated_start(model, rec, train.x, not args.no_progress)
        ckpt = args.out / "checkpoint" / f"stage{i}-W{widths[0]}A{widths[1]}"
        progress = _fit(args, model, rec, train, on_step, ckpt)
        stages.append({"weight_bits": widths[0], "activation_bits": widths[1],
                       "recipe": rec.to_dict(), "steps": progress["step"],
                       "accuracy": model.evaluate(test.x, test.y)})
        print(f"stage {i + 1}: W{widths[0]}A{widths[1]} {stages[-1]['accuracy']:.2f}%",
              flush=True)
        return progress

    model, results = fit_progressive(float_model, policy, args.progressive, run_stage,
                                     recipe_for(args, policy, float_lr).fold_bn)
    # one curve over the stages: steps and epochs counted from the first stage's start
    curve, steps, epochs = [], 0, 0.0
    for r in results:
        curve += [dict(row, step=row["step"] + steps, epoch=row["epoch"] + epochs)
                  for row in r["curve"]]
        steps += r["step"]
        epochs += r["epoch"]
    last = dict(results[-1], curve=curve, step=steps)
    return _write(args, model, recipe_for(args, policy, float_lr), train, test, before, name,
                  last, stages)


def _fit(args, model, rec, train, on_step, checkpoint_dir: Path) -> dict:
    """Fine-tune ``model`` in place with ``rec``; its progress record."""
    import numpy as np

    from ..ops import set_training
    from ..train.loop import FitConfig, fit

    q = model.to_block()
    q.hybridize(static_alloc=True)
    cfg = FitConfig(epochs=rec.epochs, lr=rec.lr, batch_size=rec.batch_size, wd=rec.wd,
                    seed=args.seed,
                    freeze_bn_after=args.freeze_bn_after,
                    checkpoint_dir=str(checkpoint_dir),
                    checkpoint_every=args.checkpoint_every, kvstore=args.kvstore,
                    progress=not args.no_progress)
    if on_step is not None:
        cfg.extra["on_step"] = on_step
    progress = fit(q, (train.x, train.y), None, cfg)
    set_training(q, False)
    model.from_block(q)
    bad = [k for k, v in model.params.items() if not np.isfinite(np.asarray(v)).all()]
    if bad:
        raise QuantOpsError(f"training diverged: {len(bad)} parameter(s), e.g. '{bad[0]}', "
                            f"are NaN or infinite after {progress['step']} steps (last loss "
                            f"{progress.get('last_loss')}); no model was written: lower --lr")
    return progress


def _write(args, model, rec, train, test, before, name, progress, stages=None) -> int:
    """Evaluate and write ``rank<r>/`` (all or none)."""
    from ..fileio import atomic_write_text, staged_dir
    from ..train.loop import plot_curve

    kv_rank = _env_rank(args)
    rank = progress.get("rank", kv_rank)
    acc = model.evaluate(test.x, test.y)
    result = {"model": name, "policy": args.policy, "rank": rank, "accuracy": acc,
              "accuracy_before": before, "steps": progress["step"], "kvstore": args.kvstore,
              "recipe": rec.to_dict(), "train": train.source, "train_images": len(train),
              "test": test.source, "test_images": len(test), "history": progress["history"]}
    if stages is not None:
        result["progressive"] = stages
    with staged_dir(args.out / f"rank{rank}") as tmp:
        model.save(tmp / "final")        # final-symbol.json + final-0000.params
        atomic_write_text(tmp / "result.json", json.dumps(result, indent=1))
        atomic_write_text(tmp / "metrics.csv", _metrics_csv(progress["curve"], acc))
        plot_curve(progress["curve"], acc, before, tmp / "curves.png")
    was = "" if before is None else f" (calibrated, before training: {before:.2f}%)"
    print(f"rank {rank}: accuracy {acc:.2f}%{was} after {progress['step']} steps; wrote "
          f"{args.out / f'rank{rank}'}/", flush=True)
    if "dist" in args.kvstore:
        # MXNet 1.9.1's kvstore teardown can hang or crash the server once the work is
        # done (seen with convolutional nets): results are written, leave without it
        sys.stderr.flush()
        os._exit(0)
    return 0


def _metrics_csv(curve: list, accuracy: float) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["step", "epoch", "loss", "lr", "test_accuracy"])
    w.writeheader()
    for i, row in enumerate(curve):
        w.writerow({**{k: row[k] for k in ("step", "epoch", "loss", "lr")},
                    "test_accuracy": accuracy if i == len(curve) - 1 else ""})
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return stoppable(lambda: run(args))
