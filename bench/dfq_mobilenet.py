"""DFQ (arXiv 1906.04721) on the project's Fashion-MNIST models: test accuracy of the float
model, of naive per-tensor INT8 quantization, and of the same after each DFQ step.

Naive: BatchNorm folded (deploy), ReLU6 kept, quantized by ``quantize_graph`` with per-tensor
INT8 weights (W8A8 also with INT8 activations calibrated by min/max on 512 training images;
W8 and W6: weights only, activations float).
DFQ: ReLU6 -> ReLU, BN folded, cross-layer equalization, high-bias absorption, bias
correction (data-free, or empirical on the same 512 images), quantized the same way.

    python bench/dfq_mobilenet.py [--model mobilenetv2] [--calib 512] [--test 10000]

Prints a table and writes bench/results/dfq.json.
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

import quant_ops  # noqa: E402,F401  (loads the operator library)
from quant_ops.datasets import fashion_mnist  # noqa: E402
from quant_ops.fileio import atomic_write_text  # noqa: E402
from quant_ops.graph.fold_bn import fold_batchnorm  # noqa: E402
from quant_ops.model import QuantizedModel  # noqa: E402
from quant_ops.cli.common import bundled_model  # noqa: E402
from quant_ops.ptq.common import accuracy, load_fmnist_model  # noqa: E402
from quant_ops.ptq.dfq import apply_dfq  # noqa: E402

W_PER_TENSOR = {"method": "int8", "bits": 8, "per_channel": False}
POLICIES = {
    "W8A8": {"weight": W_PER_TENSOR, "activation": {"method": "int8", "bits": 8}},
    "W8": {"weight": W_PER_TENSOR, "overrides": [{"match": "*", "activation": None}]},
    # 6-bit per-tensor weights, float activations: where the steps after CLE show
    "W6": {"weight": {**W_PER_TENSOR, "bits": 6},
           "overrides": [{"match": "*", "activation": None}]},
}
REF_POLICY = {"weight": {"method": "int8", "bits": 8, "per_channel": True},
              "activation": {"method": "int8", "bits": 8}}


def quantized_accuracy(graph, params, policy: dict, calib: list, x, y) -> float:
    """Accuracy after quantizing by ``policy``; activation ranges by min/max over ``calib``."""
    m = QuantizedModel(graph, params).quantize(policy)
    if any(not q.is_weight for q in m.quantizers):
        m.calibrate(calib, "minmax", progress=False)
    return m.evaluate(x, y)


def measure_dfq(model_name: str = "mobilenetv2", calib_images: int = 512,
                test_images: int | None = None, batch: int = 64, seed: int = 0) -> dict:
    """Float, naive and DFQ accuracies of one Fashion-MNIST model, as a JSON-ready dict."""
    model = load_fmnist_model(bundled_model(f"fmnist_{model_name}"))
    xtr, _ = fashion_mnist("train")
    xte, yte = fashion_mnist("test")
    if test_images:
        xte, yte = xte[:test_images], yte[:test_images]
    pick = np.random.default_rng(seed).choice(len(xtr), calib_images, replace=False)
    calib_x = model.normalize(xtr[np.sort(pick)])
    calib = [calib_x[i:i + batch] for i in range(0, len(calib_x) - batch + 1, batch)]
    x = model.normalize(xte)

    t0 = time.time()
    float_acc = accuracy(model.graph, model.params, x, yte)
    naive_g, naive_p = fold_batchnorm(model.graph, model.params, "deploy")
    variants = {
        "naive (BN folded)": (naive_g, naive_p, None),
        "ReLU6->ReLU only": apply_dfq(model.graph, model.params, equalize=False,
                                      absorb_bias=False, bias_correction=None) + (None,),
    }
    cle_rep: dict = {}
    variants["CLE"] = apply_dfq(model.graph, model.params, absorb_bias=False,
                                bias_correction=None, report=cle_rep) + (None,)
    abs_rep: dict = {}
    variants["CLE + absorption"] = apply_dfq(model.graph, model.params, bias_correction=None,
                                             report=abs_rep) + (None,)
    rows = []
    for name, (g, p, _) in variants.items():
        row = {"variant": name, "float": accuracy(g, p, x, yte)}
        for pol_name, pol in POLICIES.items():
            row[pol_name] = quantized_accuracy(g, p, pol, calib, x, yte)
        rows.append(row)
        logging.info("%s: %s", name, row)
    # bias correction depends on the policy it corrects for: one model per policy
    bc_rep: dict = {}
    for mode in ("data_free", "empirical"):
        label = "DFQ: CLE + absorption + bias corr. (" + mode.replace("_", "-") + ")"
        row = {"variant": label, "float": None}
        for pol_name, pol in POLICIES.items():
            rep: dict = {}
            g, p = apply_dfq(model.graph, model.params, bias_correction=mode, policy=pol,
                             calib_batches=calib if mode == "empirical" else None, report=rep)
            bc_rep[mode] = rep.get("bias_correction")
            row[pol_name] = quantized_accuracy(g, p, pol, calib, x, yte)
        rows.append(row)
        logging.info("%s: %s", label, row)
    ref = {"variant": "naive, per-channel weights (reference)", "float": None,
           "W8A8": quantized_accuracy(naive_g, naive_p, REF_POLICY, calib, x, yte), "W8": None,
           "W6": None}
    rows.append(ref)

    naive = rows[0]
    dfq_row = next(r for r in rows if r["variant"].endswith("(data-free)"))
    recovered = {}
    for pol_name in POLICIES:
        lost = float_acc - naive[pol_name]
        recovered[pol_name] = (dfq_row[pol_name] - naive[pol_name]) / lost if lost > 0 else None
    return {
        "model": model_name, "float_accuracy": float_acc, "test_images": len(x),
        "calib_images": len(calib) * batch, "rows": rows,
        "dfq_recovered_fraction_of_naive_loss": recovered,
        "cle_pairs": len(cle_rep["cle"]["pairs"]), "cle_sweeps": cle_rep["cle"]["sweeps"],
        "cle_skipped": [f"{a}: {why}" for a, why in cle_rep["cle"]["skipped"]],
        "absorbed_pairs": len(abs_rep["absorption"]["absorbed"]),
        "absorption_skipped": [f"{a}: {why}" for a, why in abs_rep["absorption"]["skipped"]],
        "bias_corrected_layers": {m: len(r["corrected"]) for m, r in bc_rep.items() if r},
        "seconds": round(time.time() - t0, 1),
        "command": "python bench/dfq_mobilenet.py --model " + model_name,
    }


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenetv2")
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--test", type=int, default=None, help="first N test images (all: 10000)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/dfq.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    res = measure_dfq(args.model, args.calib, args.test)
    print(f"{args.model}: float {res['float_accuracy']:.2f}% on {res['test_images']} test "
          f"images; per-tensor weights, INT8 activations (A8) min/max on "
          f"{res['calib_images']} training images")
    cols = ["float"] + list(POLICIES)
    print(f"{'variant':<52}" + "".join(f" {c:>7}" for c in cols))
    for r in res["rows"]:
        print(f"{r['variant']:<52}" + "".join(f" {_fmt(r[c]):>7}" for c in cols))
    for k, v in res["dfq_recovered_fraction_of_naive_loss"].items():
        print(f"DFQ (data-free) recovers {_fmt(None if v is None else 100 * v)}% of what "
              f"naive {k} loses")
    print(f"CLE: {res['cle_pairs']} pairs, {res['cle_sweeps']} sweeps; skipped: "
          + "; ".join(res["cle_skipped"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
