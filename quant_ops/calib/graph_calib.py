"""Calibrate every activation quantizer of a graph over a calibration set.

The statistics are those of the float network (as TensorRT calibrates): the quantizers are
stripped, the tensors they read become outputs, and each batch feeds one observer per
tensor.  Histogram methods take two passes (the first finds each tensor's max, so the
histograms are exact).  The ranges go into the quantizers' state (``_minmax`` of INT8
quantizers), so the result is an ordinary checkpoint that QAT can start from; learned-range
quantizers start from the calibrated range too (PACT clip, LSQ step, QIL interval, DSQ
range), instead of a generic default.

Network inputs are calibrated by min/max unless asked otherwise: their range is fixed by
the input pipeline, and clipping it (what entropy does to an image whose background is one
value) saturates real pixels.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Iterator, Sequence

import mxnet as mx
import numpy as np
from tqdm import tqdm

from ..errors import QuantOpsError
from ..graph.ir import Graph, Node
from ..graph.quantize import strip_quantizers
from ..ops import OP_INPUTS, RANGE_QUANTIZERS
from .observers import make_observer

log = logging.getLogger(__name__)
HISTOGRAM_METHODS = ("entropy", "percentile", "mse")
BITS_AWARE = ("entropy", "mse")      # observers whose answer depends on the bit width


def _leaf(graph: Graph, entry) -> Node:
    node = graph.nodes[entry[0]]
    while node.op == "_copy" and node.inputs:  # gradient-sum copy of a leaf
        node = graph.nodes[node.inputs[0][0]]
    return node


def _is_weight(n: Node) -> bool:
    return n.attrs.get("is_weight") in ("True", "1", "true")


def activation_tensors(graph: Graph) -> dict:
    """{INT8 activation quantizer name: (name of the tensor it reads, name of its minmax
    var)}."""
    return {q: (t, v["minmax"]) for q, (t, op, _, v) in activation_quantizers(graph).items()
            if op in RANGE_QUANTIZERS}


def activation_quantizers(graph: Graph) -> dict:
    """{activation quantizer name: (tensor it reads, op, attrs, {input role: var name})}
    for every quantizer operator."""
    res = {}
    for n in graph.nodes:
        if n.op in OP_INPUTS and not _is_weight(n):
            src = _leaf(graph, n.inputs[0])
            out = n.inputs[0][1]
            tensor = src.name if src.is_var else f"{src.name}_output" + (str(out) if out else "")
            roles = {role: _leaf(graph, e).name
                     for role, e in zip(OP_INPUTS[n.op][1:], n.inputs[1:])}
            res[n.name] = (tensor, n.op, n.attrs, roles)
    return res


def _unsigned(op: str, attrs: dict) -> bool:
    """The activation quantizer represents [0, a] only (negative inputs are clipped to 0)."""
    if op == "LSQ":
        return attrs.get("signed", "False") not in ("True", "1", "true")
    return op in ("PACT", "DoReFa", "QIL", "DSQ")


def _warn_negative(quantizers: dict, negative: set) -> None:
    for q, (t, op, attrs, _) in quantizers.items():
        if t in negative and _unsigned(op, attrs):
            log.warning("%s (%s) represents [0, a] only, but the tensor it reads (%s) has "
                        "negative values on the calibration set: they will be clipped to 0; "
                        "give that layer's input a signed quantizer (a policy override)",
                        q, op, t)


def _range_state(op: str, attrs: dict, amax: float) -> dict:
    """{input role: value} that makes a quantizer start from the range [-amax, amax] (or
    [0, amax] for unsigned ones); empty for quantizers that observe ranges themselves."""
    f32 = np.float32
    if op == "Quantization_int8":
        return {"minmax": np.array([amax], f32)}
    if op == "PACT":
        return {"gamma": np.array([amax], f32)}
    if op == "LSQ":
        from ..refs.lsq import bounds

        signed = attrs.get("signed", "False") in ("True", "1", "true")
        return {"step": np.array([amax / bounds(int(attrs.get("nbits", 8)), signed)[1]], f32)}
    if op == "QIL":
        return {"center": np.array([amax / 2], f32), "distance": np.array([amax / 2], f32)}
    if op == "DSQ":
        return {"dsq_upper": np.array([amax], f32)}
    return {}  # FQN, GDRQ: EMA state from the first training batch; DoReFa: fixed range


def _probe(graph: Graph, tensors: Sequence[str], params: dict, data_name: str,
           shape: tuple) -> Callable[[Iterable[np.ndarray]], Iterator[list]]:
    """A function from input batches to the float values of ``tensors``, batch by batch.

    Two executors take turns, so MXNet computes batch i+1 on its own threads while the
    caller's numpy code (histograms) works on batch i."""
    fsym = strip_quantizers(graph).to_symbol()
    internals = fsym.get_internals()
    names = set(internals.list_outputs())
    outs = []
    for t in tensors:
        key = t if t in names else f"{t}_output"
        if key not in names:
            raise QuantOpsError(f"{graph.source}: tensor '{t}' is not in the float graph")
        outs.append(internals[key])
    group = mx.sym.Group(outs)
    args = {k: mx.nd.array(params[k]) for k in group.list_arguments() if k != data_name}
    aux = {k: mx.nd.array(params[k]) for k in group.list_auxiliary_states()}
    try:
        exes = [group.bind(mx.cpu(), {**args, data_name: mx.nd.zeros(shape)}, aux_states=aux,
                           grad_req="null") for _ in range(2)]
    except mx.base.MXNetError as e:
        raise QuantOpsError(f"calibration images of shape {shape} do not fit the model: "
                            f"{' '.join(str(e).split())[:300]}") from None

    def stream(xs: Iterable[np.ndarray]) -> Iterator[list]:
        pending = None
        for i, x in enumerate(xs):
            if x.shape != shape:
                raise QuantOpsError(f"calibration batch of shape {x.shape}, expected {shape} "
                                    "(all batches must have the first batch's shape)")
            exe = exes[i % 2]
            exe.arg_dict[data_name][:] = x
            exe.forward(is_train=False)          # queued: runs while batch i-1 is read
            if pending is not None:
                yield [o.asnumpy() for o in pending.outputs]
            pending = exe
        if pending is not None:
            yield [o.asnumpy() for o in pending.outputs]

    return stream


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
    tensors = sorted({q[0] for q in quantizers.values()})
    variables = {n.name for n in graph.nodes if n.is_var}
    inputs = {q[0] for q in quantizers.values() if q[0] in variables}
    methods = {t: (input_method or method) if t in inputs else method for t in tensors}
    bits = {}
    for t, _, attrs, _ in quantizers.values():
        bits[t] = min(bits.get(t, 16), int(attrs.get("nbits", 8)))
    first = np.asarray(batches[0], np.float32)
    probe = _probe(graph, tensors, params, data_name, first.shape)

    def sweep(desc: str):
        xs = (np.asarray(x.asnumpy() if hasattr(x, "asnumpy") else x, np.float32)
              for x in batches)
        yield from tqdm(probe(xs), desc=desc, total=len(batches), leave=False,
                        disable=not progress)

    hints: dict = {}
    cache: list | None = None
    watch = {t for t, op, attrs, _ in quantizers.values() if _unsigned(op, attrs)}
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

    def observer(t: str):
        kw = dict(observer_params) if methods[t] == method else {}
        if methods[t] in HISTOGRAM_METHODS and hints.get(t, 0) > 0:
            kw["amax_hint"] = hints[t]
        if methods[t] in BITS_AWARE:
            kw.setdefault("num_bits", bits[t])
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
    _warn_negative(quantizers, negative)
    amax = {t: float(o.amax()) for t, o in observers.items()}
    params = dict(params)
    # quantizers sharing one range variable take the largest of their tensors' ranges
    shared: dict = {}
    for t, op, attrs, roles in quantizers.values():
        if "minmax" in roles:
            shared[roles["minmax"]] = max(shared.get(roles["minmax"], 0.0), amax[t])
    ranges = {}
    for q, (t, op, attrs, roles) in quantizers.items():
        a = shared.get(roles.get("minmax"), amax[t])
        for role, value in _range_state(op, attrs, a).items():
            params[roles[role]] = value
        ranges[q] = a
    log.info("calibrated %d activation tensors (%s) on %d batches", len(tensors), method,
             len(batches))
    return params, ranges
