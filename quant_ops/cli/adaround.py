"""``utils/adaround.py`` (console script ``qo-adaround``): low-bit PTQ of a float model with
learned weight rounding: AdaRound layer by layer (``quant_ops.ptq.adaround``), or with
``--blocks`` block reconstruction (BRECQ, optionally QDrop: ``quant_ops.ptq.brecq``).

A float model is quantized (``trt_int8`` with ``--weight-bits`` per-channel weights and
``--act-bits`` activations, BatchNorm folded for deployment), calibrated on ``--calib``,
then each layer's weights are rounded up or down to reconstruct its float output (with
``--blocks``: each residual block's or layer chain's output, activation steps learned
too).  Writes ``<name>-quant-symbol.json``/``-0000.params``, ``report.json`` and
``report.md`` (accuracy of the float, calibrated and rounded models on ``--test``; each
layer's or block's output error before and after), all or none.  The result is an
ordinary quantized model: ``export_onnx`` writes it as QDQ like any other.
"""
from __future__ import annotations

import argparse
import math

from ..errors import QuantOpsError
from ..ptq.brecq import DEFAULT_ITERS as BLOCK_ITERS
from .common import run_command
from .model_data import (DATA_HELP, PTQRun, add_data_args, add_model_args,
                          add_output_args, check_counts, load_policy, pct, report_head,
                          seconds_and_files)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adaround",
        description="Low-bit PTQ with learned rounding: quantize, calibrate, then learn each "
                    "weight's rounding (up or down) layer by layer (AdaRound) or block by "
                    "block with the activation steps (--blocks: BRECQ/QDrop); writes the "
                    "quantized symbol + params, report.json and report.md.")
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
    a.add_argument("--blocks", action="store_true",
                   help="block reconstruction (BRECQ): a residual block or a chain of up "
                        "to --max-layers layers at a time, activation steps learned with "
                        "the rounding")
    a.add_argument("--qdrop", type=float, default=0.0,
                   help="with --blocks: probability of skipping an activation's "
                        "quantization per element and step (QDrop; default 0)")
    a.add_argument("--max-layers", type=int, default=3,
                   help="with --blocks: layers merged into one block of a plain chain "
                        "(default 3)")
    a.add_argument("--iters", type=int, default=None,
                   help="optimizer steps per layer (default 1000) or per block "
                        f"(default {BLOCK_ITERS})")
    a.add_argument("--reg", type=float, default=0.01,
                   help="weight of the rounding regularizer (default 0.01)")
    a.add_argument("--lr", type=float, default=0.01, help="Adam step size (default 0.01)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled output rows")
    add_output_args(p)
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.iters is None:
        args.iters = BLOCK_ITERS if args.blocks else 1000
    check_counts(args, "--iters", "--max-layers")
    if not (math.isfinite(args.qdrop) and 0 <= args.qdrop < 1):
        raise QuantOpsError(f"--qdrop must be a probability in [0, 1), got {args.qdrop}")
    if not args.blocks and (args.qdrop or args.max_layers != 3):
        raise QuantOpsError("--qdrop and --max-layers apply to block reconstruction: "
                            "add --blocks")
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
    key = "brecq" if args.blocks else "adaround"
    with r.stage(key):
        if args.blocks:
            model.brecq(batches, iters=args.iters, reg=args.reg, lr=args.lr,
                        qdrop=args.qdrop, max_layers=args.max_layers, progress=r.progress,
                        seed=args.seed)
        else:
            model.adaround(batches, iters=args.iters, reg=args.reg, lr=args.lr,
                           progress=r.progress, seed=args.seed)
    rounding = model.reports[key]
    if args.blocks:
        model.notes.append(f"BRECQ: {len(rounding['blocks'])} blocks reconstructed")
    else:
        model.notes.append(f"AdaRound: {len(rounding['layers'])} layers' weights rounded")
    r.evaluate(key, "after " + _title(args.blocks, args.qdrop))
    report = {"command": "adaround", "model": r.name, "symbol": r.src.symbol,
              "params": r.src.params, "policy": policy_name,
              "policy_dict": policy.to_dict(), "quantizers": len(model.table),
              "calibration": {"method": args.method, "data": r.calib.source,
                              "images": len(r.calib), "notes": r.calib.notes},
              "method": _title(args.blocks, args.qdrop), "rounding": rounding,
              "notes": model.notes}
    return r.finish(report, _markdown, _print)


def _title(blocks: bool, qdrop: float) -> str:
    return ("BRECQ + QDrop" if qdrop else "BRECQ") if blocks else "AdaRound"


def _markdown(rep: dict) -> str:
    s = rep["rounding"]
    if "blocks" in s:
        return _block_markdown(rep)
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


def _block_markdown(rep: dict) -> str:
    s = rep["rounding"]
    lines = report_head(rep, rep["method"], f"{s['iters']} steps per block of up to "
                        f"{s['max_layers']} layers (regularizer {s['reg']:g}, step "
                        f"{s['lr']:g}, activation step lr {s['lr_step']:g}, QDrop "
                        f"{s['qdrop']:g})", ("brecq", rep["method"]))
    lines += ["", "## Per block: mean squared error of the output", "",
              "| block output | layers | calibrated | learned | kept | weights rounded the "
              "other way |", "|---|---|---|---|---|---|"]
    for row in s["blocks"]:
        lines.append(f"| {row['block']} | {', '.join(row['layers'])} | "
                     f"{row['mse_before']:.4g} | {row['mse_learned']:.4g} | "
                     f"{'yes' if row['kept_learned'] else 'no'} | "
                     f"{100 * row['flipped']:.1f}% |")
    if s["skipped"]:
        lines += ["", "Not learned:", ""]
        lines += [f"- `{k['quantizer']}`: {k['reason']}" for k in s["skipped"]]
    return "\n".join(lines + seconds_and_files(rep)) + "\n"


def _print(rep: dict) -> None:
    s = rep["rounding"]
    if "blocks" in s:
        rows, unit, key = s["blocks"], "blocks", "brecq"
        near = sum(r["mse_before"] for r in rows)
        learned = sum(min(r["mse_learned"], r["mse_before"]) for r in rows)
    else:
        rows, unit, key = s["layers"], "layers", "adaround"
        near = sum(r["mse_nearest"] for r in rows)
        learned = sum(r["mse_adaround"] for r in rows)
    print(f"{rep['model']}: {rep['method']} {rep['policy']}, {len(rows)} {unit} on "
          f"{rep['calibration']['images']} images; summed {unit[:-1]} error {near:.4g} -> "
          f"{learned:.4g}")
    if "accuracy" in rep:
        a = rep["accuracy"]
        print(f"top-1 on {a['images']} images: float {pct(a['float'])}, calibrated "
              f"{pct(a['calibrated'])}, {rep['method']} {pct(a[key])}")
    print(f"{rep['seconds']['total']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)
