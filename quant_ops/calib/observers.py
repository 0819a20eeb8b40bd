"""Post-training calibration observers: one small class per range rule, torch.ao style.

An observer watches one tensor over a calibration set::

    obs = make_observer("entropy", name="conv1_output")
    for batch in calib_batches:
        obs.observe(batch)          # numpy array (or anything with .asnumpy()), once per batch
    amax = obs.amax()               # symmetric range; int8 scale = amax / 127 (obs.scale())

Methods: ``"minmax"`` (max ``|x|``), ``"percentile"`` (``percentile=99.99``), ``"mse"`` and
``"entropy"`` (TensorRT's entropy calibration). The last three keep a 2048-bin histogram of
``|x|`` (:class:`~quant_ops.calib.histogram.AbsHistogram`): one pass with re-binning when the max
grows, or exact when the caller passes the global max as ``amax_hint`` (two-pass calibration, see
:func:`calibrate`). The rules themselves are in :mod:`quant_ops.calib.algorithms`.

Errors are :class:`~quant_ops.errors.QuantOpsError` and name the tensor: a batch with NaN or inf,
an empty batch, ``amax()`` before any batch, bad parameters, an unknown method.
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, Iterable, Optional, Tuple, Type, Union

import numpy as np

from ..errors import QuantOpsError
from . import algorithms
from .histogram import AbsHistogram

__all__ = ["Observer", "MinMaxObserver", "HistogramObserver", "PercentileObserver", "MSEObserver",
           "EntropyObserver", "make_observer", "calibrate", "OBSERVERS"]


class Observer:
    """Base class: input checks, batch bookkeeping and the cached ``amax``."""

    method = ""

    def __init__(self, name: str = "tensor"):
        self.name = str(name)
        self.num_batches = 0
        self.num_elements = 0
        self._amax: Optional[float] = None

    # -- input ---------------------------------------------------------------------------------
    def _as_array(self, x) -> np.ndarray:
        if hasattr(x, "asnumpy"):          # mx.nd.NDArray
            x = x.asnumpy()
        a = np.asarray(x)
        if a.dtype.kind not in "fiub":
            raise QuantOpsError("tensor %r: cannot calibrate dtype %s" % (self.name, a.dtype))
        if a.size == 0:
            raise QuantOpsError("tensor %r: batch %d is empty (shape %s)" % (self.name, self.num_batches, a.shape))
        if a.dtype.kind != "f" or a.dtype.itemsize > 8:
            a = a.astype(np.float64)
        elif a.dtype.itemsize < 4:
            a = a.astype(np.float32)
        return a

    def _not_finite(self, a: np.ndarray) -> QuantOpsError:
        n_nan = int(np.count_nonzero(np.isnan(a)))
        n_inf = int(np.count_nonzero(np.isinf(a)))
        return QuantOpsError("tensor %r: batch %d has %d NaN and %d inf values (of %d); calibration needs "
                             "finite data" % (self.name, self.num_batches, n_nan, n_inf, a.size))

    # -- API -----------------------------------------------------------------------------------
    def observe(self, x) -> None:
        """Record one batch of the tensor."""
        a = self._as_array(x)
        self._observe(a)
        self.num_batches += 1
        self.num_elements += int(a.size)
        self._amax = None

    def _observe(self, a: np.ndarray) -> None:
        raise NotImplementedError

    def observe_abs(self, ab: np.ndarray, amax: float) -> None:
        """Record a batch given as ``|x|`` (non-negative, finite) with its max, for a caller
        that has both already (every observer here is symmetric, so ``|x|`` is enough)."""
        self._observe_abs(ab, float(amax))
        self.num_batches += 1
        self.num_elements += int(ab.size)
        self._amax = None

    def _observe_abs(self, ab: np.ndarray, amax: float) -> None:
        self._observe(ab)

    def amax(self) -> float:
        """The calibrated symmetric range ``amax >= 0`` (0 only for a tensor that was all zeros)."""
        if self.num_batches == 0:
            raise QuantOpsError("tensor %r: amax() called before any batch was observed" % (self.name,))
        if self._amax is None:
            self._amax = float(self._compute())
        return self._amax

    def _compute(self) -> float:
        raise NotImplementedError

    def scale(self, num_bits: int = 8) -> float:
        """Symmetric quantization scale ``amax / (2**(num_bits-1) - 1)`` (``amax / 127`` for int8)."""
        return self.amax() / float(2 ** (int(num_bits) - 1) - 1)

    def reset(self) -> None:
        self.num_batches = 0
        self.num_elements = 0
        self._amax = None

    def __repr__(self) -> str:
        return "%s(name=%r, batches=%d)" % (type(self).__name__, self.name, self.num_batches)


class MinMaxObserver(Observer):
    """``amax = max |x|`` over every batch."""

    method = "minmax"

    def __init__(self, name: str = "tensor"):
        super().__init__(name)
        self._max = 0.0

    def _observe(self, a: np.ndarray) -> None:
        hi, lo = a.max(), a.min()
        if not (np.isfinite(hi) and np.isfinite(lo)):
            raise self._not_finite(a)
        self._max = max(self._max, float(hi), -float(lo))

    def _observe_abs(self, ab: np.ndarray, amax: float) -> None:
        self._max = max(self._max, amax)

    def _compute(self) -> float:
        return self._max

    def reset(self) -> None:
        super().reset()
        self._max = 0.0


class HistogramObserver(Observer):
    """Collects the ``|x|`` histogram; subclasses choose ``amax`` from it.

    ``bins``: number of bins (2048 as in TensorRT). ``amax_hint``: the global max ``|x|`` of the
    calibration set when the caller knows it (two-pass calibration): the histogram then covers
    ``[0, amax_hint]`` exactly and is never re-binned; a batch exceeding it is an error. Without it
    the range follows the running max: counts are kept exactly in fine bins (``oversample`` to
    ``2 * oversample`` per bin) and re-binned once onto ``[0, max]`` when read (see
    :mod:`quant_ops.calib.histogram`).
    """

    def __init__(self, name: str = "tensor", bins: int = 2048, amax_hint: Optional[float] = None,
                 oversample: int = 32):
        super().__init__(name)
        self._hist = AbsHistogram(bins=bins, range_max=amax_hint, name=self.name, oversample=oversample)
        self.amax_hint = None if amax_hint is None else float(amax_hint)

    @property
    def bins(self) -> int:
        return self._hist.bins

    @property
    def histogram(self) -> np.ndarray:
        """The ``bins`` counts so far (float64; fractional near bin edges once the max has grown)."""
        return self._hist.snapshot()[0]

    @property
    def bin_edges(self) -> np.ndarray:
        return self._hist.edges

    @property
    def max_abs(self) -> float:
        return self._hist.max_seen

    @property
    def rebins(self) -> int:
        """How many times the range grew after the first non-zero batch (0: the histogram is exact)."""
        return self._hist.rebins

    def _observe(self, a: np.ndarray) -> None:
        ab = np.abs(a)
        m = ab.max()
        if not np.isfinite(m):
            raise self._not_finite(a)
        self._hist.add(ab, float(m))

    def _observe_abs(self, ab: np.ndarray, amax: float) -> None:
        self._hist.add(ab, amax)

    def _compute(self) -> float:
        if self._hist.top <= 0:
            return 0.0
        counts, edges = self._hist.snapshot()
        return self._from_histogram(counts, edges)

    def _from_histogram(self, counts: np.ndarray, edges: np.ndarray) -> float:
        raise NotImplementedError

    def reset(self) -> None:
        super().reset()
        self._hist.reset()


class PercentileObserver(HistogramObserver):
    """``amax`` = the ``percentile`` (e.g. 99.99) of ``|x|``, read off the histogram."""

    method = "percentile"

    def __init__(self, name: str = "tensor", percentile: float = 99.99, bins: int = 2048,
                 amax_hint: Optional[float] = None, oversample: int = 32):
        if not (0.0 < float(percentile) <= 100.0):
            raise QuantOpsError("tensor %r: percentile must be in (0, 100], got %r" % (str(name), percentile))
        super().__init__(name, bins=bins, amax_hint=amax_hint, oversample=oversample)
        self.percentile = float(percentile)

    def _from_histogram(self, counts, edges) -> float:
        return algorithms.percentile_threshold(counts, edges, self.percentile)


class MSEObserver(HistogramObserver):
    """``amax`` = the bin edge minimising the mean squared fake-quantization error of ``|x|``."""

    method = "mse"

    def __init__(self, name: str = "tensor", bins: int = 2048, amax_hint: Optional[float] = None,
                 num_bits: int = 8, oversample: int = 32):
        if int(num_bits) < 2:
            raise QuantOpsError("tensor %r: num_bits must be >= 2, got %r" % (str(name), num_bits))
        super().__init__(name, bins=bins, amax_hint=amax_hint, oversample=oversample)
        self.num_bits = int(num_bits)

    def _from_histogram(self, counts, edges) -> float:
        return algorithms.mse_threshold(counts, edges, num_bits=self.num_bits)


class EntropyObserver(HistogramObserver):
    """TensorRT entropy calibration (EntropyCalibration2): minimal KL divergence between the
    clipped histogram and its ``2**(num_bits-1)``-level quantization; see
    :mod:`quant_ops.calib.algorithms` for the exact conventions.

    ``start_bin`` (default 128, or the number of levels where that is more: an unsigned 8-bit
    tensor is observed as 9-bit) is the smallest candidate number of kept bins, ``stride`` the step
    between candidates; ``fix_zero_bin`` replaces the count of bin 0 by that of bin 1 before the
    search (pytorch-quantization does; keeps ReLU zeros from dominating).
    """

    method = "entropy"

    def __init__(self, name: str = "tensor", bins: int = 2048, amax_hint: Optional[float] = None,
                 num_bits: int = 8, start_bin: Optional[int] = None, stride: int = 1,
                 fix_zero_bin: bool = True, oversample: int = 32):
        if int(num_bits) < 2:
            raise QuantOpsError("tensor %r: num_bits must be >= 2, got %r" % (str(name), num_bits))
        levels = 2 ** (int(num_bits) - 1)
        start_bin = max(128, levels) if start_bin is None else start_bin
        if not (levels <= int(start_bin) <= int(bins)):
            raise QuantOpsError("tensor %r: need %d (levels) <= start_bin (%r) <= bins (%r)"
                                % (str(name), levels, start_bin, bins))
        if int(stride) < 1:
            raise QuantOpsError("tensor %r: stride must be >= 1, got %r" % (str(name), stride))
        super().__init__(name, bins=bins, amax_hint=amax_hint, oversample=oversample)
        self.num_bits = int(num_bits)
        self.num_levels = levels
        self.start_bin = int(start_bin)
        self.stride = int(stride)
        self.fix_zero_bin = bool(fix_zero_bin)
        self.kept_bins: Optional[int] = None

    def _from_histogram(self, counts, edges) -> float:
        amax, i = algorithms.entropy_threshold(counts, edges, num_levels=self.num_levels,
                                               start_bin=self.start_bin, stride=self.stride,
                                               fix_zero_bin=self.fix_zero_bin)
        self.kept_bins = i
        return amax


class AutoObserver(HistogramObserver):
    """The four ranges the other observers would give, from one histogram: ``candidates()``
    (the ``auto`` calibrator picks among them with the consuming layer's output error, see
    :mod:`quant_ops.calib.auto`).  Alone it answers MSE's range: the least error of the
    tensor itself."""

    method = "auto"

    def __init__(self, name: str = "tensor", bins: int = 2048, amax_hint: Optional[float] = None,
                 num_bits: int = 8, percentile: float = 99.99, oversample: int = 32):
        if int(num_bits) < 2:
            raise QuantOpsError("tensor %r: num_bits must be >= 2, got %r" % (str(name), num_bits))
        super().__init__(name, bins=bins, amax_hint=amax_hint, oversample=oversample)
        self.num_bits = int(num_bits)
        self.percentile = float(percentile)

    def candidates(self) -> Dict[str, float]:
        """{method: amax} for minmax, percentile, mse and entropy."""
        if self.num_batches == 0:
            raise QuantOpsError("tensor %r: candidates() called before any batch was observed"
                                % (self.name,))
        if self._hist.top <= 0:
            return dict.fromkeys(("minmax", "percentile", "mse", "entropy"), 0.0)
        counts, edges = self._hist.snapshot()
        levels = 2 ** (self.num_bits - 1)
        return {"minmax": float(self._hist.max_seen),
                "percentile": algorithms.percentile_threshold(counts, edges, self.percentile),
                "mse": algorithms.mse_threshold(counts, edges, num_bits=self.num_bits),
                "entropy": algorithms.entropy_threshold(
                    counts, edges, num_levels=levels, start_bin=max(levels, 128))[0]}

    def _from_histogram(self, counts, edges) -> float:
        return algorithms.mse_threshold(counts, edges, num_bits=self.num_bits)


OBSERVERS: Dict[str, Type[Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
    "auto": AutoObserver,
}


def _observer_class(method: str) -> Type[Observer]:
    key = str(method).lower()
    if key not in OBSERVERS:
        raise QuantOpsError("unknown calibration method %r; choose one of %s" % (method, ", ".join(OBSERVERS)))
    return OBSERVERS[key]


def make_observer(method: str, name: str = "tensor", **params) -> Observer:
    """A fresh observer for ``method`` ("minmax", "percentile", "mse", "entropy") and tensor
    ``name``; ``params`` go to its constructor (e.g. ``percentile=99.9``, ``bins=2048``,
    ``amax_hint=...``). Unknown methods or parameters raise :class:`QuantOpsError`."""
    cls = _observer_class(method)
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "name")]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise QuantOpsError("calibration method %r takes no parameter(s) %s; it takes %s"
                            % (method, ", ".join(unknown), ", ".join(allowed) or "none"))
    return cls(name, **params)


Batches = Union[Iterable, Callable[[], Iterable]]


def _iterate(batches: Batches):
    return batches() if callable(batches) else iter(batches)


def calibrate(method: str, batches: Batches, name: str = "tensor", two_pass: bool = False,
              **params) -> Tuple[float, Observer]:
    """Run one observer over ``batches`` and return ``(amax, observer)``.

    ``batches``: an iterable of arrays, or a zero-argument callable returning one. With
    ``two_pass=True`` (histogram methods) a first pass takes the global max ``|x|`` and a second
    builds the exact histogram with ``amax_hint`` set to it, as TensorRT does; ``batches`` must
    then be re-iterable (a list, or a callable), not a one-shot iterator.
    """
    cls = _observer_class(method)
    if two_pass and issubclass(cls, HistogramObserver):
        if not callable(batches) and iter(batches) is batches:
            raise QuantOpsError("tensor %r: two_pass calibration needs re-iterable batches (a list or a "
                                "callable returning an iterable), got a one-shot iterator" % (name,))
        if params.get("amax_hint") is None:
            first = MinMaxObserver(name)
            for b in _iterate(batches):
                first.observe(b)
            params = dict(params, amax_hint=first.amax())
    obs = make_observer(method, name, **params)
    for b in _iterate(batches):
        obs.observe(b)
    return obs.amax(), obs
