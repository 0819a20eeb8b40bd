"""Insert quantizers into a graph as a policy says, and strip them out again.

One quantizer per tensor: a tensor that feeds several layers is quantized once.  A tensor
that already comes out of a quantizer is left alone, so rewriting twice changes nothing.
State variables are named ``<quantizer>_minmax`` / ``<quantizer>_qstate`` with the quantizer
named ``<tensor>_<method>``, so a checkpoint is a plain ``.params`` file.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import QuantOpsError
from .. import methods
from .ir import Graph, Node
from .params import as_numpy
from .quantizers import GRAD_SUM_SUFFIX, is_grad_sum
from .sign import nonnegative

# input position of the weight, and the weight's output-channel axis, per layer op
WEIGHT_INPUT = {"Convolution": (1, 0), "FullyConnected": (1, 0), "Deconvolution": (1, 1)}
SHAPE_ADDED = "__qo_shape_added__"


@dataclass
class Rewrite:
    """A rewritten graph, the state arrays it needs, and what was quantized."""

    graph: Graph
    new_params: dict = field(default_factory=dict)  # initial value of every new variable
    table: list = field(default_factory=list)         # rows for the summary


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _known_shape(node: Node, shapes: dict):
    if node.name in shapes:
        return tuple(int(d) for d in shapes[node.name])
    s = node.attrs.get("__shape__")
    if s:
        dims = tuple(int(d) for d in s.strip("()[] ").replace(" ", "").split(",") if d)
        if dims and all(d > 0 for d in dims):
            return dims
    return None


def _shared_positions(node: Node, constant: set) -> list:
    """Data inputs whose scales a runtime fuses into one: all of an add/concat, the one of an
    average pooling.  A max pooling gets none: it passes codes through, so the quantizer
    after it serves, and a second range before it would make the engine requantize.  An add
    or concat that reads a ``constant`` (computed from parameters alone) merges no
    activations: it adds a bias (BN folded for QAT computes one in-graph), which the engine
    fuses into the layer, so none of its inputs is quantized there."""
    if node.op == "Pooling":
        return list(range(0 if node.attrs.get("pool_type", "max") == "max" else 1))
    if any(e[0] in constant for e in node.inputs):
        return []
    return list(range(len(node.inputs)))


def _constants(graph: Graph, params: set) -> set:
    """Nodes whose values come from the ``params`` variables alone."""
    const: set = set()
    for i, n in enumerate(graph.nodes):
        if n.is_var:
            if n.name in params:
                const.add(i)
        elif n.inputs and all(e[0] in const for e in n.inputs):
            const.add(i)
    return const


def _shared_groups(graph: Graph, policy, constant: set) -> dict:
    """(node, output) -> group name, for tensors that must share one range: the inputs of
    each ``policy.shared_inputs`` node, merged transitively (a tensor feeding two adds joins
    both groups)."""
    parent: dict = {}

    def find(k):
        while parent.setdefault(k, k) != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for n in graph.nodes:
        if n.op in policy.shared_inputs and not policy.skipped(n.name):
            keys = [(n.inputs[p][0], n.inputs[p][1]) for p in _shared_positions(n, constant)]
            keys = [k for k in keys if not methods.is_quantizer(graph.nodes[k[0]].op)]
            for k in keys[1:]:
                parent[find(k)] = find(keys[0])
    roots: dict = {}
    for k in parent:
        roots.setdefault(find(k), []).append(k)
    names = {}
    for root, members in roots.items():
        first = min(members)
        node = graph.nodes[first[0]]
        names.update({m: f"{node.name}_shared_{policy.activation.method}" for m in members})
    return names


def _inferred_shape(internals, node: Node, out_idx: int, shapes: dict):
    """Shape of one tensor by MXNet's inference on the subgraph that produces it (a weight
    computed in-graph, e.g. folded for QAT, reads only parameters of known shape)."""
    names = internals.list_outputs()
    key = f"{node.name}_output" if f"{node.name}_output" in names \
        else f"{node.name}_output{out_idx}"
    if key not in names:
        return None
    sub = internals[key]
    known = {k: tuple(v) for k, v in shapes.items() if k in set(sub.list_arguments())}
    try:
        _, out, _ = sub.infer_shape_partial(**known)
    except Exception:  # an op that insists on shapes it cannot have here: no answer
        return None
    return tuple(out[0]) if out and out[0] and all(d > 0 for d in out[0]) else None


def _signed_form(spec, tensor: str, consumer: Node, source: str):
    """(spec, note) for an unsigned activation method on a tensor that can be negative:
    its signed form, or a refusal naming the node (it would zero half the tensor)."""
    params = spec.descriptor.signed_params(dict(spec.params))
    if params is None:
        raise QuantOpsError(
            f"{source}: '{spec.method}' represents [0, a] only, but '{tensor}', the input of "
            f"'{consumer.name}', can be negative (it is not the output of a ReLU-like op): "
            "give that layer a signed method (an override, e.g. int8) or skip it")
    return (spec.merged({"params": params}),
            f"{spec.method} in its signed form: '{tensor}' can be negative")


def insert_quantizers(graph: Graph, policy, shapes: dict | None = None,
                      values: dict | None = None) -> Rewrite:
    """Quantize the inputs of every layer the policy selects.

    ``shapes`` maps variable names to shapes (e.g. from the params file); a quantized weight
    needs one, as MXNet 1.9 cannot infer a shape backwards through an external operator.
    ``values`` (name -> array) lets learned quantizer inputs start from the weights.
    """
    shapes = shapes or {}
    values = values or {}
    layers = [i for i, n in graph.ops() if n.op in policy.quantize_ops]
    first, last = (layers[0], layers[-1]) if layers else (-1, -1)
    policy.check_patterns(n.name for n in graph.nodes)

    out_nodes: list = []
    order: list = []
    new_index: dict = {}               # old node index -> new index
    quantized: dict = {}               # (old src, out) -> new entry of the quantizer output
    res = Rewrite(graph)
    constant = _constants(graph, set(shapes))
    group_of = _shared_groups(graph, policy, constant)   # tensor -> its shared-scale group
    group_range: dict = {}             # group name -> new index of its range variable

    def emit(node: Node, old=None) -> int:
        out_nodes.append(node)
        order.append(old)
        return len(out_nodes) - 1

    def add_quantizer(src_old: int, out_idx: int, spec, is_weight: bool, axis: int,
                      consumer: Node, role: str) -> list:
        src = graph.nodes[src_old]
        tensor = src.name if out_idx == 0 else f"{src.name}_out{out_idx}"
        qname = f"{tensor}_{spec.method}"
        sign_note = None
        if not is_weight and (src_old, out_idx) not in nonneg \
                and spec.descriptor.unsigned(spec.op_attrs(is_weight=False)):
            spec, sign_note = _signed_form(spec, tensor, consumer, graph.source)
        channels = 1
        if is_weight and spec.per_channel:
            shape = tensor_shape(src_old, out_idx)
            if shape is None:
                raise QuantOpsError(f"{graph.source}: weight '{tensor}' of node "
                                    f"'{consumer.name}' has no known shape: give the params "
                                    "file (or input shapes) so it can be quantized per channel")
            channels = shape[axis]
        # activations at an add/concat share one range variable with their group (where the
        # range is state the operator keeps; a learned range stays per tensor)
        m = spec.descriptor
        shares = m.range_input is not None and not m.input(m.range_input).learned
        group = group_of.get((src_old, out_idx)) if shares and not is_weight else None
        new_inputs = []
        weight = values.get(src.name) if is_weight else None
        if weight is not None:
            weight = as_numpy(weight)
        init = spec.initial(is_weight, channels, weight, axis)
        for inp in spec.descriptor.inputs:
            name, learned = f"{qname}_{inp.name}", inp.learned
            shape = (inp.size(channels),)
            if inp.name == spec.descriptor.range_input and group is not None:
                # one range for every tensor of the group, as the engine needs at an add/concat
                if group not in group_range:
                    group_range[group] = emit(Node("null", f"{group}_{inp.name}",
                                                   {"__shape__": "(1,)"}))
                    res.new_params[f"{group}_{inp.name}"] = np.zeros(1, np.float32)
                new_inputs.append([group_range[group], 0, 0])
                continue
            var = [emit(Node("null", name, {"__shape__": _shape_str(shape)})), 0, 0]
            if learned:  # a leaf whose gradient must accumulate under grad_req='add'
                var = [emit(Node("_copy", f"{name}{GRAD_SUM_SUFFIX}", {}, [var])), 0, 0]
            new_inputs.append(var)
            res.new_params[name] = np.asarray(init[inp.name], np.float32).reshape(shape)
        data = [new_index[src_old], out_idx, 0]
        if src.is_var:  # a leaf: route through identity so grad_req='add' accumulates
            data = [emit(Node("_copy", f"{tensor}{GRAD_SUM_SUFFIX}", {}, [data])), 0, 0]
        attrs = spec.op_attrs(is_weight=is_weight, channel_axis=axis)
        q = emit(Node(spec.op_name, qname, attrs, [data] + new_inputs))
        res.table.append({"node": consumer.name, "op": consumer.op, "input": role,
                          "tensor": tensor, "quantizer": qname, "method": spec.method,
                          "bits": spec.bits, "shared_range": group, "note": sign_note,
                          "granularity": "per-channel" if channels > 1 or (
                              is_weight and spec.per_channel) else "per-tensor"})
        return [q, 0, 0]

    internals: list = []
    nonneg = nonnegative(graph)

    def tensor_shape(idx: int, out_idx: int):
        node = graph.nodes[idx]
        if node.is_var:
            return _known_shape(node, shapes)
        if not internals:  # only when a weight is computed in-graph (e.g. BN folded for QAT)
            internals.append(graph.to_symbol().get_internals())
        return _inferred_shape(internals[0], node, out_idx, shapes)

    for i, node in enumerate(graph.nodes):
        rule = None
        if not node.is_var and node.op in policy.quantize_ops:
            rule = policy.rule_for(node.name, node.op, i == first, i == last)
        new_inputs = [[new_index[e[0]], e[1], e[2]] for e in node.inputs]
        if node.op in policy.shared_inputs and not policy.skipped(node.name):
            for pos in _shared_positions(node, constant):
                key = (node.inputs[pos][0], node.inputs[pos][1])
                if methods.is_quantizer(graph.nodes[key[0]].op):
                    continue
                if key not in quantized:
                    quantized[key] = add_quantizer(key[0], key[1], policy.activation, False, 0,
                                                   node, f"input {pos}")
                new_inputs[pos] = list(quantized[key])
        if rule is not None:
            w_pos, axis = WEIGHT_INPUT.get(node.op, (1, 0))
            for pos, spec, is_w, role in ((0, rule.activation, False, "data"),
                                          (w_pos, rule.weight, True, "weight")):
                if spec is None or pos >= len(node.inputs):
                    continue
                src_old, out_idx = node.inputs[pos][0], node.inputs[pos][1]
                if methods.is_quantizer(graph.nodes[src_old].op):
                    continue  # already quantized: rewriting is idempotent
                key = (src_old, out_idx)
                if key not in quantized:
                    quantized[key] = add_quantizer(src_old, out_idx, spec, is_w, axis, node,
                                                   role)
                new_inputs[pos] = list(quantized[key])
        attrs = dict(node.attrs)
        if node.is_var and "__shape__" not in attrs and _known_shape(node, shapes):
            # MXNet 1.9 cannot infer a shape backwards through an external operator: give
            # every parameter its shape (strip removes what was added)
            attrs.update({"__shape__": _shape_str(_known_shape(node, shapes)), SHAPE_ADDED: "1"})
        new_index[i] = emit(Node(node.op, node.name, attrs, new_inputs), i)
    res.graph = graph.rebuilt(order, out_nodes)
    return res


def strip_quantizers(graph: Graph) -> Graph:
    """Remove every quantizer, its state and its gradient-sum identity: the float graph."""
    drop = set()
    redirect: dict = {}     # old index of a removed node -> entry it forwards to
    for i, n in enumerate(graph.nodes):
        if methods.is_quantizer(n.op):
            drop.add(i)
            data = n.inputs[0]
            src = graph.nodes[data[0]]
            if is_grad_sum(src):
                drop.add(data[0])
                data = src.inputs[0]
            redirect[i] = data
            for e in n.inputs[1:]:  # state and learned parameters (maybe behind a copy)
                drop.add(e[0])
                p = graph.nodes[e[0]]
                if is_grad_sum(p):
                    drop.add(p.inputs[0][0])
    g = graph.rewired(drop, redirect)
    for n in g.nodes:  # shapes the rewrite added to variables go with it
        if n.attrs.pop(SHAPE_ADDED, None):
            n.attrs.pop("__shape__", None)
    return g
