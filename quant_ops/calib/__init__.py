"""Post-training calibration: observers that turn a tensor's values over a calibration set into a
symmetric range ``amax`` (int8 scale ``amax / 127``).

See :mod:`quant_ops.calib.observers` for the API and :mod:`quant_ops.calib.algorithms` for the
conventions of each rule (TensorRT entropy, percentile, MSE).
"""
from .algorithms import (entropy_divergences, entropy_threshold, mse_errors, mse_threshold,
                         percentile_threshold)
from .histogram import AbsHistogram
from .observers import (OBSERVERS, EntropyObserver, HistogramObserver, MinMaxObserver, MSEObserver,
                        Observer, PercentileObserver, calibrate, make_observer)

__all__ = ["Observer", "MinMaxObserver", "HistogramObserver", "PercentileObserver", "MSEObserver",
           "EntropyObserver", "make_observer", "calibrate", "OBSERVERS", "AbsHistogram",
           "entropy_divergences", "entropy_threshold", "percentile_threshold", "mse_threshold", "mse_errors"]
