"""BatchNorm statistics measured again on the quantized network.

Weight methods that map weights onto their own scale (``Method.keeps_weight_scale`` false)
train with BatchNorm kept after the layer, which absorbs the new scale in training; but the
running statistics still describe the float weights, so the calibrated model computes
nonsense in inference until they are measured again (the README gives the numbers).
Each BatchNorm's mean and variance are measured on its input in the quantized network in
inference, one layer at a time in graph order (a layer's input depends on the statistics
before it), as BN re-estimation does after quantization.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..graph.ir import Graph
from ..graph.quantizers import tensor_name
from ..graph.runner import Runner


def reestimate_bn(graph: Graph, params: dict, batches: Sequence[np.ndarray],
                  data_name: str = "data") -> tuple[dict, list[str]]:
    """(params with every BatchNorm's moving mean and variance measured on ``batches``
    through ``graph`` as it runs, the BatchNorm nodes)."""
    new = dict(params)
    done = []
    for _, bn in graph.ops():
        if bn.op != "BatchNorm" or len(bn.inputs) < 5:
            continue
        src = graph.nodes[bn.inputs[0][0]]
        tensor = tensor_name(src, bn.inputs[0][1])
        axis = int(bn.attrs.get("axis", "1"))
        total = square = None
        count = 0
        runners: dict = {}
        for b in batches:
            if b.shape not in runners:
                runners[b.shape] = Runner(graph, new, b.shape, data_name, [tensor])
            y = np.moveaxis(runners[b.shape](b)[0].astype(np.float64), axis, 0)
            y = y.reshape(y.shape[0], -1)
            total = y.sum(1) if total is None else total + y.sum(1)
            square = (y * y).sum(1) if square is None else square + (y * y).sum(1)
            count += y.shape[1]
        if not count:
            continue
        mean = total / count
        var = np.maximum(square / count - mean * mean, 0.0)
        mean_key = graph.nodes[bn.inputs[3][0]].name
        var_key = graph.nodes[bn.inputs[4][0]].name
        new[mean_key] = mean.astype(np.float32).reshape(np.shape(params[mean_key]))
        new[var_key] = var.astype(np.float32).reshape(np.shape(params[var_key]))
        done.append(bn.name)
    return new, done
