"""Data-Free Quantization (Nagel et al. 2019, arXiv 1906.04721) on a float (graph, params).

The paper's point: a float model whose per-tensor quantized weights lose accuracy (MobileNet's
depthwise convs have output channels whose ranges differ by orders of magnitude) can be
repaired without data and without training, by transformations that keep the float function:

1. ReLU6 -> ReLU (cross-layer equalization needs ``f(s x) = s f(x)`` for ``s > 0``);
2. BatchNorm folded for deployment, its ``beta``/``gamma`` kept: they describe each folded
   layer's pre-activation as ``N(beta, gamma^2)``, the only "data" the later steps need;
3. cross-layer equalization (CLE): output channel ``i`` of a layer is divided by ``s_i`` and
   the next layer's input channel ``i`` multiplied by it, ``s_i = sqrt(r1_i r2_i) / r2_i``, so
   both channels end up with range ``sqrt(r1_i r2_i)``;
4. high-bias absorption: ``c = max(0, beta - 3 gamma)`` leaves a layer's bias for the next
   layer's (``relu(x - c) + c == relu(x)`` wherever ``x >= c``), shrinking activation ranges;
5. bias correction: the expected output error of quantized weights, ``(Q(W) - W) E[x]``, is
   taken out of the bias, with ``E[x]`` from the BN statistics (clipped normal after ReLU)
   or measured on calibration batches;
6. optional weight clipping to ``[-t, t]`` (the paper clips at 15 after CLE).

Where a rescale would change the function it is skipped, and the reason is reported: a tensor
with more than one consumer (a residual block's output feeds both the next block and the
skip-add, so scaling it would unbalance the add), an add/concat/other op between the layers,
a layer whose weight is shared, a graph output.  Every function returns new objects: the
graph and params passed in are never modified.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import mxnet as mx
import numpy as np
from tqdm import tqdm

from ..errors import QuantOpsError
from ..graph.fold_bn import _bn_arrays, _pairs, fold_batchnorm
from ..graph.ir import Graph, Node, flag
from ..graph.params import as_numpy
from ..graph.relu6 import _is_relu6, relu6_to_relu
from ..policy import QuantPolicy, QuantSpec
from ..prepare import as_policy
from .common import runner

log = logging.getLogger(__name__)

LAYERS = ("Convolution", "FullyConnected")
#: the paper's default weight quantizer: one INT8 scale per tensor (where DFQ matters most)
DEFAULT_POLICY = {"preset": "trt_int8", "weight": {"per_channel": False}}
ADD_OPS = ("elemwise_add", "_Plus", "_plus", "_add")
BIAS_CORRECTION_MODES = ("data_free", "empirical", None)

Stats = dict  # layer name -> (beta, sigma): the layer's output pre-activation ~ N(beta, sigma^2)


# -- small helpers -------------------------------------------------------------------------
def _np_params(params: dict) -> dict:
    """A private copy of every param as a numpy array (never a view of the caller's)."""
    return {k: as_numpy(v).copy()
            for k, v in params.items()}


def _copy_graph(graph: Graph) -> Graph:
    return Graph([Node(n.op, n.name, dict(n.attrs), [list(e) for e in n.inputs])
                  for n in graph.nodes], [list(h) for h in graph.heads], dict(graph.attrs),
                 graph.source)


def _is_relu(n: Node) -> bool:
    return (n.op == "Activation" and n.attrs.get("act_type") == "relu") or n.op == "relu"


@dataclass(frozen=True)
class _Layer:
    """A Convolution / FullyConnected node and the variables holding its weight and bias."""
    index: int
    name: str
    op: str
    weight: str
    bias: str | None
    groups: int

    @property
    def is_fc(self) -> bool:
        return self.op == "FullyConnected"


def _layer(graph: Graph, i: int, params: dict) -> _Layer:
    n = graph.nodes[i]
    if len(n.inputs) < 2:
        raise QuantOpsError(f"{graph.source}: '{n.name}' ({n.op}) has no weight input")
    w = graph.nodes[n.inputs[1][0]]
    if not w.is_var:
        raise QuantOpsError(f"{graph.source}: the weight of '{n.name}' is computed by "
                            f"'{w.name}' ({w.op}), not a parameter: DFQ works on a float graph "
                            "before quantizers are inserted")
    if w.name not in params:
        raise QuantOpsError(f"{graph.source}: weight '{w.name}' of '{n.name}' is not in the "
                            "params")
    bias = None
    if not flag(n.attrs, "no_bias", False) and len(n.inputs) > 2:
        b = graph.nodes[n.inputs[2][0]]
        if not b.is_var:
            raise QuantOpsError(f"{graph.source}: the bias of '{n.name}' is computed by "
                                f"'{b.name}' ({b.op}), not a parameter")
        if b.name not in params:
            raise QuantOpsError(f"{graph.source}: bias '{b.name}' of '{n.name}' is not in the "
                                "params")
        bias = b.name
    groups = int(n.attrs.get("num_group", "1")) if n.op == "Convolution" else 1
    return _Layer(i, n.name, n.op, w.name, bias, groups)


def _layers(graph: Graph, params: dict) -> list:
    """Every Convolution / FullyConnected of the graph; a graph without one is an error."""
    found = [_layer(graph, i, params) for i, n in graph.ops() if n.op in LAYERS]
    if not found:
        raise QuantOpsError(f"{graph.source}: no Convolution or FullyConnected layer: nothing "
                            "for DFQ to work on")
    return found


def _channel_first(n: Node) -> bool:
    if n.op == "FullyConnected":
        return flag(n.attrs, "flatten", True)
    layout = n.attrs.get("layout", "None")
    return layout in ("None", "") or layout.startswith("NC")


def _with_biases(graph: Graph, params: dict, names: Iterable[str]) -> tuple[Graph, dict]:
    """The graph where each named layer has a bias (zeros added where it had none)."""
    want = set(names)
    idx = graph.index()
    missing = []
    for name in sorted(want):
        n = graph.nodes[idx[name]]
        if flag(n.attrs, "no_bias", False) or len(n.inputs) < 3:
            missing.append(idx[name])
    if not missing:
        return graph, params
    params = dict(params)
    taken = {n.name for n in graph.nodes} | set(params)
    nodes: list = []
    new_index: dict = {}
    for i, n in enumerate(graph.nodes):
        inputs = [[new_index[e[0]], e[1], e[2]] for e in n.inputs]
        attrs = dict(n.attrs)
        if i in missing:
            b = f"{n.name}_bias"
            k = 0
            while b in taken:
                k += 1
                b = f"{n.name}_bias{k}"
            taken.add(b)
            nodes.append(Node("null", b))
            params[b] = np.zeros(np.shape(params[graph.nodes[n.inputs[1][0]].name])[0],
                                 np.float32)
            inputs = inputs[:2] + [[len(nodes) - 1, 0, 0]]
            attrs["no_bias"] = "False"
        new_index[i] = len(nodes)
        nodes.append(Node(n.op, n.name, attrs, inputs))
    heads = [[new_index[h[0]], h[1], h[2]] for h in graph.heads]
    return Graph(nodes, heads, dict(graph.attrs), graph.source), params


# -- per-input-channel geometry of a layer's weight ------------------------------------------
def _out_ranges(w: np.ndarray) -> np.ndarray:
    """max |w| of each output channel (axis 0)."""
    return np.abs(w).reshape(w.shape[0], -1).max(axis=1)


def _in_ranges(w: np.ndarray, groups: int, channels: int, is_fc: bool) -> np.ndarray:
    """max |w| over the weights that read each of the ``channels`` input channels."""
    a = np.abs(w)
    if is_fc:
        return a.reshape(w.shape[0], channels, -1).max(axis=(0, 2))
    cout, cpg = w.shape[:2]
    return a.reshape(cout, cpg, -1).max(axis=2).reshape(groups, cout // groups, cpg) \
        .max(axis=1).reshape(channels)


def _in_scaled(w: np.ndarray, s: np.ndarray, groups: int, is_fc: bool) -> np.ndarray:
    """``w`` with the weights reading input channel i multiplied by ``s[i]``."""
    if is_fc:
        return w * np.repeat(s, w.shape[1] // len(s))[None, :]
    cout, cpg = w.shape[:2]
    per = np.repeat(s.reshape(groups, cpg), cout // groups, axis=0)  # (cout, cpg)
    return w * per.reshape(per.shape + (1,) * (w.ndim - 2))


def _in_dot(w: np.ndarray, v: np.ndarray, groups: int, is_fc: bool) -> np.ndarray:
    """Per output channel, the layer's response to input channel i held at ``v[i]`` everywhere
    (zero padding aside): ``W @ v`` summed over the kernel."""
    if is_fc:
        return w.reshape(w.shape[0], -1) @ np.repeat(v, w.shape[1] // len(v))
    cout, cpg = w.shape[:2]
    per = np.repeat(v.reshape(groups, cpg), cout // groups, axis=0)
    return (w.reshape(cout, cpg, -1).sum(axis=2) * per).sum(axis=1)


def _in_channels(w_shape: tuple, groups: int, is_fc: bool) -> int:
    return w_shape[1] if is_fc else w_shape[1] * groups


def _padded(n: Node) -> bool:
    pad = n.attrs.get("pad", "()").strip("()[] ").replace(" ", "")
    return any(int(p) != 0 for p in pad.split(",") if p)


# -- BatchNorm statistics and folding ------------------------------------------------------
def bn_statistics(graph: Graph, params: dict) -> Stats:
    """{layer name: (beta, sigma)} for every layer whose BatchNorm ``fold_batchnorm`` folds:
    the distribution of the folded layer's output, taken from the BN before it is folded.

    ``sigma = |gamma| sqrt(var / (var + eps))`` is the exact standard deviation when the
    layer's output has the BN's running variance (the paper's ``gamma`` when eps is small).
    """
    stats: Stats = {}
    for li, bi in _pairs(graph):
        bn = graph.nodes[bi]
        _, gamma, beta, _, var, eps = _bn_arrays(graph, bn, params)
        sigma = np.abs(gamma) * np.sqrt(np.maximum(var, 0) / (np.maximum(var, 0) + eps))
        stats[graph.nodes[li].name] = (beta.astype(np.float64), sigma.astype(np.float64))
    return stats


def fold_with_stats(graph: Graph, params: dict) -> tuple[Graph, dict, Stats]:
    """BatchNorm folded for deployment (``fold_batchnorm(..., "deploy")``), plus the folded
    layers' output statistics that high-bias absorption and bias correction need."""
    params = _np_params(params)
    stats = bn_statistics(graph, params)
    folded, params = fold_batchnorm(graph, params, "deploy")
    names = {n.name for n in folded.nodes if n.op in LAYERS}
    return folded, params, {k: v for k, v in stats.items() if k in names}


# -- which pairs can be rescaled -----------------------------------------------------------
@dataclass(frozen=True)
class LayerPair:
    """Two layers that a per-channel rescale of the first's output can be pushed through.

    ``path`` names the ops between them (ReLU, pooling, flatten); ``relu_first`` is True
    when the first of them is a ReLU right after ``first`` (what absorption needs);
    ``padded``: ``second`` (or an average pooling on the way) pads with zeros, so a constant
    added to the tensor does not reach the border of its output unchanged.
    """
    first: str
    second: str
    path: tuple
    relu_first: bool
    padded: bool


def _passes(n: Node) -> bool:
    """The op commutes with a positive per-channel scale of its (channel-first) input."""
    if _is_relu(n) or n.op in ("Flatten", "flatten", "Dropout"):
        return True
    if n.op == "Pooling":
        return n.attrs.get("pool_type", "max") in ("max", "avg") and \
            n.attrs.get("layout", "None") in ("None", "", "NCHW", "NCW", "NCDHW")
    return False


def find_pairs(graph: Graph, params: dict) -> tuple[list, list]:
    """(pairs, skipped): the layer pairs CLE and absorption may work on, in graph order, and
    ``(layer, reason)`` for each layer whose output cannot be rescaled."""
    layers = {l.index: l for l in _layers(graph, params)}
    uses = graph.consumers()
    idx = graph.index()
    var_uses = {i: len(uses.get(i, [])) for i, n in enumerate(graph.nodes) if n.is_var}
    pairs, skipped = [], []
    for i, first in layers.items():
        node = graph.nodes[i]
        if not _channel_first(node):
            skipped.append((first.name, "not channel-first (layout or FullyConnected "
                            "flatten=False)"))
            continue
        if var_uses.get(idx[first.weight], 0) != 1:
            skipped.append((first.name, f"weight '{first.weight}' is shared"))
            continue
        path, cur, reason, second = [], i, None, None
        while reason is None and second is None:
            users = uses.get(cur, [])
            where = graph.nodes[cur].name
            if -1 in users:
                reason = f"'{where}' is a graph output"
            elif len(users) != 1:
                reason = (f"'{where}' has {len(users)} consumers "
                          f"({', '.join(graph.nodes[u].name for u in users)})")
            else:
                nxt = graph.nodes[users[0]]
                if _is_relu6(nxt):
                    reason = f"'{nxt.name}' is ReLU6 (run relu6_to_relu first)"
                elif nxt.op not in LAYERS and not _passes(nxt):
                    reason = f"'{nxt.name}' ({nxt.op}) does not pass a per-channel scale"
                elif [p for p, e in enumerate(nxt.inputs) if e[0] == cur] != [0]:
                    reason = f"'{nxt.name}' reads '{where}' other than as its data input"
                elif nxt.op in LAYERS:
                    second = users[0]
                else:
                    path.append(users[0])
                    cur = users[0]
        if reason is None:
            sec = layers[second]
            snode = graph.nodes[second]
            c = np.shape(params[first.weight])[0]
            w2 = np.shape(params[sec.weight])
            if not _channel_first(snode):
                reason = f"'{sec.name}' is not channel-first"
            elif var_uses.get(idx[sec.weight], 0) != 1:
                reason = f"weight '{sec.weight}' of '{sec.name}' is shared"
            elif sec.is_fc and (w2[1] % c != 0):
                reason = f"'{sec.name}' has {w2[1]} inputs, not a multiple of {c} channels"
            elif not sec.is_fc and _in_channels(w2, sec.groups, False) != c:
                reason = f"'{sec.name}' reads {_in_channels(w2, sec.groups, False)} channels, " \
                         f"'{first.name}' writes {c}"
        if reason is not None:
            skipped.append((first.name, reason))
            continue
        ops = [graph.nodes[p] for p in path]
        padded = any(_padded(n) for n in ops + [graph.nodes[second]]
                     if n.op in ("Convolution", "Pooling")
                     and not flag(n.attrs, "global_pool", False))
        pairs.append(LayerPair(first.name, graph.nodes[second].name,
                               tuple(n.name for n in ops), bool(ops) and _is_relu(ops[0]),
                               padded))
    return pairs, skipped


# -- 3. cross-layer equalization -----------------------------------------------------------
def cross_layer_equalize(graph: Graph, params: dict, stats: Stats | None = None, *,
                         max_sweeps: int = 50, tol: float = 1e-6,
                         report: dict | None = None) -> tuple[Graph, dict, Stats]:
    """Cross-layer equalization of every valid pair, swept until the scales stop moving.

    Returns (graph, params, stats) with the statistics of each rescaled layer divided by
    its scale.  ``report`` (a dict), when given, gets ``pairs``, ``skipped`` and ``sweeps``.
    """
    params = _np_params(params)
    stats = {k: (b.copy(), g.copy()) for k, (b, g) in (stats or {}).items()}
    pairs, skipped = find_pairs(graph, params)
    info = {l.name: l for l in _layers(graph, params)}
    work = {}  # float64 copies, rounded to float32 once at the end
    for p in pairs:
        for name in (p.first, p.second):
            l = info[name]
            work[l.weight] = params[l.weight].astype(np.float64)
            if l.bias:
                work[l.bias] = params[l.bias].astype(np.float64)
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        moved = 0.0
        for p in pairs:
            a, b = info[p.first], info[p.second]
            w1, w2 = work[a.weight], work[b.weight]
            r1 = _out_ranges(w1)
            r2 = _in_ranges(w2, b.groups, len(r1), b.is_fc)
            ok = (r1 > 0) & (r2 > 0)
            s = np.where(ok, np.sqrt(np.where(ok, r1 * r2, 1.0)) / np.where(ok, r2, 1.0), 1.0)
            work[a.weight] = w1 / s.reshape((-1,) + (1,) * (w1.ndim - 1))
            if a.bias:
                work[a.bias] = work[a.bias] / s
            work[b.weight] = _in_scaled(w2, s, b.groups, b.is_fc)
            if a.name in stats:
                beta, sigma = stats[a.name]
                stats[a.name] = (beta / s, sigma / s)
            moved = max(moved, float(np.abs(np.log(s)).max()))
        if moved < tol:
            break
    for k, v in work.items():
        params[k] = v.astype(np.float32)
    log.info("CLE: %d pairs equalized in %d sweeps; %d layers skipped", len(pairs), sweeps,
             len(skipped))
    for name, why in skipped:
        log.debug("CLE skips '%s': %s", name, why)
    if report is not None:
        report.update(pairs=[(p.first, p.second) for p in pairs], skipped=list(skipped),
                      sweeps=sweeps)
    return _copy_graph(graph), params, stats


# -- 4. high-bias absorption ---------------------------------------------------------------
def absorb_high_bias(graph: Graph, params: dict, stats: Stats, *, n_sigma: float = 3.0,
                     allow_padding: bool = False,
                     report: dict | None = None) -> tuple[Graph, dict, Stats]:
    """Move ``c = max(0, beta - n_sigma * sigma)`` from each layer followed by a ReLU into the
    next layer's bias (``b2 += W2 c`` summed over the kernel).

    Exact wherever the pre-ReLU value is at least ``c`` (the BN statistics say: but for a
    fraction ``Phi(-n_sigma)`` of values).  A padded second convolution sees zeros, not ``c``,
    at the border, so the output would change there: such pairs are skipped unless
    ``allow_padding`` (the paper ignores the border).
    """
    params = _np_params(params)
    stats = {k: (b.copy(), g.copy()) for k, (b, g) in stats.items()}
    pairs, _ = find_pairs(graph, params)
    # every op find_pairs lets through (ReLU, max/avg pooling, flatten) passes a constant too
    ok_path = [p for p in pairs if p.relu_first and p.first in stats]
    todo = [p for p in ok_path if allow_padding or not p.padded]
    skipped = [(p.first, f"zero padding on the way to '{p.second}'") for p in ok_path
               if p not in todo]
    graph, params = _with_biases(graph, params, [p.second for p in todo] +
                                 [p.first for p in todo])
    info = {l.name: l for l in _layers(graph, params)}
    done = []
    for p in todo:
        a, b = info[p.first], info[p.second]
        beta, sigma = stats[p.first]
        c = np.maximum(0.0, beta - n_sigma * sigma)
        if not (c > 0).any():
            continue
        params[a.bias] = (params[a.bias].astype(np.float64) - c).astype(np.float32)
        w2 = params[b.weight].astype(np.float64)
        params[b.bias] = (params[b.bias].astype(np.float64) +
                          _in_dot(w2, c, b.groups, b.is_fc)).astype(np.float32)
        stats[p.first] = (beta - c, sigma)
        done.append((p.first, p.second, int((c > 0).sum())))
    log.info("high-bias absorption: %d pairs changed, %d skipped (padded)", len(done),
             len(skipped))
    if report is not None:
        report.update(absorbed=done, skipped=skipped)
    return _copy_graph(graph), params, stats


# -- 5. bias correction --------------------------------------------------------------------
def _pdf(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf, otypes=[np.float64])(z / math.sqrt(2)))


def relu_normal_mean(mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """E[relu(x)] for x ~ N(mu, sigma^2): ``sigma phi(mu/sigma) + mu Phi(mu/sigma)``
    (``max(mu, 0)`` where sigma is 0)."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    pos = sigma > 0
    z = np.where(pos, mu / np.where(pos, sigma, 1.0), 0.0)
    return np.where(pos, sigma * _pdf(z) + mu * _cdf(z), np.maximum(mu, 0.0))


def _input_mean(graph: Graph, i: int, stats: Stats, memo: dict):
    """Per-channel mean of node i's output from the BN statistics, or None where they do not
    say: a BN-folded layer (beta), a ReLU right after one (clipped normal), average pooling,
    flatten and dropout (the mean passes), an add of two known means."""
    if i in memo:
        return memo[i]
    n = graph.nodes[i]
    res = None
    if n.op in LAYERS and n.name in stats:
        res = stats[n.name][0]
    elif _is_relu(n):
        src = graph.nodes[n.inputs[0][0]]
        if src.op in LAYERS and src.name in stats:
            res = relu_normal_mean(*stats[src.name])
    elif n.op in ("Flatten", "flatten", "Dropout") or (
            n.op == "Pooling" and n.attrs.get("pool_type", "max") == "avg"):
        res = _input_mean(graph, n.inputs[0][0], stats, memo)
    elif n.op in ADD_OPS and len(n.inputs) == 2:
        a, b = (_input_mean(graph, e[0], stats, memo) for e in n.inputs)
        if a is not None and b is not None and a.shape == b.shape:
            res = a + b
    memo[i] = res
    return res


def _tensor_name(graph: Graph, entry: list) -> str:
    n = graph.nodes[entry[0]]
    return n.name if n.is_var else f"{n.name}_output" + (str(entry[1]) if entry[1] else "")


def _measured_means(graph: Graph, params: dict, layers: Sequence, batches, data_name: str):
    """Per-channel (conv) or per-feature (fully connected) mean of each layer's input over
    the calibration batches, in the float graph."""
    batches = [as_numpy(b, np.float32)
               for b in batches]
    if not batches:
        raise QuantOpsError("empirical bias correction needs calibration batches; got none")
    names = [_tensor_name(graph, graph.nodes[l.index].inputs[0]) for l in layers]
    unique = sorted(set(names))
    run = runner(graph, params, batches[0].shape, data_name, unique)
    sums = {t: 0.0 for t in unique}
    count = 0
    for x in tqdm(batches, desc="bias correction: input means", leave=False):
        for t, v in zip(unique, run(x)):
            sums[t] = sums[t] + np.asarray(v, np.float64).sum(axis=0)
        count += len(x)
    out = []
    for l, t in zip(layers, names):
        m = sums[t] / count
        out.append(m.reshape(-1) if l.is_fc else m.reshape(m.shape[0], -1).mean(axis=1))
    return out


def quantized_weight(w: np.ndarray, spec: QuantSpec, channel_axis: int = 0) -> np.ndarray:
    """What the graph's weight quantizer computes from ``w``: its own operator, in
    inference, from the state its descriptor starts it with."""
    w = np.asarray(w, np.float32)
    channels = w.shape[channel_axis] if spec.per_channel else 1
    init = spec.initial(True, channels, w, channel_axis)
    args = [mx.nd.array(w)] + [mx.nd.array(init[i.name]) for i in spec.descriptor.inputs]
    op = getattr(mx.nd, spec.op_name)
    return op(*args, **spec.op_attrs(is_weight=True, channel_axis=channel_axis)).asnumpy()


def correct_bias(graph: Graph, params: dict, *, mode: str = "data_free",
                 stats: Stats | None = None, policy: QuantPolicy | str | dict | None = None,
                 reference_params: dict | None = None,
                 calib_batches: Iterable[np.ndarray] | None = None, data_name: str = "data",
                 report: dict | None = None) -> tuple[Graph, dict]:
    """Take the expected error of the quantized weights out of each layer's bias:
    ``b -= (Q(W) - W_ref) E[x]``.

    ``policy`` (a QuantPolicy, preset name or dict; default per-tensor INT8 weights) says
    which layers get quantized weights and how, exactly as ``quantize_graph`` will.
    ``reference_params`` holds the float weights ``W_ref`` (e.g. before clipping; default:
    the current ones).  ``mode``: ``"data_free"`` takes ``E[x]`` from ``stats`` (layers whose
    input mean the BN statistics do not give are left alone), ``"empirical"`` measures it
    on ``calib_batches`` in the float graph.
    """
    if mode not in ("data_free", "empirical"):
        raise QuantOpsError(f"unknown bias correction mode {mode!r}: use 'data_free' or "
                            "'empirical'")
    policy = as_policy(DEFAULT_POLICY if policy is None else policy)
    params = _np_params(params)
    ref = params if reference_params is None else _np_params(reference_params)
    layers = _layers(graph, params)
    ordered = [l for l in layers if l.op in policy.quantize_ops]
    # first/last layer as insert_quantizers counts them (over every quantizable op)
    quantizable = [i for i, n in graph.ops() if n.op in policy.quantize_ops]
    first, last = (quantizable[0], quantizable[-1]) if quantizable else (-1, -1)
    todo = []
    for l in ordered:
        rule = policy.rule_for(l.name, l.op, l.index == first, l.index == last)
        if rule is None or rule.weight is None:
            continue
        if not rule.weight.descriptor.linear:
            raise QuantOpsError(f"{policy.source}: weight method '{rule.weight.method}' of "
                                f"'{l.name}': bias correction models int8 weights only "
                                "(linear quantizers, y = rint(w / s) * s)")
        if l.weight not in ref:
            raise QuantOpsError(f"reference params lack weight '{l.weight}' of '{l.name}'")
        todo.append((l, rule.weight))
    if mode == "data_free":
        if stats is None:
            raise QuantOpsError("data-free bias correction needs the BN statistics (stats): "
                                "get them with fold_with_stats")
        memo: dict = {}
        means = [_input_mean(graph, graph.nodes[l.index].inputs[0][0], stats, memo)
                 for l, _ in todo]
    else:
        if calib_batches is None:
            raise QuantOpsError("empirical bias correction needs calib_batches")
        means = _measured_means(graph, ref, [l for l, _ in todo], calib_batches, data_name)
    picked = [(l, spec, m) for (l, spec), m in zip(todo, means) if m is not None]
    graph, params = _with_biases(graph, params, [l.name for l, _, _ in picked])
    info = {l.name: l for l in _layers(graph, params)}
    done, left = [], [l.name for (l, _), m in zip(todo, means) if m is None]
    for l, spec, m in picked:
        l = info[l.name]
        w_ref = ref[l.weight].astype(np.float64)
        eps = quantized_weight(params[l.weight], spec).astype(np.float64) - w_ref
        cin = _in_channels(eps.shape, l.groups, l.is_fc)
        if (l.is_fc and cin % len(m)) or (not l.is_fc and cin != len(m)):
            raise QuantOpsError(f"{graph.source}: '{l.name}' reads {cin} inputs but its input "
                                f"mean has {len(m)} channels")
        corr = _in_dot(eps, np.asarray(m, np.float64), l.groups, l.is_fc)
        params[l.bias] = (params[l.bias].astype(np.float64) - corr).astype(np.float32)
        done.append(l.name)
    log.info("bias correction (%s): %d layers corrected, %d without a known input mean", mode,
             len(done), len(left))
    if report is not None:
        report.update(corrected=done, uncorrected=left)
    return _copy_graph(graph), params


# -- 6. weight clipping --------------------------------------------------------------------
def clip_weights(graph: Graph, params: dict, threshold: float) -> tuple[Graph, dict]:
    """Every Convolution / FullyConnected weight clipped to ``[-threshold, threshold]``."""
    if not (isinstance(threshold, (int, float)) and threshold > 0 and math.isfinite(threshold)):
        raise QuantOpsError(f"weight clip threshold must be a number > 0, got {threshold!r}")
    params = _np_params(params)
    for l in _layers(graph, params):
        params[l.weight] = np.clip(params[l.weight], -threshold, threshold)
    return _copy_graph(graph), params


# -- the pipeline --------------------------------------------------------------------------
def apply_dfq(graph: Graph, params: dict, *, equalize: bool = True, absorb_bias: bool = True,
              bias_correction: str | None = "data_free", weight_clip: float | None = None,
              calib_batches: Iterable[np.ndarray] | None = None,
              policy: QuantPolicy | str | dict | None = None, data_name: str = "data",
              absorb_padded: bool = False, report: dict | None = None) -> tuple[Graph, dict]:
    """The DFQ pipeline on a float model: ReLU6 -> ReLU, BatchNorm folded, CLE, high-bias
    absorption, weight clipping, bias correction; returns the new (graph, params), ready for
    ``quantize_graph(graph, params, policy)`` with the same ``policy``.

    ``report`` (a dict), when given, is filled with what each step did.
    """
    if bias_correction not in BIAS_CORRECTION_MODES:
        raise QuantOpsError(f"unknown bias correction {bias_correction!r}: use 'data_free', "
                            "'empirical' or None")
    if bias_correction == "empirical" and calib_batches is None:
        raise QuantOpsError("bias_correction='empirical' needs calib_batches")
    if weight_clip is not None and not (isinstance(weight_clip, (int, float))
                                        and weight_clip > 0):
        raise QuantOpsError(f"weight_clip must be a number > 0 or None, got {weight_clip!r}")
    params = _np_params(params)
    _layers(graph, params)  # fail early, naming the layer, on a graph DFQ cannot work on
    rep = report if report is not None else {}
    graph, n6 = relu6_to_relu(graph)
    graph, params, stats = fold_with_stats(graph, params)
    rep["relu6_replaced"] = n6
    rep["bn_folded"] = len(stats)
    if equalize:
        rep["cle"] = {}
        graph, params, stats = cross_layer_equalize(graph, params, stats, report=rep["cle"])
    if absorb_bias:
        rep["absorption"] = {}
        graph, params, stats = absorb_high_bias(graph, params, stats,
                                                allow_padding=absorb_padded,
                                                report=rep["absorption"])
    ref = params
    if weight_clip is not None:
        graph, params = clip_weights(graph, params, float(weight_clip))
        rep["weight_clip"] = float(weight_clip)
    if bias_correction is not None:
        rep["bias_correction"] = {"mode": bias_correction}
        graph, params = correct_bias(graph, params, mode=bias_correction, stats=stats,
                                     policy=policy, reference_params=ref,
                                     calib_batches=calib_batches, data_name=data_name,
                                     report=rep["bias_correction"])
    return graph, params
