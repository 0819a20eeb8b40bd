"""What a quantized model buys in speed on this CPU: float32 against INT8 in MXNet (oneDNN)
and in onnxruntime, with MXNet's own INT8 quantization as the peer.

Per model and batch size (2 threads, median of repeated runs, each path timed in its own
process so that no path inherits another's caches or thread pools):

- ``mx_fp32``: the float model in MXNet with oneDNN fusion (``MKLDNN`` backend);
- ``mx_int8``: ``QuantizedModel.to_mxnet_int8()`` of the ``cpu_int8`` model, this
  project's ranges as thresholds; ``mx_int8_trt`` the same from ``trt_int8_shared``;
- ``mx_int8_peer``: MXNet's ``quantize_net_v2`` (its own entropy calibration, same images);
- ``ort_fp32``: the float model exported to ONNX, onnxruntime with optimizations on;
- ``ort_int8``: this project's QDQ export of the ``cpu_int8`` model (``activations="u8"``:
  uint8 zero point 0 on its unsigned tensors, zero point 128 on signed ones);
  ``ort_trt_u8`` the same export of the ``trt_int8_shared`` model (TensorRT's int8 values
  in uint8 codes, zero point 128);
- ``ort_peer``: onnxruntime's own ``quantize_static`` of the float ONNX model (QDQ, U8S8:
  asymmetric uint8 activations, per-channel int8 weights, min/max on the same images),
  onnxruntime's best case on x86 and the peer of ``ort_int8``.

The table gives each INT8 path's speed-up over its own float path (float ms / INT8 ms),
and, for onnxruntime, the layers that stayed in float after its optimizations (from the
optimized model it writes).  On the bundled Fashion-MNIST models it also gives test
accuracy of every path and the top-1 agreement with the simulated model.  gluoncv models
have random weights (speed only) and are calibrated on random images, normalized as gluoncv
normalizes its inputs (signed, as a deployed model's input is).  Every model is
quantized with BatchNorm folded and calibrated by entropy (as the MXNet peer).

    python bench/bench_int8_speed.py                        # every model, batch 1 and 32
    python bench/bench_int8_speed.py --models fmnist_resnet20 --batches 1 --repeat 5
    python bench/bench_int8_speed.py --models mobilenetv2_1.0 --batches 32 --rounds 7 \
        --paths mx_fp32,mx_int8,mx_int8_peer      # one comparison, interleaved
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
THREADS = 2
#: the CPU preset (uint8 codes 0..255 after ReLU, int8 elsewhere, residual-add inputs on
#: one range) and TensorRT's (int8 throughout), quantized the same way
POLICY = "cpu_int8"
TRT_POLICY = "trt_int8_shared"
#: path -> (engine, preset of this project's model or None, ONNX activation codes)
PATHS = {"mx_fp32": ("mx", None, None), "mx_int8": ("mx", POLICY, None),
         "mx_int8_trt": ("mx", TRT_POLICY, None), "mx_int8_peer": ("mx", None, None),
         "ort_fp32": ("ort", None, None), "ort_int8": ("ort", POLICY, "u8"),
         "ort_trt_u8": ("ort", TRT_POLICY, "u8"), "ort_peer": ("ort", None, None)}
PEERS = {p: ("mx_fp32" if p.startswith("mx") else "ort_fp32") for p in PATHS
         if p not in ("mx_fp32", "ort_fp32")}
# name -> input shape (batch 1); bundled models come with their Fashion-MNIST test set
MODELS = {"fmnist_resnet20": (1, 1, 28, 28), "fmnist_mobilenetv2": (1, 1, 28, 28),
          "resnet18_v1": (1, 3, 224, 224), "mobilenetv2_1.0": (1, 3, 224, 224),
          "ssd_512_mobilenet1.0_voc": (1, 3, 512, 512)}


# -- timing, in a child process ------------------------------------------------------------

def _time_mxnet(prefix: str, shape: tuple, repeat: int, fuse: bool) -> dict:
    import mxnet as mx
    import numpy as np

    sym, args, aux = mx.model.load_checkpoint(prefix, 0)
    if fuse:
        sym = sym.get_backend_symbol("MKLDNN")
    args = {k: v for k, v in args.items() if k in sym.list_arguments()}
    args["data"] = mx.nd.array(_images(shape, shape[0]))
    exe = sym.bind(mx.cpu(), args, aux_states={k: v for k, v in aux.items()
                                                if k in sym.list_auxiliary_states()})
    times = []
    for i in range(repeat + 3):
        t = time.perf_counter()
        for o in exe.forward(is_train=False):
            o.wait_to_read()
        if i >= 3:
            times.append(time.perf_counter() - t)
    return {"ms": 1e3 * float(np.median(times))}


def _time_ort(path: str, shape: tuple, repeat: int) -> dict:
    import numpy as np
    import onnx
    import onnxruntime as ort

    from quant_ops.export.ort import kernel_summary

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    optimized = str(Path(path).with_suffix(".opt.onnx"))
    so.optimized_model_filepath = optimized
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: _images(shape, shape[0])}
    times = []
    for i in range(repeat + 3):
        t = time.perf_counter()
        sess.run(None, feed)
        if i >= 3:
            times.append(time.perf_counter() - t)
    return {"ms": 1e3 * float(np.median(times)), **kernel_summary(onnx.load(optimized))}


def child(argv: list[str]) -> None:
    path, file, shape, repeat = argv[0], argv[1], tuple(json.loads(argv[2])), int(argv[3])
    if path.startswith("ort"):
        r = _time_ort(file, shape, repeat)
    else:
        r = _time_mxnet(file, shape, repeat, fuse=path == "mx_fp32")
    print("RESULT " + json.dumps(r))


def timed(path: str, file: Path, shape: tuple, repeat: int, timeout: float = 900) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MXNET_SUBGRAPH_VERBOSE": "0"}
    try:
        p = subprocess.run([sys.executable, __file__, "--child", path, str(file),
                            json.dumps(list(shape)), str(repeat)], env=env, text=True,
                           capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1][:300]}


# -- building the models --------------------------------------------------------------------

def _data(name: str, shape: tuple):
    """(calibration images, test images, test labels or None)."""
    import numpy as np

    if name.startswith("fmnist_"):
        from quant_ops.datasets import load_data

        meta = json.loads((ROOT / "examples" / "models" / f"{name}.json").read_text())
        norm = ((meta["normalize"]["mean"],), (meta["normalize"]["std"],))
        cal = load_data("fmnist", shape, split="train", normalize=norm, limit=512,
                        progress=False)
        test = load_data("fmnist", shape, split="test", normalize=norm, progress=False)
        return cal.x, test.x, test.y
    return _images(shape, 16), None, None


def _images(shape: tuple, n: int):
    """Random images normalized as gluoncv's transforms normalize (ImageNet mean and std per
    channel), so the input is signed as a deployed model's is: unnormalized [0, 1] pixels
    would let an engine quantize the input as uint8, a case no deployment has."""
    import numpy as np

    x = np.random.default_rng(0).uniform(0, 1, (n,) + tuple(shape[1:]))
    if shape[1] == 3:
        mean = np.array([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
        std = np.array([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
        x = (x - mean) / std
    return x.astype(np.float32)


def _peer(float_model, calib, work: Path) -> Path:
    """MXNet's own INT8 (quantize_net_v2, entropy, channel-wise), saved as a checkpoint."""
    import mxnet as mx
    from mxnet.contrib.quantization import quantize_net_v2

    net = float_model.to_block()
    loader = mx.io.NDArrayIter(data={"data": calib}, batch_size=16)
    qnet = quantize_net_v2(net, quantized_dtype="auto", quantize_mode="full",
                           quantize_granularity="channel-wise", calib_data=loader,
                           calib_mode="entropy", num_calib_examples=len(calib))
    qnet.hybridize(static_alloc=True, static_shape=True)
    qnet(mx.nd.array(calib[:1]))
    prefix = work / "peer"
    qnet.export(str(prefix), 0)
    return prefix


