"""Where ``fit`` and ``evaluate`` take their batches from: in-memory arrays, a Gluon
``Dataset`` or a ready ``DataLoader``.

Resume semantics, by source:

- ``(x, y)`` arrays and a ``Dataset``: the batch order of an epoch depends only on
  (seed, epoch), and a run resumed mid-epoch starts at the very batch where it stopped, so it
  sees the same images in the same order as an uninterrupted run.  With arrays the whole run
  is then identical; with a Dataset whose transforms are random (crops, flips), the images
  are the same but their augmentation is drawn afresh.
- a ``DataLoader`` (or any sized iterable of ``(x, y)`` batches): its order is the loader's
  own; an epoch is ``len(loader)`` steps, and a run resumed mid-epoch takes the remaining
  steps of that epoch from a fresh pass over the loader: the step count, the learning-rate
  schedule, the BN-freeze step and the checkpoints continue exactly, the images do not.
  In a distributed job each worker's loader must hold its own shard and give every worker the
  same number of batches.
"""
from __future__ import annotations

import itertools
from typing import Iterator, Sequence

import mxnet as mx
import numpy as np
from mxnet import gluon

from ..datasets import check_labels
from ..errors import QuantOpsError


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The sample order of one epoch: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class IndexBatchSampler(gluon.data.sampler.Sampler):
    """A batch sampler that yields the given index lists, in order."""

    def __init__(self, batches: Sequence[Sequence[int]]):
        self._batches = [list(map(int, b)) for b in batches]

    def __iter__(self):
        return iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


def _is_loader(obj) -> bool:
    return isinstance(obj, gluon.data.DataLoader) or (
        hasattr(obj, "__iter__") and hasattr(obj, "__len__")
        and not isinstance(obj, (gluon.data.Dataset, tuple, list, np.ndarray)))


class Source:
    """Batches of one training set, by epoch and batch index."""

    def __init__(self, train, num_workers: int = 0):
        self.num_workers = num_workers
        self.x = self.y = self.dataset = self.loader = None
        if isinstance(train, (tuple, list)) and len(train) == 2 \
                and hasattr(train[0], "shape"):
            self.x, y = train
            if len(self.x) != len(y):
                raise QuantOpsError(f"the training set has {len(self.x)} inputs but "
                                    f"{len(y)} labels")
            self.y = check_labels(y.asnumpy() if isinstance(y, mx.nd.NDArray) else y,
                                  len(y), "the training set")
            x = self.x.asnumpy() if isinstance(self.x, mx.nd.NDArray) else np.asarray(self.x)
            if x.dtype.kind in "fc" and not np.isfinite(x).all():
                raise QuantOpsError("the training set has NaN or infinite inputs")
            self.n = len(self.x)
        elif isinstance(train, gluon.data.Dataset):
            self.dataset, self.n = train, len(train)
        elif _is_loader(train):
            self.loader, self.n = train, None
        else:
            raise QuantOpsError("the training data must be (x, y) arrays, a Gluon Dataset of "
                                f"(x, y) items or a DataLoader, not {type(train).__name__}")
        if (self.n if self.n is not None else len(self.loader)) == 0:
            raise QuantOpsError("the training set is empty")

    def steps_per_epoch(self, batch_size: int, workers: int, dist: bool) -> int:
        if self.loader is not None:
            return len(self.loader)
        # each worker reads its shard; all take the same number of steps (dist_sync needs it)
        steps = self.n // (batch_size * workers) if dist else -(-self.n // batch_size)
        if steps < 1:
            raise QuantOpsError(f"{self.n} training samples are fewer than one global batch")
        return steps

    def batches(self, seed: int, epoch: int, start: int, stop: int, rank: int, workers: int,
                batch_size: int) -> Iterator[tuple[mx.nd.NDArray, mx.nd.NDArray]]:
        """Batches ``start..stop-1`` of ``epoch`` for worker ``rank``."""
        if self.loader is not None:
            yield from itertools.islice(iter(self.loader), stop - start)
            return
        order = epoch_order(seed, epoch, self.n)[rank::workers]
        idx = [order[b * batch_size:(b + 1) * batch_size] for b in range(start, stop)]
        if self.x is not None:
            for i in idx:
                yield mx.nd.array(self.x[i]), mx.nd.array(self.y[i])
            return
        loader = gluon.data.DataLoader(self.dataset, batch_sampler=IndexBatchSampler(idx),
                                       num_workers=self.num_workers)
        yield from loader


def eval_batches(x, y=None, batch_size: int = 500, num_workers: int = 0):
    """(batches, count) for evaluation, in data order."""
    if isinstance(x, gluon.data.Dataset):
        return (gluon.data.DataLoader(x, batch_size, shuffle=False, num_workers=num_workers),
                -(-len(x) // batch_size))
    if y is None:
        if not _is_loader(x):
            raise QuantOpsError("evaluate needs (x, y) arrays, a Dataset or a DataLoader")
        return x, len(x)
    if len(x) != len(y):
        raise QuantOpsError(f"evaluation set: {len(x)} inputs but {len(y)} labels")
    return (((mx.nd.array(x[i:i + batch_size]), y[i:i + batch_size])
             for i in range(0, len(x), batch_size)), -(-len(x) // batch_size))
