"""Calibrate every activation quantizer of a graph over a calibration set.

The statistics are those of the float network (as TensorRT calibrates): the quantizers are
stripped, the tensors they read become outputs, and each batch feeds one observer per
tensor.  Histogram methods take two passes (the first finds each tensor's max, so the
histograms are exact).  The ranges go into the quantizers' ``_minmax`` state, so the result
is an ordinary checkpoint that QAT can start from.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Sequence

import mxnet as mx
import numpy as np
from tqdm import tqdm

from ..errors import QuantOpsError
from ..graph.ir import Graph
from ..graph.quantize import strip_quantizers
from ..ops import RANGE_QUANTIZERS
from .observers import make_observer

log = logging.getLogger(__name__)
HISTOGRAM_METHODS = ("entropy", "percentile", "mse")


def activation_tensors(graph: Graph) -> dict:
    """{activation quantizer name: (name of the tensor it reads, name of its minmax var)}."""
    res = {}
    for n in graph.nodes:
        if n.op in RANGE_QUANTIZERS and n.attrs.get("is_weight") not in ("True", "1", "true"):
            src = graph.nodes[n.inputs[0][0]]
            while src.op == "_copy" and src.inputs:  # gradient-sum copy of a leaf
                src = graph.nodes[src.inputs[0][0]]
            out = n.inputs[0][1]
            tensor = src.name if src.is_var else f"{src.name}_output" + (str(out) if out else "")
            res[n.name] = (tensor, graph.nodes[n.inputs[1][0]].name)
    return res


def _probe(graph: Graph, tensors: Sequence[str], params: dict, data_name: str,
           shape: tuple) -> Callable[[np.ndarray], list]:
    """A function from an input batch to the float values of ``tensors``."""
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
    data = mx.nd.zeros(shape)
    try:
        exe = group.bind(mx.cpu(), {**args, data_name: data}, aux_states=aux, grad_req="null")
    except mx.base.MXNetError as e:
        raise QuantOpsError(f"calibration images of shape {shape} do not fit the model: "
                            f"{' '.join(str(e).split())[:300]}") from None

    def run(x: np.ndarray) -> list:
        if x.shape != shape:
            raise QuantOpsError(f"calibration batch of shape {x.shape}, expected {shape} "
                                "(all batches must have the first batch's shape)")
        exe.arg_dict[data_name][:] = x
        return [o.asnumpy() for o in exe.forward(is_train=False)]

    return run


def calibrate_graph(graph: Graph, params: dict, batches: Iterable[np.ndarray],
                    method: str = "entropy", data_name: str = "data",
                    progress: bool = True, **observer_params) -> tuple[dict, dict]:
    """Ranges for every activation quantizer; returns (params with the ranges, {quantizer:
    amax}).  ``batches`` is a re-iterable of input arrays (a list, or a DataLoader's data)."""
    batches = list(batches)
    if not batches:
        raise QuantOpsError("the calibration set is empty")
    quantizers = activation_tensors(graph)
    if not quantizers:
        raise QuantOpsError(f"{graph.source}: the graph has no activation quantizer")
    tensors = sorted({t for t, _ in quantizers.values()})
    first = np.asarray(batches[0], np.float32)
    probe = _probe(graph, tensors, params, data_name, first.shape)

    def sweep(desc: str):
        for x in tqdm(batches, desc=desc, leave=False, disable=not progress):
            yield probe(np.asarray(x.asnumpy() if hasattr(x, "asnumpy") else x, np.float32))

    hints = {}
    if method in HISTOGRAM_METHODS:  # pass 1: each tensor's max, for exact histograms
        hints = {t: 0.0 for t in tensors}
        for values in sweep("calibration: max"):
            for t, v in zip(tensors, values):
                if not np.isfinite(v).all():
                    raise QuantOpsError(f"tensor '{t}' has NaN or infinite values on the "
                                        "calibration set")
                hints[t] = max(hints[t], float(np.abs(v).max()))
    observers = {t: make_observer(method, name=t, **({"amax_hint": hints[t]} if hints and
                                                      hints[t] > 0 else {}), **observer_params)
                 for t in tensors}
    for values in sweep(f"calibration: {method}"):
        for t, v in zip(tensors, values):
            observers[t].observe(v)
    amax = {t: float(o.amax()) for t, o in observers.items()}
    params = dict(params)
    ranges: dict = {}
    for q, (t, mm) in quantizers.items():
        # quantizers sharing one range variable take the largest of their tensors' ranges
        params[mm] = np.array([max(amax[t], float(np.asarray(ranges.get(mm, 0.0))))],
                              np.float32)
        ranges[mm] = params[mm][0]
    log.info("calibrated %d activation tensors (%s) on %d batches", len(tensors), method,
             len(batches))
    return params, {q: float(params[mm][0]) for q, (_, mm) in quantizers.items()}
