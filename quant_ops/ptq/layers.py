"""A quantized network's layers (Convolution, FullyConnected, Deconvolution) as matrix
products on a sample of their output positions: which layers, their geometry, the float
network's outputs at the sampled positions and the quantized network's input patches
there.  The PTQ searches that work layer by layer (EasyQuant's scale search, AdaRound's
rounding) compute on these instead of running MXNet for every candidate."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from .. import methods
from ..calib.graph_calib import activation_tensors
from ..errors import QuantOpsError
from ..graph.ir import Graph, Node, flag
from ..graph.params import as_numpy
from ..graph.quantizers import through_copies
from ..graph.runner import bind
from ..reference import abs_max, fake_quant
from .common import runner

log = logging.getLogger(__name__)

f32 = np.float32
LAYER_OPS = ("Convolution", "FullyConnected", "Deconvolution")
#: quantizers whose scale EasyQuant searches: y = clamp(rint(x / s)) * s, s = range / qmax
LINEAR_OPS = frozenset(m.op for m in methods.REGISTRY.values() if m.linear)


@dataclass
class Geometry:
    """A layer as a convolution: patches of ``groups * k`` values give ``groups * og``
    outputs.  A deconvolution is the convolution of its zero-dilated, padded input with
    the flipped, transposed kernel; a fully connected layer is a 1x1 convolution."""

    op: str
    kernel: tuple = ()
    stride: tuple = ()
    dilate: tuple = ()
    pad: tuple = ()
    adj: tuple = ()
    groups: int = 1
    flatten: bool = True

    def out_spatial(self, spatial: tuple) -> tuple:
        if self.op == "Deconvolution":
            return tuple((h - 1) * s - 2 * p + d * (k - 1) + 1 + a for h, s, p, d, k, a in
                         zip(spatial, self.stride, self.pad, self.dilate, self.kernel,
                             self.adj))
        return tuple((h + 2 * p - d * (k - 1) - 1) // s + 1 for h, s, p, d, k in
                     zip(spatial, self.stride, self.pad, self.dilate, self.kernel))


@dataclass
class Layer:
    index: int
    name: str
    op: str
    geo: Geometry
    weight: str                      # param name of the weight
    bias: str | None
    act_q: str | None = None         # input quantizer (a linear one) and its state
    minmax: str | None = None
    tensor: str | None = None        # the tensor the input quantizer reads
    entry: tuple | None = None       # the same as a graph entry (node, output)
    act_bits: int = 8
    w_q: str | None = None           # weight quantizer
    w_bits: int = 8
    w_axis: int | None = None        # channel axis of a per-channel weight quantizer
    w_search: bool = False           # weight is a plain variable read by this layer only
    # filled while searching
    per_image: int = 1               # output rows per image
    out_spatial: tuple = ()
    flat: np.ndarray | None = None   # sampled rows, flat over (image, out position)
    rows: list = field(default_factory=list)     # per batch: rows in patches' form
    out: np.ndarray | None = None    # float outputs at the sampled rows, (groups, rows, og),
    #                                  float64 (the cosine's sums)
    x: np.ndarray | None = None      # quantized-network inputs there, (rows, groups, k)


def _ints(text: str | None, n: int, default: int) -> tuple:
    """An MXNet tuple attribute such as ``(1, 1)``; missing or empty: ``n`` defaults."""
    vals = tuple(int(v) for v in (text or "").strip("()[] ").replace(" ", "").split(",") if v)
    return vals if vals else (default,) * n


def _geometry(node) -> Geometry | str:
    """The layer's geometry, or why it cannot be simulated."""
    a = node.attrs
    if node.op == "FullyConnected":
        return Geometry("FullyConnected", flatten=flag(a, "flatten", True))
    if a.get("layout") not in (None, "None", "NCW", "NCHW", "NCDHW"):
        return f"layout {a.get('layout')} (only channels-first is simulated)"
    kernel = _ints(a.get("kernel"), 0, 1)
    nd = len(kernel)
    if nd == 0:
        return "no kernel attribute"
    if node.op == "Deconvolution" and a.get("target_shape", "").strip("()[] ,0") != "":
        return "target_shape is set (the padding is then implicit)"
    geo = Geometry(node.op, kernel, _ints(a.get("stride"), nd, 1), _ints(a.get("dilate"), nd, 1),
                    _ints(a.get("pad"), nd, 0), _ints(a.get("adj"), nd, 0),
                    int(a.get("num_group", "1")))
    if any(len(v) != nd for v in (geo.stride, geo.dilate, geo.pad, geo.adj)):
        return "stride/dilate/pad/adj do not match the kernel's dimensions"
    return geo


