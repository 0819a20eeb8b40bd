"""``utils/sensitivity.py`` (console script ``qo-sensitivity``): per-layer quantization
sensitivity of a float Fashion-MNIST checkpoint, with an HTML report and a policy that keeps
the most sensitive layers in float."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..errors import QuantOpsError
from ..policy import QuantPolicy
from ..ptq.sensitivity import SensitivityReport, layer_sensitivity, write_reports
from .common import BUNDLED_MODELS, checked_symbol, model_prefix, run_command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sensitivity",
        description="Per-layer quantization sensitivity of a float Fashion-MNIST checkpoint: "
                    "writes report.html, report.json and policy_skip.yaml (the policy with "
                    "the most sensitive layers kept in float).")
    p.add_argument("--model", default="fmnist_resnet20",
                   help=f"a bundled model ({', '.join(BUNDLED_MODELS)}; default "
                        "fmnist_resnet20) or a checkpoint prefix: PREFIX-symbol.json, "
                        "PREFIX-EPOCH.params and PREFIX.json (its input normalization)")
    p.add_argument("--epoch", type=int, default=0, help="params epoch (default 0)")
    p.add_argument("--policy", default="trt_int8",
                   help="a preset name or a policy file (.json/.yaml) (default trt_int8)")
    p.add_argument("--method", default="minmax",
                   help="calibration method: minmax, entropy, percentile, mse")
    p.add_argument("--calib-images", type=int, default=512,
                   help="training images to calibrate on (default 512)")
    p.add_argument("--calib-batch", type=int, default=64)
    p.add_argument("--eval-images", type=int, default=10000,
                   help="test images for top-1 (default 10000; 0: no accuracy)")
    p.add_argument("--fold-bn", choices=("deploy", "qat", "none"), default="deploy")
    p.add_argument("--max-layers", type=int, default=None,
                   help="at most this many layers in policy_skip.yaml")
    p.add_argument("--min-gain", type=float, default=None,
                   help="least gain for a layer to be kept in float (default: 0.1 top-1 "
                        "points; with --eval-images 0, 1 dB of network output SQNR)")
    p.add_argument("--out", type=Path, default=Path("out/sensitivity"), help="output folder")
    return p


def _load_policy(text: str) -> QuantPolicy:
    if Path(text).suffix.lower() in (".json", ".yaml", ".yml") or Path(text).is_file():
        return QuantPolicy.load(text)
    return QuantPolicy.preset(text)


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
    from ..datasets import fashion_mnist
    from ..ptq.common import load_fmnist_model

    _check_args(args)
    policy = _load_policy(args.policy)
    prefix = model_prefix(args.model)
    m = load_fmnist_model(prefix, args.epoch)
    checked_symbol(m.graph, m.params, f"{prefix}-{args.epoch:04d}.params")

    xt, _ = fashion_mnist("train")
    if args.calib_images > len(xt):
        raise QuantOpsError(f"--calib-images {args.calib_images}: the training set has "
                            f"{len(xt)} images")
    xc = m.normalize(xt[:args.calib_images])
    del xt
    bs = args.calib_batch
    n_full = len(xc) // bs * bs  # calibration batches must share one shape
    batches = [xc[i:i + bs] for i in range(0, n_full, bs)] or [xc]
    eval_data = None
    if args.eval_images:
        xe, ye = fashion_mnist("test")
        eval_data = (m.normalize(xe[:args.eval_images]), ye[:args.eval_images])
    rep = layer_sensitivity(m.graph, m.params, policy, batches, eval_data, method=args.method,
                            fold_bn=None if args.fold_bn == "none" else args.fold_bn,
                            model=prefix.name)
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
