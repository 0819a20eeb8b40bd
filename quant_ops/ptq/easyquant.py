"""EasyQuant scale search (Wu et al. 2020, arXiv 2006.16669).

Calibration picks each range from one tensor's statistics; EasyQuant instead picks the
scales of a layer (its weight scale and the scale of its input activation) to maximize the
cosine similarity between the float layer output and the quantized one, alternating
between the two, layer by layer in topological order.  The quantized layer reads its input
from the quantized network with the earlier layers already optimized, so every layer
compensates for the error accumulated before it.

How the chosen scales live in a graph:

* an activation scale is the quantizer's ``<quantizer>_minmax`` param (its amax);
* a weight quantizer derives its range from the weight on every call (max|W|, per output
  channel when per-channel), so a weight scale ``f * max|W|`` (``f <= 1``) is realized by
  clipping the weight to ``[-f max|W|, f max|W|]``: the quantizer, and any runtime that
  computes weight scales from the weights (ONNX QDQ export, TensorRT), then sees exactly
  that scale.  Weight factors above 1 cannot be realized this way and are not searched.

The search simulates each layer in numpy as a matrix product over a random sample of its
output positions (im2col rows): a weight candidate needs only the Gram matrix of those rows
(one ``K x K`` product per candidate and channel, all candidates and channels at once), an
activation candidate one quantization of the rows and one product (with the weights, or
with their Gram matrix where a row has fewer inputs than outputs).  Every step keeps the
current scale among its candidates and is accepted only if no layer's cosine drops, so each
layer's cosine after the search is at least its cosine before.  The quantized network's
inputs to the next layers are computed by running only what the new scales changed
(``layers.QuantizedTensors``).

Bit width comes from the graph (the ``nbits`` attribute of each quantizer): build INT7 with
a 7-bit policy, e.g. ``{"preset": "trt_int8", "weight": {"bits": 7}, "activation": {"bits":
7}}``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from tqdm import tqdm

from ..errors import QuantOpsError
from ..graph.ir import Graph
from ..graph.params import as_numpy
from ..graph.quantize import strip_quantizers
from ..reference import abs_max, fake_quant, qrange, scale_of
from .layers import (LINEAR_OPS, Layer, QuantizedTensors, as_conv, channel_view, find_layers,
                     float_outputs, inference_params, quantized_inputs, scale_channel)

log = logging.getLogger(__name__)

f32 = np.float32


# -- numerics -------------------------------------------------------------------------------
def _np(v) -> np.ndarray:
    return as_numpy(v)


def _act_quant(x: np.ndarray, amax, nbits: int, out: np.ndarray | None = None,
               tail: np.ndarray | None = None) -> np.ndarray:
    """``reference.fake_quant`` for a per-tensor activation with a usable range, in place
    into ``out`` (the same float32 operations in the same order: divide by ``s``, round half
    to even, clamp, multiply), because the search quantizes the sample once per candidate.
    ``tail``: flat indices of every element the clamp can change (``_tail``); clamping only
    those gives the same array (a full clamp is a quarter of the time of a candidate)."""
    s = scale_of(amax, nbits)
    qmin, qmax = qrange(nbits, False)
    out = np.divide(x, s, out=out)
    np.rint(out, out=out)
    if tail is None:
        np.clip(out, f32(qmin), f32(qmax), out=out)
    elif len(tail):
        flat = out.reshape(-1)
        flat[tail] = np.clip(flat[tail], f32(qmin), f32(qmax))
    return np.multiply(out, s, out=out)


def _tail(x: np.ndarray, amaxes, nbits: int) -> np.ndarray | None:
    """Flat indices of the elements of (contiguous) ``x`` that a quantizer with any of
    ``amaxes`` may clamp: |x| below ``0.999 qmax s`` for the smallest scale ``s`` rounds
    into range.  None (clamp all) when that is not a small part of ``x``."""
    qmax = qrange(nbits, False)[1]
    t = f32(qmax) * scale_of(np.min(amaxes), nbits) * f32(0.999)
    idx = np.flatnonzero(np.abs(x.reshape(-1)) >= t)
    return idx if len(idx) * 8 < x.size else None


def _quant_weights(w: np.ndarray, amax: np.ndarray, nbits: int, axis: int | None) -> np.ndarray:
    """Clip then fake-quantize ``w`` for each row of ``amax`` (candidates x scale channels):
    returns (candidates, *w.shape), what the weight quantizer gives for the clipped weight."""
    view = channel_view(w, axis)                          # (S, rest)
    p, s = amax.shape
    t = amax[:, :, None]
    clipped = np.clip(view[None], -t, t).reshape(p * s, -1)
    q = _narrow_quant(clipped, amax.reshape(-1), nbits)
    q = q.reshape(p, s, -1)
    if axis is None:
        return q.reshape((p,) + w.shape)
    moved = (w.shape[axis],) + tuple(d for i, d in enumerate(w.shape) if i != axis)
    return np.moveaxis(q.reshape((p,) + moved), 1, axis + 1)


def _narrow_quant(x: np.ndarray, amax: np.ndarray, nbits: int) -> np.ndarray:
    """``fake_quant(x, amax, nbits, narrow=True, axis=0)`` (one range per row) with the same
    float32 operations, without the reference's handling of zero ranges, which it is given
    when a row has one."""
    sc = scale_of(amax, nbits)
    if not (np.isfinite(sc).all() and (sc > 0).all()):
        return fake_quant(x, amax, nbits, True, 0)
    qmin, qmax = qrange(nbits, True)
    sc = sc[:, None]
    q = np.divide(x, sc)
    np.rint(q, out=q)
    np.clip(q, f32(qmin), f32(qmax), out=q)
    q += f32(0)
    return np.multiply(q, sc, out=q)


def _cosine(x: np.ndarray, wc: np.ndarray, bias: np.ndarray | None, out: np.ndarray) -> float:
    """Cosine between the float outputs ``out`` (groups, rows, og; float64) and those of the
    quantized input patches ``x`` (rows, groups, k) times the conv matrices ``wc`` (groups,
    og, k), summed in float64."""
    o = out.ravel()
    return _cosine_t(x, _transposed(wc), bias, out, np.dot(o, o))


def _transposed(wc: np.ndarray) -> np.ndarray:
    """The conv matrices as contiguous (groups, k, og): BLAS gives the same products as for
    the transposed view, 2-5x faster."""
    return np.ascontiguousarray(wc.transpose(0, 2, 1))


def _cosine_t(x: np.ndarray, wt: np.ndarray, bias: np.ndarray | None, out: np.ndarray,
              oo: float) -> float:
    """``_cosine`` with the matrices as ``_transposed`` gives them and ``oo = |out|^2``."""
    q = np.matmul(x.transpose(1, 0, 2), wt)                     # (groups, rows, og)
    if bias is not None:
        q += bias[:, None, :]
    q = q.astype(np.float64).ravel()
    o = out.ravel()
    den = np.sqrt(np.dot(q, q) * oo)
    return float(np.dot(q, o) / den) if den > 0 else 0.0


# -- the search ---------------------------------------------------------------------------
@dataclass
class _State:
    """A layer's current scales: weight factors relative to the given weight's max|W|."""

    w0: np.ndarray                   # the weight as given
    wmax: np.ndarray                 # its max|W| per scale channel
    factors: np.ndarray              # current factor per scale channel (<= 1)
    bias: np.ndarray | None          # (groups, og)
    cos: float = 0.0

    def amax(self, factors=None) -> np.ndarray:
        return (np.atleast_2d(self.factors if factors is None else factors)
                * self.wmax[None]).astype(f32)


def _weight_conv(layer: Layer, st: _State, factors=None) -> np.ndarray:
    """The quantized weight under ``factors`` (default: current) as (groups, og, k)."""
    if layer.w_q is None:
        return as_conv(st.w0[None].astype(f32), layer.geo)[0]
    q = _quant_weights(st.w0, st.amax(factors), layer.w_bits, layer.w_axis)
    return as_conv(q, layer.geo)[0]


def _quant_x(layer: Layer, amax) -> np.ndarray:
    """The layer's quantized input (``reference.fake_quant``'s values; a rounded -0 stays -0,
    which no product or sum can tell from +0)."""
    if layer.act_q is None:
        return layer.x
    return _act_quant(layer.x, amax, layer.act_bits, np.empty_like(layer.x),
                      _tail(layer.x, [amax], layer.act_bits))


def _weight_step(layer: Layer, st: _State, amax, ratios: np.ndarray,
                 chunk_elems: int = 1 << 23) -> None:
    """Search the weight factors (each scale channel on its own output channels' cosine),
    all candidates and channels at once through the Gram matrix of the quantized rows."""
    x = _quant_x(layer, amax)
    r, g, k = x.shape
    xa = np.concatenate([x, np.ones((r, g, 1), f32)], axis=2).transpose(1, 0, 2)
    xa = xa.astype(np.float64)                                   # (g, r, k+1)
    gram = np.matmul(xa.transpose(0, 2, 1), xa)                  # (g, k+1, k+1)
    o = layer.out                                                # (g, r, og)
    gvec = np.matmul(xa.transpose(0, 2, 1), o)                   # (g, k+1, og)
    og = o.shape[2]
    oo = (o * o).sum(1).reshape(-1)                              # (channels,)
    chan = scale_channel(layer, g * og)
    nscale = len(st.wmax)
    onehot = np.zeros((g * og, nscale))
    onehot[np.arange(g * og), chan] = 1.0
    cand = np.minimum(ratios[:, None] * st.factors[None], 1.0)   # (P, S), row 0 = current
    # candidates clamped to 1 repeat: each distinct row once (rows are computed apart)
    rows, inv = np.unique(cand, axis=0, return_inverse=True)
    num, den = _weight_sums(layer, st, rows, gram, gvec, onehot, chunk_elems)
    num, den = num[inv.reshape(-1)], den[inv.reshape(-1)]
    den = np.sqrt(np.maximum(den, 0) * (oo @ onehot)[None])
    cos = np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)
    best = cos.argmax(0)                                         # ties keep row 0 (current)
    new = cand[best, np.arange(nscale)]
    if np.array_equal(new, st.factors):
        return
    old = st.factors
    st.factors = new
    c = _cosine(x, _weight_conv(layer, st), st.bias, layer.out)
    if c >= st.cos:
        st.cos = c
    else:  # the channels' best factors lowered the layer's cosine: keep the old ones
        st.factors = old
        log.debug("easyquant: %s: weight step rejected (%.6f < %.6f)", layer.name, c, st.cos)


def _weight_sums(layer: Layer, st: _State, cand: np.ndarray, gram, gvec, onehot,
                 chunk_elems: int) -> tuple[np.ndarray, np.ndarray]:
    """Per candidate row and scale channel: the dot product of the quantized output with the
    float one, and its squared norm (summed over the channel's outputs), from the Gram
    matrix ``gram`` and ``gvec`` of the rows (each candidate's own products)."""
    g, og = gvec.shape[0], gvec.shape[2]
    bias = st.bias if st.bias is not None else np.zeros((g, og), f32)
    step = max(1, chunk_elems // max(st.w0.size, 1))
    num, den = [], []
    for i in range(0, len(cand), step):
        wc = as_conv(_quant_weights(st.w0, st.amax(cand[i:i + step]), layer.w_bits,
                                     layer.w_axis), layer.geo).astype(np.float64)
        wc = np.concatenate([wc, np.broadcast_to(bias[None, :, :, None],
                                                 wc.shape[:3] + (1,))], axis=3)
        a = np.einsum("pgok,gko->pgo", wc, gvec)
        b = (np.matmul(wc, gram[None]) * wc).sum(-1)
        num.append(a.reshape(len(wc), -1) @ onehot)
        den.append(b.reshape(len(wc), -1) @ onehot)
    return np.concatenate(num), np.concatenate(den)


def _act_step(layers: list, states: list, amax: f32, ratios: np.ndarray, nbits: int) -> f32:
    """Search the shared input amax of ``layers``: the mean of their cosines, among the
    candidates that lower none of them (the current amax, row 0, always qualifies)."""
    amaxes = (ratios * float(amax)).astype(f32)
    amaxes[0] = amax
    cos = np.stack([_act_cosines(ly, st, amaxes, nbits) for ly, st in zip(layers, states)],
                   axis=1)                                       # (candidates, layers)
    ok = (cos >= cos[0][None]).all(1)
    score = np.where(ok, cos.mean(1), -np.inf)
    best = int(score.argmax())
    for ly, st in zip(layers, states):   # as the checks after it compute it
        st.cos = _cosine(_quant_x(ly, amaxes[best]), _weight_conv(ly, st), st.bias, ly.out)
    return amaxes[best]


def _act_cosines(layer: Layer, st: _State, amaxes: np.ndarray, nbits: int) -> np.ndarray:
    """The layer's cosine for each input amax, in one buffer with the clamp applied where it
    can bite: a candidate costs a quantization of the rows and one GEMM, with the rows
    times the weights (``_cosine``'s numbers) or, for a layer with fewer inputs than outputs
    per row (1x1 expansions), times their Gram matrix (``_GramCosine``)."""
    wc = _weight_conv(layer, st)
    k, og = wc.shape[2], wc.shape[1]
    if k * (k + 3) < og * (k + 4):
        cosine = _GramCosine(wc, st.bias, layer.out)
    else:
        wt, o = _transposed(wc), layer.out.ravel()
        oo = np.dot(o, o)

        def cosine(x):
            return _cosine_t(x, wt, st.bias, layer.out, oo)
    tail = _tail(layer.x, amaxes, nbits)
    buf = np.empty_like(layer.x)
    return np.array([cosine(_act_quant(layer.x, a, nbits, buf, tail)) for a in amaxes])


class _GramCosine:
    """``_cosine`` for fixed weights through the Gram matrix of ``[W, b]``: with
    ``y = [x, 1]``, ``|W x + b|^2 = y'[W, b]'[W, b]y`` and ``<W x + b, o> = y'[W, b]'o``, in
    float64: (k+1)^2 products per row instead of k og, and no pass over the outputs.  Equal
    to ``_cosine`` up to its float32 rounding (~1e-11 in a cosine); the search keeps
    ``_cosine``'s value for the amax it picks."""

    def __init__(self, wc: np.ndarray, bias: np.ndarray | None, out: np.ndarray) -> None:
        g, og, k = wc.shape
        wb = np.empty((g, og, k + 1))
        wb[:, :, :k] = wc
        wb[:, :, k] = 0.0 if bias is None else bias
        self.gram = np.matmul(wb.transpose(0, 2, 1), wb)           # (g, k+1, k+1)
        self.a = np.matmul(out, wb).ravel()                        # (g, rows, k+1)
        self.y = np.ones((g, out.shape[1], k + 1))                 # [x, 1], x per candidate
        o = out.ravel()
        self.oo = np.dot(o, o)

    def __call__(self, x: np.ndarray) -> float:
        self.y[:, :, :-1] = x.transpose(1, 0, 2)
        y = self.y.ravel()
        num = np.dot(y, self.a)
        den = np.sqrt(max(np.dot(np.matmul(self.y, self.gram).ravel(), y), 0.0) * self.oo)
        return float(num / den) if den > 0 else 0.0


def _check_args(batches, rounds, points, search) -> tuple[list, float, float]:
    batches = [np.asarray(_np(b), f32) for b in batches]
    if not batches:
        raise QuantOpsError("easyquant: the calibration set is empty")
    if not (isinstance(rounds, int) and rounds >= 1):
        raise QuantOpsError(f"easyquant: rounds must be an integer >= 1, got {rounds!r}")
    if not (isinstance(points, int) and points >= 2):
        raise QuantOpsError(f"easyquant: points must be an integer >= 2, got {points!r}")
    try:
        lo, hi = (float(v) for v in search)
    except (TypeError, ValueError):
        lo = hi = -1.0
    if not 0 < lo < hi:
        raise QuantOpsError(f"easyquant: search must be (low, high) with 0 < low < high, "
                            f"got {search!r}")
    shape = batches[0].shape[1:]
    for i, b in enumerate(batches):
        if b.ndim == 0 or b.shape[1:] != shape or len(b) == 0:
            raise QuantOpsError(f"easyquant: batch {i} has shape {b.shape}; every batch must "
                                f"be non-empty with items of shape {shape}")
    return batches, lo, hi


def _check_params(graph: Graph, params: dict, layers: list, nbits: int | None) -> list:
    bits = sorted({int(n.attrs.get("nbits", "8")) for n in graph.nodes if n.op in LINEAR_OPS})
    if nbits is not None and bits != [nbits]:
        raise QuantOpsError(f"{graph.source}: easyquant(nbits={nbits}) but the graph's "
                            f"quantizers have {bits} bits: build the graph with a {nbits}-bit "
                            f"policy, e.g. {{'preset': 'trt_int8', 'weight': {{'bits': {nbits}}}, "
                            f"'activation': {{'bits': {nbits}}}}}")
    for ly in layers:
        for key in filter(None, (ly.weight, ly.bias, ly.minmax)):
            if key not in params:
                raise QuantOpsError(f"easyquant: no param '{key}' (layer '{ly.name}')")
        if ly.minmax is not None:
            mm = _np(params[ly.minmax]).reshape(-1)
            if mm.size < 1 or not np.isfinite(mm[0]) or mm[0] <= 0:
                raise QuantOpsError(f"easyquant: activation quantizer '{ly.act_q}' has range "
                                    f"{mm[:1].tolist()} in '{ly.minmax}': calibrate the graph "
                                    "first (calibrate_graph)")
    return bits


def _clipped(st: _State, axis: int | None) -> np.ndarray:
    """The given weight clipped to the current factors' ranges (what realizes the scale)."""
    t = st.amax()[0]
    if axis is None:
        return np.clip(st.w0, -t[0], t[0]).astype(f32)
    shp = [1] * st.w0.ndim
    shp[axis] = -1
    return np.clip(st.w0, -t.reshape(shp), t.reshape(shp)).astype(f32)


def easyquant(graph: Graph, params: dict, batches: Sequence[np.ndarray], *,
              nbits: int | None = None, rounds: int = 2,
              search: tuple[float, float] = (0.5, 1.2), points: int = 100,
              data_name: str = "data", progress: bool = True, max_rows: int = 1 << 15,
              max_elements: int = 1 << 21, seed: int = 0) -> tuple[dict, dict]:
    """EasyQuant on a quantized, calibrated graph; returns (new params, report).

    ``graph``/``params``: the output of ``quantize_graph`` with activation ranges filled by
    ``calibrate_graph``; they are not modified.  ``batches``: calibration inputs.  Each
    layer (Convolution, FullyConnected, Deconvolution with a linear quantizer on its input),
    in topological order, gets ``rounds`` alternations of a weight-scale search (per channel
    when its weight quantizer is) and a search of its input activation's amax, over
    ``points`` factors in ``search`` times the current scale, maximizing the cosine between
    its float output (float network) and its quantized output (quantized network as
    optimized so far).  Layers reading one activation quantizer search its amax together.
    The cosine is measured on at most ``max_rows`` output positions (about
    ``max_elements`` input values) drawn with ``seed``.  The new params differ from
    ``params`` only in clipped weights and activation ``_minmax`` values.  ``nbits``, if
    given, must be the bit width of every quantizer (build the graph with such a policy).

    The report: ``layers`` (per layer: cosine before/after on its sampled rows, the
    activation factor and amax, the weight factors per scale channel), ``skipped`` layers
    with the reason, and the settings.
    """
    batches, lo, hi = _check_args(batches, rounds, points, search)
    layers, skipped = find_layers(graph, "easyquant")
    if not layers:
        raise QuantOpsError(f"{graph.source}: no Convolution/FullyConnected/Deconvolution "
                            f"with a linear quantizer ({', '.join(sorted(LINEAR_OPS))}) on its "
                            "input to search")
    bits = _check_params(graph, params, layers, nbits)
    run_params = inference_params(graph, params)
    new_params = dict(params)
    float_outputs(layers, strip_quantizers(graph), run_params, batches, data_name,
                  np.random.default_rng(seed), max_rows, max_elements, progress, "easyquant")

    # layers reading one activation range are searched together, at the first of them
    units: list = []
    by_minmax: dict = {}
    for ly in layers:
        if ly.minmax is not None and ly.minmax in by_minmax:
            by_minmax[ly.minmax].append(ly)
        else:
            units.append([ly])
            if ly.minmax is not None:
                by_minmax[ly.minmax] = units[-1]

    ratios = np.concatenate([[1.0], np.linspace(lo, hi, points)])   # row 0: keep
    report_rows = []
    tensors = QuantizedTensors(graph, run_params, batches, data_name)
    for unit in tqdm(units, desc="easyquant: layers", disable=not progress):
        quantized_inputs(unit, graph, run_params, batches, data_name, "easyquant", tensors)
        states = []
        for ly in unit:
            w0 = _np(params[ly.weight]).astype(f32)
            wmax = abs_max(w0, ly.w_axis)
            bias = None
            if ly.bias is not None:
                bias = _np(params[ly.bias]).astype(f32).reshape(ly.out.shape[0], -1)
            states.append(_State(w0, wmax, np.ones(len(wmax)), bias))
        first = unit[0]
        amax0 = f32(_np(params[first.minmax]).reshape(-1)[0]) if first.minmax else None
        amax = amax0
        for ly, st in zip(unit, states):
            st.cos = _cosine(_quant_x(ly, amax), _weight_conv(ly, st), st.bias, ly.out)
        before = [st.cos for st in states]
        for _ in range(rounds):
            for ly, st in zip(unit, states):
                if ly.w_q is not None and ly.w_search:
                    _weight_step(ly, st, amax, ratios)
            if amax is not None:
                amax = _act_step(unit, states, amax, ratios, first.act_bits)
        after = [_cosine(_quant_x(ly, amax), _weight_conv(ly, st), st.bias, ly.out)
                 for ly, st in zip(unit, states)]
        # the unit's scales go into the params, for the layers after it and for the caller
        if amax is not None:
            new_params[first.minmax] = np.array([amax], f32)
            run_params[first.minmax] = new_params[first.minmax]
            tensors.changed([first.minmax])
        for ly, st, b4, af in zip(unit, states, before, after):
            searched = ly.w_q is not None and ly.w_search
            if searched and np.any(st.factors < 1):
                new_params[ly.weight] = run_params[ly.weight] = _clipped(st, ly.w_axis)
                tensors.changed([ly.weight])
            report_rows.append({
                "layer": ly.name, "op": ly.op, "input_quantizer": ly.act_q,
                "minmax": ly.minmax, "weight": ly.weight, "weight_quantizer": ly.w_q,
                "per_channel": ly.w_axis is not None,
                "act_bits": ly.act_bits if ly.act_q else None,
                "weight_bits": ly.w_bits if ly.w_q else None,
                "rows": int(len(ly.x)), "cosine_before": b4, "cosine_after": af,
                "amax_before": None if amax0 is None else float(amax0),
                "amax_after": None if amax is None else float(amax),
                "act_factor": None if amax0 is None else float(amax / amax0),
                "weight_factors": [float(f) for f in st.factors] if searched else None,
                "shared_input_with": [o.name for o in unit if o is not ly]})
            log.info("easyquant: %s cosine %.5f -> %.5f", ly.name, b4, af)
            ly.x = None
    return new_params, {"layers": report_rows,
                        "skipped": [{"layer": n, "reason": r} for n, r in skipped],
                        "rounds": rounds, "points": points, "search": [lo, hi],
                        "bits": bits, "images": sum(len(b) for b in batches)}
