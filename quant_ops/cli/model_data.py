"""The model and data arguments of the commands that quantize a float model with the user's
data (``sensitivity``, ``dfq``, ``easyquant``, ``graph_optimize --calib``), and writing a
quantized model with its report."""
from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import QuantOpsError
from ..policy import QuantPolicy
from .common import BUNDLED_MODELS, model_prefix, no_overwrite, output_name, shape

#: input shape of the bundled Fashion-MNIST checkpoints (and of any checkpoint whose
#: ``PREFIX.json`` holds the normalization: the project's Fashion-MNIST format)
FMNIST_SHAPE = (1, 1, 28, 28)
DATA_HELP = "a .npy (images), a .npz ('x'/'y' or 'data'/'label'), an image folder, or fmnist"


def floats(text: str) -> tuple:
    """argparse type of ``--mean``/``--std``/``--input-range``: ``0.485,0.456,0.406``."""
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not all(math.isfinite(v) for v in vals):
        raise argparse.ArgumentTypeError(f"not finite: {text!r}")
    return vals


def add_model_args(p: argparse.ArgumentParser, default_model: str | None = None) -> None:
    """``--model`` / ``--symbol`` + ``--params``, ``--epoch``, ``--input-shape``, ``--mean``,
    ``--std``."""
    dflt = f"; default {default_model}" if default_model else ""
    p.add_argument("--model",
                   help=f"a bundled model ({', '.join(BUNDLED_MODELS)}{dflt}) or a checkpoint "
                        "prefix: PREFIX-symbol.json, PREFIX-EPOCH.params and, if present, "
                        "PREFIX.json (its input normalization: a Fashion-MNIST model)")
    p.add_argument("--symbol", type=Path, help="float symbol JSON (any model; with --params)")
    p.add_argument("--params", type=Path, help="its params")
    p.add_argument("--epoch", type=int, default=0, help="params epoch of --model (default 0)")
    p.add_argument("--input-shape", type=shape,
                   help="N,C,H,W the model takes (image folders are resized to it; default "
                        "for Fashion-MNIST models 1,1,28,28, else from the data)")
    p.add_argument("--mean", type=floats,
                   help="pixel normalization (x - mean) / std of image folders, fmnist and "
                        "uint8 arrays, one value or one per channel (default: PREFIX.json's; "
                        "float arrays are taken as they are)")
    p.add_argument("--std", type=floats, help="see --mean")


def add_data_args(p: argparse.ArgumentParser, calib: str = "calibration data") -> None:
    """The ``data`` group of the PTQ commands: ``--calib``, ``--test``, their limits, the
    batch size."""
    d = p.add_argument_group("data")
    d.add_argument("--calib", help=f"{calib}: {DATA_HELP}")
    d.add_argument("--test", help=f"evaluation data with labels: {DATA_HELP}")
    d.add_argument("--calib-images", type=int, help="at most this many (default 512)")
    d.add_argument("--test-images", type=int, help="at most this many (default: all)")
    d.add_argument("--batch-size", type=int, default=64)


def add_output_args(p: argparse.ArgumentParser) -> None:
    """``--name``, ``--no-progress`` and the required ``--out``."""
    p.add_argument("--name", help="file name stem (default: the model's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", type=Path, required=True, help="output folder")


def check_counts(args: argparse.Namespace, *flags: str) -> None:
    """The data counts and the given integer flags (``--rounds``) are >= 1 where set."""
    for flag in ("--calib-images", "--test-images", "--batch-size", *flags):
        v = getattr(args, flag[2:].replace("-", "_"))
        if v is not None and v < 1:
            raise QuantOpsError(f"{flag} must be >= 1, got {v}")


@dataclass
class ModelSource:
    """Where the model comes from, before anything but ``PREFIX.json`` is read."""

    symbol: Path
    params: Path
    name: str
    label: str                  #: how the user named it, for messages
    info: dict | None           #: PREFIX.json (bundled and Fashion-MNIST checkpoints)
    normalize: tuple | None     #: (mean, std) of pixel sources
    input_shape: tuple | None
    prefix: Path | None = None  #: the checkpoint prefix of --model

    @property
    def fmnist(self) -> bool:
        """A Fashion-MNIST checkpoint: its data may default to ``fmnist``."""
        return self.info is not None

    def load(self):
        """The float ``QuantizedModel``, checked against its params."""
        from ..model import QuantizedModel

        m = QuantizedModel.from_symbol(self.symbol, self.params)   # checks the params
        m.name = self.name
        if self.input_shape is not None:
            m.set_input_shape(self.input_shape)
        return m


