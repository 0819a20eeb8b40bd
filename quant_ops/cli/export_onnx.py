"""``utils/export_onnx.py`` (console script ``qo-export-onnx``): a quantized symbol + params
to ONNX QDQ, a TensorRT calibration cache and a ranges JSON, checked against onnxruntime;
with ``--mxnet-int8`` also MXNet's native INT8 model, which a stock mxnet runs."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import QuantOpsError
from ..model import QuantizedModel
from .common import no_overwrite, output_name, run_command, shape
from .model_data import DATA_HELP, floats


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
    p.add_argument("--activations", choices=("s8", "u8"), default="s8",
                   help="activation codes: s8 (as the model's quantizers are: int8, and "
                        "uint8 for cpu_int8's unsigned ones; default) or u8 (every activation "
                        "uint8, signed ones at zero point 128: the same values, onnxruntime's "
                        "fast kernels on x86 CPUs)")
    p.add_argument("--mxnet-int8", action="store_true",
                   help="also write <name>-int8-symbol.json / -0000.params: MXNet's own "
                        "INT8 graph (oneDNN) with this model's ranges")
    p.add_argument("--calib", metavar="DATA",
                   help="with --mxnet-int8: images that give ranges to the tensors MXNet "
                        f"quantizes and this model keeps in float ({DATA_HELP})")
    p.add_argument("--calib-images", type=int, default=None,
                   help="images of --calib to use (default 256)")
    p.add_argument("--mean", type=floats,
                   help="pixel normalization of --calib images (x - mean) / std")
    p.add_argument("--std", type=floats, help="see --mean")
    p.add_argument("--name", help="file name stem (default: from the symbol file)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    return p


def run(args: argparse.Namespace) -> dict:
    """Export, check the alignment (``<name>.alignment.json``), all or none; the report."""
    import numpy as np

    if not 0 < args.trt_version < 10_000_000:
        raise QuantOpsError(f"--trt-version must be TensorRT's number for itself (8601 for "
                            f"8.6.1), got {args.trt_version}")
    unused = [f for f, v in (("--calib-images", args.calib_images), ("--mean", args.mean),
                             ("--std", args.std)) if v is not None]
    if unused and not args.calib:
        raise QuantOpsError(f"{', '.join(unused)}: only for --calib images (with "
                            "--mxnet-int8); give --calib or leave them out")
    model = QuantizedModel.from_symbol(args.symbol, args.params)
    name = output_name(args.name) if args.name is not None else model.name
    outputs = [f"{name}{ext}" for ext in (".onnx", ".calib.cache", ".ranges.json",
                                          ".alignment.json")]
    if args.mxnet_int8:
        outputs += [f"{name}-int8-symbol.json", f"{name}-int8-0000.params"]
    no_overwrite(args.out, outputs, [args.symbol, args.params, args.check_input, args.calib])
    if args.calib and not args.mxnet_int8:
        raise QuantOpsError("--calib is for --mxnet-int8")
    calib = _calib(args, model) if args.calib else None
    if args.check_input:
        try:
            x = np.load(args.check_input, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise QuantOpsError(f"{args.check_input}: cannot read ({e})") from None
        if not isinstance(x, np.ndarray) or x.dtype.kind not in "fiu":
            raise QuantOpsError(f"{args.check_input}: --check-input takes a .npy array of "
                                "the model's input (numbers), not "
                                f"{'an .npz archive' if not isinstance(x, np.ndarray) else x.dtype}")
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise QuantOpsError(f"{args.check_input}: has NaN or infinite values")
    else:
        x = np.random.default_rng(0).uniform(0, 1, args.input_shape).astype(np.float32)
    ex = model.export(args.out, name, tuple(x.shape), args.opset, args.trt_version,
                      check_input=x, activations=args.activations, mxnet_int8=args.mxnet_int8,
                      data=calib)
    report = ex.alignment
    print(f"wrote {ex.onnx}, {ex.cache}, {ex.ranges_json}" +
          (f", {args.out / name}-int8-symbol.json/-0000.params" if args.mxnet_int8 else ""))
    for i, o in enumerate(report["outputs"]):
        print(f"output {i}: max |mxnet - onnxruntime| = {o['max_abs_diff']:.3g} "
              f"(max |y| {o['max_abs']:.3g}), cosine {o['cosine']:.8f}")
    print(f"int8 codes identical at every QuantizeLinear: end to end min "
          f"{report['identical_min']:.6f} (all {report['identical_all']:.6f}); per layer min "
          f"{report['per_layer_identical_min']:.6f} (all {report['per_layer_identical_all']:.6f});"
          f" quantizer alone min {report['isolated_identical_min']:.6f}")
    return report


def _calib(args: argparse.Namespace, model: QuantizedModel):
    from ..datasets import load_data

    if args.calib_images is None:
        args.calib_images = 256
    if args.calib_images < 1:
        raise QuantOpsError(f"--calib-images must be >= 1, got {args.calib_images}")
    if (args.mean is None) != (args.std is None):
        raise QuantOpsError("--mean and --std go together")
    norm = None if args.mean is None else tuple(
        v[0] if len(v) == 1 else list(v) for v in (args.mean, args.std))
    shape = (1,) + tuple(args.input_shape[1:])
    return load_data(args.calib, shape, split="train", normalize=norm,
                     limit=args.calib_images, progress=False).x


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)
