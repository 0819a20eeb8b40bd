"""Command-line entries (``utils/graph_optimize.py``, console script ``qo-graph-optimize``).

Bad input ends with one line on stderr and exit code 2; outputs are written into a hidden
temporary folder and moved into place only when everything succeeded.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import QuantOpsError
from .fileio import atomic_write_text, staged_dir

log = logging.getLogger(__name__)


def _shape(text: str) -> tuple:
    try:
        dims = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a shape: {text!r} (use e.g. 1,3,224,224)")
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"not a shape: {text!r}")
    return dims


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="graph_optimize",
        description="Quantize an MXNet symbol graph (or a gluoncv model) by a policy: "
                    "writes the quantized symbol + params, a summary and graph pictures.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--symbol", type=Path, help="float model's symbol JSON")
    src.add_argument("--model", help="a gluoncv model-zoo name (random weights)")
    p.add_argument("--params", type=Path, help="params of --symbol")
    p.add_argument("--input-shape", type=_shape, default=(1, 3, 224, 224),
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


def _load_input(args):
    """(name, float Graph, params) from --symbol/--params or --model."""
    import mxnet as mx

    from .graph.ir import Graph, load_graph
    from .graph.params import check_params, load_params
    from .graph.seed import convert_seed_graph, is_seed_graph

    if args.model:
        from .zoo import get_model

        net = get_model(args.model)
        net.initialize(mx.init.Xavier())
        net.hybridize()
        net(mx.nd.zeros(args.input_shape))
        out = net(mx.sym.var("data"))
        if isinstance(out, (list, tuple)):
            out = mx.sym.Group(list(out))
        params = {p.name: p.data().asnumpy() for p in net.collect_params().values()}
        return args.model, Graph.from_symbol(out), params
    if args.params is None:
        raise QuantOpsError("--symbol needs --params")
    graph = load_graph(args.symbol)
    params = load_params(args.params)
    if is_seed_graph(graph):  # written for the seed toolkit's MXNet build: convert first
        graph, extra = convert_seed_graph(graph, params)
        params.update(extra)
    try:
        sym = graph.to_symbol()
    except mx.base.MXNetError as e:
        raise QuantOpsError(f"{args.symbol}: MXNet cannot load it: "
                            f"{str(e).strip().splitlines()[-1]}") from None
    check_params(sym, params, str(args.params))
    shapes = {k: v.shape for k, v in params.items() if k in set(sym.list_arguments())}
    try:
        sym.infer_shape(data=args.input_shape, **shapes)
    except mx.base.MXNetError as e:
        raise QuantOpsError(f"{args.params}: shapes do not fit {args.symbol}: "
                            f"{' '.join(str(e).split())[:300]}") from None
    name = args.symbol.name.split("-symbol")[0].removesuffix(".json")
    return name, graph, params


def summary_markdown(name: str, table: list, notes: list, policy_name: str) -> str:
    lines = [f"# {name}: quantized with {policy_name}", ""]
    lines += [f"- {n}" for n in notes]
    layers = {r["node"] for r in table}
    lines += [f"- {len(table)} quantizers on {len(layers)} layers", "",
              "| layer | op | input | quantizer | method | bits | granularity |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['node']} | {r['op']} | {r['input']} | {r['quantizer']} | {r['method']} "
              f"| {r['bits']} | {r['granularity']} |" for r in table]
    return "\n".join(lines) + "\n"


def run_graph_optimize(args) -> Path:
    from .graph.params import save_params
    from .policy import QuantPolicy
    from .prepare import quantize_graph

    policy = QuantPolicy.load(args.policy) if args.policy else QuantPolicy.preset(args.preset)
    name, graph, params = _load_input(args)
    name = args.name or name
    q = quantize_graph(graph, params, policy, args.fold_bn, args.relu6_to_relu)
    qsym = q.graph.to_symbol()
    out = args.out
    policy_name = str(args.policy) if args.policy else args.preset
    with staged_dir(out) as tmp:
        (tmp / f"{name}-quant-symbol.json").write_text(q.graph.to_json())
        save_params(tmp / f"{name}-quant-0000.params", qsym, q.params)
        (tmp / "summary.md").write_text(summary_markdown(name, q.table, q.notes, policy_name))
        (tmp / "summary.json").write_text(json.dumps(
            {"model": name, "policy": policy.to_dict(), "notes": q.notes,
             "quantizers": q.table}, indent=2))
        if not args.no_draw:
            from .viz import draw

            draw(graph, tmp / f"{name}-float", title=f"{name} (float)")
            draw(q.graph, tmp / f"{name}-quantized",
                 title=f"{name} quantized ({policy_name}): {len(q.table)} quantizers")
    print(summary_markdown(name, q.table, q.notes, policy_name), end="")
    print(f"\nwrote {out}/")
    return out


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="export_onnx",
        description="Export a quantized symbol + params to ONNX (QuantizeLinear/"
                    "DequantizeLinear), a TensorRT calibration cache and a ranges JSON, "
                    "and check onnxruntime against MXNet on the same input.")
    p.add_argument("--symbol", type=Path, required=True, help="quantized symbol JSON")
    p.add_argument("--params", type=Path, required=True, help="its params")
    p.add_argument("--input-shape", type=_shape, default=(1, 3, 224, 224))
    p.add_argument("--check-input", type=Path,
                   help=".npy input for the alignment check (default: uniform random)")
    p.add_argument("--opset", type=int, default=13)
    p.add_argument("--trt-version", type=int, default=8601,
                   help="TensorRT version written in the cache header (e.g. 8601)")
    p.add_argument("--name", help="file name stem (default: from the symbol file)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    return p


def run_export(args) -> dict:
    import numpy as np

    from .export import export_model
    from .export.align import check_alignment
    from .graph.ir import load_graph
    from .graph.params import check_params, load_params

    graph = load_graph(args.symbol)
    params = load_params(args.params)
    import mxnet as mx

    try:
        sym = graph.to_symbol()
    except mx.base.MXNetError as e:
        raise QuantOpsError(f"{args.symbol}: MXNet cannot load it: "
                            f"{str(e).strip().splitlines()[-1]}") from None
    check_params(sym, params, str(args.params))
    name = args.name or args.symbol.name.split("-symbol")[0].removesuffix(".json")
    if args.check_input:
        try:
            x = np.load(args.check_input).astype(np.float32)
        except (OSError, ValueError) as e:
            raise QuantOpsError(f"{args.check_input}: cannot read ({e})") from None
    else:
        x = np.random.default_rng(0).uniform(0, 1, args.input_shape).astype(np.float32)
    ex = export_model(graph, params, args.out, name, {"data": tuple(x.shape)}, args.opset,
                      args.trt_version)
    report = check_alignment(ex.onnx, ex.graph, ex.params, {"data": x})
    atomic_write_text(args.out / f"{name}.alignment.json", json.dumps(report, indent=1))
    print(f"wrote {ex.onnx}, {ex.cache}, {ex.ranges_json}")
    for i, o in enumerate(report["outputs"]):
        print(f"output {i}: max |mxnet - onnxruntime| = {o['max_abs_diff']:.3g} "
              f"(max |y| {o['max_abs']:.3g}), cosine {o['cosine']:.8f}")
    print(f"int8 codes identical at every QuantizeLinear: end to end min "
          f"{report['identical_min']:.6f} (all {report['identical_all']:.6f}); per layer min "
          f"{report['per_layer_identical_min']:.6f} (all {report['per_layer_identical_all']:.6f});"
          f" quantizer alone min {report['isolated_identical_min']:.6f}")
    return report


def _main(parser: argparse.ArgumentParser, run, argv: list[str] | None) -> int:
    """Run a command: bad input ends with one 'error:' line and exit code 2."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import mxnet as mx

    try:
        run(args)
    except (QuantOpsError, OSError, mx.base.MXNetError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


def graph_optimize_main(argv: list[str] | None = None) -> int:
    return _main(_parser(), run_graph_optimize, argv)


def export_main(argv: list[str] | None = None) -> int:
    return _main(_export_parser(), run_export, argv)
