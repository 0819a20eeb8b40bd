#!/usr/bin/env python3
"""Low-bit PTQ of a float model with AdaRound: quantized, calibrated, then each weight's
rounding learned layer by layer (see --help)."""
import os
import sys
from pathlib import Path

os.environ.setdefault("MXNET_SUBGRAPH_VERBOSE", "0")  # one executor per layer: keep quiet
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant_ops.cli.adaround import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
