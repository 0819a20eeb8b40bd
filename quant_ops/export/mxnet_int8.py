"""MXNet's own INT8 graph (oneDNN: ``_sg_mkldnn_conv`` / ``_sg_mkldnn_fully_connected``
with ``quantized=True``) from a calibrated or fine-tuned model, with this toolkit's ranges
as its thresholds and its weights as the quantizers left them: no second calibration, and
a stock ``mxnet==1.9.1`` loads and runs the result without this package.

Where it agrees with the simulation and where it cannot (measured by
``bench/bench_int8_speed.py``; checked in ``tests/test_mxnet_int8.py``):

- weights: each weight is replaced by its fake-quantized value (codes x scale), and MXNet
  derives its per-channel scale from the largest magnitude: the same scale and codes
  wherever a channel's largest code is the full 127 (always so for max-based int8 weights;
  a learned clip that no weight of a channel reaches gives MXNet a finer scale);
- activations: a quantizer's amax becomes the threshold of the fused node that produces
  the tensor (conv + BN + ReLU + residual add fuse into one node).  MXNet stores a tensor
  that cannot be negative as uint8 (scale amax / 255, and its choice: a fused ReLU always
  gives uint8): the simulation's own grid under the ``cpu_int8`` preset (unsigned
  activations there), twice as fine as TensorRT's amax / 127 under ``trt_int8*``;
- MXNet adds the bias in int32 and requantizes int32 sums to the next layer's codes in
  one step, where the simulation adds a float bias and rounds once at the next quantizer;
- a residual add runs on the quantized shortcut (as in TensorRT); the simulation adds the
  float one unless the policy shares the add's input ranges (``trt_int8_shared``);
- MXNet quantizes tensors this model may keep in float (a branch that only feeds a
  residual add, the input of global pooling): their ranges come from ``data`` with the
  toolkit's calibrator.  Without ``data`` such a model is refused (a partly calibrated
  graph crashes MXNet 1.9.1's quantization pass).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import mxnet as mx
import numpy as np

from .. import methods
from ..errors import QuantOpsError, mxnet_message
from ..fileio import atomic_write, atomic_write_text
from ..graph.deploy import deploy_graph
from ..graph.ir import Graph
from ..graph.quantize import strip_quantizers
from ..graph.quantizers import quantizers
from ..graph.sign import nonnegative
from .onnx_qdq import check_exportable

log = logging.getLogger(__name__)
LAYERS = ("Convolution", "FullyConnected", "Deconvolution")


@dataclass
class NativeInt8:
    """A quantized MXNet symbol and its params (name -> NDArray)."""

    symbol: mx.sym.Symbol
    arg_params: dict
    aux_params: dict
    data_name: str = "data"
    report: dict = field(default_factory=dict)

    def block(self) -> mx.gluon.SymbolBlock:
        """A Gluon block that runs it (MXNet's own operators only)."""
        blk = mx.gluon.SymbolBlock(self.symbol, [mx.sym.var(self.data_name)])
        params = blk.collect_params()
        for k, v in {**self.arg_params, **self.aux_params}.items():
            if k in params:
                params[k]._load_init(v, mx.cpu(), cast_dtype=True, dtype_source="saved")
        return blk

    def save(self, prefix: str | Path) -> tuple[Path, Path]:
        """``<prefix>-symbol.json`` and ``<prefix>-0000.params`` (``arg:``/``aux:``), each
        written atomically: ``mx.model.load_checkpoint(prefix, 0)`` reads them."""
        prefix = Path(prefix)
        sym = atomic_write_text(prefix.with_name(prefix.name + "-symbol.json"),
                                self.symbol.tojson())
        arrays = {**{f"arg:{k}": v for k, v in self.arg_params.items()},
                  **{f"aux:{k}": v for k, v in self.aux_params.items()}}
        params = atomic_write(prefix.with_name(prefix.name + "-0000.params"),
                              lambda tmp: mx.nd.save(str(tmp), arrays))
        return sym, params


def _ranges_and_weights(graph: Graph, params: dict) -> tuple[dict, dict]:
    """({tensor (its producer's name): amax}, {weight name: fake-quantized value})."""
    ranges, weights = {}, {}
    for q in quantizers(graph):
        state = {k: params[v] for k, v in q.inputs.items()}
        if q.is_weight:
            w = graph.nodes[q.source[0]]
            weights[w.name] = q.method.fixed(np.asarray(params[w.name], np.float32), q.attrs,
                                             state).astype(np.float32)
            continue
        form = q.method.qdq(q.attrs, params[q.range_var])
        qmax = 2 ** (q.bits - 1) - 1 if form.signed else 2 ** q.bits - 1   # unsigned: 0..255
        amax = np.float32(form.scale.reshape(-1)[0]) * np.float32(qmax)
        ranges[graph.nodes[q.node.inputs[0][0]].name] = float(amax)
    return ranges, weights


def _fused(fused: mx.sym.Symbol) -> tuple[dict, dict]:
    """({fused node: the original node whose output it gives}, {fused node: the original
    operator nodes inside it}) for MXNet's oneDNN subgraphs; plain layers map to
    themselves."""
    head, members = {}, {}
    for n in json.loads(fused.tojson())["nodes"]:
        sub = n.get("subgraphs")
        if sub:
            inner = sub[0]["nodes"]
            head[n["name"]] = inner[sub[0]["heads"][0][0]]["name"]
            members[n["name"]] = {x["name"] for x in inner if x["op"] != "null"}
        elif n["op"] in LAYERS:
            members[n["name"]] = {n["name"]}
    return head, members


def to_mxnet_int8(graph: Graph, params: dict, data_name: str = "data",
                  data: np.ndarray | None = None, method: str = "entropy") -> NativeInt8:
    """MXNet's native INT8 form of a quantized graph with ranges (see the module text)."""
    from mxnet.contrib import quantization as mq

    check_exportable(graph, params)
    g, p = deploy_graph(graph, params)
    ranges, weights = _ranges_and_weights(g, p)
    nonneg = {g.nodes[i].name for i, _ in nonnegative(g)}
    quantized_layers = {n.name for _, n in g.ops() if n.op in LAYERS and n.inputs
                        and methods.is_quantizer(g.nodes[n.inputs[0][0]].op)}
    per_channel = [q.per_channel for q in quantizers(g) if q.is_weight]
    p = {**p, **weights}
    sym = strip_quantizers(g).to_symbol()
    args = {k: mx.nd.array(p[k]) for k in sym.list_arguments() if k != data_name}
    aux = {k: mx.nd.array(p[k]) for k in sym.list_auxiliary_states()}
    fused = sym.get_backend_symbol("MKLDNN_QUANTIZE")
    head, members = _fused(fused)
    excluded = sorted(k for k, inner in members.items() if not inner & quantized_layers)
    granularity = "channel-wise" if per_channel and all(per_channel) else "tensor-wise"
    try:
        qsym, calib_layers = mq._quantize_symbol(
            fused, mx.cpu(), excluded_symbols=excluded, excluded_operators=[],
            offline_params=list(args), quantized_dtype="auto", quantize_mode="full",
            quantize_granularity=granularity)
    except mx.base.MXNetError as e:
        raise QuantOpsError(f"{graph.source}: MXNet cannot quantize the graph: "
                            f"{mxnet_message(e)}") from None
    th, missing = {}, []
    for layer in calib_layers:
        node = layer[:-len("_output")] if layer.endswith("_output") else layer
        tensor = head.get(node, node)
        if tensor in ranges:
            th[layer] = (0.0 if tensor in nonneg else -ranges[tensor], ranges[tensor])
        else:
            missing.append(layer)
    if missing:
        if data is None:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise QuantOpsError(
                f"{graph.source}: MXNet's INT8 graph also quantizes {len(missing)} tensor(s) "
                f"this model keeps in float ({', '.join(missing[:3])}{more}): pass `data` "
                "(a few calibration images) to give them ranges")
        th.update(_measured(fused, args, aux, missing, data, data_name, method))
    qsym = mq._calibrate_quantized_sym(qsym, th)
    qargs = mq._quantize_params(qsym, args, th)
    qsym = qsym.get_backend_symbol("MKLDNN_QUANTIZE")
    report = {"from_model": sorted(set(th) - set(missing)), "measured": missing,
              "excluded": excluded, "weights": granularity,
              "thresholds": {k: [float(a), float(b)] for k, (a, b) in th.items()}}
    log.info("MXNet INT8 graph: %d thresholds from the model, %d measured (%s), %d layers "
             "left in float", len(th) - len(missing), len(missing), method, len(excluded))
    return NativeInt8(qsym, qargs, aux, data_name, report)


def _measured(fused: mx.sym.Symbol, args: dict, aux: dict, layers: list, data: np.ndarray,
              data_name: str, method: str) -> dict:
    """Thresholds of the named outputs of the float fused graph on ``data``, by the
    toolkit's calibrator ``method``: (0, amax) for a tensor never negative there."""
    from ..calib import make_observer

    if len(data) == 0:
        raise QuantOpsError("the calibration data for the MXNet INT8 graph is empty")
    internals = fused.get_internals()
    try:
        exe = mx.sym.Group([internals[n] for n in layers]).bind(
            mx.cpu(), {**args, data_name: mx.nd.array(data[:1])}, aux_states=aux)
    except mx.base.MXNetError as e:
        raise QuantOpsError(f"calibration data of shape {data.shape} do not fit the model: "
                            f"{mxnet_message(e)}") from None
    observers = {n: make_observer(method, n) for n in layers}
    low = dict.fromkeys(layers, 0.0)
    for i in range(0, len(data), 64):
        xb = data[i:i + 64]
        e = exe if len(xb) == 1 else exe.reshape(allow_up_sizing=True, **{data_name: xb.shape})
        e.arg_dict[data_name][:] = xb
        for n, y in zip(layers, e.forward(is_train=False)):
            y = y.asnumpy()
            observers[n].observe(y)
            low[n] = min(low[n], float(y.min()))
    return {n: (0.0 if low[n] >= 0 else -o.amax(), o.amax()) for n, o in observers.items()}
