"""What the commands share: the error wrapper, argument types, and the models bundled with
the source checkout (``examples/models/``), which only command lines resolve by name."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable

from ..errors import QuantOpsError, mxnet_message
from ..fileio import plain_name
from ..graph.ir import Graph
from ..graph.params import check_params

#: where the source checkout keeps the project's float Fashion-MNIST checkpoints; a
#: regular ``pip install`` does not ship them
EXAMPLE_MODELS = Path(__file__).resolve().parents[2] / "examples" / "models"
BUNDLED_MODELS = ("fmnist_resnet20", "fmnist_mobilenetv2")


def bundled_model(name: str) -> Path:
    """Checkpoint prefix (``PREFIX-symbol.json``, ``PREFIX-0000.params``, ``PREFIX.json``)
    of a model bundled with the checkout, e.g. ``fmnist_resnet20``."""
    if name not in BUNDLED_MODELS:
        raise QuantOpsError(f"unknown model {name!r}: use one of {', '.join(BUNDLED_MODELS)}")
    prefix = EXAMPLE_MODELS / name
    if not Path(f"{prefix}.json").is_file():
        raise QuantOpsError(
            f"{prefix}.json: no such model: the bundled models come with the source "
            f"checkout, not the installed package (train it with examples/train_fmnist.py "
            f"--arch {name.removeprefix('fmnist_')}, or give a checkpoint prefix)")
    return prefix


def model_prefix(text: str) -> Path:
    """A bundled model's name resolved to its prefix; anything else is a prefix already."""
    return bundled_model(text) if text in BUNDLED_MODELS else Path(text)


def shape(text: str) -> tuple:
    """argparse type of ``--input-shape``: ``1,3,224,224`` -> (1, 3, 224, 224)."""
    try:
        dims = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a shape: {text!r} (use e.g. 1,3,224,224)")
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"not a shape: {text!r}")
    return dims


def checked_symbol(graph: Graph, params: dict, params_source: str | Path):
    """``graph`` as an MXNet symbol whose every parameter is in ``params``."""
    import mxnet as mx

    try:
        sym = graph.to_symbol()
    except mx.base.MXNetError as e:
        raise QuantOpsError(f"{graph.source}: MXNet cannot load it: "
                            f"{mxnet_message(e)}") from None
    check_params(sym, params, str(params_source))
    return sym


def output_name(name: str) -> str:
    """A file-name stem given on the command line: no folder part, so outputs stay in
    ``--out``."""
    return plain_name(name, "--name")


def no_overwrite(out: Path, names: list[str], inputs: list,
                 choose: str = "another --out or --name") -> None:
    """Refuse an output that would replace an input (the same file, through any path, or
    a file inside an output folder)."""
    ins = {Path(i).resolve() for i in inputs if i is not None}
    for n in names:
        target = (Path(out) / n).resolve()
        if any(target == i or target in i.parents for i in ins):
            raise QuantOpsError(f"{Path(out) / n}: this output would overwrite an input; "
                                f"choose {choose}")


def error(e: Exception | str) -> int:
    """Print ``e`` as one ``error:`` line on stderr; the exit code of bad input (2)."""
    import mxnet as mx

    text = mxnet_message(e) if isinstance(e, mx.base.MXNetError) and \
        not isinstance(e, QuantOpsError) else " ".join(str(e).split())
    print(f"error: {text}", file=sys.stderr)
    return 2


class Stopped(BaseException):
    """SIGTERM or SIGINT: unwinds like an exception, so every staged output is removed."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop(signum, frame) -> None:
    raise Stopped(signum)


def stoppable(body: Callable[[], int]) -> int:
    """Run ``body`` with SIGTERM and SIGINT turned into ``Stopped``: staging folders are
    removed on the way out (fileio.staged_dir) and the exit code is 128 + the signal's."""
    import signal

    old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return body()
    except Stopped as e:
        name = signal.Signals(e.signum).name
        print(f"stopped by {name}: nothing half-written was left", file=sys.stderr)
        return 128 + e.signum
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_command(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Any],
                argv: list[str] | None) -> int:
    """Parse ``argv`` and ``run`` it: bad input ends with one 'error:' line and exit 2; a
    SIGTERM or SIGINT leaves no half-written output."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import mxnet as mx

    def body() -> int:
        try:
            run(args)
        except (QuantOpsError, OSError, mx.base.MXNetError) as e:
            return error(e)
        return 0
    return stoppable(body)
