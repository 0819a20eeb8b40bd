"""Block reconstruction (BRECQ, Li et al. 2021, arXiv 2102.05426) with QDrop's random
dropping of activation quantization (Wei et al. 2022, arXiv 2203.05740).

AdaRound (``quant_ops.ptq.adaround``) fits each layer's rounding to that layer's float
output; at 2-4 bits the errors of consecutive layers interact (a residual block's two
convolutions, a depthwise layer and its projection), and the activation ranges were chosen
before any weight moved.  Here a block at a time (``quant_ops.ptq.blocks``: a residual
block, or a chain of up to ``max_layers`` layers) is trained to reproduce the float
network's block output from the quantized network's block input:

* each weight's rounding is learned as AdaRound learns it (a rectified sigmoid per weight,
  the annealed regularizer; the weight that sets a channel's scale keeps its code);
* each activation quantizer's step is learned with it (LSQ's gradient), from its
  calibrated range;
* with ``qdrop`` > 0 each activation element skips quantization with that probability at
  every step (QDrop), which keeps the learned weights from over-fitting the calibration
  set's quantization noise.

The block runs in MXNet (forward and backward of its own symbol, batches of
``batch_size`` calibration images); only the Adam steps are numpy.  The decisions are
folded into the weights and the learned steps into the ranges, so the result is an
ordinary quantized model that exports as QDQ like any other.  A block keeps its previous
values when the learned ones do not lower its output error on the calibration images.
"""
from __future__ import annotations

import logging
from typing import Sequence

import mxnet as mx
import numpy as np
from tqdm import tqdm

from ..errors import QuantOpsError, mxnet_message
from ..graph.heads import without_loss
from ..graph.ir import Graph
from ..graph.params import as_numpy
from ..graph.quantize import strip_quantizers
from ..graph.quantizers import quantizers
from ..graph.runner import bind
from ..reference import abs_max, qrange, scale_of
from .adaround import GAMMA, ZETA, rectified_sigmoid, v_for
from .blocks import BLOCK_INPUT, Block, block_graph, find_blocks
from .common import runner
from .layers import inference_params

log = logging.getLogger(__name__)
f32 = np.float32
#: Adam steps per block: the most that keeps ResNet-20 (9 blocks) within a few minutes on
#: two cores; the error has mostly settled by then (bench/ptq_lowbit.py)
DEFAULT_ITERS = 500


class _Adam:
    """Adam on a dict of numpy arrays (the paper's optimizer for V and the steps)."""

    def __init__(self, lr: float):
        self.lr, self.t, self.m, self.v = lr, 0, {}, {}

    def step(self, values: dict, grads: dict) -> None:
        self.t += 1
        for k, g in grads.items():
            m = self.m[k] = 0.9 * self.m.get(k, 0.0) + 0.1 * g
            v = self.v[k] = 0.999 * self.v.get(k, 0.0) + 0.001 * g * g
            values[k] -= self.lr * (m / (1 - 0.9 ** self.t)) / (
                np.sqrt(v / (1 - 0.999 ** self.t)) + 1e-8)


class _Rounding:
    """One weight's rounding variables: ``floor(w / s) + h(V)`` per weight, the codes of
    the weights that set their channel's scale pinned to nearest."""

    def __init__(self, w: np.ndarray, bits: int, axis: int | None):
        w = w.astype(np.float64)
        amax = abs_max(w.astype(f32), axis)
        shape = [1] * w.ndim
        if axis is not None:
            shape[axis] = -1
        self.s = scale_of(amax, bits).astype(np.float64).reshape(shape)
        self.qmin, self.qmax = qrange(bits, True)
        wn = w / self.s
        self.floor = np.floor(wn)
        self.nearest = np.clip(np.rint(wn), self.qmin, self.qmax)
        self.pinned = np.abs(w) >= amax.astype(np.float64).reshape(shape)
        self.v = v_for(wn - self.floor)

    def soft(self) -> np.ndarray:
        code = np.clip(self.floor + rectified_sigmoid(self.v), self.qmin, self.qmax)
        return (self.s * np.where(self.pinned, self.nearest, code)).astype(f32)

    def hard(self) -> np.ndarray:
        code = np.clip(self.floor + (self.v >= 0), self.qmin, self.qmax)
        return (self.s * np.where(self.pinned, self.nearest, code)).astype(f32)

    def near(self) -> np.ndarray:
        return (self.s * self.nearest).astype(f32)

    def grad_v(self, grad_w: np.ndarray, reg: float, beta: float | None) -> np.ndarray:
        """dL/dV from the loss gradient of the soft weight (and the regularizer)."""
        sig = 1.0 / (1.0 + np.exp(-self.v))
        soft = sig * (ZETA - GAMMA) + GAMMA
        h = np.clip(soft, 0.0, 1.0)
        code = self.floor + h
        grad_h = grad_w * self.s
        if beta is not None:
            u = 2 * h - 1
            grad_h = grad_h - reg * beta * np.abs(u) ** (beta - 1) * np.sign(u) * 2
        live = (code >= self.qmin) & (code <= self.qmax) & (soft > 0) & (soft < 1) \
            & ~self.pinned
        return np.where(live, grad_h * (ZETA - GAMMA) * sig * (1 - sig), 0.0)


