#!/usr/bin/env python
"""Entropy calibration time: ``quant_ops.calib.EntropyObserver`` vs MXNet 1.9.1's built-in.

For each of ``--tensors`` activation tensors (default 20), ``--batches`` float32 batches of
``--shape`` (default 3 x 64x64x32x32) are generated once (untimed) and then calibrated by:

* ``ours``: ``EntropyObserver`` one pass -- ``observe`` per batch (``|x|`` histogram, 2048 bins,
  re-binned when the max grows), then ``amax()`` (TensorRT's KL search, 128 levels);
* ``ours 2-pass``: a ``MinMaxObserver`` pass for the global max, then ``EntropyObserver`` with
  ``amax_hint`` (exact histogram), then ``amax()``;
* ``mxnet``: what ``mx.contrib.quantization.quantize_model(calib_mode='entropy')`` runs:
  ``_LayerHistogramCollector.collect``'s numpy (min, max, ``np.histogram`` with 8001 bins over
  ``[-th, th]``, ``combine_histogram`` when ``th`` grows), then ``_get_optimal_threshold``
  (the C++ ``_contrib_calibrate_entropy`` operator, 255 levels, OpenMP).

The two compute different variants of the rule (MXNet: signed 8001-bin histogram, 255 levels,
smoothed KL; ours: |x| 2048 bins, 128 levels, TensorRT/pytorch-quantization conventions), so the
thresholds are reported side by side, not compared. Each implementation is timed per tensor as the
median of ``--repeats`` runs (``time.perf_counter``), implementations interleaved per repeat.
The collection time (histograms) and the search time (``amax`` / ``_get_optimal_threshold``) are
reported separately and summed over the tensors.

    PYTHONPATH=. python bench/bench_entropy.py [--quick] [--tensors N] [--repeats R] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _requested_threads(argv) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--threads", type=int, default=None)
    ns, _ = pre.parse_known_args(argv)
    if ns.threads is not None:
        return max(1, ns.threads)
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else (os.cpu_count() or 1)


# MXNet reads OMP_NUM_THREADS once when it loads (default: half the CPUs); give its OpenMP
# entropy operator every CPU unless told otherwise.
if __name__ == "__main__" and "mxnet" not in sys.modules:
    os.environ["OMP_NUM_THREADS"] = str(_requested_threads(sys.argv[1:]))

import mxnet as mx  # noqa: E402
from mxnet.contrib import quantization as mxq  # noqa: E402

from quant_ops.calib import EntropyObserver, MinMaxObserver  # noqa: E402

KINDS = ("relu_gauss", "gauss", "laplace", "relu_heavy")


def make_batches(t: int, n_batches: int, shape, seed: int = 0):
    """Batches of activation tensor ``t``: a distribution from KINDS, batch scales that grow."""
    rng = np.random.default_rng(seed * 1000 + t)
    kind = KINDS[t % len(KINDS)]
    out = []
    for b in range(n_batches):
        scale = np.float32((0.5 + 0.1 * t) * (1.0 + 0.15 * b))
        x = rng.standard_normal(shape, dtype=np.float32)
        if kind == "relu_gauss":
            x -= np.float32(0.3)
            np.maximum(x, 0, out=x)
        elif kind == "laplace":
            x = rng.laplace(0.0, 1.0, shape).astype(np.float32)
        elif kind == "relu_heavy":
            x *= np.exp(np.float32(0.5) * rng.standard_normal(shape, dtype=np.float32))
            np.maximum(x, 0, out=x)
        x *= scale
        out.append(x)
    return kind, out


def run_ours(batches):
    t0 = time.perf_counter()
    obs = EntropyObserver("bench")
    for x in batches:
        obs.observe(x)
    t1 = time.perf_counter()
    amax = obs.amax()
    t2 = time.perf_counter()
    return amax, t1 - t0, t2 - t1


def run_ours_two_pass(batches):
    t0 = time.perf_counter()
    mm = MinMaxObserver("bench")
    for x in batches:
        mm.observe(x)
    obs = EntropyObserver("bench", amax_hint=mm.amax())
    for x in batches:
        obs.observe(x)
    t1 = time.perf_counter()
    amax = obs.amax()
    t2 = time.perf_counter()
    return amax, t1 - t0, t2 - t1


def run_mxnet(batches, num_bins: int = 8001):
    # _LayerHistogramCollector.collect without the NDArray handle copy (the arrays are numpy here)
    t0 = time.perf_counter()
    hist_data = None
    for arr in batches:
        lo, hi = np.min(arr), np.max(arr)
        th = max(abs(lo), abs(hi))
        if hist_data is None:
            hist, edges = np.histogram(arr, bins=num_bins, range=(-th, th))
            hist_data = (hist, edges, lo, hi, th)
        else:
            hist_data = mxq.combine_histogram(hist_data, arr, lo, hi, th)
    t1 = time.perf_counter()
    _, _, th, _ = mxq._get_optimal_threshold(hist_data, "int8", num_quantized_bins=255)
    t2 = time.perf_counter()
    return float(np.asarray(th).reshape(-1)[0]), t1 - t0, t2 - t1


IMPLS = {"ours": run_ours, "ours_2pass": run_ours_two_pass, "mxnet": run_mxnet}


def _write_json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=20)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--shape", type=str, default="64,64,32,32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="OpenMP threads for MXNet (default: all CPUs)")
    ap.add_argument("--quick", action="store_true", help="4 tensors of 16x64x32x32, 1 repeat")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "bench_entropy.json")
    args = ap.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    if args.quick:
        args.tensors, args.repeats, shape = 4, 1, (16, 64, 32, 32)

    rows = []
    for t in range(args.tensors):
        kind, batches = make_batches(t, args.batches, shape)
        times = {k: {"collect": [], "search": []} for k in IMPLS}
        amax = {}
        for r in range(args.repeats):
            order = list(IMPLS) if r % 2 == 0 else list(IMPLS)[::-1]
            for k in order:
                a, tc, ts = IMPLS[k](batches)
                amax[k] = a
                times[k]["collect"].append(tc)
                times[k]["search"].append(ts)
        row = {"tensor": t, "kind": kind, "max_abs": float(max(np.abs(b).max() for b in batches))}
        for k in IMPLS:
            c = statistics.median(times[k]["collect"])
            s = statistics.median(times[k]["search"])
            row[k] = {"collect_s": c, "search_s": s, "total_s": c + s, "amax": amax[k]}
        rows.append(row)
        print("tensor %2d %-10s max %7.3f | amax ours %7.3f 2pass %7.3f mxnet %7.3f | total ours %.3fs "
              "2pass %.3fs mxnet %.3fs" % (t, kind, row["max_abs"], amax["ours"], amax["ours_2pass"],
                                           amax["mxnet"], row["ours"]["total_s"], row["ours_2pass"]["total_s"],
                                           row["mxnet"]["total_s"]), flush=True)
        del batches

    summary = {}
    for k in IMPLS:
        summary[k] = {part: sum(r[k][part] for r in rows) for part in ("collect_s", "search_s", "total_s")}
    print()
    print("%-11s %11s %11s %11s %14s" % ("impl", "collect s", "search s", "total s", "mxnet/impl"))
    for k in IMPLS:
        s = summary[k]
        print("%-11s %11.3f %11.3f %11.3f %14.2f" % (k, s["collect_s"], s["search_s"], s["total_s"],
                                                     summary["mxnet"]["total_s"] / s["total_s"]))
    print("search only: mxnet/ours = %.1fx; per tensor: ours %.1f ms, mxnet %.1f ms"
          % (summary["mxnet"]["search_s"] / summary["ours"]["search_s"],
             1e3 * summary["ours"]["search_s"] / len(rows), 1e3 * summary["mxnet"]["search_s"] / len(rows)))

    payload = {
        "bench": "bench_entropy",
        "config": {"tensors": args.tensors, "batches": args.batches, "shape": list(shape),
                   "repeats": args.repeats, "timing": "median of repeats per tensor, summed over tensors"},
        "environment": {"python": platform.python_version(), "numpy": np.__version__, "mxnet": mx.__version__,
                        "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                        "machine": platform.machine(), "processor": platform.processor()},
        "impls": {"ours": "EntropyObserver one pass (2048 bins |x|, re-bin on growth, 128 levels)",
                  "ours_2pass": "MinMaxObserver pass + EntropyObserver(amax_hint=max), exact histogram",
                  "mxnet": "np.histogram 8001 bins + combine_histogram + _get_optimal_threshold (255 levels)"},
        "summary": summary,
        "ratio_mxnet_over_ours_total": summary["mxnet"]["total_s"] / summary["ours"]["total_s"],
        "ratio_mxnet_over_ours_search": summary["mxnet"]["search_s"] / summary["ours"]["search_s"],
        "ratio_mxnet_over_ours2pass_total": summary["mxnet"]["total_s"] / summary["ours_2pass"]["total_s"],
        "rows": rows,
    }
    _write_json(args.out, payload)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
