// DSQ kernels: Differentiable Soft Quantization (Gong et al., ICCV 2019, arXiv:1908.05033,
// section 3): uniform quantization onto 2^b levels of a learned range [l, u], trained with
// the derivatives of a tanh-shaped soft staircase Q_S whose softness alpha is learned too.
//
// Plain C++ with no MXNet types; per-element math in QO_HD functions (as fake_quant.h).  The
// executable spec is quant_ops/refs/dsq.py, matched bit for bit.
//
// Forward ("hard output": the paper applies sgn to phi in the forward, Algorithm 1), float32:
//   nl = 2^b - 1;  Delta = (u - l) / nl;  c = clip(x, l, u);
//   q = rint((c - l) / Delta) clamped to [0, nl] (ties to even);  y = q * Delta + l.
// A range without a usable step (Delta not in (0, FLT_MAX]) gives y = c; a NaN l or u gives
// NaN; NaN data gives NaN.
//
// Backward ("soft gradient"), float64 from the float32 inputs, alpha evaluated at
// clip(alpha, 1e-6, 0.5) and its gradient passed straight through that clip:
//   Delta = (u - l) / nl,  a = log(2/alpha - 1) (= k Delta),  s = 1/(1 - alpha),
//   t = (x - l) * (1/Delta) (>= 0),  i = min(floor(t), nl - 1),  z = (t - i) - 0.5,
//   th = tanh(a z),  se = sech^2(a z)  (a z = k (x - m_i)),
//   D = 0.5 s a se                               = dQ_S/dx
//   v = (i + 0.5) + 0.5 s th                     = (Q_S - l) / Delta
//   dQ_S/du = (v - D t) * (1/nl),   dQ_S/dl = (1 - D) - dQ_S/du,
//   dQ_S/dalpha = 0.5 Delta (s^2 th + s (-2 / (alpha (2 - alpha))) se z)
// for l <= x <= u; below l: dQ/dl = 1, above u: dQ/du = 1, other derivatives 0.
// dL/dx = f32(g * D) inside, else 0.
// soft = false (uniform baseline, straight-through): dx = g inside [l, u], dl / du sum g
// below / above, dalpha = 0.  No usable step: no gradient to x, the clip's to l and u.
// NaN x: gradient 0, adds nothing; NaN l or u: all gradients NaN.
//
// tanh / sech^2 / log use basic float64 operations only (so that the numpy spec can replay
// them exactly): expm1 by a degree-15 Taylor polynomial at -2|w|/32 and five doublings
// e' = e (e + 2); exp by squaring five times; tanh|w| = -expm1 / (2 + expm1) and
// sech^2 = 4 exp / (2 + expm1)^2 through one reciprocal; log by frexp and the atanh series.
//
// The parameter gradients are float64 sums in a fixed order, independent of the thread
// count and of the SIMD clone: terms g * dQ/dp in float64; chunks of kDsqChunk consecutive
// elements; inside a chunk element j goes to lane j mod 8, each lane summed in order from
// 0.0; a chunk's sum is its lanes in order from 0.0; the total is the chunks in order from
// 0.0, rounded once to float32.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "expm1_taylor.h"
#include "fake_quant.h"  // QO_HD, QO_CLONES

