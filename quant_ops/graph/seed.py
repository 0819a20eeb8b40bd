"""Convert symbol files of the seed toolkit to quant_ops operators.

The seed toolkit (XiaotaoChen/mx_quant_op, ``operator_cxx/contrib/*``; an older copy of its
INT8 operator is in tusen-ai/simpledet) compiled its quantizers into a custom MXNet build as
``_contrib_Quantization_int8``, ``_contrib_PACT``, ``_contrib_DoReFa``, ``_contrib_QIL``,
``_contrib_GDRQ`` and ``_contrib_FQN`` (and, for prototyping, Python ``CustomOp`` s such as
``Custom(op_type="Quantization_int8_PY")``).  Their symbol files do not load into a stock
MXNet 1.9.1; :func:`convert_seed_graph` rewrites them to the operators of this toolkit.

What the seed's ``_contrib_Quantization_int8`` was (its ``Quantization_int8Para``):

========================  ==========  ====================================================
attribute                 default     meaning in the seed
========================  ==========  ====================================================
``nbits``                 8           ``QUANT_LEVEL = 2^nbits - 1`` levels each side of 0
                                      (its int8 preset used ``nbits=7``)
``quant_mode``            "minmax"    only "minmax" ran (anything else: LOG(FATAL))
``is_weight``             True        weight: range = max|w| (per output channel, axis 0)
``is_weight_perchannel``  False       weights only
``delay_quant``           0           training forwards that pass the float value through
``ema_decay``             0.99        activation range EMA
``grad_mode``             "ste"       "ste" or "clip" (activations; weights always STE)
``fix_act_scale``         False       do not update the stored range in training
========================  ==========  ====================================================

Inputs: ``data`` (argument) and ``minmax`` (auxiliary state, the range ``amax`` itself:
shape ``(1,)``, or ``(w.shape[0],)`` for per-channel weights).  No ``[min, max]`` pairs, so
stored ranges carry over as they are.

The mapping to ``Quantization_int8``:

* ``nbits``: the seed's step was ``amax / (2^n - 1)``; ours is ``amax / (2^(b-1) - 1)``, so
  seed ``n`` becomes ``b = n + 1`` (seed 7 -> 8: the same 127 levels of TensorRT INT8).
* a third input ``qstate`` (``<quantizer>_qstate``, zeros: step 0, inference) is added; the
  seed kept its delay counter in the operator object, so it restarts at 0.
* the weight of a Deconvolution gets ``channel_axis=1`` (its output channels; the seed
  quantized per axis 0 there, which TensorRT does not do): its stored per-channel range is
  re-made for the new axis.
* left as they are, because they are what a TensorRT-aligned quantizer is: activations
  saturate at ``-qmax-1`` (the seed clipped at ``-amax``), rounding is half to even (the
  seed rounded half away from zero), a weight's range is its current ``max|w|`` also in
  inference (the seed used the stored one, i.e. the range of the last training step).

Values are parsed as data (never evaluated).  A value the seed build would have run with
numerics this toolkit does not reproduce raises :class:`QuantOpsError` naming the node and
the attribute; attributes that only steered the seed build are dropped with a logged note.
"""
from __future__ import annotations

import logging
import re

import numpy as np

from ..errors import QuantOpsError
from .ir import Graph, Node

log = logging.getLogger(__name__)

# seed operator -> quant_ops operator, or None while its conversion is not written (the
# seed's attribute meanings must be mapped one by one: see the int8 nbits offset)
SEED_OPS: dict = {
    "_contrib_Quantization_int8": "Quantization_int8",
    "_contrib_PACT": None,
    "_contrib_DoReFa": None,
    "_contrib_QIL": None,
    "_contrib_GDRQ": None,
    "_contrib_FQN": None,
}

# the seed's Python prototypes: Custom(op_type=...) -> quant_ops operator, or None
SEED_CUSTOM_OPS: dict = {
    "Quantization_int8_PY": "Quantization_int8",
    "PACT_PY": None,
    "PACT_V2_PY": None,
    "DoReFa_PY": None,
    "QIL_PY": None,
    "GDRQ_PY": None,
    "FQN_PY": None,
    "QUANT_STE_PY": None,
    "CLIP_RELU_PY": None,
}

# the seed's defaults for _contrib_Quantization_int8 (Quantization_int8Para)
SEED_INT8_DEFAULTS = {
    "nbits": "8", "quant_mode": "minmax", "is_weight": "True",
    "is_weight_perchannel": "False", "delay_quant": "0", "ema_decay": "0.99",
    "grad_mode": "ste", "fix_act_scale": "False",
}
SEED_NBITS_OFFSET = 1          # ours = seed + 1: both give 2^seed - 1 levels each side
OUR_NBITS = (2, 16)
OUR_MAX_DELAY = 1 << 40
GRAD_SUM_SUFFIX = "_qo_gradsum"  # as quant_ops.ops: a leaf passes through identity

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_BOOL = {"true": True, "1": True, "false": False, "0": False}  # dmlc: case-insensitive


