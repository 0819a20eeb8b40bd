// Symmetric fake quantization kernels, TensorRT / ONNX QuantizeLinear->DequantizeLinear aligned.
//
// Plain C++ with no MXNet types, so the kernels can be unit-tested alone and shared with a
// future CUDA build: the per-element math lives in QO_HD inline functions.
//
// Numerics (DESIGN.md section 3): scale s = amax / qmax in float32; q = clamp(rint(x / s));
// y = q * s.  Divide by s (never multiply by 1/s: ties would round differently from ONNX).
// A zero range gives signed zeros exactly as ONNX Runtime does (+0 for x > 0, -0 otherwise:
// its x/0 saturates), except that NaN stays NaN (DESIGN.md: NaN in gives NaN out).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__SSE2__) && !defined(__CUDACC__)
#include <immintrin.h>
#define QO_STREAM_STORES 1
#endif
#include <cstdio>
#include <string>

#if defined(__CUDACC__)
#define QO_HD __host__ __device__ __forceinline__
#else
#define QO_HD inline
#endif

// Hot loops get AVX-512 and AVX2 clones next to the portable x86-64-v2 build; the loader picks
// at run time.  (Vectorized rounding needs SSE4.1 at least, which x86-64-v2 guarantees.)  The
// AVX-512 clone halves the instructions per element, which matters for weights: they sit in
// cache, so the kernel is compute-bound there (1.4x faster on this project's 2-core CI host).
#if defined(__x86_64__) && defined(__GNUC__) && __GNUC__ >= 11 && !defined(__clang__) && \
    !defined(__CUDACC__)  // (the x86-64-vN names came with GCC 11)
#define QO_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define QO_CLONES
#endif

namespace qo {

/*! \brief Integer range of a b-bit symmetric quantizer. Weights use the narrow range. */
struct QRange {
  float qmin;
  float qmax;
};

QO_HD QRange qrange(int nbits, bool narrow) {
  const float qmax = static_cast<float>((1 << (nbits - 1)) - 1);
  return QRange{narrow ? -qmax : -qmax - 1.0f, qmax};
}

/*! \brief Integer range of a b-bit unsigned quantizer: codes 0..2^b - 1 (uint8 with zero point
 *  0 at 8 bits, what oneDNN and onnxruntime run after a ReLU). */
QO_HD QRange qrange_unsigned(int nbits) {
  return QRange{0.0f, static_cast<float>((1 << nbits) - 1)};
}

/*! \brief Scale from a range, computed in float32 as the deployment engine does. */
QO_HD float scale_of(float amax, float qmax) { return amax / qmax; }

/*! \brief One element: dequant(quant(x)). Clamp as ternaries so the loop vectorizes and NaN
 *  passes through (comparisons with NaN are false).  `+ 0.0f` turns a rounded -0 into +0, as
 *  the integer code 0 dequantizes to +0 in the engine. */
QO_HD float fake_quant(float x, float s, float qmin, float qmax) {
  float q = std::nearbyint(x / s);
  q = q < qmin ? qmin : q;
  q = q > qmax ? qmax : q;
  return (q + 0.0f) * s;
}

/*! \brief One element under a zero (or unusable) range. */
QO_HD float zero_range(float x) { return x != x ? x : (x > 0.0f ? 0.0f : -0.0f); }

/*! \brief A scale the quantizer can divide by. */
QO_HD bool usable_scale(float s) { return s > 0.0f && s <= 3.402823466e38f; }

/*! \brief Exact fake_quant over a contiguous span, fast.
 *
 *  Dividing is the slow part when the data sits in cache (a weight tensor).  x * (1/s)
 *  differs from x / s by at most ~3 ulp, so the two can only round to different codes when
 *  the quotient lies that close to a half-integer boundary.  Each block is computed with
 *  the multiply and a flag for any value within a safe distance of a boundary (2^-21
 *  relative, 2^-22 absolute: several times the worst error of the multiply); a flagged
 *  block is recomputed with the division.  The result is
 *  bit-identical to fake_quant() element by element. */
QO_CLONES inline void fake_quant_span(const float* x, float* y, int64_t n, float s, float qmin,
                                      float qmax) {
  const float inv = 1.0f / s;
  if (!(inv <= 3.402823466e38f)) {  // subnormal scale: 1/s overflows, divide throughout
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = fake_quant(x[i], s, qmin, qmax);
    return;
  }
  constexpr int64_t kBlock = 256;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = b + kBlock < n ? b + kBlock : n;
    float near = 0.0f;
#pragma omp simd reduction(max : near)
    for (int64_t i = b; i < e; ++i) {
      const float r = x[i] * inv;
      float q = std::nearbyint(r);
      // distance of r to the nearest half-integer boundary (exact: Sterbenz)
      const float gap = 0.5f - std::fabs(r - q);
      const float flag = gap <= std::fabs(r) * 0x1p-21f + 0x1p-22f ? 1.0f : 0.0f;
      near = flag > near ? flag : near;
      q = q < qmin ? qmin : q;
      q = q > qmax ? qmax : q;
      y[i] = (q + 0.0f) * s;
    }
    if (near > 0.0f) {
#pragma omp simd
      for (int64_t i = b; i < e; ++i) y[i] = fake_quant(x[i], s, qmin, qmax);
    }
  }
}

