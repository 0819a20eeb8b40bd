"""Training checkpoints that are whole or absent and never run code.

A checkpoint is one directory: ``net.params`` (MXNet's own format, the net's parameters,
quantizer state included), ``optimizer.npz`` (the optimizer's state as named arrays, read
with ``allow_pickle=False``: MXNet's ``Trainer.save_states`` pickles, and unpickling a
planted file runs its code) and ``progress.json`` (where the run stands, and the SHA-256 of
the other two).  It is written into a hidden sibling and renamed into place; a resume checks
every part against ``progress.json`` and refuses, naming the file, when one differs.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet import gluon

from ..errors import QuantOpsError, mxnet_message
from ..fileio import _umask, atomic_write
from ..graph.params_file import read_params_file

PARTS = ("net.params", "optimizer.npz")
PROGRESS = "progress.json"


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _updaters(trainer: gluon.Trainer) -> list:
    if not trainer._kv_initialized:
        trainer._init_kvstore()
    if trainer._update_on_kvstore:
        return [trainer._kvstore._updater]
    return list(trainer._updaters)


def _flat(state) -> list:
    if state is None:
        return []
    if isinstance(state, (list, tuple)):
        return [a for s in state for a in _flat(s)]
    return [state]


def optimizer_arrays(trainer: gluon.Trainer) -> dict[str, np.ndarray]:
    """The optimizer's state as ``{"<device>/<param>/<k>": array}``."""
    names = {i: p.name for i, p in enumerate(trainer._params)}
    out = {}
    for d, u in enumerate(_updaters(trainer)):
        for idx, st in u.states.items():
            for k, a in enumerate(_flat(st)):
                out[f"{d}/{names[idx]}/{k}"] = a.asnumpy()
    return out


def _fill(state, values: list, where: str) -> None:
    arrays = _flat(state)
    if len(arrays) != len(values):
        raise QuantOpsError(f"{where}: {len(values)} arrays for a state of {len(arrays)}")
    for a, v in zip(arrays, values):
        if a.shape != v.shape:
            raise QuantOpsError(f"{where}: shape {v.shape}, the optimizer has {a.shape}")
        a[:] = v


def load_optimizer_arrays(trainer: gluon.Trainer, arrays: dict, source: str) -> None:
    """Put arrays saved by ``optimizer_arrays`` back into the trainer's optimizer."""
    index = {p.name: i for i, p in enumerate(trainer._params)}
    grouped: dict = {}
    for key, v in arrays.items():
        try:
            d, name, k = key.split("/")
            grouped.setdefault((int(d), name), {})[int(k)] = v
        except ValueError:
            raise QuantOpsError(f"{source}: unexpected entry {key!r}") from None
    updaters = _updaters(trainer)
    opt = trainer._optimizer
    for (d, name), vals in grouped.items():
        if name not in index or d >= len(updaters):
            raise QuantOpsError(f"{source}: state of '{name}' (device {d}) does not belong "
                                "to this net")
        idx = index[name]
        u = updaters[d]
        datas = trainer._params[idx].list_data()
        weight = datas[min(d, len(datas) - 1)]
        u.states[idx] = opt.create_state_multi_precision(idx, weight)
        _fill(u.states[idx], [vals[k] for k in sorted(vals)], f"{source}: '{name}'")
        u.states_synced[idx] = False


