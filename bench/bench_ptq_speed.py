"""Speed of the two slowest PTQ methods, EasyQuant and ZeroQ, on the bundled Fashion-MNIST
models, with the settings of the ``bench/ptq_table.py`` rows: 512 calibration images
(RandomState(0) pick of the training set, normalized), batches of 64, ``trt_int8`` policy at
W8A8 and W7A7 with BatchNorm folded for deployment, min/max calibration before EasyQuant;
ZeroQ distils as many batches of 64 as there are calibration batches, 60 Adam steps each,
pixels kept in the model's input range.

The peer, in the same run on the same machine: one float forward pass of the model over the
calibration images (``predict``).  Each method's time is also given in those passes, which
carries across machines better than seconds.

    python bench/bench_ptq_speed.py [--models resnet20 mobilenetv2] [--bits 8 7]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import quant_ops  # noqa: E402,F401
from quant_ops.cli.common import bundled_model  # noqa: E402
from quant_ops.datasets import fashion_mnist  # noqa: E402
from quant_ops.errors import QuantOpsError  # noqa: E402
from quant_ops.fileio import atomic_write_text  # noqa: E402
from quant_ops.model import QuantizedModel  # noqa: E402
from quant_ops.ptq.common import FloatModel, load_fmnist_model, predict  # noqa: E402
from quant_ops.ptq.zeroq import distill_batches  # noqa: E402

BATCH = 64


def timed(fn) -> tuple:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def float_pass(m: FloatModel, calib: list, repeats: int) -> float:
    """Seconds of one float forward pass over the calibration images (best of ``repeats``:
    the peer should not carry the machine's noise into every ratio)."""
    x = np.concatenate(calib)
    return min(timed(lambda: predict(m.graph, m.params, x, BATCH))[1] for _ in range(repeats))


def easyquant_row(m: FloatModel, calib: list, bits: int, progress: bool) -> dict:
    pol = {"preset": "trt_int8", "weight": {"bits": bits}, "activation": {"bits": bits}}
    qm = QuantizedModel(m.graph, m.params).quantize(pol, fold_bn="deploy")
    qm.calibrate(calib, "minmax", progress=False)
    _, sec = timed(lambda: qm.easyquant(calib, progress=progress))
    layers = qm.reports["easyquant"]["layers"]
    return {"method": f"EasyQuant from minmax, W{bits}A{bits}", "seconds": sec,
            "layers": len(layers),
            "mean_layer_cosine_after": float(np.mean([r["cosine_after"] for r in layers]))}


def zeroq_row(m: FloatModel, calib: list, steps: int, progress: bool) -> dict:
    lo, hi = (0 - m.mean) / m.std, (1 - m.mean) / m.std
    shape = (BATCH,) + calib[0].shape[1:]
    _, sec = timed(lambda: distill_batches(m.graph, m.params, shape, num_batches=len(calib),
                                           steps=steps, input_range=(lo, hi),
                                           progress=progress))
    return {"method": f"ZeroQ distillation, {len(calib)}x{BATCH} images, {steps} steps",
            "seconds": sec}


def run_model(name: str, args) -> list:
    m = load_fmnist_model(bundled_model(f"fmnist_{name}"))
    xtr, _ = fashion_mnist("train")
    pick = np.random.RandomState(0).permutation(len(xtr))[:args.calib_images]
    xc = m.normalize(xtr[pick])
    calib = [xc[i:i + BATCH] for i in range(0, len(xc), BATCH)]
    peer = float_pass(m, calib, args.peer_repeats)
    rows = [easyquant_row(m, calib, b, not args.quiet) for b in args.bits]
    if not args.no_zeroq:
        rows.append(zeroq_row(m, calib, args.steps, not args.quiet))
    for r in rows:
        r.update(model=name, images=len(xc), float_pass_seconds=peer,
                 float_passes=r["seconds"] / peer)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                          for k, v in r.items()}), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2"])
    ap.add_argument("--bits", nargs="+", type=int, default=[8, 7])
    ap.add_argument("--calib-images", type=int, default=512)
    ap.add_argument("--steps", type=int, default=60, help="ZeroQ Adam steps per batch")
    ap.add_argument("--no-zeroq", action="store_true")
    ap.add_argument("--peer-repeats", type=int, default=3)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--out", type=Path, default=Path("bench/results/ptq_speed.json"))
    args = ap.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)
    rows, skipped = [], {}
    for name in args.models:
        try:
            rows += run_model(name, args)
        except QuantOpsError as e:
            if "no such model" not in str(e):
                raise
            skipped[name] = str(e)
            print(f"{name}: skipped ({e})")
    print()
    print(f"{'model':<12} {'method':<44} {'seconds':>8} {'float passes':>12}")
    for r in rows:
        print(f"{r['model']:<12} {r['method']:<44} {r['seconds']:>8.1f} "
              f"{r['float_passes']:>12.0f}")
    if rows:
        print(f"float passes: the time over that of one float forward pass of the model over "
              f"the {rows[0]['images']} calibration images, measured in the same run")
    result = {"command": "python bench/bench_ptq_speed.py " + " ".join(argv or sys.argv[1:]),
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "numpy": np.__version__},
              "settings": {k: (str(v) if isinstance(v, Path) else v)
                           for k, v in vars(args).items()},
              "rows": rows, "skipped": skipped}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
