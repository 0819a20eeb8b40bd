"""``utils/dfq.py`` (console script ``qo-dfq``): Data-Free Quantization (``quant_ops.ptq.dfq``)
of a float model, then quantized and calibrated, with the seed's switches:

``--relu`` ReLU6 -> ReLU; ``--equalize`` cross-layer equalization (with high-bias
absorption unless ``--no-absorb``); ``--correction`` bias correction (data-free from the BN
statistics, or empirical with ``--calib``); ``--clip-weight T``; ``--distill-range``: the
activation ranges calibrated on ZeroQ distilled data (``quant_ops.ptq.zeroq``) instead of
real images.  BatchNorm is always folded (DFQ reads its statistics first).

The quantization targets DFQ's case by default: the ``trt_int8`` preset with one INT8 scale
per weight tensor (``--per-channel`` keeps the preset's per-channel weights), activation
ranges by min/max.  Writes ``<name>-quant-symbol.json``/``-0000.params``, ``report.json``
and ``report.md`` (what each step did, accuracy of the float and the quantized model on
``--test``, times), all or none.
"""
from __future__ import annotations

import argparse

from ..errors import QuantOpsError
from .common import run_command
from .model_data import (DATA_HELP, PTQRun, add_data_args, add_model_args,
                          add_output_args, check_counts, floats, load_policy, pct,
                          seconds_and_files)

CORRECTIONS = ("auto", "data_free", "empirical")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dfq",
        description="Data-Free Quantization of a float model (ReLU6 -> ReLU, cross-layer "
                    "equalization, high-bias absorption, bias correction, weight clipping; "
                    "ZeroQ distilled data for the activation ranges): writes the quantized "
                    "symbol + params, report.json and report.md.")
    add_model_args(p)
    s = p.add_argument_group("DFQ steps (BatchNorm is always folded)")
    s.add_argument("--relu", action="store_true", help="replace ReLU6 by ReLU")
    s.add_argument("--equalize", action="store_true",
                   help="cross-layer equalization, then high-bias absorption")
    s.add_argument("--no-absorb", action="store_true",
                   help="with --equalize: no high-bias absorption")
    s.add_argument("--correction", nargs="?", const="auto", choices=CORRECTIONS,
                   help="bias correction: data_free (BN statistics) or empirical (on --calib); "
                        "alone: empirical with --calib, else data_free")
    s.add_argument("--clip-weight", type=float, metavar="T",
                   help="clip every weight to [-T, T] (the paper: 15, after equalization)")
    s.add_argument("--distill-range", action="store_true",
                   help="activation ranges from ZeroQ distilled data (no real images)")
    z = p.add_argument_group("ZeroQ (--distill-range)")
    z.add_argument("--distill-batches", type=int, default=4, help="batches (default 4)")
    z.add_argument("--distill-steps", type=int, default=60,
                   help="Adam steps per batch (default 60)")
    z.add_argument("--input-range", type=floats, metavar="LO,HI",
                   help="keep the distilled inputs in [LO, HI] (default with a known pixel "
                        "normalization: [0, 1] normalized)")
    q = p.add_argument_group("quantization")
    pol = q.add_mutually_exclusive_group()
    pol.add_argument("--preset", default="trt_int8", help="policy preset (default trt_int8)")
    pol.add_argument("--policy", help="policy file (.json/.yaml), taken as it is")
    q.add_argument("--per-channel", action="store_true",
                   help="keep the preset's per-channel weights (default: one scale per "
                        "weight tensor, what DFQ repairs)")
    q.add_argument("--method", default="minmax",
                   help="calibration: minmax (default), entropy, percentile, mse")
    add_data_args(p)
    add_output_args(p)
    return p


def _check_args(args: argparse.Namespace) -> None:
    check_counts(args, "--distill-batches")
    if args.distill_steps < 0:
        raise QuantOpsError(f"--distill-steps must be >= 0, got {args.distill_steps}")
    if args.clip_weight is not None and not args.clip_weight > 0:
        raise QuantOpsError(f"--clip-weight must be > 0, got {args.clip_weight}")
    if args.input_range is not None and (len(args.input_range) != 2
                                         or not args.input_range[0] < args.input_range[1]):
        raise QuantOpsError(f"--input-range must be LO,HI with LO < HI, got "
                            f"{','.join(map(str, args.input_range))}")
    if args.calib and args.distill_range:
        raise QuantOpsError("--distill-range calibrates without real data: give it or "
                            "--calib, not both")
    if args.correction == "empirical" and not args.calib:
        raise QuantOpsError("--correction empirical measures the layers' inputs: it needs "
                            "--calib DATA")
    if args.no_absorb and not args.equalize:
        raise QuantOpsError("--no-absorb goes with --equalize")


