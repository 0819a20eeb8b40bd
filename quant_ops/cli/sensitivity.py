"""``utils/sensitivity.py`` (console script ``qo-sensitivity``): per-layer quantization
sensitivity of a float model, with an HTML report and a policy that keeps the most
sensitive layers in float.

The model is a bundled Fashion-MNIST checkpoint (by name), a checkpoint prefix, or any
``--symbol``/``--params`` pair; the data is the user's (``--calib``/``--test``: a
``.npy``/``.npz``, an image folder, or ``fmnist``), read by ``quant_ops.datasets.load_data``.
A model whose ``PREFIX.json`` gives its input normalization (the bundled ones) defaults to
Fashion-MNIST, normalized by it.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..errors import QuantOpsError
from ..ptq.sensitivity import SensitivityReport, layer_sensitivity, write_reports
from .common import no_overwrite, run_command
from .model_data import (DATA_HELP, add_model_args, check_fits, load_policy, load_set,
                         model_source, no_data_error)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sensitivity",
        description="Per-layer quantization sensitivity of a float model: writes "
                    "report.html, report.json and policy_skip.yaml (the policy with the most "
                    "sensitive layers kept in float).")
    add_model_args(p, "fmnist_resnet20")
    p.add_argument("--calib", help=f"calibration data: {DATA_HELP} (default for "
                                   "Fashion-MNIST models: fmnist, the training set)")
    p.add_argument("--test", help=f"evaluation data with labels: {DATA_HELP} (default for "
                                  "Fashion-MNIST models: fmnist, the test set)")
    p.add_argument("--policy", default="trt_int8",
                   help="a preset name or a policy file (.json/.yaml) (default trt_int8)")
    p.add_argument("--method", default="minmax",
                   help="calibration method: minmax, entropy, percentile, mse")
    p.add_argument("--calib-images", type=int, default=None,
                   help="images to calibrate on (default: the first 512)")
    p.add_argument("--calib-batch", type=int, default=64)
    p.add_argument("--eval-images", type=int, default=10000,
                   help="test images for top-1 (default 10000; 0: no accuracy)")
    p.add_argument("--fold-bn", choices=("deploy", "qat", "none"), default="deploy")
    p.add_argument("--max-layers", type=int, default=None,
                   help="at most this many layers in policy_skip.yaml")
    p.add_argument("--min-gain", type=float, default=None,
                   help="least gain for a layer to be kept in float (default: 0.1 top-1 "
                        "points; without accuracy, 1 dB of network output SQNR)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", type=Path, default=Path("out/sensitivity"), help="output folder")
    return p


def _check_args(args: argparse.Namespace) -> None:
    for flag, v, least in (("--calib-images", args.calib_images, 1),
                           ("--calib-batch", args.calib_batch, 1),
                           ("--eval-images", args.eval_images, 0), ("--epoch", args.epoch, 0),
                           ("--max-layers", args.max_layers, 0)):
        if v is not None and v < least:
            raise QuantOpsError(f"{flag} must be >= {least}, got {v}")
    if args.min_gain is not None and not math.isfinite(args.min_gain):
        raise QuantOpsError(f"--min-gain must be a finite number, got {args.min_gain}")


def run(args: argparse.Namespace) -> SensitivityReport:
    """Load, analyse, write the three files, print the table."""
    _check_args(args)
    policy = load_policy(args.policy)
    src = model_source(args, "fmnist_resnet20")
    calib_spec = args.calib or ("fmnist" if src.fmnist else None)
    if calib_spec is None:
        raise no_data_error(src)
    test_spec = args.test or ("fmnist" if src.fmnist else None)
    progress = not args.no_progress
    no_overwrite(args.out, ["report.html", "report.json", "policy_skip.yaml"],
                 [src.symbol, src.params, args.policy, calib_spec, test_spec])
    m = src.load()
    calib = load_set(calib_spec, src, "--calib", "train", args.calib_images or 512,
                     args.calib_images is not None, progress, labels=False)
    check_fits(m, calib)
    xc, bs = calib.x, args.calib_batch
    batches = [xc[i:i + bs] for i in range(0, len(xc), bs)]
    eval_data = None
    if args.eval_images and test_spec is not None:
        test = load_set(test_spec, src, "--test", "test", args.eval_images, False, progress,
                        labels=True)
        check_fits(m, test, labels=True)
        eval_data = (test.x, test.y)
    rep = layer_sensitivity(m.run_graph, m.params, policy, batches, eval_data,
                            method=args.method,
                            fold_bn=None if args.fold_bn == "none" else args.fold_bn,
                            data_name=m.data_names[0], progress=progress, model=src.name)
    keep = rep.keep_float(args.max_layers, args.min_gain)
    write_reports(rep, args.out, keep, policy,
                  f"{rep.model}: {args.policy} keeping {len(keep)} layer(s) in float "
                  "(from utils/sensitivity.py)")
    _print_summary(rep, keep)
    print(f"wrote {args.out}/report.html, report.json, policy_skip.yaml")
    return rep


def _print_summary(rep: SensitivityReport, keep: list[str]) -> None:
    acc = (f"top-1 float {rep.acc_float:.2f}%, quantized {rep.acc_quant:.2f}% "
           f"({rep.eval_images} images); " if rep.has_accuracy else "")
    print(f"{rep.model}: {acc}network output SQNR {rep.out_sqnr_quant_db:.1f} dB; "
          f"{len(rep.rows)} layers in {rep.seconds:.1f} s")
    print(f"{'layer':<40} {'SQNR dB':>8} {'cosine':>8} {'gain dB':>8} {'top-1 flt':>9} "
          f"{'gain':>6}")
    for r in rep.rows:
        a = "-" if r.acc_layer_float is None else f"{r.acc_layer_float:.2f}"
        g = "-" if r.gain is None else f"{r.gain:+.2f}"
        print(f"{r.name:<40} {r.sqnr_db:>8.2f} {r.cosine:>8.5f} {r.out_gain_db:>8.2f} "
              f"{a:>9} {g:>6}")
    print("keep in float: " + (", ".join(keep) if keep else "(none)"))


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)