def save(ckpt: Path, net: gluon.Block, trainer: gluon.Trainer, progress: dict) -> None:
    """Write the checkpoint directory ``ckpt`` whole (staged, then renamed into place)."""
    ckpt = Path(ckpt)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=ckpt.parent, prefix=f".{ckpt.name}.staged-"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        atomic_write(tmp / "net.params", lambda p: net.save_parameters(str(p)))
        arrays = optimizer_arrays(trainer)
        atomic_write(tmp / "optimizer.npz", lambda p: _savez(p, arrays))
        record = {**progress, "parts": {n: _digest(tmp / n) for n in PARTS}}
        atomic_write(tmp / PROGRESS, lambda p: p.write_text(json.dumps(record, indent=1)))
        old = ckpt.with_name(f".{ckpt.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if ckpt.exists():
            os.rename(ckpt, old)
        os.rename(tmp, ckpt)
        _remove(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _remove(path: Path) -> None:
    """Remove a folder even when a signal's exception (SIGTERM, SIGINT) interrupts the
    removal: it is finished first, then the exception goes on."""
    pending = None
    for _ in range(3):
        try:
            shutil.rmtree(path, ignore_errors=True)
            break
        except BaseException as e:  # noqa: B036  (re-raised below)
            pending = e
    if pending is not None:
        raise pending


def check_progress(progress: dict, steps_per_epoch: int, epochs: int, source: str) -> None:
    """A resumed record must be a point of this run: whole numbers in range, and the step
    the epoch and batch give (a record edited by hand, or of another schedule, is refused
    rather than trained on from a wrong place)."""
    def whole(key: str, low: int, high: int) -> int:
        v = progress.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
            raise QuantOpsError(f"{source}: '{key}' is {v!r}; a checkpoint of this run has a "
                                f"whole number from {low} to {high}")
        return v

    epoch = whole("epoch", 0, epochs)
    batch = whole("batch", 0, steps_per_epoch - 1 if epoch < epochs else 0)
    step = whole("step", 0, epochs * steps_per_epoch)
    if step != epoch * steps_per_epoch + batch:
        raise QuantOpsError(f"{source}: step {step} is not epoch {epoch}, batch {batch} of "
                            f"{steps_per_epoch} batches an epoch: the record is not of this "
                            "run")
    for key in ("history", "curve"):
        if not isinstance(progress.get(key, []), list):
            raise QuantOpsError(f"{source}: '{key}' is not a list")
    for key in ("run_loss", "run_n"):
        v = progress.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) \
                or v < 0:
            raise QuantOpsError(f"{source}: '{key}' is {v!r}, not a finite number >= 0")


def check_finite(net: gluon.Block, source: str) -> None:
    """Every parameter and state the checkpoint put into ``net`` is finite."""
    for name, p in net.collect_params().items():
        if p._data is None:
            continue
        if not np.isfinite(p.data().asnumpy()).all():
            raise QuantOpsError(f"{source}: '{name}' holds NaN or infinite values")


def _savez(path: Path, arrays: dict) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def find(ckpt: Path) -> Path | None:
    """The checkpoint to resume from: ``ckpt``, or the previous one when a save was killed
    between its two renames; None when there is none."""
    ckpt = Path(ckpt)
    if (ckpt / PROGRESS).is_file():
        return ckpt
    old = ckpt.with_name(f".{ckpt.name}.old")
    if (old / PROGRESS).is_file() and not ckpt.exists():
        os.rename(old, ckpt)
        return ckpt
    return None


def load(ckpt: Path, net: gluon.Block, trainer: gluon.Trainer) -> dict:
    """Load a checkpoint into ``net`` and ``trainer``; returns its progress record.  Refuses
    a checkpoint whose parts do not all come from one save."""
    ckpt = Path(ckpt)
    try:
        progress = json.loads((ckpt / PROGRESS).read_text())
    except (OSError, ValueError) as e:
        raise QuantOpsError(f"{ckpt / PROGRESS}: not a readable checkpoint record ({e})") \
            from None
    parts = progress.get("parts") if isinstance(progress, dict) else None
    if not isinstance(parts, dict) or not isinstance(progress.get("step"), int):
        raise QuantOpsError(f"{ckpt / PROGRESS}: not a checkpoint record of this toolkit "
                            "(no step or parts)")
    for name in PARTS:
        path = ckpt / name
        if not path.is_file():
            raise QuantOpsError(f"{path}: missing from the checkpoint")
        if _digest(path) != parts.get(name):
            raise QuantOpsError(f"{path}: does not belong to the checkpoint of step "
                                f"{progress['step']} (changed or from another save)")
    read_params_file(ckpt / "net.params")   # well-formed before MXNet's reader sees it
    try:
        net.load_parameters(str(ckpt / "net.params"))
    except (mx.base.MXNetError, AssertionError, ValueError) as e:
        raise QuantOpsError(f"{ckpt / 'net.params'}: does not fit this net: "
                            f"{mxnet_message(e)}") from None
    try:
        with np.load(ckpt / "optimizer.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise QuantOpsError(f"{ckpt / 'optimizer.npz'}: not readable ({e})") from None
    load_optimizer_arrays(trainer, arrays, str(ckpt / "optimizer.npz"))
    del progress["parts"]
    return progress
