"""A resumable training loop for (quantized) Gluon nets.

A checkpoint (``quant_ops.train.checkpoint``) is one directory, whole or absent: the net's
``.params`` (quantizer state included: it is ordinary params), the optimizer's state as
named arrays (no pickle) and a small JSON of where the run stands (epoch, batch, step,
metrics), written every ``checkpoint_every`` steps and at each epoch's end.  The
training data are ``(x, y)`` arrays, a Gluon ``Dataset`` or a ``DataLoader``; what a resumed
run sees for each of them is in ``quant_ops.train.data`` (arrays: exactly the batches of an
uninterrupted run).

BatchNorm statistics can be frozen after ``freeze_bn_after`` steps (``train.bn``); whether
they are is a function of the global step, so a run resumed past that step resumes frozen.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from tqdm import tqdm

from ..errors import QuantOpsError
from ..fileio import atomic_write
from ..methods.base import is_int
from ..ops import track_training
from . import checkpoint
from .bn import count_bn, freeze_bn
from .data import Source, eval_batches
from .constraints import Projector, apply_multipliers
from .scheduler import SineScheduler

log = logging.getLogger(__name__)


@dataclass
class FitConfig:
    epochs: int = 2
    lr: float = 0.05
    batch_size: int = 128
    optimizer: str = "sgd"
    momentum: float = 0.9
    wd: float = 1e-4
    schedule: str = "sine"            # "sine" (SineScheduler) or "constant"
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 100       # steps
    stop_after_steps: int | None = None   # for tests: stop as if killed after N steps
    kvstore: str = "device"           # local | device | dist_sync | dist_device_sync
    progress: bool = True
    freeze_bn_after: int | None = None    # steps: BN uses (and stops updating) running stats
    max_steps_per_epoch: int | None = None  # cap an epoch (smoke runs); the schedule follows
    log_every: int = 20               # steps per row of progress["curve"] (mean loss, lr)
    num_workers: int = 0              # DataLoader worker processes for a Dataset
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        """Refuse settings that would fail deep inside MXNet, or train nothing, naming the
        field the caller gave."""
        def bad(name: str, want: str) -> QuantOpsError:
            return QuantOpsError(f"FitConfig.{name} must be {want}, got {getattr(self, name)!r}")

        def count(v, low: int, optional: bool = False) -> bool:
            return (optional and v is None) or (
                (is_int(v) or isinstance(v, np.integer)) and v >= low)

        for name in ("epochs", "batch_size", "checkpoint_every", "log_every"):
            if not count(getattr(self, name), 1):
                raise bad(name, "an integer >= 1")
        for name in ("stop_after_steps", "max_steps_per_epoch"):
            if not count(getattr(self, name), 1, optional=True):
                raise bad(name, "None or an integer >= 1")
        if not count(self.freeze_bn_after, 0, optional=True):
            raise QuantOpsError(f"freeze_bn_after must be >= 0 steps, got {self.freeze_bn_after}")
        if not count(self.num_workers, 0):
            raise bad("num_workers", "an integer >= 0")
        if not count(self.seed, 0) or self.seed >= 2 ** 32:
            raise bad("seed", f"an integer in 0..{2 ** 32 - 1}")
        for name, low_ok in (("lr", False), ("momentum", True), ("wd", True)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) \
                    or not np.isfinite(v) or v < 0 or (v == 0 and not low_ok):
                raise bad(name, "a finite number > 0" if not low_ok else
                          "a finite number >= 0")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", " or ".join(map(repr, SCHEDULES)))
        if self.kvstore not in KVSTORES:
            raise bad("kvstore", "one of " + ", ".join(KVSTORES))
        if not isinstance(self.optimizer, str) \
                or self.optimizer.lower() not in mx.optimizer.Optimizer.opt_registry:
            raise bad("optimizer", "an MXNet optimizer name (sgd, nag, adam, ...)")


SCHEDULES = ("sine", "constant")
KVSTORES = ("local", "device", "dist_sync", "dist_device_sync", "dist_async")


# settings that decide the run: resuming with other values continues a different run
RUN_KEYS = ("epochs", "lr", "batch_size", "optimizer", "schedule", "seed", "freeze_bn_after",
            "max_steps_per_epoch")


def _same_run(ckpt: Path, cfg: FitConfig) -> None:
    """Refuse to resume a checkpoint made with other run settings (``RUN_KEYS``)."""
    try:
        saved = json.loads((ckpt / checkpoint.PROGRESS).read_text()).get("config", {})
    except (OSError, ValueError, AttributeError):
        return                 # checkpoint.load names what is wrong with the record
    differ = [k for k in RUN_KEYS if k in saved and saved[k] != getattr(cfg, k)]
    if differ:
        was = ", ".join(f"{k}={saved[k]!r}" for k in differ)
        now = ", ".join(f"{k}={getattr(cfg, k)!r}" for k in differ)
        raise QuantOpsError(f"{ckpt}: its run had {was}; resuming with {now} would not "
                            "continue it: use its settings, another checkpoint_dir, or "
                            "delete it to start over")


def _check_labels(yb: mx.nd.NDArray, out: mx.nd.NDArray) -> None:
    """Labels the net has classes for: the loss would otherwise read past its outputs."""
    if out.ndim == 2 and yb.size and float(yb.max().asscalar()) >= out.shape[1]:
        raise QuantOpsError(f"the training set has label {int(yb.max().asscalar())}; the net "
                            f"has {out.shape[1]} classes (labels 0..{out.shape[1] - 1})")


def _net_ctx(net) -> mx.Context:
    """Where the net's parameters live (batches are moved there: loader workers hand back
    ``cpu_shared`` arrays, which a CachedOp refuses)."""
    for p in net.collect_params().values():
        if p._data is not None:
            return p.list_ctx()[0]
    return mx.cpu()


def evaluate(net, x, y=None, batch_size: int = 500, progress: bool = False,
             num_workers: int = 0) -> float:
    """Top-1 accuracy in percent (inference mode) on ``(x, y)`` arrays, a Dataset of
    ``(x, y)`` items or a DataLoader (then ``y`` is None)."""
    batches, total = eval_batches(x, y, batch_size, num_workers)
    correct = seen = 0
    ctx = _net_ctx(net)
    for xb, yb in tqdm(batches, total=total, desc="eval", leave=False, disable=not progress):
        out = net(xb.as_in_context(ctx) if isinstance(xb, mx.nd.NDArray)
                  else mx.nd.array(xb, ctx=ctx))
        yb = yb.asnumpy() if isinstance(yb, mx.nd.NDArray) else np.asarray(yb)
        correct += int((out.argmax(axis=1).asnumpy() == yb.reshape(-1)).sum())
        seen += len(yb)
    if seen == 0:
        raise QuantOpsError("the evaluation set is empty")
    return 100.0 * correct / seen


def _freeze_bn_now(net, progress: dict, after: int, resumed: bool) -> None:
    n = freeze_bn(net)
    total = count_bn(net)
    progress.setdefault("bn_frozen_at", progress["step"])
    if total == 0:
        log.info("step %d: freeze_bn_after=%d, but the net has no BatchNorm layer (folded "
                 "with fold_bn='qat', its statistics are frozen from the start)",
                 progress["step"], after)
    elif resumed:
        log.info("resumed at step %d, past freeze_bn_after=%d: BatchNorm statistics frozen "
                 "(%d layers)", progress["step"], after, total)
    else:
        log.info("step %d: BatchNorm statistics frozen in %d of %d layers (running mean/var "
                 "fixed, gamma/beta keep training)", progress["step"], n, total)


def fit(net: gluon.Block, train, val=None, cfg: FitConfig | None = None) -> dict:
    """Train ``net``; returns the progress record (step, per-epoch loss and validation
    accuracy, ``bn_frozen_at``, ``last_loss``).  Resumes from ``cfg.checkpoint_dir`` when it
    holds a checkpoint.

    ``train``: ``(x, y)`` arrays, a Gluon Dataset of ``(x, y)`` items, or a DataLoader of
    ``(x, y)`` batches; ``val`` likewise (or None).  See ``quant_ops.train.data`` for what a
    resumed run sees with each.
    """
    cfg = cfg or FitConfig()
    cfg.check()
    source = Source(train, cfg.num_workers)
    kv = mx.kv.create(cfg.kvstore)
    dist = "dist" in kv.type
    rank, workers = kv.rank, kv.num_workers
    steps_per_epoch = source.steps_per_epoch(cfg.batch_size, workers, dist)
    if cfg.max_steps_per_epoch is not None:
        steps_per_epoch = max(1, min(steps_per_epoch, cfg.max_steps_per_epoch))
    total = steps_per_epoch * cfg.epochs
    sched = SineScheduler(total, cfg.lr) if cfg.schedule == "sine" else None
    opt_params = {"learning_rate": cfg.lr, "wd": cfg.wd}
    if cfg.optimizer == "sgd":
        opt_params["momentum"] = cfg.momentum
    if sched is not None:
        opt_params["lr_scheduler"] = sched
    apply_multipliers(net)   # each method's lr / wd multipliers for its learned inputs
    trainer = gluon.Trainer(net.collect_params(), cfg.optimizer, opt_params, kvstore=kv,
                            update_on_kvstore=False if dist else None)
    from .distributed import StateSync

    sync_state = StateSync(net, kv) if dist else None
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    track_training(net)
    progress = {"epoch": 0, "batch": 0, "step": 0, "history": [], "curve": [],
                "config": {k: v for k, v in asdict(cfg).items() if k != "extra"}}
    ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if ckpt is not None and dist:
        ckpt = ckpt / f"rank{rank}"
    resumed = False
    if ckpt is not None and checkpoint.find(ckpt) is not None:
        _same_run(ckpt, cfg)           # before the load changes the net
        progress = checkpoint.load(ckpt, net, trainer)
        checkpoint.check_progress(progress, steps_per_epoch, cfg.epochs,
                                  str(ckpt / checkpoint.PROGRESS))
        checkpoint.check_finite(net, str(ckpt / "net.params"))
        # the optimizer state holds no update counts: restore them so the schedule continues
        opt = trainer._optimizer
        opt.begin_num_update = opt.num_update = progress["step"]
        opt._index_update_count = {}
        resumed = True
        log.info("resumed at epoch %d batch %d (step %d)", progress["epoch"],
                 progress["batch"], progress["step"])
    bn_after = cfg.freeze_bn_after
    bn_frozen = False
    if bn_after is not None and progress["step"] >= bn_after:
        _freeze_bn_now(net, progress, bn_after, resumed and progress["step"] > 0)
        bn_frozen = True
    ctx = _net_ctx(net)
    project = Projector(net)   # learned quantizer parameters stay in their domains
    steps_run = 0
    while progress["epoch"] < cfg.epochs:
        ep = progress["epoch"]
        run_loss = progress.get("run_loss", 0.0)
        run_n = progress.get("run_n", progress["batch"] * cfg.batch_size)
        start = progress["batch"]
        bar = tqdm(source.batches(cfg.seed, ep, start, steps_per_epoch, rank, workers,
                                  cfg.batch_size),
                   total=steps_per_epoch - start, desc=f"epoch {ep + 1}/{cfg.epochs}",
                   leave=False, disable=not cfg.progress)
        b = start
        for xb, yb in bar:
            xb, yb = xb.as_in_context(ctx), yb.as_in_context(ctx)
            if not bn_frozen and bn_after is not None and progress["step"] >= bn_after:
                _freeze_bn_now(net, progress, bn_after, False)
                bn_frozen = True
            with autograd.record():
                out = net(xb)
                loss = loss_fn(out, yb.astype("float32", copy=False))
            _check_labels(yb, out)
            loss.backward()
            trainer.step(xb.shape[0] * workers)   # gradients are summed over the workers
            if project:
                project()
            if sync_state is not None:
                sync_state()
            batch_loss = float(loss.sum().asscalar())
            if not np.isfinite(batch_loss):
                raise QuantOpsError(f"training diverged at step {progress['step'] + 1}: the "
                                    f"loss is {batch_loss} (lr {trainer.learning_rate:g}); "
                                    "lower the learning rate")
            run_loss += batch_loss
            run_n += xb.shape[0]
            b += 1
            progress.update(batch=b, step=progress["step"] + 1, run_loss=run_loss,
                            run_n=run_n, rank=rank, last_loss=batch_loss / xb.shape[0])
            if cfg.progress:
                bar.set_postfix(loss=f"{run_loss / run_n:.4f}", refresh=False)
            window = progress.setdefault("window", [0.0, 0])
            window[0] += batch_loss
            window[1] += xb.shape[0]
            if progress["step"] % max(cfg.log_every, 1) == 0:
                progress.setdefault("curve", []).append(
                    {"step": progress["step"], "epoch": ep + b / steps_per_epoch,
                     "loss": window[0] / window[1], "lr": trainer.learning_rate})
                progress["window"] = [0.0, 0]
            hook = cfg.extra.get("on_step")
            if hook is not None:
                hook(progress["step"], rank)
            steps_run += 1
            if ckpt is not None and progress["step"] % cfg.checkpoint_every == 0:
                checkpoint.save(ckpt, net, trainer, progress)
            if cfg.stop_after_steps is not None and steps_run >= cfg.stop_after_steps:
                if ckpt is not None:
                    checkpoint.save(ckpt, net, trainer, progress)
                return progress
        if b < steps_per_epoch:
            raise QuantOpsError(f"the training data ran out after {b} of {steps_per_epoch} "
                                f"batches in epoch {ep + 1}")
        window = progress.get("window", [0.0, 0])
        if window[1]:   # the epoch's last steps, when log_every does not divide it
            progress.setdefault("curve", []).append(
                {"step": progress["step"], "epoch": ep + 1.0, "loss": window[0] / window[1],
                 "lr": trainer.learning_rate})
            progress["window"] = [0.0, 0]
        row = {"epoch": ep + 1, "loss": run_loss / max(run_n, 1), "lr": trainer.learning_rate}
        if val is not None:
            row["val_accuracy"] = (evaluate(net, *val, progress=cfg.progress)
                                   if isinstance(val, tuple) else
                                   evaluate(net, val, progress=cfg.progress,
                                            num_workers=cfg.num_workers))
        progress["history"].append(row)
        progress.update(epoch=ep + 1, batch=0, run_loss=0.0, run_n=0)
        log.info("epoch %d: %s", ep + 1, row)
        if ckpt is not None:
            checkpoint.save(ckpt, net, trainer, progress)
    return progress


def plot_history(history: list, path: str | Path) -> Path:
    """Loss and validation accuracy per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ep = [h["epoch"] for h in history]
    ax.plot(ep, [h["loss"] for h in history], "o-", color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if any("val_accuracy" in h for h in history):
        ax2 = ax.twinx()
        ax2.plot(ep, [h.get("val_accuracy") for h in history], "s-", color="tab:orange",
                 label="val accuracy")
        ax2.set_ylabel("accuracy (%)")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)


def plot_curve(curve: list, after: float | None, before: float | None,
               path: str | Path) -> Path:
    """Training loss and lr by step, with the test accuracy before and after, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(9, 3.5))
    steps = [c["step"] for c in curve]
    ax.plot(steps, [c["loss"] for c in curve], ".-", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    acc = [f"{k} {v:.2f}%" for k, v in (("before", before), ("after", after)) if v is not None]
    ax.set_title("test accuracy: " + ", ".join(acc) if acc else "training loss")
    ax_lr.plot(steps, [c["lr"] for c in curve], ".-", color="tab:orange")
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
