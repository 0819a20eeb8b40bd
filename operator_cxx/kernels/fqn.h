// FQN (Li et al., "Fully Quantized Network for Object Detection", CVPR 2019): asymmetric
// min/max fake quantization, written as ONNX QuantizeLinear -> DequantizeLinear with an
// unsigned k-bit code and a zero point (bit for bit uint8 QDQ at k = 8).
//
// Plain C++ with no MXNet types (per-element math in QO_HD functions, as kernels/fake_quant.h).
// The numpy spec is quant_ops/refs/fqn.py; both compute in float32 in the same order
// (L = 2^k - 1, rint = round half to even):
//
//   lo = min(min, 0), hi = max(max, 0)       (the grid holds 0; NaN bounds stay NaN)
//   s  = (hi - lo) / L
//   zp = clamp(rint(-lo / s), 0, L) + 0
//   q  = clamp(rint(x / s) + zp, 0, L)       (clamps as ternaries: NaN passes through)
//   y  = (q - zp) * s                        (q - zp is exact; the code zp gives +0)
//
// A range without a usable scale (s not in (0, FLT_MAX]) gives +0 (NaN stays NaN).
// Backward (straight-through estimator of the clamp): dx = g where lo <= x <= hi, else 0.
//
// Seed grid (attribute seed_grid=True: the seed toolkit's _contrib_FQN / FQN_PY), a grid that
// starts at mn, without zero point and without clamp (values beyond the range go on along it):
//
//   s  = (mx - mn) / L                        (divided, as FQN_PY; the seed's C++ multiplied
//                                              by float(1 / L): the step may differ by an ulp)
//   y  = rint((x - mn) / s) * s + mn          (the product rounded, then the sum: no FMA)
//
// usable when 0 < |s| <= FLT_MAX (a stored range with mx < mn is the same grid: rint is odd),
// else +0 (NaN stays NaN; the seed divided 0 by 0 there).  rint rounds half to even (the seed:
// half away from zero).  Its clip gradient passes g where x lies between mn and mx (both ends
// included, not widened to 0), else 0 and for NaN x.
#pragma once

#include <cmath>
#include <cstdint>

#include "fake_quant.h"  // QO_HD, QO_CLONES

namespace qo {

/*! \brief L = 2^k - 1, the top code of the unsigned k-bit quantizer (k <= 16). */
QO_HD float fqn_levels(int nbits) { return static_cast<float>((1 << nbits) - 1); }

/*! \brief Quantization parameters of one range [mn, mx]. */
struct FqnQParams {
  float scale;
  float zero_point;  // an integer in [0, L]; 0 when the scale is unusable
  float lo;          // the range widened to contain 0
  float hi;
  bool usable;
};

QO_HD FqnQParams fqn_qparams(float mn, float mx, float levels) {
  FqnQParams p;
  p.lo = mn > 0.0f ? 0.0f : mn;
  p.hi = mx < 0.0f ? 0.0f : mx;
  p.scale = (p.hi - p.lo) / levels;
  p.usable = p.scale > 0.0f && p.scale <= 3.402823466e38f;
  float z = p.usable ? std::nearbyint(-p.lo / p.scale) : 0.0f;
  z = z < 0.0f ? 0.0f : z;
  z = z > levels ? levels : z;
  p.zero_point = z + 0.0f;
  return p;
}

/*! \brief One element: dequant(quant(x)) with scale s and zero point zp. */
QO_HD float fqn_fake_quant(float x, float s, float zp, float levels) {
  float q = std::nearbyint(x / s) + zp;
  q = q < 0.0f ? 0.0f : q;
  q = q > levels ? levels : q;
  return (q - zp) * s;
}

/*! \brief One element under a range without a usable scale: +0, NaN stays NaN. */
QO_HD float fqn_unusable(float x) { return x != x ? x : 0.0f; }

/*! \brief The straight-through gradient of the clamp: g where lo <= x <= hi, else 0. */
QO_HD float fqn_grad(float g, float x, float lo, float hi) {
  return (x >= lo && x <= hi) ? g : 0.0f;
}

/*! \brief d * current + (1 - d) * batch, each product rounded to float32, then the sum. */
QO_HD float fqn_ema(float current, float batch, float decay) {
  return decay * current + (1.0f - decay) * batch;
}

// -- the seed grid (seed_grid=True) ------------------------------------------------------

/*! \brief The seed grid's step (mx - mn) / L, in float32 (negative when mx < mn). */
QO_HD float fqn_seed_step(float mn, float mx, float levels) { return (mx - mn) / levels; }

/*! \brief A step the seed grid can divide by: 0 < |s| <= FLT_MAX (NaN is not). */
QO_HD bool fqn_seed_usable(float s) {
  const float a = s < 0.0f ? -s : s;
  return a > 0.0f && a <= 3.402823466e38f;
}

/*! \brief One element on the seed grid: rint((x - mn) / s) * s + mn, no clamp. */
QO_HD float fqn_seed_fake_quant(float x, float mn, float s) {
  const float q = std::nearbyint((x - mn) / s);
  const float p = q * s;
  return p + mn;
}

/*! \brief The seed grid's clip gradient: g where x lies between mn and mx (ends included),
 *  else 0 (also for NaN x or a NaN bound). */
QO_HD float fqn_seed_grad(float g, float x, float mn, float mx) {
  const float lo = mn <= mx ? mn : mx;
  const float hi = mn <= mx ? mx : mn;
  return (x >= lo && x <= hi) ? g : 0.0f;
}

/*! \brief A tensor seen as rows: (outer, channels, inner) around the channel axis, one range
 *  per channel; a per-tensor quantizer is outer = channels = 1, inner = size. */
struct FqnView {
  int64_t outer = 1, channels = 1, inner = 1;
};

constexpr int64_t kFqnChunk = 1 << 14;

/*! \brief min and max of n values ignoring NaN, + 0 (no -0).  No non-NaN value: min > max. */
QO_CLONES inline void fqn_min_max(const float* x, int64_t n, float* mn_out, float* mx_out) {
  float mn = INFINITY, mx = -INFINITY;
#pragma omp parallel for simd reduction(min : mn) reduction(max : mx) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  *mn_out = mn + 0.0f;
  *mx_out = mx + 0.0f;
}

/*! \brief Per-channel min and max (as fqn_min_max) of a tensor viewed as (outer, channels,
 *  inner); a channel without a non-NaN value gets [0, 0]. */
QO_CLONES inline void fqn_min_max_channels(const float* x, FqnView v, float* mn_out,
                                           float* mx_out) {
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < v.channels; ++c) {
    float mn = INFINITY, mx = -INFINITY;
    for (int64_t o = 0; o < v.outer; ++o) {
      const float* xp = x + (o * v.channels + c) * v.inner;
#pragma omp simd reduction(min : mn) reduction(max : mx)
      for (int64_t i = 0; i < v.inner; ++i) {
        const float a = xp[i];
        mn = a < mn ? a : mn;
        mx = a > mx ? a : mx;
      }
    }
    const bool found = mn <= mx;
    mn_out[c] = found ? mn + 0.0f : 0.0f;
    mx_out[c] = found ? mx + 0.0f : 0.0f;
  }
}

