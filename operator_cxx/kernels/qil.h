// QIL kernels (Jung et al., "Learning to Quantize Deep Networks by Optimizing Quantization
// Intervals with Task Loss", CVPR 2019, arXiv:1808.05779, section 3).
//
// Plain C++ with no MXNet types; the per-element math is in QO_HD inline functions so a CUDA
// build can share it.  The spec (formulas, float32 order, boundary conventions, differences
// from the seed toolkit) is quant_ops/refs/qil.py; in short:
//
//   low = c - d, high = c + d; weights a = |x|, s = sign(x) (sign(0) = 0); activations
//   a = x, s = 1;  u = clamp(0.5 * (a - c) / d + 0.5, 0, 1) (0.5 where d == 0 and a == c);
//   p = u, or f32(pow(double u, double gamma)) when the effective gamma is not 1;
//   t = 0 if a < low; s if a > high; s * p else;   y = (rint(t * q_D) + 0) / q_D,
//   q_D = 2^(N-1) - 1 (weights) or 2^N - 1 (activations).
//
// Backward, inside = low <= a <= high && d > 0 (else every term is 0), k = 0.5 / d, D = 1 or
// f32(gamma * pow(u, gamma - 1)) (0 where u == 0):
//   dx = (g * D) * k;  e = (g * s) * D;  dc = f32(sum e) * -k;
//   dd = f32(sum e * (a - c)) * (-k / d);  dgamma = f32(sum g s u^gamma ln u) (u > 0).
//
// The parameter gradients are summed in a fixed order (as PACT's), so they are reproducible
// and equal the reference bit for bit: terms as double; blocks of kQilSumBlock consecutive
// elements; inside a block element i goes to lane (i mod kQilSumLanes), each lane summed in
// order from +0.0; a block's sum is lane 0 + lane 1 + ... from +0.0; the blocks are summed in
// order from +0.0; one rounding to float32.
//
// Vectorization: the selects of the gamma = 1 paths are bitwise (qil_select) and their
// conditions are computed unconditionally (& rather than &&).  With ternaries GCC 12
// (-ftrapping-math) folds 1 * q in one arm, keeps the multiply / the second comparison in a
// branch that may trap, and leaves the loops scalar (8x slower).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fake_quant.h"  // QO_HD, QO_CLONES