def _learnable(graph: Graph) -> tuple[set, set, dict]:
    """(weight quantizers whose rounding can be learned, activation quantizers whose step
    can be, {quantizer: why not} for the others)."""
    readers: dict = {}
    for q in quantizers(graph):
        readers.setdefault(q.source[0], []).append(q.name)
    ws, acts, why = set(), set(), {}
    for q in quantizers(graph):
        if q.is_weight:
            if not q.method.follows_weight(q.attrs):
                why[q.name] = "its weight scale does not follow the weight"
            elif not graph.nodes[q.source[0]].is_var or len(readers[q.source[0]]) > 1:
                why[q.name] = "its weight is not a parameter of its own"
            else:
                ws.add(q.name)
        elif q.method.linear and q.range_var:
            acts.add(q.name)
        else:
            why[q.name] = "not a linear quantizer with a range"
    return ws, acts, why


class _BlockRun:
    """A block's symbol bound for training on batches of ``batch`` images."""

    def __init__(self, graph: Graph, block: Block, params: dict, learn_w: set,
                 learn_a: set, qdrop: bool, in_shape: tuple):
        self.g, self.soft, self.steps = block_graph(graph, block, learn_w, learn_a, qdrop)
        sym = self.g.to_symbol()
        known = {BLOCK_INPUT: in_shape}
        for sw in self.soft:
            known[sw.var] = np.shape(params[sw.weight])
        for st in self.steps:
            known[st.step_var] = (1,)
        try:
            shapes, _, _ = sym.infer_shape_partial(**known)
        except mx.base.MXNetError as e:
            raise QuantOpsError(f"{graph.source}: block ending at "
                                f"'{graph.nodes[block.end].name}': {mxnet_message(e)}") from None
        shape_of = dict(zip(sym.list_arguments(), shapes))
        feeds = {BLOCK_INPUT: in_shape}
        grads = {}
        for sw in self.soft:
            feeds[sw.var] = known[sw.var]
            grads[sw.var] = mx.nd.zeros(known[sw.var])
        for st in self.steps:
            feeds[st.step_var] = (1,)
            grads[st.step_var] = mx.nd.zeros((1,))
            if st.mask_var:
                feeds[st.mask_var] = tuple(shape_of[st.mask_var])
        req = {k: ("write" if k in grads else "null") for k in sym.list_arguments()}
        self.exe = bind(sym, params, feeds, grad_req=req, args_grad=grads, fusion=False,
                        source=graph.source)

    def set(self, name: str, value) -> None:
        target = self.exe.arg_dict[name]      # copyto: oneDNN may hold it in its own layout
        mx.nd.array(np.broadcast_to(np.asarray(value, f32), target.shape)).copyto(target)

    def forward(self, x: np.ndarray, train: bool) -> mx.nd.NDArray:
        self.set(BLOCK_INPUT, x)
        return self.exe.forward(is_train=train)[0]


def _tensor(graph: Graph, entry) -> str:
    n = graph.nodes[entry[0]]
    return n.name if n.is_var else f"{n.name}_output" + (str(entry[1]) if entry[1] else "")