inline int64_t fqn_chunks_per_row(int64_t inner) {
  return inner <= 0 ? 0 : (inner + kFqnChunk - 1) / kFqnChunk;
}

/*! \brief Task t of a per-channel loop: channel c, elements [b, b + n). */
struct FqnChunk {
  int64_t c, b, n;
};

inline FqnChunk fqn_chunk(FqnView v, int64_t cpr, int64_t t) {
  const int64_t row = t / cpr, k = t % cpr;
  const int64_t rest = v.inner - k * kFqnChunk;
  return {row % v.channels, row * v.inner + k * kFqnChunk, rest < kFqnChunk ? rest : kFqnChunk};
}

/*! \brief y = fake_quant(x) with range [mn[c], mx[c]] for channel c. */
QO_CLONES inline void fqn_forward(const float* x, float* y, FqnView v, const float* mn,
                                  const float* mx, float levels) {
  const int64_t cpr = fqn_chunks_per_row(v.inner);
  const int64_t tasks = v.outer * v.channels * cpr;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    const FqnChunk ch = fqn_chunk(v, cpr, t);
    const int64_t c = ch.c, b = ch.b, n = ch.n;
    const FqnQParams p = fqn_qparams(mn[c], mx[c], levels);
    const float* xp = x + b;
    float* yp = y + b;
    if (!p.usable) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) yp[i] = fqn_unusable(xp[i]);
      continue;
    }
    const float s = p.scale, zp = p.zero_point;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) yp[i] = fqn_fake_quant(xp[i], s, zp, levels);
  }
}

/*! \brief dx = g where lo[c] <= x <= hi[c] (the range of channel c widened to contain 0). */
QO_CLONES inline void fqn_backward(const float* g, const float* x, float* dx, FqnView v,
                                   const float* mn, const float* mx, float levels) {
  const int64_t cpr = fqn_chunks_per_row(v.inner);
  const int64_t tasks = v.outer * v.channels * cpr;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    const FqnChunk ch = fqn_chunk(v, cpr, t);
    const int64_t c = ch.c, b = ch.b, n = ch.n;
    const FqnQParams p = fqn_qparams(mn[c], mx[c], levels);
    const float lo = p.lo, hi = p.hi;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dx[b + i] = fqn_grad(g[b + i], x[b + i], lo, hi);
  }
}

/*! \brief y on the seed grid with range [mn[c], mx[c]] for channel c. */
QO_CLONES inline void fqn_seed_forward(const float* x, float* y, FqnView v, const float* mn,
                                       const float* mx, float levels) {
  const int64_t cpr = fqn_chunks_per_row(v.inner);
  const int64_t tasks = v.outer * v.channels * cpr;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    const FqnChunk ch = fqn_chunk(v, cpr, t);
    const int64_t c = ch.c, b = ch.b, n = ch.n;
    const float lo = mn[c];
    const float s = fqn_seed_step(lo, mx[c], levels);
    const float* xp = x + b;
    float* yp = y + b;
    if (!fqn_seed_usable(s)) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) yp[i] = fqn_unusable(xp[i]);
      continue;
    }
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) yp[i] = fqn_seed_fake_quant(xp[i], lo, s);
  }
}

/*! \brief The seed grid's clip gradient: dx = g where x lies between mn[c] and mx[c]. */
QO_CLONES inline void fqn_seed_backward(const float* g, const float* x, float* dx, FqnView v,
                                        const float* mn, const float* mx) {
  const int64_t cpr = fqn_chunks_per_row(v.inner);
  const int64_t tasks = v.outer * v.channels * cpr;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    const FqnChunk ch = fqn_chunk(v, cpr, t);
    const int64_t c = ch.c, b = ch.b, n = ch.n;
    const float lo = mn[c], hi = mx[c];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dx[b + i] = fqn_seed_grad(g[b + i], x[b + i], lo, hi);
  }
}

}  // namespace qo
