"""One call from a float model to a quantization-ready one (symbol graph or Gluon block).

The pipeline, in order: seed-toolkit operators converted, ReLU6 -> ReLU (optional),
BatchNorm folded (optional: ``deploy`` or ``qat``), quantizers inserted by the policy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import mxnet as mx
import numpy as np
from mxnet import gluon

from . import methods
from .errors import QuantOpsError
from .graph.fold_bn import fold_batchnorm
from .graph.ir import Graph
from .graph.quantize import insert_quantizers
from .graph.quantizers import through_copies
from .graph.relu6 import relu6_to_relu
from .graph.runner import run_once
from .graph.seed import convert_seed_graph, is_seed_graph
from .ops import track_training
from .policy import QuantPolicy


@dataclass
class QuantizedGraph:
    graph: Graph
    params: dict                      # name -> numpy array, new quantizer state included
    table: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def as_policy(policy: QuantPolicy | str | dict) -> QuantPolicy:
    if isinstance(policy, QuantPolicy):
        return policy
    if isinstance(policy, str):
        if policy.lower().endswith((".json", ".yaml", ".yml")) or "/" in policy:
            return QuantPolicy.load(policy)          # a file, not a preset name
        return QuantPolicy.preset(policy)
    if isinstance(policy, dict):
        return QuantPolicy.from_dict(policy)
    raise QuantOpsError(f"a policy is a QuantPolicy, a preset name or a dict, not "
                        f"{type(policy).__name__}")


def quantize_graph(graph: Graph, params: dict, policy: QuantPolicy | str | dict = "trt_int8",
                   fold_bn: str | None = None, relu6: bool = False) -> QuantizedGraph:
    """Run the pipeline on a graph and its params (name -> numpy array)."""
    policy = as_policy(policy)
    notes = []
    if is_seed_graph(graph):
        graph, extra = convert_seed_graph(graph, params)
        params = {**params, **extra}
        notes.append("converted seed-toolkit operators")
    if relu6:
        graph, n = relu6_to_relu(graph)
        notes.append(f"ReLU6 -> ReLU: {n}")
    if fold_bn:
        before = sum(n.op == "BatchNorm" for n in graph.nodes)
        graph, params = fold_batchnorm(graph, params, fold_bn)
        after = sum(n.op == "BatchNorm" for n in graph.nodes)
        notes.append(f"BatchNorm folded ({fold_bn}): {before - after} of {before}")
    values = {**params, **_computed_weights(graph, params, policy)}
    rw = insert_quantizers(graph, policy, {k: np.shape(v) for k, v in params.items()}, values)
    signed = [r["tensor"] for r in rw.table if r.get("note")]
    if signed:
        notes.append(f"signed form of the unsigned activation method on {len(signed)} "
                     f"tensor(s) that can be negative: {', '.join(signed[:5])}"
                     + (" ..." if len(signed) > 5 else ""))
    return QuantizedGraph(rw.graph, {**params, **rw.new_params}, rw.table, notes)


def _computed_weights(graph: Graph, params: dict, policy: QuantPolicy) -> dict:
    """Values of weights computed in-graph from params alone (BN folded for QAT:
    ``<layer>_weight_folded``), so learned weight quantizers (a step, an interval, a range)
    start from the weights they will see, not from a generic default."""
    internals, out = None, {}
    for _, n in graph.ops():
        if n.op not in policy.quantize_ops or len(n.inputs) < 2:
            continue
        src = graph.nodes[through_copies(graph, n.inputs[1])[0]]
        if src.is_var or src.name in out or methods.is_quantizer(src.op):
            continue  # a parameter, or already quantized (rewriting is idempotent)
        if internals is None:
            internals = graph.to_symbol().get_internals()
        try:
            sym = internals[f"{src.name}_output"]
        except (KeyError, ValueError, mx.base.MXNetError):
            continue
        args = sym.list_arguments() + sym.list_auxiliary_states()
        if not all(a in params for a in args):  # depends on data: not a weight
            continue
        out[src.name] = run_once(sym, params)[0]
    return out


def trace(net: gluon.HybridBlock, data_names: Sequence[str]):
    """(output symbol, input variables) of a Gluon block called on symbols."""
    inputs = [mx.sym.var(n) for n in data_names]
    out = net(*inputs)
    if isinstance(out, (list, tuple)):
        out = mx.sym.Group(list(_flatten(out)))
    return out, inputs


def _flatten(xs):
    for x in xs:
        if isinstance(x, (list, tuple)):
            yield from _flatten(x)
        else:
            yield x


def quantize_block(net: gluon.HybridBlock, policy: QuantPolicy | str | dict = "trt_int8",
                   sample: mx.nd.NDArray | Sequence[mx.nd.NDArray] | None = None,
                   data_names: Sequence[str] = ("data",), fold_bn: str | None = None,
                   relu6: bool = False, calib_data: Sequence[np.ndarray] | None = None,
                   calib_method: str = "mse") -> gluon.SymbolBlock:
    """A trainable quantized copy of ``net`` (a Gluon HybridBlock, e.g. a gluoncv model).

    Without folding or with ``fold_bn="qat"`` (folded in-graph), the returned block shares
    the float block's parameters (training one trains the other); with ``"deploy"`` folding
    it owns folded copies.  The quantizers follow
    ``autograd.is_training()``.  ``sample`` (an input batch) completes deferred
    initialization when the net has not run yet.
    """
    if sample is not None:
        net(*(sample if isinstance(sample, (list, tuple)) else [sample]))
    pdict = net.collect_params()
    try:
        arrays = {p.name: p.data().asnumpy() for p in pdict.values()}
    except gluon.parameter.DeferredInitializationError:
        raise QuantOpsError("the block's parameters are not initialized yet: pass `sample` "
                            "(an input batch) or run the block once first") from None
    sym, inputs = trace(net, data_names)
    q = quantize_graph(Graph.from_symbol(sym), arrays, policy, fold_bn, relu6)
    if calib_data is not None:
        from .calib.graph_calib import calibrate_graph

        if len(data_names) != 1:
            raise QuantOpsError("calib_data works for single-input nets")
        q.params, _ = calibrate_graph(q.graph, q.params, calib_data, calib_method,
                                      data_name=data_names[0])
    qsym = q.graph.to_symbol()
    shared = pdict if fold_bn in (None, "qat") else None
    blk = gluon.SymbolBlock(qsym, inputs, params=shared)
    for name, p in blk.collect_params().items():
        if shared is not None and name in pdict:
            continue
        if name not in q.params:
            raise QuantOpsError(f"no value for parameter '{name}' of the quantized graph")
        p._load_init(mx.nd.array(q.params[name]), mx.cpu())
    blk.quant_table = q.table  # what was quantized, for summaries
    return track_training(blk)


def prepare(net: gluon.HybridBlock, preset: str = "trt_int8", **kwargs) -> gluon.SymbolBlock:
    """The friendly front: ``prepare(net, "trt_int8", sample=x)`` (MQBench's
    ``prepare_by_platform`` in spirit)."""
    return quantize_block(net, QuantPolicy.preset(preset), **kwargs)
