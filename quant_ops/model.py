"""The model object: one network carried from load to export without files in between.

``QuantizedModel`` holds a graph (the IR of ``quant_ops.graph``) and its params as numpy
arrays, and runs every stage of the pipeline on them in memory::

    m = QuantizedModel.from_symbol("net-symbol.json", "net-0000.params")
    m.quantize("trt_int8", fold_bn="deploy")
    m.calibrate(images)                # "auto": per tensor, the range its layer likes best
    m.evaluate(x_test, y_test)
    m.save("out/net-int8")             # symbol + params that SymbolBlock.imports reads
    m.export("out/deploy")             # ONNX QDQ, TensorRT cache, ranges, alignment

``QuantizedModel.from_gluon(net)`` starts from a Gluon block and ``from_zoo(name)`` from a
gluoncv architecture.  ``to_block()`` gives a trainable Gluon block for QAT and
``from_block(block)`` takes the trained values back (``fit`` does both).  Like torch.ao's prepare/convert, each stage returns the
model, so they chain.
"""
from __future__ import annotations

import io
import json
import logging
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import mxnet as mx
import numpy as np
from mxnet import gluon
from tqdm import tqdm

from .errors import QuantOpsError, mxnet_message
from .fileio import atomic_write_text, plain_name, staged_dir
from .graph.heads import label_names, without_loss
from .graph.ir import Graph, load_graph
from .graph.params import as_numpy, check_arrays, load_params, save_params
from .graph.quantize import strip_quantizers
from .graph.quantizers import Quantizer, quantizers
from .graph.runner import Runner, predict
from .policy import QuantPolicy

log = logging.getLogger(__name__)
ArrayLike = Any   # numpy array or NDArray


def as_params(params: str | Path | Mapping[str, ArrayLike],
              cast: bool = False) -> dict[str, np.ndarray]:
    """Params as plain names -> float32 numpy arrays, checked (``graph.params.check_arrays``;
    ``cast`` converts other float types): from a ``.params`` file or a dict (e.g.
    ``mx.nd.load``'s, whose ``arg:``/``aux:`` prefixes are dropped)."""
    if isinstance(params, (str, Path)):
        return load_params(params, cast)
    if not isinstance(params, Mapping):
        raise QuantOpsError(f"params must be a file name or a dict of arrays, not "
                            f"{type(params).__name__}")
    out = {}
    for k, v in params.items():
        if not isinstance(k, str):
            raise QuantOpsError(f"params: key {k!r} is not a name")
        out[k.split(":", 1)[1] if k.startswith(("arg:", "aux:")) else k] = as_numpy(v)
    return check_arrays(out, "params", cast)


@contextmanager
def _fresh_names():
    """Gluon names a block from the name manager, or under an enclosing block's scope when
    one is open: neither is used here, so a zoo model gets its usual node names."""
    scope = gluon.block._BlockScope._current
    saved = getattr(scope, "value", None)
    scope.value = None
    try:
        with mx.name.NameManager():
            yield
    finally:
        scope.value = saved


def _batches(data, batch_size: int) -> list[np.ndarray]:
    """Input batches from an (N, ...) array, a list of batches, or (x, y) batches."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise QuantOpsError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(data, (np.ndarray, mx.nd.NDArray)):
        x = as_numpy(data).astype(np.float32, copy=False)
        return [x[i:i + batch_size] for i in range(0, len(x), batch_size)]
    out = []
    for b in data:
        if isinstance(b, (tuple, list)):   # (x, y) from a DataLoader
            b = b[0]
        out.append(as_numpy(b).astype(np.float32, copy=False))
    return out


def _as_samples(sample) -> list:
    """A Gluon sample (one batch or a list of them, numpy or NDArray) as float32 NDArrays."""
    items = list(sample) if isinstance(sample, (list, tuple)) else [sample]
    out = []
    for x in items:
        try:
            a = as_numpy(x).astype(np.float32, copy=False)
        except (TypeError, ValueError):
            a = None
        if a is None or a.dtype.kind != "f" or a.ndim == 0:
            raise QuantOpsError(f"a sample is an input batch (a numpy array or an NDArray), "
                                f"not {type(x).__name__}")
        ctx = x.context if isinstance(x, mx.nd.NDArray) else mx.cpu()
        out.append(mx.nd.array(a, ctx=ctx, dtype="float32"))
    return out


def _checked_labels(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Evaluation labels as class indices, the inputs finite: otherwise an accuracy would be
    computed from nothing meaningful."""
    from .datasets import check_labels

    if not np.isfinite(x).all():
        raise QuantOpsError("evaluation set: the inputs have NaN or infinite values")
    return check_labels(y, len(x), "evaluation set")


