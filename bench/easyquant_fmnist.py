"""EasyQuant on the project's Fashion-MNIST models: test accuracy of min/max calibration
and of EasyQuant started from it, at INT8 and INT7 (and INT6, where min/max leaves room),
per-channel weights and per-tensor activations, BatchNorm folded for deployment.  Each
calibration set is 512 normalized training images; several subsets (seeds), since the
INT8/INT7 differences are a few test images.

    python bench/easyquant_fmnist.py [--models resnet20 mobilenetv2] [--bits 8 7 6]
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
from quant_ops.cli.common import bundled_model  # noqa: E402
from quant_ops.ptq.common import load_fmnist_model, predict  # noqa: E402
from quant_ops.ptq.easyquant import easyquant  # noqa: E402


def policy(bits: int) -> dict:
    return {"preset": "trt_int8", "weight": {"bits": bits, "per_channel": True},
            "activation": {"bits": bits}}


def closeness(logits: np.ndarray, ref: np.ndarray, y: np.ndarray) -> dict:
    """Accuracy (``common.accuracy``, from the same logits), and how close the quantized
    network is to the float one: top-1 agreement and the mean cosine of the logits (finer
    than accuracy)."""
    num = (logits * ref).sum(1)
    den = np.linalg.norm(logits, axis=1) * np.linalg.norm(ref, axis=1)
    return {"acc": float((logits.argmax(1) == y).mean() * 100),
            "agree": float((logits.argmax(1) == ref.argmax(1)).mean() * 100),
            "logit_cos": float(np.mean(num / np.maximum(den, 1e-30)))}


def compact(report: dict) -> dict:
    """The search report without the per-channel factor lists (their min and mean kept)."""
    layers = []
    for r in report["layers"]:
        wf = r["weight_factors"] or [1.0]
        layers.append({"layer": r["layer"], "rows": r["rows"],
                       "cosine_before": round(r["cosine_before"], 7),
                       "cosine_after": round(r["cosine_after"], 7),
                       "act_factor": None if r["act_factor"] is None
                       else round(r["act_factor"], 4),
                       "weight_factor_min": round(min(wf), 4),
                       "weight_factor_mean": round(float(np.mean(wf)), 4)})
    return {**{k: v for k, v in report.items() if k != "layers"}, "layers": layers}


def run_model(name: str, args, train, test) -> list:
    model = load_fmnist_model(bundled_model(f"fmnist_{name}"))
    xt, yt = model.normalize(test[0]), test[1]
    ref = predict(model.graph, model.params, xt)
    float_acc = float((ref.argmax(1) == yt).mean() * 100)
    rows = []
    for bits in args.bits:
        q = quantize_graph(model.graph, model.params, policy(bits), fold_bn="deploy")
        runs = []
        for seed in args.seeds:
            idx = np.random.default_rng(seed).choice(len(train[0]), args.calib, replace=False)
            xc = model.normalize(train[0][idx])
            batches = [xc[i:i + args.batch] for i in range(0, len(xc), args.batch)]
            calib, _ = calibrate_graph(q.graph, q.params, batches, "minmax", progress=False)
            t = time.perf_counter()
            tuned, report = easyquant(q.graph, calib, batches, nbits=bits, rounds=args.rounds,
                                      points=args.points, progress=not args.quiet)
            seconds = time.perf_counter() - t
            before = closeness(predict(q.graph, calib, xt), ref, yt)
            after = closeness(predict(q.graph, tuned, xt), ref, yt)
            layers = report["layers"]
            runs.append({"seed": seed, "minmax": before, "easyquant": after,
                         "easyquant_seconds": round(seconds, 1),
                         "mean_layer_cosine_before": float(np.mean(
                             [r["cosine_before"] for r in layers])),
                         "mean_layer_cosine_after": float(np.mean(
                             [r["cosine_after"] for r in layers])),
                         "report": compact(report)})
            print(f"{name:<12} INT{bits} seed {seed}: minmax {before['acc']:6.2f}  easyquant "
                  f"{after['acc']:6.2f} ({after['acc'] - before['acc']:+.2f}; agreement with "
                  f"float {before['agree']:.2f} -> {after['agree']:.2f}; {seconds:.0f} s)",
                  flush=True)

        def mean(method, key):
            return float(np.mean([r[method][key] for r in runs]))

        gains = [r["easyquant"]["acc"] - r["minmax"]["acc"] for r in runs]
        rows.append({
            "model": name, "bits": bits, "calib_images": args.calib, "test_images": len(xt),
            "seeds": list(args.seeds), "float": round(float_acc, 2),
            "minmax": round(mean("minmax", "acc"), 3),
            "easyquant": round(mean("easyquant", "acc"), 3),
            "gain": round(float(np.mean(gains)), 3), "gain_min": round(min(gains), 2),
            "gain_max": round(max(gains), 2),
            "agree_minmax": round(mean("minmax", "agree"), 3),
            "agree_easyquant": round(mean("easyquant", "agree"), 3),
            "logit_cos_minmax": round(mean("minmax", "logit_cos"), 6),
            "logit_cos_easyquant": round(mean("easyquant", "logit_cos"), 6),
            "easyquant_seconds": round(float(np.mean([r["easyquant_seconds"] for r in runs])),
                                       1),
            "runs": runs})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2"])
    ap.add_argument("--bits", nargs="+", type=int, default=[8, 7, 6],
                    help="6: beyond the brief, where min/max leaves room to gain")
    ap.add_argument("--calib", type=int, default=512, help="calibration images (train set)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--points", type=int, default=100)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                    help="one calibration subset per seed; the table shows their means")
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
    print(f"{'model':<12} {'bits':>4} {'float':>6} {'minmax':>7} {'easyq':>7} {'gain':>6} "
          f"{'gain range':>13} {'agree mm':>8} {'agree eq':>8} {'logcos mm':>9} "
          f"{'logcos eq':>9} {'eq s':>5}")
    for r in rows:
        print(f"{r['model']:<12} {r['bits']:>4} {r['float']:>6.2f} {r['minmax']:>7.2f} "
              f"{r['easyquant']:>7.2f} {r['gain']:>+6.2f} "
              f"{'[%+.2f, %+.2f]' % (r['gain_min'], r['gain_max']):>13} "
              f"{r['agree_minmax']:>8.2f} {r['agree_easyquant']:>8.2f} "
              f"{r['logit_cos_minmax']:>9.5f} {r['logit_cos_easyquant']:>9.5f} "
              f"{r['easyquant_seconds']:>5.0f}")
    print("accuracy in % on the 10k test images (mean over the calibration subsets); agree: "
          "top-1 agreement with the float model; logcos: mean cosine of the logits to float")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps({"settings": {k: str(v) if isinstance(v, Path)
                                                         else v for k, v in vars(args).items()},
                                            "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
