"""ZeroQ distilled data (Cai et al. 2020, arXiv 2001.00281): a calibration set made from
the float model alone, for when no real images may be used.

Start from Gaussian noise and optimize the *input* (weights frozen) so that, at every
BatchNorm layer, the per-channel mean and standard deviation of the batch that reaches the
BN equal the BN's running statistics, which summarize the training data the model saw.
The loss is the paper's statistic loss, summed over the BN layers:

    ||mu_batch - running_mean||_2 + ||sigma_batch - sqrt(running_var + eps)||_2

It is built as one MXNet symbol on the *float* graph, so forward and backward run in MXNet
and only the Adam step is numpy.  The network runs in inference mode, so every BN
normalizes with its running statistics, as deployment does: the data that comes out is
data for which the model behaves as it did on its training set.  A BN that can be folded
into the layer before it is (it is then an affine map of known coefficients, and the
statistics of its input follow from those of the folded layer's output), and ReLU6 runs as
ReLU and a minimum: with the moments as GEMMs this halves the time of a step.

The optimization is chaotic: a change of 1e-6 in the starting noise (or of the order of a
float sum) ends in pixels that differ by ~0.2 on average, with the same statistic loss and
the same calibration quality; compare distilled sets by those, not pixel by pixel.

The network input itself has no BN in front of it, so nothing bounds the distilled pixels:
on the Fashion-MNIST models they drift to |x| ~ 7-8 where real normalized pixels stay in
[-0.81, 2.02], and a min/max input range calibrated on them is ~4x too wide.  That range
is known without data, from the pixel format and the model's normalization: pass
``input_range=(lo, hi)`` to keep the distilled pixels inside it (projected Adam), or set
the input quantizer's range from it.  Either way the W8A8 accuracy with ZeroQ ranges is
within 0.6 points of real-data ranges (``bench/zeroq_fmnist.py``).
"""
from __future__ import annotations

import copy
import logging
from typing import Sequence

import mxnet as mx
import numpy as np
from tqdm import tqdm

from ..errors import QuantOpsError, mxnet_message
from ..graph.fold_bn import fold_batchnorm
from ..graph.ir import Graph, Node, flag
from ..graph.params import as_numpy
from ..graph.runner import bind

log = logging.getLogger(__name__)

_TINY = 1e-12  # keeps the norm's gradient finite when a difference is exactly zero


def _tensor_name(graph: Graph, entry, names: set) -> str:
    """The name ``get_internals()`` gives the tensor of a node input entry (``x_output`` for
    a single-output op, ``x_output<i>`` for one of several)."""
    node = graph.nodes[entry[0]]
    if node.is_var:
        return node.name
    tries = [f"{node.name}_output{entry[1]}"] + ([f"{node.name}_output"] if entry[1] == 0
                                                  else [])
    for name in tries:
        if name in names:
            return name
    raise QuantOpsError(f"{graph.source}: no tensor for output {entry[1]} of '{node.name}'")


def _batchnorms(graph: Graph) -> list:
    bns = [n for _, n in graph.ops() if n.op == "BatchNorm"]
    if not bns:
        raise QuantOpsError(f"{graph.source}: the graph has no BatchNorm layer; ZeroQ distils "
                            "data from BN running statistics (use the float graph, before "
                            "BN folding)")
    return bns


def _stat_param(params: dict, graph: Graph, bn, pos: int, what: str) -> np.ndarray:
    name = graph.nodes[bn.inputs[pos][0]].name
    if name not in params:
        raise QuantOpsError(f"{graph.source}: BatchNorm '{bn.name}' needs its {what} "
                            f"'{name}', which is not in the params")
    v = params[name]
    return as_numpy(v, np.float64).ravel()


def _fold_for_stats(graph: Graph, params: dict, bns: list) -> tuple[Graph, dict, dict]:
    """The graph with its BatchNorms folded into the layers before them (``fold_batchnorm``,
    deploy), its params, and {folded BN: (a, beta)}, ``a = gamma / sqrt(var + eps)``.

    With the running statistics a BN is the affine map ``a x + beta - a mean``; folded,
    its forward and backward (~15% of a ResNet-20 step) disappear.  Nothing is folded
    when a BN has a zero or non-finite ``a`` (its input statistics could not be recovered
    from its output's) or another output of it is read."""
    index = graph.index()
    scales = {}
    for bn in bns:
        b = index[bn.name]
        if any(e[0] == b and e[1] > 0 for n in graph.nodes for e in n.inputs) or \
                any(h[0] == b and h[1] > 0 for h in graph.heads):
            return graph, params, {}
        names = [graph.nodes[e[0]].name for e in bn.inputs[1:5]]
        if len(names) != 4 or any(k not in params for k in names):
            return graph, params, {}
        gamma, beta, _, var = (as_numpy(params[k], np.float64).ravel() for k in names)
        if flag(bn.attrs, "fix_gamma", True):
            gamma = np.ones_like(gamma)
        with np.errstate(all="ignore"):
            a = gamma / np.sqrt(var + float(bn.attrs.get("eps", "0.001")))
        if not (np.isfinite(a).all() and (a != 0).all() and np.isfinite(beta).all()):
            return graph, params, {}
        scales[bn.name] = (a, beta)
    try:
        run_graph, run_params = fold_batchnorm(graph, params, "deploy")
    except QuantOpsError:
        return graph, params, {}
    kept = {n.name for n in run_graph.nodes}
    return run_graph, run_params, {k: v for k, v in scales.items() if k not in kept}


