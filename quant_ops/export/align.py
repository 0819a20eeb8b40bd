"""The alignment check: the same inputs through the MXNet deployment graph and through
onnxruntime on the exported model; per output the largest difference and the cosine, per
QuantizeLinear the fraction of identical int8 codes."""
from __future__ import annotations

from pathlib import Path

import mxnet as mx
import numpy as np

from ..errors import QuantOpsError
from ..graph.ir import Graph, Node
from ..graph.quantizers import quantizers
from ..graph.runner import run_once
from .onnx_qdq import qdq_form
from .ort import dequantized_outputs, quantize_points, session


def _codes(y: np.ndarray, node, value) -> np.ndarray:
    """Integer codes behind a fake-quantized tensor: y / s is an exact integer."""
    s, _, per_axis = qdq_form(node.op, node.attrs, value)
    if per_axis:
        shape = [1] * y.ndim
        shape[int(node.attrs.get("channel_axis", 0))] = -1
        s = s.reshape(shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s > 0, np.rint(y / np.where(s > 0, s, 1)), 0)


def _exportable(graph: Graph) -> list:
    return [q for q in quantizers(graph) if q.method.exportable]


def mxnet_codes(graph: Graph, params: dict, inputs: dict) -> dict:
    """int8 codes of every quantizer as the MXNet graph computes them, end to end."""
    qs = _exportable(graph)
    if not qs:
        return {}
    internals = graph.to_symbol().get_internals()
    outs = run_once(mx.sym.Group([internals[q.name + "_output"] for q in qs]), params, inputs)
    return {q.name: _codes(y, q.node, params[q.range_var]) for q, y in zip(qs, outs)}


def isolated_codes(graph: Graph, params: dict, points: dict) -> dict:
    """Each quantizer run by MXNet's operator on onnxruntime's own input to it: the
    quantizer's arithmetic alone, free of differences carried in from earlier layers."""
    res = {}
    for q in _exportable(graph):
        if q.name in points:
            state = {k: params[v] for k, v in q.inputs.items()}
            y = q.method.fixed(points[q.name][0], q.attrs, state)
            res[q.name] = _codes(y, q.node, params[q.range_var])
    return res


def layer_codes(graph: Graph, params: dict, inputs: dict, dequantized: dict) -> dict:
    """Codes of every quantizer when each layer reads onnxruntime's dequantized tensors:
    what remains are the differences one layer's float accumulation makes (sums landing on
    the other side of a rounding tie), not those carried in from earlier layers."""
    nodes = [Node(n.op, n.name, dict(n.attrs), [list(e) for e in n.inputs])
             for n in graph.nodes]
    ranges = {q.index: q.range_var for q in _exportable(graph)}
    qidx = [i for i in ranges if nodes[i].name in dequantized]
    feeds_var = {}
    for i in qidx:  # a variable standing for onnxruntime's output of this quantizer
        nodes.append(Node("null", nodes[i].name + "_from_ort"))
        feeds_var[nodes[i].name + "_from_ort"] = dequantized[nodes[i].name]
        var = len(nodes) - 1
        for n in nodes[:-1]:
            n.inputs = [[var, 0, 0] if e[0] == i else e for e in n.inputs]
    # the new variables must come before their users: order nodes topologically
    g = _toposort(Graph(nodes, [[i, 0, 0] for i in qidx], dict(graph.attrs), graph.source))
    outs = run_once(g.to_symbol(), {**params, **feeds_var}, inputs)
    return {graph.nodes[i].name: _codes(y, graph.nodes[i], params[ranges[i]])
            for i, y in zip(qidx, outs)}


def _toposort(graph: Graph) -> Graph:
    order, seen = [], set()

    def visit(i):
        stack = [(i, False)]
        while stack:
            j, done = stack.pop()
            if done:
                order.append(j)
                continue
            if j in seen:
                continue
            seen.add(j)
            stack.append((j, True))
            stack.extend((e[0], False) for e in reversed(graph.nodes[j].inputs))

    for h in graph.heads:
        visit(h[0])
    new = {old: k for k, old in enumerate(order)}
    nodes = [Node(graph.nodes[o].op, graph.nodes[o].name, graph.nodes[o].attrs,
                  [[new[e[0]], e[1], e[2]] for e in graph.nodes[o].inputs]) for o in order]
    return Graph(nodes, [[new[h[0]], h[1], h[2]] for h in graph.heads], graph.attrs,
                 graph.source)


def _agreement(ours: dict, theirs: dict) -> dict:
    return {name: {"values": int(theirs[name].size),
                   "identical": float((ours[name] == theirs[name]).mean())}
            for name in ours}


def check_alignment(onnx_path: str | Path, graph: Graph, params: dict, inputs: dict,
                    optimize: bool = False) -> dict:
    """Compare MXNet (``graph``/``params``: the deployment form ``export_onnx`` returned) and
    onnxruntime on ``inputs`` ({input name: array})."""
    feeds = {k: np.ascontiguousarray(v, np.float32) for k, v in inputs.items()}
    for k, v in feeds.items():
        if not np.isfinite(v).all():
            raise QuantOpsError(f"the check input for '{k}' has NaN or infinite values: the "
                                "alignment would compare nothing meaningful")
    sess = session(onnx_path, optimize)
    ort_out = sess.run(None, feeds)
    mx_out = run_once(graph.to_symbol(), params, feeds)
    outputs = []
    for a, b in zip(mx_out, ort_out):
        a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        denom = np.linalg.norm(a64) * np.linalg.norm(b64)
        outputs.append({"shape": list(a.shape), "max_abs_diff": float(np.abs(a64 - b64).max()),
                        "max_abs": float(np.abs(a64).max()),
                        "cosine": float(a64 @ b64 / denom) if denom else 1.0})
    points = quantize_points(onnx_path, feeds, optimize)
    theirs = {k: v[1] for k, v in points.items()}
    end_to_end = _agreement(mxnet_codes(graph, params, feeds), theirs)
    isolated = _agreement(isolated_codes(graph, params, points), theirs)
    per_layer = _agreement(layer_codes(graph, params, feeds,
                                       dequantized_outputs(onnx_path, feeds, optimize)), theirs)

    def total(codes):
        n = sum(c["values"] for c in codes.values())
        return float(sum(c["identical"] * c["values"] for c in codes.values()) / max(n, 1))

    return {"outputs": outputs, "quantizers": end_to_end, "quantizers_isolated": isolated,
            "quantizers_per_layer": per_layer,
            "per_layer_identical_min": min((c["identical"] for c in per_layer.values()),
                                           default=1.0),
            "per_layer_identical_all": total(per_layer),
            "identical_min": min((c["identical"] for c in end_to_end.values()), default=1.0),
            "identical_all": total(end_to_end),
            "isolated_identical_min": min((c["identical"] for c in isolated.values()),
                                          default=1.0)}
