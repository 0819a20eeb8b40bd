"""EasyQuant on the project's Fashion-MNIST models: test accuracy of min/max calibration
and of EasyQuant started from it, at INT8 and INT7 (per-channel weights, per-tensor
activations, BatchNorm folded for deployment).

    python bench/easyquant_fmnist.py [--models resnet20 mobilenetv2] [--calib 512]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import quant_ops  # noqa: E402,F401
from quant_ops.calib.graph_calib import calibrate_graph  # noqa: E402
from quant_ops.datasets import fashion_mnist  # noqa: E402
from quant_ops.errors import QuantOpsError  # noqa: E402
from quant_ops.fileio import atomic_write_text  # noqa: E402
from quant_ops.prepare import quantize_graph  # noqa: E402
from quant_ops.ptq.common import accuracy, load_fmnist_model  # noqa: E402
from quant_ops.ptq.easyquant import easyquant  # noqa: E402


def policy(bits: int) -> dict:
    return {"preset": "trt_int8", "weight": {"bits": bits, "per_channel": True},
            "activation": {"bits": bits}}


def run_model(name: str, args, train, test) -> list:
    model = load_fmnist_model(name)
    rng = np.random.default_rng(args.seed)
    idx = rng.choice(len(train[0]), args.calib, replace=False)
    xc = model.normalize(train[0][idx])
    batches = [xc[i:i + args.batch] for i in range(0, len(xc), args.batch)]
    xt, yt = model.normalize(test[0]), test[1]
    float_acc = accuracy(model.graph, model.params, xt, yt)
    rows = []
    for bits in args.bits:
        q = quantize_graph(model.graph, model.params, policy(bits), fold_bn="deploy")
        calib, _ = calibrate_graph(q.graph, q.params, batches, "minmax", progress=False)
        acc_calib = accuracy(q.graph, calib, xt, yt)
        t = time.perf_counter()
        tuned, report = easyquant(q.graph, calib, batches, nbits=bits, rounds=args.rounds,
                                  points=args.points, progress=not args.quiet)
        seconds = time.perf_counter() - t
        acc_eq = accuracy(q.graph, tuned, xt, yt)
        layers = report["layers"]
        rows.append({
            "model": name, "bits": bits, "calib_images": len(xc), "test_images": len(xt),
            "float": round(float_acc, 2), "minmax": round(acc_calib, 2),
            "easyquant": round(acc_eq, 2), "gain": round(acc_eq - acc_calib, 2),
            "easyquant_seconds": round(seconds, 1), "layers": len(layers),
            "mean_cosine_before": float(np.mean([r["cosine_before"] for r in layers])),
            "mean_cosine_after": float(np.mean([r["cosine_after"] for r in layers])),
            "min_cosine_before": float(min(r["cosine_before"] for r in layers)),
            "min_cosine_after": float(min(r["cosine_after"] for r in layers)),
            "report": report})
        r = rows[-1]
        print(f"{name:<12} INT{bits}  float {r['float']:6.2f}  minmax {r['minmax']:6.2f}  "
              f"easyquant {r['easyquant']:6.2f}  ({r['gain']:+.2f}, {seconds:.0f} s)",
              flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2"])
    ap.add_argument("--bits", nargs="+", type=int, default=[8, 7])
    ap.add_argument("--calib", type=int, default=512, help="calibration images (train set)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--points", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench/results/easyquant.json"))
    args = ap.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)
    train, test = fashion_mnist("train"), fashion_mnist("test")
    rows = []
    for name in args.models:
        try:
            rows += run_model(name, args, train, test)
        except QuantOpsError as e:
            if "no such model" not in str(e):
                raise
            print(f"{name}: skipped ({e})")
    print()
    print(f"{'model':<12} {'bits':>4} {'float':>7} {'minmax':>7} {'easyquant':>9} {'gain':>6} "
          f"{'cos before':>10} {'cos after':>10} {'seconds':>8}")
    for r in rows:
        print(f"{r['model']:<12} {r['bits']:>4} {r['float']:>7.2f} {r['minmax']:>7.2f} "
              f"{r['easyquant']:>9.2f} {r['gain']:>+6.2f} {r['mean_cosine_before']:>10.5f} "
              f"{r['mean_cosine_after']:>10.5f} {r['easyquant_seconds']:>8.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps({"settings": {k: str(v) if isinstance(v, Path)
                                                         else v for k, v in vars(args).items()},
                                            "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
