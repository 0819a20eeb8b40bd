// GDRQ: group-based distribution reshaping quantization (Yu et al., "Low-bit Quantization Needs
// Good Distribution", arXiv 1908.01477), with the semantics of the seed toolkit's
// _contrib_GDRQ (XiaotaoChen/mx_quant_op, operator_cxx/contrib/GDRQ-inl.h).
//
// Plain C++ with no MXNet types (per-element math in QO_HD functions, as kernels/fake_quant.h).
// The numpy spec is quant_ops/refs/gdrq.py; both compute in float32 in the same order.
//
// A tensor is seen as rows (GdrqView: outer, groups, inner), one clip value alpha per group:
// per tensor one group (outer = groups = 1); with a group size g, g consecutive channels (axis
// 0 of a weight, axis 1 of an activation) form a group.
//
//   Scale-Clip statistic (paper section 3.3; seed: threshold = ktimes * mean(|x|)):
//     t = f32(ktimes) * f32(total / count),  total = sum |x| over the group in float64
//     (NaN counts as 0), summed in a fixed order: a row is cut into chunks of kGdrqChunk
//     elements; within a chunk lane j (0..7) sums elements j, j+8, ... in order from 0.0; the
//     chunk's sum is ((0.0 + lane0) + lane1) + ... + lane7; a row adds its chunks in order from
//     0.0 and a group its rows in order from 0.0.  Independent of threads and SIMD width.
//   clip value:  weights alpha = t; activations (training) alpha <- alpha - lamda * (alpha - t),
//     an alpha that is not > 0 (uninitialized) takes t.
//   clip:        c = x > a ? a : (x < -a ? -a : x)        (mshadow_op::clip, as the seed)
//   quantize:    s = a / L, L = 2^nbits - 1; q = clamp(rint(c / s), -L, L) + 0; y = q * s;
//                a scale outside (0, FLT_MAX] gives +0 (NaN stays NaN).
//   gradient:    straight through where -a <= x <= a, else 0 (or everywhere: weights, "ste").
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "fake_quant.h"  // QO_HD, QO_CLONES, usable_scale

namespace qo {

struct GdrqView {
  int64_t outer = 1, groups = 1, inner = 1;
};

constexpr int64_t kGdrqChunk = 4096;  // a multiple of the lanes
constexpr int kGdrqLanes = 8;

/*! \brief L = 2^nbits - 1: codes run from -L to L (the seed's QUANT_LEVEL). */
QO_HD float gdrq_levels(int nbits) { return static_cast<float>((1 << nbits) - 1); }

/*! \brief mshadow_op::clip(x, a): the seed's symmetric clip; NaN passes through. */
QO_HD float gdrq_clip(float x, float a) { return x > a ? a : (x < -a ? -a : x); }

/*! \brief One element of the quantized output (s usable). */
QO_HD float gdrq_quant(float x, float a, float s, float levels) {
  float q = std::nearbyint(gdrq_clip(x, a) / s);
  q = q < -levels ? -levels : q;
  q = q > levels ? levels : q;
  return (q + 0.0f) * s;
}

/*! \brief One element under an unusable scale: +0, NaN stays NaN. */
QO_HD float gdrq_no_scale(float x) { return x != x ? x : 0.0f; }

/*! \brief The clip's straight-through gradient: g where -a <= x <= a (NaN: 0). */
QO_HD float gdrq_clip_grad(float g, float x, float a) { return (x >= -a && x <= a) ? g : 0.0f; }

/*! \brief Scale-Clip threshold of a group from its float64 sum of |x| and element count. */
inline float gdrq_threshold(double total, int64_t count, float ktimes) {
  return ktimes * static_cast<float>(total / static_cast<double>(count));
}

/*! \brief Moving clip value of an activation group (seed GDRQ-inl.h line 200, with the sign
 *  that makes t its fixed point); an alpha not > 0 (or NaN) is uninitialized and takes t. */
QO_HD float gdrq_moving_alpha(float alpha, float t, float lamda) {
  if (!(alpha > 0.0f)) return t;
  return alpha - lamda * (alpha - t);
}

inline int64_t gdrq_chunks_per_row(int64_t inner) {
  return inner <= 0 ? 0 : (inner + kGdrqChunk - 1) / kGdrqChunk;
}

/*! \brief sum |x| over one chunk in the fixed lane order; NaN counts as 0 when `skip_nan`
 *  (the select keeps GCC from vectorizing, so it is the slow path). */
template <bool skip_nan>
QO_HD double gdrq_abs_sum_lanes(const float* x, int64_t n) {
  double lane[kGdrqLanes] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t i = 0;
  for (; i + kGdrqLanes <= n; i += kGdrqLanes) {
#pragma omp simd
    for (int j = 0; j < kGdrqLanes; ++j) {
      const double a = std::fabs(static_cast<double>(x[i + j]));
      lane[j] += (skip_nan && a != a) ? 0.0 : a;
    }
  }
  for (int j = 0; i + j < n; ++j) {
    const double a = std::fabs(static_cast<double>(x[i + j]));
    lane[j] += (skip_nan && a != a) ? 0.0 : a;
  }
  double sum = 0.0;
  for (int j = 0; j < kGdrqLanes; ++j) sum += lane[j];
  return sum;
}

/*! \brief The chunk's sum with NaN counted as 0.  Every term is >= 0, so a NaN sum means a
 *  NaN input; the chunk is then summed again skipping NaN (adding 0.0 to a lane changes
 *  nothing, so both paths give the same bits where both apply). */
QO_CLONES inline double gdrq_abs_sum_chunk(const float* x, int64_t n) {
  const double fast = gdrq_abs_sum_lanes<false>(x, n);
  return fast == fast ? fast : gdrq_abs_sum_lanes<true>(x, n);
}

/*! \brief totals[g] = sum |x| over group g, in the fixed order described at the top. */
inline void gdrq_abs_sums(const float* x, GdrqView v, double* totals) {
  const int64_t cpr = gdrq_chunks_per_row(v.inner);
  const int64_t tasks = v.outer * v.groups * cpr;
  std::vector<double> part(static_cast<size_t>(tasks));
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t row = t / cpr, k = t % cpr;
    const int64_t b = row * v.inner + k * kGdrqChunk;
    const int64_t n = (v.inner - k * kGdrqChunk) < kGdrqChunk ? v.inner - k * kGdrqChunk
                                                               : kGdrqChunk;
    part[t] = gdrq_abs_sum_chunk(x + b, n);
  }
  for (int64_t g = 0; g < v.groups; ++g) {
    double total = 0.0;
    for (int64_t o = 0; o < v.outer; ++o) {
      double row_sum = 0.0;
      const double* p = part.data() + (o * v.groups + g) * cpr;
      for (int64_t k = 0; k < cpr; ++k) row_sum += p[k];
      total += row_sum;
    }
    totals[g] = total;
  }
}

