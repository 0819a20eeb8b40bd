"""``utils/export_onnx.py`` (console script ``qo-export-onnx``): a quantized symbol + params
to ONNX QDQ, a TensorRT calibration cache and a ranges JSON, checked against onnxruntime."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import QuantOpsError
from ..model import QuantizedModel
from .common import no_overwrite, output_name, run_command, shape


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="export_onnx",
        description="Export a quantized symbol + params to ONNX (QuantizeLinear/"
                    "DequantizeLinear), a TensorRT calibration cache and a ranges JSON, "
                    "and check onnxruntime against MXNet on the same input.")
    p.add_argument("--symbol", type=Path, required=True, help="quantized symbol JSON")
    p.add_argument("--params", type=Path, required=True, help="its params")
    p.add_argument("--input-shape", type=shape, default=(1, 3, 224, 224))
    p.add_argument("--check-input", type=Path,
                   help=".npy input for the alignment check (default: uniform random)")
    p.add_argument("--opset", type=int, default=13)
    p.add_argument("--trt-version", type=int, default=8601,
                   help="TensorRT version written in the cache header (e.g. 8601)")
    p.add_argument("--name", help="file name stem (default: from the symbol file)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    return p


def run(args: argparse.Namespace) -> dict:
    """Export, check the alignment (``<name>.alignment.json``), all or none; the report."""
    import numpy as np

    if args.trt_version <= 0:
        raise QuantOpsError(f"--trt-version must be a positive integer (TensorRT's number "
                            f"for itself, 8601 for 8.6.1), got {args.trt_version}")
    model = QuantizedModel.from_symbol(args.symbol, args.params)
    name = output_name(args.name) if args.name else model.name
    no_overwrite(args.out, [f"{name}{ext}" for ext in (".onnx", ".calib.cache", ".ranges.json",
                                                      ".alignment.json")],
                 [args.symbol, args.params, args.check_input])
    if args.check_input:
        try:
            x = np.load(args.check_input, allow_pickle=False).astype(np.float32)
        except (OSError, ValueError) as e:
            raise QuantOpsError(f"{args.check_input}: cannot read ({e})") from None
    else:
        x = np.random.default_rng(0).uniform(0, 1, args.input_shape).astype(np.float32)
    ex = model.export(args.out, name, tuple(x.shape), args.opset, args.trt_version,
                      check_input=x)
    report = ex.alignment
    print(f"wrote {ex.onnx}, {ex.cache}, {ex.ranges_json}")
    for i, o in enumerate(report["outputs"]):
        print(f"output {i}: max |mxnet - onnxruntime| = {o['max_abs_diff']:.3g} "
              f"(max |y| {o['max_abs']:.3g}), cosine {o['cosine']:.8f}")
    print(f"int8 codes identical at every QuantizeLinear: end to end min "
          f"{report['identical_min']:.6f} (all {report['identical_all']:.6f}); per layer min "
          f"{report['per_layer_identical_min']:.6f} (all {report['per_layer_identical_all']:.6f});"
          f" quantizer alone min {report['isolated_identical_min']:.6f}")
    return report


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)
