"""Calibrate every activation quantizer of a graph over a calibration set.

The statistics are those of the float network (as TensorRT calibrates): the quantizers are
stripped, the tensors they read become outputs, and each batch feeds one observer per
tensor.  Histogram methods take two passes (the first finds each tensor's max, so the
histograms are exact).  The ranges go into the quantizers' state (each descriptor's
``from_range`` says which input), so the result is an ordinary checkpoint that QAT can start
from; learned-range quantizers start from the calibrated range too (a clip, a step, an
interval), instead of a generic default.

Network inputs are calibrated by min/max unless asked otherwise: their range is fixed by
the input pipeline, and clipping it (what entropy does to an image whose background is one
value) saturates real pixels.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from ..errors import QuantOpsError
from ..graph.ir import Graph
from ..graph.params import as_numpy
from ..graph.quantize import strip_quantizers
from ..graph.quantizers import activation_quantizers
from ..graph.runner import Runner
from .observers import make_observer

log = logging.getLogger(__name__)
HISTOGRAM_METHODS = ("entropy", "percentile", "mse", "auto")
BITS_AWARE = ("entropy", "mse", "auto")      # observers whose answer depends on the bit width


def activation_tensors(graph: Graph) -> dict:
    """{activation quantizer name: (name of the tensor it reads, name of its range
    variable)} for quantizers whose range is state calibration sets (not a learned input)."""
    return {q.name: (q.tensor, q.range_var) for q in activation_quantizers(graph)
            if q.range_var is not None and not q.method.input(q.method.range_input).learned}


def _warn_negative(quantizers: list, negative: set) -> None:
    for q in quantizers:
        if q.tensor in negative and q.unsigned:
            log.warning("%s (%s) represents [0, a] only, but the tensor it reads (%s) has "
                        "negative values on the calibration set: they will be clipped to 0; "
                        "give that layer's input a signed quantizer (a policy override)",
                        q.name, q.node.op, q.tensor)


def _probe(graph: Graph, tensors: Sequence[str], params: dict, data_name: str,
           shape: tuple) -> Callable[[Iterable[np.ndarray]], Iterator[list]]:
    """A function from input batches to the float values of ``tensors``, batch by batch.

    Two executors take turns, so MXNet computes batch i+1 on its own threads while the
    caller's numpy code (histograms) works on batch i."""
    fgraph = strip_quantizers(graph)
    names = set(fgraph.to_symbol().get_internals().list_outputs())
    outs = []
    for t in tensors:
        key = t if t in names else f"{t}_output"
        if key not in names:
            raise QuantOpsError(f"{graph.source}: tensor '{t}' is not in the float graph")
        outs.append(key)
    try:
        run = Runner(fgraph, params, shape, data_name, outs, copies=2)
    except QuantOpsError as e:
        raise QuantOpsError(f"calibration images of shape {shape} do not fit the model: "
                            f"{e}") from None
    return run.stream


