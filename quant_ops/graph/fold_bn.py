"""BatchNorm folding into the preceding Convolution / FullyConnected / Deconvolution.

``deploy``: the folded weights and bias are computed once into the params (what TensorRT
runs).  ``qat``: the folding is written into the graph with the running statistics, so the
weight quantizer sees the folded weight while weight, gamma and beta stay trainable; the BN
statistics are frozen from then on (fold after the float statistics have settled).
"""
from __future__ import annotations

import logging
import re

import numpy as np

from .. import methods
from ..errors import QuantOpsError
from .ir import Graph, Node, flag
from .params import as_numpy
from .quantizers import is_grad_sum

log = logging.getLogger(__name__)

FOLDABLE = {"Convolution": 0, "FullyConnected": 0, "Deconvolution": 1}  # op -> channel axis
BN_INPUTS = ("gamma", "beta", "moving_mean", "moving_var")


def _f64(v) -> np.ndarray:
    """A param (numpy array or NDArray) as float64 numpy."""
    return as_numpy(v, np.float64)


def _pairs(graph: Graph):
    """(layer index, bn index) where the BN reads only the layer's output, on axis 1."""
    uses = graph.consumers()
    for b, bn in enumerate(graph.nodes):
        if bn.op != "BatchNorm" or int(bn.attrs.get("axis", "1")) != 1:
            continue
        src = bn.inputs[0][0]
        layer = graph.nodes[src]
        if layer.op not in FOLDABLE or uses.get(src) != [b]:
            continue
        if layer.op == "Deconvolution" and int(layer.attrs.get("num_group", "1")) != 1:
            continue
        if any(graph.nodes[e[0]].op != "null" for e in bn.inputs[1:]):
            continue
        yield src, b


def fold_batchnorm(graph: Graph, params: dict, mode: str = "deploy") -> tuple[Graph, dict]:
    """Fold every foldable BatchNorm; returns the new graph and the new params dict.

    ``params`` maps names to numpy arrays (arguments and auxiliary states together).
    """
    if mode not in ("deploy", "qat"):
        raise QuantOpsError(f"unknown BN folding mode {mode!r}: use 'deploy' or 'qat'")
    params = dict(params)
    pairs = dict(_pairs(graph))
    if not pairs:
        return graph, params
    bn_of = {b: layer for layer, b in pairs.items()}
    out_nodes: list = []
    new_index: dict = {}
    redirect: dict = {}          # old BN index -> new entry of the folded layer output

    def emit(node: Node) -> int:
        out_nodes.append(node)
        return len(out_nodes) - 1

    def remap(e):
        return list(redirect[e[0]]) if e[0] in redirect else [new_index[e[0]], e[1], e[2]]

    dropped_vars = set()
    if mode == "deploy":  # the statistics are baked into the params; qat still reads them
        for b in bn_of:
            dropped_vars.update(e[0] for e in graph.nodes[b].inputs[1:])
        dropped_vars -= {e[0] for i, n in enumerate(graph.nodes) if i not in bn_of
                         for e in n.inputs}

    for i, n in enumerate(graph.nodes):
        if i in dropped_vars or i in pairs:
            continue
        if i in bn_of:  # the folded layer takes the BN's place: all its inputs exist by now
            folded = _fold_one(graph, bn_of[i], n, params, mode, emit, remap)
            redirect[i] = [folded, 0, 0]
            new_index[bn_of[i]] = folded
            continue
        new_index[i] = emit(Node(n.op, n.name, dict(n.attrs), [remap(e) for e in n.inputs]))
    heads = [remap(h) for h in graph.heads]
    for v in dropped_vars:
        params.pop(graph.nodes[v].name, None)
    log.info("folded %d BatchNorm layers (%s)", len(pairs), mode)
    return Graph(out_nodes, heads, dict(graph.attrs), graph.source), params


def _weight_rank(layer: Node) -> int:
    """Rank of a layer's weight: 2 for FullyConnected, 2 + the kernel's dims for a
    (de)convolution (1-D, 2-D or 3-D)."""
    if layer.op == "FullyConnected":
        return 2
    return 2 + len(re.findall(r"\d+", layer.attrs.get("kernel", "(1, 1)")))


def _weight_var(graph: Graph, idx: int) -> Node:
    """The weight variable behind a layer's weight input, through a quantizer (whose range
    follows the weight) and its gradient-sum copy."""
    node = graph.nodes[idx]
    while methods.is_quantizer(node.op) or is_grad_sum(node):
        node = graph.nodes[node.inputs[0][0]]
    return node