namespace qo {
namespace dsq {

constexpr int kMinBits = 1;
constexpr int kMaxBits = 16;
constexpr float kAlphaMin = 1e-6f;
constexpr float kAlphaMax = 0.5f;
constexpr float kFltMax = 3.402823466e38f;
constexpr int64_t kDsqChunk = 4096;  // a multiple of the lanes
constexpr int kDsqLanes = 8;

/*! \brief nl = 2^b - 1 as float: the number of intervals and the top code. */
QO_HD float levels(int nbits) { return static_cast<float>((1u << nbits) - 1u); }

/*! \brief Delta = (u - l) / nl in float32. */
QO_HD float step_of(float l, float u, float nl) { return (u - l) / nl; }

QO_HD bool usable_step(float delta) { return delta > 0.0f && delta <= kFltMax; }

/*! \brief clip(x, l, u) as the ternaries x < l ? l : x, then > u ? u (NaN passes). */
QO_HD float clip(float x, float l, float u) {
  float c = x < l ? l : x;
  return c > u ? u : c;
}

/*! \brief The hard output for a usable step. */
QO_HD float hard(float x, float l, float u, float delta, float nl) {
  float q = std::nearbyint((clip(x, l, u) - l) / delta);
  q = q < 0.0f ? 0.0f : q;
  q = q > nl ? nl : q;
  return q * delta + l;
}

/*! \brief y = DSQ forward over n elements. */
QO_CLONES inline void forward(const float* x, float* y, int64_t n, float l, float u,
                              int nbits) {
  const float nl = levels(nbits);
  const float delta = step_of(l, u, nl);
  if (l != l || u != u) {
    const float nan = std::nanf("");
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; ++i) y[i] = nan;
    return;
  }
  if (!usable_step(delta)) {
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; ++i) y[i] = clip(x[i], l, u);
    return;
  }
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) y[i] = hard(x[i], l, u, delta, nl);
}

// The backward's loops select between float64 values computed for every element (selects
// only: a short-circuit && would become a branch).  Under GCC's default -ftrapping-math the
// compiler sinks a computation whose result is only selected into a branch and then cannot
// vectorize the loop (the operation "may trap").  -fno-trapping-math only lets it evaluate
// such operations unconditionally; it changes no value (the value-changing options are
// -fassociative-math, -ffinite-math-only, -fno-signed-zeros etc., none of which are set).
#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

// -- float64 elementary functions from basic operations ----------------------------------

/*! \brief log(v) for a finite v > 0: v = m 2^e with m in [sqrt(1/2), sqrt(2)), log m by the
 *  atanh series 2 f (1 + f^2/3 + ... + f^24/25), f = (m - 1)/(m + 1). */
inline double log_pos(double v) {
  int e = 0;
  double m = std::frexp(v, &e);
  if (m < 0x1.6a09e667f3bcdp-1) {
    m = m * 2.0;
    e = e - 1;
  }
  const double f = (m - 1.0) / (m + 1.0);
  const double f2 = f * f;
  double p = 0x1.47ae147ae147bp-5;  // 1/25
  p = p * f2 + 0x1.642c8590b2164p-5;  // 1/23
  p = p * f2 + 0x1.8618618618618p-5;  // 1/21
  p = p * f2 + 0x1.af286bca1af28p-5;  // 1/19
  p = p * f2 + 0x1.e1e1e1e1e1e1ep-5;  // 1/17
  p = p * f2 + 0x1.1111111111111p-4;  // 1/15
  p = p * f2 + 0x1.3b13b13b13b14p-4;  // 1/13
  p = p * f2 + 0x1.745d1745d1746p-4;  // 1/11
  p = p * f2 + 0x1.c71c71c71c71cp-4;  // 1/9
  p = p * f2 + 0x1.2492492492492p-3;  // 1/7
  p = p * f2 + 0x1.999999999999ap-3;  // 1/5
  p = p * f2 + 0x1.5555555555555p-2;  // 1/3
  p = p * f2 + 1.0;
  const double log_m = (2.0 * f) * p;
  const double ef = static_cast<double>(e);
  return ef * 0x1.62e42fee00000p-1 + (ef * 0x1.a39ef35793c76p-33 + log_m);
}

