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
from ..fileio import staged_dir
from .common import checked_symbol, run_command, shape


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


def _load_input(args: argparse.Namespace) -> tuple:
    """(name, float Graph, params) from --symbol/--params or --model."""
    import mxnet as mx

    from ..graph.ir import Graph, load_graph
    from ..graph.params import load_params
    from ..graph.seed import convert_seed_graph, is_seed_graph

    if args.model:
        from ..zoo import get_model

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
    sym = checked_symbol(graph, params, args.params)
    shapes = {k: v.shape for k, v in params.items() if k in set(sym.list_arguments())}
    try:
        sym.infer_shape(data=args.input_shape, **shapes)
    except mx.base.MXNetError as e:
        raise QuantOpsError(f"{args.params}: shapes do not fit {args.symbol}: "
                            f"{' '.join(str(e).split())[:300]}") from None
    name = args.symbol.name.split("-symbol")[0].removesuffix(".json")
    return name, graph, params


def summary_markdown(name: str, table: list, notes: list, policy_name: str) -> str:
    """The quantizer table of one run as Markdown (``summary.md``)."""
    lines = [f"# {name}: quantized with {policy_name}", ""]
    lines += [f"- {n}" for n in notes]
    layers = {r["node"] for r in table}
    lines += [f"- {len(table)} quantizers on {len(layers)} layers", "",
              "| layer | op | input | quantizer | method | bits | granularity |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['node']} | {r['op']} | {r['input']} | {r['quantizer']} | {r['method']} "
              f"| {r['bits']} | {r['granularity']} |" for r in table]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> Path:
    """Quantize, then write symbol, params, summaries and pictures into ``args.out``."""
    from ..graph.params import save_params
    from ..policy import QuantPolicy
    from ..prepare import quantize_graph

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
            from ..viz import draw

            draw(graph, tmp / f"{name}-float", title=f"{name} (float)")
            draw(q.graph, tmp / f"{name}-quantized",
                 title=f"{name} quantized ({policy_name}): {len(q.table)} quantizers")
    print(summary_markdown(name, q.table, q.notes, policy_name), end="")
    print(f"\nwrote {out}/")
    return out


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)
