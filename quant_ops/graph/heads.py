"""Loss heads (``SoftmaxOutput`` and the other ``*Output`` ops of MXNet's symbol zoo).

A checkpoint trained with the Module API ends in a loss op that takes the label as a second
input.  The graph keeps it (the saved model still trains there); what runs a batch without
labels (inference, calibration, export) uses the same graph with each loss head replaced by
its inference form, and Gluon fine-tuning uses its input, the logits.
"""
from __future__ import annotations

from .ir import Graph, Node, flag

#: loss op -> its inference form (op, attrs from the loss attrs); None: its input as it is
LOSS_HEADS = {
    # over the classes: axis 1 with multi_output, else the last (a classifier's (N, C))
    "SoftmaxOutput": lambda a: ("softmax", {"axis": "1" if flag(a, "multi_output")
                                            else "-1"}),
    "LogisticRegressionOutput": lambda a: ("sigmoid", {}),
    "LinearRegressionOutput": None,
    "MAERegressionOutput": None,
    "SVMOutput": None,
}


def loss_nodes(graph: Graph) -> list[int]:
    return [i for i, n in enumerate(graph.nodes) if n.op in LOSS_HEADS]


def label_names(graph: Graph) -> list[str]:
    """Variables that only feed loss heads as their label (e.g. ``softmax_label``)."""
    uses: dict = {}
    for n in graph.nodes:
        for pos, e in enumerate(n.inputs):
            uses.setdefault(e[0], []).append((n.op, pos))
    return [graph.nodes[i].name for i, us in uses.items()
            if graph.nodes[i].is_var and all(op in LOSS_HEADS and pos > 0 for op, pos in us)]


def without_loss(graph: Graph, logits: bool = False) -> Graph:
    """The graph with every loss head in its inference form (``logits``: removed, so the
    outputs are the loss heads' inputs, as Gluon's losses want them); the labels drop out."""
    losses = loss_nodes(graph)
    if not losses:
        return graph
    replace, redirect = {}, {}
    for i in losses:
        n = graph.nodes[i]
        form = LOSS_HEADS[n.op]
        if logits or form is None:
            redirect[i] = n.inputs[0]
        else:
            op, attrs = form(n.attrs)
            replace[i] = Node(op, n.name, attrs, [n.inputs[0]])
    labels = set(label_names(graph))
    drop = {i for i, n in enumerate(graph.nodes) if n.is_var and n.name in labels}
    return graph.rewired(drop | set(redirect), redirect, replace)
