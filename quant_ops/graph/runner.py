"""One way to run a graph: bind its symbol to numpy params and feed it batches.

Calibration, the PTQ passes, the alignment check, constant folding and the model object
all run graphs through :func:`bind` / :class:`Runner`, so shape errors read the same
everywhere and MXNet's fusion quirk is handled in one place.
"""
from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager, nullcontext
from typing import Iterable, Iterator, Mapping

import mxnet as mx
import numpy as np

from ..errors import QuantOpsError, mxnet_message
from .ir import Graph
from .params import as_numpy

# Above this many bytes of requested tensors per batch, a Runner reads them op by op (see
# Runner): far above what the bundled nets' calibration batches ask for (about 0.1 GB),
# below a Mask R-CNN's 1000-ROI head (5.7 GB for one image)
KEEP_BYTES = 2 << 30


@contextmanager
def no_fusion() -> Iterator[None]:
    """Bind without MXNet's MKL-DNN subgraph fusion.  With an inner tensor among the
    requested outputs, mxnet 1.9.1 still fuses its producer with what follows (conv + BN,
    conv + ReLU): the bind fails ("arg_names.size() == in_args_map.size()") or the tensors
    downstream come out wrong."""
    # "NONE" would do it too, but MXNet then logs a line per bind; its "default" backend
    # fuses only the operators a graph names in an attribute: none here
    saved = os.environ.get("MXNET_SUBGRAPH_BACKEND")
    os.environ["MXNET_SUBGRAPH_BACKEND"] = "default"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["MXNET_SUBGRAPH_BACKEND"]
        else:
            os.environ["MXNET_SUBGRAPH_BACKEND"] = saved


def select(graph: Graph | mx.sym.Symbol, outputs: list[str] | None = None) -> mx.sym.Symbol:
    """The graph's symbol, or the group of the named internal tensors (``conv0_output``;
    a variable by its name)."""
    sym = graph.to_symbol() if isinstance(graph, Graph) else graph
    if not outputs:
        return sym
    internals = sym.get_internals()
    names = set(internals.list_outputs())
    missing = [o for o in outputs if o not in names]
    if missing:
        source = graph.source if isinstance(graph, Graph) else "<symbol>"
        raise QuantOpsError(f"{source}: no tensor named {missing[0]!r}")
    return mx.sym.Group([internals[o] for o in outputs])


def bind(sym: mx.sym.Symbol, params: Mapping, feeds: Mapping[str, tuple | np.ndarray],
         grad_req: str | Mapping[str, str] = "null", args_grad: Mapping | None = None,
         fusion: bool = True, source: str = "<graph>") -> mx.executor.Executor:
    """An executor of ``sym``: ``feeds`` gives each input a shape (zeros) or a value, the
    rest of its arguments and auxiliary states come from ``params`` (numpy or NDArray)."""
    args = {}
    for k in sym.list_arguments():
        if k in feeds:
            f = feeds[k]
            args[k] = mx.nd.zeros(f) if isinstance(f, tuple) else mx.nd.array(as_numpy(f))
        elif k in params:
            args[k] = mx.nd.array(as_numpy(params[k]))
        else:
            raise QuantOpsError(f"{source}: no value for parameter '{k}'")
    aux = {}
    for k in sym.list_auxiliary_states():
        if k not in params:
            raise QuantOpsError(f"{source}: no value for auxiliary state '{k}'")
        aux[k] = mx.nd.array(as_numpy(params[k]))
    try:
        with nullcontext() if fusion else no_fusion():
            return sym.bind(mx.cpu(), args, args_grad=args_grad, grad_req=grad_req,
                            aux_states=aux)
    except mx.base.MXNetError as e:
        shapes = {k: (f if isinstance(f, tuple) else np.shape(f)) for k, f in feeds.items()}
        raise QuantOpsError(f"{source}: input shape {shapes} does not fit the model: "
                            f"{mxnet_message(e)}") from None


