#!/usr/bin/env python3
"""EasyQuant (INT8 or INT7) of a float model: quantized, calibrated, then the scales searched
layer by layer for the best cosine to the float outputs (see --help)."""
import os
import sys
from pathlib import Path

os.environ.setdefault("MXNET_SUBGRAPH_VERBOSE", "0")  # one executor per layer: keep quiet
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant_ops.cli.easyquant import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