def _folded_moments(y, ys: tuple, axis: int, name: str, affine: tuple, consts: dict) -> tuple:
    """(mean of x - running mean, variance of x) per channel, for the BN input x of a folded
    BN, from its output ``y = a x + beta - a mean``."""
    a, beta = affine
    inv = mx.sym.var(f"{name}_zeroq_inv_scale", shape=(ys[axis],))
    shift = mx.sym.var(f"{name}_zeroq_beta", shape=(ys[axis],))
    consts[inv.name], consts[shift.name] = 1.0 / a, beta
    mu, m2 = _moments(y, ys, axis, name, consts)
    return (mu - shift) * inv, mx.sym.relu(m2 - mx.sym.square(mu)) * mx.sym.square(inv)


def _moments(x, xs: tuple, axis: int, name: str, consts: dict) -> tuple:
    """Per-channel E[x] and E[x^2] of the symbol ``x`` (shape ``xs``, channels on ``axis``).

    The sums over the positions after the channel axis are products with a ones vector
    (FullyConnected: oneDNN's GEMM, forward and backward): MXNet's ``mean`` over that axis
    and its backward took ~45% of a ResNet-20 step.  The ones are a constant input (its
    gradient is never asked for), the mean over the leading axes is a small reduction."""
    pre = int(np.prod(xs[:axis], dtype=np.int64))
    post = int(np.prod(xs[axis + 1:], dtype=np.int64))
    ones = mx.sym.var(f"{name}_zeroq_ones", shape=(1, post))
    consts[ones.name] = np.ones((1, post), np.float32)
    flat = mx.sym.reshape(x, shape=(pre * xs[axis], post))

    def mean(v):
        s = mx.sym.FullyConnected(v, ones, no_bias=True, num_hidden=1)
        return mx.sym.mean(mx.sym.reshape(s, shape=(pre, xs[axis])), axis=0) / post

    return mean(flat), mean(mx.sym.square(flat))


def _fast_relu6(graph: Graph) -> Graph:
    """``clip(x, 0, hi)`` (MobileNet's ReLU6) as ``min(relu(x), hi)``: the same values, but
    MXNet's ``clip`` forward and backward took ~45% of a MobileNet-v2 step and its oneDNN
    ReLU plus a scalar minimum a tenth of that."""
    order, nodes, new = [], [], {}

    def at(e):
        return [new[e[0]], e[1], e[2]]

    for i, n in enumerate(graph.nodes):
        lo, hi = (n.attrs.get(k, "") for k in ("a_min", "a_max"))
        try:
            fast = n.op == "clip" and float(lo) == 0.0 and 0.0 < float(hi) < np.inf
        except ValueError:
            fast = False
        if fast:
            order.append(None)
            nodes.append(Node("Activation", f"{n.name}_zeroq_relu", {"act_type": "relu"},
                              [at(e) for e in n.inputs]))
            n = Node("_minimum_scalar", n.name, {"scalar": hi}, [[len(nodes) - 1, 0, 0]])
        else:
            n = Node(n.op, n.name, dict(n.attrs), [at(e) for e in n.inputs])
        new[i] = len(nodes)
        order.append(i)
        nodes.append(n)
    return graph.rebuilt(order, nodes)


