// PACT kernels (Choi et al., "PACT: Parameterized Clipping Activation for Quantized Neural
// Networks", arXiv:1805.06085, section 2, eq. 1-3).
//
// Plain C++ with no MXNet types; the per-element math is in QO_HD inline functions so a CUDA
// build can share it.  The spec is quant_ops/refs/pact.py.
//
// Forward (eq. 1-2): y = clip(x, 0, alpha);
//   y_q = round(y * (2^k - 1) / alpha) * alpha / (2^k - 1),
// computed as the unsigned QDQ it is (zero point 0), in float32:
//   s = alpha / (2^k - 1);  q = clamp(rint(x / s), 0, 2^k - 1);  y_q = q * s.
// Clamping the rounded code equals rounding the clipped value (x / s is monotonic and
// rint(alpha / s) = 2^k - 1), and this order is what ONNX QuantizeLinear(uint8, zp 0) ->
// DequantizeLinear computes at k = 8 (uint4, opset 21, at k = 4).  Ties round half to even.
// An alpha that gives no usable scale (alpha <= 0, NaN, +inf, or so small that s underflows to
// 0) gives +0; NaN in gives NaN out in every case.
//
// Backward (eq. 3 with the straight-through estimator d y_q / d y = 1):
//   dL/dx     = dL/dy_q  where 0 <= x < alpha, else 0 (also for NaN x);
//   dL/dalpha = sum of dL/dy_q over x >= alpha.
// x == alpha belongs to the saturated piece [alpha, +inf) of eq. 1: its gradient goes to
// alpha, not to x.  x == 0 (either sign) belongs to [0, alpha).  The estimator is evaluated as
// written for any alpha (it never looks at s), so an alpha pushed to <= 0 still receives
// sum(dL/dy_q over x >= alpha) and can recover.
//
// Signed form (attribute signed=True; the seed toolkit's _contrib_PACT and its Python
// prototype PACT_V2_PY clipped to [-alpha, alpha]): y = clip(x, -alpha, alpha) on the
// symmetric narrow grid of 2^(k-1) - 1 levels each side of 0 (k counts the sign bit, so
// seed nbits n is k = n + 1):
//   s = alpha / (2^(k-1) - 1);  q = clamp(rint(x / s), -(2^(k-1) - 1), 2^(k-1) - 1);  y_q = q * s.
// Backward, the same estimator mirrored: dL/dx = dL/dy_q where -alpha < x < alpha;
//   dL/dalpha = sum of dL/dy_q over x >= alpha minus the sum over x <= -alpha
// (x == -alpha saturates, as x == alpha does: d clip(x, -alpha, alpha) / d alpha = -1 there).
// The unsigned form is unchanged by the option.
//
// dL/dalpha is summed in a fixed order, so it is reproducible and equals the reference bit for
// bit: the masked gradients, converted to double, in blocks of kPactSumBlock consecutive
// elements; inside a block, element i goes to lane (i mod kPactSumLanes), each lane summed in
// order from +0.0; a block's sum is lane 0 + lane 1 + ... in order; the blocks are summed in
// order from +0.0; the total is rounded once to float32.
#pragma once

#include <cstdint>
#include <vector>

#include "fake_quant.h"