def _source_var(graph: Graph, entry) -> int | None:
    """Index of the variable behind ``entry`` (through a gradient-sum copy), else None."""
    entry = through_copies(graph, entry)
    return entry[0] if graph.nodes[entry[0]].is_var else None


def _tensor_name(graph: Graph, entry, names: set) -> str:
    """MXNet's internal name of the tensor at ``entry`` (a gradient-sum copy looked through)."""
    entry = through_copies(graph, entry)
    node = graph.nodes[entry[0]]
    if node.is_var:
        return node.name
    for key in (f"{node.name}_output", f"{node.name}_output{entry[1]}"):
        if key in names:
            return key
    raise QuantOpsError(f"{graph.source}: no tensor for output {entry[1]} of node '{node.name}'")


def find_layers(graph: Graph, who: str = "ptq") -> tuple[list, list]:
    """The layers to search (in topological order) and [(name, why)] of those skipped."""
    acts = activation_tensors(graph)
    names = set(graph.to_symbol().get_internals().list_outputs())
    weight_users: dict = {}
    for n in graph.nodes:
        if n.op in LAYER_OPS and len(n.inputs) > 1:
            weight_users.setdefault(n.inputs[1][0], []).append(n.name)
    layers, skipped = [], []
    for i, n in graph.ops():
        if n.op not in LAYER_OPS or len(n.inputs) < 2:
            continue
        dq, wq = graph.nodes[n.inputs[0][0]], graph.nodes[n.inputs[1][0]]
        ops = (dq.op, wq.op)
        if not LINEAR_OPS.intersection(ops):
            if any(methods.is_quantizer(op) for op in ops):
                skipped.append((n.name, f"its quantizers are not linear ({', '.join(sorted(LINEAR_OPS))})"))
            continue
        geo = _geometry(n)
        if isinstance(geo, str):
            skipped.append((n.name, geo))
            continue
        w_var = _source_var(graph, wq.inputs[0] if wq.op in LINEAR_OPS else n.inputs[1])
        if w_var is None:
            skipped.append((n.name, "its weight is computed in the graph, not a parameter"))
            continue
        no_bias = flag(n.attrs, "no_bias", n.op == "Deconvolution")
        bias = None
        if not no_bias and len(n.inputs) > 2:
            b_var = _source_var(graph, n.inputs[2])
            if b_var is None:
                skipped.append((n.name, "its bias is computed in the graph, not a parameter"))
                continue
            bias = graph.nodes[b_var].name
        layer = Layer(i, n.name, n.op, geo, graph.nodes[w_var].name, bias)
        data_entry = n.inputs[0]
        if dq.op in LINEAR_OPS:
            layer.act_q = dq.name
            layer.minmax = acts[dq.name][1]
            layer.act_bits = int(dq.attrs.get("nbits", "8"))
            data_entry = dq.inputs[0]
        layer.tensor = _tensor_name(graph, data_entry, names)
        layer.entry = tuple(through_copies(graph, data_entry)[:2])
        if wq.op in LINEAR_OPS:
            layer.w_q = wq.name
            layer.w_bits = int(wq.attrs.get("nbits", "8"))
            wm = methods.of_op(wq.op)
            layer.w_axis = int(wq.attrs.get("channel_axis", "0")) if wm.per_axis(wq.attrs) \
                else None
            users = weight_users.get(n.inputs[1][0], [])
            layer.w_search = len(users) == 1
            if not layer.w_search:
                log.info("%s: weight quantizer '%s' is read by %s: its scale is kept",
                         who, wq.name, ", ".join(users))
        layers.append(layer)
    return layers, skipped


