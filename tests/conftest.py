import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MXNET_SUBGRAPH_VERBOSE", "0")

import quant_ops  # noqa: E402,F401  (loads the operator library once for the session)
