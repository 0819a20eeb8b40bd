"""``utils/adaround.py`` (console script ``qo-adaround``): low-bit PTQ of a float model with
AdaRound's learned weight rounding (``quant_ops.ptq.adaround``).

A float model is quantized (``trt_int8`` with ``--weight-bits`` per-channel weights and
``--act-bits`` activations, BatchNorm folded for deployment), calibrated on ``--calib``,
then each layer's weights are rounded up or down to reconstruct its float output.  Writes
``<name>-quant-symbol.json``/``-0000.params``, ``report.json`` and ``report.md`` (accuracy
of the float, calibrated and rounded models on ``--test``; each layer's output error with
nearest and with learned rounding), all or none.  The result is an ordinary quantized
model: ``export_onnx`` writes it as QDQ like any other.
"""
from __future__ import annotations

import argparse
import math

from ..errors import QuantOpsError
from .common import run_command
from .model_data import (DATA_HELP, PTQRun, add_data_args, add_model_args,
                          add_output_args, check_counts, load_policy, pct, report_head,
                          seconds_and_files)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adaround",
        description="Low-bit PTQ with AdaRound: quantize, calibrate, then learn each "
                    "weight's rounding (up or down) layer by layer; writes the quantized "
                    "symbol + params, report.json and report.md.")
    add_model_args(p)
    q = p.add_argument_group("quantization")
    q.add_argument("--weight-bits", type=int, default=4, choices=range(2, 9), metavar="2..8",
                   help="weight bits, per channel (default 4)")
    q.add_argument("--act-bits", type=int, default=8, choices=range(2, 9), metavar="2..8",
                   help="activation bits (default 8)")
    q.add_argument("--policy", help="policy file (.json/.yaml) instead of the two above, "
                                    "taken as it is")
    q.add_argument("--fold-bn", choices=("deploy", "none"), default="deploy",
                   help="fold BatchNorm first (default deploy, as TensorRT runs it)")
    q.add_argument("--method", default="mse",
                   help="activation calibration: mse (default: the least error at 4-8 "
                        "bits here), minmax, percentile, entropy")
    add_data_args(p, "calibration data (required)")
    a = p.add_argument_group("rounding")
    a.add_argument("--iters", type=int, default=1000,
                   help="optimizer steps per layer (default 1000)")
    a.add_argument("--reg", type=float, default=0.01,
                   help="weight of the rounding regularizer (default 0.01)")
    a.add_argument("--lr", type=float, default=0.01, help="Adam step size (default 0.01)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled output rows")
    add_output_args(p)
    return p


def _check_args(args: argparse.Namespace) -> None:
    check_counts(args, "--iters")
    if not (math.isfinite(args.reg) and args.reg >= 0):
        raise QuantOpsError(f"--reg must be a finite number >= 0, got {args.reg}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise QuantOpsError(f"--lr must be a finite number > 0, got {args.lr}")
    if not args.calib:
        raise QuantOpsError(f"AdaRound learns from data: give --calib DATA ({DATA_HELP})")


def policy_for(args: argparse.Namespace):
    from ..policy import QuantPolicy

    if args.policy:
        return load_policy(args.policy), str(args.policy)
    return (QuantPolicy.from_dict({"preset": "trt_int8", "weight": {"bits": args.weight_bits},
                                   "activation": {"bits": args.act_bits}}),
            f"W{args.weight_bits}A{args.act_bits} (trt_int8, weights per channel)")


def run(args: argparse.Namespace) -> dict:
    """Quantize -> calibrate -> AdaRound -> evaluate -> write; the report."""
    _check_args(args)
    policy, policy_name = policy_for(args)
    r = PTQRun(args, calib_required=True)
    model = r.model
    r.evaluate("float", "float")
    batches = r.quantize_and_calibrate(policy, args.method)
    r.evaluate("calibrated", "calibrated")
    with r.stage("adaround"):
        model.adaround(batches, iters=args.iters, reg=args.reg, lr=args.lr,
                       progress=r.progress, seed=args.seed)
    rounding = model.reports["adaround"]
    model.notes.append(f"AdaRound: {len(rounding['layers'])} layers' weights rounded")
    r.evaluate("adaround", "after AdaRound")
    report = {"command": "adaround", "model": r.name, "symbol": r.src.symbol,
              "params": r.src.params, "policy": policy_name,
              "policy_dict": policy.to_dict(), "quantizers": len(model.table),
              "calibration": {"method": args.method, "data": r.calib.source,
                              "images": len(r.calib), "notes": r.calib.notes},
              "rounding": rounding, "notes": model.notes}
    return r.finish(report, _markdown, _print)


def _markdown(rep: dict) -> str:
    s = rep["rounding"]
    lines = report_head(rep, "AdaRound", f"{s['iters']} steps per layer (regularizer "
                        f"{s['reg']:g}, step {s['lr']:g})", ("adaround", "AdaRound"))
    lines += ["", "## Per layer: mean squared error of the output", "",
              "| layer | bits | nearest | AdaRound | weights rounded the other way |",
              "|---|---|---|---|---|"]
    for row in s["layers"]:
        lines.append(f"| {row['layer']} | {row['bits']} | {row['mse_nearest']:.4g} | "
                     f"{row['mse_adaround']:.4g} | {100 * row['flipped']:.1f}% |")
    if s["skipped"]:
        lines += ["", "Not rounded:", ""]
        lines += [f"- `{k['layer']}`: {k['reason']}" for k in s["skipped"]]
    return "\n".join(lines + seconds_and_files(rep)) + "\n"


def _print(rep: dict) -> None:
    rows = rep["rounding"]["layers"]
    near = sum(r["mse_nearest"] for r in rows)
    learned = sum(r["mse_adaround"] for r in rows)
    print(f"{rep['model']}: AdaRound {rep['policy']}, {len(rows)} layers on "
          f"{rep['calibration']['images']} images; summed layer error {near:.4g} -> "
          f"{learned:.4g}")
    if "accuracy" in rep:
        a = rep["accuracy"]
        print(f"top-1 on {a['images']} images: float {pct(a['float'])}, calibrated "
              f"{pct(a['calibrated'])}, AdaRound {pct(a['adaround'])}")
    print(f"{rep['seconds']['total']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)