/*! \brief Size of CPU 0's largest cache (bytes), from Linux's sysfs; 32 MiB when unknown.
 *  (sysconf's L3 size is the whole socket's on some virtual machines.) */
inline int64_t last_level_cache_bytes() {
  int64_t best = 0;
  for (int i = 0; i < 8; ++i) {
    const std::string path = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) +
                             "/size";
    std::FILE* f = std::fopen(path.c_str(), "r");
    if (!f) continue;
    long long v = 0;
    char unit = 0;
    const int got = std::fscanf(f, "%lld%c", &v, &unit);
    std::fclose(f);
    if (got < 1 || v <= 0) continue;
    const int shift = unit == 'K' ? 10 : unit == 'M' ? 20 : unit == 'G' ? 30 : 0;
    const int64_t bytes = static_cast<int64_t>(v) << shift;
    best = bytes > best ? bytes : best;
  }
  return best > 0 ? best : int64_t{32} << 20;
}

/*! \brief Output size (bytes) from which kernels write with non-temporal stores: the last
 *  level cache.  A larger output is evicted before its reader comes, so caching it only
 *  costs a read-for-ownership of every line it writes. */
inline int64_t stream_threshold_bytes() {
  static const int64_t bytes = last_level_cache_bytes();
  return bytes;
}

/*! \brief dst[0:n] = src[0:n], bypassing the cache where dst is 16-byte aligned.  Callers
 *  end their stores with stream_fence(). */
inline void stream_store(const float* src, float* dst, int64_t n) {
  int64_t i = 0;
#ifdef QO_STREAM_STORES
  if ((reinterpret_cast<uintptr_t>(dst) & 15) == 0)
    for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
#endif
  for (; i < n; ++i) dst[i] = src[i];
}

/*! \brief Orders this thread's non-temporal stores before whatever it does next. */
inline void stream_fence() {
#ifdef QO_STREAM_STORES
  _mm_sfence();
#endif
}

/*! \brief fake_quant_tensor for an output larger than the cache: each 4 KiB block is computed
 *  in a stack buffer and streamed out (1.2-1.3x faster on a 51 MB activation here). */
QO_CLONES inline void fake_quant_tensor_streamed(const float* x, float* y, int64_t n, float s,
                                                 QRange r) {
  constexpr int64_t kChunk = 1 << 14, kBlock = 1 << 10;
#pragma omp parallel
  {
    alignas(64) float buf[kBlock];
#pragma omp for schedule(static)
    for (int64_t b = 0; b < n; b += kChunk) {
      const int64_t e = (n - b) < kChunk ? n : b + kChunk;
      for (int64_t i = b; i < e; i += kBlock) {
        const int64_t len = (e - i) < kBlock ? e - i : kBlock;
        fake_quant_span(x + i, buf, len, s, r.qmin, r.qmax);
        stream_store(buf, y + i, len);
      }
    }
    stream_fence();
  }
}

/*! \brief y[i] = fake_quant(x[i]) over n elements with one scale. */
QO_CLONES inline void fake_quant_tensor(const float* x, float* y, int64_t n, float amax,
                                        QRange r) {
  const float s = scale_of(amax, r.qmax);
  if (!usable_scale(s)) {
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; ++i) y[i] = zero_range(x[i]);
    return;
  }
  if (n * static_cast<int64_t>(sizeof(float)) >= stream_threshold_bytes()) {
    fake_quant_tensor_streamed(x, y, n, s, r);
    return;
  }
  constexpr int64_t kChunk = 1 << 14;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < n; b += kChunk)
    fake_quant_span(x + b, y + b, (n - b) < kChunk ? n - b : kChunk, s, r.qmin, r.qmax);
}

/*! \brief Per-channel fake quantization of a tensor viewed as (outer, channels, inner). */
QO_CLONES inline void fake_quant_channels(const float* x, float* y, int64_t outer,
                                          int64_t channels, int64_t inner,
                                          const float* amax, QRange r) {
  const float qmin = r.qmin, qmax = r.qmax;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t c = 0; c < channels; ++c) {
      const float s = scale_of(amax[c], qmax);
      const int64_t base = (o * channels + c) * inner;
      const float* xp = x + base;
      float* yp = y + base;
      if (!usable_scale(s)) {
#pragma omp simd
        for (int64_t i = 0; i < inner; ++i) yp[i] = zero_range(xp[i]);
        continue;
      }
      fake_quant_span(xp, yp, inner, s, qmin, qmax);
    }
  }
}

