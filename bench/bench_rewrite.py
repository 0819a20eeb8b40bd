"""Speed of the graph rewrite: ``trt_int8`` quantizer insertion on gluoncv architectures,
beside MXNet's own graph quantization pass (``mx.contrib.quantization.quantize_graph``,
calib_mode='none') on the same symbol, in the same run.

Timed end to end as a user sees it: symbol JSON in, quantized ``mx.sym.Symbol`` out (ours:
parse into the IR, insert, write JSON, ``mx.sym.load_json``).

    python bench/bench_rewrite.py [--models resnet50_v1,...] [--repeats 10]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mxnet as mx  # noqa: E402

import quant_ops  # noqa: E402,F401
from quant_ops.graph.ir import Graph  # noqa: E402
from quant_ops.graph.quantize import insert_quantizers  # noqa: E402
from quant_ops.policy import QuantPolicy  # noqa: E402
from quant_ops.zoo import get_model  # noqa: E402

DEFAULT = "resnet50_v1,mobilenetv2_1.0,densenet121,inceptionv3"


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("bench/results/bench_rewrite.json"))
    args = ap.parse_args(argv)
    policy = QuantPolicy.preset("trt_int8")
    rows = []
    for name in args.models.split(","):
        net = get_model(name)
        net.initialize()
        net.hybridize()
        net(mx.nd.zeros((1, 3, 299, 299) if "inception" in name else (1, 3, 224, 224)))
        sym = net(mx.sym.var("data"))
        params = {p.name: p.data() for p in net.collect_params().values()}
        shapes = {k: v.shape for k, v in params.items()}
        text = sym.tojson()
        args_p = {k: v for k, v in params.items() if k in set(sym.list_arguments())}
        aux_p = {k: v for k, v in params.items() if k in set(sym.list_auxiliary_states())}

        def ours():
            rw = insert_quantizers(Graph.from_json(text), policy, shapes)
            return mx.sym.load_json(rw.graph.to_json())

        def mxnet_pass():
            return mx.contrib.quantization.quantize_graph(
                mx.sym.load_json(text), arg_params=args_p, aux_params=aux_p, ctx=mx.cpu(),
                calib_mode="none", quantized_dtype="int8", quantize_mode="full")[0]

        n_ours = len(insert_quantizers(Graph.from_json(text), policy, shapes).table)
        t_ours = median_ms(ours, args.repeats)
        t_mx = median_ms(mxnet_pass, args.repeats)
        rows.append({"model": name, "nodes": len(json.loads(text)["nodes"]),
                     "quantizers": n_ours, "quant_ops_ms": round(t_ours, 2),
                     "mxnet_quantize_graph_ms": round(t_mx, 2),
                     "mxnet/quant_ops": round(t_mx / t_ours, 2)})
    print(f"{'model':<18} {'nodes':>6} {'quantizers':>10} {'quant_ops ms':>12} "
          f"{'mxnet pass ms':>13} {'mxnet/ours':>10}")
    for r in rows:
        print(f"{r['model']:<18} {r['nodes']:>6} {r['quantizers']:>10} {r['quant_ops_ms']:>12} "
              f"{r['mxnet_quantize_graph_ms']:>13} {r['mxnet/quant_ops']:>10}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"repeats": args.repeats, "rows": rows}, f, indent=1)
    os.replace(tmp, args.out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
