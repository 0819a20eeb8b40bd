#!/usr/bin/env python3
"""Mixed precision: each layer's weight bits chosen under a size budget from measured
sensitivity (see --help)."""
import os
import sys
from pathlib import Path

os.environ.setdefault("MXNET_SUBGRAPH_VERBOSE", "0")  # one executor per layer: keep quiet
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant_ops.cli.mixed_precision import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
