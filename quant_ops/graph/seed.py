"""Convert symbol files of the seed toolkit to quant_ops operators.

The seed toolkit (XiaotaoChen/mx_quant_op, ``operator_cxx/contrib/*``) compiled its
quantizers into a custom MXNet build as ``_contrib_<Op>`` operators (and, for prototyping,
Python ``CustomOp`` s, ``Custom(op_type="<Op>_PY")``).  Their symbol files do not load into
a stock MXNet 1.9.1; :func:`convert_seed_graph` rewrites them to the operators of this
toolkit.

This module knows graphs, not methods: each method descriptor (quant_ops/methods/) lists
the seed operators it imports (``Method.seed_ops``: ``_contrib_X`` or ``Custom:<op_type>``,
with the seed operator's inputs) and maps one node (``Method.from_seed``: attributes parsed
as the seed's dmlc parameters parsed them, bit-count conventions, stored state checked and
carried over or re-made); each descriptor's docstring gives its mapping and where the
seed's arithmetic differs.  Here: which nodes are seed nodes, what the descriptors need to
know about each (its inputs and their stored values, whether its data can be negative,
whether it feeds a layer's weight), and the rewiring.

Where a seed operator computed something no quant_ops operator reproduces, the conversion
raises :class:`QuantOpsError` naming the node and why (and before anything is converted);
what is only a rounding detail or a documented fix of the seed is logged as a note.  A
checkpoint given with the graph must hold the state arrays the seed's nodes read, with the
seed's shape and finite values.  State the seed kept keeps its variable (and name); a new
input is a variable ``<quantizer>_<input>`` whose starting value is returned.  Values are
parsed as data (never evaluated).  Converting a converted graph changes nothing.
"""
from __future__ import annotations

import logging
import re

import numpy as np

from .. import methods
from ..errors import QuantOpsError
from ..methods.base import SeedInput, SeedMapped, SeedNode, SeedState
from .ir import Graph, Node
from .params import as_numpy
from .quantizers import GRAD_SUM_SUFFIX
from .sign import nonnegative

log = logging.getLogger(__name__)

CUSTOM = "Custom:"

_INT = re.compile(r"[+-]?\d+")


def seed_ops() -> dict:
    """Seed operator key (``_contrib_X`` / ``Custom:<op_type>``) -> the method importing it,
    from the registry (a method registered later is included)."""
    table: dict = {}
    for m in methods.REGISTRY.values():
        for key in m.seed_ops:
            if key in table:
                raise QuantOpsError(f"seed operator '{key}' is claimed by methods "
                                    f"'{table[key].name}' and '{m.name}'")
            table[key] = m
    return table


def is_seed_graph(graph: Graph) -> bool:
    """Whether the graph uses any operator of the seed toolkit."""
    table = seed_ops()
    return any(_seed_key(n, table) is not None for n in graph.nodes)


def _seed_key(node: Node, table: dict):
    if node.op.startswith("_contrib_") and node.op in table:
        return node.op
    if node.op == "Custom" and CUSTOM + str(node.attrs.get("op_type")) in table:
        return CUSTOM + node.attrs["op_type"]
    return None


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _parse_shape(text):
    if not text:
        return None
    parts = [p.strip() for p in text.strip().strip("()[]").split(",") if p.strip()]
    if not parts or not all(_INT.fullmatch(p) for p in parts):
        return None
    return tuple(int(p) for p in parts)


def _lookup(params: dict, name: str):
    for key in (name, "aux:" + name, "arg:" + name):
        if key in params:
            return as_numpy(params[key])
    return None


def _consumer_axes(graph: Graph) -> dict:
    """node index -> set of channel axes its output 0 needs as a layer's weight."""
    axes: dict = {}
    for n in graph.nodes:
        if n.op in ("Convolution", "FullyConnected", "Deconvolution") and len(n.inputs) > 1:
            src, out = n.inputs[1][0], n.inputs[1][1]
            if out == 0:
                axes.setdefault(src, set()).add(1 if n.op == "Deconvolution" else 0)
    return axes


def _fail(graph: Graph, node: Node, msg: str):
    raise QuantOpsError(f"{graph.source}: node '{node.name}' ({node.op}): {msg}")


def _seed_node(graph: Graph, i: int, key: str, roles: tuple, params, axes: dict,
               nonneg: set) -> SeedNode:
    n = graph.nodes[i]
    attrs = {k: v for k, v in n.attrs.items() if not k.startswith("__")}
    if key.startswith(CUSTOM):
        attrs.pop("op_type", None)
    inputs = []
    for role, e in zip(roles[1:], n.inputs[1:]):
        src = graph.nodes[e[0]]
        inputs.append(SeedInput(
            role=role, name=src.name, is_var=src.is_var,
            value=_lookup(params, src.name) if params is not None and src.is_var else None,
            shape=_parse_shape(src.attrs.get("__shape__")) if src.is_var else None))
    d = graph.nodes[n.inputs[0][0]]
    dvalue = _lookup(params, d.name) if params is not None and d.is_var else None
    dshape = tuple(dvalue.shape) if dvalue is not None else (
        _parse_shape(d.attrs.get("__shape__")) if d.is_var else None)
    return SeedNode(key=key, name=n.name, op=n.op, attrs=attrs, inputs=tuple(inputs),
                    source=graph.source, has_params=params is not None, data_name=d.name,
                    data_is_var=d.is_var, data_value=dvalue, data_shape=dshape,
                    weight_axes=frozenset(axes.get(i, ())),
                    nonnegative=tuple(n.inputs[0][:2]) in nonneg, log=log)