def _ort_peer(float_onnx: Path, calib, out: Path) -> Path:
    """onnxruntime's own static quantization (U8S8 QDQ, per-channel weights, MinMax)."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([calib[i:i + 1] for i in range(len(calib))])

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"data": x}

    quantize_static(str(float_onnx), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    return out


def _accuracy(files: dict, sims: dict, xt, yt) -> dict:
    """Test accuracy of each path and its top-1 agreement with the simulated model it came
    from (peers: with the ``cpu_int8`` simulation)."""
    import mxnet as mx
    import numpy as np

    acc = {f"simulated_{k}": float((v == yt).mean() * 100) for k, v in sims.items()}
    agree = {}
    for key, (engine, preset, _) in PATHS.items():
        f = files.get(key if engine == "mx" else f"{key}@1")
        if f is None or key in ("mx_fp32", "ort_fp32"):
            continue
        if engine == "mx":
            sym, args, aux = mx.model.load_checkpoint(str(f), 0)
            blk = mx.gluon.SymbolBlock(sym, [mx.sym.var("data")])
            for k, v in {**args, **aux}.items():
                if k in blk.collect_params():
                    blk.collect_params()[k]._load_init(v, mx.cpu(), cast_dtype=True,
                                                       dtype_source="saved")
            pred = np.concatenate([blk(mx.nd.array(xt[i:i + 500])).asnumpy().argmax(1)
                                   for i in range(0, len(xt), 500)])
        else:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = THREADS
            sess = ort.InferenceSession(str(f), so, providers=["CPUExecutionProvider"])
            inp = sess.get_inputs()[0].name
            pred = np.array([sess.run(None, {inp: xt[i:i + 1]})[0].argmax(1)[0]
                             for i in range(len(xt))])
        acc[key] = float((pred == yt).mean() * 100)
        agree[key] = float((pred == sims[preset or POLICY]).mean() * 100)
    acc["agreement_with_simulated"] = agree
    return acc


def build(name: str, shape: tuple, work: Path, batches: list[int]) -> dict:
    """Every path's files, the accuracy of each on the test set (bundled models)."""
    from quant_ops import QuantizedModel
    from quant_ops.export.onnx_qdq import export_onnx
    from quant_ops.graph.fold_bn import fold_batchnorm

    if name.startswith("fmnist_"):
        m = QuantizedModel.load(ROOT / "examples" / "models" / name)
    else:
        m = QuantizedModel.from_zoo(name, shape)
    calib, xt, yt = _data(name, shape)
    quantized = {}
    for preset in (POLICY, TRT_POLICY):
        quantized[preset] = m.copy().quantize(preset, fold_bn="deploy")
        quantized[preset].calibrate(calib, "entropy", progress=False)
    files: dict = {}
    errors: dict = {}

    def attempt(key, fn):
        try:
            files[key] = fn()
        except Exception as e:  # noqa: BLE001  (a path that fails is a row that says why)
            errors[key] = f"{type(e).__name__}: {e}"[:300]

    attempt("mx_fp32", lambda: (m.save(work / "fp32"), work / "fp32")[1])
    native = {}

    def make_native(key, preset):
        native[key] = quantized[preset].to_mxnet_int8(calib)
        native[key].save(work / key)
        return work / key

    for key, (engine, preset, _) in PATHS.items():
        if engine == "mx" and preset is not None:
            attempt(key, lambda key=key, preset=preset: make_native(key, preset))
    attempt("mx_int8_peer", lambda: _peer(m, calib, work))
    for b in batches:
        s = (b,) + tuple(shape[1:])
        attempt(f"ort_fp32@{b}", lambda s=s, b=b: export_onnx(
            m.run_graph, m.params, work / f"fp32_{b}.onnx", {"data": s})[0])
        for key, (engine, preset, act) in PATHS.items():
            if engine == "ort" and preset is not None:
                q = quantized[preset]
                attempt(f"{key}@{b}", lambda s=s, b=b, q=q, key=key, act=act: export_onnx(
                    q.run_graph, q.params, work / f"{key}_{b}.onnx", {"data": s},
                    activations=act)[0])
        attempt(f"ort_peer@{b}", lambda s=s, b=b: _ort_peer(
            export_onnx(*fold_batchnorm(m.run_graph, m.params, "deploy"),
                        work / f"fp32_folded_{b}.onnx", {"data": s})[0],
            calib, work / f"peer_{b}.onnx"))
    acc = {}
    if xt is not None:
        sims = {p: q.predict(xt).argmax(1) for p, q in quantized.items()}
        acc = {"float": float((m.predict(xt).argmax(1) == yt).mean() * 100),
               **_accuracy(files, sims, xt, yt)}
    return {"files": {k: str(v) for k, v in files.items()}, "errors": errors,
            "accuracy": acc,
            "native_report": {k: {r: v for r, v in n.report.items() if r != "thresholds"}
                              for k, n in native.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--repeat", type=int, default=20, help="timed runs per path (median)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="times each path's process runs, interleaved with the other paths "
                         "(the median round is reported)")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "int8_speed.json")
    ap.add_argument("--paths", default=",".join(PATHS),
                    help="the paths to time (all are built)")
    args = ap.parse_args(argv)
    paths = args.paths.split(",")
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        ap.error(f"--paths: unknown {', '.join(unknown)} (known: {', '.join(PATHS)})")
    os.environ.setdefault("MXNET_SUBGRAPH_VERBOSE", "0")
    batches = [int(b) for b in args.batches.split(",")]
    results = []
    for name in args.models.split(","):
        shape = MODELS[name]
        with tempfile.TemporaryDirectory(prefix="int8_speed_") as d:
            work = Path(d)
            t0 = time.time()
            built = build(name, shape, work, batches)
            row = {"model": name, "input_shape": list(shape), "accuracy": built["accuracy"],
                   "errors": built["errors"], "native_report": built["native_report"],
                   "build_s": round(time.time() - t0, 1), "batches": {}}
            for b in batches:
                s = (b,) + tuple(shape[1:])
                per = {}
                # rounds interleave the paths, so that a drift of the machine's speed
                # during the run reaches every path alike; the median round is kept
                for _ in range(args.rounds):
                    for path in paths:
                        key = f"{path}@{b}" if path.startswith("ort") else path
                        if key not in built["files"]:
                            per[path] = {"error": built["errors"].get(key, "not built")}
                            continue
                        got = timed(path, Path(built["files"][key]), s, args.repeat)
                        if "ms" not in got or "error" in per.get(path, {}):
                            per[path] = got
                            continue
                        rounds = per.get(path, {}).get("rounds_ms", []) + [got["ms"]]
                        per[path] = {**got, "ms": statistics.median(rounds),
                                     "rounds_ms": rounds}
                for path, peer in PEERS.items():
                    if path in per and peer in per and "ms" in per[path] and "ms" in per[peer]:
                        per[path]["speedup"] = per[peer]["ms"] / per[path]["ms"]
                row["batches"][str(b)] = per
            results.append(row)
            print(json.dumps(row), flush=True)
    print(table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.json.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"threads": THREADS, "repeat": args.repeat, "rounds": args.rounds,
                   "rows": results}, f, indent=1)
    os.replace(tmp, args.json)
    print(f"wrote {args.json}")
    return 0


