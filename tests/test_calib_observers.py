"""Calibration observers (quant_ops.calib): range rules, one-pass histograms, errors.

The entropy rule is checked against ``_ref_entropy_amax`` below, a plain re-implementation of
TensorRT's entropy calibration as NVIDIA's pytorch-quantization writes it (``_compute_amax_entropy``
in ``pytorch_quantization/calib/histogram.py``): level of bin j from ``np.digitize`` on
``np.linspace(0, i, 129)``, bin 0 replaced by bin 1, outliers folded into the last kept bin, level
averages spread over the non-empty bins, ``scipy.stats.entropy`` for the KL, ties to the last
candidate, ``amax = bin_edges[i]``. It shares no code with the observer.
"""
import time

import numpy as np
import pytest
from scipy.stats import entropy as scipy_entropy

from quant_ops.calib import (EntropyObserver, MinMaxObserver, MSEObserver, PercentileObserver, calibrate,
                             entropy_divergences, entropy_threshold, make_observer)
from quant_ops.errors import QuantOpsError


# --------------------------------------------------------------------------------------------------
# Independent reference
# --------------------------------------------------------------------------------------------------
def _ref_entropy_amax(hist, edges, num_levels=128, start_bin=128, fix_zero_bin=True):
    counts = [float(v) for v in hist]
    if fix_zero_bin:
        counts[0] = counts[1]
    n = len(counts)
    best_i, best_kl = None, float("inf")
    for i in range(start_bin, n + 1):
        # level of each kept bin, as pytorch-quantization computes it
        level_of = np.digitize(np.arange(i), np.linspace(0, i, num=num_levels + 1)) - 1
        starts = np.searchsorted(level_of, np.arange(num_levels + 1))   # level_of is sorted
        q = [0.0] * i
        for k in range(num_levels):
            a, b = int(starts[k]), int(starts[k + 1])
            members = [j for j in range(a, b) if counts[j] > 0]
            if not members:
                continue
            avg = sum(counts[j] for j in members) / len(members)
            for j in members:
                q[j] = avg
        p = counts[:i]
        p[-1] += sum(counts[i:])
        if sum(q) == 0:
            kl = float("inf")
        else:
            kl = float(scipy_entropy(p, q))
            if np.isnan(kl):
                kl = float("inf")
        if kl <= best_kl:          # ties go to the last (largest) candidate
            best_i, best_kl = i, kl
    if best_i is None:
        best_i = n
    return float(edges[best_i]), best_i


def _fq(x, amax, qmax=127.0):
    """Symmetric fake quantization (round half to even is fine for a test)."""
    s = amax / qmax
    return np.clip(np.round(x / s), -qmax, qmax) * s


