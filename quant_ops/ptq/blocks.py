"""A quantized graph cut into blocks, and a block as a trainable MXNet symbol.

Block reconstruction (``quant_ops.ptq.brecq``) optimizes a part of the network at a time:
a residual block, or a short chain of layers.  The parts are found from the graph alone: a
*cut* is an operator whose output is the only tensor alive at that point of the
topological order (every later node reads the network's input only through it), and a
block is what lies between two cuts.  A residual block has no cut inside it (its skip path
keeps a second tensor alive), so it stays whole; in a plain chain every layer ends at a cut
and consecutive ones are merged up to ``max_layers``.

The block's symbol reads the block's input as a variable and stands in for its quantizers:
a weight quantizer that is learned becomes a variable (fed the soft-rounded weight), an
activation quantizer with a linear range becomes MXNet operators with a learned step
(``s * clip(x / s + BlockGrad(rint(x / s) - x / s))``, whose gradient to ``s`` is LSQ's),
optionally mixed with its unquantized input by a mask (QDrop).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import methods
from ..graph.ir import Graph, Node
from ..graph.quantizers import is_grad_sum, quantizers
from ..reference import qrange

LAYER_OPS = ("Convolution", "FullyConnected", "Deconvolution")
BLOCK_INPUT = "brecq_block_input"


@dataclass
class Block:
    start: list                      # entry of the block's input tensor
    end: int                         # node whose output 0 is the block's output
    nodes: list                      # operator nodes of the block, in graph order
    layers: list = field(default_factory=list)    # names of its Conv/FC/Deconv nodes


def _cut_points(graph: Graph, data_name: str) -> list[int]:
    """Operator nodes after which the network's only live tensor is their output 0."""
    last_use: dict = {}
    for i, n in enumerate(graph.nodes):
        for e in n.inputs:
            last_use[(e[0], e[1])] = i
    for h in graph.heads:
        last_use[(h[0], h[1])] = len(graph.nodes)
    live: set = set()
    data = [i for i, n in enumerate(graph.nodes) if n.is_var and n.name == data_name]
    live.update((i, 0) for i in data)
    cuts = []
    for i, n in enumerate(graph.nodes):
        if n.is_var:
            continue
        live = {e for e in live if last_use.get(e, -1) > i}
        live.update((i, o) for o in range(8) if last_use.get((i, o), -1) > i)
        if live == {(i, 0)} and not methods.is_quantizer(n.op) and not is_grad_sum(n):
            cuts.append(i)
    return cuts


def find_blocks(graph: Graph, data_name: str = "data", max_layers: int = 3) -> list[Block]:
    """The graph's blocks in order.  A segment without a layer joins the next one; a
    trailing classifier head (softmax) is left out."""
    data = next((i for i, n in enumerate(graph.nodes) if n.is_var and n.name == data_name),
                None)
    if data is None:
        return []
    segments, start = [], [data, 0]
    for c in _cut_points(graph, data_name):
        ops = [i for i in range(start[0] + 1, c + 1) if not graph.nodes[i].is_var]
        layers = [graph.nodes[i].name for i in ops if graph.nodes[i].op in LAYER_OPS]
        if layers:                   # else: these nodes join the next segment
            segments.append(Block(start, c, ops, layers))
            start = [c, 0]
    blocks: list[Block] = []
    for s in segments:
        if blocks and len(blocks[-1].layers) + len(s.layers) <= max_layers:
            b = blocks[-1]
            blocks[-1] = Block(b.start, s.end, b.nodes + s.nodes, b.layers + s.layers)
        else:
            blocks.append(s)
    return blocks


@dataclass
class ActStep:
    """An activation quantizer of a block, simulated with a learned step."""

    quantizer: str
    minmax: str                      # the range variable it reads (amax)
    bits: int
    qmin: float
    qmax: float
    step_var: str
    mask_var: str | None


@dataclass
class SoftWeight:
    """A weight quantizer of a block, replaced by its soft-rounded weight."""

    quantizer: str
    weight: str                      # the weight variable
    bits: int
    axis: int | None                 # per-channel axis
    var: str                         # the block symbol's variable that takes it