class Runner:
    """Batches in, the graph's outputs (or named internal tensors) out, as numpy arrays, in
    inference mode.  Every batch has the per-sample shape of ``shape``; a batch of another
    size (a shorter last one) runs on a reshaped executor that shares the first's memory.
    ``copies=2`` keeps two executors that take turns in :meth:`stream`, so MXNet computes
    batch i+1 while the caller reads batch i.

    Requested internal tensors are outputs of the bound group, so MXNet keeps each one's
    memory for the whole forward: past ``max_bytes`` of them (a Mask R-CNN's 1000-ROI head
    asks for 5.7 GB, twice that with two copies, and ran out of 24 GB), one executor of the
    plain graph runs instead, with its memory reused as usual, and each tensor is read
    through MXNet's monitor the moment its operator has run.  Same values, no overlap."""

    def __init__(self, graph: Graph | mx.sym.Symbol, params: Mapping, shape: tuple,
                 data_name: str = "data", outputs: list[str] | None = None, copies: int = 1,
                 fusion: bool | None = None, max_bytes: int = KEEP_BYTES):
        source = graph.source if isinstance(graph, Graph) else "<symbol>"
        sym = select(graph, outputs)
        self.shape, self.data_name, self.source = tuple(shape), data_name, source
        self._fusion = not outputs if fusion is None else fusion   # see no_fusion
        self._tap: list[str] | None = None
        self._taken: dict = {}
        if outputs and _output_bytes(sym, params, data_name, self.shape) * copies \
                > max_bytes:
            self._tap, sym, copies = list(outputs), select(graph), 1
        self._exes = [bind(sym, params, {data_name: self.shape}, fusion=self._fusion,
                           source=source) for _ in range(copies)]
        for exe in self._exes:
            self._watch(exe)
        self._resized: dict = {}

    def _watch(self, exe: mx.executor.Executor) -> None:
        """Copy each requested tensor out of ``exe`` as its operator finishes."""
        if self._tap is None:
            return
        wanted = set(self._tap)

        def take(name, handle) -> None:
            arr = mx.nd.NDArray(ctypes.cast(handle, mx.base.NDArrayHandle), writable=False)
            name = mx.base.py_str(name)
            if name in wanted:
                self._taken[name] = arr.asnumpy()    # waits for this operator alone

        exe.set_monitor_callback(take)

    def _outputs(self, exe: mx.executor.Executor) -> list[np.ndarray]:
        """The requested tensors of the forward ``exe`` was just given."""
        if self._tap is None:
            return [o.asnumpy() for o in exe.outputs]
        out = []
        for name in self._tap:
            if name in self._taken:
                out.append(self._taken.pop(name))
            else:                                   # a variable: no operator writes it
                held = exe.arg_dict.get(name, exe.aux_dict.get(name))
                if held is None:
                    raise QuantOpsError(f"{self.source}: MXNet did not compute '{name}'")
                out.append(held.asnumpy())
        self._taken.clear()
        return out

    def _executor(self, x, i: int = 0) -> mx.executor.Executor:
        """The executor for ``x``'s shape (the ``i``-th copy)."""
        shape = tuple(np.shape(x))
        if shape == self.shape:
            return self._exes[i]
        if shape[1:] != self.shape[1:] or not shape or shape[0] < 1:
            raise QuantOpsError(f"{self.source}: batch of shape {shape}, expected "
                                f"(N,) + {self.shape[1:]} (one shape per sample)")
        key = (shape, i)
        if key not in self._resized:
            try:
                # every argument's shape, not the data's alone: MXNet re-infers the rest
                # from the symbol, where a Gluon-exported weight may carry a partial
                # __shape__ (16, 0, 3, 3) that a quantizer's shape check then refuses
                shapes = {k: v.shape for k, v in self._exes[i].arg_dict.items()}
                shapes[self.data_name] = shape
                with nullcontext() if self._fusion else no_fusion():
                    self._resized[key] = self._exes[i].reshape(allow_up_sizing=True,
                                                               **shapes)
                self._watch(self._resized[key])
            except mx.base.MXNetError as e:
                raise QuantOpsError(f"{self.source}: batch of shape {shape}: "
                                    f"{mxnet_message(e)}") from None
        return self._resized[key]

    def set_param(self, name: str, value: np.ndarray) -> None:
        """Give parameter ``name`` a new value (same shape) in every executor (bind with
        ``fusion=False``: a fused oneDNN convolution keeps the weights it first saw)."""
        for exe in [*self._exes, *self._resized.values()]:
            target = exe.arg_dict.get(name)
            if target is None:
                target = exe.aux_dict.get(name)
            if target is None:
                raise QuantOpsError(f"{self.source}: no parameter '{name}'")
            mx.nd.array(np.asarray(value, np.float32)).copyto(target)  # any layout

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        exe = self._executor(x)
        exe.arg_dict[self.data_name][:] = x
        exe.forward(is_train=False)
        return self._outputs(exe)

    def stream(self, xs: Iterable[np.ndarray]) -> Iterator[list[np.ndarray]]:
        """The outputs of each batch of ``xs`` in turn (executors alternate)."""
        pending = None
        for i, x in enumerate(xs):
            exe = self._executor(x, i % len(self._exes))
            exe.arg_dict[self.data_name][:] = x
            exe.forward(is_train=False)          # queued: runs while batch i-1 is read
            if self._tap is not None:            # already read, op by op
                yield self._outputs(exe)
                continue
            if pending is not None:
                yield self._outputs(pending)
            pending = exe
        if pending is not None:
            yield self._outputs(pending)


