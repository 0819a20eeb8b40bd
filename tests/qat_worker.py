#!/usr/bin/env python3
"""``utils/qat_train.py`` with what only tests need: the ``tiny`` model (a small CNN from a
fixed seed, no checkpoint needed) and ``--fail-at-step N [--fail-rank R]``, which kills
worker R with SIGKILL after optimizer step N (a crashed worker of a distributed job).
SIGTERM and SIGINT are handled as the command line handles them."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant_ops.cli import qat_train  # noqa: E402
from quant_ops.cli.common import stoppable  # noqa: E402

TINY_LR = 0.1   # what the tiny model would have been trained with


def tiny() -> tuple:
    """(float block, (mean, std), float lr) of the tiny test model."""
    import mxnet as mx
    from mxnet.gluon import nn

    mx.random.seed(0)
    net = nn.HybridSequential(prefix="tiny_")
    with net.name_scope():
        net.add(nn.Conv2D(8, 3, padding=1, activation="relu"), nn.MaxPool2D(2),
                nn.Flatten(), nn.Dense(10))
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1, 1, 28, 28)))
    return net, (0.0, 1.0), TINY_LR


def main(argv: list[str] | None = None) -> int:
    ap = qat_train.build_parser()
    ap.add_argument("--fail-at-step", type=int, default=None)
    ap.add_argument("--fail-rank", type=int, default=1)
    args = ap.parse_args(argv)

    def kill_at_step(step: int, rank: int) -> None:
        if rank == args.fail_rank and step == args.fail_at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    return stoppable(lambda: qat_train.run(
        args, models={"tiny": tiny},
        on_step=kill_at_step if args.fail_at_step is not None else None))


if __name__ == "__main__":
    sys.exit(main())
