"""Python front of the operators: nd / sym functions, quantizer state, Gluon blocks.

Quantizer state is ordinary auxiliary arrays, so checkpoints are plain ``.params`` files:

* ``minmax``: the range (amax), shape ``(1,)`` or ``(channels,)``;
* ``qstate``: ``[step, training]``: training forward passes seen (drives ``delay_quant``)
  and the mode flag.  MXNet's external-operator API does not tell an operator whether it
  runs in training, so the mode is data: ``set_training`` writes it, and Gluon nets keep it
  in step with ``autograd.is_training()`` through ``track_training``.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Iterable, Mapping

import mxnet as mx
from mxnet import autograd, gluon

from . import methods
from .errors import QuantOpsError
from .graph.ir import Graph
from .graph.quantizers import GRAD_SUM_SUFFIX, Quantizer, quantizers
from .methods.base import MODE_INPUT


class OperatorError(QuantOpsError, mx.base.MXNetError):
    """Bad input to an operator of the library (attribute, shape, dtype).  Also an
    ``MXNetError``, so code written against plain MXNet still catches it."""


def _operator_message(op: str, err: Exception) -> str | None:
    """The library's own message inside an MXNetError, if the error is the library's."""
    for line in str(err).splitlines():
        if f"{op}:" in line:
            return line[line.index(f"{op}:"):].strip()
    return None

# The library's quantizers, from the method registry: their inputs in order, and which of
# those are learned (a leaf whose gradient must accumulate) or state (auxiliary).
# (kept up to date by ``install_wrappers`` as methods are registered)
OP_INPUTS: dict[str, tuple[str, ...]] = {m.op: m.input_names for m in methods.REGISTRY.values()}
LEARNED_INPUTS = {i.name for m in methods.REGISTRY.values() for i in m.inputs if i.learned}
QUANTIZERS = tuple(OP_INPUTS)


# -- gradient accumulation ---------------------------------------------------------------
# The external-operator API does not pass OpReqType, so an operator whose gradient lands
# directly in a leaf's buffer overwrites it even under grad_req='add'.  The wrappers below
# route a leaf input (data, or a learned parameter) through MXNet's own identity op, whose
# backward honours 'add'; the quantizer's gradient then goes to an intermediate buffer.
# Intermediate tensors never get 'add' (unless MXNET_EXEC_ENABLE_ADDTO=1 is set).

def _is_symbol_leaf(x: Any) -> bool:
    return isinstance(x, mx.sym.Symbol) and x.get_children() is None


def _is_nd_leaf(x: Any) -> bool:
    return isinstance(x, mx.nd.NDArray) and x.grad is not None and autograd.is_recording()


# MXNet 1.9.1 sizes a buffer from the inputs' ranks before calling an external operator's
# shape inference and overflows it (or segfaults) when an input's rank is unknown.  State
# and parameter variables therefore always carry a rank: (0,) is one dimension of a size
# still unknown.


def _wrap(raw, method: methods.Method):
    inputs = method.input_names
    ranks = {i.name: i.rank for i in method.inputs}
    through_identity = [0] + [k + 1 for k, i in enumerate(method.inputs) if i.learned]

    @functools.wraps(raw)
    def quantizer(*args, **kwargs):
        args = list(args) + [kwargs.pop(k) for k in inputs[len(args):] if k in kwargs]
        if args and isinstance(args[0], mx.nd.NDArray) and len(args) < len(inputs):
            # (a symbol may leave inputs out: MXNet makes variables for them)
            missing = ", ".join(f"'{k}'" for k in inputs[len(args):])
            raise OperatorError(f"{method.op}: input {missing} missing (it takes "
                                f"{', '.join(inputs)})")
        for i, v in enumerate(args[:len(inputs)]):
            if isinstance(v, mx.nd.NDArray) and v.ndim == 0:
                # MXNet 1.x reads shape () as "unknown" and runs past the buffer
                raise OperatorError(f"{method.op}: input '{inputs[i]}' has no dimensions "
                                    "(shape ()); give it shape (1,)")
            if i and isinstance(v, mx.nd.NDArray) and v.size == 0:
                # MXNet takes a 0 in a shape for "unknown": say so here, not at the next sync
                raise OperatorError(f"{method.op}: input '{inputs[i]}' is empty (shape "
                                    f"{v.shape})")
            if isinstance(v, mx.sym.Symbol) and _is_symbol_leaf(v):
                if inputs[i] in ranks and "__shape__" not in v.list_attr():
                    v._set_attr(__shape__=ranks[inputs[i]])
                if i in through_identity:
                    args[i] = mx.sym.identity(v, name=v.name + GRAD_SUM_SUFFIX)
            elif i in through_identity and _is_nd_leaf(v):
                args[i] = mx.nd.identity(v)
        try:
            return raw(*args, **kwargs)
        except mx.base.MXNetError as e:
            msg = _operator_message(raw.__name__, e)
            if msg is None:
                raise
            raise OperatorError(msg) from None

    quantizer.__qo_raw__ = raw  # type: ignore[attr-defined]
    return quantizer


def _install(method: methods.Method) -> None:
    global QUANTIZERS
    OP_INPUTS[method.op] = method.input_names
    LEARNED_INPUTS.update(i.name for i in method.inputs if i.learned)
    QUANTIZERS = tuple(OP_INPUTS)
    for mods in ((mx.nd, mx.nd.op, mx.ndarray), (mx.sym, mx.sym.op, mx.symbol)):
        raw = getattr(mods[0], method.op, None)
        if raw is None:  # an operator this build of the library does not have
            continue
        raw = getattr(raw, "__qo_raw__", raw)
        wrapped = _wrap(raw, method)
        for m in mods:
            setattr(m, method.op, wrapped)


def install_wrappers() -> None:
    """Replace ``mx.nd.<Q>`` and ``mx.sym.<Q>`` of every registered method (and of any
    registered later) with gradient-accumulation-safe wrappers."""
    methods.on_register(_install)


def raw_op(F, name: str):
    """The operator as MXNet registered it, without the leaf wrapper."""
    f = getattr(F, name)
    return getattr(f, "__qo_raw__", f)


# -- state helpers ---------------------------------------------------------------------

def block_quantizers(net: gluon.Block) -> list[Quantizer]:
    """The quantizers of a Gluon net, read from its graph (a SymbolBlock's, or the one a
    hybridized block has cached; a block never traced is traced on one input ``data``)."""
    cached = getattr(net, "_cached_graph", ())
    sym = cached[1] if cached else None
    if sym is None and isinstance(net, gluon.HybridBlock):
        try:
            out = net(mx.sym.var("data"))
            sym = mx.sym.Group(list(out)) if isinstance(out, (list, tuple)) else out
        except Exception:  # a block that cannot be traced on one input has no graph view
            return []
    return quantizers(Graph.from_symbol(sym)) if sym is not None else []


def _mode_params(net: gluon.Block) -> list[str]:
    """Names of the net's mode-flag parameters (found once per net, from its graph; a net
    with no graph view falls back to the ``<quantizer>_qstate`` naming of the rewrite)."""
    names = getattr(net, "_qo_mode_names", None)
    if names is None:
        net._qo_mode_names = []   # tracing calls the net (and its hooks): no recursion
        qs = block_quantizers(net)
        if qs:
            names = [q.inputs[MODE_INPUT] for q in qs if MODE_INPUT in q.inputs]
        else:
            names = [n for n in net.collect_params() if n.endswith("_" + MODE_INPUT)]
        net._qo_mode_names = names
    return names


def set_training(arrays: Mapping[str, mx.nd.NDArray] | Iterable[mx.nd.NDArray] | gluon.Block,
                 training: bool) -> int:
    """Set the mode flag (``qstate[1]``) of every quantizer: of a Gluon block, of a dict of
    state arrays named as the rewrite names them (``<quantizer>_qstate``, e.g.
    ``exe.aux_dict``), or of an iterable of qstate arrays.  Returns how many were set."""
    if isinstance(arrays, gluon.Block):
        params = arrays.collect_params()
        arrays = [params[n].data() for n in _mode_params(arrays)
                  if n in params and params[n]._data is not None]
    if isinstance(arrays, Mapping):
        arrays = [v for k, v in arrays.items() if k.endswith("_" + MODE_INPUT)]
    n = 0
    with autograd.pause():  # an in-place write is refused while autograd records
        for a in arrays:
            if a.shape != (2,):
                raise QuantOpsError(f"a qstate array must have shape (2,), got {a.shape}")
            a[1:2] = 1.0 if training else 0.0
            n += 1
    return n


def track_training(net: gluon.Block) -> gluon.Block:
    """Keep the quantizers' mode flag equal to ``autograd.is_training()`` on every call of
    ``net`` (hybridized or not); the flag is written only when the mode changes."""
    if getattr(net, "_qo_tracking", False):
        return net

    def hook(block, _inputs):
        mode = autograd.is_training()
        if block._qo_mode != mode:
            set_training(block, mode)
            block._qo_mode = mode

    net._qo_mode = None
    net._qo_tracking = True
    net.register_forward_pre_hook(hook)
    if isinstance(net, gluon.HybridBlock):
        # Gluon warns that hooks of a hybridized block are lost when it is a child; this hook
        # sits on the outermost block, where it runs on every call, so the warning is noise.
        hybridize = net.hybridize

        @functools.wraps(hybridize)
        def quiet_hybridize(*args, **kwargs):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="(?s).*still having forward hook")
                return hybridize(*args, **kwargs)

        net.hybridize = quiet_hybridize
    return net


# -- Gluon --------------------------------------------------------------------------

class FakeQuantInt8(gluon.HybridBlock):
    """``Quantization_int8`` as a Gluon block with its state as (non-trained) parameters.

    Use it on a weight (``is_weight=True``) or an activation.  Its mode starts as inference
    (``qstate = [0, 0]``): call ``track_training`` on the outermost net (hooks on children of
    a hybridized net do not run), or ``set_training`` explicitly.
    """

    def __init__(self, channels: int = 1, prefix: str | None = None, params=None,
                 **attrs: Any):
        super().__init__(prefix=prefix, params=params)
        self._attrs = attrs
        with self.name_scope():
            self.minmax = self.params.get("minmax", shape=(channels,), init="zeros",
                                          grad_req="null", differentiable=False)
            self.qstate = self.params.get("qstate", shape=(2,), init="zeros",
                                          grad_req="null", differentiable=False)

    def hybrid_forward(self, F, x, minmax, qstate):  # noqa: N803 (Gluon's signature)
        return F.Quantization_int8(x, minmax, qstate, **self._attrs)
