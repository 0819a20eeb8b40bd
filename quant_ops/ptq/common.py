"""What the PTQ passes share: a float or quantized (graph, params) pair as a runnable
function, the project's Fashion-MNIST models, and test accuracy."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import mxnet as mx
import numpy as np

from ..errors import QuantOpsError
from ..graph.ir import Graph, load_graph
from ..graph.params import load_params

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


@contextmanager
def no_fusion() -> Iterator[None]:
    """Bind without MXNet's MKL-DNN subgraph fusion.  With an inner tensor among the
    requested outputs, mxnet 1.9.1 still fuses its producer with what follows (conv + BN,
    conv + ReLU): the bind fails ("arg_names.size() == in_args_map.size()") or the tensors
    downstream come out wrong."""
    key = "MXNET_SUBGRAPH_BACKEND"
    old = os.environ.get(key)
    os.environ[key] = "NONE"
    try:
        yield
    finally:
        if old is None:
            del os.environ[key]
        else:
            os.environ[key] = old


def runner(graph: Graph, params: dict, shape: tuple, data_name: str = "data",
           outputs: list[str] | None = None) -> Callable[[np.ndarray], list]:
    """A function from an input batch of ``shape`` to the graph's outputs (or the named
    internal tensors, e.g. ``conv0_fwd_output``), in inference mode, as numpy arrays."""
    sym = graph.to_symbol()
    if outputs:
        internals = sym.get_internals()
        names = set(internals.list_outputs())
        missing = [o for o in outputs if o not in names]
        if missing:
            raise QuantOpsError(f"{graph.source}: no tensor named {missing[0]!r}")
        sym = mx.sym.Group([internals[o] for o in outputs])
    args = {k: mx.nd.array(params[k]) for k in sym.list_arguments() if k != data_name}
    aux = {k: mx.nd.array(params[k]) for k in sym.list_auxiliary_states()}
    with no_fusion() if outputs else nullcontext():
        exe = sym.bind(mx.cpu(), {**args, data_name: mx.nd.zeros(shape)}, aux_states=aux,
                       grad_req="null")

    def run(x: np.ndarray) -> list:
        exe.arg_dict[data_name][:] = x
        return [o.asnumpy() for o in exe.forward(is_train=False)]

    return run


def predict(graph: Graph, params: dict, x: np.ndarray, batch_size: int = 500,
            data_name: str = "data") -> np.ndarray:
    """The first output of the graph over ``x`` (batches of ``batch_size``; the last,
    shorter batch is padded)."""
    batch_size = min(batch_size, len(x))
    run = runner(graph, params, (batch_size,) + x.shape[1:], data_name)
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        n = len(xb)
        if n < batch_size:
            xb = np.concatenate([xb, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
        out.append(run(xb)[0][:n])
    return np.concatenate(out)


def accuracy(graph: Graph, params: dict, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return float((predict(graph, params, x).argmax(1) == y).mean() * 100)
