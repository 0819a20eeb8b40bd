// Learned Step Size Quantization (Esser et al., "Learned Step Size Quantization", ICLR 2020,
// arXiv 1902.08153): fake quantization with a learned step size s and its gradient.
//
// Plain C++ with no MXNet types (per-element math in QO_HD functions, as kernels/fake_quant.h).
// The numpy spec is quant_ops/refs/lsq.py; both compute in float32 in the same order.
//
//   r     = v / s                    (0 where v == 0 and v / s is NaN: s = 0 is then the
//                                     limit s -> 0+)
//   v_bar = rint(clip(r, -Qn, Qp))   (round half to even; + 0 makes the code 0 a +0)
//   v_hat = v_bar * s
//
// Backward (paper eq. 3 and 5, the straight-through estimator for the round):
//   dL/dv = dL/dv_hat where -Qn <= r <= Qp, else 0 (a NaN r counts as outside)
//   dL/ds = g * sum_i dL/dv_hat_i * d_i,  d_i = -Qn if r < -Qn; Qp if r > Qp; v_bar - r else
// with the gradient scale g = 1 / sqrt(N * Qp) (section 2.2).
//
// The step gradient is a sum, so its rounding depends on the order of the additions.  The order
// is fixed (and the reference replays it): terms dL/dv_hat_i * d_i are float32 products, summed
// in double; a row of a channel (see LsqView) is cut into chunks of kLsqChunk elements; within
// a chunk, lane j (0..7) sums the elements j, j+8, j+16, ... in order starting from 0.0, and the
// chunk's sum is ((0.0 + lane0) + lane1) + ... + lane7; a row's sum adds its chunk sums in order
// from 0.0, the channel's total adds its row sums in order from 0.0; finally
// ds = float(total) * g in float32.  The result does not depend on the thread count or on the
// SIMD width of the clone the loader picked.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "fake_quant.h"  // QO_HD, QO_CLONES

namespace qo {

/*! \brief Clip bounds of an LSQ quantizer as floats: qmin = -Qn, qmax = Qp (paper section 2:
 *  signed Qn = 2^(b-1), Qp = 2^(b-1) - 1; unsigned Qn = 0, Qp = 2^b - 1). */
struct LsqRange {
  float qmin;
  float qmax;
};

QO_HD LsqRange lsq_range(int nbits, bool is_signed) {
  if (is_signed) {
    const float half = static_cast<float>(1 << (nbits - 1));
    return LsqRange{-half, half - 1.0f};
  }
  return LsqRange{0.0f, static_cast<float>((1 << nbits) - 1)};
}

/*! \brief Gradient scale g = 1 / sqrt(N * Qp), in double, rounded once to float32. */
inline float lsq_grad_scale(int64_t n_per_step, float qmax) {
  if (n_per_step <= 0) return 0.0f;
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(n_per_step) *
                                            static_cast<double>(qmax)));
}

/*! \brief v / s, except that 0 / 0 (and 0 / NaN) gives 0.  Written as a select of the
 *  quotient on both conditions so that GCC if-converts it and the loops vectorize. */
QO_HD float lsq_ratio(float v, float s) {
  const float r = v / s;
  return (r != r && v == 0.0f) ? 0.0f : r;
}

/*! \brief The integer code: rint(clip(r)); clamps as ternaries, NaN passes through. */
QO_HD float lsq_code(float r, float qmin, float qmax) {
  float c = r < qmin ? qmin : r;
  c = c > qmax ? qmax : c;
  return std::nearbyint(c) + 0.0f;
}

QO_HD float lsq_fake_quant(float v, float s, float qmin, float qmax) {
  return lsq_code(lsq_ratio(v, s), qmin, qmax) * s;
}

/*! \brief d v_hat / d s (paper eq. 3) given r = v / s and its code q: q - r inside the range;
 *  outside it q itself, which is the bound (-Qn below, Qp above); NaN stays NaN.  (d takes
 *  part in the condition so that GCC keeps the subtraction out of a branch and vectorizes.) */
QO_HD float lsq_step_term(float r, float q, float qmin, float qmax) {
  const float d = q - r;
  return ((r >= qmin && r <= qmax) || d != d) ? d : q;
}