def _output_bytes(sym: mx.sym.Symbol, params: Mapping, data_name: str, shape: tuple) -> int:
    """Bytes of ``sym``'s outputs (float32) for input ``shape``; 0 where shapes cannot be
    inferred (the bind then says why)."""
    known = {k: tuple(params[k].shape) for k in sym.list_arguments() if k in params}
    known[data_name] = shape
    try:   # (not infer_shape: on failure it prints every argument's shape to stdout)
        _, shapes, _ = sym._infer_shape_impl(False, **known)
    except mx.base.MXNetError:
        return 0
    return sum(4 * int(np.prod(s)) for s in shapes or () if s is not None)


def run_once(graph: Graph | mx.sym.Symbol, params: Mapping,
             feeds: Mapping[str, np.ndarray] | None = None,
             outputs: list[str] | None = None) -> list[np.ndarray]:
    """One inference forward with the given input values (none: a parameter-only graph)."""
    source = graph.source if isinstance(graph, Graph) else "<symbol>"
    sym = select(graph, outputs)
    exe = bind(sym, params, dict(feeds or {}), fusion=not outputs, source=source)
    return [o.asnumpy() for o in exe.forward(is_train=False)]


def predict(graph: Graph, params: Mapping, x: np.ndarray, batch_size: int = 500,
            data_name: str = "data") -> np.ndarray:
    """The first output of the graph over ``x``, in batches of ``batch_size``."""
    if len(x) == 0:
        raise QuantOpsError(f"{graph.source}: nothing to predict (no images)")
    batch_size = min(batch_size, len(x))
    run = Runner(graph, params, (batch_size,) + tuple(x.shape[1:]), data_name)
    return np.concatenate([run(x[i:i + batch_size])[0] for i in range(0, len(x), batch_size)])


def accuracy(graph: Graph, params: Mapping, x: np.ndarray, y: np.ndarray,
             batch_size: int = 500, data_name: str = "data") -> float:
    """Top-1 accuracy in percent."""
    pred = predict(graph, params, x, batch_size, data_name).argmax(1)
    return float((pred == np.asarray(y).reshape(-1)).mean() * 100)
