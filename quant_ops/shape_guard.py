"""A guard on MXNet's symbolic shape inference for graphs that hold the library's quantizers.

MXNet 1.9.1 packs the input shapes of an external operator into a buffer sized by the sum
of their ranks before it calls the operator's shape function; an input whose rank is
unknown counts as -1, so the buffer is too small and MXNet overflows it (a segfault, or
``std::bad_alloc``) before the library can say anything.  That happens whenever a
quantizer's data has no shape yet: ``infer_shape_partial()`` without the data shape,
``simple_bind`` without it, ``bind`` with a 0-d array.

Every Symbol entry that infers shapes (``infer_shape``, ``infer_shape_partial``,
``simple_bind``, ``bind``, ``optimize_for`` with arrays) first infers the same graph with
each quantizer replaced by an identity (a quantizer's output has its data's shape), and a
quantizer whose data or whose parameter variable has no known rank is an ``OperatorError``
naming the node.  Graphs without quantizers are not touched.
"""
from __future__ import annotations

import functools
import json
from typing import Callable, Iterable, Mapping

import mxnet as mx


_Symbol = mx.sym.Symbol


def _proxy(sym: _Symbol, quantizers: Iterable[str]):
    """(graph with every quantizer an identity of its data, the quantizers' JSON nodes
    with the graph's nodes), or None when the graph has no quantizer."""
    ops = set(quantizers)
    text = sym.tojson()
    if not any(f'"op": "{op}"' in text for op in ops):
        return None
    graph = json.loads(text)
    nodes = graph["nodes"]
    found = [n for n in nodes if n.get("op") in ops]
    if not found:
        return None
    originals = [dict(n, inputs=list(n["inputs"])) for n in found]
    for n in found:
        n["op"], n["inputs"] = "_copy", n["inputs"][:1]
        n.pop("attrs", None)
    return mx.sym.load_json(json.dumps(graph)), originals, nodes


def _unknown(shape) -> bool:
    return not shape or any(d is None or d < 1 for d in shape)


def check(sym: _Symbol, shapes: Mapping[str, tuple], quantizers: Iterable[str],
          infer: Callable) -> None:
    """Raise OperatorError if inferring ``sym`` with ``shapes`` (name -> shape) would give
    a quantizer an input of unknown rank.  ``infer`` is MXNet's own partial inference."""
    from .ops import OperatorError

    got = _proxy(sym, quantizers)
    if got is None:
        return
    proxy, qnodes, nodes = got
    internals = proxy.get_internals()
    names = set(internals.list_arguments()) | set(internals.list_auxiliary_states())
    known = {k: tuple(v) for k, v in shapes.items() if k in names and v is not None}
    try:
        _, outs, _ = infer(internals, True, **known)
    except mx.base.MXNetError:
        return  # MXNet refuses the shapes itself (and will again, cleanly)
    out_shape = dict(zip(internals.list_outputs(), outs or []))
    for q in qnodes:
        data = out_shape.get(f"{q['name']}_output")
        if data is None or _unknown(data):
            raise OperatorError(
                f"{q['op']} '{q['name']}': the shape of its data is not known here "
                f"(got {tuple(data) if data else '()'}); give the graph's input shapes "
                "(MXNet 1.9 crashes inferring an external operator's shapes from an input "
                "of unknown rank)")
        for entry in q["inputs"][1:]:
            src = nodes[entry[0]]
            while src.get("op") in ("_copy", "identity") and src["inputs"]:
                src = nodes[src["inputs"][0][0]]  # the wrappers' identity on a leaf
            if src.get("op") != "null":
                continue
            shp = shapes.get(src["name"])
            pinned = "__shape__" in src.get("attrs", {})  # a rank it carries (see ops.py)
            if (shp is None and not pinned) or (shp is not None and len(tuple(shp)) == 0):
                raise OperatorError(
                    f"{q['op']} '{q['name']}': input '{src['name']}' has no known rank; "
                    "give it a shape (mx.sym.var(name, shape=(1,)) or an array of shape "
                    "(1,), not a 0-d one)")


def _named(names: list, values) -> dict:
    """name -> shape of arrays given as a list (in ``names`` order) or a dict."""
    if values is None:
        return {}
    if isinstance(values, Mapping):
        return {k: getattr(v, "shape", None) for k, v in values.items()}
    return {k: getattr(v, "shape", None) for k, v in zip(names, values)}


def _bound_shapes(sym: _Symbol, args, aux) -> dict:
    """name -> shape of the arguments and auxiliary states given to a bind."""
    return {**_named(sym.list_arguments(), args), **_named(sym.list_auxiliary_states(), aux)}


def install(quantizers: Callable[[], Iterable[str]]) -> None:
    """Guard the Symbol methods that infer shapes (idempotent)."""
    if getattr(_Symbol, "__qo_shape_guard__", False):
        return
    infer = _Symbol._infer_shape_impl

    @functools.wraps(infer)
    def _infer_shape_impl(self, partial, *args, **kwargs):
        given = dict(kwargs) if kwargs else dict(zip(self.list_arguments(), args))
        check(self, given, quantizers(), infer)
        return infer(self, partial, *args, **kwargs)

    simple_bind = _Symbol.simple_bind

    @functools.wraps(simple_bind)
    def guarded_simple_bind(self, ctx, *args, **kwargs):
        check(self, {k: v for k, v in kwargs.items() if isinstance(v, tuple)},
              quantizers(), infer)
        return simple_bind(self, ctx, *args, **kwargs)

    bind = _Symbol.bind

    @functools.wraps(bind)
    def guarded_bind(self, ctx, args, *rest, **kwargs):
        aux = kwargs.get("aux_states", rest[2] if len(rest) > 2 else None)
        check(self, _bound_shapes(self, args, aux), quantizers(), infer)
        return bind(self, ctx, args, *rest, **kwargs)

    optimize_for = _Symbol.optimize_for

    @functools.wraps(optimize_for)
    def guarded_optimize_for(self, backend, args=None, aux=None, *rest, **kwargs):
        if args is not None:
            check(self, _bound_shapes(self, args, aux), quantizers(), infer)
        return optimize_for(self, backend, args, aux, *rest, **kwargs)

    _Symbol._infer_shape_impl = _infer_shape_impl
    _Symbol.simple_bind = guarded_simple_bind
    _Symbol.bind = guarded_bind
    _Symbol.optimize_for = guarded_optimize_for
    _Symbol.__qo_shape_guard__ = True

