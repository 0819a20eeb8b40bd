"""Range-selection rules that work on a histogram of ``|x|``.

Every function takes ``hist`` (counts, may be fractional after re-binning) and ``bin_edges``
(``len(hist) + 1`` increasing edges, the first one 0) and returns an ``amax``. They are pure
numpy, with no loop over elements; the entropy search loops over nothing per element either
(its per-candidate cost is O(levels), see :func:`entropy_divergences`).

Conventions (and where they come from):

* entropy -- TensorRT's entropy calibration as NVIDIA's pytorch-quantization implements it
  (``pytorch_quantization/calib/histogram.py``, ``_compute_amax_entropy``), which follows the
  GTC 2017 talk "8-bit inference with TensorRT" (S7310):

  - candidates ``i = start_bin .. n`` (``n`` = number of bins, both ends included), step
    ``stride``; ``i`` is the number of bins kept;
  - optionally (``fix_zero_bin``, on by default, as in pytorch-quantization) the count of bin 0 is
    replaced by the count of bin 1 before the search, so the exact zeros of ReLU outputs do not
    dominate the distributions;
  - reference ``P = hist[:i]`` with every count above bin ``i`` folded into ``P[i-1]``;
  - candidate ``Q``: bin ``j < i`` belongs to level ``floor(levels * j / i)`` (pytorch-quantization
    computes it as ``np.digitize(range(i), np.linspace(0, i, levels + 1)) - 1``, which is the same
    integer exactly). Group sizes are therefore ``floor`` or ``ceil`` of ``i / levels``, spread
    evenly over the range -- not MXNet's convention (``calibrate.cc``: ``i // levels`` bins per
    group and the last group takes the remainder);
  - each level's total is spread uniformly over the bins of its group that are non-empty in
    ``hist[:i]``; empty bins stay 0 in ``Q``;
  - ``KL(P || Q)`` after normalising both (``scipy.stats.entropy`` semantics): terms with ``P = 0``
    are 0, and a bin with ``P > 0`` but ``Q = 0`` makes the divergence infinite (there is no
    smoothing: this happens only when bin ``i-1`` is empty while there are outliers, and such a
    candidate is simply never chosen). A candidate whose ``Q`` is all zero is also infinite;
  - the minimum is taken with ties going to the LARGEST ``i`` (pytorch-quantization takes the last
    argmin), and ``amax = bin_edges[i]``, the upper edge of the last kept bin. (The GTC slides
    write ``(m + 0.5) * bin_width``, half a bin higher; we follow the code.)

* percentile -- the ``percentile`` point of the histogram's CDF, interpolated linearly inside the
  bin where the CDF crosses it (counts taken as uniform within a bin). pytorch-quantization
  returns the lower edge of that bin instead, up to one bin lower.

* mse -- every bin edge ``c = bin_edges[k]``, ``k = 1..n``, is a candidate clip; each bin stands
  for its centre with its count (pytorch-quantization's ``_compute_amax_mse`` does the same with
  centres as candidates); the error of a centre ``x`` is ``(fq(x, c) - x)**2`` with
  ``fq(x, c) = min(floor(x / s + 0.5), qmax) * s``, ``s = c / qmax`` (``qmax = 127`` for int8,
  round half away from zero like MXNet's ``round``); the smallest mean error wins, ties to the
  smallest ``c``.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from ..errors import QuantOpsError

__all__ = ["entropy_divergences", "entropy_threshold", "percentile_threshold", "mse_threshold",
           "mse_errors"]


def _as_hist(hist, bin_edges) -> Tuple[np.ndarray, np.ndarray]:
    h = np.array(hist, dtype=np.float64).reshape(-1)
    e = np.asarray(bin_edges, dtype=np.float64).reshape(-1)
    if h.size == 0:
        raise QuantOpsError("empty histogram")
    if e.size != h.size + 1:
        raise QuantOpsError("bin_edges must have len(hist) + 1 entries, got %d for %d bins" % (e.size, h.size))
    if not np.all(np.isfinite(h)) or np.any(h < 0):
        raise QuantOpsError("histogram counts must be finite and non-negative")
    return h, e


def _xlogx(v: np.ndarray) -> np.ndarray:
    out = np.zeros_like(v)
    pos = v > 0
    out[pos] = v[pos] * np.log(v[pos])
    return out


def _candidates(n: int, start_bin: int, stride: int) -> np.ndarray:
    if stride < 1:
        raise QuantOpsError("stride must be >= 1, got %r" % (stride,))
    if start_bin < 1 or start_bin > n:
        raise QuantOpsError("start_bin must be in [1, %d] (the number of bins), got %r" % (n, start_bin))
    return np.arange(start_bin, n + 1, stride, dtype=np.int64)


def _prepare(hist, num_levels: int, fix_zero_bin: bool) -> np.ndarray:
    h = np.array(hist, dtype=np.float64).reshape(-1)
    if num_levels < 1:
        raise QuantOpsError("num_levels must be >= 1, got %r" % (num_levels,))
    if fix_zero_bin and h.size > 1:
        h[0] = h[1]
    return h


def entropy_divergences(hist, *, num_levels: int = 128, start_bin: int = 128, stride: int = 1,
                        fix_zero_bin: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """KL(P || Q) of every candidate (see the module docstring), in closed form.

    Returns ``(candidates, kl)``: the numbers of kept bins and their divergences (``inf`` where the
    rule makes it infinite). ``num_levels`` must not exceed ``start_bin`` (every level needs a
    bin).

    Per candidate this costs O(num_levels), not O(bins): with prefix sums ``C`` of the counts,
    ``N`` of the non-empty-bin indicator and ``H`` of ``h log h``, the level totals are
    ``C[s(k+1)] - C[s(k)]`` over the group boundaries ``s(k) = ceil(k * i / levels)``, and since
    every non-empty bin of level ``k`` holds the same ``Q`` value ``avg_k = total_k / nonempty_k``::

        KL = (sum P log P - sum_k total_k log avg_k - outl * log Q[i-1]) / S + log(sum Q) - log S

    with ``S`` the total count and ``outl`` the count above bin ``i``. The result equals the
    bin-by-bin formula up to rounding; :func:`entropy_threshold` re-evaluates the candidates near
    the minimum bin by bin so that exact ties break as in the reference.
    """
    h = _prepare(hist, num_levels, fix_zero_bin)
    n = h.size
    cand = _candidates(n, start_bin, stride)
    if num_levels > cand[0]:
        raise QuantOpsError("num_levels (%d) must not exceed start_bin (%d)" % (num_levels, cand[0]))
    total = float(h.sum())
    if total <= 0:
        return cand, np.full(cand.shape, np.inf)

    zero = np.zeros(1)
    csum = np.concatenate([zero, np.cumsum(h)])                       # C[j] = sum h[:j]
    nzsum = np.concatenate([[0], np.cumsum(h > 0)]).astype(np.int64)  # N[j] = #nonempty in h[:j]
    hlog = np.concatenate([zero, np.cumsum(_xlogx(h))])               # H[j] = sum h log h over h[:j]
    # counts at or above bin j, summed from the top so an all-empty tail is exactly 0
    tail = np.concatenate([np.cumsum(h[::-1])[::-1], zero])

    L = num_levels
    k = np.arange(L + 1, dtype=np.int64)
    bounds = (k[None, :] * cand[:, None] + (L - 1)) // L             # s(k) = ceil(k*i/L), (c, L+1)
    gsum = np.diff(csum[bounds], axis=1)                              # level totals
    gcnt = np.diff(nzsum[bounds], axis=1)                             # non-empty bins per level
    ok = (gcnt > 0) & (gsum > 0)
    safe_cnt = np.where(ok, gcnt, 1)
    safe_sum = np.where(ok, gsum, 1.0)
    sum_plogq_in = np.where(ok, gsum * np.log(safe_sum / safe_cnt), 0.0).sum(axis=1)

    last = h[cand - 1]
    outl = tail[cand]
    p_last = last + outl
    # Q at bin i-1 (level L-1): the level's average if the bin is non-empty
    q_last = np.where(last > 0, gsum[:, -1] / np.maximum(gcnt[:, -1], 1), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        outl_term = np.where(outl > 0, outl * np.log(np.where(q_last > 0, q_last, 1.0)), 0.0)
        sum_plogp = hlog[cand - 1] + _xlogx(p_last)
        qtot = csum[cand]
        kl = (sum_plogp - sum_plogq_in - outl_term) / total + np.log(np.where(qtot > 0, qtot, 1.0)) - np.log(total)
    bad = ((outl > 0) & (last <= 0)) | (qtot <= 0)
    kl = np.where(bad, np.inf, np.maximum(kl, 0.0))
    return cand, kl


def _kl_direct(h: np.ndarray, tail: np.ndarray, i: int, num_levels: int) -> float:
    """The divergence of candidate ``i`` computed bin by bin (``scipy.stats.entropy`` arithmetic)."""
    hi = h[:i]
    nz = hi > 0
    group = (num_levels * np.arange(i, dtype=np.int64)) // i
    gsum = np.bincount(group, weights=hi, minlength=num_levels)
    gcnt = np.bincount(group, weights=nz, minlength=num_levels)
    q = np.where(nz, gsum[group] / np.maximum(gcnt[group], 1.0), 0.0)
    p = hi.copy()
    p[-1] += tail[i]
    psum, qsum = p.sum(), q.sum()
    if psum <= 0 or qsum <= 0:
        return float("inf")
    p = p / psum
    q = q / qsum
    pos = p > 0
    if np.any(q[pos] == 0):
        return float("inf")
    return float(np.sum(p[pos] * np.log(p[pos] / q[pos])))


def entropy_threshold(hist, bin_edges, *, num_levels: int = 128, start_bin: int = 128, stride: int = 1,
                      fix_zero_bin: bool = True, tie_tol: float = 1e-9) -> Tuple[float, int]:
    """TensorRT entropy (KL) calibration of a histogram of ``|x|``; returns ``(amax, i)``.

    ``i`` is the chosen number of kept bins and ``amax = bin_edges[i]``. All candidates are scored
    with :func:`entropy_divergences`; those within ``tie_tol * (1 + min)`` of the minimum are scored
    again bin by bin, and the largest ``i`` with the smallest of those scores wins.
    """
    h, e = _as_hist(hist, bin_edges)
    cand, kl = entropy_divergences(h, num_levels=num_levels, start_bin=start_bin, stride=stride,
                                   fix_zero_bin=fix_zero_bin)
    best = float(np.min(kl))
    if not np.isfinite(best):
        # Nothing finite (e.g. an all-zero histogram): keep everything.
        i = int(cand[-1])
        return float(e[i]), i
    near = np.flatnonzero(kl <= best + tie_tol * (1.0 + best))
    hh = _prepare(h, num_levels, fix_zero_bin)
    tail = np.concatenate([np.cumsum(hh[::-1])[::-1], np.zeros(1)])
    exact = np.array([_kl_direct(hh, tail, int(cand[j]), num_levels) for j in near])
    pick = near[len(exact) - 1 - int(np.argmin(exact[::-1]))]
    i = int(cand[pick])
    return float(e[i]), i


def percentile_threshold(hist, bin_edges, percentile: float) -> float:
    """The ``percentile`` (0 < p <= 100) of the histogram's data, linear inside the crossing bin."""
    h, e = _as_hist(hist, bin_edges)
    if not (0.0 < float(percentile) <= 100.0):
        raise QuantOpsError("percentile must be in (0, 100], got %r" % (percentile,))
    cum = np.cumsum(h)
    total = cum[-1]
    if total <= 0:
        return 0.0
    target = float(percentile) / 100.0 * total
    idx = int(np.searchsorted(cum, target, side="left"))
    idx = min(idx, h.size - 1)   # the first bin whose cumulative count reaches the target
    before = cum[idx - 1] if idx > 0 else 0.0
    frac = (target - before) / h[idx] if h[idx] > 0 else 1.0
    frac = min(max(frac, 0.0), 1.0)
    return float(e[idx] + frac * (e[idx + 1] - e[idx]))


