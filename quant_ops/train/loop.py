"""A resumable training loop for (quantized) Gluon nets on in-memory data.

A checkpoint is the net's ``.params`` (quantizer state included: it is ordinary params),
the trainer's ``.states`` and a small JSON of where the run stands (epoch, batch, metrics),
written atomically every ``checkpoint_every`` steps and at each epoch's end.  The batch
order of an epoch depends only on (seed, epoch), so a resumed run sees exactly the batches
the uninterrupted one would have.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from tqdm import tqdm

from ..errors import QuantOpsError
from ..fileio import atomic_write_text
from ..ops import track_training
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
    extra: dict = field(default_factory=dict)


def evaluate(net, x: np.ndarray, y: np.ndarray, batch_size: int = 500,
             progress: bool = False) -> float:
    """Top-1 accuracy in percent (inference mode)."""
    correct = 0
    for i in tqdm(range(0, len(x), batch_size), desc="eval", leave=False, disable=not progress):
        out = net(mx.nd.array(x[i:i + batch_size]))
        correct += int((out.argmax(axis=1).asnumpy() == y[i:i + batch_size]).sum())
    return 100.0 * correct / len(x)


def _order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def _save(ckpt: Path, net, trainer, progress: dict) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    for name, save in (("net.params", net.save_parameters),
                       ("trainer.states", trainer.save_states)):
        fd, tmp = tempfile.mkstemp(dir=ckpt, prefix=f".{name}.")
        os.close(fd)
        save(tmp)
        os.replace(tmp, ckpt / name)
    atomic_write_text(ckpt / "progress.json", json.dumps(progress, indent=1))


def fit(net: gluon.Block, train: tuple, val: tuple | None = None,
        cfg: FitConfig | None = None) -> dict:
    """Train ``net`` on ``train = (x, y)``; returns the progress record (per-epoch loss and
    validation accuracy).  Resumes from ``cfg.checkpoint_dir`` when it holds a checkpoint."""
    cfg = cfg or FitConfig()
    x, y = train
    if len(x) == 0:
        raise QuantOpsError("the training set is empty")
    kv = mx.kv.create(cfg.kvstore)
    dist = "dist" in kv.type
    rank, workers = kv.rank, kv.num_workers
    # each worker reads its shard; all take the same number of steps (dist_sync needs it)
    steps_per_epoch = (len(x) // (cfg.batch_size * workers) if dist
                       else -(-len(x) // cfg.batch_size))
    if steps_per_epoch < 1:
        raise QuantOpsError(f"{len(x)} training images are fewer than one global batch")
    total = steps_per_epoch * cfg.epochs
    sched = SineScheduler(total, cfg.lr) if cfg.schedule == "sine" else None
    opt_params = {"learning_rate": cfg.lr, "wd": cfg.wd}
    if cfg.optimizer == "sgd":
        opt_params["momentum"] = cfg.momentum
    if sched is not None:
        opt_params["lr_scheduler"] = sched
    trainer = gluon.Trainer(net.collect_params(), cfg.optimizer, opt_params, kvstore=kv,
                            update_on_kvstore=False if dist else None)
    from .distributed import StateSync

    sync_state = StateSync(net, kv) if dist else None
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    track_training(net)
    progress = {"epoch": 0, "batch": 0, "step": 0, "history": [],
                "config": {k: v for k, v in asdict(cfg).items() if k != "extra"}}
    ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if ckpt is not None and dist:
        ckpt = ckpt / f"rank{rank}"
    if ckpt is not None and (ckpt / "progress.json").is_file():
        progress = json.loads((ckpt / "progress.json").read_text())
        net.load_parameters(str(ckpt / "net.params"))
        trainer.load_states(str(ckpt / "trainer.states"))
        # the states file holds no update counts: restore them so the schedule continues
        opt = trainer._optimizer
        opt.begin_num_update = opt.num_update = progress["step"]
        opt._index_update_count = {}
        log.info("resumed at epoch %d batch %d", progress["epoch"], progress["batch"])
    steps_run = 0
    while progress["epoch"] < cfg.epochs:
        ep = progress["epoch"]
        order = _order(cfg.seed, ep, len(x))[rank::workers]
        run_loss = progress.get("run_loss", 0.0)
        bar = tqdm(range(progress["batch"], steps_per_epoch), desc=f"epoch {ep + 1}/{cfg.epochs}",
                   leave=False, disable=not cfg.progress)
        for b in bar:
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            xb, yb = mx.nd.array(x[idx]), mx.nd.array(y[idx])
            with autograd.record():
                loss = loss_fn(net(xb), yb)
            loss.backward()
            trainer.step(len(idx) * workers)   # gradients are summed over the workers
            if sync_state is not None:
                sync_state()
            run_loss += float(loss.sum().asscalar())
            progress.update(batch=b + 1, step=progress["step"] + 1, run_loss=run_loss,
                            rank=rank)
            hook = cfg.extra.get("on_step")
            if hook is not None:
                hook(progress["step"], rank)
            steps_run += 1
            if ckpt is not None and progress["step"] % cfg.checkpoint_every == 0:
                _save(ckpt, net, trainer, progress)
            if cfg.stop_after_steps is not None and steps_run >= cfg.stop_after_steps:
                if ckpt is not None:
                    _save(ckpt, net, trainer, progress)
                return progress
        row = {"epoch": ep + 1, "loss": run_loss / (steps_per_epoch * cfg.batch_size),
               "lr": trainer.learning_rate}
        if val is not None:
            row["val_accuracy"] = evaluate(net, *val, progress=cfg.progress)
        progress["history"].append(row)
        progress.update(epoch=ep + 1, batch=0, run_loss=0.0)
        log.info("epoch %d: %s", ep + 1, row)
        if ckpt is not None:
            _save(ckpt, net, trainer, progress)
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
    p = Path(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, p)
    return p