def _checked_logits(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    if logits.ndim != 2:
        raise QuantOpsError(f"evaluation: the model's output has shape {logits.shape}; "
                            "top-1 accuracy needs (batch, classes)")
    if len(y) and int(y.max()) >= logits.shape[1]:
        raise QuantOpsError(f"evaluation set: label {int(y.max())} is out of range: the model "
                            f"has {logits.shape[1]} classes")
    return logits


class QuantizedModel:
    """A network and its params, quantized or not yet (see the module docstring)."""

    def __init__(self, graph: Graph, params: Mapping[str, ArrayLike],
                 data_names: Sequence[str] = ("data",), name: str = "model"):
        from .graph.seed import convert_seed_graph, is_seed_graph

        self.params = as_params(params)
        self.notes: list[str] = []       # what the passes did
        self.reports: dict[str, dict] = {}   # what each PTQ pass found, by pass name
        if is_seed_graph(graph):  # written for the seed toolkit's MXNet build
            graph, extra = convert_seed_graph(graph, self.params)
            self.params.update(extra)
            self.notes.append("converted seed-toolkit operators")
        self.graph = graph
        self.data_names = tuple(data_names)
        #: labels of loss heads (``softmax_label``): fed by training only, see graph.heads
        self.label_names = tuple(label_names(graph))
        self.name = name
        self.policy: QuantPolicy | None = None
        self.table: list[dict] = []      # what was quantized: one row per quantizer
        self.ranges: dict[str, float] = {}
        self.input_shape: tuple | None = None
        #: the files it was read from: what save and export never write over
        self.sources: set[Path] = set()
        self._check_params()

    # -- making one ---------------------------------------------------------------------
    @classmethod
    def from_symbol(cls, symbol: str | Path | mx.sym.Symbol | Graph,
                    params: str | Path | Mapping[str, ArrayLike],
                    data_names: Sequence[str] = ("data",), cast: bool = False) -> QuantizedModel:
        """From a symbol (JSON file, ``mx.sym.Symbol`` or ``Graph``) and its params (a
        ``.params`` file or a dict of arrays, prefixed or not; float32 and finite, or
        ``cast=True`` to convert other float types)."""
        if isinstance(symbol, Graph):
            graph, name = symbol, Path(symbol.source).name
        elif isinstance(symbol, mx.sym.Symbol):
            graph, name = Graph.from_symbol(symbol), "model"
        elif isinstance(symbol, (str, Path)):
            graph, name = load_graph(symbol), Path(symbol).name
        else:
            raise QuantOpsError(f"symbol must be a symbol file, an mx.sym.Symbol or a Graph, "
                                f"not {type(symbol).__name__}")
        name = name.split("-symbol")[0].removesuffix(".json") or "model"
        m = cls(graph, as_params(params, cast), data_names, name)
        m.sources = {Path(f).resolve() for f in (symbol, params) if isinstance(f, (str, Path))}
        return m

    @classmethod
    def load(cls, prefix: str | Path, epoch: int = 0,
             data_names: Sequence[str] = ("data",)) -> QuantizedModel:
        """What ``save(prefix)`` wrote: ``<prefix>-symbol.json`` + ``<prefix>-NNNN.params``."""
        m = cls.from_symbol(f"{prefix}-symbol.json", f"{prefix}-{epoch:04d}.params",
                            data_names)
        m.name = Path(prefix).name
        return m

    @classmethod
    def from_gluon(cls, block: gluon.HybridBlock, sample: ArrayLike | None = None,
                   data_names: Sequence[str] = ("data",), name: str | None = None) -> QuantizedModel:
        """From a Gluon block (``sample``, an input batch, completes deferred
        initialization)."""
        uninitialized = [p.name for p in block.collect_params().values()
                         if p._data is None and p._deferred_init == ()]
        if uninitialized:
            raise QuantOpsError(f"{block.name}: parameter {uninitialized[0]} is not "
                                "initialized: call block.initialize() first")
        if sample is not None:
            sample = _as_samples(sample)
            try:   # (MXNet prints every argument's shape to stdout when inference fails)
                with redirect_stdout(io.StringIO()):
                    block(*sample)
            except (ValueError, mx.base.MXNetError) as e:
                shapes = " and ".join("x".join(map(str, x.shape)) for x in sample)
                raise QuantOpsError(f"{name or block.name}: cannot run on a sample of shape "
                                    f"{shapes}: {mxnet_message(e)}") from None
            sample = sample if len(sample) > 1 else sample[0]
        from .prepare import trace

        try:
            out, _ = trace(block, data_names)
        except mx.base.MXNetError as e:
            raise QuantOpsError(f"{block.name}: MXNet cannot build this block as a graph "
                                f"(its export fails too): {mxnet_message(e)}") from None
        # only what the graph reads: a block may hold layers its forward never runs (a
        # backbone's classifier in a depth net), whose shapes nothing can infer
        used = set(out.list_arguments()) | set(out.list_auxiliary_states())
        try:
            params = {p.name: p.data().asnumpy() for p in block.collect_params().values()
                      if p.name in used}
        except gluon.parameter.DeferredInitializationError:
            raise QuantOpsError("the block's parameters are not initialized yet: pass "
                                "`sample` (an input batch) or run the block once") from None
        m = cls(Graph.from_symbol(out), params, data_names, name or block.name)
        if sample is not None and not isinstance(sample, (list, tuple)):
            m.input_shape = tuple(sample.shape)
        return m

    @classmethod
    def from_zoo(cls, name: str, input_shape: Sequence[int] = (1, 3, 224, 224),
                 seed: int = 0, **kwargs: Any) -> QuantizedModel:
        """A gluoncv model-zoo architecture with random weights (none can be downloaded
        here): for graph work and speed, not accuracy."""
        from .zoo import get_model

        shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else ()
        if not shape or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool)
                                and d >= 1 for d in shape):
            raise QuantOpsError(f"{name}: input_shape must be positive integers such as "
                                f"(1, 3, 224, 224), got {input_shape!r}")
        mx.random.seed(seed)
        with _fresh_names():   # the zoo's own node names, whatever was built before
            net = get_model(name, **kwargs)
        for p in net.collect_params().values():   # a parameter's own initializer wins
            p.initialize(default_init=mx.init.Xavier() if p.name.endswith("weight") else
                         mx.init.One() if p.name.endswith(("gamma", "running_var",
                                                           "moving_var")) else mx.init.Zero())
        net.hybridize()
        sample = mx.nd.zeros(tuple(input_shape))
        try:
            return cls.from_gluon(net, sample, name=name)
        except QuantOpsError as e:
            if "Deferred initialization failed" not in str(e):
                raise
            # a hybridized block infers every parameter's shape, also of layers its forward
            # never runs (monodepth2's encoder keeps ResNet's classifier): run it imperatively
            net.hybridize(False)
            return cls.from_gluon(net, sample, name=name)

    def _check_params(self) -> None:
        try:
            sym = self.graph.to_symbol()
        except mx.base.MXNetError as e:
            raise QuantOpsError(f"{self.graph.source}: MXNet cannot load it: "
                                f"{mxnet_message(e)}") from None
        missing = [n for n in sym.list_arguments() + sym.list_auxiliary_states()
                   if n not in self.params and n not in self.data_names + self.label_names]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise QuantOpsError(f"{self.graph.source}: the params do not match the symbol: "
                                f"missing {', '.join(missing[:5])}{more}")
        self._check_values()

    def _check_values(self) -> None:
        """What MXNet would run on without complaint but compute wrong: a quantizer whose
        range or state holds no value, a BatchNorm whose running variance is negative
        (its output is NaN, folded or not)."""
        src = self.graph.source
        for q in self.quantizers:
            for inp, var in q.inputs.items():
                v = self.params.get(var)
                if v is not None and (v.ndim == 0 or v.size == 0):
                    raise QuantOpsError(f"{src}: {q.method.op} '{q.name}': its '{inp}' "
                                        f"('{var}') has shape {tuple(v.shape)}; it holds "
                                        "one value per tensor or per channel")
        for node in self.graph.nodes:
            if node.op != "BatchNorm" or len(node.inputs) < 5:
                continue
            var_name = self.graph.nodes[node.inputs[4][0]].name
            v = self.params.get(var_name)
            eps = float(node.attrs.get("eps", "0.001"))
            if v is not None and v.size and (v + eps <= 0).any():
                raise QuantOpsError(f"{src}: BatchNorm '{node.name}': running variance "
                                    f"'{var_name}' is negative ({float(v.min()):.3g})")

    def set_input_shape(self, shape: Sequence[int]) -> QuantizedModel:
        """Record the input shape, after checking that the graph and its params take it
        (the error says which layer does not fit)."""
        self.check_input_shape(shape)
        self.input_shape = tuple(shape)
        return self

    def check_input_shape(self, shape: Sequence[int]) -> None:
        """Refuse an input shape the graph and its params do not take, naming the layer."""
        sym = self.run_graph.to_symbol()
        args = set(sym.list_arguments())
        shapes = {k: v.shape for k, v in self.params.items() if k in args}
        try:  # (not infer_shape: on failure it prints every argument's shape to stdout)
            sym._infer_shape_impl(False, **{self.data_names[0]: tuple(shape)}, **shapes)
        except mx.base.MXNetError as e:
            raise QuantOpsError(f"{self.graph.source}: input shape {tuple(shape)} does not "
                                f"fit the model and its params: {mxnet_message(e)}") from None
        self.input_shape = tuple(shape)
        return self

    # -- what it is -----------------------------------------------------------------------
    @property
    def quantizers(self) -> list[Quantizer]:
        """The typed view of every quantizer in the graph."""
        return quantizers(self.graph)

    @property
    def run_graph(self) -> Graph:
        """The graph as it runs without labels: loss heads in their inference form."""
        return without_loss(self.graph)

    def uncalibrated(self) -> list[str]:
        """Activation quantizers whose range is state nothing has filled yet (zeros)."""
        return [q.name for q in self.quantizers
                if not q.is_weight and q.range_var is not None
                and not q.method.input(q.method.range_input).learned
                and not float(np.abs(self.params[q.range_var]).max()) > 0]

    def _warn_uncalibrated(self) -> None:
        if not getattr(self, "_warned", False) and self.uncalibrated():
            log.warning("%s: %d activation quantizers have no range yet (calibrate, or "
                        "fine-tune): their outputs are zeros", self.name,
                        len(self.uncalibrated()))
            self._warned = True

    @property
    def is_quantized(self) -> bool:
        return bool(self.quantizers)

    def copy(self) -> QuantizedModel:
        """An independent copy (params copied): to try two recipes from one start."""
        m = QuantizedModel(self.graph, {k: v.copy() for k, v in self.params.items()},
                           self.data_names, self.name)
        m.policy, m.table, m.notes = self.policy, list(self.table), list(self.notes)
        m.ranges, m.input_shape = dict(self.ranges), self.input_shape
        m.reports, m.sources = dict(self.reports), set(self.sources)
        return m

    def float_model(self) -> QuantizedModel:
        """The float network underneath (quantizers stripped), a new model."""
        g = strip_quantizers(self.graph)
        used = set(g.to_symbol().list_arguments()) | set(g.to_symbol().list_auxiliary_states())
        m = QuantizedModel(g, {k: v for k, v in self.params.items() if k in used},
                           self.data_names, self.name)
        m.input_shape, m.sources = self.input_shape, set(self.sources)
        return m

    def summary(self, title: str | None = None) -> str:
        """Markdown: what the passes did and one row per quantizer (layer, input, method,
        bits, granularity)."""
        lines = [f"# {title or self.name}", ""] + [f"- {n}" for n in self.notes]
        layers = {r["node"] for r in self.table}
        lines += [f"- {len(self.table)} quantizers on {len(layers)} layers", "",
                  "| layer | op | input | quantizer | method | bits | granularity |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['node']} | {r['op']} | {r['input']} | {r['quantizer']} | "
                  f"{r['method']} | {r['bits']} | {r['granularity']} |" for r in self.table]
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        return (f"QuantizedModel({self.name!r}, {sum(not n.is_var for n in self.graph.nodes)} "
                f"ops, {len(self.quantizers)} quantizers)")

    # -- stages ---------------------------------------------------------------------------
    def quantize(self, policy: QuantPolicy | str | Mapping | Path = "trt_int8",
                 fold_bn: str | None = None, relu6: bool = False) -> QuantizedModel:
        """Insert quantizers as ``policy`` says (a preset name, a dict, a JSON/YAML file or
        a ``QuantPolicy``); optionally fold BatchNorm (``deploy`` or ``qat``) and turn ReLU6
        into ReLU first.  Running it again does not double the quantizers.  For QAT pass
        ``policy.for_training()`` (what the default recipe does): methods that train better
        with other params than PTQ uses get them."""
        from .prepare import as_policy, quantize_graph

        pol = QuantPolicy.load(policy) if isinstance(policy, Path) else as_policy(policy)
        q = quantize_graph(self.graph, self.params, pol, fold_bn, relu6)
        self.graph, self.params, self.policy = q.graph, q.params, pol
        self.table, self.notes = q.table, self.notes + q.notes
        return self

    def calibrate(self, data, method: str = "auto", batch_size: int = 64,
                  input_method: str | None = "minmax", progress: bool = True,
                  **observer_params: Any) -> QuantizedModel:
        """Set every activation quantizer's range from ``data`` (an (N, ...) array, a list of
        batches, or a DataLoader of (x, y)): ``auto`` (default: per tensor, the range among
        the four below that least disturbs the layer reading it), ``minmax``,
        ``percentile``, ``mse``, ``entropy`` (TensorRT's), observed on the float network;
        or ``ema``, the quantizers' own running observation in training mode.  Learned
        ranges (a clip, a step, ...) start from the calibrated range."""
        from .calib.graph_calib import calibrate_graph

        batches = _batches(data, batch_size)
        if not batches:
            raise QuantOpsError("the calibration set is empty")
        if not self.is_quantized:
            raise QuantOpsError(f"{self.name}: nothing to calibrate: quantize() first")
        self.input_shape = self.input_shape or (1,) + tuple(batches[0].shape[1:])
        if method == "ema":
            self.params = self._observe(batches, progress)
            return self

        def run(batches):
            return calibrate_graph(self.run_graph, self.params, batches, method,
                                   data_name=self.data_names[0], progress=progress,
                                   input_method=input_method, **observer_params)

        fixed = self.input_shape[0]
        try:
            self.params, self.ranges = run(batches)
        except QuantOpsError as e:
            if len(batches[0]) == fixed or "do not fit the model" not in str(e):
                raise
            # a graph built for one batch size (a detector's proposals per image): feed
            # the images in batches of the size the model was given
            images = np.concatenate(batches)
            try:
                self.params, self.ranges = run([images[i:i + fixed]
                                                for i in range(0, len(images), fixed)])
            except QuantOpsError:
                raise e from None          # not the batch size: the first error says why
            log.info("%s: calibrated %d images at a time: the graph takes no other batch "
                     "size", self.name, fixed)
        return self

    def reestimate_bn(self, data, batch_size: int = 128) -> QuantizedModel:
        """Measure every BatchNorm's statistics again on ``data`` through the quantized
        network (``quant_ops.calib.bn_stats``): for weight methods that rescale weights."""
        from .calib.bn_stats import reestimate_bn

        batches = _batches(data, batch_size)
        if not batches:
            raise QuantOpsError("the data for BatchNorm statistics is empty")
        self.params, done = reestimate_bn(self.run_graph, self.params, batches,
                                          self.data_names[0])
        if done:
            self.notes.append(f"BatchNorm statistics measured again on "
                              f"{sum(len(b) for b in batches)} images: {len(done)} layers")
        return self

    def _observe(self, batches: list[np.ndarray], progress: bool) -> dict:
        from mxnet import autograd

        from .ops import set_training

        blk = self.to_block()
        with autograd.train_mode():
            for x in tqdm(batches, desc="calibration: ema", leave=False, disable=not progress):
                blk(mx.nd.array(x))
        mx.nd.waitall()
        set_training(blk, False)
        return {**self.params, **{k: p.data().asnumpy()
                                  for k, p in blk.collect_params().items()}}

    def predict(self, x: ArrayLike, batch_size: int = 500) -> np.ndarray:
        """The first output over ``x`` in inference mode."""
        x = as_numpy(x).astype(np.float32, copy=False)
        self._warn_uncalibrated()
        return predict(self.run_graph, self.params, x, batch_size, self.data_names[0])

    def evaluate(self, x, y: ArrayLike | None = None, batch_size: int = 500,
                 progress: bool = False) -> float:
        """Top-1 accuracy in percent on ``(x, y)`` arrays or an iterable of (x, y) batches."""
        if y is not None:
            x, y = as_numpy(x).astype(np.float32, copy=False), as_numpy(y).reshape(-1)
            if len(x) != len(y):
                raise QuantOpsError(f"evaluation set: {len(x)} inputs but {len(y)} labels")
            y = _checked_labels(x, y)
            return float((_checked_logits(self.predict(x, batch_size), y).argmax(1) == y)
                         .mean() * 100)
        self._warn_uncalibrated()
        correct = seen = 0
        runners: dict = {}
        graph = self.run_graph
        for xb, yb in tqdm(x, desc="eval", leave=False, disable=not progress):
            xb, yb = as_numpy(xb).astype(np.float32, copy=False), as_numpy(yb).reshape(-1)
            yb = _checked_labels(xb, yb)
            if xb.shape not in runners:
                runners[xb.shape] = Runner(graph, self.params, xb.shape,
                                           self.data_names[0])
            logits = _checked_logits(runners[xb.shape](xb)[0], yb)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(yb)
        if seen == 0:
            raise QuantOpsError("the evaluation set is empty")
        return 100.0 * correct / seen

    # -- training (Gluon) ---------------------------------------------------------------
    def to_block(self) -> gluon.SymbolBlock:
        """A trainable Gluon block of the graph, its parameters loaded from this model and
        its quantizers following ``autograd.is_training()``."""
        from .ops import track_training

        sym = without_loss(self.graph, logits=True).to_symbol()   # Gluon losses want logits
        blk = gluon.SymbolBlock(sym, [mx.sym.var(n, dtype="float32") for n in self.data_names])
        for k, p in blk.collect_params().items():
            if k not in self.params:
                raise QuantOpsError(f"{self.name}: no value for parameter '{k}'")
            p._load_init(mx.nd.array(self.params[k]), mx.cpu())
        blk.quant_table = self.table
        return track_training(blk)

    def from_block(self, block: gluon.Block) -> QuantizedModel:
        """Take the values of a block made by ``to_block`` (after training) back."""
        values = {k: p.data().asnumpy() for k, p in block.collect_params().items()
                  if p._data is not None}
        unknown = [k for k in values if k not in self.params]
        if unknown:
            raise QuantOpsError(f"{self.name}: the block has parameters this model does not: "
                                f"{', '.join(unknown[:5])}")
        self.params.update(values)
        return self

    def fit(self, train, val=None, cfg=None) -> dict:
        """Fine-tune (QAT) with ``quant_ops.train.fit``; the trained values come back into
        this model.  Returns the progress record."""
        from .ops import set_training
        from .train.loop import fit

        blk = self.to_block()
        progress = fit(blk, train, val, cfg)
        set_training(blk, False)
        self.from_block(blk)
        return progress

    # -- PTQ beyond calibration -----------------------------------------------------------
    def easyquant(self, data, batch_size: int = 64, **kwargs: Any) -> QuantizedModel:
        """EasyQuant's weight and activation scale search (``quant_ops.ptq.easyquant``);
        its per-layer report is kept in ``reports["easyquant"]``."""
        from .ptq.easyquant import easyquant

        self.params, self.reports["easyquant"] = easyquant(
            self.run_graph, self.params, _batches(data, batch_size),
            data_name=self.data_names[0], **kwargs)
        return self

    def adaround(self, data, batch_size: int = 64, **kwargs: Any) -> QuantizedModel:
        """AdaRound's learned rounding of the weights (``quant_ops.ptq.adaround``) on a
        quantized, calibrated model: the rounding is folded into the weights, so the model
        stays an ordinary one.  Its per-layer report is kept in ``reports["adaround"]``."""
        from .ptq.adaround import adaround

        return self._learn("AdaRound", "adaround", adaround, data, batch_size, kwargs)

    def brecq(self, data, batch_size: int = 64, **kwargs: Any) -> QuantizedModel:
        """Block reconstruction (BRECQ with QDrop, ``quant_ops.ptq.brecq``) on a quantized,
        calibrated model: each residual block or layer chain learns its weights' rounding
        and its activation steps together; both are folded into the params, so the model
        stays an ordinary one.  Its per-block report is kept in ``reports["brecq"]``."""
        from .ptq.brecq import brecq

        return self._learn("Block reconstruction", "brecq", brecq, data, batch_size, kwargs)

    def _learn(self, what: str, key: str, fn: Callable, data, batch_size: int,
               kwargs: dict) -> QuantizedModel:
        """Run a PTQ pass that learns toward the calibrated model's own outputs."""
        if not self.is_quantized or self.uncalibrated():
            raise QuantOpsError(f"{self.name}: {what} learns toward the quantized network's "
                                "own outputs: quantize() and calibrate() first"
                                + (f" ({len(self.uncalibrated())} activation quantizers have "
                                   "no range)" if self.is_quantized else ""))
        self.params, self.reports[key] = fn(self.run_graph, self.params,
                                            _batches(data, batch_size),
                                            data_name=self.data_names[0], **kwargs)
        return self

    def mixed_precision(self, data, budget: float, widths: Sequence[int] = (2, 3, 4, 6, 8),
                        base: Mapping | None = None, fold_bn: str | None = "deploy",
                        batch_size: int = 64, progress: bool = True) -> dict:
        """A policy giving each layer's weights the bits that least hurt the output at an
        average of ``budget`` bits per weight (``quant_ops.ptq.mixed``), for a float model:
        ``m.quantize(m.mixed_precision(data, 4), fold_bn="deploy")``.  The per-layer
        errors and choices are kept in ``reports["mixed_precision"]``."""
        from .ptq.mixed import mixed_policy

        if self.is_quantized:
            raise QuantOpsError(f"{self.name}: mixed precision chooses bits for a float "
                                "model: call it before quantize()")
        base = dict(base or {"preset": "trt_int8"})
        q = self.copy().quantize(base, fold_bn=fold_bn)
        policy, self.reports["mixed_precision"] = mixed_policy(
            q.run_graph, q.params, _batches(data, batch_size), budget, widths, base,
            data_name=self.data_names[0], progress=progress)
        return policy

    def dfq(self, **kwargs: Any) -> QuantizedModel:
        """Data-free quantization passes on the float network (``quant_ops.ptq.dfq``); run
        it before ``quantize``.  What each step did is kept in ``reports["dfq"]``."""
        from .ptq.dfq import apply_dfq

        if self.is_quantized:
            raise QuantOpsError(f"{self.name}: DFQ rewrites the float network: run it before "
                                "quantize()")
        report = kwargs.pop("report", None)
        report = {} if report is None else report
        self.graph, self.params = apply_dfq(self.graph, self.params,
                                            data_name=self.data_names[0], report=report,
                                            **kwargs)
        self.reports["dfq"] = report
        return self

    # -- writing ----------------------------------------------------------------------------
    def save(self, prefix: str | Path, epoch: int = 0) -> tuple[Path, Path]:
        """``<prefix>-symbol.json`` and ``<prefix>-NNNN.params`` (``arg:``/``aux:``
        prefixes), both or neither; ``SymbolBlock.imports``, ``utils/graph_optimize.py``
        and ``utils/export_onnx.py`` read them."""
        prefix = Path(prefix).resolve()      # the paths returned are where the files are
        sym_name, par_name = f"{prefix.name}-symbol.json", f"{prefix.name}-{epoch:04d}.params"
        self._not_over_sources(prefix.parent, [sym_name, par_name])
        with staged_dir(prefix.parent) as tmp:
            (tmp / sym_name).write_text(self.graph.to_json(), encoding="utf-8")
            save_params(tmp / par_name, self.graph.to_symbol(), self.params)
        return prefix.parent / sym_name, prefix.parent / par_name

    def _not_over_sources(self, folder: Path, names: Sequence[str]) -> None:
        """Refuse to write ``names`` into ``folder`` where one is a file this model was
        read from: inputs are never overwritten."""
        for n in names:
            if (Path(folder) / n).resolve() in self.sources:
                raise QuantOpsError(f"{Path(folder) / n}: this model was read from it; write "
                                    "to another prefix or folder (inputs are never "
                                    "overwritten)")

    def to_mxnet_int8(self, data: ArrayLike | None = None, method: str = "entropy"):
        """MXNet's own INT8 graph (oneDNN kernels) with this model's ranges and weights,
        which a stock mxnet runs without this package (``.block()``, ``.save(prefix)``).
        ``data`` (a few calibration images) gives ranges, by ``method``, to the tensors
        MXNet quantizes that this model keeps in float (residual branches, a pooled
        output).  ``quant_ops.export.mxnet_int8`` says where it differs from the simulation."""
        from .export.mxnet_int8 import to_mxnet_int8

        x = None if data is None else as_numpy(data).astype(np.float32)
        return to_mxnet_int8(self.run_graph, self.params, self.data_names[0], x, method)

    def export(self, out_dir: str | Path, name: str | None = None,
               input_shape: Sequence[int] | None = None, opset: int = 13,
               trt_version: int = 8601, check_input: ArrayLike | None = None,
               activations: str = "s8", mxnet_int8: bool = False,
               data: ArrayLike | None = None):
        """ONNX QDQ, TensorRT calibration cache, ranges JSON and the alignment report
        (MXNet against onnxruntime on ``check_input``, default uniform noise), all or none.
        ``activations="u8"`` writes signed activation codes as uint8 with zero point 128 (the
        same values; onnxruntime's fast kernels on x86; ``cpu_int8``'s unsigned ones are
        uint8 with zero point 0 either way).  ``mxnet_int8`` adds MXNet's native INT8
        model (``<name>-int8-symbol.json`` and ``-0000.params``, see ``to_mxnet_int8``;
        ``data`` as there).  Returns the ``Exported`` record with ``alignment`` set."""
        from .export import export_model
        from .export.align import check_alignment

        shape = tuple(input_shape or (np.shape(check_input) if check_input is not None
                                      else self.input_shape or ()))
        if not shape:
            raise QuantOpsError(f"{self.name}: give input_shape (or calibrate first, which "
                                "records it)")
        name = plain_name(name or self.name, "export name")
        self.check_input_shape(shape)
        x = (as_numpy(check_input).astype(np.float32) if check_input is not None else
             np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32))
        out = Path(out_dir)
        self._not_over_sources(out, [f"{name}{ext}" for ext in (
            ".onnx", ".calib.cache", ".ranges.json", ".alignment.json", "-int8-symbol.json",
            "-int8-0000.params")])
        with staged_dir(out) as tmp:
            ex = export_model(self.run_graph, self.params, tmp, name, {self.data_names[0]: shape},
                              opset, trt_version, activations)
            report = check_alignment(ex.onnx, ex.graph, ex.params, {self.data_names[0]: x})
            atomic_write_text(tmp / f"{name}.alignment.json", json.dumps(report, indent=1))
            if mxnet_int8:
                self.to_mxnet_int8(data).save(tmp / f"{name}-int8")
        ex.onnx, ex.cache, ex.ranges_json = (out / ex.onnx.name, out / ex.cache.name,
                                             out / ex.ranges_json.name)
        ex.alignment = report
        return ex


def quantize(model: QuantizedModel | gluon.HybridBlock, preset: str = "trt_int8",
             sample: ArrayLike | None = None, **kwargs: Any) -> QuantizedModel:
    """One call from a float network to a quantized model (MQBench's
    ``prepare_by_platform``): ``quant_ops.quantize(net, "trt_int8", sample=x)``."""
    if not isinstance(model, QuantizedModel):
        if not isinstance(model, gluon.HybridBlock):
            raise QuantOpsError(f"quantize() takes a QuantizedModel or a Gluon HybridBlock, "
                                f"not {type(model).__name__}")
        model = QuantizedModel.from_gluon(model, sample)
    return model.quantize(preset, **kwargs)
