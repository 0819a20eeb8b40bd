"""MXNet's own INT8 graph (oneDNN: ``_sg_mkldnn_conv`` / ``_sg_mkldnn_fully_connected``
with ``quantized=True``) from a calibrated or fine-tuned model, with this toolkit's ranges
as its thresholds and its weights as the quantizers left them: no second calibration, and
a stock ``mxnet==1.9.1`` loads and runs the result without this package.

How the two agree and where they differ (each measured by ``bench/bench_int8_speed.py``
and ``tests/test_mxnet_int8.py``):

- weights: each weight is replaced by its fake-quantized value (codes x scale); MXNet
  derives its per-channel scale from the largest magnitude, which gives back the same
  scale and codes wherever a channel's largest code is the full 127 (always for max-based
  int8 weights; a learned clip that no weight of a channel reaches gives a finer scale);
- activations: a quantizer's amax becomes the threshold of the fused layer that produces
  the tensor (conv + BN + ReLU + residual add fuse into one node).  ``activations="int8"``
  keeps int8 codes everywhere (scale amax / 127, as simulated); ``"auto"`` lets MXNet take
  uint8 codes (scale amax / 255) for tensors that cannot be negative, finer than the
  simulation and faster on VNNI;
- MXNet adds the bias in int32 (bias / (s_x s_w), rounded) and requantizes int32 sums to
  the next layer's codes in one step; the simulation adds a float bias and rounds once at
  the next quantizer: codes can differ by one where a value sits near a rounding tie;
- a tensor MXNet quantizes that has no range here (a conv output that only feeds a
  residual add, the logits) gets min/max from ``data`` when given; otherwise MXNet
  measures it at run time (slower; listed in ``report["dynamic"]``).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import mxnet as mx
import numpy as np

from .. import methods
from ..errors import QuantOpsError, mxnet_message
from ..graph.deploy import deploy_graph
from ..graph.ir import Graph
from ..graph.quantize import strip_quantizers
from ..graph.quantizers import quantizers
from ..graph.sign import nonnegative
from .onnx_qdq import check_exportable

log = logging.getLogger(__name__)
ACTIVATIONS = ("int8", "auto")


@dataclass
class NativeInt8:
    """A quantized MXNet symbol and its params (``arg:``/``aux:`` dicts of NDArrays)."""

    symbol: mx.sym.Symbol
    arg_params: dict
    aux_params: dict
    report: dict = field(default_factory=dict)

    def block(self, data_name: str = "data") -> mx.gluon.SymbolBlock:
        """A Gluon block that runs it (MXNet's own operators only)."""
        blk = mx.gluon.SymbolBlock(self.symbol, [mx.sym.var(data_name)])
        params = blk.collect_params()
        for k, v in {**self.arg_params, **self.aux_params}.items():
            if k in params:
                params[k]._load_init(v, mx.cpu(), cast_dtype=True, dtype_source="saved")
        return blk


def _tensor_ranges(graph: Graph, params: dict) -> tuple[dict, dict]:
    """({tensor (producer node name): amax}, {weight name: fake-quantized value})."""
    ranges, weights = {}, {}
    for q in quantizers(graph):
        value = params[q.range_var]
        form = q.method.qdq(q.attrs, value)
        if q.is_weight:
            w = graph.nodes[q.source[0]]
            state = {k: params[v] for k, v in q.inputs.items()}
            weights[w.name] = q.method.fixed(np.asarray(params[w.name], np.float32), q.attrs,
                                             state).astype(np.float32)
            continue
        src = graph.nodes[q.node.inputs[0][0]]
        qmax = 2 ** (q.bits - 1) - 1
        ranges[src.name] = float(np.float32(form.scale.reshape(-1)[0]) * np.float32(qmax))
    return ranges, weights


def _fused_heads(fused: mx.sym.Symbol) -> dict:
    """{fused node name: name of the original node its output is} for MXNet's subgraphs."""
    out = {}
    for n in json.loads(fused.tojson())["nodes"]:
        sub = n.get("subgraphs")
        if sub:
            inner = sub[0]["nodes"]
            out[n["name"]] = inner[sub[0]["heads"][0][0]]["name"]
            out.setdefault("_members", {})[n["name"]] = {x["name"] for x in inner
                                                          if x["op"] != "null"}
    return out


def to_mxnet_int8(graph: Graph, params: dict, data_name: str = "data",
                  activations: str = "auto", data: np.ndarray | None = None) -> NativeInt8:
    """MXNet's native INT8 form of a quantized graph with ranges (see the module text)."""
    from mxnet.contrib import quantization as mq

    if activations not in ACTIVATIONS:
        raise QuantOpsError(f"activations {activations!r}: use one of {', '.join(ACTIVATIONS)}")
    check_exportable(graph, params)
    g, p = deploy_graph(graph, params)
    ranges, weights = _tensor_ranges(g, p)
    nonneg = {g.nodes[i].name for i, _ in nonnegative(g)}
    layer_ops = ("Convolution", "FullyConnected", "Deconvolution")
    quantized_layers = {n.name for _, n in g.ops() if n.op in layer_ops and n.inputs
                        and methods.is_quantizer(g.nodes[n.inputs[0][0]].op)}
    float_graph = strip_quantizers(g)
    p = {**p, **weights}
    sym = float_graph.to_symbol()
    args = {k: mx.nd.array(p[k]) for k in sym.list_arguments() if k != data_name}
    aux = {k: mx.nd.array(p[k]) for k in sym.list_auxiliary_states()}
    missing = [k for k in list(args) + list(aux) if k not in p]
    if missing:
        raise QuantOpsError(f"{graph.source}: no value for {missing[0]}")
    fused = sym.get_backend_symbol("MKLDNN_QUANTIZE")
    heads = _fused_heads(fused)
    members = heads.pop("_members", {})
    excluded = []
    for node in json.loads(fused.tojson())["nodes"]:
        name = node["name"]
        inner = members.get(name, {name} if node["op"] in layer_ops else set())
        if inner and not inner & quantized_layers:
            excluded.append(name)     # the policy left this layer in float
    granularity = "channel-wise" if all(
        q.per_channel for q in quantizers(g) if q.is_weight) else "tensor-wise"
    try:
        qsym, calib_layers = mq._quantize_symbol(
            fused, mx.cpu(), excluded_symbols=excluded, excluded_operators=[],
            offline_params=list(args), quantized_dtype=activations, quantize_mode="full",
            quantize_granularity=granularity)
    except mx.base.MXNetError as e:
        raise QuantOpsError(f"{graph.source}: MXNet cannot quantize the graph: "
                            f"{mxnet_message(e)}") from None
    th, dynamic = {}, []
    for layer in calib_layers:
        tensor = heads.get(layer[:-len("_output")], layer[:-len("_output")]) \
            if layer.endswith("_output") else layer
        if tensor in ranges:
            a = ranges[tensor]
            th[layer] = (0.0 if tensor in nonneg and activations == "auto" else -a, a)
        else:
            dynamic.append(layer)
    if dynamic and data is not None:
        for k, (lo, hi) in _measured(fused, args, aux, dynamic, data, data_name).items():
            a = max(abs(lo), abs(hi))
            th[k] = (lo, hi) if activations == "auto" else (-a, a)
        dynamic = [d for d in dynamic if d not in th]
    if dynamic:
        log.info("MXNet measures %d tensor range(s) at run time (no range here, no data "
                 "given): %s", len(dynamic), ", ".join(dynamic))
    qsym = mq._calibrate_quantized_sym(qsym, th)
    qargs = mq._quantize_params(qsym, args, th)
    qsym = qsym.get_backend_symbol("MKLDNN_QUANTIZE")
    report = {"thresholds": {k: list(v) for k, v in th.items()}, "dynamic": dynamic,
              "excluded": excluded, "granularity": granularity, "activations": activations}
    return NativeInt8(qsym, qargs, aux, report)


def _measured(fused: mx.sym.Symbol, args: dict, aux: dict, layers: list, data: np.ndarray,
              data_name: str) -> dict:
    """min/max of the named outputs of the float fused graph on ``data``."""
    internals = fused.get_internals()
    outs = mx.sym.Group([internals[n] for n in layers])
    exe = outs.bind(mx.cpu(), {**args, data_name: mx.nd.array(data[:1])}, aux_states=aux)
    lo = {n: np.inf for n in layers}
    hi = {n: -np.inf for n in layers}
    for i in range(0, len(data), 64):
        xb = data[i:i + 64]
        e = exe if len(xb) == 1 else exe.reshape(allow_up_sizing=True,
                                                 **{data_name: xb.shape})
        e.arg_dict[data_name][:] = xb
        for n, y in zip(layers, e.forward(is_train=False)):
            y = y.asnumpy()
            lo[n], hi[n] = min(lo[n], float(y.min())), max(hi[n], float(y.max()))
    return {n: (lo[n], hi[n]) for n in layers}
