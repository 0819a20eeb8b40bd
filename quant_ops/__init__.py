"""Quantization toolkit for MXNet 1.9: TensorRT-aligned fake quantization, QAT and PTQ.

``import quant_ops`` loads the C++ operator library into the running MXNet, after which the
operators are ``mx.nd.<Op>`` / ``mx.sym.<Op>`` (e.g. ``mx.nd.Quantization_int8``).
"""
from __future__ import annotations

import logging

from ._lib import load as _load
from .errors import BuildError, QuantOpsError

logging.getLogger(__name__).addHandler(logging.NullHandler())

LIBRARY_PATH = _load()

from . import ops, reference, shape_guard  # noqa: E402  (ops needs the library loaded)
from .ops import FakeQuantInt8, OperatorError, set_training, track_training  # noqa: E402

ops.install_wrappers()
shape_guard.install(lambda: ops.QUANTIZERS)

from . import methods  # noqa: E402
from .model import QuantizedModel, quantize  # noqa: E402
from .policy import QuantPolicy, QuantSpec  # noqa: E402

__version__ = "0.1.0"
__all__ = ["BuildError", "QuantOpsError", "OperatorError", "FakeQuantInt8", "set_training", "track_training",
           "QuantizedModel", "quantize", "QuantPolicy", "QuantSpec", "methods", "ops", "reference",
           "LIBRARY_PATH"]