namespace qo {

constexpr int64_t kPactSumBlock = 2048;
constexpr int kPactSumLanes = 8;

/*! \brief 2^k - 1, the largest code of a k-bit unsigned quantizer (exact in float32). */
QO_HD float pact_levels(int nbits) { return static_cast<float>((1 << nbits) - 1); }

/*! \brief 2^(k-1) - 1, the largest code of the k-bit signed (narrow, symmetric) form. */
QO_HD float pact_signed_levels(int nbits) { return static_cast<float>((1 << (nbits - 1)) - 1); }

/*! \brief The top code of the form in use. */
QO_HD float pact_top(int nbits, bool is_signed) {
  return is_signed ? pact_signed_levels(nbits) : pact_levels(nbits);
}

/*! \brief The step alpha / (2^k - 1), in float32. */
QO_HD float pact_scale(float alpha, int nbits) { return alpha / pact_levels(nbits); }

/*! \brief One element when alpha gives no usable scale: +0, NaN stays NaN. */
QO_HD float pact_dead(float x) { return x != x ? x : 0.0f; }

/*! \brief Straight-through gradient of x: passes on [0, alpha). */
QO_HD float pact_grad_x(float g, float x, float alpha) {
  return (x >= 0.0f && x < alpha) ? g : 0.0f;
}

/*! \brief One element's share of dL/dalpha: the gradient where x saturated (x >= alpha). */
QO_HD float pact_grad_alpha_term(float g, float x, float alpha) { return x >= alpha ? g : 0.0f; }

/*! \brief Signed form: the straight-through gradient of x passes on (-alpha, alpha). */
QO_HD float pact_signed_grad_x(float g, float x, float alpha) {
  return (x > -alpha && x < alpha) ? g : 0.0f;
}

/*! \brief Signed form: +g where x saturated above (x >= alpha), -g where below (x <= -alpha). */
QO_HD float pact_signed_grad_alpha_term(float g, float x, float alpha) {
  return x >= alpha ? g : (x <= -alpha ? -g : 0.0f);
}

/*! \brief y = PACT_k(x) over n elements (one alpha for the tensor); ``is_signed``: the
 *  symmetric form on [-alpha, alpha]. */
QO_CLONES inline void pact_forward(const float* x, float* y, int64_t n, float alpha, int nbits,
                                   bool is_signed = false) {
  const float qmax = pact_top(nbits, is_signed);
  const float s = alpha / qmax;
  if (!usable_scale(s)) {
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; ++i) y[i] = pact_dead(x[i]);
    return;
  }
  const float qmin = is_signed ? -qmax : 0.0f;
  constexpr int64_t kChunk = 1 << 14;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < n; b += kChunk)
    fake_quant_span(x + b, y + b, (n - b) < kChunk ? n - b : kChunk, s, qmin, qmax);
}

/*! \brief Backward: writes dx (n elements) and returns dL/dalpha (summed in the documented
 *  order, independent of the thread count). */
QO_CLONES inline float pact_backward(const float* g, const float* x, float* dx, int64_t n,
                                     float alpha, bool is_signed = false) {
  const int64_t nblocks = (n + kPactSumBlock - 1) / kPactSumBlock;
  std::vector<double> block_sum(static_cast<size_t>(nblocks));
  double* bs = block_sum.data();
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t lo = b * kPactSumBlock;
    const int64_t len = lo + kPactSumBlock < n ? kPactSumBlock : n - lo;
    const float* gb = g + lo;
    const float* xb = x + lo;
    float* dxb = dx + lo;
    // the block's saturated gradients, zero-padded to whole lanes
    alignas(64) float sat[kPactSumBlock];
    if (is_signed) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        dxb[i] = pact_signed_grad_x(gb[i], xb[i], alpha);
        sat[i] = pact_signed_grad_alpha_term(gb[i], xb[i], alpha);
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        dxb[i] = pact_grad_x(gb[i], xb[i], alpha);
        sat[i] = pact_grad_alpha_term(gb[i], xb[i], alpha);
      }
    }
    const int64_t whole = (len + kPactSumLanes - 1) / kPactSumLanes * kPactSumLanes;
    for (int64_t i = len; i < whole; ++i) sat[i] = 0.0f;  // lanes start at +0: no change
    double lane[kPactSumLanes] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    for (int64_t i = 0; i < whole; i += kPactSumLanes) {
#pragma omp simd
      for (int j = 0; j < kPactSumLanes; ++j) lane[j] += static_cast<double>(sat[i + j]);
    }
    double sum = 0.0;
    for (int j = 0; j < kPactSumLanes; ++j) sum += lane[j];
    bs[b] = sum;
  }
  double total = 0.0;
  for (int64_t b = 0; b < nblocks; ++b) total += bs[b];
  return static_cast<float>(total);
}

}  // namespace qo
