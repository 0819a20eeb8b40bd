#!/usr/bin/env python3
"""QAT fine-tuning (single process or one worker of a dist_sync job); see --help."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant_ops.cli.qat_train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
