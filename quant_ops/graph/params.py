"""Read and write ``.params`` files next to a graph: plain names in memory, MXNet's
``arg:``/``aux:`` prefixes on disk, written atomically."""
from __future__ import annotations

from pathlib import Path

import mxnet as mx
import numpy as np

from ..errors import QuantOpsError
from ..fileio import atomic_write
from .params_file import read_params_file


def as_numpy(v, dtype=None) -> np.ndarray:
    """The one conversion of an array-like (NDArray, numpy, list) to numpy at a library
    boundary; ``dtype`` casts."""
    a = v.asnumpy() if isinstance(v, mx.nd.NDArray) else v
    return np.asarray(a, dtype) if dtype is not None else np.asarray(a)


def check_arrays(params: dict, source: str, cast: bool = False) -> dict:
    """Params as they enter the toolkit: float32 (other float types are refused, or cast
    when ``cast``: the kernels compute in float32 and a silent cast hides a wrong file) and
    finite.  Returns the (cast) dict; errors name the array."""
    out = {}
    for k, v in params.items():
        a = np.asarray(v)
        if a.dtype != np.float32:
            if not (cast and np.issubdtype(a.dtype, np.floating)):
                raise QuantOpsError(f"{source}: parameter '{k}' is {a.dtype}, not float32"
                                    + ("" if cast else " (convert the file to float32; in the Python API, cast=True converts float types)"))
            a = a.astype(np.float32)
        if a.size and not np.isfinite(a).all():
            raise QuantOpsError(f"{source}: parameter '{k}' has NaN or infinite values")
        out[k] = a
    return out


def load_params(path: str | Path, cast: bool = False) -> dict:
    """name -> numpy array (float32, finite: see ``check_arrays``); accepts Module
    (``arg:``/``aux:``) and Gluon (plain) files."""
    p = Path(path)
    if not p.is_file():
        raise QuantOpsError(f"{p}: params file not found")
    raw = read_params_file(p)     # (not mx.nd.load: a spliced file can crash it)
    if not isinstance(raw, dict):
        raise QuantOpsError(f"{p}: holds unnamed arrays, not parameters")
    named: dict = {}
    for k, v in raw.items():
        name = k.split(":", 1)[1] if k.startswith(("arg:", "aux:")) else k
        if name in named:
            raise QuantOpsError(f"{p}: parameter '{name}' is in the file twice ("
                                f"'{named[name][0]}' and '{k}'): which one is meant?")
        named[name] = (k, v)
    return check_arrays({name: v for name, (_, v) in named.items()}, str(p), cast)


def check_params(sym, params: dict, source: str, data_names=("data",)) -> None:
    """Every parameter of ``sym`` is in ``params`` (state of quantizers aside)."""
    missing = [n for n in sym.list_arguments() + sym.list_auxiliary_states()
               if n not in params and n not in data_names]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise QuantOpsError(f"{source}: the params do not match the symbol: missing "
                            f"{', '.join(missing[:5])}{more}")


def save_params(path: str | Path, sym, params: dict) -> None:
    """Save the parameters ``sym`` uses with ``arg:``/``aux:`` prefixes, atomically."""
    p = Path(path)
    aux = set(sym.list_auxiliary_states())
    used = set(sym.list_arguments()) | aux
    arrays = {f"{'aux' if k in aux else 'arg'}:{k}": mx.nd.array(v, dtype=np.asarray(v).dtype)
              for k, v in params.items() if k in used}
    atomic_write(p, lambda tmp: mx.nd.save(str(tmp), arrays))