def table(rows: list) -> str:
    cols = [p for p in PATHS if p not in ("mx_fp32", "ort_fp32")]
    head = (f"{'model':<26} {'batch':>5} {'mx fp32 ms':>10} {'ort fp32 ms':>11} "
            + " ".join(f"{c:>12}" for c in cols) + "  float layers left (ort_int8)")
    lines = [head, "(INT8 columns: speed-up over the same engine's float32; >1 is faster)"]
    for r in rows:
        for b, per in r["batches"].items():
            def ms(p):
                return "-" if p not in per else f"{per[p]['ms']:.2f}" if "ms" in per[p] else "fail"

            def up(p):
                return ("-" if p not in per else f"{per[p]['speedup']:.2f}x"
                        if "speedup" in per[p] else "fail")

            left = per.get("ort_int8", {}).get("float_layers")
            lines.append(f"{r['model']:<26} {b:>5} {ms('mx_fp32'):>10} {ms('ort_fp32'):>11} "
                         + " ".join(f"{up(c):>12}" for c in cols) + "  "
                         + (", ".join(left[:3]) + (" ..." if len(left) > 3 else "")
                            if left else ("none" if left is not None else "-")))
    acc = [r for r in rows if r["accuracy"]]
    if acc:
        lines.append("")
        lines.append("accuracy (%) on the test set; in brackets the top-1 agreement with the "
                     "simulated model of the same preset")
        for r in acc:
            a, g = r["accuracy"], r["accuracy"].get("agreement_with_simulated", {})
            cells = [f"float {a['float']:.2f}"] + [
                f"sim {p} {a[f'simulated_{p}']:.2f}" for p in (POLICY, TRT_POLICY)
                if f"simulated_{p}" in a] + [
                f"{k} {a[k]:.2f} ({g[k]:.1f})" for k in cols if k in a and k in g]
            lines.append(f"{r['model']:<26} " + ", ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        sys.exit(main())