/*! \brief tanh(w) and sech^2(w) in float64, for |w| up to ~8 (here |w| <= 7.26). */
QO_HD void tanh_sech2(double w, double* th, double* se) {
  const double r = (-2.0 * std::fabs(w)) * 0.03125;
  double p = 0x1.ae7f3e733b81fp-41;  // 1/15!
  p = p * r + 0x1.93974a8c07c9dp-37;  // 1/14!
  p = p * r + kInvFact13;
  double em = expm1_taylor_from_13(p, r);  // expm1(r)
  double ex = 1.0 + em;
  // five doublings of the argument: expm1(2r) = expm1(r) (expm1(r) + 2), exp(2r) = exp(r)^2
  em = em * (em + 2.0);
  ex = ex * ex;
  em = em * (em + 2.0);
  ex = ex * ex;
  em = em * (em + 2.0);
  ex = ex * ex;
  em = em * (em + 2.0);
  ex = ex * ex;
  em = em * (em + 2.0);
  ex = ex * ex;
  const double rd = 1.0 / (2.0 + em);
  *th = std::copysign(-em * rd, w);
  *se = (4.0 * ex) * (rd * rd);
}

// -- backward --------------------------------------------------------------------------

/*! \brief Per-call constants of the backward. */
struct Backward {
  float l, u;      // the range as given
  bool usable;     // Delta usable (float32 test, as the forward)
  double ld, nl, imax, delta, inv_delta, inv_nl, a, s, half_sa, c1, c2, half_delta;
};

inline Backward backward_constants(float l, float u, float alpha, int nbits) {
  Backward k;
  k.l = l;
  k.u = u;
  const float nlf = levels(nbits);
  k.usable = usable_step(step_of(l, u, nlf));
  float al = alpha < kAlphaMin ? kAlphaMin : alpha;
  al = al > kAlphaMax ? kAlphaMax : al;
  const double ad = static_cast<double>(al);
  k.ld = static_cast<double>(l);
  k.nl = static_cast<double>(nlf);
  k.imax = k.nl - 1.0;
  k.delta = (static_cast<double>(u) - k.ld) / k.nl;
  k.inv_delta = 1.0 / k.delta;
  k.inv_nl = 1.0 / k.nl;
  k.a = ad == ad ? log_pos(2.0 / ad - 1.0) : ad;
  k.s = 1.0 / (1.0 - ad);
  const double dadal = -2.0 / (ad * (2.0 - ad));
  k.half_sa = (0.5 * k.s) * k.a;
  k.c1 = k.s * k.s;
  k.c2 = k.s * dadal;
  k.half_delta = 0.5 * k.delta;
  return k;
}

/*! \brief One element, straight-through estimator (soft = false): writes dL/dx and the
 *  terms g * dQ/d{l, u, alpha}. */
QO_HD void element_ste(float g, float x, const Backward& k, float* dx, double* tl, double* tu,
                       double* ta) {
  const bool below = x < k.l;
  const bool above = (below ? k.l : x) > k.u;  // the clip's output is u
  const bool below_only = below & !above;      // ... is l
  const bool inside = (x >= k.l) & (x <= k.u) & k.usable;  // NaN is nowhere
  const double gd = static_cast<double>(g);
  *dx = inside ? g : 0.0f;
  *tl = below_only ? gd : 0.0;
  *tu = above ? gd : 0.0;
  *ta = 0.0;
}

/*! \brief One element, the soft estimator (the step is usable): dL/dx and the terms
 *  g * dQ_S/d{l, u, alpha}.  Elements outside [l, u] evaluate Q_S at l (discarded), so t is
 *  finite and >= 0. */
QO_HD void element_soft(float g, float x, const Backward& k, float* dx, double* tl,
                        double* tu, double* ta) {
  const bool below = x < k.l;
  const bool above = (below ? k.l : x) > k.u;
  const bool below_only = below & !above;
  const bool inside = (x >= k.l) & (x <= k.u);
  const double gd = static_cast<double>(g);
  const float c = inside ? x : k.l;
  const double t = (static_cast<double>(c) - k.ld) * k.inv_delta;
  double i = std::floor(t);
  i = i > k.imax ? k.imax : i;
  const double z = (t - i) - 0.5;
  double th, se;
  tanh_sech2(k.a * z, &th, &se);
  const double d = k.half_sa * se;
  const double phi = k.s * th;
  const double v = (i + 0.5) + 0.5 * phi;
  const double du = (v - d * t) * k.inv_nl;
  const double dl = (1.0 - d) - du;
  const double da = k.half_delta * (k.c1 * th + k.c2 * (se * z));
  const float gx = static_cast<float>(gd * d);
  *dx = inside ? gx : 0.0f;
  *tl = inside ? gd * dl : (below_only ? gd : 0.0);
  *tu = inside ? gd * du : (above ? gd : 0.0);
  *ta = inside ? gd * da : 0.0;
}