/*! \brief d L / d v: straight through inside the clip range (inclusive), 0 outside. */
QO_HD float lsq_data_grad(float g, float r, float qmin, float qmax) {
  return (r >= qmin && r <= qmax) ? g : 0.0f;
}

/*! \brief A tensor seen as rows: (outer, channels, inner) around the channel axis, one step per
 *  channel; a per-tensor quantizer is outer = channels = 1, inner = size. */
struct LsqView {
  int64_t outer = 1, channels = 1, inner = 1;
};

constexpr int64_t kLsqChunk = 4096;  // a multiple of 8 (the lanes)
constexpr int kLsqLanes = 8;

inline int64_t lsq_chunks_per_row(int64_t inner) {
  return inner <= 0 ? 0 : (inner + kLsqChunk - 1) / kLsqChunk;
}

/*! \brief y = v_hat(x) with one step per channel. */
QO_CLONES inline void lsq_forward(const float* x, float* y, LsqView v, const float* step,
                                  LsqRange r) {
  const float qmin = r.qmin, qmax = r.qmax;
  const int64_t cpr = lsq_chunks_per_row(v.inner);
  const int64_t tasks = v.outer * v.channels * cpr;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t row = t / cpr, k = t % cpr;
    const float s = step[row % v.channels];
    const int64_t b = row * v.inner + k * kLsqChunk;
    const int64_t n = (v.inner - k * kLsqChunk) < kLsqChunk ? v.inner - k * kLsqChunk
                                                             : kLsqChunk;
    const float* xp = x + b;
    float* yp = y + b;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) yp[i] = lsq_fake_quant(xp[i], s, qmin, qmax);
  }
}

/*! \brief One chunk of the backward: writes dx and returns the chunk's step-gradient sum
 *  (unscaled) in the fixed order described at the top of this file. */
QO_CLONES inline double lsq_backward_chunk(const float* g, const float* x, float* dx, int64_t n,
                                           float s, float qmin, float qmax) {
  double lane[kLsqLanes] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t i = 0;
  for (; i + kLsqLanes <= n; i += kLsqLanes) {
#pragma omp simd
    for (int j = 0; j < kLsqLanes; ++j) {
      const float r = lsq_ratio(x[i + j], s);
      const float q = lsq_code(r, qmin, qmax);
      dx[i + j] = lsq_data_grad(g[i + j], r, qmin, qmax);
      lane[j] += static_cast<double>(g[i + j] * lsq_step_term(r, q, qmin, qmax));
    }
  }
  for (int j = 0; i + j < n; ++j) {
    const float r = lsq_ratio(x[i + j], s);
    const float q = lsq_code(r, qmin, qmax);
    dx[i + j] = lsq_data_grad(g[i + j], r, qmin, qmax);
    lane[j] += static_cast<double>(g[i + j] * lsq_step_term(r, q, qmin, qmax));
  }
  double sum = 0.0;
  for (int j = 0; j < kLsqLanes; ++j) sum += lane[j];
  return sum;
}

/*! \brief dx (straight through inside the range) and dstep[c] = g * sum over channel c. */
inline void lsq_backward(const float* g, const float* x, float* dx, float* dstep, LsqView v,
                         const float* step, LsqRange r, float grad_scale) {
  const float qmin = r.qmin, qmax = r.qmax;
  const int64_t cpr = lsq_chunks_per_row(v.inner);
  const int64_t tasks = v.outer * v.channels * cpr;
  std::vector<double> part(static_cast<size_t>(tasks));
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t row = t / cpr, k = t % cpr;
    const int64_t b = row * v.inner + k * kLsqChunk;
    const int64_t n = (v.inner - k * kLsqChunk) < kLsqChunk ? v.inner - k * kLsqChunk
                                                             : kLsqChunk;
    part[t] = lsq_backward_chunk(g + b, x + b, dx + b, n, step[row % v.channels], qmin, qmax);
  }
  for (int64_t c = 0; c < v.channels; ++c) {
    double total = 0.0;
    for (int64_t o = 0; o < v.outer; ++o) {
      double row_sum = 0.0;
      const double* p = part.data() + (o * v.channels + c) * cpr;
      for (int64_t k = 0; k < cpr; ++k) row_sum += p[k];
      total += row_sum;
    }
    dstep[c] = static_cast<float>(total) * grad_scale;
  }
}

}  // namespace qo
