"""The seed toolkit's learning-rate schedule for quantization-aware fine-tuning."""
from __future__ import annotations

import math

import mxnet as mx

from ..errors import QuantOpsError


class SineScheduler(mx.lr_scheduler.LRScheduler):
    """``lr = base_lr * sin(pi * t / T)`` over ``T = max_update`` updates: starts at 0 (a
    warm-up for ranges that are still settling), peaks at T/2, ends at 0; stays 0 after T."""

    def __init__(self, max_update: int, base_lr: float = 0.01):
        super().__init__(base_lr=base_lr)
        if max_update < 1:
            raise QuantOpsError(f"SineScheduler: max_update must be >= 1, got {max_update}")
        self.max_update = int(max_update)

    def __call__(self, num_update: int) -> float:
        t = min(max(num_update, 0), self.max_update)
        return self.base_lr * math.sin(math.pi * t / self.max_update)
