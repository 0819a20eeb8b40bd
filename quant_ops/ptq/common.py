"""What the PTQ passes share: a float or quantized (graph, params) pair as a runnable
function (``quant_ops.graph.runner``), the project's Fashion-MNIST models, and test
accuracy."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import QuantOpsError
from ..graph.ir import Graph, load_graph
from ..graph.params import load_params
from ..graph.runner import Runner as runner, accuracy, no_fusion, predict  # noqa: F401

MODELS = Path(__file__).resolve().parents[2] / "examples" / "models"


@dataclass
class FloatModel:
    graph: Graph
    params: dict          # name -> numpy array
    mean: float           # input normalisation the model was trained with
    std: float
    accuracy: float       # float test accuracy recorded at training time

    def normalize(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float32)


def load_fmnist_model(name: str = "resnet20") -> FloatModel:
    """One of the project's float Fashion-MNIST models (``resnet20``, ``mobilenetv2``)."""
    prefix = MODELS / f"fmnist_{name}"
    info_path = prefix.with_suffix(".json")
    if not info_path.is_file():
        raise QuantOpsError(f"{info_path}: no such model (train it with "
                            f"examples/train_fmnist.py --arch {name})")
    info = json.loads(info_path.read_text())
    return FloatModel(load_graph(f"{prefix}-symbol.json"), load_params(f"{prefix}-0000.params"),
                      info["normalize"]["mean"], info["normalize"]["std"], info["test_accuracy"])