def _collect(graph: Graph, params: dict, batches: list, data_name: str,
             name: str) -> np.ndarray:
    """The tensor ``name`` over every calibration image."""
    if name == data_name:
        return np.concatenate(batches)
    run = runner(graph, params, batches[0].shape, data_name, [name])
    return np.concatenate([run(b)[0] for b in batches])


def _block_error(br: _BlockRun, x: np.ndarray, t: np.ndarray, batch: int) -> float:
    """Mean squared error of the block's output over the calibration images (every
    activation quantized)."""
    for st in br.steps:
        if st.mask_var:
            br.set(st.mask_var, 1.0)
    total = 0.0
    for i in range(0, len(x) - batch + 1, batch):
        y = br.forward(x[i:i + batch], False).asnumpy()
        total += float(((y - t[i:i + batch]) ** 2).sum())
    n = (len(x) // batch) * batch
    return total / max(n * int(np.prod(t.shape[1:])), 1)


def _train_block(br: _BlockRun, x: np.ndarray, t: np.ndarray, params: dict, *, iters: int,
                 batch: int, lr: float, lr_step: float, reg: float, beta: tuple,
                 warmup: float, qdrop: float, rng) -> tuple[dict, dict]:
    """Learn the block's roundings and steps; (new param values, report)."""
    rounds = {sw.var: _Rounding(as_numpy(params[sw.weight]), sw.bits, sw.axis)
              for sw in br.soft}
    log_s = {st.step_var: np.log(np.array(
        [float(as_numpy(params[st.minmax]).reshape(-1)[0]) / st.qmax]))
        for st in br.steps}

    def load(weights: str) -> None:
        for sw in br.soft:
            r = rounds[sw.var]
            br.set(sw.var, getattr(r, weights)())
        for st in br.steps:
            br.set(st.step_var, np.exp(log_s[st.step_var]).astype(f32))

    load("near")
    before = _block_error(br, x, t, batch)
    start_s = {k: v.copy() for k, v in log_s.items()}
    opt_v = _Adam(lr)
    opt_s = _Adam(lr_step)
    start = int(warmup * iters)
    n_out = batch * int(np.prod(t.shape[1:]))
    for it in range(iters):
        idx = rng.choice(len(x), batch, replace=False)
        load("soft")
        for st in br.steps:
            if st.mask_var:
                shape = br.exe.arg_dict[st.mask_var].shape
                br.set(st.mask_var, (rng.random(shape) >= qdrop).astype(f32))
        y = br.forward(x[idx], True)
        br.exe.backward([2.0 * (y - mx.nd.array(t[idx])) / n_out])
        b = None
        if it >= start:
            b = beta[0] + (beta[1] - beta[0]) * (it - start) / max(iters - start, 1)
        gv = {k: r.grad_v(br.exe.grad_dict[k].asnumpy().astype(np.float64), reg, b)
              for k, r in rounds.items()}
        opt_v.step({k: r.v for k, r in rounds.items()}, gv)
        if br.steps:
            gs = {k: br.exe.grad_dict[k].asnumpy().astype(np.float64) * np.exp(log_s[k])
                  for k in log_s}
            opt_s.step(log_s, gs)
    load("hard")
    after = _block_error(br, x, t, batch)
    keep = after < before
    new: dict = {}
    if keep:
        for sw in br.soft:
            new[sw.weight] = rounds[sw.var].hard().reshape(np.shape(params[sw.weight]))
        for st in br.steps:
            old = np.array(as_numpy(params[st.minmax]), f32)
            new[st.minmax] = np.full_like(old, f32(np.exp(log_s[st.step_var][0]) * st.qmax))
    flipped = [float((r.hard() != r.near()).mean()) for r in rounds.values()]
    return new, {"mse_before": before, "mse_learned": after, "kept_learned": bool(keep),
                 "flipped": float(np.mean(flipped)) if flipped and keep else 0.0,
                 "step_factors": {st.quantizer: float(np.exp(log_s[st.step_var][0]
                                                             - start_s[st.step_var][0]))
                                  for st in br.steps} if keep else {}}


def brecq(graph: Graph, params: dict, batches: Sequence[np.ndarray], *,
          iters: int = DEFAULT_ITERS, batch_size: int | None = None, lr: float = 0.01,
          lr_step: float = 1e-3,
          reg: float = 0.01, beta: tuple[float, float] = (20.0, 2.0), warmup: float = 0.2,
          qdrop: float = 0.0, learn_steps: bool = True, max_layers: int = 3,
          data_name: str = "data", progress: bool = True, seed: int = 0
          ) -> tuple[dict, dict]:
    """Block reconstruction on a quantized, calibrated graph; returns (new params, report).

    Blocks are trained in graph order, each on the quantized network's input to it with
    the blocks before it already rounded: ``iters`` Adam steps on batches of
    ``batch_size`` calibration images (default 32, or all when there are fewer), rounding
    variables at ``lr``, log activation steps
    at ``lr_step`` (``learn_steps=False`` keeps the calibrated ranges), regularizer
    ``reg`` annealed over ``beta`` after the ``warmup`` fraction, activation quantization
    dropped per element with probability ``qdrop`` (0: BRECQ as published).  Only weights
    and activation ranges change in the returned params."""
    batches = [np.asarray(as_numpy(b), f32) for b in batches]
    if not batches or not all(len(b) for b in batches):
        raise QuantOpsError("brecq: the calibration set is empty")
    n_images = sum(len(b) for b in batches)
    if batch_size is None:
        batch_size = min(32, n_images)
    for name, v, ok in (("iters", iters, isinstance(iters, int) and iters >= 1),
                        ("batch_size", batch_size, isinstance(batch_size, int)
                         and 1 <= batch_size <= n_images),
                        ("reg", reg, np.isfinite(reg) and reg >= 0),
                        ("lr", lr, np.isfinite(lr) and lr > 0),
                        ("lr_step", lr_step, np.isfinite(lr_step) and lr_step >= 0),
                        ("qdrop", qdrop, 0 <= qdrop < 1),
                        ("max_layers", max_layers, isinstance(max_layers, int)
                         and max_layers >= 1),
                        ("warmup", warmup, 0 <= warmup < 1)):
        if not ok:
            raise QuantOpsError(f"brecq: {name} = {v!r} is out of range")
    graph = without_loss(graph, logits=True)
    blocks = find_blocks(graph, data_name, max_layers)
    if not blocks:
        raise QuantOpsError(f"{graph.source}: brecq: no block with a Convolution, "
                            "FullyConnected or Deconvolution layer after the input "
                            f"'{data_name}'")
    learn_w, learn_a, why = _learnable(graph)
    if not learn_steps:
        learn_a = set()
    run_params = inference_params(graph, params)
    float_params = dict(run_params)            # the float targets keep the float weights
    fgraph = strip_quantizers(graph)
    new_params = dict(params)
    rng = np.random.default_rng(seed)
    rows = []
    for block in tqdm(blocks, desc="brecq: blocks", disable=not progress):
        x = _collect(graph, run_params, batches, data_name, _tensor(graph, block.start))
        t = _collect(fgraph, float_params, batches, data_name,
                     _tensor(graph, [block.end, 0]))
        br = _BlockRun(graph, block, run_params, learn_w, learn_a, qdrop > 0,
                       (batch_size,) + x.shape[1:])
        if not br.soft and not br.steps:
            continue
        new, rep = _train_block(br, x, t, run_params, iters=iters, batch=batch_size, lr=lr,
                                lr_step=lr_step, reg=reg, beta=beta, warmup=warmup,
                                qdrop=qdrop, rng=rng)
        for k, v in new.items():
            new_params[k] = run_params[k] = v
        rows.append({"block": graph.nodes[block.end].name, "layers": block.layers,
                     "weights": [sw.weight for sw in br.soft],
                     "activations": [st.quantizer for st in br.steps], **rep})
        log.info("brecq: block %s (%d layers): mse %.4g -> %.4g%s",
                 rows[-1]["block"], len(block.layers), rep["mse_before"],
                 rep["mse_learned"], "" if rep["kept_learned"] else " (kept the old values)")
    return new_params, {"blocks": rows, "skipped": [{"quantizer": k, "reason": w}
                                                    for k, w in sorted(why.items())],
                        "iters": iters, "batch_size": batch_size, "lr": lr,
                        "lr_step": lr_step, "reg": reg, "beta": list(beta),
                        "warmup": warmup, "qdrop": qdrop, "learn_steps": learn_steps,
                        "max_layers": max_layers, "images": n_images}
