"""ReLU6 -> ReLU (DFQ: cross-layer equalization needs a positively homogeneous activation)."""
from __future__ import annotations

from .ir import Graph, Node


def _is_relu6(n: Node) -> bool:
    if n.op == "clip":
        try:
            return float(n.attrs.get("a_min", "nan")) == 0.0 and \
                float(n.attrs.get("a_max", "nan")) == 6.0
        except ValueError:
            return False
    return n.op == "Activation" and n.attrs.get("act_type") == "relu6"


def relu6_to_relu(graph: Graph) -> tuple[Graph, int]:
    """Replace every ``clip(0, 6)`` (how Gluon writes ReLU6) with ``Activation(relu)``,
    keeping node names; returns the new graph and how many were replaced."""
    nodes, count = [], 0
    for n in graph.nodes:
        if _is_relu6(n):
            nodes.append(Node("Activation", n.name, {"act_type": "relu"}, [list(e) for e in n.inputs]))
            count += 1
        else:
            nodes.append(Node(n.op, n.name, dict(n.attrs), [list(e) for e in n.inputs]))
    return Graph(nodes, [list(h) for h in graph.heads], dict(graph.attrs), graph.source), count
