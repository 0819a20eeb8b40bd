#!/usr/bin/env python3
"""Quantize an MXNet symbol graph or a gluoncv model by a policy (see --help)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant_ops.cli.graph_optimize import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
