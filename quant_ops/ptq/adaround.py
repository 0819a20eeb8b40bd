"""AdaRound (Nagel et al. 2020, arXiv 2004.10568): learned up/down rounding of each weight.

Rounding every weight to its nearest code is what the quantizer does, and at 2-4 bits it is
far from the best choice for the layer's output.  AdaRound learns, layer by layer, whether
each weight goes to the code below or above it: a rectified sigmoid ``h(V)`` in [0, 1]
per weight, trained to reconstruct the float layer's output from the quantized network's
input, with a regularizer that pushes every ``h`` to 0 or 1 (its exponent annealed from 20
to 2 after a warm-up without it).  The decisions are then folded into the weights
(``codes x scale``), so the result is an ordinary quantized model: the weight quantizer
gives back exactly those codes, and the ONNX export and its alignment with onnxruntime are
unchanged.

Layers whose weight quantizer derives its scale from the weight (``Method.
scale_follows_weight``: max|W| per channel or per tensor) are optimized; the weight that
sets a channel's scale keeps its code, so the scale stays.  The reconstruction error is
computed from the Gram matrix of the layer's input patches on a sample of output positions
(``quant_ops.ptq.layers``), so one step costs one (channels x k) by (k x k) product
whatever the number of images.  A layer keeps its nearest rounding when the learned one
does not lower its error on the sample.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from tqdm import tqdm

from .. import methods
from ..errors import QuantOpsError
from ..graph.ir import Graph
from ..graph.params import as_numpy
from ..graph.quantize import strip_quantizers
from ..reference import abs_max, fake_quant, qrange, scale_of
from .layers import (as_conv, find_layers, float_outputs, inference_params, layer_bias,
                     quantized_inputs, scale_channel)

log = logging.getLogger(__name__)
f32 = np.float32
ZETA, GAMMA = 1.1, -0.1            # the rectified sigmoid's stretch (the paper's values)


def rectified_sigmoid(v: np.ndarray) -> np.ndarray:
    return np.clip(1.0 / (1.0 + np.exp(-v)) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def v_for(rest: np.ndarray) -> np.ndarray:
    """V with h(V) = rest (the start: the float weight itself)."""
    r = np.clip(rest, 1e-4, 1 - 1e-4)
    return -np.log((ZETA - GAMMA) / (r - GAMMA) - 1.0)


def _layer_error(wq: np.ndarray, bias: np.ndarray, gram: np.ndarray, cross: np.ndarray,
                 oo: np.ndarray) -> float:
    """Mean squared error of the layer output over the sampled rows and channels, from
    the Gram matrix: sum_g tr(Wa G Wa') - 2 tr(Wa P) + |O|^2."""
    wa = np.concatenate([wq, bias[..., None]], axis=2)                 # (g, og, k+1)
    quad = (np.matmul(wa, gram) * wa).sum()
    lin = (wa * cross.transpose(0, 2, 1)).sum()
    return float(quad - 2 * lin + oo)


def _round_layer(x: np.ndarray, out: np.ndarray, wc: np.ndarray, s: np.ndarray,
                 pinned: np.ndarray, bias: np.ndarray, bits: int, iters: int, reg: float,
                 beta: tuple[float, float], warmup: float, lr: float) -> tuple:
    """(codes, report) for one layer: ``x`` (rows, g, k) its quantized input patches,
    ``out`` (g, rows, og) the float outputs, ``wc`` (g, og, k) the weight as conv matrices,
    ``s`` (g, og, 1) each output channel's scale, ``pinned`` the weights that keep their
    nearest code."""
    r = len(x)
    xa = np.concatenate([x, np.ones(x.shape[:2] + (1,), f32)], axis=2).transpose(1, 0, 2)
    xa = xa.astype(np.float64)
    norm = r * out.shape[0] * out.shape[2]                # mean over rows and channels
    gram = np.matmul(xa.transpose(0, 2, 1), xa) / norm     # (g, k+1, k+1)
    cross = np.matmul(xa.transpose(0, 2, 1), out) / norm   # (g, k+1, og)
    oo = float((out * out).sum() / norm)
    qmin, qmax = qrange(bits, True)
    wn = wc.astype(np.float64) / s
    floor = np.floor(wn)
    nearest = np.clip(np.rint(wn), qmin, qmax)
    v = v_for(wn - floor)
    m1, m2 = np.zeros_like(v), np.zeros_like(v)
    k = wc.shape[2]
    start = int(warmup * iters)
    for t in range(iters):
        sig = 1.0 / (1.0 + np.exp(-v))
        soft = sig * (ZETA - GAMMA) + GAMMA
        h = np.clip(soft, 0.0, 1.0)
        code = floor + h
        inside = (code >= qmin) & (code <= qmax) & (soft > 0) & (soft < 1) & ~pinned
        wq = s * np.clip(code, qmin, qmax)
        wa = np.concatenate([wq, bias[..., None]], axis=2)
        grad_w = 2 * (np.matmul(wa, gram) - cross.transpose(0, 2, 1))[..., :k]
        grad_h = grad_w * s
        if t >= start:
            b = beta[0] + (beta[1] - beta[0]) * (t - start) / max(iters - start, 1)
            u = 2 * h - 1
            grad_h = grad_h - reg * b * np.abs(u) ** (b - 1) * np.sign(u) * 2
        g = np.where(inside, grad_h * (ZETA - GAMMA) * sig * (1 - sig), 0.0)
        m1 = 0.9 * m1 + 0.1 * g
        m2 = 0.999 * m2 + 0.001 * g * g
        v -= lr * (m1 / (1 - 0.9 ** (t + 1))) / (np.sqrt(m2 / (1 - 0.999 ** (t + 1))) + 1e-8)
    learned = np.where(pinned, nearest, np.clip(floor + (v >= 0), qmin, qmax))
    e_near = _layer_error(s * nearest, bias, gram, cross, oo)
    e_learn = _layer_error(s * learned, bias, gram, cross, oo)
    keep = e_learn < e_near
    return (learned if keep else nearest), {
        "mse_nearest": e_near, "mse_adaround": e_learn if keep else e_near,
        "mse_learned": e_learn, "kept_learned": bool(keep),
        "flipped": float((learned != nearest).mean()) if keep else 0.0}


def adaround(graph: Graph, params: dict, batches: Sequence[np.ndarray], *,
             iters: int = 1000, reg: float = 0.01, beta: tuple[float, float] = (20.0, 2.0),
             warmup: float = 0.2, lr: float = 0.01, data_name: str = "data",
             progress: bool = True, max_rows: int = 1 << 13, max_elements: int = 1 << 20,
             seed: int = 0) -> tuple[dict, dict]:
    """AdaRound on a quantized, calibrated graph; returns (new params, report).

    ``batches``: calibration inputs.  Each Convolution / FullyConnected whose weight
    quantizer derives its scale from the weight gets ``iters`` Adam steps (learning rate
    ``lr``) on its rounding variables, the regularizer (weight ``reg``, exponent annealed
    over ``beta`` after the first ``warmup`` fraction of the steps), in topological order,
    each layer reading the quantized network's input with the layers before it rounded
    already.  Only weights change in the returned params."""
    batches = [np.asarray(as_numpy(b), f32) for b in batches]
    if not batches or not all(len(b) for b in batches):
        raise QuantOpsError("adaround: the calibration set is empty")
    for name, v, ok in (("iters", iters, isinstance(iters, int) and iters >= 1),
                        ("reg", reg, np.isfinite(reg) and reg >= 0),
                        ("lr", lr, np.isfinite(lr) and lr > 0),
                        ("warmup", warmup, 0 <= warmup < 1)):
        if not ok:
            raise QuantOpsError(f"adaround: {name} = {v!r} is out of range")
    layers, skipped = find_layers(graph, "adaround")
    node_of = {n.name: n for n in graph.nodes}
    chosen = []
    for ly in layers:
        q = node_of[ly.w_q] if ly.w_q else None
        m = methods.of_op(q.op) if q is not None else None
        why = ("no weight quantizer" if m is None else
               "its weight scale does not follow the weight" if not m.follows_weight(q.attrs) else
               "its weight is shared with another layer" if not ly.w_search else
               "Deconvolution is not simulated here" if ly.op == "Deconvolution" else None)
        if why:
            skipped.append((ly.name, why))
        else:
            chosen.append(ly)
    if not chosen:
        raise QuantOpsError(f"{graph.source}: adaround: no layer to round (skipped: "
                            + "; ".join(f"{n}: {w}" for n, w in skipped[:3]) + ")")
    run_params = inference_params(graph, params)
    new_params = dict(params)
    float_outputs(chosen, strip_quantizers(graph), run_params, batches, data_name,
                  np.random.default_rng(seed), max_rows, max_elements, progress, "adaround")
    rows = []
    for ly in tqdm(chosen, desc="adaround: layers", disable=not progress):
        quantized_inputs([ly], graph, run_params, batches, data_name, "adaround")
        x = ly.x
        if ly.act_q is not None:
            amax = as_numpy(run_params[ly.minmax]).reshape(-1)[0]
            x = fake_quant(x, amax, ly.act_bits)
        w0 = as_numpy(params[ly.weight]).astype(f32)
        wc = as_conv(w0[None], ly.geo)[0].astype(np.float64)          # (g, og, k)
        g, og, k = wc.shape
        amax_w = abs_max(w0, ly.w_axis)
        chan = scale_channel(ly, g * og)
        s = scale_of(amax_w, ly.w_bits)[chan].astype(np.float64).reshape(g, og, 1)
        top = np.abs(wc) >= amax_w[chan].reshape(g, og, 1)            # sets the scale
        bias = layer_bias(ly, params, g, og, np.float64)
        codes, rep = _round_layer(x, ly.out, wc, s, top, bias, ly.w_bits, iters, reg, beta,
                                  warmup, lr)
        if rep["kept_learned"]:
            w = (s * codes).astype(f32).reshape(w0.shape)   # conv matrices: the same order
            new_params[ly.weight] = run_params[ly.weight] = w
        rows.append({"layer": ly.name, "weight": ly.weight, "bits": ly.w_bits,
                     "rows": int(len(x)), **rep})
        log.info("adaround: %s mse %.4g -> %.4g (%.1f%% of weights rounded the other way)",
                 ly.name, rep["mse_nearest"], rep["mse_adaround"], 100 * rep["flipped"])
        ly.x = None
    return new_params, {"layers": rows, "skipped": [{"layer": n, "reason": w}
                                                    for n, w in skipped],
                        "iters": iters, "reg": reg, "beta": list(beta), "warmup": warmup,
                        "lr": lr, "images": sum(len(b) for b in batches)}