/*! \brief New clip values from the data: weights alpha = t, activations the moving value. */
inline void gdrq_update_alpha(const float* x, GdrqView v, float* alpha, bool is_weight,
                              float ktimes, float lamda) {
  const int64_t count = v.outer * v.inner;
  if (count <= 0) return;
  std::vector<double> totals(static_cast<size_t>(v.groups));
  gdrq_abs_sums(x, v, totals.data());
  for (int64_t g = 0; g < v.groups; ++g) {
    const float t = gdrq_threshold(totals[g], count, ktimes);
    alpha[g] = is_weight ? t : gdrq_moving_alpha(alpha[g], t, lamda);
  }
}

/*! \brief Row r's chunk k as [b, b + n). */
struct GdrqSpan {
  int64_t row, b, n;
};

inline GdrqSpan gdrq_span(GdrqView v, int64_t cpr, int64_t t) {
  const int64_t row = t / cpr, k = t % cpr;
  const int64_t n = (v.inner - k * kGdrqChunk) < kGdrqChunk ? v.inner - k * kGdrqChunk
                                                             : kGdrqChunk;
  return GdrqSpan{row, row * v.inner + k * kGdrqChunk, n};
}

/*! \brief y = clip(x, alpha[group]) (the reshaping alone: training without quantization). */
QO_CLONES inline void gdrq_clip_tensor(const float* x, float* y, GdrqView v, const float* alpha) {
  const int64_t cpr = gdrq_chunks_per_row(v.inner);
  const int64_t tasks = v.outer * v.groups * cpr;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    const GdrqSpan sp = gdrq_span(v, cpr, t);
    const float a = alpha[sp.row % v.groups];
    const float* xp = x + sp.b;
    float* yp = y + sp.b;
#pragma omp simd
    for (int64_t i = 0; i < sp.n; ++i) yp[i] = gdrq_clip(xp[i], a);
  }
}

/*! \brief y = quantized clip(x, alpha[group]) with s = alpha / L. */
QO_CLONES inline void gdrq_quant_tensor(const float* x, float* y, GdrqView v, const float* alpha,
                                        float levels) {
  const int64_t cpr = gdrq_chunks_per_row(v.inner);
  const int64_t tasks = v.outer * v.groups * cpr;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    const GdrqSpan sp = gdrq_span(v, cpr, t);
    const float a = alpha[sp.row % v.groups];
    const float s = a / levels;
    const float* xp = x + sp.b;
    float* yp = y + sp.b;
    if (!usable_scale(s)) {
#pragma omp simd
      for (int64_t i = 0; i < sp.n; ++i) yp[i] = gdrq_no_scale(xp[i]);
      continue;
    }
#pragma omp simd
    for (int64_t i = 0; i < sp.n; ++i) yp[i] = gdrq_quant(xp[i], a, s, levels);
  }
}

/*! \brief dx = g where -alpha <= x <= alpha (per group), else 0. */
QO_CLONES inline void gdrq_clip_grad_tensor(const float* g, const float* x, float* dx, GdrqView v,
                                            const float* alpha) {
  const int64_t cpr = gdrq_chunks_per_row(v.inner);
  const int64_t tasks = v.outer * v.groups * cpr;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    const GdrqSpan sp = gdrq_span(v, cpr, t);
    const float a = alpha[sp.row % v.groups];
#pragma omp simd
    for (int64_t i = 0; i < sp.n; ++i) dx[sp.b + i] = gdrq_clip_grad(g[sp.b + i], x[sp.b + i], a);
  }
}

}  // namespace qo