def model_source(args: argparse.Namespace, default_model: str | None = None) -> ModelSource:
    """Resolve ``--model`` (a bundled name or a prefix) or ``--symbol``/``--params``."""
    from ..ptq.common import read_model_info

    if args.epoch < 0:
        raise QuantOpsError(f"--epoch must be >= 0, got {args.epoch}")
    if (args.mean is None) != (args.std is None):
        raise QuantOpsError("--mean and --std go together")
    if args.symbol is not None or args.params is not None:
        if args.model is not None:
            raise QuantOpsError("give --model or --symbol/--params, not both")
        if args.symbol is None or args.params is None:
            raise QuantOpsError("--symbol needs --params" if args.params is None
                                else "--params needs --symbol")
        name = args.symbol.name.split("-symbol")[0].removesuffix(".json") or "model"
        symbol, params, info, label = args.symbol, args.params, None, str(args.symbol)
        prefix = None
    else:
        label = args.model or default_model
        if label is None:
            raise QuantOpsError("give the model: --model NAME|PREFIX, or --symbol FILE "
                                "--params FILE")
        prefix = model_prefix(label)
        info = read_model_info(prefix) if Path(f"{prefix}.json").is_file() else None
        symbol, params = Path(f"{prefix}-symbol.json"), Path(f"{prefix}-{args.epoch:04d}.params")
        name = prefix.name
    if args.mean is not None:
        norm = (args.mean[0] if len(args.mean) == 1 else list(args.mean),
                args.std[0] if len(args.std) == 1 else list(args.std))
    elif info is not None:
        norm = (float(info["normalize"]["mean"]), float(info["normalize"]["std"]))
    else:
        norm = None
    input_shape = args.input_shape or (FMNIST_SHAPE if info is not None else None)
    return ModelSource(symbol, params, name, label, info, norm, input_shape, prefix)


def no_data_error(src: ModelSource, what: str = "--calib DATA (and --test DATA for "
                                                "accuracy)") -> QuantOpsError:
    """The error for a model whose data is unknown."""
    why = ("not a bundled model" if src.prefix is None else
           f"not a bundled model and no {src.prefix}.json with its input normalization")
    return QuantOpsError(f"{src.label}: {why}, so its data is unknown: pass {what}; "
                         f"DATA is {DATA_HELP}")


def load_set(spec: str, src: ModelSource, flag: str, split: str, limit: int | None,
             explicit: bool, progress: bool, labels: bool):
    """``--calib``/``--test`` data for ``src``'s model (``datasets.Data``)."""
    from ..datasets import load_data

    data = load_data(spec, src.input_shape, split=split, normalize=src.normalize,
                     limit=limit, progress=progress)
    if explicit and limit is not None and len(data) < limit:
        raise QuantOpsError(f"{flag}-images {limit}: {data.source} has {len(data)} images")
    if labels and data.y is None:
        raise QuantOpsError(f"{data.source}: no labels for {flag} (an .npz with 'y' or "
                            "'label', or an image folder with class subfolders)")
    return data


def check_fits(model, data, labels: bool = False) -> None:
    """The data's images fit the model (the error names the layer that does not), and, with
    ``labels`` (data whose labels are used), its labels are classes the model has (a
    classifier's output width)."""
    model.set_input_shape((1,) + tuple(data.x.shape[1:]))
    if not labels or data.y is None or not len(data.y):
        return
    _, outs, _ = model.run_graph.to_symbol().infer_shape(
        **{model.data_names[0]: (1,) + tuple(data.x.shape[1:])})
    if outs and len(outs[0]) == 2 and int(data.y.max()) >= outs[0][1]:
        raise QuantOpsError(f"{data.source}: label {int(data.y.max())} is out of range: the "
                            f"model has {outs[0][1]} classes (labels 0..{outs[0][1] - 1})")


def load_policy(text: str) -> QuantPolicy:
    """A preset name or a policy file."""
    if Path(text).suffix.lower() in (".json", ".yaml", ".yml") or Path(text).is_file():
        return QuantPolicy.load(text)
    return QuantPolicy.preset(text)


def jsonable(v: Any) -> Any:
    """``v`` with tuples, numpy scalars and arrays, and paths made JSON-ready."""
    import numpy as np

    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    return v


def write_quantized(out: Path, model, name: str, report: dict,
                    markdown: Callable[[dict], str], extra: dict | None = None) -> list[str]:
    """``<name>-quant-symbol.json``/``-0000.params``, ``report.json``, ``report.md``
    (``markdown(report)``) and the ``extra`` {file name: text} into ``out``, all or none;
    the file names."""
    from ..fileio import atomic_write_text, staged_dir

    extra = extra or {}
    files = [f"{name}-quant-symbol.json", f"{name}-quant-0000.params", "report.json",
             "report.md", *extra]
    report["outputs"] = files
    with staged_dir(out) as tmp:
        model.save(tmp / f"{name}-quant")
        atomic_write_text(tmp / "report.json", json.dumps(jsonable(report), indent=1))
        atomic_write_text(tmp / "report.md", markdown(report))
        for fname, text in extra.items():
            atomic_write_text(tmp / fname, text)
    return files