def block_graph(graph: Graph, block: Block, learn_weights: set, learn_acts: set,
                qdrop: bool) -> tuple[Graph, list, list]:
    """The block as a graph reading ``BLOCK_INPUT``, with the quantizers named in
    ``learn_weights`` / ``learn_acts`` replaced (see the module docstring); the
    ``SoftWeight`` and ``ActStep`` records of the replaced ones."""
    qs = {q.index: q for q in quantizers(graph)}
    nodes: list = [Node("null", BLOCK_INPUT)]
    new: dict = {(block.start[0], block.start[1]): [0, 0, 0]}
    soft, steps = [], []

    def add(node: Node) -> list:
        nodes.append(node)
        return [len(nodes) - 1, 0, 0]

    def entry(e) -> list:
        key = (e[0], e[1])
        if key not in new:
            src = graph.nodes[e[0]]
            if not src.is_var:
                raise KeyError(src.name)        # cannot happen between two cuts
            new[key] = add(Node("null", src.name, dict(src.attrs)))
        return new[key]

    replaced = {q.index: q.is_weight for q in qs.values()
                if q.name in learn_weights | learn_acts}
    wanted = _reachable(graph, block, replaced)
    for i in block.nodes:
        if i not in wanted:
            continue
        n = graph.nodes[i]
        q = qs.get(i)
        if q is not None and q.name in learn_weights:
            var = f"{q.name}_soft"
            soft.append(SoftWeight(q.name, graph.nodes[q.source[0]].name, q.bits,
                                   q.channel_axis if q.per_channel else None, var))
            new[(i, 0)] = add(Node("null", var))
        elif q is not None and q.name in learn_acts:
            qmin, qmax = qrange(q.bits, False)
            if q.unsigned:
                qmin = 0.0
            st = ActStep(q.name, q.range_var, q.bits, qmin, qmax, f"{q.name}_step",
                         f"{q.name}_mask" if qdrop else None)
            steps.append(st)
            new[(i, 0)] = _fake_quant_nodes(add, entry(n.inputs[0]), st)
        else:
            attrs = dict(n.attrs)
            if n.op == "BatchNorm":
                attrs["use_global_stats"] = "True"   # backward runs in training mode
            new[(i, 0)] = add(Node(n.op, n.name, attrs, [entry(e) for e in n.inputs]))
            for o in range(1, 8):
                new[(i, o)] = [new[(i, 0)][0], o, 0]
    return Graph(nodes, [new[(block.end, 0)]], dict(graph.attrs), graph.source), soft, steps


def _reachable(graph: Graph, block: Block, replaced: dict) -> set:
    """The block's nodes its output depends on once the ``replaced`` quantizers read no
    state (an activation quantizer still reads its data; a weight quantizer nothing)."""
    inside = set(block.nodes)
    seen, todo = set(), [block.end]
    while todo:
        i = todo.pop()
        if i in seen or i not in inside:
            continue
        seen.add(i)
        inputs = graph.nodes[i].inputs
        if i in replaced:                    # {index: is a weight quantizer}
            inputs = [] if replaced[i] else inputs[:1]
        todo.extend(e[0] for e in inputs)
    return seen


def _fake_quant_nodes(add, x: list, st: ActStep) -> list:
    """``s * clip(z + BlockGrad(rint(z) - z))`` with ``z = x / s`` (and the QDrop mix)."""
    name = st.quantizer
    s = add(Node("null", st.step_var))
    z = add(Node("broadcast_div", f"{name}_z", {}, [x, s]))
    r = add(Node("rint", f"{name}_rint", {}, [z]))
    d = add(Node("elemwise_sub", f"{name}_d", {}, [r, z]))
    d = add(Node("BlockGrad", f"{name}_ste", {}, [d]))
    z = add(Node("elemwise_add", f"{name}_zr", {}, [z, d]))
    c = add(Node("clip", f"{name}_clip", {"a_min": repr(st.qmin), "a_max": repr(st.qmax)},
                 [z]))
    y = add(Node("broadcast_mul", f"{name}_y", {}, [c, s]))
    if st.mask_var is None:
        return y
    m = add(Node("null", st.mask_var))
    e = add(Node("elemwise_sub", f"{name}_e", {}, [y, x]))
    e = add(Node("elemwise_mul", f"{name}_em", {}, [e, m]))
    return add(Node("elemwise_add", f"{name}_mix", {}, [x, e]))

