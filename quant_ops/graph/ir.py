"""A small IR of MXNet symbol JSON: nodes, their inputs and attributes, the heads.

Parsed as plain data (never evaluated); written back as JSON that ``mx.sym.load_json``
takes.  Node and tensor names are kept exactly (but for an operator whose name repeats an
earlier one's: it gets a suffix), so a rewrite that is undone gives back the original JSON.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import QuantOpsError

log = logging.getLogger(__name__)

Entry = tuple  # (node index, output index, version)


@dataclass
class Node:
    op: str                      # "null" for a variable
    name: str
    attrs: dict = field(default_factory=dict)
    inputs: list = field(default_factory=list)   # list of [node, output, version]

    @property
    def is_var(self) -> bool:
        return self.op == "null"


#: operators that hold a subgraph, which MXNet crashes building without it (the IR keeps
#: no subgraphs, so it never asks MXNet about them): the ops of a graph MXNet partitioned
#: (all ``_sg_*`` too), which the toolkit refuses, and control flow, which it reads
PARTITION_OPS = frozenset({"_CachedOp", "_default_subgraph_op", "_tensorrt_subgraph_op"})
CONTROL_FLOW_OPS = frozenset({"_foreach", "_while_loop", "_cond"})


def _partitioned(op: str) -> bool:
    return op.startswith("_sg_") or op in PARTITION_OPS


@dataclass
class Graph:
    nodes: list
    heads: list
    attrs: dict = field(default_factory=dict)
    source: str = "<graph>"      # file it came from, for error messages

    # -- reading ----------------------------------------------------------------
    @classmethod
    def from_json(cls, text: str, source: str = "<graph>") -> "Graph":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise QuantOpsError(f"{source}: not valid JSON ({e})") from None
        except RecursionError:
            raise QuantOpsError(f"{source}: not an MXNet symbol file (its JSON nests deeper "
                                "than any symbol does)") from None
        if not isinstance(d, dict) or not isinstance(d.get("nodes"), list) \
                or not isinstance(d.get("heads"), list):
            raise QuantOpsError(f"{source}: not an MXNet symbol file (needs 'nodes' and "
                                "'heads')")
        nodes = []
        for i, n in enumerate(d["nodes"]):
            if not isinstance(n, dict) or not isinstance(n.get("op"), str) \
                    or not isinstance(n.get("name"), str):
                raise QuantOpsError(f"{source}: node #{i} lacks a string 'op' or 'name'")
            if _partitioned(n["op"]):
                raise QuantOpsError(
                    f"{source}: node '{n['name']}' ({n['op']}) runs a subgraph: this is a "
                    "graph MXNet has partitioned (fused oneDNN or native INT8 operators); "
                    "the toolkit reads float and fake-quantized graphs: give the model it "
                    "was made from")
            attrs = n.get("attrs", n.get("param", {})) or {}
            if not isinstance(attrs, dict):
                raise QuantOpsError(f"{source}: node '{n['name']}' has attributes that are "
                                    "not a mapping")
            inputs = []
            raw_inputs = n.get("inputs", [])
            if not isinstance(raw_inputs, list):
                raise QuantOpsError(f"{source}: node '{n['name']}' has inputs that are not a "
                                    "list")
            for e in raw_inputs:
                if not (_entry_ok(e) and e[0] < i):
                    raise QuantOpsError(f"{source}: node '{n['name']}' has a bad input {e!r} "
                                        "(inputs are [node, output, version] of earlier "
                                        "nodes, with output and version >= 0)")
                inputs.append([e[0], e[1], e[2] if len(e) == 3 else 0])
            nodes.append(Node(n["op"], n["name"], {str(k): str(v) for k, v in attrs.items()},
                              inputs))
        if not d["heads"]:
            raise QuantOpsError(f"{source}: the graph has no output (empty 'heads')")
        for h in d["heads"]:
            if not (_entry_ok(h) and h[0] < len(nodes)):
                raise QuantOpsError(f"{source}: bad head {h!r} (heads are [node, output, "
                                    "version] of existing nodes)")
        heads = [[h[0], h[1], h[2] if len(h) == 3 else 0] for h in d["heads"]]
        attrs = d.get("attrs", {})
        if not isinstance(attrs, dict):
            raise QuantOpsError(f"{source}: graph 'attrs' is not a mapping")
        graph = cls(_unique_op_names(nodes, source), heads, dict(attrs), source)
        graph.check_inputs()
        graph.check_outputs()
        return graph

    def check_inputs(self) -> None:
        """Each operator node has exactly the inputs its operator declares for its
        attributes: MXNet 1.9.1 sizes its buffers from the declaration and crashes on a
        node with fewer (a ``BatchNorm`` with no inputs; found by bench/fuzz_readers.py)."""
        for n in self.nodes:
            if n.is_var:
                continue
            sig = _signature(n.op, n.attrs)
            if sig is not None and len(n.inputs) != len(sig[0]):
                raise QuantOpsError(
                    f"{self.source}: node '{n.name}' ({n.op}) has {len(n.inputs)} inputs; "
                    f"the operator takes {len(sig[0])} ({', '.join(sig[0])})")

    def check_outputs(self) -> None:
        """Every input and head names an output its node has (MXNet 1.9.1 crashes on a
        symbol that does not): a variable has one output, an operator the visible outputs
        MXNet gives it for its attributes."""
        uses = [(e, f"input of node '{n.name}'") for n in self.nodes for e in n.inputs]
        uses += [(h, "graph output") for h in self.heads]
        for e, where in uses:
            if e[1] == 0:
                continue
            node = self.nodes[e[0]]
            sig = (None, 1) if node.is_var else _signature(node.op, node.attrs)
            if sig is not None and e[1] >= sig[1]:
                raise QuantOpsError(f"{self.source}: {where} reads output {e[1]} of "
                                    f"'{node.name}' ({node.op}), which has {sig[1]}")

    @classmethod
    def from_symbol(cls, sym) -> "Graph":
        return cls.from_json(sym.tojson(), "<symbol>")

    # -- writing ----------------------------------------------------------------
    def to_json(self) -> str:
        out_nodes = []
        for n in self.nodes:
            row = {"op": n.op, "name": n.name, "inputs": [list(e) for e in n.inputs]}
            if n.attrs:
                row["attrs"] = dict(n.attrs)
            out_nodes.append(row)
        return json.dumps({
            "nodes": out_nodes,
            "arg_nodes": [i for i, n in enumerate(self.nodes) if n.is_var],
            "heads": [list(h) for h in self.heads],
            "attrs": self.attrs or {"mxnet_version": ["int", 10901]},
        }, separators=(",", ":"),  # no indent: json's C encoder is ~5x faster without it
            ensure_ascii=False)        # MXNet's reader takes UTF-8 names, not \u escapes

    def to_symbol(self):
        import mxnet as mx

        return mx.sym.load_json(self.to_json())

    # -- queries ----------------------------------------------------------------
    def index(self) -> dict:
        return {n.name: i for i, n in enumerate(self.nodes)}

    def consumers(self) -> dict:
        """node index -> indices of the nodes reading it (one entry per use; -1: a graph
        output)."""
        uses: dict = {}
        for i, n in enumerate(self.nodes):
            for e in n.inputs:
                uses.setdefault(e[0], []).append(i)
        for h in self.heads:
            uses.setdefault(h[0], []).append(-1)
        return uses

    def ops(self) -> Iterator[tuple[int, Node]]:
        return ((i, n) for i, n in enumerate(self.nodes) if not n.is_var)

    # -- editing ----------------------------------------------------------------
    def rewired(self, drop: set, redirect: dict, replace: dict | None = None) -> "Graph":
        """The graph without the nodes in ``drop``: a use of a dropped node goes to the entry
        ``redirect[node]`` (followed transitively); ``replace[i]`` stands in for node i."""
        replace = replace or {}
        nodes: list = []
        new_index: dict = {}

        def resolve(e):
            while e[0] in redirect:
                e = redirect[e[0]]
            return [new_index[e[0]], e[1], e[2]]

        for i, n in enumerate(self.nodes):
            if i in drop:
                continue
            n = replace.get(i, n)
            new_index[i] = len(nodes)
            nodes.append(Node(n.op, n.name, dict(n.attrs), [resolve(e) for e in n.inputs]))
        return Graph(nodes, [resolve(h) for h in self.heads], dict(self.attrs), self.source)

    def rebuilt(self, order: list, new_nodes: list) -> "Graph":
        """A graph whose node k is ``new_nodes[k]``, where ``order[k]`` is the old index of
        node k or None for an inserted node.  Inputs of the new nodes must already use new
        indices; heads are remapped."""
        old_to_new = {old: k for k, old in enumerate(order) if old is not None}
        heads = [[old_to_new[h[0]], h[1], h[2]] for h in self.heads]
        return Graph(new_nodes, heads, dict(self.attrs), self.source)


def _unique_op_names(nodes: list, source: str) -> list:
    """Operator nodes renamed where a name repeats (gluoncv's xception and i3d graphs have
    such): every tensor and every quantizer state is named after its node, and two nodes
    of one name make two states of one name, which MXNet's executor refuses (and Gluon
    silently shares).  Variables keep their names: a repeated one is one shared parameter."""
    taken = {n.name for n in nodes}
    seen: set = set()
    renamed = []
    for n in nodes:
        if n.op != "null":
            if n.name in seen:
                k = 1
                while f"{n.name}_{k}" in taken:
                    k += 1
                renamed.append((n.name, f"{n.name}_{k}"))
                n.name = f"{n.name}_{k}"
                taken.add(n.name)
            seen.add(n.name)
    if renamed:
        log.warning("%s: %d operator nodes share a name with an earlier one, renamed "
                    "(first: '%s' -> '%s')", source, len(renamed), *renamed[0])
    return nodes


def flag(attrs: dict, key: str, default: bool = False) -> bool:
    """A boolean attribute as MXNet stores it (a string; dmlc reads true/1 case-blind)."""
    v = attrs.get(key)
    return default if v is None else str(v).lower() in ("true", "1")


def _entry_ok(e) -> bool:
    return (isinstance(e, list) and len(e) in (2, 3)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in e))


def _signature(op: str, attrs: dict) -> tuple | None:
    """(input names, number of visible outputs) of operator ``op`` with ``attrs``, as MXNet
    declares them; None where MXNet cannot tell (an unknown operator, attributes it cannot
    parse, a ``Custom`` op not registered here): its own load reports those cleanly."""
    from .. import methods

    m = methods.of_op(op)
    if m is not None:    # a library operator: MXNet does not create its missing inputs
        return list(m.input_names), 1
    if _partitioned(op) or op in CONTROL_FLOW_OPS:   # built alone, MXNet would crash
        return None
    key = (op, tuple(sorted((k, v) for k, v in attrs.items()
                            if not (k.startswith("__") and k.endswith("__")))))
    if key not in _SIGNATURES:
        _SIGNATURES[key] = _ask_mxnet(*key)
    return _SIGNATURES[key]


_SIGNATURES: dict = {}


def _ask_mxnet(op: str, attrs: tuple) -> tuple | None:
    """Build the operator alone with no inputs (MXNet then creates a variable per declared
    input) and read its inputs and outputs."""
    import ctypes

    import mxnet as mx
    from mxnet.base import _LIB, SymbolHandle, c_str, c_str_array, mx_uint

    handle, out = ctypes.c_void_p(), SymbolHandle()
    keys, vals = [k for k, _ in attrs], [v for _, v in attrs]
    try:
        if _LIB.NNGetOpHandle(c_str(op), ctypes.byref(handle)) != 0 or not handle.value:
            return None
        if _LIB.MXSymbolCreateAtomicSymbol(handle, mx_uint(len(keys)), c_str_array(keys),
                                           c_str_array(vals), ctypes.byref(out)) != 0:
            return None
        sym = mx.sym.Symbol(out)
        sym._compose(name="q")
        inputs, outputs = sym.list_inputs(), sym.list_outputs()
    except mx.base.MXNetError:
        return None
    return [n[2:] for n in inputs], len(outputs)


def load_graph(path: str | Path) -> Graph:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise QuantOpsError(f"{p}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise QuantOpsError(f"{p}: not a symbol JSON (not UTF-8 text: byte {e.start})") from None
    return Graph.from_json(text, str(p))