namespace qo {

constexpr int64_t kQilSumBlock = 2048;
constexpr int kQilSumLanes = 8;

/*! \brief The interval and the mode of one QIL quantizer. */
struct QilSpec {
  float c = 0.0f, d = 1.0f;    // center, distance
  float low = -1.0f, high = 1.0f;
  float gamma = 1.0f;          // the effective exponent (1 unless weights with a free gamma)
  float qd = 15.0f;            // q_D
  bool weight = false;         // weight transformer (|x|, sign) or activation (one-sided)
  bool grad_gamma = false;     // write d gamma (weights with fix_gamma=False)
};

/*! \brief q_D of the discretizer (paper eq. 3): 2^(N-1) - 1 for weights, 2^N - 1 else. */
QO_HD float qil_levels(int nbits, bool weight) {
  return static_cast<float>(weight ? (1 << (nbits - 1)) - 1 : (1 << nbits) - 1);
}

inline QilSpec qil_spec(float center, float distance, float gamma, int nbits, bool weight,
                        bool fix_gamma) {
  QilSpec q;
  q.c = center;
  q.d = distance;
  q.low = center - distance;
  q.high = center + distance;
  q.weight = weight;
  q.grad_gamma = weight && !fix_gamma;
  q.gamma = q.grad_gamma ? gamma : 1.0f;
  q.qd = qil_levels(nbits, weight);
  return q;
}

/*! \brief cond ? a : b, as bit operations (see the vectorization note above). */
QO_HD float qil_select(bool cond, float a, float b) {
  uint32_t ia, ib;
  std::memcpy(&ia, &a, sizeof ia);
  std::memcpy(&ib, &b, sizeof ib);
  const uint32_t m = 0u - static_cast<uint32_t>(cond);
  const uint32_t r = (ia & m) | (ib & ~m);
  float f;
  std::memcpy(&f, &r, sizeof f);
  return f;
}

/*! \brief sign(x) with sign(0) = 0 (and 0 for NaN, whose output is NaN through u). */
QO_HD float qil_sign(float x) {
  return qil_select(x > 0.0f, 1.0f, qil_select(x < 0.0f, -1.0f, 0.0f));
}

/*! \brief u = alpha a + beta, evaluated as 0.5 * (a - c) / d + 0.5; 0.5 where d == 0 and
 *  a == c (0 / 0: the interval is the point c); clamped to [0, 1] (NaN passes). */
QO_HD float qil_unit(float a, float c, float d) {
  float u = (0.5f * (a - c)) / d + 0.5f;
  u = qil_select((a == c) & (d == 0.0f), 0.5f, u);
  u = qil_select(u < 0.0f, 0.0f, u);
  return qil_select(u > 1.0f, 1.0f, u);
}

/*! \brief The discretizer: (rint(t * q_D) + 0) / q_D (a zero is +0). */
QO_HD float qil_discretize(float t, float qd) { return (std::nearbyint(t * qd) + 0.0f) / qd; }

/*! \brief One output, effective gamma 1 (weights: s = sign(x), a = |x|; activations s = 1). */
QO_HD float qil_linear(float a, float s, float c, float d, float low, float high, float qd) {
  const float t = s * qil_unit(a, c, d);
  return qil_discretize(qil_select(a < low, 0.0f, qil_select(a > high, s, t)), qd);
}

/*! \brief One weight output with an exponent gamma != 1 (libm pow in double). */
inline float qil_power(float x, const QilSpec& q) {
  const float a = std::fabs(x), s = qil_sign(x);
  float t;
  if (a < q.low) {
    t = 0.0f;
  } else if (a > q.high) {
    t = s;
  } else {
    const float u = qil_unit(a, q.c, q.d);
    t = s * static_cast<float>(std::pow(static_cast<double>(u), static_cast<double>(q.gamma)));
  }
  return qil_discretize(t, q.qd);
}

/*! \brief y = Q(T(x)) over n elements. */
QO_CLONES inline void qil_forward(const float* x, float* y, int64_t n, const QilSpec& q) {
  const float c = q.c, d = q.d, low = q.low, high = q.high, qd = q.qd;
  if (q.gamma != 1.0f) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) y[i] = qil_power(x[i], q);
  } else if (q.weight) {
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; ++i)
      y[i] = qil_linear(std::fabs(x[i]), qil_sign(x[i]), c, d, low, high, qd);
  } else {
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; ++i) y[i] = qil_linear(x[i], 1.0f, c, d, low, high, qd);
  }
}

/*! \brief Inside the interval (both ends included), for a usable d > 0; NaN is outside. */
QO_HD bool qil_inside(float a, float low, float high, float d) {
  return (a >= low) & (a <= high) & (d > 0.0f);
}

/*! \brief Per-element gradient pieces, effective gamma 1: dx and the c / d sum terms. */
QO_HD void qil_grad_linear(float g, float a, float s, float c, float d, float low, float high,
                           float k, float* dx, float* tc, float* td) {
  const bool in = qil_inside(a, low, high, d);
  const float e = g * s;
  *dx = qil_select(in, g * k, 0.0f);
  *tc = qil_select(in, e, 0.0f);
  *td = qil_select(in, e * (a - c), 0.0f);
}

/*! \brief Per-element gradient pieces with an exponent (any gamma; also the gamma term). */
inline void qil_grad_power(float g, float x, const QilSpec& q, float k, float* dx, float* tc,
                           float* td, double* tg) {
  const float a = q.weight ? std::fabs(x) : x;
  const float s = q.weight ? qil_sign(x) : 1.0f;
  *dx = 0.0f;
  *tc = 0.0f;
  *td = 0.0f;
  *tg = 0.0;
  if (!qil_inside(a, q.low, q.high, q.d)) return;
  const float u = qil_unit(a, q.c, q.d);
  const double ud = static_cast<double>(u), gd = static_cast<double>(q.gamma);
  float dt = 1.0f;
  if (q.gamma != 1.0f) dt = u > 0.0f ? static_cast<float>(gd * std::pow(ud, gd - 1.0)) : 0.0f;
  *dx = (g * dt) * k;
  const float e = (g * s) * dt;
  *tc = e;
  *td = e * (a - q.c);
  if (q.grad_gamma && u > 0.0f)
    *tg = (static_cast<double>(g) * static_cast<double>(s)) * (std::pow(ud, gd) * std::log(ud));
}

