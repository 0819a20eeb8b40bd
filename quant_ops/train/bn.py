"""Freezing BatchNorm statistics in a (hybridized, quantized) Gluon net.

"Freeze BN after N steps" (Jacob et al. 2017; TensorFlow's QAT recipe): from then on every
BatchNorm normalizes with its running mean/variance and stops updating them, while gamma and
beta keep training.  MXNet decides this per operator with the ``use_global_stats``
attribute, which a hybridized block bakes into its CachedOp when it first runs; flipping it
needs the graph to be rebuilt:

- a Gluon ``nn.BatchNorm`` passes its ``_kwargs`` to the operator when its parent traces
  the graph: set the flag there and drop the cached graph of every hybrid block, so the next
  call traces again;
- a ``SymbolBlock`` (what ``quantize_block`` returns) keeps its graph as a symbol: rewrite
  the attribute of its BatchNorm nodes and drop the CachedOp (the parameters, and so the
  Trainer's view of them, are unchanged).

Graphs folded with ``fold_bn="qat"`` have no BatchNorm left: their statistics are frozen
(``BlockGrad`` on the running values) from the start.
"""
from __future__ import annotations

import logging

from mxnet import gluon
from mxnet.gluon import nn

from ..graph.ir import Graph, flag

log = logging.getLogger(__name__)


def _blocks(net: gluon.Block):
    """Every block of the tree, parents before children."""
    stack = [net]
    seen = set()
    while stack:
        b = stack.pop()
        if id(b) in seen:
            continue
        seen.add(id(b))
        yield b
        stack.extend(reversed(list(b._children.values())))


def _symbol_bns(block: gluon.SymbolBlock) -> list[str]:
    graph = Graph.from_symbol(block._cached_graph[1])
    return [n.name for n in graph.nodes if n.op == "BatchNorm"]


def count_bn(net: gluon.Block) -> int:
    """How many BatchNorm layers ``net`` runs (Gluon layers and SymbolBlock graph nodes)."""
    n = 0
    for b in _blocks(net):
        if isinstance(b, nn.BatchNorm):
            n += 1
        elif isinstance(b, gluon.SymbolBlock) and b._cached_graph:
            n += len(_symbol_bns(b))
    return n


def frozen_bn(net: gluon.Block) -> list[bool]:
    """The ``use_global_stats`` flag of every BatchNorm of ``net``, in tree order."""
    out = []
    for b in _blocks(net):
        if isinstance(b, nn.BatchNorm):
            out.append(bool(b._kwargs.get("use_global_stats", False)))
        elif isinstance(b, gluon.SymbolBlock) and b._cached_graph:
            graph = Graph.from_symbol(b._cached_graph[1])
            out += [flag(n.attrs, "use_global_stats") for n in graph.nodes
                    if n.op == "BatchNorm"]
    return out


def freeze_bn(net: gluon.Block, frozen: bool = True) -> int:
    """Make every BatchNorm of ``net`` use (``frozen=True``) or stop using its running
    statistics in training mode.  Works on hybridized and plain blocks, Gluon layers and
    SymbolBlock graphs alike; the next forward rebuilds the cached graph.  Returns how many
    BatchNorm layers were switched."""
    value = "True" if frozen else "False"
    changed = 0
    for b in _blocks(net):
        if isinstance(b, nn.BatchNorm):
            if bool(b._kwargs.get("use_global_stats", False)) != frozen:
                b._kwargs["use_global_stats"] = frozen
                changed += 1
        elif isinstance(b, gluon.SymbolBlock) and b._cached_graph:
            inputs, out = b._cached_graph
            graph = Graph.from_symbol(out)
            hit = 0
            for n in graph.nodes:
                if n.op == "BatchNorm" and flag(n.attrs, "use_global_stats") != frozen:
                    n.attrs["use_global_stats"] = value
                    hit += 1
            if hit:
                b._cached_graph = (inputs, graph.to_symbol())
                changed += hit
    if changed:
        for b in _blocks(net):
            if isinstance(b, gluon.HybridBlock):
                b._clear_cached_op()   # a SymbolBlock keeps its (new) graph; others re-trace
    return changed
