#!/usr/bin/env python3
"""Data-Free Quantization of a float model (ReLU6 -> ReLU, cross-layer equalization, bias
correction, weight clipping, ZeroQ ranges), quantized and calibrated (see --help)."""
import os
import sys
from pathlib import Path

os.environ.setdefault("MXNET_SUBGRAPH_VERBOSE", "0")  # one executor per batch shape: quiet
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant_ops.cli.dfq import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
