"""Learned quantizer parameters as their methods train them.

SGD knows nothing of domains: a softness must stay inside the interval where the soft
staircase is defined (beyond it training diverges; seen at 2-3 bits), a clip, step or
interval must stay positive, a learned range must keep ``upper > lower``.  ``fit`` projects
the parameters back after every optimizer step (each descriptor's ``project``, as the
papers clip them) and gives them their method's learning-rate and weight-decay
multipliers.  Both come from
each method's descriptor (``quant_ops.methods``), found through the net's graph.
"""
from __future__ import annotations

import mxnet as mx
import numpy as np
from mxnet import gluon

from ..graph.quantizers import Quantizer
from ..ops import block_quantizers


def _learned(net: gluon.Block) -> list[tuple[Quantizer, dict]]:
    """(quantizer, {input: Parameter}) for every quantizer with trained inputs in ``net``."""
    params = {p.name: p for p in net.collect_params().values() if p.grad_req != "null"}
    res = []
    for q in block_quantizers(net):
        mine = {k: params[v] for k, v in q.learned().items() if v in params}
        if mine:
            res.append((q, mine))
    return res


def apply_multipliers(net: gluon.Block) -> int:
    """Give learned quantizer parameters their method's lr / wd multipliers; returns how
    many parameters it set."""
    n = 0
    for q, mine in _learned(net):
        for p in mine.values():
            p.lr_mult, p.wd_mult = q.method.lr_mult, q.method.wd_mult
            n += 1
    return n


class Projector:
    """Built once per net; calling it projects the net's learned quantizer parameters in
    place and returns how many arrays it changed (0 on an ordinary step)."""

    def __init__(self, net: gluon.Block):
        self.groups = _learned(net)

    def __bool__(self) -> bool:
        return bool(self.groups)

    def __call__(self) -> int:
        changed = 0
        for q, mine in self.groups:
            names = list(mine)
            for datas in zip(*(mine[n].list_data() for n in names)):  # one set per device
                values = {n: d.asnumpy() for n, d in zip(names, datas)}
                new = q.method.project(values)
                for n, d in zip(names, datas):
                    if n in new:
                        d[:] = mx.nd.array(np.asarray(new[n], np.float32), ctx=d.context)
                        changed += 1
        return changed
