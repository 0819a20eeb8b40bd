// DoReFa-Net quantizer kernels (Zhou et al. 2016, arXiv:1606.06160, sections 2.2-2.4).
//
// Plain C++ with no MXNet types; per-element math in QO_HD functions.  The executable spec is
// quant_ops/refs/dorefa.py, matched bit for bit: float32 in the spec's order, except tanh and
// sech^2, which are evaluated in float64 from expm1(-2|w|) with basic operations only (libm's
// and numpy's float32 tanh disagree with each other, so neither can be the spec) and rounded
// to float32 -- within float64 noise of the exact values.
//
//   n = 2^k - 1,  quantize_k(r) = rint(n r) / n                    (half to even)
//   activations:  y = quantize_k(clip(x, 0, 1));  dx = g where 0 <= x <= 1, else 0
//   weights k>=2: t = tanh(w), M = max|t|, y = 2 quantize_k(t / (2M) + 0.5) - 1;
//                 dx = g * (sech^2(w) / M)  (quantize_k straight through, M held constant);
//                 M == 0 (all +-0 / NaN): y = w, dx = g
//   weights k=1:  E = mean|w|, y = w < 0 ? -E : +E;  dx = g
// NaN in gives NaN out (the max and the mean ignore NaN).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "expm1_taylor.h"
#include "fake_quant.h"  // QO_HD, QO_CLONES, qo::copy

namespace qo {
namespace dorefa {

constexpr int kMinBits = 1;
constexpr int kMaxBits = 16;
constexpr int64_t kSumBlock = 4096;  // k = 1: float64 sums, sequential inside a block
// |w| beyond 60 is evaluated at 60: tanh rounds to 1 and sech^2 / M to 0 in float32 alike.
constexpr uint32_t kTanhClampBits = 0x42700000u;  // 60.0f
constexpr double kLn2Hi = 0x1.62e42feep-1;  // fdlibm's split of ln 2 (k * kLn2Hi is exact)
constexpr double kLn2Lo = 0x1.a39ef35793c76p-33;
constexpr double kInvLn2 = 0x1.71547652b82fep+0;

/*! \brief n = 2^k - 1 as float. */
QO_HD float levels(int nbits) { return static_cast<float>((1u << nbits) - 1u); }

/*! \brief rint(n r) / n; `+ 0.0f` makes the code 0 a +0. */
QO_HD float quantize_k(float r, float n) { return (std::nearbyint(n * r) + 0.0f) / n; }

/*! \brief 2^k for an integral double k in [-1022, 1023], from its bits (vectorizes). */
QO_HD double pow2i(double k) {
  const double biased = k + (0x1.8p52 + 1023.0);  // k + 1023 in the low mantissa bits
  uint64_t b;
  std::memcpy(&b, &biased, sizeof b);
  b <<= 52;
  double r;
  std::memcpy(&r, &b, sizeof r);
  return r;
}

/*! \brief tanh(w) and sech^2(w) as float32, from expm1(-2|w|) in float64. */
QO_HD void tanh_sech2(float w, float* t_out, float* s_out) {
  // Integer bit operations only: |w| is clamped to 60 (a NaN too), and a NaN w is put back
  // at the end through a mask.  A floating-point select on w would let the compiler move the
  // math into a branch that the vectorizer cannot undo (the math may trap).
  uint32_t wb;
  std::memcpy(&wb, &w, sizeof wb);
  uint32_t b = wb & 0x7fffffffu;
  // all ones where w is NaN (bits above +inf), from an arithmetic shift: no compare
  const uint32_t nan = static_cast<uint32_t>(static_cast<int32_t>(0x7f800000u - b) >> 31);
  b = b < kTanhClampBits ? b : kTanhClampBits;  // an integer min (NaN too: masked below)
  float af;
  std::memcpy(&af, &b, sizeof af);
  const double y = -2.0 * static_cast<double>(af);
  const double k = std::nearbyint(y * kInvLn2);
  const double r = (y - k * kLn2Hi) - k * kLn2Lo;  // |r| <= ln2 / 2
  // expm1(r): Taylor to degree 13 (truncation < 2e-17 relative), Horner.
  const double p = expm1_taylor_from_13(kInvFact13, r);
  const double two_k = pow2i(k);
  const double u = two_k * (1.0 + p);          // exp(-2a)
  const double em = two_k * p + (two_k - 1.0);  // expm1(-2a)
  const double d = 2.0 + em;
  const double t = -em / d;
  const double s = (4.0 * u) / (d * d);
  const float tf = std::copysign(static_cast<float>(t), w), sf = static_cast<float>(s);
  uint32_t tb, sb;
  std::memcpy(&tb, &tf, sizeof tb);
  std::memcpy(&sb, &sf, sizeof sb);
  tb = (tb & ~nan) | (wb & nan);  // NaN: w itself
  sb = (sb & ~nan) | (wb & nan);
  std::memcpy(t_out, &tb, sizeof tb);
  std::memcpy(s_out, &sb, sizeof sb);
}

QO_HD float tanh_f(float w) {
  float t, s;
  tanh_sech2(w, &t, &s);
  return t;
}

/*! \brief Activation: quantize_k(clip(x, 0, 1)), computed as rint(clip(n x, 0, n)) / n --
 *  the same float32 result for every x (n x rounds monotonically: x < 0 gives <= -0, x > 1
 *  gives >= n), but no constant feeds arithmetic after a select, which would let the compiler
 *  turn the selects into branches and not vectorize.  Clamps as ternaries so NaN passes. */
QO_HD float activation(float x, float n) {
  float v = n * x;
  v = v < 0.0f ? 0.0f : v;
  v = v > n ? n : v;
  return (std::nearbyint(v) + 0.0f) / n;
}

/*! \brief Activation gradient: passes where 0 <= x <= 1 (inclusive; NaN gets 0). */
QO_HD float activation_grad(float g, float x) { return (x >= 0.0f && x <= 1.0f) ? g : 0.0f; }

/*! \brief Weight (k >= 2) from its tanh: 2 quantize_k(t / (2M) + 0.5) - 1. */
QO_HD float weight_from_tanh(float t, float two_m, float n) {
  const float r = t / two_m + 0.5f;
  return 2.0f * quantize_k(r, n) - 1.0f;
}

/*! \brief 1-bit weight: -E for w < 0, +E otherwise (sign(0) = +1); NaN passes. */
QO_HD float weight_binary(float w, float e) { return w != w ? w : (w < 0.0f ? -e : e); }

// -- tensor kernels --------------------------------------------------------------------

QO_CLONES inline void activation_forward(const float* x, float* y, int64_t n, int nbits) {
  const float nl = levels(nbits);
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) y[i] = activation(x[i], nl);
}

QO_CLONES inline void activation_backward(const float* g, const float* x, float* dx,
                                          int64_t n) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) dx[i] = activation_grad(g[i], x[i]);
}

