"""``utils/graph_optimize.py`` (console script ``qo-graph-optimize``): quantize a symbol
graph or a gluoncv model by a policy.

With no arguments it runs the seed toolkit's example: gluoncv ResNet-18 v1 (no weights
needed) with the ``trt_int8`` policy, its two pictures and summary in
``out/graph_optimize_example/``.  ``--calib DATA`` (a ``.npy``/``.npz``, an image folder, or
``fmnist``) sets the activation ranges, so the written model is ready for inference; without
it they are empty (learned in QAT, or calibrated later) and the summary says so.  Outputs
are written into a hidden temporary folder and moved into place only when everything
succeeded.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import QuantOpsError
from ..fileio import atomic_write_text, staged_dir
from ..model import QuantizedModel
from ..policy import QuantPolicy
from .common import no_overwrite, output_name, run_command, shape
from .model_data import DATA_HELP, floats

CALIB_METHODS = ("auto", "entropy", "minmax", "percentile", "mse")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="graph_optimize",
        description="Quantize an MXNet symbol graph (or a gluoncv model) by a policy: "
                    "writes the quantized symbol + params, a summary and graph pictures.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--symbol", type=Path, help="float model's symbol JSON")
    src.add_argument("--model", help="a gluoncv model-zoo name (random weights)")
    p.add_argument("--params", type=Path, help="params of --symbol")
    p.add_argument("--input-shape", type=shape, default=(1, 3, 224, 224),
                   help="shape of the input 'data' (default 1,3,224,224)")
    pol = p.add_mutually_exclusive_group()
    pol.add_argument("--policy", type=Path, help="policy file (.json / .yaml)")
    pol.add_argument("--preset", default="trt_int8", help="policy preset (default trt_int8)")
    p.add_argument("--fold-bn", choices=("deploy", "qat"), help="fold BatchNorm layers")
    p.add_argument("--relu6-to-relu", action="store_true", help="replace ReLU6 by ReLU")
    c = p.add_argument_group("calibration (without it, activation ranges are left empty)")
    c.add_argument("--calib", metavar="DATA", help=f"calibration data: {DATA_HELP}")
    c.add_argument("--calib-method", choices=CALIB_METHODS, default="auto",
                   help="activation range statistic (default auto: per tensor, the range "
                        "least disturbing the layer reading it; entropy: TensorRT's)")
    c.add_argument("--calib-images", type=int, default=512,
                   help="images to calibrate on (default 512, or all there are)")
    c.add_argument("--calib-batch", type=int, default=64, help="batch size (default 64)")
    c.add_argument("--mean", type=floats,
                   help="pixel normalization (x - mean) / std of image folders, fmnist and "
                        "uint8 arrays: one value or one per channel (float arrays are "
                        "taken as they are)")
    c.add_argument("--std", type=floats, help="see --mean")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-draw", action="store_true", help="skip the graph pictures")
    p.add_argument("--name", help="file name stem of the outputs (default: from the input)")
    p.add_argument("--out", type=Path,
                   help=f"output folder (default with no model given: {EXAMPLE_OUT})")
    return p


EXAMPLE_MODEL, EXAMPLE_OUT = "resnet18_v1", Path("out/graph_optimize_example")


def _example_defaults(args: argparse.Namespace) -> None:
    """No model given: the seed's example (ResNet-18 v1 from the gluoncv zoo)."""
    if args.symbol is None and args.model is None:
        if args.params is not None:
            raise QuantOpsError("--params needs --symbol")
        args.model = EXAMPLE_MODEL
        args.out = args.out or EXAMPLE_OUT
        print(f"no model given: the example, gluoncv {EXAMPLE_MODEL} (random weights) with "
              f"{args.policy or args.preset}, into {args.out}/")
    if args.out is None:
        raise QuantOpsError("--out is required with --symbol or --model")


