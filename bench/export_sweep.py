"""Export check on gluoncv architectures (random weights, ranges observed on random
inputs), for both exports:

- ``s8``: ``trt_int8`` -> calibrate -> deployment graph -> ONNX QDQ (TensorRT's int8);
- ``u8``: ``cpu_int8`` the same way, exported with ``activations="u8"`` (the CPU runtimes'
  uint8 codes on non-negative tensors).

Each is run in MXNet and onnxruntime on the same input: output cosine and max difference,
and the fraction of identical codes at every QuantizeLinear, end to end and for the
quantizer alone.  For ``u8`` also: the largest difference of its onnxruntime outputs from
those of the same model's int8 export (the two must hold the same values), and what
onnxruntime's optimized graph runs on integers and which layers it leaves in float.

    python bench/export_sweep.py [--models a,b] [--out bench/results/export_sweep.json]
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

import quant_ops  # noqa: E402,F401
from quant_ops.export import export_model  # noqa: E402
from quant_ops.export.align import check_alignment  # noqa: E402
from quant_ops.export.ort import kernels, session  # noqa: E402
from quant_ops.graph.ir import Graph  # noqa: E402
from quant_ops.model import QuantizedModel  # noqa: E402
from quant_ops.prepare import quantize_graph  # noqa: E402
from quant_ops.zoo import get_model  # noqa: E402

MODELS = [("resnet18_v1", 224), ("resnet50_v1", 224), ("mobilenetv2_1.0", 224),
          ("mobilenetv3_large", 224), ("vgg16_bn", 224), ("squeezenet1.0", 224),
          ("densenet121", 224), ("inceptionv3", 299), ("cifar_resnet20_v1", 32),
          ("ssd_512_mobilenet1.0_voc", 512)]


def _network(name: str, size: int):
    """(symbol, params, a check input, calibration batches) of the random-weight net."""
    kw = {"pretrained_base": False} if "_voc" in name else {}
    net = get_model(name, **kw)
    for p in net.collect_params().values():
        p.initialize(default_init=mx.init.Xavier(magnitude=2) if p.name.endswith("weight")
                     else mx.init.One() if p.name.endswith("gamma") else mx.init.Zero())
    net.hybridize()
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (2, 3, size, size)).astype(np.float32)
    net(mx.nd.array(x))
    out = net(mx.sym.var("data"))
    sym = mx.sym.Group(list(out)) if isinstance(out, (list, tuple)) else out
    params = {p.name: p.data().asnumpy() for p in net.collect_params().values()}
    calib = [rng.uniform(0, 1, x.shape).astype(np.float32) for _ in range(2)]
    return sym, params, x, calib


def _aligned(ex, x: np.ndarray) -> dict:
    r = check_alignment(ex.onnx, ex.graph, ex.params, {"data": x})
    o = r["outputs"][0]
    return {"quantizers": len(r["quantizers"]), "output_cosine": o["cosine"],
            "output_max_abs_diff": o["max_abs_diff"], "output_max_abs": o["max_abs"],
            "codes_identical_all": r["identical_all"], "codes_identical_min": r["identical_min"],
            "codes_per_layer_all": r["per_layer_identical_all"],
            "codes_per_layer_min": r["per_layer_identical_min"],
            "quantizer_alone_identical_min": r["isolated_identical_min"],
            "onnx_bytes": ex.onnx.stat().st_size}


def check(name: str, size: int, tmp: Path) -> dict:
    t0 = time.perf_counter()
    sym, params, x, calib = _network(name, size)
    row = {"model": name, "ok": True}
    for target, preset in (("s8", "trt_int8"), ("u8", "cpu_int8")):
        q = quantize_graph(Graph.from_symbol(sym), params, preset, fold_bn="qat")
        qp = QuantizedModel(q.graph, q.params).calibrate(calib, "ema", progress=False).params
        ex = export_model(q.graph, qp, tmp / target, name, {"data": x.shape},
                          activations=target)
        row[target] = _aligned(ex, x)
        if target == "u8":
            # the same model's int8 export holds the same values: compare the outputs
            s8 = export_model(q.graph, qp, tmp / "u8_as_s8", name, {"data": x.shape})
            a = session(ex.onnx).run(None, {"data": x})
            b = session(s8.onnx).run(None, {"data": x})
            row[target]["vs_s8_max_rel_diff"] = max(
                float(np.abs(u - v).max() / max(np.abs(v).max(), 1e-12)) for u, v in zip(a, b))
            row[target]["onnxruntime"] = kernels(ex.onnx)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models")
    ap.add_argument("--out", type=Path, default=Path("bench/results/export_sweep.json"))
    args = ap.parse_args(argv)
    want = set(args.models.split(",")) if args.models else None
    rows = []
    for name, size in MODELS:
        if want and name not in want:
            continue
        try:
            with tempfile.TemporaryDirectory() as tmp:     # one model's exports at a time
                r = check(name, size, Path(tmp))
        except Exception as e:  # report and go on
            r = {"model": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:300],
                 "where": traceback.format_exc().splitlines()[-3][:200]}
        rows.append(r)
        print(json.dumps(r), flush=True)
    print(f"\n{'model':<26} {'export':<6} {'quant':>5} {'cosine':>12} {'max|diff|/max|y|':>16} "
          f"{'codes all':>10} {'codes min':>10} {'layer all':>10} {'layer min':>10} "
          f"{'alone min':>9} {'u8-s8':>8} {'int ops':>7}  float layers left")
    for r in rows:
        if not r["ok"]:
            print(f"{r['model']:<26} FAILED: {r['error'][:90]}")
            continue
        for target in ("s8", "u8"):
            e = r[target]
            rel = e["output_max_abs_diff"] / max(e["output_max_abs"], 1e-12)
            k = e.get("onnxruntime")
            left = "" if k is None else (", ".join(k["float_layers"][:3]) or "none") + (
                " ..." if k and len(k["float_layers"]) > 3 else "")
            print(f"{r['model']:<26} {target:<6} {e['quantizers']:>5} {e['output_cosine']:>12.9f} "
                  f"{rel:>16.2e} {e['codes_identical_all']:>10.6f} "
                  f"{e['codes_identical_min']:>10.6f} {e['codes_per_layer_all']:>10.6f} "
                  f"{e['codes_per_layer_min']:>10.6f} {e['quantizer_alone_identical_min']:>9.6f} "
                  f"{e.get('vs_s8_max_rel_diff', float('nan')):>8.1e} "
                  f"{'' if k is None else k['integer_nodes']:>7}  {left}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmpf = tempfile.mkstemp(dir=args.out.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(tmpf, args.out)
    bad = [r["model"] for r in rows if not r["ok"]
           or min(r[t]["quantizer_alone_identical_min"] for t in ("s8", "u8")) < 1]
    print(f"\nwrote {args.out}; failing: {bad or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