def _bn_arrays(graph: Graph, bn: Node, params: dict):
    names = [graph.nodes[e[0]].name for e in bn.inputs[1:5]]
    missing = [n for n in names if n not in params]
    if missing:
        raise QuantOpsError(f"{graph.source}: BatchNorm '{bn.name}' needs params "
                            f"{', '.join(missing)} to be folded")
    gamma, beta, mean, var = (_f64(params[n]) for n in names)
    for name, v in zip(names, (gamma, beta, mean, var)):
        if not np.isfinite(v).all():
            raise QuantOpsError(f"{graph.source}: BatchNorm '{bn.name}': '{name}' has NaN or "
                                "infinite values")
    if flag(bn.attrs, "fix_gamma", True):  # MXNet's symbol default: gamma is fixed at 1
        gamma = np.ones_like(gamma)
    eps = float(bn.attrs.get("eps", "0.001"))
    # (a variance a rounding error below 0 is kept: var + eps is what the fold divides by)
    if (var + eps <= 0).any():
        raise QuantOpsError(f"{graph.source}: BatchNorm '{bn.name}': running variance "
                            f"'{names[3]}' is negative ({float(var.min()):.3g})")
    return names, gamma, beta, mean, var, eps


def _fold_one(graph, li, bn, params, mode, emit, remap) -> int:
    layer = graph.nodes[li]
    axis = FOLDABLE[layer.op]
    names, gamma, beta, mean, var, eps = _bn_arrays(graph, bn, params)
    inputs = [remap(e) for e in layer.inputs]
    attrs = dict(layer.attrs)
    w_name = _weight_var(graph, layer.inputs[1][0]).name
    has_bias = not flag(attrs, "no_bias", False) and len(layer.inputs) > 2
    b_name = graph.nodes[layer.inputs[2][0]].name if has_bias else f"{layer.name}_bias"
    if mode == "deploy":
        q = graph.nodes[layer.inputs[1][0]]
        m = methods.of_op(q.op)
        if m is not None and not m.follows_weight(q.attrs):
            raise QuantOpsError(f"{graph.source}: '{layer.name}' has a weight quantizer with a "
                                f"learned or stored scale ({q.op}): folding BatchNorm now would "
                                "change the weights under it; fold BatchNorm before QAT "
                                "(fold_bn='qat')")
        if w_name not in params:
            raise QuantOpsError(f"{graph.source}: weight '{w_name}' of '{layer.name}' is not "
                                "in the params")
        w = _f64(params[w_name])
        scale = gamma / np.sqrt(var + eps)
        shape = [1] * w.ndim
        shape[axis] = -1
        bias = _f64(params[b_name]) if has_bias else 0.0
        params[w_name] = (w * scale.reshape(shape)).astype(np.float32)
        params[b_name] = ((bias - mean) * scale + beta).astype(np.float32)
        if not has_bias:
            inputs.append([emit(Node("null", b_name)), 0, 0])
        attrs["no_bias"] = "False"
        return emit(Node(layer.op, layer.name, attrs, inputs))

    # qat: w' = w * s, b' = (b - mean) * s + beta with s = gamma / sqrt(var + eps), in-graph
    if graph.nodes[layer.inputs[1][0]].name != w_name:
        raise QuantOpsError(f"{graph.source}: '{layer.name}' already has a weight quantizer: "
                            "fold BatchNorm for QAT before inserting quantizers")
    bn_in = [remap(e) for e in bn.inputs[1:5]]
    for k, stat in ((2, "mean"), (3, "var")):  # frozen statistics: never trained
        bn_in[k] = [emit(Node("BlockGrad", f"{bn.name}_frozen_{stat}", {}, [bn_in[k]])), 0, 0]
    if flag(bn.attrs, "fix_gamma", True):
        bn_in[0] = [emit(Node("ones_like", f"{bn.name}_fixed_gamma", {}, [bn_in[0]])), 0, 0]
    std = emit(Node("_plus_scalar", f"{bn.name}_var_eps", {"scalar": repr(eps)}, [bn_in[3]]))
    std = emit(Node("sqrt", f"{bn.name}_std", {}, [[std, 0, 0]]))
    scale = emit(Node("elemwise_div", f"{bn.name}_scale", {}, [bn_in[0], [std, 0, 0]]))
    w_shape = ["1"] * _weight_rank(layer)
    w_shape[axis] = "-1"
    rs = emit(Node("Reshape", f"{bn.name}_scale_w", {"shape": "(" + ", ".join(w_shape) + ")"},
                   [[scale, 0, 0]]))
    w_fold = emit(Node("broadcast_mul", f"{layer.name}_weight_folded", {}, [inputs[1], [rs, 0, 0]]))
    centred = (emit(Node("elemwise_sub", f"{bn.name}_centred", {}, [inputs[2], bn_in[2]]))
               if has_bias else
               emit(Node("negative", f"{bn.name}_centred", {}, [bn_in[2]])))
    shifted = emit(Node("elemwise_mul", f"{bn.name}_shift", {}, [[centred, 0, 0], [scale, 0, 0]]))
    b_fold = emit(Node("elemwise_add", f"{layer.name}_bias_folded", {},
                       [[shifted, 0, 0], bn_in[1]]))
    attrs["no_bias"] = "False"
    return emit(Node(layer.op, layer.name, attrs,
                     [inputs[0], [w_fold, 0, 0], [b_fold, 0, 0]]))
