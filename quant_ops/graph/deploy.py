"""The deployment form of a quantized graph: what an engine runs, still as an MXNet graph.

Training-only pieces go (gradient-sum copies), parameter-only subgraphs are computed once
(e.g. weights folded in-graph for QAT), BatchNorm after a layer is folded into it, and
weight ranges are recomputed from the final weights.  Running this graph in MXNet and its
ONNX export in onnxruntime must then agree bit for bit.
"""
from __future__ import annotations

import mxnet as mx
import numpy as np

from .. import methods
from .fold_bn import fold_batchnorm
from .ir import Graph, Node
from .params import as_numpy
from .runner import run_once
from .quantizers import is_grad_sum, qstate_variables, quantizers


def drop_grad_sums(graph: Graph) -> Graph:
    """Remove the identity copies that only serve gradient accumulation."""
    redirect = {i: n.inputs[0] for i, n in enumerate(graph.nodes) if is_grad_sum(n)}
    return graph.rewired(set(redirect), redirect)


def fold_constants(graph: Graph, params: dict) -> tuple[Graph, dict]:
    """Compute every subgraph that reads only parameters (not through a quantizer) and put
    its value in the params under the node's name."""
    const = set()
    for i, n in enumerate(graph.nodes):
        if n.is_var:
            if n.name in params:
                const.add(i)
        elif not methods.is_quantizer(n.op) and n.inputs and all(e[0] in const for e in n.inputs):
            const.add(i)
    used_by_live = {e[0] for i, n in enumerate(graph.nodes) if i not in const for e in n.inputs}
    used_by_live |= {h[0] for h in graph.heads}
    targets = [i for i in sorted(const) if not graph.nodes[i].is_var and i in used_by_live]
    if not targets:
        return graph, params
    sym = graph.to_symbol().get_internals()
    outs = mx.sym.Group([sym[graph.nodes[i].name + "_output"] for i in targets])
    values = run_once(outs, params)
    params = dict(params)
    replace = {}
    for i, v in zip(targets, values):
        params[graph.nodes[i].name] = v
        shape = "(" + ", ".join(str(d) for d in v.shape) + ("," if v.ndim == 1 else "") + ")"
        replace[i] = Node("null", graph.nodes[i].name, {"__shape__": shape})
    # the replaced nodes keep their index; their former inputs drop out if nothing else uses them
    g = graph.rewired(set(), {}, replace)
    return _prune(g), params


def _prune(graph: Graph) -> Graph:
    """Drop nodes nothing reaches from the heads."""
    live, stack = set(), [h[0] for h in graph.heads]
    while stack:
        i = stack.pop()
        if i not in live:
            live.add(i)
            stack.extend(e[0] for e in graph.nodes[i].inputs)
    return graph.rewired(set(range(len(graph.nodes))) - live, {})


def weight_ranges(graph: Graph, params: dict) -> dict:
    """Recompute the state an engine derives from each final weight (int8 ranges), as the
    operator does, and give the engine the weight in the form it quantizes exactly (a
    weight beyond a stored clip is clipped: QuantizeLinear alone would saturate one code
    lower than the narrow-range operator)."""
    params = dict(params)
    for q in quantizers(graph):
        w = graph.nodes[q.source[0]]
        if q.is_weight and w.is_var and w.name in params:
            value = as_numpy(params[w.name])
            for k, v in q.method.deploy_state(q.attrs, value).items():
                params[q.inputs[k]] = v
            state = {k: as_numpy(params[v]) for k, v in q.inputs.items() if v in params}
            params[w.name] = q.method.deploy_weight(q.attrs, value, state)
    return params


# MXNet defaults that MXNet's ONNX exporter reads wrongly when the attribute is absent
EXPLICIT_DEFAULTS = {"FullyConnected": {"flatten": "True", "no_bias": "False"},
                     "Deconvolution": {"no_bias": "True"},
                     "Convolution": {"no_bias": "False"}}


def explicit_defaults(graph: Graph) -> Graph:
    nodes = [Node(n.op, n.name, {**EXPLICIT_DEFAULTS.get(n.op, {}), **n.attrs}, n.inputs)
             for n in graph.nodes]
    return Graph(nodes, graph.heads, dict(graph.attrs), graph.source)


def deploy_graph(graph: Graph, params: dict) -> tuple[Graph, dict]:
    """The graph an engine runs, and its params (numpy)."""
    params = {k: as_numpy(v) for k, v in params.items()}
    g = explicit_defaults(drop_grad_sums(graph))
    g, params = fold_constants(g, params)
    g, params = fold_batchnorm(g, params, "deploy")
    g = _prune(g)
    for k in qstate_variables(g):  # an engine never updates ranges: inference mode
        if k in params:
            params[k] = np.array([params[k].reshape(-1)[0], 0.0], np.float32)
    return g, weight_ranges(g, params)