def convert_seed_graph(graph: Graph, params: dict | None = None, *,
                       grad_sum: bool = True) -> tuple:
    """Rewrite the seed toolkit's quantizers into quant_ops operators.

    ``params`` (name -> numpy array or NDArray; plain names or ``arg:``/``aux:`` prefixed)
    is the seed checkpoint: its state arrays are checked and give the state variables their
    shapes.  Returns ``(new_graph, arrays)`` where ``arrays`` maps names to float32 numpy
    arrays to add to (or replace in) the params: every new state variable (e.g.
    ``<quantizer>_qstate``, zeros: step 0, inference) and any stored state re-made for its
    new meaning or shape.  The input graph is not changed.

    ``grad_sum`` routes a quantized leaf (a weight variable) through MXNet's identity, as
    the nd/sym front does, so that ``grad_req='add'`` accumulates its gradient.
    """
    table = seed_ops()
    keys = {i: k for i, n in enumerate(graph.nodes) if (k := _seed_key(n, table)) is not None}
    if not keys:
        return Graph([Node(n.op, n.name, dict(n.attrs), [list(e) for e in n.inputs])
                      for n in graph.nodes], [list(h) for h in graph.heads],
                     dict(graph.attrs), graph.source), {}

    arrays: dict = {}
    names = {n.name for n in graph.nodes}
    axes = _consumer_axes(graph)
    nonneg = nonnegative(graph)
    # map every node first: nothing is half-converted when one of them fails
    mapped: dict = {}        # old index -> (method, attrs, [entry spec per input])
    var_shape: dict = {}     # old index of a kept state variable -> new __shape__
    kept: set = set()        # old indices of seed inputs a converted node still reads
    for i, key in keys.items():
        n = graph.nodes[i]
        m = table[key]
        roles = m.seed_ops[key]
        if len(n.inputs) != len(roles):
            _fail(graph, n, f"has {len(n.inputs)} inputs; the seed operator takes "
                            f"{len(roles)} ({', '.join(roles)})")
        node = _seed_node(graph, i, key, roles, params, axes, nonneg)
        res = m.from_seed(node)
        if not isinstance(res, SeedMapped) or set(res.inputs) != set(m.input_names[1:]):
            raise QuantOpsError(f"method '{m.name}': from_seed must map every input of "
                                f"{m.op} ({', '.join(m.input_names[1:])})")
        spec = []
        for inp in m.input_names[1:]:
            st: SeedState = res.inputs[inp]
            if st.seed is not None:
                e = n.inputs[1 + st.seed]
                src = graph.nodes[e[0]]
                kept.add(e[0])
                if st.value is not None:
                    arrays[src.name] = np.asarray(st.value, np.float32)
                if st.shape is not None and src.is_var:
                    prev = var_shape.get(e[0])
                    if prev is not None and prev != tuple(st.shape):
                        node.fail(f"shares its {roles[1 + st.seed]} variable '{src.name}' "
                                  "with another quantizer that needs another shape")
                    var_shape[e[0]] = tuple(st.shape)
                spec.append(("keep", list(e)))
            else:
                var = f"{n.name}_{inp}"
                if var in names:
                    node.fail(f"its state variable '{var}' would clash with a node of "
                              "that name")
                names.add(var)
                if st.value is not None:
                    arrays[var] = np.asarray(st.value, np.float32)
                shape = {} if st.shape is None else {"__shape__": _shape_str(st.shape)}
                spec.append(("new", var, shape))
        attrs = {k: v for k, v in n.attrs.items() if k.startswith("__")}  # MXNet's own
        attrs.update(res.attrs)
        mapped[i] = (m, attrs, spec)

    # seed state no converted node reads any more (re-made under a new name) is dropped
    used = {e[0] for j, n in enumerate(graph.nodes) if j not in mapped for e in n.inputs}
    used |= {h[0] for h in graph.heads} | kept | {graph.nodes[i].inputs[0][0] for i in mapped}
    dropped = {e[0] for i in mapped for e in graph.nodes[i].inputs[1:]
               if graph.nodes[e[0]].is_var} - used

    out_nodes: list = []
    order: list = []
    new_index: dict = {}
    gradsum: dict = {}       # old leaf index -> new index of its identity

    def emit(node: Node, old=None) -> int:
        out_nodes.append(node)
        order.append(old)
        return len(out_nodes) - 1

    for i, n in enumerate(graph.nodes):
        if i in dropped:
            continue
        if i in mapped:
            m, attrs, spec = mapped[i]
            data = [new_index[n.inputs[0][0]], n.inputs[0][1], n.inputs[0][2]]
            src = graph.nodes[n.inputs[0][0]]
            if grad_sum and src.is_var:
                if n.inputs[0][0] not in gradsum:
                    gradsum[n.inputs[0][0]] = emit(Node(
                        "_copy", src.name + GRAD_SUM_SUFFIX, {}, [data]))
                data = [gradsum[n.inputs[0][0]], 0, 0]
            inputs = [data]
            for s in spec:
                if s[0] == "keep":
                    inputs.append([new_index[s[1][0]], s[1][1], s[1][2]])
                else:
                    inputs.append([emit(Node("null", s[1], dict(s[2]))), 0, 0])
            new_index[i] = emit(Node(m.op, n.name, attrs, inputs), i)
            continue
        attrs = dict(n.attrs)
        if i in var_shape:
            attrs["__shape__"] = _shape_str(var_shape[i])
        new_index[i] = emit(Node(n.op, n.name, attrs,
                                 [[new_index[e[0]], e[1], e[2]] for e in n.inputs]), i)
    return graph.rebuilt(order, out_nodes), arrays
