"""Quantize every gluoncv model-zoo architecture that builds offline with the ``trt_int8``
preset and check, per model: every conv/FC/deconv weight and data input is quantized, the
quantized graph binds and runs, at 16 bits it stays close to float, `strip` gives back the
original graph and outputs exactly, and deploy BN folding keeps the float outputs.

    python bench/zoo_sweep.py [--models a,b,...] [--out bench/results/zoo_sweep.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402

import quant_ops  # noqa: E402
from quant_ops.graph.fold_bn import fold_batchnorm  # noqa: E402
from quant_ops.graph.ir import Graph  # noqa: E402
from quant_ops.graph.quantize import insert_quantizers, strip_quantizers  # noqa: E402
from quant_ops.policy import QuantPolicy  # noqa: E402
from quant_ops.zoo import get_model  # noqa: E402

LAYERS = ("Convolution", "FullyConnected", "Deconvolution")
# (name, input shape, kwargs)
MODELS = [
    ("resnet18_v1", (1, 3, 224, 224), {}), ("resnet50_v1", (1, 3, 224, 224), {}),
    ("resnet18_v2", (1, 3, 224, 224), {}), ("resnet50_v2", (1, 3, 224, 224), {}),
    ("mobilenet1.0", (1, 3, 224, 224), {}), ("mobilenetv2_1.0", (1, 3, 224, 224), {}),
    ("mobilenetv3_large", (1, 3, 224, 224), {}), ("mobilenetv3_small", (1, 3, 224, 224), {}),
    ("vgg16_bn", (1, 3, 224, 224), {}), ("squeezenet1.0", (1, 3, 224, 224), {}),
    ("densenet121", (1, 3, 224, 224), {}), ("inceptionv3", (1, 3, 299, 299), {}),
    ("resnext50_32x4d", (1, 3, 224, 224), {}), ("se_resnext50_32x4d", (1, 3, 224, 224), {}),
    ("se_resnet18_v1", (1, 3, 224, 224), {}), ("resnet50_v1b", (1, 3, 224, 224), {}),
    ("cifar_resnet20_v1", (2, 3, 32, 32), {}), ("cifar_resnet56_v2", (2, 3, 32, 32), {}),
    ("ssd_300_vgg16_atrous_voc", (1, 3, 300, 300), {"pretrained_base": False}),
    ("ssd_512_mobilenet1.0_voc", (1, 3, 512, 512), {"pretrained_base": False}),
    ("yolo3_darknet53_voc", (1, 3, 320, 320), {"pretrained_base": False}),
    ("yolo3_mobilenet1.0_voc", (1, 3, 320, 320), {"pretrained_base": False}),
    ("fcn_resnet50_voc", (1, 3, 224, 224), {"pretrained_base": False}),
    ("psp_resnet50_ade", (1, 3, 480, 480), {"pretrained_base": False}),
    ("deeplab_resnet50_ade", (1, 3, 480, 480), {"pretrained_base": False}),
    ("faster_rcnn_resnet50_v1b_voc", (1, 3, 320, 320), {"pretrained_base": False}),
]


def _first(out):
    while isinstance(out, (list, tuple)):
        out = out[0]
    return out


def layer_outputs(sym, names):
    """The outputs of the named layers, as one grouped symbol."""
    internals = sym.get_internals()
    return mx.sym.Group([internals[n + "_output"] for n in names])


def layer_errors(float_sym, q_sym, names, values_f, values_q, x) -> list:
    """||q - f|| / ||f|| per layer output: detection heads end in NMS, whose discrete
    outputs say little about how close the quantized network computes (and a two-stage
    detector's second stage sees other proposals once one score flips)."""
    yf = bind(layer_outputs(float_sym, names), values_f)(x)
    yq = bind(layer_outputs(q_sym, names), values_q)(x)
    return [float(np.linalg.norm(q.asnumpy() - f.asnumpy()) /
                  max(np.linalg.norm(f.asnumpy()), 1e-12)) for f, q in zip(yf, yq)]


def bind(sym, values):
    blk = mx.gluon.SymbolBlock(sym, [mx.sym.var("data")])
    for k, p in blk.collect_params().items():
        p._load_init(mx.nd.array(values[k]), mx.cpu())
    return blk


def check(name, shape, kwargs) -> dict:
    t0 = time.perf_counter()
    net = get_model(name, **kwargs)
    for p in net.collect_params().values():  # a parameter's own initializer wins
        p.initialize(default_init=mx.init.Xavier(magnitude=2) if p.name.endswith("weight")
                     else mx.init.One() if p.name.endswith("gamma") else mx.init.Zero())
    net.hybridize()
    x = mx.nd.random.uniform(shape=shape)
    y = _first(net(x)).asnumpy()
    out = net(mx.sym.var("data"))
    sym = mx.sym.Group(list(out)) if isinstance(out, (list, tuple)) else out
    params = {p.name: p.data().asnumpy() for p in net.collect_params().values()}
    g = Graph.from_symbol(sym)
    shapes = {k: v.shape for k, v in params.items()}
    t = time.perf_counter()
    rw = insert_quantizers(g, QuantPolicy.from_dict(
        {"preset": "trt_int8", "weight": {"bits": 16}, "activation": {"bits": 16}}), shapes)
    rewrite_s = time.perf_counter() - t
    qnodes = {n.name: n for _, n in rw.graph.ops()}
    missing = [n.name for _, n in g.ops() if n.op in LAYERS for pos in (0, 1)
               if rw.graph.nodes[qnodes[n.name].inputs[pos][0]].op != "Quantization_int8"]
    qsym = rw.graph.to_symbol()
    qvalues = {**params, **rw.new_params}
    blk = bind(qsym, qvalues)
    quant_ops.set_training(blk, True)
    blk(x)                                 # observe the activation ranges once
    quant_ops.set_training(blk, False)
    for k, p in blk.collect_params().items():   # keep the observed ranges for the layer probe
        qvalues[k] = p.data().asnumpy()
    yq = _first(blk(x)).asnumpy()
    scale = max(float(np.abs(y).max()), 1e-12)
    layer_names = [n.name for _, n in g.ops() if n.op in LAYERS]
    layer_err = layer_errors(sym, qsym, layer_names, params, qvalues, x)
    back = strip_quantizers(rw.graph)
    yb = _first(bind(back.to_symbol(), params)(x)).asnumpy()
    fg, fp = fold_batchnorm(g, params, "deploy")
    fsym = fg.to_symbol()
    yf = _first(bind(fsym, fp)(x)).asnumpy()
    # layers that fed no BN compute the same tensor before and after folding (heads included)
    feeds_bn = {g.nodes[n.inputs[0][0]].name for n in g.nodes if n.op == "BatchNorm"}
    unfolded = [n for n in layer_names if n not in feeds_bn]
    fold_layer_err = max(layer_errors(sym, fsym, unfolded, params, fp, x)) if unfolded else 0.0
    return {
        "model": name, "ok": True, "layers": sum(n.op in LAYERS for _, n in g.ops()),
        "quantizers": len(rw.table), "unquantized_layer_inputs": missing,
        "rewrite_ms": round(rewrite_s * 1e3, 2),
        "rel_err_16bit": float(np.abs(yq - y).max() / scale),
        "worst_layer_rel_err_16bit": max(layer_err),
        "median_layer_rel_err_16bit": float(np.median(layer_err)),
        "strip_json_equal": back.to_symbol().tojson() == sym.tojson(),
        "strip_outputs_equal": bool(np.array_equal(yb, y)),
        "bn_folded": sum(n.op == "BatchNorm" for n in g.nodes) -
                     sum(n.op == "BatchNorm" for n in fg.nodes),
        "bn_total": sum(n.op == "BatchNorm" for n in g.nodes),
        "rel_err_bn_fold": float(np.abs(yf - y).max() / scale),
        "worst_layer_rel_err_bn_fold": fold_layer_err,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated subset")
    ap.add_argument("--out", type=Path, default=Path("bench/results/zoo_sweep.json"))
    args = ap.parse_args(argv)
    want = set(args.models.split(",")) if args.models else None
    rows = []
    for name, shape, kw in MODELS:
        if want and name not in want:
            continue
        try:
            r = check(name, shape, kw)
        except Exception as e:  # report and go on: the table says which model failed where
            r = {"model": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:400],
                 "where": traceback.format_exc().splitlines()[-3][:200]}
        rows.append(r)
        print(json.dumps(r), flush=True)
    print(f"\n{'model':<28} {'layers':>6} {'quant':>6} {'rewrite ms':>10} {'16b out':>9} "
          f"{'16b layer max/median':>20} "
          f"{'strip':>6} {'BN fold':>8} {'fold err':>9} {'fold layer':>10}")
    for r in rows:
        if not r["ok"]:
            print(f"{r['model']:<28} FAILED: {r['error'][:90]}")
            continue
        strip = "exact" if r["strip_json_equal"] and r["strip_outputs_equal"] else "DIFF"
        print(f"{r['model']:<28} {r['layers']:>6} {r['quantizers']:>6} {r['rewrite_ms']:>10} "
              f"{r['rel_err_16bit']:>9.1e} {r['worst_layer_rel_err_16bit']:>10.1e}/{r['median_layer_rel_err_16bit']:<9.1e} {strip:>6} {r['bn_folded']:>3}/{r['bn_total']:<4} "
              f"{r['rel_err_bn_fold']:>9.1e} {r['worst_layer_rel_err_bn_fold']:>10.1e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(tmp, args.out)
    bad = [r["model"] for r in rows if not r["ok"] or r["unquantized_layer_inputs"]
           or not (r["strip_json_equal"] and r["strip_outputs_equal"])]
    print(f"\nwrote {args.out}; failing: {bad or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