constexpr int64_t kDsqBlock = 512;  // elements per pass of the term buffers (multiple of 8)

/*! \brief One chunk: writes dx and the chunk's three sums (lane order above) to out.  The
 *  terms of a block are computed in one vectorized pass into buffers, then added to the
 *  lanes; a short last block is padded with +0.0, which changes no lane (a lane that starts
 *  at +0.0 is never -0.0). */
template <bool Soft>
QO_CLONES inline void backward_chunk(const float* g, const float* x, float* dx, int64_t n,
                                     const Backward& k0, double* out) {
  const Backward k = k0;  // a local copy: no aliasing with the outputs
  alignas(64) double tl[kDsqBlock], tu[kDsqBlock], ta[kDsqBlock];
  double ll[kDsqLanes] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  double lu[kDsqLanes] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  double la[kDsqLanes] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  for (int64_t b = 0; b < n; b += kDsqBlock) {
    const int64_t m = n - b < kDsqBlock ? n - b : kDsqBlock;
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) {
      if (Soft) element_soft(g[b + i], x[b + i], k, &dx[b + i], &tl[i], &tu[i], &ta[i]);
      else element_ste(g[b + i], x[b + i], k, &dx[b + i], &tl[i], &tu[i], &ta[i]);
    }
    const int64_t whole = (m + kDsqLanes - 1) / kDsqLanes * kDsqLanes;
    for (int64_t i = m; i < whole; ++i) tl[i] = tu[i] = ta[i] = 0.0;
    for (int64_t i = 0; i < whole; i += kDsqLanes) {
#pragma omp simd
      for (int j = 0; j < kDsqLanes; ++j) {
        ll[j] += tl[i + j];
        lu[j] += tu[i + j];
        la[j] += ta[i + j];
      }
    }
  }
  double sl = 0.0, su = 0.0, sa = 0.0;
  for (int j = 0; j < kDsqLanes; ++j) {
    sl += ll[j];
    su += lu[j];
    sa += la[j];
  }
  out[0] = sl;
  out[1] = su;
  out[2] = sa;
}

/*! \brief dx over n elements and d{l, u, alpha} (each one float). */
inline void backward(const float* g, const float* x, float* dx, int64_t n, float l, float u,
                     float alpha, int nbits, bool soft, float* dl, float* du, float* dalpha) {
  if (l != l || u != u) {
    const float nan = std::nanf("");
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; ++i) dx[i] = nan;
    *dl = *du = *dalpha = nan;
    return;
  }
  const Backward k = backward_constants(l, u, alpha, nbits);
  const int64_t chunks = n <= 0 ? 0 : (n + kDsqChunk - 1) / kDsqChunk;
  std::vector<double> part(static_cast<size_t>(3 * chunks));
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t b = c * kDsqChunk;
    const int64_t len = n - b < kDsqChunk ? n - b : kDsqChunk;
    double* out = part.data() + 3 * c;
    // without a usable step the soft estimator is the straight-through one (no element is
    // inside): the same kernel serves
    if (soft && k.usable) backward_chunk<true>(g + b, x + b, dx + b, len, k, out);
    else backward_chunk<false>(g + b, x + b, dx + b, len, k, out);
  }
  double sl = 0.0, su = 0.0, sa = 0.0;
  for (int64_t c = 0; c < chunks; ++c) {
    sl += part[3 * c];
    su += part[3 * c + 1];
    sa += part[3 * c + 2];
  }
  *dl = static_cast<float>(sl);
  *du = static_cast<float>(su);
  *dalpha = static_cast<float>(sa);
}

#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#pragma GCC pop_options
#endif

}  // namespace dsq
}  // namespace qo