def short_summary(model: QuantizedModel, name: str, policy_name: str) -> str:
    """What the terminal gets: counts by method and bits, the notes, where the rest is."""
    counts: dict = {}
    for r in model.table:
        key = (r["input"] == "weight", r["method"], r["bits"], r["granularity"])
        counts[key] = counts.get(key, 0) + 1
    layers = len({r["node"] for r in model.table})
    lines = [f"{name}: {len(model.table)} quantizers on {layers} layers ({policy_name})"]
    lines += [f"  {n:4d} x {'weight' if w else 'activation'} {m} {b}-bit {g}"
              for (w, m, b, g), n in sorted(counts.items(), key=lambda kv: -kv[1])]
    lines += [f"  - {note}" for note in model.notes]
    return "\n".join(lines)


def _calibrate(model: QuantizedModel, args: argparse.Namespace) -> None:
    """Activation ranges from ``--calib``, or a note that they are empty."""
    if args.calib is None:
        empty = model.uncalibrated()
        if empty:
            model.notes.append(
                f"activation ranges are empty ({len(empty)} quantizers): they are learned "
                "in training (QAT) or set by calibration (--calib DATA); inference before "
                "that gives zeros")
        return
    from ..datasets import load_data

    for flag, v in (("--calib-images", args.calib_images), ("--calib-batch", args.calib_batch)):
        if v < 1:
            raise QuantOpsError(f"{flag} must be >= 1, got {v}")
    if (args.mean is None) != (args.std is None):
        raise QuantOpsError("--mean and --std go together")
    norm = None if args.mean is None else tuple(
        v[0] if len(v) == 1 else list(v) for v in (args.mean, args.std))
    data = load_data(args.calib, model.input_shape, split="train", normalize=norm,
                     limit=args.calib_images, progress=not args.no_progress)
    model.set_input_shape((1,) + tuple(data.x.shape[1:]))
    model.calibrate(data.x, args.calib_method, batch_size=args.calib_batch,
                    progress=not args.no_progress)
    model.notes.append(f"activation ranges calibrated ({args.calib_method}) on {len(data)} "
                       f"images of {data.source}" + "".join(f"; {n}" for n in data.notes))


def _load_input(args: argparse.Namespace) -> QuantizedModel:
    """The float model from --symbol/--params or --model, checked against --input-shape."""
    if args.model:
        return QuantizedModel.from_zoo(args.model, args.input_shape)
    if args.params is None:
        raise QuantOpsError("--symbol needs --params")
    model = QuantizedModel.from_symbol(args.symbol, args.params)
    return model.set_input_shape(args.input_shape)


def run(args: argparse.Namespace) -> Path:
    """Quantize, then write symbol, params, summaries and pictures into ``args.out``."""
    _example_defaults(args)
    policy = QuantPolicy.load(args.policy) if args.policy else QuantPolicy.preset(args.preset)
    model = _load_input(args)
    name = output_name(args.name) if args.name is not None else model.name
    no_overwrite(args.out, [f"{name}-quant-symbol.json", f"{name}-quant-0000.params",
                            "summary.md", "summary.json", f"{name}-float.svg",
                            f"{name}-float.png", f"{name}-quantized.svg",
                            f"{name}-quantized.png"],
                 [args.symbol, args.params, args.policy, args.calib])
    float_graph = model.graph
    model.quantize(policy, args.fold_bn, args.relu6_to_relu)
    policy_name = str(args.policy) if args.policy else args.preset
    _calibrate(model, args)
    summary = model.summary(f"{name}: quantized with {policy_name}")
    out = args.out
    with staged_dir(out) as tmp:
        model.save(tmp / f"{name}-quant")
        atomic_write_text(tmp / "summary.md", summary)
        atomic_write_text(tmp / "summary.json", json.dumps(
            {"model": name, "policy": policy.to_dict(), "notes": model.notes,
             "quantizers": model.table}, indent=2))
        if not args.no_draw:
            from ..viz import draw

            draw(float_graph, tmp / f"{name}-float", title=f"{name} (float)")
            draw(model.graph, tmp / f"{name}-quantized",
                 title=f"{name} quantized ({policy_name}): {len(model.table)} quantizers")
    print(short_summary(model, name, policy_name))
    print(f"wrote {out}/ (the full quantizer table: summary.md, summary.json)")
    return out


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)