/*! \brief Sum of one block of terms (zero-padded to whole lanes) in the order described at
 *  the top of this file. */
template <typename T>
inline double qil_block_sum(T* t, int64_t len) {
  const int64_t whole = (len + kQilSumLanes - 1) / kQilSumLanes * kQilSumLanes;
  for (int64_t i = len; i < whole; ++i) t[i] = T(0);  // a lane starts at +0: no change
  double lane[kQilSumLanes] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  for (int64_t i = 0; i < whole; i += kQilSumLanes) {
#pragma omp simd
    for (int j = 0; j < kQilSumLanes; ++j) lane[j] += static_cast<double>(t[i + j]);
  }
  double sum = 0.0;
  for (int j = 0; j < kQilSumLanes; ++j) sum += lane[j];
  return sum;
}

/*! \brief f32(S) * f, +0 where f32(S) is 0 (no 0 * inf). */
inline float qil_scaled(double sum, float f) {
  const float s = static_cast<float>(sum);
  return s == 0.0f ? 0.0f : s * f;
}

/*! \brief Parameter gradients of QIL. */
struct QilGrads {
  float dc = 0.0f, dd = 0.0f, dgamma = 0.0f;
};

/*! \brief One block of the backward: writes dx and the block's three sums. */
QO_CLONES inline void qil_backward_block(const float* g, const float* x, float* dx, int64_t len,
                                         const QilSpec& q, float k, double* sums) {
  alignas(64) float tc[kQilSumBlock];
  alignas(64) float td[kQilSumBlock];
  const float c = q.c, d = q.d, low = q.low, high = q.high;
  sums[2] = 0.0;
  if (q.gamma != 1.0f || q.grad_gamma) {
    alignas(64) double tg[kQilSumBlock];
    for (int64_t i = 0; i < len; ++i)
      qil_grad_power(g[i], x[i], q, k, dx + i, tc + i, td + i, tg + i);
    sums[2] = qil_block_sum(tg, len);
  } else if (q.weight) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i)
      qil_grad_linear(g[i], std::fabs(x[i]), qil_sign(x[i]), c, d, low, high, k, dx + i, tc + i,
                      td + i);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i)
      qil_grad_linear(g[i], x[i], 1.0f, c, d, low, high, k, dx + i, tc + i, td + i);
  }
  sums[0] = qil_block_sum(tc, len);
  sums[1] = qil_block_sum(td, len);
}

/*! \brief Backward: writes dx (n elements) and returns d center, d distance, d gamma (summed in
 *  the documented order, independent of the thread count). */
inline QilGrads qil_backward(const float* g, const float* x, float* dx, int64_t n,
                             const QilSpec& q) {
  const float k = 0.5f / q.d;
  const int64_t nblocks = (n + kQilSumBlock - 1) / kQilSumBlock;
  std::vector<double> part(static_cast<size_t>(nblocks) * 3);
  double* pp = part.data();
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t lo = b * kQilSumBlock;
    const int64_t len = lo + kQilSumBlock < n ? kQilSumBlock : n - lo;
    qil_backward_block(g + lo, x + lo, dx + lo, len, q, k, pp + 3 * b);
  }
  double sc = 0.0, sd = 0.0, sg = 0.0;
  for (int64_t b = 0; b < nblocks; ++b) {
    sc += pp[3 * b];
    sd += pp[3 * b + 1];
    sg += pp[3 * b + 2];
  }
  QilGrads r;
  r.dc = qil_scaled(sc, -k);
  r.dd = qil_scaled(sd, -k / q.d);
  r.dgamma = q.grad_gamma ? static_cast<float>(sg) : 0.0f;
  return r;
}

}  // namespace qo