def policy_for(args: argparse.Namespace):
    """The quantization policy: the file as it is, or the preset with per-tensor weights."""
    from ..policy import QuantPolicy

    if args.policy:
        return load_policy(args.policy), str(args.policy)
    if args.per_channel:
        return QuantPolicy.preset(args.preset), args.preset
    return (QuantPolicy.from_dict({"preset": args.preset, "weight": {"per_channel": False}}),
            f"{args.preset}, per-tensor weights")


def _pixel_range(src) -> tuple | None:
    """[0, 1] pixels normalized by the model's normalization: the distilled inputs' range."""
    if src.normalize is None:
        return None
    import numpy as np

    m, s = (np.atleast_1d(np.asarray(v, np.float64)) for v in src.normalize)
    return float(((0 - m) / s).min()), float(((1 - m) / s).max())


def apply_steps(model, args: argparse.Namespace, policy, calib_batches, report: dict) -> None:
    """The DFQ steps the switches choose, on ``model`` in place (``apply_dfq``'s order:
    ReLU6 -> ReLU, BN fold, CLE, absorption, clipping, bias correction).  Composed from
    ``quant_ops.ptq.dfq``'s steps because ``apply_dfq`` always replaces ReLU6."""
    from ..graph.relu6 import relu6_to_relu
    from ..ptq import dfq

    g, p = model.graph, model.params
    if args.relu:
        g, report["relu6_to_relu"] = relu6_to_relu(g)
    g, p, stats = dfq.fold_with_stats(g, p)
    report["bn_folded"] = len(stats)
    if args.equalize:
        report["cle"] = {}
        g, p, stats = dfq.cross_layer_equalize(g, p, stats, report=report["cle"])
        if not args.no_absorb:
            report["absorption"] = {}
            g, p, stats = dfq.absorb_high_bias(g, p, stats, report=report["absorption"])
    ref = p
    if args.clip_weight is not None:
        g, p = dfq.clip_weights(g, p, args.clip_weight)
        report["weight_clip"] = args.clip_weight
    if args.correction:
        mode = args.correction
        if mode == "auto":
            mode = "empirical" if calib_batches is not None else "data_free"
        report["bias_correction"] = {"mode": mode}
        g, p = dfq.correct_bias(g, p, mode=mode, stats=stats, policy=policy,
                                reference_params=ref, calib_batches=calib_batches,
                                data_name=model.data_names[0],
                                report=report["bias_correction"])
    model.graph, model.params = g, p
    model.notes.append("DFQ: " + ", ".join(step_lines(report)))


def step_lines(rep: dict) -> list[str]:
    """One line per step that ran."""
    out = []
    if "relu6_to_relu" in rep:
        out.append(f"ReLU6 -> ReLU: {rep['relu6_to_relu']}")
    out.append(f"BatchNorm folded: {rep['bn_folded']} layers")
    if "cle" in rep:
        c = rep["cle"]
        out.append(f"cross-layer equalization: {len(c['pairs'])} pairs in {c['sweeps']} "
                   f"sweeps, {len(c['skipped'])} layers skipped")
    if "absorption" in rep:
        a = rep["absorption"]
        out.append(f"high-bias absorption: {len(a['absorbed'])} pairs, "
                   f"{len(a['skipped'])} skipped (padding)")
    if "weight_clip" in rep:
        out.append(f"weights clipped to [-{rep['weight_clip']:g}, {rep['weight_clip']:g}]")
    if "bias_correction" in rep:
        b = rep["bias_correction"]
        out.append(f"bias correction ({b['mode']}): {len(b.get('corrected', []))} layers, "
                   f"{len(b.get('uncorrected', []))} without a known input mean")
    return out


