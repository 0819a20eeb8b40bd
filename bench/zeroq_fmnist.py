"""ZeroQ distilled data as a calibration set, against real images, on the project's float
Fashion-MNIST models: test accuracy of W8A8 ``trt_int8`` PTQ (BN folded for deployment)
whose activation ranges are calibrated on

  real         N training images, normalized as the model was trained
  zeroq        N images distilled from the float model's BN statistics (no data used)
  zeroq+range  the same optimization with the pixels kept inside the model's valid input
               range, [(0 - mean) / std, (1 - mean) / std] (known from the normalization,
               not from data)

for the minmax and entropy calibrators.  Also reports the ZeroQ statistic loss of each set
(how far its BN-input statistics are from the running statistics) and the range of the
input quantizer, which no BN constrains.

    python bench/zeroq_fmnist.py [--models resnet20,mobilenetv2] [--images 512]
                                 [--batch 64] [--steps 60] [--lr 0.5]
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
from quant_ops.calib.graph_calib import activation_tensors, calibrate_graph  # noqa: E402
from quant_ops.datasets import fashion_mnist  # noqa: E402
from quant_ops.errors import QuantOpsError  # noqa: E402
from quant_ops.fileio import atomic_write_text  # noqa: E402
from quant_ops.prepare import quantize_graph  # noqa: E402
from quant_ops.cli.common import bundled_model  # noqa: E402
from quant_ops.ptq.common import accuracy, load_fmnist_model  # noqa: E402
from quant_ops.ptq.zeroq import StatisticLoss, distill_batches  # noqa: E402

METHODS = ("minmax", "entropy")


def mean_statistic_loss(model, batches) -> float:
    st = StatisticLoss(model.graph, model.params, batches[0].shape)
    return float(np.mean([st.loss(b)[0] for b in batches]))


def bench_model(name: str, args, x_train, x_test, y_test) -> dict:
    model = load_fmnist_model(bundled_model(f"fmnist_{name}"))
    shape = (args.batch,) + x_train.shape[1:]
    n_batches = args.images // args.batch
    idx = np.random.default_rng(args.seed).choice(len(x_train), n_batches * args.batch,
                                                  replace=False)
    real = model.normalize(x_train[idx])
    x_test = model.normalize(x_test)
    lo, hi = float(model.normalize(np.float32(0.0))), float(model.normalize(np.float32(1.0)))

    sets = {"real": [real[i:i + args.batch] for i in range(0, len(real), args.batch)]}
    seconds = {}
    for key, rng_ in (("zeroq", None), ("zeroq+range", (lo, hi))):
        t = time.perf_counter()
        sets[key] = distill_batches(model.graph, model.params, shape, num_batches=n_batches,
                                    steps=args.steps, lr=args.lr, seed=args.seed,
                                    input_range=rng_, progress=not args.quiet)
        seconds[key] = round(time.perf_counter() - t, 1)
    noise = distill_batches(model.graph, model.params, shape, num_batches=n_batches, steps=0,
                            seed=args.seed, progress=False)
    stat_loss = {"noise (start)": mean_statistic_loss(model, noise)}
    stat_loss.update({k: mean_statistic_loss(model, v) for k, v in sets.items()})

    q = quantize_graph(model.graph, model.params, "trt_int8", fold_bn="deploy")
    input_q = {k: mm for k, (t, mm) in activation_tensors(q.graph).items() if t == "data"}
    norm_amax = max(abs(lo), abs(hi))
    float_acc = accuracy(model.graph, model.params, x_test, y_test)
    rows = []
    for method in METHODS:
        real_ranges = None
        for key, batches in sets.items():
            params, ranges = calibrate_graph(q.graph, q.params, batches, method,
                                             progress=not args.quiet)
            acc = accuracy(q.graph, params, x_test, y_test)
            amax = ranges[next(iter(input_q))]
            # the network input's range set from the normalization instead of calibrated
            fixed = dict(params)
            fixed.update({mm: np.array([norm_amax], np.float32) for mm in input_q.values()})
            acc_fixed = acc if np.isclose(amax, norm_amax, rtol=1e-6) else \
                accuracy(q.graph, fixed, x_test, y_test)
            row = {"data": key, "method": method, "accuracy": round(acc, 2),
                   "input_amax": round(amax, 4), "accuracy_input_from_norm": round(acc_fixed, 2)}
            if key == "real":
                real_ranges, real_acc, real_fixed = ranges, acc, acc_fixed
            else:
                row["delta_vs_real"] = round(acc - real_acc, 2)
                row["delta_vs_real_input_from_norm"] = round(acc_fixed - real_fixed, 2)
                ratio = np.array([ranges[k] / real_ranges[k] for k in ranges
                                  if k not in input_q and real_ranges[k] > 0])
                row["range_ratio_vs_real"] = {"median": round(float(np.median(ratio)), 3),
                                              "min": round(float(ratio.min()), 3),
                                              "max": round(float(ratio.max()), 3)}
            rows.append(row)
            logging.info("%s %s %s: %.2f / %.2f", name, method, key, acc, acc_fixed)
    return {"float_accuracy": round(float_acc, 2), "input_range": [round(lo, 4), round(hi, 4)],
            "input_amax_from_normalization": round(norm_amax, 4),
            "distill_seconds": seconds,
            "statistic_loss_per_batch": {k: round(v, 3) for k, v in stat_loss.items()},
            "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,mobilenetv2")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=0.5, help="Adam step, cosine-decayed to 0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test", type=int, default=10000, help="test images to score on")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--out", type=Path, default=Path("bench/results/zeroq.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.images < args.batch:
        ap.error("--images must be at least --batch")
    x_train, _ = fashion_mnist("train")
    x_test, y_test = fashion_mnist("test")
    x_test, y_test = x_test[:args.test], y_test[:args.test]

    result = {"command": "python bench/zeroq_fmnist.py " + " ".join(argv or sys.argv[1:]),
              "config": {k: (str(v) if isinstance(v, Path) else v)
                         for k, v in vars(args).items()},
              "models": {}, "skipped": {}}
    for name in [m for m in args.models.split(",") if m]:
        try:
            result["models"][name] = bench_model(name, args, x_train, x_test, y_test)
        except QuantOpsError as e:
            if "no such model" not in str(e):
                raise
            result["skipped"][name] = str(e)
            print(f"{name}: skipped ({e})")

    for name, r in result["models"].items():
        print(f"\n{name}: float {r['float_accuracy']:.2f}%, {args.images} calibration images, "
              f"distilled in {r['distill_seconds']} s ({args.steps} Adam steps, lr {args.lr})")
        print("  statistic loss per batch: " + ", ".join(
            f"{k} {v:.2f}" for k, v in r["statistic_loss_per_batch"].items()))
        print(f"  {'method':<8} {'calibration':<12} {'input amax':>10} {'W8A8 acc':>8} "
              f"{'vs real':>7} | {'input amax from normalization':>29}: {'acc':>6} "
              f"{'vs real':>7} | {'act. range / real: median [min, max]':>36}")
        for row in r["rows"]:
            rr = row.get("range_ratio_vs_real")
            rr_s = f"{rr['median']:.3f} [{rr['min']:.3f}, {rr['max']:.3f}]" if rr else ""
            d = f"{row['delta_vs_real']:+.2f}" if "delta_vs_real" in row else ""
            d2 = (f"{row['delta_vs_real_input_from_norm']:+.2f}"
                  if "delta_vs_real" in row else "")
            print(f"  {row['method']:<8} {row['data']:<12} {row['input_amax']:>10.4f} "
                  f"{row['accuracy']:>8.2f} {d:>7} | {r['input_amax_from_normalization']:>29.4f}: "
                  f"{row['accuracy_input_from_norm']:>6.2f} {d2:>7} | {rr_s:>36}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