class StatisticLoss:
    """The ZeroQ statistic loss of a float graph, bound for input batches of ``shape``.

    ``loss(x)`` gives the total and the per-BN terms; ``loss_and_grad(x)`` also the gradient
    with respect to ``x`` (the only input that gets one).
    """

    def __init__(self, graph: Graph, params: dict, shape: Sequence[int],
                 data_name: str = "data") -> None:
        self.shape = tuple(int(d) for d in shape)
        if len(self.shape) < 2 or any(d <= 0 for d in self.shape):
            raise QuantOpsError(f"input shape {self.shape} is not a batch shape "
                                "(batch, channels, ...)")
        if self.shape[0] < 2:
            raise QuantOpsError(f"input shape {self.shape}: a batch of one image has no "
                                "batch statistics to match; use a batch of at least 2")
        _batchnorms(graph)                        # a graph without BN is refused first
        # The BNs must normalize with their running statistics (the distilled data has to
        # pass through the network as deployment runs it).  They do so in inference mode,
        # but MXNet's MKL-DNN backward of an inference-mode BN is ~4x slower than the
        # training-mode path; use_global_stats=True gives the same numbers on the fast path
        # (and Dropout, the other op that reads the mode, is made the identity).
        graph = copy.deepcopy(graph)
        for n in graph.nodes:
            if n.op == "BatchNorm":
                n.attrs["use_global_stats"] = "True"
            elif n.op == "Dropout":
                n.attrs["p"] = "0"
        graph = _fast_relu6(graph)
        self.bns = _batchnorms(graph)
        internals = graph.to_symbol().get_internals()
        names = set(internals.list_outputs())
        if data_name not in names:
            raise QuantOpsError(f"{graph.source}: no input named '{data_name}'")
        for bn in self.bns:
            if len(bn.inputs) != 5:
                raise QuantOpsError(f"{graph.source}: BatchNorm '{bn.name}' has "
                                    f"{len(bn.inputs)} inputs, expected 5 (data, gamma, "
                                    "beta, running mean, running variance)")
        inputs = [internals[_tensor_name(graph, bn.inputs[0], names)] for bn in self.bns]
        try:
            out_shapes = mx.sym.Group(inputs).infer_shape(**{data_name: self.shape})[1]
        except mx.base.MXNetError as e:
            raise QuantOpsError(f"{graph.source}: input shape {self.shape} does not fit the "
                                f"model: {mxnet_message(e)}") from None
        if out_shapes is None:
            raise QuantOpsError(f"{graph.source}: input shape {self.shape} leaves the BN "
                                "input shapes unknown")

        # BNs folded into the layer before them take no time; the statistics of the BN input
        # x are those of the folded layer's output y = a x + (beta - a mean), mapped back
        run_graph, run_params, folded = _fold_for_stats(graph, params, self.bns)
        run_internals = run_graph.to_symbol().get_internals()
        run_names = set(run_internals.list_outputs())
        run_index = run_graph.index()
        terms = []
        consts: dict = {}
        for bn, xs in zip(self.bns, out_shapes):
            axis = int(bn.attrs.get("axis", "1")) % len(xs)
            eps = float(bn.attrs.get("eps", "0.001"))   # MXNet's default BN eps
            mean = _stat_param(params, graph, bn, 3, "running mean")
            var = _stat_param(params, graph, bn, 4, "running variance")
            if mean.size != xs[axis] or var.size != xs[axis]:
                raise QuantOpsError(f"{graph.source}: BatchNorm '{bn.name}' has {mean.size} "
                                    f"running statistics for {xs[axis]} channels")
            s_var = mx.sym.var(f"{bn.name}_zeroq_std", shape=(xs[axis],))
            consts[s_var.name] = np.sqrt(np.maximum(var, 0.0) + eps)
            if bn.name in folded:
                layer = run_index[graph.nodes[bn.inputs[0][0]].name]
                y = run_internals[_tensor_name(run_graph, [layer, 0, 0], run_names)]
                d_mu, var_x = _folded_moments(y, xs, axis, bn.name, folded[bn.name], consts)
            else:
                entry = run_graph.nodes[run_index[bn.name]].inputs[0]
                x = run_internals[_tensor_name(run_graph, entry, run_names)]
                mu, m2 = _moments(x, xs, axis, bn.name, consts)
                m_var = mx.sym.var(f"{bn.name}_zeroq_mean", shape=(xs[axis],))
                consts[m_var.name] = mean
                d_mu, var_x = mu - m_var, mx.sym.relu(m2 - mx.sym.square(mu))
            sigma = mx.sym.sqrt(var_x + eps)
            d_mu = mx.sym.sqrt(mx.sym.sum(mx.sym.square(d_mu)) + _TINY)
            d_sigma = mx.sym.sqrt(mx.sym.sum(mx.sym.square(sigma - s_var)) + _TINY)
            terms.append(mx.sym.reshape(d_mu + d_sigma, shape=(1,)))
        per_bn = mx.sym.concat(*terms, dim=0) if len(terms) > 1 else terms[0]
        total = mx.sym.sum(per_bn)
        loss = mx.sym.Group([mx.sym.MakeLoss(total), mx.sym.BlockGrad(per_bn)])

        self.data_name = data_name
        self._grad = mx.nd.zeros(self.shape)
        self._exe = bind(loss, {**run_params, **consts}, {data_name: self.shape},
                         grad_req={k: ("write" if k == data_name else "null")
                                   for k in loss.list_arguments()},
                         args_grad={data_name: self._grad}, source=graph.source)

    def loss(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        """(total loss, loss of each BN in graph order) for the batch ``x``."""
        x = np.asarray(x, np.float32)
        if x.shape != self.shape:
            raise QuantOpsError(f"batch of shape {x.shape}, expected {self.shape}")
        self._exe.arg_dict[self.data_name][:] = x
        out = self._exe.forward(is_train=True)  # BNs use global stats: see __init__
        return float(out[0].asnumpy().ravel()[0]), out[1].asnumpy().astype(np.float64)

    def loss_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        """(total loss, d loss / d x)."""
        total, _ = self.loss(x)
        self._exe.backward()
        return total, self._grad.asnumpy()


def statistic_loss(graph: Graph, params: dict, x: np.ndarray,
                   data_name: str = "data") -> float:
    """The ZeroQ statistic loss of one input batch ``x`` (lower: the BN inputs' batch
    statistics are closer to the running statistics)."""
    return StatisticLoss(graph, params, np.shape(x), data_name).loss(x)[0]


def distill_batches(graph: Graph, params: dict, shape: Sequence[int], num_batches: int = 16,
                    steps: int = 100, lr: float = 0.5, seed: int = 0,
                    data_name: str = "data", progress: bool = True,
                    input_range: tuple[float, float] | None = None,
                    schedule: str = "cosine") -> list[np.ndarray]:
    """``num_batches`` input batches of ``shape`` distilled from the float model's BN
    statistics; a list of float32 arrays to pass as ``calibrate_graph``'s ``batches``.

    Each batch starts as N(0, 1) noise and takes ``steps`` Adam steps on the statistic loss
    (weights frozen), with step size ``lr`` held (``schedule="constant"``) or decayed to 0
    along a half cosine (``"cosine"``: in a short budget this ends at a lower loss; the
    paper's lr is 0.5).  ``input_range=(lo, hi)`` keeps every input value in that interval
    (the model's valid, normalized, pixel range), by projection after each step.
    Deterministic for a given ``seed``.
    """
    if num_batches < 1 or steps < 0:
        raise QuantOpsError(f"num_batches must be >= 1 and steps >= 0, got {num_batches} "
                            f"and {steps}")
    if lr <= 0:
        raise QuantOpsError(f"the learning rate must be positive, got {lr}")
    if schedule not in ("constant", "cosine"):
        raise QuantOpsError(f"unknown lr schedule {schedule!r}: use 'constant' or 'cosine'")
    if input_range is not None:
        lo, hi = (np.float32(v) for v in input_range)
        if not lo < hi:
            raise QuantOpsError(f"input_range {input_range} is empty (needs lo < hi)")
    stat = StatisticLoss(graph, params, shape, data_name)
    rng = np.random.default_rng(seed)
    beta1, beta2, adam_eps = 0.9, 0.999, 1e-8
    out = []
    bar = tqdm(total=num_batches * steps, desc="zeroq: distilling", disable=not progress)
    for b in range(num_batches):
        x = rng.standard_normal(stat.shape).astype(np.float32)
        if input_range is not None:
            np.clip(x, lo, hi, out=x)
        m = np.zeros_like(x)
        v = np.zeros_like(x)
        first = None
        for t in range(1, steps + 1):
            total, g = stat.loss_and_grad(x)
            if first is None:
                first = total
            if not np.isfinite(total) or not np.isfinite(g).all():
                raise QuantOpsError(f"{graph.source}: the statistic loss became non-finite "
                                    f"at step {t} of batch {b} (lower lr, now {lr})")
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * (g * g)
            a = lr if schedule == "constant" else lr * 0.5 * (1 + np.cos(np.pi * (t - 1)
                                                                         / steps))
            step = a * (m / (1 - beta1 ** t)) / (np.sqrt(v / (1 - beta2 ** t)) + adam_eps)
            x = (x - step).astype(np.float32)
            if input_range is not None:
                np.clip(x, lo, hi, out=x)
            bar.update(1)
            bar.set_postfix(batch=b, loss=f"{total:.3g}", refresh=False)
        if log.isEnabledFor(logging.INFO):
            last = stat.loss(x)[0]
            log.info("zeroq batch %d: statistic loss %.4g -> %.4g in %d steps", b,
                     first if first is not None else last, last, steps)
        out.append(x)
    bar.close()
    return out
