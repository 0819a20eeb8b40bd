"""The ``auto`` calibrator: per tensor, the range among min/max, percentile, MSE and entropy
that least disturbs the layer reading it.

A range that is best for the tensor alone (MSE) or for its histogram's shape (entropy) can
still be wrong for the network: entropy clips a post-ReLU tensor whose tail carries the
signal, min/max wastes a 4-bit grid on one outlier.  What matters is the output of the
convolution or dense layer that reads the quantized tensor, so each candidate is scored by
that layer's output error on sampled output positions of the calibration images, and the
least wins.  The error is measured through the layer's quantized weights, against those
same weights on the unquantized tensor: scored against the float layer instead, a range is
also rewarded for happening to offset the weights' own rounding on the sampled positions, a
fit to the calibration set that does not carry to the test set (MobileNet-v2 W4A8 lost
0.11 point to min/max that way).  A tensor read by no such layer (a residual add, a
pooling) keeps the MSE range.

Each choice is the best for its own layer, but the errors of all layers compound: on
MobileNet-v2 at W3A8 the chosen ranges together left the network output further from float
than min/max did (relative squared error 0.098 against 0.086 on 512 calibration images).  So the
calibration compares the two whole networks on the calibration images
(:func:`nearest_float`) and keeps the chosen ranges only where they are the nearer.
"""
from __future__ import annotations

import logging

import numpy as np
from tqdm import tqdm

from ..graph.ir import Graph
from ..graph.params import as_numpy
from ..graph.quantize import strip_quantizers
from ..graph.runner import Runner
from ..reference import fake_quant

log = logging.getLogger(__name__)
f32 = np.float32


def _weight(ly, run_params: dict) -> np.ndarray:
    """The layer's weight as its quantizer gives it, as conv matrices (groups, og, k)."""
    from ..ptq.layers import as_conv, nearest_weight

    w = as_numpy(run_params[ly.weight]).astype(f32)
    return as_conv((nearest_weight(w, ly) if ly.w_q is not None else w)[None], ly.geo)[0]


def _output(x: np.ndarray, wc: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The layer output (groups, rows, og) computed from input patches ``x`` (rows, g, k)."""
    return np.einsum("rgk,gok->gro", x, wc, optimize=True) + bias[:, None, :]


def choose(graph: Graph, params: dict, batches: list, data_name: str, candidates: dict,
           bits: dict, signed: set, progress: bool = False, max_rows: int = 2048,
           seed: int = 0) -> dict:
    """{tensor: (method, amax)}: for each tensor in ``candidates`` ({tensor: {method:
    amax}}), the candidate with the least output error summed over the layers that read it
    through a signed linear quantizer (``signed``: such tensors); the MSE one otherwise."""
    from ..ptq.layers import (find_layers, float_outputs, inference_params, layer_bias,
                              quantized_inputs)

    layers, _ = find_layers(graph, "auto calibration")
    layers = [ly for ly in layers if ly.tensor in candidates and ly.tensor in signed
              and ly.op != "Deconvolution" and ly.act_q is not None]
    chosen = {t: ("mse", c["mse"]) for t, c in candidates.items()}
    if not layers:
        return chosen
    run_params = inference_params(graph, params)
    fgraph = strip_quantizers(graph)
    # samples the output positions (the float outputs it keeps go unused here)
    float_outputs(layers, fgraph, run_params, batches, data_name, np.random.default_rng(seed),
                  max_rows, 1 << 19, progress, "auto calibration")
    quantized_inputs(layers, fgraph, run_params, batches, data_name, "auto calibration")
    errors: dict = {}
    for ly in layers:
        wc = _weight(ly, run_params)
        bias = layer_bias(ly, run_params, *wc.shape[:2])
        exact = _output(ly.x, wc, bias)            # the tensor unquantized, same weights
        tried: dict = {}
        for method, amax in candidates[ly.tensor].items():
            if amax not in tried:
                y = _output(fake_quant(ly.x, amax, bits[ly.tensor]), wc, bias)
                tried[amax] = float(((y - exact) ** 2).sum())
            errors.setdefault(ly.tensor, {}).setdefault(method, 0.0)
            errors[ly.tensor][method] += tried[amax]
        ly.x = ly.out = None
    order = ("minmax", "percentile", "mse", "entropy")   # ties: the widest range first
    for t, errs in errors.items():
        best = min(order, key=lambda m: (errs[m], order.index(m)))
        chosen[t] = (best, candidates[t][best])
    log.info("auto calibration: %s", ", ".join(
        f"{m} {sum(1 for v in chosen.values() if v[0] == m)}" for m in order))
    return chosen


def output_error(graph: Graph, params: dict, batches: list, data_name: str,
                 progress: bool = False) -> float:
    """Relative squared error of the network outputs against the float network's (the same
    graph with its quantizers stripped) over ``batches``: sum |y_q - y|^2 / sum |y|^2."""
    shape = np.shape(batches[0])
    exact = Runner(strip_quantizers(graph), params, shape, data_name)
    quant = Runner(graph, params, shape, data_name)
    num = den = 0.0
    for x in tqdm(batches, desc="calibration: network error", leave=False,
                  disable=not progress):
        for yq, y in zip(quant(x), exact(x)):
            y = y.astype(np.float64)
            num += float(((yq - y) ** 2).sum())
            den += float((y ** 2).sum())
    err = num / den if den > 0 else num
    return err if np.isfinite(err) else float("inf")


def nearest_float(graph: Graph, options: list, batches: list, data_name: str,
                  progress: bool = False) -> tuple:
    """(index, errors): which of ``options`` (params of ``graph``, e.g. two sets of
    calibrated ranges) brings the network output nearest the float network's; ties go to
    the earlier option."""
    errors = [output_error(graph, p, batches, data_name, progress) for p in options]
    return min(range(len(options)), key=lambda i: (errors[i], i)), errors