def mse_errors(hist, bin_edges, *, num_bits: int = 8, block: int = 256) -> Tuple[np.ndarray, np.ndarray]:
    """Mean squared fake-quantization error for every candidate clip ``bin_edges[1:]``.

    Returns ``(clips, mse)``; see the module docstring for the error model.
    """
    h, e = _as_hist(hist, bin_edges)
    if num_bits < 2:
        raise QuantOpsError("num_bits must be >= 2, got %r" % (num_bits,))
    qmax = float(2 ** (num_bits - 1) - 1)
    centers = 0.5 * (e[:-1] + e[1:])
    clips = e[1:]
    total = h.sum()
    out = np.empty(clips.size)
    if total <= 0:
        out.fill(0.0)
        return clips, out
    keep = h > 0
    xc, wc = centers[keep], h[keep]
    for a in range(0, clips.size, block):
        c = clips[a:a + block, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            s = c / qmax
            lv = np.minimum(np.floor(xc[None, :] / s + 0.5), qmax)
            err = (np.where(c > 0, lv * s, 0.0) - xc[None, :]) ** 2
        out[a:a + block] = err @ wc / total
    return clips, out


def mse_threshold(hist, bin_edges, *, num_bits: int = 8) -> float:
    """The candidate clip (a bin edge) with the smallest :func:`mse_errors`; ties to the smallest."""
    clips, err = mse_errors(hist, bin_edges, num_bits=num_bits)
    if float(np.asarray(hist, dtype=np.float64).sum()) <= 0:
        return 0.0
    return float(clips[int(np.argmin(err))])