def report_head(rep: dict, title: str, then: str, result: tuple) -> list[str]:
    """The opening of a PTQ report in Markdown: model, policy, calibration (``then``: what
    followed it), and the top-1 table of float, calibrated and ``result`` (its key in
    ``accuracy``, its column title) when there is a test set."""
    c = rep["calibration"]
    lines = [f"# {title}: {rep['model']}", "", f"- model: `{rep['symbol']}`, `{rep['params']}`",
             f"- policy: {rep['policy']} ({rep['quantizers']} quantizers)",
             f"- calibration: {c['method']} on {c['images']} images ({c['data']}), then {then}"]
    lines += [f"- {n}" for n in c["notes"]]
    if "accuracy" in rep:
        a = rep["accuracy"]
        lines += ["", f"## Top-1 on {a['images']} images ({a['test']})", "",
                  f"| float | calibrated | {result[1]} |", "|---|---|---|",
                  f"| {pct(a['float'])} | {pct(a['calibrated'])} | {pct(a[result[0]])} |"]
    return lines


def seconds_and_files(rep: dict) -> list[str]:
    """The closing sections of a PTQ report in Markdown: time per stage, files written."""
    lines = ["", "## Seconds", "", "| stage | s |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in rep["seconds"].items()]
    return lines + ["", "## Files", ""] + [f"- {f}" for f in rep["outputs"]]


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}%"


class PTQRun:
    """What a PTQ command does around its passes: the float model and its ``--calib`` /
    ``--test`` sets loaded and checked, each stage timed, accuracies recorded, the quantized
    model and its report written (all or none) and summed up on the terminal."""

    def __init__(self, args: argparse.Namespace, calib_required: bool,
                 extra_files: tuple = ()):
        self.t_start = time.perf_counter()
        self.args, self.progress = args, not args.no_progress
        self.times: dict = {}
        self.accuracy: dict = {}
        self.src = model_source(args)
        self.model = self.src.load()
        if self.model.is_quantized:
            raise QuantOpsError(f"{self.src.label}: already quantized: give the float model")
        self.name = output_name(args.name) if args.name is not None else self.src.name
        no_overwrite(args.out, [f"{self.name}-quant-symbol.json",
                                f"{self.name}-quant-0000.params", "report.json", "report.md",
                                *extra_files],
                     [self.src.symbol, self.src.params, args.calib, getattr(args, "test", None),
                      getattr(args, "policy", None)])
        self.calib = self.test = None
        with self.stage("data"):
            if args.calib or calib_required:
                self.calib = self._load(args.calib, "--calib", "train",
                                        args.calib_images or 512, args.calib_images, False)
            if args.test:
                self.test = self._load(args.test, "--test", "test", args.test_images,
                                       args.test_images, True)

    def _load(self, spec, flag, split, limit, given, labels):
        data = load_set(spec, self.src, flag, split, limit, given is not None, self.progress,
                        labels=labels)
        check_fits(self.model, data, labels)
        return data

    @contextmanager
    def stage(self, label: str) -> Iterator[None]:
        """``with run.stage("dfq"): ...`` adds the seconds it took to the report."""
        t = time.perf_counter()
        yield
        self.times[label] = self.times.get(label, 0.0) + time.perf_counter() - t

    def quantize_and_calibrate(self, policy, method: str) -> list:
        """The model quantized with ``policy`` (BatchNorm folded as ``--fold-bn`` says) and
        calibrated on ``--calib`` by ``method``; the calibration batches."""
        fold = self.args.fold_bn
        with self.stage("quantize + calibrate"):
            self.model.quantize(policy, fold_bn=None if fold == "none" else fold)
            batches = self.calib.batches(self.args.batch_size)
            self.model.calibrate(batches, method, progress=self.progress)
        return batches

    def evaluate(self, key: str, label: str) -> None:
        """Top-1 of the model as it is now on ``--test`` (if given), as ``accuracy[key]``."""
        if self.test is not None:
            with self.stage(f"evaluate {label}"):
                self.accuracy[key] = self.model.evaluate(
                    self.test.batches(self.args.batch_size, True), progress=self.progress)

    def finish(self, report: dict, markdown: Callable[[dict], str],
               summary: Callable[[dict], None], extra: dict | None = None) -> dict:
        """Accuracy and seconds into ``report``; the files written; the summary printed."""
        if self.test is not None:
            report["accuracy"] = {"test": self.test.source, "images": len(self.test),
                                  **self.accuracy}
        self.times["total"] = time.perf_counter() - self.t_start
        report["seconds"] = {k: round(v, 2) for k, v in self.times.items()}
        files = write_quantized(self.args.out, self.model, self.name, report, markdown, extra)
        summary(report)
        print(f"wrote {self.args.out}/: {', '.join(files)}")
        return report