def channel_view(w: np.ndarray, axis: int | None) -> np.ndarray:
    """The weight as (scale channels, rest)."""
    return w.reshape(1, -1) if axis is None else np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def as_conv(w: np.ndarray, geo: Geometry) -> np.ndarray:
    """Weights (candidates, *layout) as convolution matrices (candidates, groups, og, k)."""
    p = w.shape[0]
    if geo.op == "FullyConnected":
        return w.reshape(p, 1, w.shape[1], -1)
    g = geo.groups
    if geo.op == "Convolution":
        return w.reshape(p, g, w.shape[1] // g, -1)
    cin, og = w.shape[1], w.shape[2]                       # deconv: (in, out/groups, *k)
    w = w.reshape((p, g, cin // g, og) + w.shape[3:]).swapaxes(2, 3)
    w = np.flip(w, axis=tuple(range(4, w.ndim)))
    return w.reshape(p, g, og, -1)


def nearest_weight(w: np.ndarray, layer: Layer, bits: int | None = None) -> np.ndarray:
    """``w`` as the layer's linear weight quantizer gives it (max|W| per scale channel,
    nearest rounding, narrow range) at ``bits`` (default: the quantizer's)."""
    w = np.asarray(w, f32)
    return fake_quant(w, abs_max(w, layer.w_axis), layer.w_bits if bits is None else bits,
                      narrow=True, axis=layer.w_axis)


def layer_bias(layer: Layer, params: dict, groups: int, og: int, dtype=f32) -> np.ndarray:
    """The layer's bias as (groups, og), zeros for a layer without one."""
    if layer.bias is None:
        return np.zeros((groups, og), dtype)
    return as_numpy(params[layer.bias]).astype(dtype).reshape(groups, og)


def scale_channel(layer: Layer, out_channels: int) -> np.ndarray:
    """Which weight scale each output channel uses."""
    if layer.w_axis is None:
        return np.zeros(out_channels, np.int64)
    if layer.op == "Deconvolution":                        # axis 1 holds out/groups channels
        return np.arange(out_channels) % (out_channels // layer.geo.groups)
    return np.arange(out_channels)


def patches(x: np.ndarray, rows, geo: Geometry) -> np.ndarray:
    """The layer's input patches at the sampled output rows: (rows, groups, k)."""
    if geo.op == "FullyConnected":
        m = x.reshape(len(x), -1) if geo.flatten else x.reshape(-1, x.shape[-1])
        return m[rows][:, None, :]
    img, pos = rows
    nd = len(geo.kernel)
    if geo.op == "Deconvolution":
        z = np.zeros(x.shape[:2] + tuple((h - 1) * s + 1 for h, s in
                                         zip(x.shape[2:], geo.stride)), x.dtype)
        z[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in geo.stride)] = x
        lo = [d * (k - 1) - p for d, k, p in zip(geo.dilate, geo.kernel, geo.pad)]
        hi = [v + a for v, a in zip(lo, geo.adj)]
        z = np.pad(z, [(0, 0), (0, 0)] + [(max(a, 0), max(b, 0)) for a, b in zip(lo, hi)])
        x = z[(slice(None), slice(None)) + tuple(slice(max(-a, 0), z.shape[2 + i] - max(-b, 0))
                                                 for i, (a, b) in enumerate(zip(lo, hi)))]
        stride = (1,) * nd
    else:
        x = np.pad(x, [(0, 0), (0, 0)] + [(p, p) for p in geo.pad])
        stride = geo.stride
    taps = np.stack(np.meshgrid(*[np.arange(k) for k in geo.kernel], indexing="ij"),
                    -1).reshape(-1, nd)                    # (T, nd), kernel order
    coords = pos[:, None, :] * np.array(stride) + taps[None] * np.array(geo.dilate)
    p = x[(img[:, None], slice(None)) + tuple(coords[..., d] for d in range(nd))]  # (R, T, C)
    r, t, c = p.shape
    return np.ascontiguousarray(p.transpose(0, 2, 1)).reshape(r, geo.groups, (c // geo.groups) * t)


def out_rows(y: np.ndarray, rows, geo: Geometry) -> np.ndarray:
    """The layer's outputs at the sampled rows: (rows, channels)."""
    if geo.op == "FullyConnected":
        m = y.reshape(len(y), -1) if geo.flatten else y.reshape(-1, y.shape[-1])
        return m[rows]
    img, pos = rows
    return y[(img, slice(None)) + tuple(pos[:, d] for d in range(pos.shape[1]))]


def sample_rows(total: int, k: int, rng, max_rows: int, max_elements: int) -> np.ndarray:
    """Sorted flat indices of the sampled output rows: at most ``max_rows`` rows and about
    ``max_elements`` patch values (never fewer than 256 rows)."""
    want = int(min(total, max_rows, max(256, max_elements // max(k, 1))))
    if want >= total:
        return np.arange(total)
    return np.sort(rng.choice(total, want, replace=False))


def inference_params(graph: Graph, params: dict) -> dict:
    """Params as numpy with every quantizer in inference mode (a QAT checkpoint may hold
    training = 1 in its ``qstate``, which would move the ranges while we run)."""
    run = {k: as_numpy(v) for k, v in params.items()}
    for n in graph.nodes:
        if n.op in LINEAR_OPS and len(n.inputs) > 2:
            key = graph.nodes[n.inputs[2][0]].name
            if key in run:
                qs = np.array(run[key], f32).reshape(-1)
                qs[1:2] = 0
                run[key] = qs
    return run


def _split_rows(ly: Layer, start: int, n: int):
    """The sampled rows that fall in images [start, start + n), in ``patches``' form."""
    lo, hi = np.searchsorted(ly.flat, [start * ly.per_image, (start + n) * ly.per_image])
    local = ly.flat[lo:hi] - start * ly.per_image
    if ly.op == "FullyConnected":
        return local
    loc = np.unravel_index(local, (n,) + tuple(ly.out_spatial))
    return loc[0], np.stack(loc[1:], 1)


def float_outputs(layers: list, fgraph: Graph, run_params: dict, batches: list,
                  data_name: str, rng, max_rows: int, max_elements: int,
                  progress: bool, who: str = "ptq") -> None:
    """Sample each layer's output rows and keep the float network's outputs there."""
    n_images = sum(len(b) for b in batches)
    runners: dict = {}
    names = [f"{ly.name}_output" for ly in layers]
    parts: list = [[] for _ in layers]
    start = 0
    for b in tqdm(batches, desc=f"{who}: float outputs", leave=False, disable=not progress):
        if b.shape not in runners:
            runners[b.shape] = runner(fgraph, run_params, b.shape, data_name, names)
        for j, (ly, y) in enumerate(zip(layers, runners[b.shape](b))):
            if ly.flat is None:
                if ly.op == "FullyConnected":
                    ly.per_image = 1 if ly.geo.flatten else int(np.prod(y.shape[1:-1]))
                else:
                    ly.out_spatial = tuple(y.shape[2:])
                    ly.per_image = int(np.prod(ly.out_spatial))
                w = as_numpy(run_params[ly.weight])          # k: input values per output row
                k = w.size // w.shape[1] if ly.op == "Deconvolution" else \
                    (w.size // w.shape[0]) * (ly.geo.groups if ly.op == "Convolution" else 1)
                ly.flat = sample_rows(n_images * ly.per_image, k, rng, max_rows, max_elements)
            ly.rows.append(_split_rows(ly, start, len(b)))
            parts[j].append(out_rows(y, ly.rows[-1], ly.geo))
        start += len(b)
    for ly, p in zip(layers, parts):
        o = np.concatenate(p).astype(np.float64)                 # (R, channels)
        g = 1 if ly.op == "FullyConnected" else ly.geo.groups
        ly.out = np.ascontiguousarray(o.reshape(len(o), g, -1).transpose(1, 0, 2))


def quantized_inputs(unit: list, graph: Graph, run_params: dict, batches: list,
                     data_name: str, who: str = "ptq",
                     cache: QuantizedTensors | None = None) -> None:
    """Each layer's input patches at its sampled rows, from the quantized network with the
    params as optimized so far (with ``cache``: only the part of the network that changed
    since the tensors it holds were computed is run)."""
    tensors = sorted({ly.tensor for ly in unit if ly.tensor != data_name})
    if cache is not None:
        per_batch = cache.get([ly.entry for ly in unit])
    runners: dict = {}
    parts: list = [[] for _ in unit]
    for bi, b in enumerate(batches):
        vals = {data_name: b}
        if cache is not None:
            vals.update((ly.tensor, per_batch[ly.entry][bi]) for ly in unit)
        elif tensors:
            if b.shape not in runners:
                runners[b.shape] = runner(graph, run_params, b.shape, data_name, tensors)
            vals.update(zip(tensors, runners[b.shape](b)))
        for j, ly in enumerate(unit):
            x = vals[ly.tensor]
            if bi == 0 and ly.op != "FullyConnected" and \
                    ly.geo.out_spatial(x.shape[2:]) != ly.out_spatial:
                raise QuantOpsError(f"{who}: layer '{ly.name}': the simulated output "
                                    f"{ly.geo.out_spatial(x.shape[2:])} differs from "
                                    f"MXNet's {ly.out_spatial}")
            parts[j].append(patches(np.asarray(x, f32), ly.rows[bi], ly.geo))
    for ly, p in zip(unit, parts):
        ly.x = np.concatenate(p).astype(f32)


class QuantizedTensors:
    """Tensors of the quantized network on the calibration batches, kept between the layers
    of a layer-by-layer search: a request runs only the nodes between the tensors still
    valid and the ones asked for (MXNet, unfused, as ``runner`` does), instead of the whole
    network up to them, which made the searches quadratic in the depth.  Call
    :meth:`changed` with the params the search changed; ``run_params`` is read at each run."""

    def __init__(self, graph: Graph, run_params: dict, batches: list,
                 data_name: str = "data") -> None:
        self.graph, self.params, self.batches = graph, run_params, batches
        self.data_name = data_name
        self._uses = graph.consumers()
        self._values: dict = {}          # (node, output) -> one array per batch

    def changed(self, names) -> None:
        """Forget every tensor computed from the params ``names``."""
        index = self.graph.index()
        stale, todo = set(), [index[n] for n in names if n in index]
        while todo:
            i = todo.pop()
            if i not in stale:
                stale.add(i)
                todo.extend(u for u in self._uses.get(i, []) if u >= 0)
        self._values = {e: v for e, v in self._values.items() if e[0] not in stale}

    def get(self, entries: list) -> dict:
        """{entry: per-batch arrays} for graph entries (node, output)."""
        entries = [tuple(e[:2]) for e in entries]
        data = {e for e in entries if self.graph.nodes[e[0]].name == self.data_name}
        missing = sorted(set(entries) - set(self._values) - data)
        if missing:
            self._run(missing)
        return {e: (self.batches if e in data else self._values[e]) for e in entries}

    def _segment(self, targets: list) -> tuple[list, list]:
        """(operator nodes to run, held entries they read), walking back from ``targets``."""
        nodes, held, todo = set(), set(), list(targets)
        while todo:
            e = tuple(todo.pop()[:2])
            node = self.graph.nodes[e[0]]
            if e in self._values:
                held.add(e)
            elif not node.is_var and e[0] not in nodes:
                nodes.add(e[0])
                todo.extend(node.inputs)
        return sorted(nodes), sorted(held)

    def _run(self, targets: list) -> None:
        nodes, held = self._segment(targets)
        inside = set(nodes)
        # also keep what later nodes read from this segment (a residual branch's input)
        keep = sorted(set(targets) | {tuple(e[:2]) for i, n in enumerate(self.graph.nodes)
                                      if i not in inside for e in n.inputs
                                      if e[0] in inside})
        graph, feeds = self._subgraph(nodes, held, keep)
        sym = graph.to_symbol()
        args = set(sym.list_arguments())
        exes: dict = {}
        out: list = [[] for _ in keep]
        for bi, b in enumerate(self.batches):
            vals = {self.data_name: b}
            vals.update((name, self._values[e][bi]) for e, name in feeds.items())
            vals = {k: v for k, v in vals.items() if k in args}
            shapes = tuple(sorted((k, np.shape(v)) for k, v in vals.items()))
            if shapes not in exes:
                exes[shapes] = bind(sym, self.params, {k: tuple(s) for k, s in shapes},
                                    fusion=False, source=self.graph.source)
            exe = exes[shapes]
            for k, v in vals.items():
                exe.arg_dict[k][:] = v
            for j, o in enumerate(exe.forward(is_train=False)):
                out[j].append(o.asnumpy())
        self._values.update(zip(keep, out))
        # the layers come in graph order: a tensor none of whose readers lies beyond this
        # run's targets would only hold memory (one dropped too early is computed again)
        pos = max(e[0] for e in targets)
        self._values = {e: v for e, v in self._values.items()
                        if e in held or e in keep or max(self._uses.get(e[0], [-1])) > pos}

    def _subgraph(self, nodes: list, held: list, keep: list) -> tuple[Graph, dict]:
        """The nodes as a graph whose inputs are the held entries (variables), the params'
        variables and the data; its outputs are ``keep``."""
        new_nodes, new, feeds = [], {}, {}
        for e in held:
            feeds[e] = f"qo_held_{e[0]}_{e[1]}"
            new[e] = len(new_nodes)
            new_nodes.append(Node("null", feeds[e]))

        def at(e):
            e = tuple(e[:2])
            if e in new:
                return [new[e], 0, 0]
            if self.graph.nodes[e[0]].is_var and (e[0], -1) not in new:
                new[(e[0], -1)] = len(new_nodes)
                new_nodes.append(Node("null", self.graph.nodes[e[0]].name,
                                      dict(self.graph.nodes[e[0]].attrs)))
            if self.graph.nodes[e[0]].is_var:
                return [new[(e[0], -1)], 0, 0]
            return [new[(e[0], None)], e[1], 0]

        for i in nodes:
            n = self.graph.nodes[i]
            inputs = [at(e) for e in n.inputs]
            new[(i, None)] = len(new_nodes)
            new_nodes.append(Node(n.op, n.name, dict(n.attrs), inputs))
        heads = [at(e) for e in keep]
        return Graph(new_nodes, heads, dict(self.graph.attrs), self.graph.source), feeds
