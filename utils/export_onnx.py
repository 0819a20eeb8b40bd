#!/usr/bin/env python3
"""Export a quantized MXNet model to ONNX QDQ + TensorRT cache, checked against onnxruntime."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant_ops.cli.export_onnx import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