def is_seed_graph(graph: Graph) -> bool:
    """Whether the graph uses any operator of the seed toolkit."""
    return any(_seed_key(n) is not None for n in graph.nodes)


def _seed_key(node: Node):
    if node.op in SEED_OPS:
        return node.op
    if node.op == "Custom" and node.attrs.get("op_type") in SEED_CUSTOM_OPS:
        return "Custom:" + node.attrs["op_type"]
    return None


def _target(key: str):
    if key.startswith("Custom:"):
        return SEED_CUSTOM_OPS[key.split(":", 1)[1]]
    return SEED_OPS[key]


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _parse_shape(text):
    if not text:
        return None
    parts = [p.strip() for p in text.strip().strip("()[]").split(",") if p.strip()]
    if not parts or not all(_INT.fullmatch(p) for p in parts):
        return None
    return tuple(int(p) for p in parts)


def _lookup(params: dict, name: str):
    for key in (name, "aux:" + name, "arg:" + name):
        if key in params:
            v = params[key]
            return np.asarray(v.asnumpy() if hasattr(v, "asnumpy") else v)
    return None


class _Int8Converter:
    """Converts one seed INT8 quantizer node; collects notes and new arrays."""

    def __init__(self, graph: Graph, params: dict | None):
        self.g = graph
        self.params = params
        self.src = graph.source

    def fail(self, node: Node, msg: str):
        raise QuantOpsError(f"{self.src}: node '{node.name}' ({node.op}): {msg}")

    def note(self, node: Node, msg: str):
        log.info("%s: node '%s': %s", self.src, node.name, msg)

    # -- attribute values, parsed as the seed's dmlc parameters parsed them ---------------
    def _bool(self, node, key, value):
        v = _BOOL.get(value.strip().lower())
        if v is None:
            self.fail(node, f"attribute '{key}' = {value!r} is not a boolean "
                            "(True/False/1/0)")
        return v

    def _int(self, node, key, value):
        if not _INT.fullmatch(value.strip()):
            self.fail(node, f"attribute '{key}' = {value!r} is not an integer")
        return int(value.strip())

    def _float(self, node, key, value):
        if not _FLOAT.fullmatch(value.strip()):
            self.fail(node, f"attribute '{key}' = {value!r} is not a number")
        return float(value.strip())

    def attrs(self, node: Node, custom: bool) -> dict:
        given = dict(node.attrs)
        out = {k: v for k, v in given.items() if k.startswith("__")}  # MXNet's own
        a = {k: v for k, v in given.items() if not k.startswith("__")}
        if custom:
            a.pop("op_type", None)
            bc = a.pop("bias_correct", "False")
            if self._bool(node, "bias_correct", bc):
                self.fail(node, "attribute 'bias_correct' = True (the seed shifted each "
                                "channel's mean after rounding) is not supported")
        unknown = [k for k in a if k not in SEED_INT8_DEFAULTS
                   and k not in ("workspace", "is_train")]
        if unknown:
            self.fail(node, f"attribute '{unknown[0]}' is not one of the seed operator's "
                            f"({', '.join(SEED_INT8_DEFAULTS)})")
        for k in ("workspace", "is_train"):
            if k in a:
                self.note(node, f"dropped attribute '{k}' = {a.pop(k)!r} (seed build only; "
                                "qstate[1] says training or inference)")
        v = {k: a.get(k, d) for k, d in SEED_INT8_DEFAULTS.items()}

        mode = v["quant_mode"].strip()
        if mode != "minmax":
            self.fail(node, f"attribute 'quant_mode' = {v['quant_mode']!r} is not supported "
                            "(only 'minmax': symmetric range max|x|)")
        if "quant_mode" in a:
            self.note(node, "dropped attribute 'quant_mode' = 'minmax' (the only mode)")

        seed_bits = self._int(node, "nbits", v["nbits"])
        bits = seed_bits + SEED_NBITS_OFFSET
        if not OUR_NBITS[0] <= bits <= OUR_NBITS[1]:
            lo, hi = (b - SEED_NBITS_OFFSET for b in OUR_NBITS)
            self.fail(node, f"attribute 'nbits' = {v['nbits']!r} is out of range: seed nbits "
                            f"{lo}..{hi} (2^nbits - 1 levels) convert, to quant_ops nbits "
                            f"{OUR_NBITS[0]}..{OUR_NBITS[1]}")
        if "nbits" not in a:
            self.note(node, f"no 'nbits': the seed default 8 ({2 ** 8 - 1} levels) is "
                            f"quant_ops nbits={bits}; a file from the simpledet build (127 "
                            "levels, no nbits) needs nbits=7 set")

        is_weight = self._bool(node, "is_weight", v["is_weight"])
        perchannel = self._bool(node, "is_weight_perchannel", v["is_weight_perchannel"])
        if perchannel and not is_weight:
            self.note(node, "is_weight_perchannel=True on an activation: the seed ignored "
                            "it; set to False")
            perchannel = False

        delay = self._int(node, "delay_quant", v["delay_quant"])
        if delay < 0:
            self.note(node, f"delay_quant = {delay}: the seed treated it as 0")
            delay = 0
        if delay > OUR_MAX_DELAY:
            self.fail(node, f"attribute 'delay_quant' = {v['delay_quant']!r} is out of range "
                            f"[0, {OUR_MAX_DELAY}]")

        ema = self._float(node, "ema_decay", v["ema_decay"])
        if not 0.0 <= ema <= 1.0:
            self.fail(node, f"attribute 'ema_decay' = {v['ema_decay']!r} is outside [0, 1]")

        grad = v["grad_mode"].strip()
        if is_weight:
            if grad != "ste":
                self.note(node, f"grad_mode = {v['grad_mode']!r} on a weight: the seed passed "
                                "weight gradients straight through; set to 'ste'")
            grad = "ste"
        elif grad not in ("ste", "clip"):
            self.fail(node, f"attribute 'grad_mode' = {v['grad_mode']!r} is not 'ste' or "
                            "'clip'")

        fix = self._bool(node, "fix_act_scale", v["fix_act_scale"])
        if fix and is_weight:
            self.fail(node, "attribute 'fix_act_scale' = True on a weight (the seed then used "
                            "the stored range for the weight) is not supported: quant_ops "
                            "always takes a weight's range from max|w|")

        out.update({
            "nbits": str(bits),
            "is_weight": str(is_weight),
            "is_weight_perchannel": str(perchannel),
            "delay_quant": str(delay),
            "ema_decay": v["ema_decay"].strip(),
            "grad_mode": grad,
            "fix_act_scale": str(fix),
        })
        return out


