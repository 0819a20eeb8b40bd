"""Keep learned quantizer parameters in the domain their method is defined on.

SGD knows nothing of domains: DSQ's softness ``alpha`` must stay in (0, 0.5) (beyond it the
soft staircase is undefined and training diverges; seen at 2-3 bits), a clip, step or
interval must stay positive, and a DSQ range must keep ``upper > lower``.  ``fit`` projects
the parameters back after every optimizer step (the DSQ paper clips alpha the same way).
"""
from __future__ import annotations

import mxnet as mx
import numpy as np
from mxnet import gluon

TINY = 1e-8
#: parameter-name suffix (as the graph rewrite names them) -> (min, max)
BOUNDS = {"_dsq_alpha": (1e-3, 0.5 - 1e-3), "_pact_gamma": (TINY, None),
          "_lsq_step": (TINY, None), "_qil_distance": (TINY, None), "_qil_gamma": (TINY, None)}
MIN_WIDTH = 1e-4   # smallest DSQ range kept


class Projector:
    """Built once per net; calling it projects the net's learned quantizer parameters in
    place and returns how many arrays it changed (0 on an ordinary step)."""

    def __init__(self, net: gluon.Block):
        params = {n: p for n, p in net.collect_params().items() if p.grad_req != "null"}
        self.bounded = [(p, b) for n, p in params.items()
                        for s, b in BOUNDS.items() if n.endswith(s)]
        self.ranges = [(params[n[:-len("_upper")] + "_lower"], p) for n, p in params.items()
                       if n.endswith("_dsq_upper") and n[:-len("_upper")] + "_lower" in params]

    def __bool__(self) -> bool:
        return bool(self.bounded or self.ranges)

    def __call__(self) -> int:
        changed = 0
        for p, (lo, hi) in self.bounded:
            for d in p.list_data():
                v = d.asnumpy()
                c = v.clip(lo, hi)
                if (c != v).any():
                    d[:] = mx.nd.array(c, ctx=d.context)
                    changed += 1
        for lower, upper in self.ranges:
            for dl, du in zip(lower.list_data(), upper.list_data()):
                lo, hi = dl.asnumpy(), du.asnumpy()
                bad = hi - lo < MIN_WIDTH / 2   # (set to MIN_WIDTH: float32 rounding safe)
                if bad.any():
                    mid = (lo + hi) / 2
                    dl[:] = mx.nd.array(np.where(bad, mid - MIN_WIDTH / 2, lo), ctx=dl.context)
                    du[:] = mx.nd.array(np.where(bad, mid + MIN_WIDTH / 2, hi), ctx=du.context)
                    changed += 1
        return changed
