"""What the PTQ passes share: a float or quantized (graph, params) pair as a runnable
function (``quant_ops.graph.runner``), float checkpoints with their input normalization
(the project's Fashion-MNIST models), and test accuracy."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import QuantOpsError
from ..graph.ir import Graph, load_graph
from ..graph.params import load_params
from ..graph.runner import Runner as runner, accuracy, no_fusion, predict  # noqa: F401


@dataclass
class FloatModel:
    graph: Graph
    params: dict          # name -> numpy array
    mean: float           # input normalisation the model was trained with
    std: float
    accuracy: float | None  # float test accuracy recorded at training time, if any

    def normalize(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float32)


def read_model_info(prefix: str | Path) -> dict:
    """``PREFIX.json`` of a float checkpoint: ``{"normalize": {"mean": .., "std": ..}, ..}``
    (also ``lr`` and ``test_accuracy`` when it was trained here), normalization checked."""
    path = Path(f"{prefix}.json")
    try:
        info = json.loads(path.read_text())
        mean, std = float(info["normalize"]["mean"]), float(info["normalize"]["std"])
    except OSError as e:
        raise QuantOpsError(f"{path}: cannot read the model's normalization "
                            f"({e.strerror})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise QuantOpsError(f"{path}: needs \"normalize\": {{\"mean\": .., \"std\": ..}}"
                            f" ({type(e).__name__}: {e})") from None
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise QuantOpsError(f"{path}: normalize std must be > 0 and both finite")
    return info


def load_fmnist_model(prefix: str | Path, epoch: int = 0) -> FloatModel:
    """The float checkpoint ``PREFIX-symbol.json``, ``PREFIX-EPOCH.params`` (``%04d``) and
    ``PREFIX.json`` (its normalization), e.g. one of the project's Fashion-MNIST models
    (``quant_ops.cli.common.bundled_model`` gives their prefixes in the checkout)."""
    info = read_model_info(prefix)
    return FloatModel(load_graph(f"{prefix}-symbol.json"),
                      load_params(f"{prefix}-{epoch:04d}.params"),
                      float(info["normalize"]["mean"]), float(info["normalize"]["std"]),
                      info.get("test_accuracy"))
