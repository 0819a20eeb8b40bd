"""``utils/easyquant.py`` (console script ``qo-easyquant``): the seed's EasyQuant recipe
(``quant_ops.ptq.easyquant``), INT8 or INT7.

A float model is quantized (``trt_int8`` with ``--bits`` for weights and activations,
BatchNorm folded for deployment), calibrated on ``--calib`` (min/max: the search starts
from those scales), then each layer's weight and input-activation scales are searched for
the best cosine between its float and quantized outputs.  Writes
``<name>-quant-symbol.json``/``-0000.params``, ``report.json`` and ``report.md`` (accuracy of
the float, calibrated and searched models on ``--test``; the per-layer cosine before and
after), all or none.
"""
from __future__ import annotations

import argparse

from ..errors import QuantOpsError
from .common import run_command
from .model_data import (DATA_HELP, PTQRun, add_data_args, add_model_args,
                          add_output_args, check_counts, load_policy, pct,
                          report_head, seconds_and_files)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="easyquant",
        description="EasyQuant (INT8 or INT7) of a float model: quantize, calibrate, then "
                    "search each layer's weight and activation scales for the best cosine to "
                    "the float outputs; writes the quantized symbol + params, report.json and "
                    "report.md.")
    add_model_args(p)
    p.add_argument("--bits", type=int, choices=(8, 7), default=8,
                   help="weight and activation bits (default 8)")
    add_data_args(p, "calibration data (required)")
    q = p.add_argument_group("quantization")
    pol = q.add_mutually_exclusive_group()
    pol.add_argument("--preset", default="trt_int8",
                     help="policy preset, its bits set by --bits (default trt_int8)")
    pol.add_argument("--policy", help="policy file (.json/.yaml), taken as it is (its "
                                      "quantizers must have --bits bits)")
    q.add_argument("--fold-bn", choices=("deploy", "none"), default="deploy",
                   help="fold BatchNorm first (default deploy, as TensorRT runs it)")
    q.add_argument("--method", default="minmax",
                   help="calibration the search starts from: minmax (default), entropy, "
                        "percentile, mse")
    s = p.add_argument_group("search")
    s.add_argument("--rounds", type=int, default=2,
                   help="weight/activation alternations per layer (default 2)")
    s.add_argument("--points", type=int, default=100,
                   help="candidate scales per search (default 100)")
    s.add_argument("--search", type=float, nargs=2, default=(0.5, 1.2), metavar=("LO", "HI"),
                   help="candidates from LO to HI times the current scale (default 0.5 1.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled output rows")
    add_output_args(p)
    return p


def _check_args(args: argparse.Namespace) -> None:
    check_counts(args, "--rounds", "--points")
    if not args.calib:
        raise QuantOpsError(f"EasyQuant searches scales on data: give --calib DATA "
                            f"({DATA_HELP})")


def policy_for(args: argparse.Namespace):
    from ..policy import QuantPolicy

    if args.policy:
        return load_policy(args.policy), str(args.policy)
    b = args.bits
    return (QuantPolicy.from_dict({"preset": args.preset, "weight": {"bits": b},
                                   "activation": {"bits": b}}), f"{args.preset}, INT{b}")


def run(args: argparse.Namespace) -> dict:
    """Quantize -> calibrate -> EasyQuant -> evaluate -> write; the report."""
    _check_args(args)
    policy, policy_name = policy_for(args)
    r = PTQRun(args, calib_required=True)
    model = r.model
    r.evaluate("float", "float")
    batches = r.quantize_and_calibrate(policy, args.method)
    r.evaluate("calibrated", "calibrated")
    with r.stage("easyquant"):
        model.easyquant(batches, nbits=args.bits, rounds=args.rounds,
                        search=tuple(args.search), points=args.points,
                        progress=r.progress, seed=args.seed)
    search = model.reports["easyquant"]
    model.notes.append(f"EasyQuant INT{args.bits}: {len(search['layers'])} layers searched")
    r.evaluate("easyquant", "after EasyQuant")
    report = {"command": "easyquant", "model": r.name, "symbol": r.src.symbol,
              "params": r.src.params, "bits": args.bits, "policy": policy_name,
              "policy_dict": policy.to_dict(), "quantizers": len(model.table),
              "calibration": {"method": args.method, "data": r.calib.source,
                              "images": len(r.calib), "notes": r.calib.notes},
              "search": search, "notes": model.notes}
    return r.finish(report, _markdown, _print)


def _mean_cos(rows: list, key: str) -> float:
    return sum(r[key] for r in rows) / len(rows) if rows else float("nan")


def _markdown(rep: dict) -> str:
    s = rep["search"]
    lines = report_head(rep, f"EasyQuant INT{rep['bits']}",
                        f"the search: {s['rounds']} rounds, {s['points']} candidates in "
                        f"[{s['search'][0]:g}, {s['search'][1]:g}] x the current scale",
                        ("easyquant", "EasyQuant"))
    rows = s["layers"]
    lines += ["", "## Per layer: cosine of the quantized to the float output", "",
              f"Mean {_mean_cos(rows, 'cosine_before'):.6f} -> "
              f"{_mean_cos(rows, 'cosine_after'):.6f} over {len(rows)} layers.", "",
              "| layer | op | cosine before | cosine after | activation factor | "
              "min weight factor |", "|---|---|---|---|---|---|"]
    for r in rows:
        af = "-" if r["act_factor"] is None else f"{r['act_factor']:.4f}"
        wf = "-" if not r["weight_factors"] else f"{min(r['weight_factors']):.4f}"
        lines.append(f"| {r['layer']} | {r['op']} | {r['cosine_before']:.6f} | "
                     f"{r['cosine_after']:.6f} | {af} | {wf} |")
    if s["skipped"]:
        lines += ["", "Not searched:", ""]
        lines += [f"- `{k['layer']}`: {k['reason']}" for k in s["skipped"]]
    return "\n".join(lines + seconds_and_files(rep)) + "\n"


def _print(rep: dict) -> None:
    rows = rep["search"]["layers"]
    print(f"{rep['model']}: EasyQuant INT{rep['bits']} ({rep['policy']}, {rep['quantizers']} "
          f"quantizers), {len(rows)} layers searched on {rep['calibration']['images']} images; "
          f"mean layer cosine {_mean_cos(rows, 'cosine_before'):.6f} -> "
          f"{_mean_cos(rows, 'cosine_after'):.6f}")
    if "accuracy" in rep:
        a = rep["accuracy"]
        print(f"top-1 on {a['images']} images: float {pct(a['float'])}, calibrated "
              f"{pct(a['calibrated'])}, EasyQuant {pct(a['easyquant'])}")
    print(f"{rep['seconds']['total']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)