def run(args: argparse.Namespace) -> dict:
    """DFQ -> quantize -> calibrate -> evaluate -> write; the report."""
    from ..ptq.zeroq import distill_batches

    _check_args(args)
    if not (args.calib or args.distill_range):
        raise QuantOpsError("the activation ranges need data: give --calib DATA "
                            f"({DATA_HELP}) or --distill-range (ZeroQ, no real data)")
    policy, policy_name = policy_for(args)
    r = PTQRun(args, calib_required=False)
    model, src, bs = r.model, r.src, args.batch_size
    report: dict = {"command": "dfq", "model": r.name, "symbol": src.symbol,
                    "params": src.params, "policy": policy_name,
                    "policy_dict": policy.to_dict(), "steps": {}}
    r.evaluate("float", "float")
    distilled = None
    if args.distill_range:
        shp = src.input_shape or model.input_shape
        if shp is None:
            raise QuantOpsError(f"{src.label}: --distill-range needs the input shape of a "
                                "model that is not bundled: give --input-shape N,C,H,W")
        lo_hi = tuple(args.input_range) if args.input_range else _pixel_range(src)
        with r.stage("distill"):
            distilled = distill_batches(model.run_graph, model.params, (bs,) + tuple(shp[1:]),
                                        num_batches=args.distill_batches,
                                        steps=args.distill_steps,
                                        data_name=model.data_names[0], progress=r.progress,
                                        input_range=lo_hi)
        report["distill"] = {"batches": args.distill_batches, "batch_size": bs,
                             "steps": args.distill_steps, "input_range": lo_hi}
    calib_batches = r.calib.batches(bs) if r.calib is not None else None
    with r.stage("dfq"):
        apply_steps(model, args, policy, calib_batches, report["steps"])
    r.evaluate("float_after_dfq", "float after DFQ")
    with r.stage("quantize + calibrate"):
        model.quantize(policy)
        data = distilled if distilled is not None else calib_batches
        model.calibrate(data, args.method, progress=r.progress)
    report["calibration"] = {"method": args.method,
                             "data": "ZeroQ distilled" if distilled is not None
                             else r.calib.source,
                             "images": sum(len(b) for b in data),
                             "notes": [] if r.calib is None else r.calib.notes}
    r.evaluate("quantized", "quantized")
    report["quantizers"] = len(model.table)
    report["notes"] = model.notes
    return r.finish(report, _markdown, _print)


def _markdown(rep: dict) -> str:
    lines = [f"# DFQ: {rep['model']}", "", f"- model: `{rep['symbol']}`, `{rep['params']}`",
             f"- policy: {rep['policy']} ({rep['quantizers']} quantizers)", "", "## Steps", ""]
    lines += [f"- {s}" for s in step_lines(rep["steps"])]
    cle = rep["steps"].get("cle")
    if cle and cle["skipped"]:
        lines += ["", "Layers equalization skipped:", ""]
        lines += [f"- `{a}`: {why}" for a, why in cle["skipped"]]
    c = rep["calibration"]
    lines += ["", "## Activation ranges", "",
              f"- {c['method']} on {c['images']} images: {c['data']}"]
    if "distill" in rep:
        d = rep["distill"]
        rng = d["input_range"]
        lines.append(f"- ZeroQ: {d['batches']} batches of {d['batch_size']}, {d['steps']} Adam "
                     "steps each, inputs " + ("unbounded" if rng is None else
                                              f"in [{rng[0]:.4g}, {rng[1]:.4g}]"))
    lines += [f"- {n}" for n in c["notes"]]
    if "accuracy" in rep:
        a = rep["accuracy"]
        lines += ["", f"## Top-1 on {a['images']} images ({a['test']})", "",
                  "| float | float after DFQ | quantized |", "|---|---|---|",
                  f"| {pct(a['float'])} | {pct(a['float_after_dfq'])} | "
                  f"{pct(a['quantized'])} |"]
    return "\n".join(lines + seconds_and_files(rep)) + "\n"


def _print(rep: dict) -> None:
    print(f"{rep['model']}: DFQ, quantized with {rep['policy']} ({rep['quantizers']} "
          f"quantizers), ranges {rep['calibration']['method']} on "
          f"{rep['calibration']['images']} images ({rep['calibration']['data']})")
    for s in step_lines(rep["steps"]):
        print(f"  {s}")
    if "accuracy" in rep:
        a = rep["accuracy"]
        print(f"top-1 on {a['images']} images: float {pct(a['float'])}, after DFQ "
              f"{pct(a['float_after_dfq'])}, quantized {pct(a['quantized'])}")
    print(f"{rep['seconds']['total']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)