/*! \brief Per-output-channel weight quantization in one memory pass: each channel's range
 *  (max |x|, written to amax[c]) is found and applied while the channel is in L1 cache.
 *  For a contiguous channel axis (axis 0: Convolution / FullyConnected weights). */
QO_CLONES inline void fake_quant_channels_own_range(const float* x, float* y, int64_t channels,
                                                    int64_t inner, float* amax, QRange r) {
  const float qmin = r.qmin, qmax = r.qmax;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < channels; ++c) {
    const float* xp = x + c * inner;
    float* yp = y + c * inner;
    float m = 0.0f;
#pragma omp simd reduction(max : m)
    for (int64_t i = 0; i < inner; ++i) {
      const float a = std::fabs(xp[i]);
      m = a > m ? a : m;
    }
    amax[c] = m;
    const float s = scale_of(m, qmax);
    if (!usable_scale(s)) {
#pragma omp simd
      for (int64_t i = 0; i < inner; ++i) yp[i] = zero_range(xp[i]);
      continue;
    }
    fake_quant_span(xp, yp, inner, s, qmin, qmax);
  }
}

/*! \brief max |x| over n elements; NaN is ignored (it never wins a comparison). */
QO_CLONES inline float abs_max(const float* x, int64_t n) {
  float m = 0.0f;
#pragma omp parallel for simd reduction(max : m) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(x[i]);
    m = a > m ? a : m;
  }
  return m;
}

/*! \brief Per-channel max |x| of a tensor viewed as (outer, channels, inner). */
QO_CLONES inline void abs_max_channels(const float* x, int64_t outer, int64_t channels,
                                       int64_t inner, float* amax) {
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < channels; ++c) {
    float m = 0.0f;
    for (int64_t o = 0; o < outer; ++o) {
      const float* xp = x + (o * channels + c) * inner;
#pragma omp simd reduction(max : m)
      for (int64_t i = 0; i < inner; ++i) {
        const float a = std::fabs(xp[i]);
        m = a > m ? a : m;
      }
    }
    amax[c] = m;
  }
}

/*! \brief dst = src, parallel. */
QO_CLONES inline void copy(const float* src, float* dst, int64_t n) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}

/*! \brief `clip` mode: the straight-through gradient where the clamp did not act, i.e. the
 *  rounded code lies in [qmin, qmax]; zero where the value saturated.  (Comparing x with
 *  qmax * s instead would clip the channel's own maximum, as 127 * (amax / 127) can round
 *  below amax.)  An unusable scale passes the gradient through. */
QO_HD float clip_grad(float g, float x, float s, float qmin, float qmax) {
  const float q = std::nearbyint(x / s);
  return (q >= qmin && q <= qmax) ? g : 0.0f;
}

QO_CLONES inline void clip_grad_tensor(const float* g, const float* x, float* dx, int64_t n,
                                       float amax, QRange r) {
  const float s = scale_of(amax, r.qmax);
  const float qmin = r.qmin, qmax = r.qmax;
  if (!usable_scale(s)) {
    copy(g, dx, n);
    return;
  }
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) dx[i] = clip_grad(g[i], x[i], s, qmin, qmax);
}

/*! \brief Per-channel form of clip_grad_tensor, tensor viewed as (outer, channels, inner). */
QO_CLONES inline void clip_grad_channels(const float* g, const float* x, float* dx, int64_t outer,
                                         int64_t channels, int64_t inner, const float* amax,
                                         QRange r) {
  const float qmin = r.qmin, qmax = r.qmax;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t c = 0; c < channels; ++c) {
      const float s = scale_of(amax[c], qmax);
      const int64_t base = (o * channels + c) * inner;
      if (!usable_scale(s)) {
        for (int64_t i = 0; i < inner; ++i) dx[base + i] = g[base + i];
        continue;
      }
#pragma omp simd
      for (int64_t i = 0; i < inner; ++i)
        dx[base + i] = clip_grad(g[base + i], x[base + i], s, qmin, qmax);
    }
  }
}

/*! \brief Exponential moving average of a range; an uninitialized range (<= 0) takes the
 *  batch value, so the first batch initializes it and a loaded range is kept. */
QO_HD float ema_update(float current, float batch, float decay) {
  if (!(current > 0.0f)) return batch;
  return decay * current + (1.0f - decay) * batch;
}

}  // namespace qo