def calibrate_graph(graph: Graph, params: dict, batches: Iterable[np.ndarray],
                    method: str = "entropy", data_name: str = "data",
                    progress: bool = True, input_method: str | None = "minmax",
                    passes: int = 2, cache_bytes: int = 1 << 30,
                    **observer_params) -> tuple[dict, dict]:
    """Ranges for every activation quantizer; returns (params with the ranges, {quantizer:
    amax}).  ``batches`` is a re-iterable of input arrays (a list, or a DataLoader's data).
    ``input_method`` calibrates the network inputs (None: ``method`` as for the rest).

    ``passes=2`` (default) reads the set twice for histogram methods, the first pass
    finding each tensor's max so the histogram bins are exact (TensorRT's way); the
    network runs once when its calibration tensors fit in ``cache_bytes`` (kept from the
    first pass).  ``passes=1`` grows each histogram with the running max instead, keeping
    exact counts in bins 32-64x finer than the final ones: near-identical histograms, but
    an entropy threshold can move where the divergence curve is flat."""
    if passes not in (1, 2):
        raise QuantOpsError(f"passes must be 1 or 2, got {passes!r}")
    batches = list(batches)
    if not batches:
        raise QuantOpsError("the calibration set is empty")
    quantizers = activation_quantizers(graph)
    if not quantizers:
        raise QuantOpsError(f"{graph.source}: the graph has no activation quantizer")
    tensors = sorted({q.tensor for q in quantizers})
    variables = {n.name for n in graph.nodes if n.is_var}
    inputs = {q.tensor for q in quantizers if q.tensor in variables}
    methods = {t: (input_method or method) if t in inputs else method for t in tensors}
    bits = {}
    unsigned = {q.tensor for q in quantizers if q.unsigned}
    for q in quantizers:
        # an unsigned b-bit grid on [0, a] has the levels of a signed (b+1)-bit one there,
        # which is what the observers and the auto scoring model
        width = q.bits + 1 if q.unsigned else q.bits
        bits[q.tensor] = min(bits.get(q.tensor, width), width)
    first = np.asarray(batches[0], np.float32)
    probe = _probe(graph, tensors, params, data_name, first.shape)

    def sweep(desc: str):
        xs = (as_numpy(x, np.float32)
              for x in batches)
        yield from tqdm(probe(xs), desc=desc, total=len(batches), leave=False,
                        disable=not progress)

    hints: dict = {}
    cache: list | None = None
    # tensors whose sign matters: an unsigned quantizer clips negatives (warned), a
    # sign-aware one starts from [-a, a] or [0, a]
    watch = {q.tensor for q in quantizers if q.unsigned or q.method.sign_aware}
    negative: set = set()
    if passes == 2 and any(m in HISTOGRAM_METHODS for m in methods.values()):
        hints = {t: 0.0 for t in tensors}   # pass 1: each tensor's max, for exact histograms
        cache, held = [], 0
        for values in sweep("calibration: max"):
            maxes = []
            for t, v in zip(tensors, values):
                if t in watch and v.size and v.min() < 0:
                    negative.add(t)
                np.abs(v, out=v)                  # ours (a fresh copy): |x| is all we need
                m = float(v.max()) if v.size else 0.0
                if not np.isfinite(m):
                    raise QuantOpsError(f"tensor '{t}' has NaN or infinite values on the "
                                        "calibration set")
                hints[t] = max(hints[t], m)
                maxes.append(m)
            held += sum(v.nbytes for v in values)
            if cache is not None and held <= cache_bytes:
                cache.append((values, maxes))
            else:  # too big to keep: the second pass runs the network again
                cache = None
                values.clear()  # one batch alive at a time (tqdm holds the last one)

    def observer(t: str):
        kw = dict(observer_params) if methods[t] == method else {}
        if methods[t] in HISTOGRAM_METHODS and hints.get(t, 0) > 0:
            kw["amax_hint"] = hints[t]
        if methods[t] in BITS_AWARE:
            # TensorRT's entropy is defined on its signed grid: an unsigned tensor keeps it
            # (KL over 256 levels clips post-ReLU tensors far too hard)
            narrow = methods[t] == "entropy" and t in unsigned
            kw.setdefault("num_bits", bits[t] - 1 if narrow else bits[t])
        return make_observer(methods[t], name=t, **kw)

    observers = {t: observer(t) for t in tensors}
    if cache is not None:
        for values, maxes in cache:
            for t, v, m in zip(tensors, values, maxes):
                observers[t].observe_abs(v, m)
    else:
        for values in sweep(f"calibration: {method}"):
            for t, v in zip(tensors, values):
                if not hints and t in watch and v.size and v.min() < 0:
                    negative.add(t)
                observers[t].observe(v)
            values.clear()
    _warn_negative(quantizers, negative)
    amax = {t: float(o.amax()) for t, o in observers.items()}
    if "auto" in methods.values():
        params, ranges = _auto(graph, params, [as_numpy(x, np.float32) for x in batches],
                               data_name, quantizers, observers, methods, amax, bits,
                               negative, progress)
    else:
        params, ranges = _with_ranges(quantizers, params, amax, negative)
    log.info("calibrated %d activation tensors (%s) on %d batches", len(tensors), method,
             len(batches))
    return params, ranges


def _with_ranges(quantizers: list, params: dict, amax: dict, negative: set) -> tuple:
    """(params with each quantizer's state set from its tensor's range, {quantizer: amax});
    quantizers sharing one range variable take the largest of their tensors' ranges."""
    params = dict(params)
    shared: dict = {}
    for q in quantizers:
        if q.range_var is not None:
            shared[q.range_var] = max(shared.get(q.range_var, 0.0), amax[q.tensor])
    ranges = {}
    for q in quantizers:
        a = shared.get(q.range_var, amax[q.tensor])
        for role, value in q.method.from_range(q.attrs, a, q.tensor in negative).items():
            params[q.inputs[role]] = value
        ranges[q.name] = a
    return params, ranges


def _auto(graph: Graph, params: dict, batches: list, data_name: str, quantizers: list,
          observers: dict, methods: dict, amax: dict, bits: dict, negative: set,
          progress: bool) -> tuple:
    """``_with_ranges`` for the ``auto`` tensors' chosen ranges, unless min/max ranges for
    those tensors bring the network output nearer float on the calibration images."""
    from .auto import choose, nearest_float

    candidates = {t: o.candidates() for t, o in observers.items() if methods[t] == "auto"}
    # an unsigned quantizer on a tensor with negative values is not the signed grid
    clipped = {q.tensor for q in quantizers if q.unsigned} & negative
    chosen = choose(graph, params, batches, data_name, candidates, bits,
                    set(candidates) - clipped, progress)
    picked = dict(amax, **{t: a for t, (_, a) in chosen.items()})
    minmax = dict(amax, **{t: c["minmax"] for t, c in candidates.items()})
    options = [_with_ranges(quantizers, params, r, negative) for r in (picked, minmax)]
    if picked == minmax:
        return options[0]
    best, errors = nearest_float(graph, [p for p, _ in options], batches, data_name,
                                 progress)
    log.info("auto calibration: network output error %.4g with the chosen ranges, %.4g "
             "with min/max: %s kept", errors[0], errors[1],
             ("the chosen ranges", "min/max")[best])
    return options[best]
