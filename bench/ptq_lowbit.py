"""Low-bit PTQ on Fashion-MNIST (no training): nearest rounding with min/max or MSE ranges
against learned rounding (AdaRound layer by layer, BRECQ block by block), at weight /
activation widths below 8 bits.

Writes the "Low-bit PTQ" section of ``docs/results.md`` and ``bench/results/ptq_lowbit.json``.

    python bench/ptq_lowbit.py                     # every row
    python bench/ptq_lowbit.py --resume            # only rows missing or measured on other code

Every row: per-channel symmetric weights, per-tensor symmetric activations (``trt_int8``
with the row's widths, BatchNorm folded for deployment), network input calibrated by
min/max, the same calibration images as the PTQ table, the full test set.  Mixed-precision
rows take the row's weight width as the average bits per weight (``QuantizedModel.
mixed_precision``: each layer 2, 3, 4, 6 or 8 bits), the same model size as the uniform
rows beside them.  A row keeps the
hash of the code it measured (``code_version``) and is run again when that code changes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import quant_ops  # noqa: E402,F401
from quant_ops.cli.common import bundled_model  # noqa: E402
from quant_ops.datasets import fashion_mnist  # noqa: E402
from quant_ops.fileio import atomic_write_text  # noqa: E402
from quant_ops.model import QuantizedModel  # noqa: E402
from quant_ops.ptq.common import accuracy, load_fmnist_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64
WIDTHS = ("W8A8", "W8A6", "W8A4", "W4A8", "W3A8", "W4A4", "W2A8")
#: row label -> (calibration method, learned rounding (None, "adaround" or "brecq": the
#: QuantizedModel method, its defaults), mixed precision at the row's weight width as the
#: average or not)
METHODS = {"min/max, nearest": ("minmax", None, False), "MSE, nearest": ("mse", None, False),
           "entropy, nearest": ("entropy", None, False),
           "auto, nearest": ("auto", None, False), "MSE + AdaRound": ("mse", "adaround", False),
           "MSE + BRECQ": ("mse", "brecq", False),
           "mixed precision, MSE": ("mse", None, True),
           "mixed precision, MSE + AdaRound": ("mse", "adaround", True)}
MEASURED = ("operator_cxx/kernels", "operator_cxx/*.cc", "quant_ops/methods", "quant_ops/refs",
            "quant_ops/calib", "quant_ops/ptq", "quant_ops/graph", "quant_ops/model.py",
            "quant_ops/ops.py", "quant_ops/policy.py", "quant_ops/reference.py")


def code_version() -> str:
    from code_version import expand, hash_files

    return hash_files(expand(MEASURED, ("error_channel.cc",)))


def labels(width: str) -> list:
    """The rows of a width: 8-bit weights compare the calibrators only (nothing to round)."""
    if width.startswith("W8"):
        return [k for k, (_, learn, mixed) in METHODS.items() if not (learn or mixed)]
    return [k for k in METHODS if k != "entropy, nearest"]


def policy(width: str) -> dict:
    w, a = (int(v) for v in width[1:].split("A"))
    return {"preset": "trt_int8", "weight": {"bits": w}, "activation": {"bits": a}}


def measure(m, calib: list, test: tuple, width: str, label: str) -> dict:
    method, learn, mixed = METHODS[label]
    t = time.perf_counter()
    q = QuantizedModel(m.graph, m.params)
    pol, extra = policy(width), {}
    if mixed:   # the row's weight width as the average; layers take 2, 3, 4, 6 or 8 bits
        budget = pol.pop("weight")["bits"]
        pol = q.mixed_precision(calib, budget, base=pol, progress=False)
        extra["average_bits"] = round(q.reports["mixed_precision"]["average_bits"], 3)
    q.quantize(pol, fold_bn="deploy")
    q.calibrate(calib, method, progress=False)
    if learn:
        getattr(q, learn)(calib, progress=False)
    seconds = time.perf_counter() - t
    return {"accuracy": q.evaluate(*test), "seconds": round(seconds, 1), **extra}


def render(data: dict) -> str:
    lines = ["## Low-bit PTQ on Fashion-MNIST (no training; test set of 10,000 images)", "",
             f"Calibration: the same {data['calib_images']} training images as the PTQ table. "
             "Weights per channel, activations per tensor, BatchNorm folded; seconds: "
             "quantize + calibrate + rounding on 2 cores.  Gap: float minus the row; "
             "`x closer`: the min/max row's gap over this row's.", ""]
    for model, res in data["models"].items():
        lines += [f"### {model} (float {res['float']:.2f}%)", "",
                  "| widths | method | accuracy (%) | gap to float | x closer than min/max | "
                  "seconds |", "|---|---|---|---|---|---|"]
        for width in WIDTHS:
            base = res["rows"].get(f"{width}|min/max, nearest")
            for label in labels(width):
                r = res["rows"].get(f"{width}|{label}")
                if r is None:
                    lines.append(f"| {width} | {label} | not measured | | | |")
                    continue
                gap = res["float"] - r["accuracy"]
                closer = ("-" if base is None or label.startswith("min/max") else
                          f"{(res['float'] - base['accuracy']) / max(gap, 0.01):.1f}")
                shown = (f"{label} (average {r['average_bits']:.2f} bits)"
                         if "average_bits" in r else label)
                lines.append(f"| {width} | {shown} | {r['accuracy']:.2f} | {gap:.2f} | "
                             f"{closer} | {r['seconds']:.0f} |")
        lines.append("")
    lines.append("Regenerate: `python bench/ptq_lowbit.py --resume` (rows measured on other "
                 "code run again).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,mobilenetv2")
    ap.add_argument("--widths", default=",".join(WIDTHS))
    ap.add_argument("--calib-images", type=int, default=512)
    ap.add_argument("--test-images", type=int, default=10000)
    ap.add_argument("--resume", action="store_true",
                    help="keep rows of --json measured on the same code")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "ptq_lowbit.json")
    args = ap.parse_args(argv)
    code = code_version()
    data = {"calib_images": args.calib_images, "models": {}}
    if args.resume and args.json.is_file():
        data = json.loads(args.json.read_text())
    xtr, _ = fashion_mnist("train")
    xte, yte = fashion_mnist("test")
    pick = np.random.RandomState(0).permutation(len(xtr))[:args.calib_images]
    for name in args.models.split(","):
        m = load_fmnist_model(bundled_model(f"fmnist_{name}"))
        xc = m.normalize(xtr[pick])
        calib = [xc[i:i + BATCH] for i in range(0, len(xc), BATCH)]
        test = (m.normalize(xte[:args.test_images]), yte[:args.test_images])
        res = data["models"].setdefault(name, {"rows": {}})
        res["float"] = accuracy(m.graph, m.params, *test)
        for width in args.widths.split(","):
            for label in labels(width):
                key = f"{width}|{label}"
                old = res["rows"].get(key)
                if old is not None and old.get("code") == code:
                    continue
                res["rows"][key] = {**measure(m, calib, test, width, label), "code": code}
                print(json.dumps({"model": name, "row": key, **res["rows"][key]}), flush=True)
                args.json.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(args.json, json.dumps(data, indent=1))
    section = render(data)
    from qat_table import write_section

    write_section(args.out, section, marker="## Low-bit PTQ on Fashion-MNIST")
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
