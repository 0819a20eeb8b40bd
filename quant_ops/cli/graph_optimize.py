"""``utils/graph_optimize.py`` (console script ``qo-graph-optimize``): quantize a symbol
graph or a gluoncv model by a policy.

Outputs are written into a hidden temporary folder and moved into place only when
everything succeeded.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import QuantOpsError
from ..fileio import atomic_write_text, staged_dir
from ..model import QuantizedModel
from ..policy import QuantPolicy
from .common import run_command, shape


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="graph_optimize",
        description="Quantize an MXNet symbol graph (or a gluoncv model) by a policy: "
                    "writes the quantized symbol + params, a summary and graph pictures.")
    src = p.add_mutually_exclusive_group(required=True)
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
    p.add_argument("--no-draw", action="store_true", help="skip the graph pictures")
    p.add_argument("--name", help="file name stem of the outputs (default: from the input)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    return p


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
    policy = QuantPolicy.load(args.policy) if args.policy else QuantPolicy.preset(args.preset)
    model = _load_input(args)
    name = args.name or model.name
    float_graph = model.graph
    model.quantize(policy, args.fold_bn, args.relu6_to_relu)
    policy_name = str(args.policy) if args.policy else args.preset
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
    print(summary, end="")
    print(f"\nwrote {out}/")
    return out


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)
