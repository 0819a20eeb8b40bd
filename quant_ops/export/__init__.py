"""Deployment formats and checks against the engines that run them.

``export_model`` writes, for one quantized graph: ``<name>.onnx`` (QuantizeLinear /
DequantizeLinear, explicit INT8), ``<name>.calib.cache`` (TensorRT calibration cache for
implicit INT8, activation tensors by their ONNX names) and ``<name>.ranges.json``
(``{tensor: amax}``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..fileio import staged_dir
from ..graph.ir import Graph
from ..graph.quantizers import quantizers

log = logging.getLogger(__name__)


@dataclass
class Exported:
    onnx: Path
    cache: Path
    ranges_json: Path
    graph: Graph        # the deployment graph MXNet runs to match the ONNX model
    params: dict
    ranges: dict
    alignment: dict | None = None   # MXNet against onnxruntime, when checked


def export_model(graph: Graph, params: dict, out_dir: str | Path, name: str,
                 input_shapes: dict | None = None, opset: int = 13,
                 trt_version: int = 8601, activations: str = "s8") -> Exported:
    """Write the three files into ``out_dir`` all or none (``activations``: see
    ``export_onnx``)."""
    from .onnx_qdq import activation_ranges, export_onnx
    from .trt_cache import write_cache, write_ranges_json

    import numpy as np

    from ..errors import QuantOpsError

    if isinstance(trt_version, bool) or not isinstance(trt_version, (int, np.integer)) \
            or trt_version <= 0:
        raise QuantOpsError(f"trt_version must be a positive integer (TensorRT's number for "
                            f"itself, 8601 for 8.6.1), got {trt_version!r}")
    out = Path(out_dir)
    with staged_dir(out) as tmp:
        _, dgraph, dparams = export_onnx(graph, params, tmp / f"{name}.onnx", input_shapes,
                                         opset, activations=activations)
        ranges = activation_ranges(dgraph, dparams)
        unsigned = [q.name for q in quantizers(dgraph) if not q.is_weight and q.unsigned]
        if unsigned:
            log.warning("%s: %d activation quantizers are unsigned (e.g. %s): TensorRT's "
                        "INT8 is signed, so an engine built from %s.calib.cache rounds "
                        "them on a grid half as fine as the simulation's (a trt_int8 "
                        "preset matches TensorRT)", name, len(unsigned), unsigned[0], name)
        write_cache(tmp / f"{name}.calib.cache", ranges, trt_version=trt_version,
                    algorithm="EntropyCalibration2")
        write_ranges_json(tmp / f"{name}.ranges.json", ranges)
    return Exported(out / f"{name}.onnx", out / f"{name}.calib.cache",
                    out / f"{name}.ranges.json", dgraph, dparams, ranges)
