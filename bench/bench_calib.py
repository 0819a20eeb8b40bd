"""Entropy calibration of a whole network: quant_ops (TensorRT EntropyCalibration2 on every
quantized activation; exact two-pass histograms, one network run) beside MXNet's built-in ``quantize_net_v2`` with
``calib_mode='entropy'`` on the same float model and the same images, in one run.

The model is gluoncv's CIFAR ResNet-20 (random weights: the speed does not depend on them)
fed Fashion-MNIST images padded to 32x32 and repeated over 3 channels.

    python bench/bench_calib.py [--images 1024] [--batch 64]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402

import quant_ops  # noqa: E402,F401
from quant_ops.calib.graph_calib import calibrate_graph  # noqa: E402
from quant_ops.datasets import fashion_mnist  # noqa: E402
from quant_ops.graph.ir import Graph  # noqa: E402
from quant_ops.prepare import quantize_graph  # noqa: E402
from quant_ops.zoo import get_model  # noqa: E402


def images(n: int) -> np.ndarray:
    x, _ = fashion_mnist("test")
    x = np.pad(x[:n], ((0, 0), (0, 0), (2, 2), (2, 2)))
    return np.repeat(x, 3, axis=1).astype(np.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("bench/results/bench_calib.json"))
    args = ap.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)
    x = images(args.images)
    batches = [x[i:i + args.batch] for i in range(0, len(x), args.batch)]

    net = get_model("cifar_resnet20_v1")
    net.initialize(mx.init.Xavier())
    net.hybridize()
    net(mx.nd.array(batches[0]))
    sym = net(mx.sym.var("data"))
    params = {p.name: p.data().asnumpy() for p in net.collect_params().values()}
    q = quantize_graph(Graph.from_symbol(sym), params, "trt_int8")

    calibrate_graph(q.graph, q.params, batches[:1], "minmax", progress=False)  # warm-up
    t = time.perf_counter()
    _, ranges = calibrate_graph(q.graph, q.params, batches, "entropy", progress=False)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    calibrate_graph(q.graph, q.params, batches, "entropy", progress=False, passes=1)
    t_two = time.perf_counter() - t

    loader = mx.gluon.data.DataLoader(mx.gluon.data.ArrayDataset(mx.nd.array(x),
                                                                 mx.nd.zeros(len(x))),
                                      batch_size=args.batch)
    t = time.perf_counter()
    mx.contrib.quantization.quantize_net_v2(
        net, quantized_dtype="auto", quantize_mode="full", calib_mode="entropy",
        calib_data=loader, num_calib_examples=len(x), ctx=mx.cpu(),
        logger=logging.getLogger("mxnet_quantize"))
    t_mx = time.perf_counter() - t

    row = {"model": "cifar_resnet20_v1", "images": len(x), "batch": args.batch,
           "tensors_ours": len(ranges), "quant_ops_s": round(t_ours, 3),
           "mxnet_quantize_net_v2_entropy_s": round(t_mx, 3),
           "quant_ops_one_pass_s": round(t_two, 3),
           "mxnet/quant_ops": round(t_mx / t_ours, 2),
           "mxnet/quant_ops_one_pass": round(t_mx / t_two, 2)}
    print(f"{'calibrator':<40} {'seconds':>8}")
    print(f"{'quant_ops entropy (default: exact bins)':<40} {t_ours:>8.2f}")
    print(f"{'quant_ops entropy (passes=1)':<40} {t_two:>8.2f}")
    print(f"{'mxnet quantize_net_v2 calib_mode=entropy':<40} {t_mx:>8.2f}")
    print(f"ratio mxnet / quant_ops: {row['mxnet/quant_ops']:.1f}x (passes=1: "
          f"{row['mxnet/quant_ops_one_pass']:.1f}x) "
          f"({len(x)} images, {len(ranges)} activation tensors calibrated by quant_ops)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(row, f, indent=1)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
