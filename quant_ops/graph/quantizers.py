"""A typed view of the quantizers in a graph: which node, which method, which tensor it
reads, and which variables hold its learned and state inputs.

Every stage that needs a quantizer's state (calibration, export, deployment, training
constraints, the alignment check) reads it here, so none finds state by a name suffix,
parses boolean attributes by hand, or walks through the gradient-sum copies on its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from .. import methods
from ..methods.base import MODE_INPUT, Method, flag
from .ir import Graph, Node

#: name suffix of the identity copies that let a leaf's gradient accumulate (grad_req='add')
GRAD_SUM_SUFFIX = "_qo_gradsum"


def is_grad_sum(node: Node) -> bool:
    """The node is a gradient-sum copy the rewrite put in front of a leaf."""
    return node.op == "_copy" and node.name.endswith(GRAD_SUM_SUFFIX)


def through_copies(graph: Graph, entry) -> list:
    """The entry a gradient-sum copy forwards (the entry itself otherwise)."""
    while is_grad_sum(graph.nodes[entry[0]]) and graph.nodes[entry[0]].inputs:
        entry = graph.nodes[entry[0]].inputs[0]
    return list(entry)


def tensor_name(node: Node, out: int) -> str:
    """The name MXNet gives output ``out`` of ``node`` among a symbol's internals."""
    if node.is_var:
        return node.name
    return f"{node.name}_output" + (str(out) if out else "")


@dataclass(frozen=True)
class Quantizer:
    """One quantizer node."""

    index: int                   # node index in the graph
    node: Node
    method: Method
    source: list                 # entry of the tensor it quantizes (copies skipped)
    tensor: str                  # that tensor's name among the float graph's internals
    inputs: Mapping[str, str]    # operator input (after data) -> variable name
    entries: Mapping[str, list]  # operator input -> entry of that variable (copies skipped)

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def attrs(self) -> Mapping[str, str]:
        return self.node.attrs

    @property
    def is_weight(self) -> bool:
        return flag(self.node.attrs, "is_weight")

    @property
    def bits(self) -> int:
        return self.method.nbits(self.node.attrs)

    @property
    def per_channel(self) -> bool:
        return self.method.per_axis(self.node.attrs)

    @property
    def channel_axis(self) -> int:
        return int(self.node.attrs.get("channel_axis", "0"))

    @property
    def unsigned(self) -> bool:
        return self.method.unsigned(self.node.attrs)

    def learned(self) -> dict[str, str]:
        """{input: variable} of the learned inputs."""
        return {i.name: self.inputs[i.name] for i in self.method.inputs
                if i.learned and i.name in self.inputs}

    def state(self) -> dict[str, str]:
        """{input: variable} of the state inputs."""
        return {i.name: self.inputs[i.name] for i in self.method.inputs
                if not i.learned and i.name in self.inputs}

    @property
    def range_var(self) -> str | None:
        """The variable holding the range that export reads (None: the method has none)."""
        r = self.method.range_input
        return self.inputs.get(r) if r else None


def quantizers(graph: Graph) -> list[Quantizer]:
    """Every quantizer of the graph, in graph order."""
    res = []
    for i, n in enumerate(graph.nodes):
        m = methods.of_op(n.op)
        if m is None:
            continue
        src = through_copies(graph, n.inputs[0])
        entries = {inp.name: through_copies(graph, e) for inp, e in zip(m.inputs, n.inputs[1:])}
        names = {k: graph.nodes[e[0]].name for k, e in entries.items()}
        res.append(Quantizer(i, n, m, src, tensor_name(graph.nodes[src[0]], src[1]), names,
                             entries))
    return res


def activation_quantizers(graph: Graph) -> list[Quantizer]:
    return [q for q in quantizers(graph) if not q.is_weight]


def weight_quantizers(graph: Graph) -> list[Quantizer]:
    return [q for q in quantizers(graph) if q.is_weight]


def state_variables(graph: Graph) -> set[str]:
    """Names of every variable that is a quantizer's learned or state input."""
    return {v for q in quantizers(graph) for v in q.inputs.values()}


def qstate_variables(graph: Graph) -> list[str]:
    """The ``[step, training]`` mode variables of every quantizer that has one."""
    return [q.inputs[MODE_INPUT] for q in quantizers(graph) if MODE_INPUT in q.inputs]