def _consumer_axes(graph: Graph) -> dict:
    """node index -> set of channel axes its output 0 needs as a layer's weight."""
    axes: dict = {}
    for n in graph.nodes:
        if n.op in ("Convolution", "FullyConnected", "Deconvolution") and len(n.inputs) > 1:
            src, out = n.inputs[1][0], n.inputs[1][1]
            if out == 0:
                axes.setdefault(src, set()).add(1 if n.op == "Deconvolution" else 0)
    return axes


def convert_seed_graph(graph: Graph, params: dict | None = None, *,
                       grad_sum: bool = True) -> tuple:
    """Rewrite the seed toolkit's quantizers into quant_ops operators.

    ``params`` (name -> numpy array or NDArray; plain names or ``arg:``/``aux:`` prefixed)
    gives the stored ranges their shapes.  Returns ``(new_graph, arrays)`` where ``arrays``
    maps names to float32 numpy arrays to add to (or replace in) the params: every new
    ``<quantizer>_qstate`` (zeros: step 0, inference) and any stored range re-made for its
    new shape.  The input graph is not changed.

    ``grad_sum`` routes a quantized leaf (a weight variable) through MXNet's identity, as
    ``mx.sym.Quantization_int8`` does, so that ``grad_req='add'`` accumulates its gradient.
    """
    conv = _Int8Converter(graph, params)
    arrays: dict = {}
    names = {n.name for n in graph.nodes}
    axes = _consumer_axes(graph)

    # check everything first: nothing half-converted
    for n in graph.nodes:
        key = _seed_key(n)
        if key is None:
            continue
        if _target(key) is None:
            shown = key.split(":", 1)[1] if key.startswith("Custom:") else key
            raise QuantOpsError(f"{graph.source}: node '{n.name}' uses seed operator "
                                f"'{shown}', whose conversion to quant_ops is not supported "
                                "yet")

    new_attrs: dict = {}     # old index -> converted attrs of a quantizer
    minmax_shape: dict = {}  # old index of a minmax variable -> new __shape__
    for i, n in enumerate(graph.nodes):
        key = _seed_key(n)
        if key is None:
            continue
        if len(n.inputs) != 2:
            conv.fail(n, f"has {len(n.inputs)} inputs; the seed operator takes 2 "
                         "(data, minmax)")
        attrs = conv.attrs(n, key.startswith("Custom:"))
        is_weight = attrs["is_weight"] == "True"
        perchannel = attrs["is_weight_perchannel"] == "True"
        need = axes.get(i, set())
        if len(need) > 1 and perchannel:
            conv.fail(n, "feeds both a Deconvolution weight (channel axis 1) and another "
                         "layer's weight (axis 0); one per-channel range cannot serve both")
        axis = 1 if 1 in need else 0
        if axis == 1:
            attrs["channel_axis"] = "1"
            if perchannel:
                conv.note(n, "Deconvolution weight: per-channel ranges along axis 1 (output "
                             "channels, as TensorRT); the seed used axis 0")
        qstate = f"{n.name}_qstate"
        if qstate in names:
            conv.fail(n, f"its state variable '{qstate}' would clash with a node of that name")
        names.add(qstate)
        arrays[qstate] = np.zeros(2, np.float32)
        new_attrs[i] = attrs

        mm_idx = n.inputs[1][0]
        mm = graph.nodes[mm_idx]
        if not mm.is_var:
            continue
        data_idx = n.inputs[0][0]
        channels = 1
        w = None
        if perchannel:
            channels = None
            w = _lookup(params, graph.nodes[data_idx].name) \
                if params is not None and graph.nodes[data_idx].is_var else None
            wshape = w.shape if w is not None else (
                _parse_shape(graph.nodes[data_idx].attrs.get("__shape__"))
                if graph.nodes[data_idx].is_var else None)
            if wshape and len(wshape) > axis and wshape[axis] > 0:
                channels = wshape[axis]
        stored = _lookup(params, mm.name) if params is not None else None
        if stored is not None:
            shape = tuple(stored.shape)
            if channels is not None and stored.size != channels:
                if not is_weight:
                    conv.fail(n, f"its stored range '{mm.name}' has shape {shape}; an "
                                 "activation range has one value")
                # a weight's range is re-computed from max|w| at every forward: re-make it
                if w is not None:
                    red = tuple(d for d in range(w.ndim) if d != axis)
                    new = np.abs(w.astype(np.float32)).max(axis=red).astype(np.float32)
                else:
                    new = np.zeros(channels, np.float32)
                arrays[mm.name] = new
                conv.note(n, f"stored range '{mm.name}' of shape {shape} re-made with shape "
                             f"({channels},)")
                shape = (channels,)
            elif channels is None and axis == 1:
                log.warning("%s: node '%s': the stored range '%s' has the seed's shape %s "
                            "(axis 0) and the weight's shape is unknown: drop it from the "
                            "params (the operator re-computes it from the weight)",
                            graph.source, n.name, mm.name, shape)
                shape = (0,)
            elif stored.ndim != 1:
                arrays[mm.name] = stored.astype(np.float32).reshape(-1)
                shape = (stored.size,)
        else:
            old = _parse_shape(mm.attrs.get("__shape__"))
            if channels is not None:
                shape = (channels,)
            elif old is not None and len(old) == 1 and not (axis == 1 and perchannel):
                shape = old
            else:
                shape = (0,)  # rank known, size inferred by the operator
        prev = minmax_shape.get(mm_idx)
        if prev is not None and prev != shape:
            conv.fail(n, f"shares its range variable '{mm.name}' with another quantizer "
                         "that needs another shape")
        minmax_shape[mm_idx] = shape

    if not new_attrs:
        return Graph([Node(n.op, n.name, dict(n.attrs), [list(e) for e in n.inputs])
                      for n in graph.nodes], [list(h) for h in graph.heads],
                     dict(graph.attrs), graph.source), arrays

    out_nodes: list = []
    order: list = []
    new_index: dict = {}
    gradsum: dict = {}       # old leaf index -> new index of its identity

    def emit(node: Node, old=None) -> int:
        out_nodes.append(node)
        order.append(old)
        return len(out_nodes) - 1

    for i, n in enumerate(graph.nodes):
        inputs = [[new_index[e[0]], e[1], e[2]] for e in n.inputs]
        if i in new_attrs:
            src = graph.nodes[n.inputs[0][0]]
            if grad_sum and src.is_var:
                if n.inputs[0][0] not in gradsum:
                    gradsum[n.inputs[0][0]] = emit(Node(
                        "_copy", src.name + GRAD_SUM_SUFFIX, {}, [inputs[0]]))
                inputs[0] = [gradsum[n.inputs[0][0]], 0, 0]
            st = emit(Node("null", f"{n.name}_qstate", {"__shape__": "(2,)"}))
            new_index[i] = emit(Node("Quantization_int8", n.name, new_attrs[i],
                                     inputs + [[st, 0, 0]]), i)
            continue
        attrs = dict(n.attrs)
        if i in minmax_shape:
            attrs["__shape__"] = _shape_str(minmax_shape[i])
        new_index[i] = emit(Node(n.op, n.name, attrs, inputs), i)
    return graph.rebuilt(order, out_nodes), arrays
