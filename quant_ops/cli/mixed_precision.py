"""``utils/mixed_precision.py`` (console script ``qo-mixed-precision``): each layer's weight
bits chosen under a size budget from measured sensitivity (``quant_ops.ptq.mixed``).

The float model's layers are tried one at a time at each of ``--widths`` (per-channel
weights, the rest float) on ``--calib``; the widths that least hurt the network's output at
an average of ``--budget`` bits per weight become a policy (``trt_int8`` with
``--act-bits`` activations and one override per layer).  The model is then quantized with
it, calibrated (``--method``) and, with ``--test``, evaluated beside uniform weights at the
budget's width (when the budget is a whole number of bits).  Writes ``policy.yaml``,
``<name>-quant-symbol.json``/``-0000.params``, ``report.json`` and ``report.md``, all or
none.
"""
from __future__ import annotations

import argparse
import math

import yaml

from ..errors import QuantOpsError
from .common import run_command
from .model_data import (DATA_HELP, PTQRun, add_data_args, add_model_args, add_output_args,
                          check_counts, pct, seconds_and_files)


def _widths(text: str) -> tuple:
    try:
        vals = tuple(sorted({int(v) for v in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of bit widths: {text!r}") from None
    if not vals or vals[0] < 2 or vals[-1] > 8:
        raise argparse.ArgumentTypeError(f"widths must be within 2..8: {text!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mixed_precision",
        description="Choose each layer's weight bits under an average-bits budget from "
                    "measured sensitivity; writes the policy, the quantized model and a "
                    "report.")
    add_model_args(p)
    q = p.add_argument_group("precision")
    q.add_argument("--budget", type=float, required=True,
                   help="average weight bits per weight, e.g. 4 or 4.5")
    q.add_argument("--widths", type=_widths, default=(2, 3, 4, 6, 8),
                   help="the widths a layer may take (default 2,3,4,6,8)")
    q.add_argument("--act-bits", type=int, default=8, choices=range(2, 9), metavar="2..8",
                   help="activation bits (default 8)")
    q.add_argument("--fold-bn", choices=("deploy", "none"), default="deploy",
                   help="fold BatchNorm first (default deploy)")
    q.add_argument("--method", default="auto",
                   help="activation calibration of the result (default auto)")
    add_data_args(p, "calibration data (required)")
    add_output_args(p)
    return p


def _check_args(args: argparse.Namespace) -> None:
    check_counts(args)
    if not (math.isfinite(args.budget) and args.widths[0] <= args.budget <= args.widths[-1]):
        raise QuantOpsError(f"--budget must be between the narrowest and widest of --widths "
                            f"({args.widths[0]}..{args.widths[-1]}), got {args.budget}")
    if not args.calib:
        raise QuantOpsError(f"sensitivity is measured on data: give --calib DATA ({DATA_HELP})")


def run(args: argparse.Namespace) -> dict:
    """Sensitivity -> allocation -> quantize -> calibrate -> evaluate -> write."""
    _check_args(args)
    r = PTQRun(args, calib_required=True, extra_files=("policy.yaml",))
    model, bs = r.model, args.batch_size
    fold = None if args.fold_bn == "none" else args.fold_bn
    base = {"preset": "trt_int8", "activation": {"bits": args.act_bits}}
    batches = r.calib.batches(bs)
    r.evaluate("float", "float")
    uniform = None
    if r.test is not None and float(args.budget).is_integer():
        with r.stage("uniform"):
            u = model.copy().quantize({**base, "weight": {"bits": int(args.budget)}},
                                      fold_bn=fold)
            u.calibrate(batches, args.method, progress=r.progress)
            uniform = u.evaluate(r.test.batches(bs, True), progress=r.progress)
    with r.stage("sensitivity"):
        policy = model.mixed_precision(batches, args.budget, args.widths, base, fold, bs,
                                       r.progress)
    choice = model.reports["mixed_precision"]
    r.quantize_and_calibrate(policy, args.method)
    r.evaluate("mixed", "mixed")
    if uniform is not None:
        r.accuracy[f"uniform_w{int(args.budget)}"] = uniform
    model.notes.append(f"mixed precision: average {choice['average_bits']:.3f} weight bits "
                       f"(budget {args.budget:g})")
    report = {"command": "mixed_precision", "model": r.name, "symbol": r.src.symbol,
              "params": r.src.params, "policy_dict": policy, "quantizers": len(model.table),
              "calibration": {"method": args.method, "data": r.calib.source,
                              "images": len(r.calib), "notes": r.calib.notes},
              "choice": choice, "notes": model.notes}
    text = "# mixed precision by quant_ops (utils/mixed_precision.py)\n" + yaml.safe_dump(
        policy, sort_keys=False)
    return r.finish(report, _markdown, _print, {"policy.yaml": text})


def _markdown(rep: dict) -> str:
    c = rep["choice"]
    lines = [f"# Mixed precision: {rep['model']}", "",
             f"- model: `{rep['symbol']}`, `{rep['params']}`",
             f"- budget {c['budget']:g} bits per weight, widths {c['widths']}: average "
             f"{c['average_bits']:.3f} over {c['weights']} weights",
             f"- calibration: {rep['calibration']['method']} on "
             f"{rep['calibration']['images']} images"]
    if "accuracy" in rep:
        a = rep["accuracy"]
        cols = [k for k in a if k not in ("test", "images")]
        lines += ["", f"## Top-1 on {a['images']} images ({a['test']})", "",
                  "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
                  "| " + " | ".join(pct(a[k]) for k in cols) + " |"]
    widths = [str(w) for w in c["widths"]]
    lines += ["", "## Per layer: output error with only this layer's weights quantized", "",
              "| layer | weights | bits | " + " | ".join(f"{w} bits" for w in widths) + " |",
              "|---|---|---|" + "---|" * len(widths)]
    for row in c["layers"]:
        lines.append(f"| {row['layer']} | {row['weights']} | {row['bits']} | "
                     + " | ".join(f"{row['errors'][w]:.3g}" for w in widths) + " |")
    return "\n".join(lines + seconds_and_files(rep)) + "\n"


def _print(rep: dict) -> None:
    c = rep["choice"]
    hist: dict = {}
    for row in c["layers"]:
        hist[row["bits"]] = hist.get(row["bits"], 0) + 1
    print(f"{rep['model']}: {len(c['layers'])} layers, average {c['average_bits']:.3f} weight "
          f"bits (budget {c['budget']:g}): "
          + ", ".join(f"{n} at {b}" for b, n in sorted(hist.items())))
    if "accuracy" in rep:
        a = rep["accuracy"]
        print(f"top-1 on {a['images']} images: " + ", ".join(
            f"{k} {pct(v)}" for k, v in a.items() if k not in ("test", "images")))
    print(f"{rep['seconds']['total']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)