/*! \brief E = mean |x| over non-NaN elements (0 if none): float64 sums, sequential inside
 *  blocks of kSumBlock, then over the blocks in order -- independent of the thread count. */
inline float mean_abs(const float* x, int64_t n) {
  const int64_t nb = (n + kSumBlock - 1) / kSumBlock;
  std::vector<double> sums(static_cast<size_t>(nb));
  std::vector<int64_t> counts(static_cast<size_t>(nb));
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t e = (b + 1) * kSumBlock < n ? (b + 1) * kSumBlock : n;
    double s = 0.0;
    int64_t c = 0;
    for (int64_t i = b * kSumBlock; i < e; ++i) {  // no simd: the order is the spec
      const float v = x[i];
      if (v == v) {
        s += std::fabs(static_cast<double>(v));
        ++c;
      }
    }
    sums[b] = s;
    counts[b] = c;
  }
  double total = 0.0;
  int64_t count = 0;
  for (int64_t b = 0; b < nb; ++b) {
    total += sums[b];
    count += counts[b];
  }
  return count > 0 ? static_cast<float>(total / static_cast<double>(count)) : 0.0f;
}

/*! \brief Pass 1 of the weight kernels: out[i] = tanh(x[i]); returns M = max |tanh|. */
QO_CLONES inline float tanh_and_max(const float* x, float* out, int64_t n) {
  float m = 0.0f;
#pragma omp parallel for simd reduction(max : m) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float t = tanh_f(x[i]);
    out[i] = t;
    const float a = std::fabs(t);
    m = a > m ? a : m;
  }
  return m;
}

/*! \brief Weights forward.  x and y must not overlap. */
QO_CLONES inline void weight_forward(const float* x, float* y, int64_t n, int nbits) {
  if (nbits == 1) {
    const float e = mean_abs(x, n);
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; ++i) y[i] = weight_binary(x[i], e);
    return;
  }
  const float m = tanh_and_max(x, y, n);
  if (!(m > 0.0f)) {  // every element +-0 or NaN: nothing to normalize by
    copy(x, y, n);
    return;
  }
  const float two_m = 2.0f * m, nl = levels(nbits);
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) y[i] = weight_from_tanh(y[i], two_m, nl);
}

/*! \brief Weights backward: dx = g * (sech^2(x) / M) (k >= 2), dx = g (k = 1 or M == 0).
 *  dx must not overlap g or x. */
QO_CLONES inline void weight_backward(const float* g, const float* x, float* dx, int64_t n,
                                      int nbits) {
  if (nbits == 1) {
    copy(g, dx, n);
    return;
  }
  float m = 0.0f;
#pragma omp parallel for simd reduction(max : m) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    float t, s;
    tanh_sech2(x[i], &t, &s);
    dx[i] = s;
    const float a = std::fabs(t);
    m = a > m ? a : m;
  }
  if (!(m > 0.0f)) {
    copy(g, dx, n);
    return;
  }
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) dx[i] = g[i] * (dx[i] / m);
}

}  // namespace dorefa
}  // namespace qo
