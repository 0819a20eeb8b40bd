"""Mixed precision under a size budget: each layer's weight bits chosen from measured
sensitivity, written out as an ordinary policy.

The sensitivity of layer l at width b is the mean squared error of the network's output
(against the float network, on calibration images) when only l's weights are quantized at
b bits, per channel, nearest rounding, the rest in float.  Such errors add up nearly
independently for small perturbations (the assumption HAWQ and its successors make), so the
choice is a multiple-choice knapsack: minimize the summed error subject to the weights'
total bits, solved exactly by dynamic programming over the bits spent.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from tqdm import tqdm

from ..errors import QuantOpsError
from ..graph.ir import Graph
from ..graph.params import as_numpy
from ..graph.quantize import strip_quantizers
from .common import runner
from .layers import find_layers, nearest_weight

log = logging.getLogger(__name__)
f32 = np.float32


def layer_errors(graph: Graph, params: dict, batches: Sequence[np.ndarray],
                 widths: Sequence[int], data_name: str = "data",
                 progress: bool = True) -> tuple[list, np.ndarray, np.ndarray]:
    """(layer names, weight sizes, errors[layer, width]) for the weight-quantized layers of
    a quantized graph (its linear weight quantizers say which weights and channel axes)."""
    layers, _ = find_layers(graph, "mixed precision")
    layers = [ly for ly in layers if ly.w_q is not None and ly.w_search]
    if not layers:
        raise QuantOpsError(f"{graph.source}: mixed precision: no layer with its own "
                            "linear weight quantizer")
    fgraph = strip_quantizers(graph)
    run_params = {k: as_numpy(v) for k, v in params.items()}
    # unfused: oneDNN's fused convolutions keep their own copy of the weights from the
    # first forward, so a weight set afterwards would not be seen
    run = runner(fgraph, run_params, batches[0].shape, data_name, fusion=False)
    ref = [run(b)[0].astype(np.float64) for b in batches]
    norm = sum(float((r * r).sum()) for r in ref) or 1.0
    errors = np.zeros((len(layers), len(widths)))
    total = len(layers) * len(widths)
    with tqdm(total=total, desc="mixed precision: sensitivity", disable=not progress) as bar:
        for i, ly in enumerate(layers):
            w = run_params[ly.weight].astype(f32)
            for j, b in enumerate(widths):
                run.set_param(ly.weight, nearest_weight(w, ly, b))
                errors[i, j] = sum(float(((run(x)[0] - r) ** 2).sum())
                                   for x, r in zip(batches, ref)) / norm
                bar.update()
            run.set_param(ly.weight, w)
    return [ly.name for ly in layers], np.array([run_params[ly.weight].size
                                                  for ly in layers]), errors


def allocate(sizes: np.ndarray, errors: np.ndarray, widths: Sequence[int],
             budget: float, resolution: int = 200_000) -> np.ndarray:
    """Index into ``widths`` per layer: the least summed error whose average bits per
    weight (``sizes``-weighted) is at most ``budget``.  Dynamic programming over the bits
    spent above the narrowest width (so every layer at the narrowest width always fits),
    counted in units of the greatest common divisor of the layers' extra bits: exact, as
    layer sizes share large factors.  Only where that leaves more than ``resolution`` units
    are costs rounded up to coarser units (the answer still fits, and may waste a little)."""
    widths_a = np.asarray(widths, np.int64)
    sizes = np.asarray(sizes, np.int64)
    if budget < widths_a.min() - 1e-9:
        raise QuantOpsError(f"mixed precision: a budget of {budget:g} bits is below the "
                            f"narrowest width ({widths_a.min():g})")
    narrow = int(widths_a.min())
    extra = sizes[:, None] * (widths_a[None] - narrow)             # (layers, widths) bits
    cap = max(0, int(np.floor(budget * sizes.sum() + 1e-6)) - narrow * int(sizes.sum()))
    unit = max(1, int(np.gcd.reduce(extra[extra > 0])) if (extra > 0).any() else 1)
    if cap // unit > resolution:
        unit = -(-cap // resolution)
    cost = -(-extra // unit)                                      # ceil: never over budget
    room = cap // unit
    best = np.full(room + 1, np.inf)
    best[0] = 0.0
    back = np.zeros((len(sizes), room + 1), np.int8)
    for i in range(len(sizes)):
        new = np.full(room + 1, np.inf)
        for j in range(len(widths_a)):
            c = int(cost[i, j])
            if c > room:
                continue
            cand = np.full(room + 1, np.inf)
            cand[c:] = best[:room + 1 - c] + errors[i, j]
            take = cand < new
            new[take] = cand[take]
            back[i, take] = j
        best = new
    at = int(np.argmin(best))        # finite: every layer at the narrowest width costs 0
    choice = np.zeros(len(sizes), np.int64)
    for i in range(len(sizes) - 1, -1, -1):
        choice[i] = back[i, at]
        at -= int(cost[i, choice[i]])
    return choice


def mixed_policy(graph: Graph, params: dict, batches: Sequence[np.ndarray], budget: float,
                 widths: Sequence[int] = (2, 3, 4, 6, 8), base: dict | None = None,
                 data_name: str = "data", progress: bool = True) -> tuple[dict, dict]:
    """(policy dict, report): ``base`` (a policy dict; default ``trt_int8``) with one
    override per weight-quantized layer giving its chosen bits."""
    widths = sorted({int(b) for b in widths})
    if not widths or widths[0] < 2 or widths[-1] > 8:
        raise QuantOpsError(f"mixed precision: widths must be within 2..8, got {widths}")
    names, sizes, errors = layer_errors(graph, params, batches, widths, data_name, progress)
    choice = allocate(sizes, errors, widths, budget)
    bits = [widths[c] for c in choice]
    policy = dict(base or {"preset": "trt_int8"})
    policy["overrides"] = list(policy.get("overrides", [])) + [
        {"match": n, "weight": {"bits": b}} for n, b in zip(names, bits)]
    avg = float((sizes * np.array(bits)).sum() / sizes.sum())
    report = {"budget": budget, "widths": widths, "average_bits": avg,
              "weights": int(sizes.sum()),
              "layers": [{"layer": n, "weights": int(s), "bits": b,
                          "errors": dict(zip(map(str, widths), map(float, e)))}
                         for n, s, b, e in zip(names, sizes, bits, errors)]}
    log.info("mixed precision: %d layers, average %.3f weight bits (budget %g)", len(names),
             avg, budget)
    return policy, report
