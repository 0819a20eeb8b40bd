#!/usr/bin/env python3
"""Per-layer quantization sensitivity of a float Fashion-MNIST checkpoint, with an HTML
report and a policy that keeps the most sensitive layers in float (see --help)."""
import os
import sys
from pathlib import Path

os.environ.setdefault("MXNET_SUBGRAPH_VERBOSE", "0")  # one executor per layer: keep quiet
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant_ops.cli.sensitivity import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