def _mse(x, amax):
    x = x.astype(np.float64)
    return float(np.mean((_fq(x, amax) - x) ** 2))


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def _data(kind, n=400_000, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        return rng.standard_normal(n).astype(np.float32)
    if kind == "laplacian":
        return rng.laplace(0.0, 1.0, n).astype(np.float32)
    if kind == "uniform":
        return rng.uniform(-3.0, 3.0, n).astype(np.float32)
    if kind == "heavy_tail":   # gaussian body, a few huge outliers
        x = rng.standard_normal(n)
        x[rng.choice(n, 20, replace=False)] = rng.uniform(30.0, 60.0, 20) * rng.choice([-1, 1], 20)
        return x.astype(np.float32)
    if kind == "student_t":
        return rng.standard_t(2.0, n).astype(np.float32)
    if kind == "relu":         # ReLU outputs: ~60% exact zeros
        return np.maximum(rng.standard_normal(n) - 0.25, 0.0).astype(np.float32)
    if kind == "sparse_levels":  # few distinct values: most of the 2048 bins are empty
        return (rng.integers(-40, 41, n) * 0.173).astype(np.float32)
    if kind == "bimodal":
        x = np.concatenate([rng.normal(0.5, 0.1, n // 2), rng.normal(-2.0, 0.3, n - n // 2)])
        return x.astype(np.float32)
    raise ValueError(kind)


KINDS = ["gaussian", "laplacian", "uniform", "heavy_tail", "student_t", "relu", "sparse_levels", "bimodal"]


# --------------------------------------------------------------------------------------------------
# Entropy vs the reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_entropy_matches_reference_two_pass_histogram(kind):
    x = _data(kind)
    amax, obs = calibrate("entropy", [x[:200_000], x[200_000:]], name=kind, two_pass=True)
    hist, edges = obs.histogram, obs.bin_edges
    assert obs.rebins == 0
    assert hist.sum() == x.size
    ref_amax, ref_i = _ref_entropy_amax(hist, edges)
    width = edges[1] - edges[0]
    assert abs(amax - ref_amax) <= width * (1 + 1e-9), (kind, obs.kept_bins, ref_i)


@pytest.mark.parametrize("kind", ["gaussian", "relu", "heavy_tail"])
def test_entropy_matches_reference_rebinned_histogram(kind):
    # fractional counts after re-binning; the reference sees the very same histogram
    x = _data(kind, seed=3)
    obs = EntropyObserver(kind)
    for k, part in enumerate(np.array_split(x, 4)):
        obs.observe(part * (1.0 + 0.4 * k))
    assert obs.rebins >= 1
    hist, edges = obs.histogram, obs.bin_edges
    ref_amax, _ = _ref_entropy_amax(hist, edges)
    assert abs(obs.amax() - ref_amax) <= (edges[1] - edges[0]) * (1 + 1e-9)


def test_entropy_without_zero_bin_fix_matches_reference():
    x = _data("relu", seed=5)
    obs = EntropyObserver("relu", fix_zero_bin=False)
    obs.observe(x)
    hist, edges = obs.histogram, obs.bin_edges
    ref_amax, _ = _ref_entropy_amax(hist, edges, fix_zero_bin=False)
    assert abs(obs.amax() - ref_amax) <= (edges[1] - edges[0]) * (1 + 1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entropy_matches_reference_on_raw_histograms(seed):
    # synthetic count vectors with runs of empty bins, smaller sizes and other start bins
    rng = np.random.default_rng(100 + seed)
    n = [2048, 700, 1024][seed]
    hist = np.floor(rng.exponential(50.0, n) * np.exp(-np.arange(n) / (n / 6.0)))
    hist[rng.random(n) < 0.3] = 0
    hist[n // 2: n // 2 + 50] = 0
    hist[-1] = 3                      # an outlier at the very top
    edges = np.linspace(0.0, 5.0, n + 1)
    start = [128, 200, 256][seed]
    ours, i = entropy_threshold(hist, edges, start_bin=start)
    ref, ref_i = _ref_entropy_amax(hist, edges, start_bin=start)
    assert abs(i - ref_i) <= 1 and abs(ours - ref) <= (edges[1] - edges[0]) * (1 + 1e-9)


def test_entropy_speed():
    x = _data("laplacian")
    obs = EntropyObserver("speed")
    obs.observe(x)
    hist, edges = obs.histogram, obs.bin_edges
    best = min(_timed(lambda: entropy_threshold(hist, edges)) for _ in range(3))
    assert best < 0.2, best


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# --------------------------------------------------------------------------------------------------
# minmax / percentile / mse
# --------------------------------------------------------------------------------------------------
def test_minmax_is_max_abs_over_batches():
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((8, 3, 5, 5)).astype(np.float32) * s for s in (1.0, 3.0, 0.5)]
    batches[1][0, 0, 0, 0] = -17.25
    obs = make_observer("minmax", name="act")
    for b in batches:
        obs.observe(b)
    assert obs.amax() == 17.25
    assert obs.scale() == pytest.approx(17.25 / 127)
    assert isinstance(obs, MinMaxObserver)


@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
@pytest.mark.parametrize("kind", ["gaussian", "laplacian", "relu"])
def test_percentile_close_to_numpy(kind, p):
    x = _data(kind, n=600_000, seed=7)
    obs = make_observer("percentile", name=kind, percentile=p)
    for part in np.array_split(x, 3):
        obs.observe(part)
    width = obs.bin_edges[1] - obs.bin_edges[0]
    assert isinstance(obs, PercentileObserver)
    assert abs(obs.amax() - np.percentile(np.abs(x), p)) <= width


@pytest.mark.parametrize("kind", ["gaussian", "laplacian", "heavy_tail"])
def test_mse_beats_minmax_and_tiny_clip(kind):
    x = _data(kind, seed=11)
    obs = make_observer("mse", name=kind)
    obs.observe(x)
    c = obs.amax()
    m = float(np.abs(x).max())
    assert isinstance(obs, MSEObserver)
    assert 0 < c <= m
    assert _mse(x, c) <= _mse(x, m)
    assert _mse(x, c) <= _mse(x, 0.02 * m)
    # and it is close to the best clip of a fine grid
    grid = np.linspace(0.01, 1.0, 100) * m
    assert _mse(x, c) <= 1.05 * min(_mse(x, g) for g in grid)


# --------------------------------------------------------------------------------------------------
# Histograms: one pass with growing max vs exact
# --------------------------------------------------------------------------------------------------
INCREMENTAL_CASES = [(k, s) for k in ("gaussian", "laplacian", "relu", "student_t", "bimodal", "heavy_tail")
                     for s in (21, 22)]


def _incremental_and_single(method, kind, seed, **params):
    """The same data seen as 6 batches whose max grows (re-binned) and as one batch (exact)."""
    x = _data(kind, n=600_000, seed=seed)
    parts = [p * np.float32(0.6 + 0.25 * k) for k, p in enumerate(np.array_split(x, 6))]
    inc = make_observer(method, name=kind, **params)
    for p in parts:
        inc.observe(p)
    one = make_observer(method, name=kind, **params)
    one.observe(np.concatenate(parts))
    assert inc.rebins >= 2 and one.rebins == 0
    np.testing.assert_allclose(inc.bin_edges, one.bin_edges)
    assert inc.histogram.sum() == pytest.approx(x.size)
    return inc, one


@pytest.mark.parametrize("kind,seed", INCREMENTAL_CASES)
def test_incremental_percentile_close_to_single_pass(kind, seed):
    inc, one = _incremental_and_single("percentile", kind, seed, percentile=99.9)
    assert abs(inc.amax() - one.amax()) <= 2 * one.bin_edges[1]


def test_incremental_entropy_close_to_single_pass():
    # TensorRT's KL curve can have near-equal minima far apart, so a slightly different histogram
    # may flip between them: require 2 bins in most cases and a near-optimal KL in all of them
    close, worst_excess = 0, 0.0
    for kind, seed in INCREMENTAL_CASES:
        inc, one = _incremental_and_single("entropy", kind, seed)
        width = one.bin_edges[1]
        inc_amax, one_amax = inc.amax(), one.amax()
        close += abs(inc_amax - one_amax) <= 2 * width
        cand, kl = entropy_divergences(one.histogram)        # the exact histogram's KL curve
        excess = kl[cand == inc.kept_bins][0] / kl[cand == one.kept_bins][0] - 1.0
        worst_excess = max(worst_excess, excess)
    assert close == len(INCREMENTAL_CASES), close
    assert worst_excess <= 0.01, worst_excess


@pytest.mark.parametrize("seed", [1000, 1007])
def test_one_pass_entropy_matches_exact_two_pass(seed):
    # ReLU activations over three 1M-element batches whose max grows: the one-pass histogram
    # (re-binned twice) gives the same entropy threshold as the exact two-pass one
    rng = np.random.default_rng(seed)
    parts = []
    for b in range(3):
        x = rng.standard_normal(1 << 20, dtype=np.float32) - np.float32(0.3)
        parts.append(np.maximum(x, 0) * np.float32(0.5 * (1.0 + 0.15 * b)))
    one = EntropyObserver("one")
    for p in parts:
        one.observe(p)
    exact_amax, exact = calibrate("entropy", parts, name="exact", two_pass=True)
    assert one.rebins >= 1 and exact.rebins == 0
    width = exact.bin_edges[1] - exact.bin_edges[0]
    assert abs(one.amax() - exact_amax) <= 2 * width, (one.kept_bins, exact.kept_bins)


def test_two_pass_histogram_is_exact():
    x = _data("laplacian", seed=4)
    parts = [p * (1 + k) for k, p in enumerate(np.array_split(x, 3))]
    full = np.abs(np.concatenate(parts)).astype(np.float64)
    _, obs = calibrate("percentile", parts, name="lap", two_pass=True, percentile=99.9)
    ref, ref_edges = np.histogram(full, bins=2048, range=(0.0, full.max()))
    np.testing.assert_allclose(obs.bin_edges, ref_edges)
    # float32 binning may move a value that sits on an edge to the neighbouring bin
    assert np.abs(obs.histogram - ref).sum() <= 1e-4 * full.size
    assert obs.rebins == 0


def test_two_pass_callable_batches_and_hint_violation():
    rng = np.random.default_rng(9)
    parts = [rng.standard_normal(1000).astype(np.float32) for _ in range(3)]
    amax, obs = calibrate("entropy", lambda: iter(parts), name="t", two_pass=True)
    assert obs.amax_hint == max(float(np.abs(p).max()) for p in parts)
    assert 0 < amax <= obs.amax_hint
    with pytest.raises(QuantOpsError, match="one-shot iterator"):
        calibrate("entropy", iter(parts), name="t", two_pass=True)
    hinted = EntropyObserver("hinted", amax_hint=1.0)
    with pytest.raises(QuantOpsError, match="hinted"):
        hinted.observe(np.array([0.5, -2.0], np.float32))


def test_zero_batches_then_data():
    obs = EntropyObserver("late")
    obs.observe(np.zeros(1000, np.float32))
    zeros_only = EntropyObserver("zeros")
    zeros_only.observe(np.zeros(10, np.float32))
    assert zeros_only.amax() == 0.0
    obs.observe(np.linspace(-1, 1, 5001).astype(np.float32))
    assert obs.histogram.sum() == 6001
    assert obs.histogram[0] >= 1000
    assert 0 < obs.amax() <= 1.0


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "entropy"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_batch_names_the_tensor(method, bad):
    obs = make_observer(method, name="stage2.conv3_output")
    obs.observe(np.ones(10, np.float32))
    x = np.ones(100, np.float32)
    x[17] = bad
    with pytest.raises(QuantOpsError, match=r"stage2\.conv3_output.*(NaN|inf)"):
        obs.observe(x)


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "entropy"])
def test_amax_before_observe_and_empty_batch(method):
    obs = make_observer(method, name="fc1")
    with pytest.raises(QuantOpsError, match="fc1.*before any batch"):
        obs.amax()
    with pytest.raises(QuantOpsError, match="fc1.*empty"):
        obs.observe(np.zeros((0, 4), np.float32))


def test_factory_rejects_unknown_method_and_params():
    with pytest.raises(QuantOpsError, match="unknown calibration method"):
        make_observer("kl_magic")
    with pytest.raises(QuantOpsError, match="percentil"):
        make_observer("entropy", percentil=99.9)
    with pytest.raises(QuantOpsError):
        make_observer("percentile", percentile=0.0)
    with pytest.raises(QuantOpsError):
        make_observer("entropy", bins=100)   # fewer bins than the 128 levels
