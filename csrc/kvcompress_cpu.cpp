// vllm-kvcompress: fused CPU kernels on vLLM's CPU_ATTN "vec" paged KV cache.
//
// Registered as torch ops in the `kvcompress` namespace (built and loaded by
// vllm_kvcompress/_ext.py; the Python entry points and the torch references
// they must match are in vllm_kvcompress/ops.py):
//
//   decode_attention_scores  paged decode attention (one query per request)
//                            + H2O score accumulation in the same pass
//   prefill_attention_scores paged attention of prefill chunks (any query count
//                            per request, causal) + score accumulation of the
//                            weighted queries from the same logits
//   window_scores            prefill-chunk score accumulation (weighted,
//                            causal queries against the request's window)
//   compact_windows          per (request, KV head) move of the kept window
//                            slots to the front of the new window (K, V, score)
//
// Layout (per layer): key pages k_t [nb, H, D, bs] (each (block, head) page
// transposed), value pages v [nb, H, bs, D], scores acc [nb, H, bs] float32.
// The block and head strides are free (k_t / v are views of one
// [nb, H, 2*bs, D] tensor); the page interiors must be contiguous.
// Window slot p of request i lives at block bt[i][p / bs], offset p % bs
// (bt rows already shifted to the window's first entry), except in
// compact_windows, which takes unshifted rows and start entries.
//
// With amx=true (bf16 only) the same [nb, H, 2*bs, D] halves hold vLLM's CPU "amx"
// pages (block_size % 32 == 0, head size % 32 == 0): per (block, head) region, key
// (t, d) at (t/16)*16*D + (d/2)*32 + (t%16)*2 + d%2 (16-token groups, a 32-bit word =
// two adjacent dims of one token) and value (t, d) at (d/16)*16*bs + (t/2)*32 +
// (d%16)*2 + t%2 (16-dim groups, a word = two adjacent tokens). The k_t / v views
// are then just the regions' memory (their logical axes do not apply); torch
// reference: ops.unpack_amx / ops.pack_amx, pinned to vLLM's own cache-write op.
//
// GQA: query head hq belongs to KV head hq / G (G = Hq / H); a KV head's score
// is the mean over its G query heads. Softmax and all accumulation in float32.
//
// ISA: the file is built with AVX2 (8 x float FMA; bf16/fp16 converted to float). On
// bf16 caches of a CPU with AVX512-BF16 (checked at run time, see "bf16 dot products"
// below; VLLM_KVCOMPRESS_CPU_BF16DOT=0 turns it off) the attention kernels compute QK
// and PV with vdpbf16ps instead: the same bf16 inputs, float32 accumulation, logits,
// softmax and scores, but the probabilities fed to PV rounded to bf16.
// Parallel over (request, KV head [, query split]) with OpenMP (the same
// libgomp runtime as torch, so torch.set_num_threads applies).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define KVC_AVX2 1
#endif

namespace kvc {

// ---------------------------------------------------------------- 8 x float

#ifdef KVC_AVX2
struct F8 {
  __m256 r;
};
static inline F8 f8_zero() { return {_mm256_setzero_ps()}; }
static inline F8 f8_set(float x) { return {_mm256_set1_ps(x)}; }
static inline F8 f8_bcast(const float* p) { return {_mm256_broadcast_ss(p)}; }
static inline F8 f8_load(const float* p) { return {_mm256_loadu_ps(p)}; }
static inline F8 f8_load(const c10::BFloat16* p) {
  __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16))};
}
static inline F8 f8_load(const c10::Half* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
static inline void f8_store(float* p, F8 a) { _mm256_storeu_ps(p, a.r); }
static inline F8 f8_fma(F8 a, F8 b, F8 c) { return {_mm256_fmadd_ps(a.r, b.r, c.r)}; }
static inline F8 f8_add(F8 a, F8 b) { return {_mm256_add_ps(a.r, b.r)}; }
static inline F8 f8_sub(F8 a, F8 b) { return {_mm256_sub_ps(a.r, b.r)}; }
static inline F8 f8_mul(F8 a, F8 b) { return {_mm256_mul_ps(a.r, b.r)}; }
static inline F8 f8_max(F8 a, F8 b) { return {_mm256_max_ps(a.r, b.r)}; }
static inline float f8_hsum(F8 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.r), _mm256_extractf128_ps(a.r, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline float f8_hmax(F8 a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.r), _mm256_extractf128_ps(a.r, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// exp(x) for x <= ~88 (Cephes polynomial, ~1 ulp); exactly 0 below -87.3.
static inline F8 f8_exp(F8 xv) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f);
  const __m256 lo = _mm256_set1_ps(-87.3f);
  __m256 x = xv.r;
  __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(x, hi);
  x = _mm256_max_ps(x, lo);
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, z, x);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
  __m256i n = _mm256_cvttps_epi32(fx);
  n = _mm256_add_epi32(n, _mm256_set1_epi32(127));
  n = _mm256_slli_epi32(n, 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(n));
  return {_mm256_andnot_ps(underflow, y)};
}
#else
struct F8 {
  float r[8];
};
static inline F8 f8_zero() {
  F8 a;
  for (int i = 0; i < 8; ++i) a.r[i] = 0.f;
  return a;
}
static inline F8 f8_set(float x) {
  F8 a;
  for (int i = 0; i < 8; ++i) a.r[i] = x;
  return a;
}
static inline F8 f8_bcast(const float* p) { return f8_set(*p); }
template <typename T>
static inline F8 f8_load(const T* p) {
  F8 a;
  for (int i = 0; i < 8; ++i) a.r[i] = static_cast<float>(p[i]);
  return a;
}
static inline void f8_store(float* p, F8 a) {
  for (int i = 0; i < 8; ++i) p[i] = a.r[i];
}
static inline F8 f8_fma(F8 a, F8 b, F8 c) {
  for (int i = 0; i < 8; ++i) c.r[i] += a.r[i] * b.r[i];
  return c;
}
static inline F8 f8_add(F8 a, F8 b) {
  for (int i = 0; i < 8; ++i) a.r[i] += b.r[i];
  return a;
}
static inline F8 f8_sub(F8 a, F8 b) {
  for (int i = 0; i < 8; ++i) a.r[i] -= b.r[i];
  return a;
}
static inline F8 f8_mul(F8 a, F8 b) {
  for (int i = 0; i < 8; ++i) a.r[i] *= b.r[i];
  return a;
}
static inline F8 f8_max(F8 a, F8 b) {
  for (int i = 0; i < 8; ++i) a.r[i] = std::max(a.r[i], b.r[i]);
  return a;
}
static inline float f8_hsum(F8 a) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += a.r[i];
  return s;
}
static inline float f8_hmax(F8 a) {
  float s = a.r[0];
  for (int i = 1; i < 8; ++i) s = std::max(s, a.r[i]);
  return s;
}
static inline F8 f8_exp(F8 a) {
  for (int i = 0; i < 8; ++i) a.r[i] = std::exp(a.r[i]);
  return a;
}
#endif

template <typename T>
static inline float to_f(T x) {
  return static_cast<float>(x);
}

// 8 consecutive 32-bit words of bf16 pairs at p: the low (first) and the high
// (second) element of each word, as floats (a bf16 is the top half of a float32).
#ifdef KVC_AVX2
static inline F8 f8_pair_lo(const c10::BFloat16* p) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
}
static inline F8 f8_pair_hi(const c10::BFloat16* p) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))))};
}
#else
static inline F8 f8_pair_lo(const c10::BFloat16* p) {
  F8 a;
  for (int i = 0; i < 8; ++i) a.r[i] = static_cast<float>(p[2 * i]);
  return a;
}
static inline F8 f8_pair_hi(const c10::BFloat16* p) {
  F8 a;
  for (int i = 0; i < 8; ++i) a.r[i] = static_cast<float>(p[2 * i + 1]);
  return a;
}
#endif

// element offsets inside one (block, head) region of vLLM's "amx" pages
static inline int64_t amx_k_off(int t, int d, int D) {
  return static_cast<int64_t>(t / 16) * 16 * D + (d / 2) * 32 + (t % 16) * 2 + d % 2;
}
static inline int64_t amx_v_off(int t, int d, int bs) {
  return static_cast<int64_t>(d / 16) * 16 * bs + (t / 2) * 32 + (d % 16) * 2 + t % 2;
}

// ---------------------------------------------------------------- scratch

struct Scratch {
  std::vector<float> f0, f1, f2;
  std::vector<int32_t> i0;
  std::vector<const void*> p0, p1;
  std::vector<uint8_t> b0, b1;
  std::vector<uint16_t> h0, h1, h2;
  std::vector<const uint16_t*> r0, r2;
  std::vector<uint16_t*> r1;
};
static Scratch& scratch() {
  static thread_local Scratch s;
  return s;
}
template <typename V>
static inline auto* grow(V& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

static inline int num_threads_for(int64_t items) {
  int nt = at::get_num_threads();
  if (items < nt) nt = static_cast<int>(std::max<int64_t>(items, 1));
  return nt;
}

// ---------------------------------------------------------------- QK
// c[m*ldc + j] = sum_d q[m*ldq + d] * k[d*ldk + j]  for j in [0, 8*NV)
template <int M, int NV, typename T>
static inline void qk_tile(const float* __restrict q, int64_t ldq, const T* __restrict k, int64_t ldk, int D,
                           float* __restrict c, int64_t ldc) {
  F8 acc[M][NV];
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[m][v] = f8_zero();
  for (int d = 0; d < D; ++d) {
    F8 kv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) kv[v] = f8_load(k + d * ldk + 8 * v);
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) {
      F8 a = f8_bcast(q + m * ldq + d);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[m][v] = f8_fma(a, kv[v], acc[m][v]);
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) f8_store(c + m * ldc + 8 * v, acc[m][v]);
}

// logits of M (<= 4) query rows against the bs slots of one key page [D, bs]
template <int M, typename T>
static inline void qk_page_rows(const float* q, int64_t ldq, const T* kp, int bs, int D, float* c, int64_t ldc) {
  int j = 0;
  for (; j + 16 <= bs; j += 16) qk_tile<M, 2>(q, ldq, kp + j, bs, D, c + j, ldc);
  for (; j + 8 <= bs; j += 8) qk_tile<M, 1>(q, ldq, kp + j, bs, D, c + j, ldc);
  for (; j < bs; ++j)
    for (int m = 0; m < M; ++m) {
      float s = 0.f;
      for (int d = 0; d < D; ++d) s += q[m * ldq + d] * to_f(kp[d * bs + j]);
      c[m * ldc + j] = s;
    }
}

template <typename T>
static void qk_page(const float* q, int64_t ldq, int M, const T* kp, int bs, int D, float* c, int64_t ldc) {
  int m = 0;
  for (; m + 4 <= M; m += 4) qk_page_rows<4>(q + m * ldq, ldq, kp, bs, D, c + m * ldc, ldc);
  switch (M - m) {
    case 3: qk_page_rows<3>(q + m * ldq, ldq, kp, bs, D, c + m * ldc, ldc); break;
    case 2: qk_page_rows<2>(q + m * ldq, ldq, kp, bs, D, c + m * ldc, ldc); break;
    case 1: qk_page_rows<1>(q + m * ldq, ldq, kp, bs, D, c + m * ldc, ldc); break;
    default: break;
  }
}

// ---------------------------------------------------------------- softmax
// x[0..n) <- exp(x - max); returns 1 / sum (n >= 1).
static float softmax_unnormalized(float* x, int n) {
  int j = 0;
  float mx = -std::numeric_limits<float>::infinity();
  if (n >= 8) {
    F8 m8 = f8_load(x);
    for (j = 8; j + 8 <= n; j += 8) m8 = f8_max(m8, f8_load(x + j));
    mx = f8_hmax(m8);
  }
  for (; j < n; ++j) mx = std::max(mx, x[j]);
  F8 mv = f8_set(mx);
  F8 s8 = f8_zero();
  j = 0;
  for (; j + 8 <= n; j += 8) {
    F8 e = f8_exp(f8_sub(f8_load(x + j), mv));
    f8_store(x + j, e);
    s8 = f8_add(s8, e);
  }
  float s = f8_hsum(s8);
  for (; j < n; ++j) {
    float e = std::exp(x[j] - mx);
    x[j] = e;
    s += e;
  }
  return 1.0f / s;
}

// y[0..n) += a * x[0..n)
static inline void axpy(float* __restrict y, const float* __restrict x, float a, int n) {
  F8 av = f8_set(a);
  int j = 0;
  for (; j + 8 <= n; j += 8) f8_store(y + j, f8_fma(av, f8_load(x + j), f8_load(y + j)));
  for (; j < n; ++j) y[j] += a * x[j];
}

// ---------------------------------------------------------------- PV
// o[m*ldo + d0 + 8v] = sum_{j<n} p[m*ldp + j] * V[j][d0 + 8v], V rows paged.
template <int M, int NV, typename T>
static inline void pv_tile(const float* __restrict p, int64_t ldp, const T* const* vpages, int bs, int D, int n,
                           int d0, float* __restrict o, int64_t ldo) {
  F8 acc[M][NV];
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[m][v] = f8_zero();
  for (int pg = 0, base = 0; base < n; ++pg, base += bs) {
    const T* vp = vpages[pg] + d0;
    const int cnt = std::min(bs, n - base);
    const float* pp = p + base;
    for (int off = 0; off < cnt; ++off) {
      F8 vv[NV];
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) vv[v] = f8_load(vp + static_cast<int64_t>(off) * D + 8 * v);
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) {
        F8 a = f8_bcast(pp + m * ldp + off);
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) acc[m][v] = f8_fma(a, vv[v], acc[m][v]);
      }
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) f8_store(o + m * ldo + d0 + 8 * v, acc[m][v]);
}

template <int M, typename T>
static inline void pv_rows(const float* p, int64_t ldp, const T* const* vpages, int bs, int D, int n, float* o,
                           int64_t ldo) {
  int d0 = 0;
  for (; d0 + 16 <= D; d0 += 16) pv_tile<M, 2>(p, ldp, vpages, bs, D, n, d0, o, ldo);
  for (; d0 + 8 <= D; d0 += 8) pv_tile<M, 1>(p, ldp, vpages, bs, D, n, d0, o, ldo);
  for (; d0 < D; ++d0)
    for (int m = 0; m < M; ++m) {
      float s = 0.f;
      for (int j = 0; j < n; ++j) s += p[m * ldp + j] * to_f(vpages[j / bs][static_cast<int64_t>(j % bs) * D + d0]);
      o[m * ldo + d0] = s;
    }
}

template <typename T>
static void pv(const float* p, int64_t ldp, int M, const T* const* vpages, int bs, int D, int n, float* o,
               int64_t ldo) {
  int m = 0;
  for (; m + 4 <= M; m += 4) pv_rows<4>(p + m * ldp, ldp, vpages, bs, D, n, o + m * ldo, ldo);
  switch (M - m) {
    case 3: pv_rows<3>(p + m * ldp, ldp, vpages, bs, D, n, o + m * ldo, ldo); break;
    case 2: pv_rows<2>(p + m * ldp, ldp, vpages, bs, D, n, o + m * ldo, ldo); break;
    case 1: pv_rows<1>(p + m * ldp, ldp, vpages, bs, D, n, o + m * ldo, ldo); break;
    default: break;
  }
}

// ---------------------------------------------------------------- QK / PV on "amx" pages (bf16)
// Logits of M (<= 4) query rows against the 16 slots of key group kg (16*D
// elements): for each dim pair a 64-byte row holds (k[t][d], k[t][d+1]) for 16 t.
template <int M>
static inline void qk_group_amx(const float* __restrict q, int64_t ldq, const c10::BFloat16* __restrict kg, int D,
                                float* __restrict c, int64_t ldc) {
  F8 acc[M][2];
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = f8_zero();
  for (int j = 0; j < D / 2; ++j) {
    const c10::BFloat16* row = kg + static_cast<int64_t>(j) * 32;
    const F8 lo0 = f8_pair_lo(row), hi0 = f8_pair_hi(row), lo1 = f8_pair_lo(row + 16), hi1 = f8_pair_hi(row + 16);
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) {
      const F8 a = f8_bcast(q + m * ldq + 2 * j), b = f8_bcast(q + m * ldq + 2 * j + 1);
      acc[m][0] = f8_fma(b, hi0, f8_fma(a, lo0, acc[m][0]));
      acc[m][1] = f8_fma(b, hi1, f8_fma(a, lo1, acc[m][1]));
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m) {
    f8_store(c + m * ldc, acc[m][0]);
    f8_store(c + m * ldc + 8, acc[m][1]);
  }
}

// qk_page on an "amx" key page (bs % 16 == 0, D even)
static void qk_page_amx(const float* q, int64_t ldq, int M, const c10::BFloat16* kp, int bs, int D, float* c,
                        int64_t ldc) {
  for (int t0 = 0; t0 < bs; t0 += 16) {
    const c10::BFloat16* kg = kp + static_cast<int64_t>(t0) * D;
    int m = 0;
    for (; m + 4 <= M; m += 4) qk_group_amx<4>(q + m * ldq, ldq, kg, D, c + m * ldc + t0, ldc);
    switch (M - m) {
      case 3: qk_group_amx<3>(q + m * ldq, ldq, kg, D, c + m * ldc + t0, ldc); break;
      case 2: qk_group_amx<2>(q + m * ldq, ldq, kg, D, c + m * ldc + t0, ldc); break;
      case 1: qk_group_amx<1>(q + m * ldq, ldq, kg, D, c + m * ldc + t0, ldc); break;
      default: break;
    }
  }
}

// o[m][dg*16 .. +16) = sum_{j<n} p[m][j] V[j][...] over "amx" value pages: for each
// 16-dim group and token pair a 64-byte row holds (v[t][d], v[t+1][d]) for 16 d.
template <int M>
static inline void pv_group_amx(const float* __restrict p, int64_t ldp, const c10::BFloat16* const* vpages, int bs,
                                int n, int dg, float* __restrict o, int64_t ldo) {
  F8 acc[M][2];
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = f8_zero();
  for (int pg = 0, base = 0; base < n; ++pg, base += bs) {
    const c10::BFloat16* vp = vpages[pg] + static_cast<int64_t>(dg) * 16 * bs;
    const int cnt = std::min(bs, n - base);
    const float* pp = p + base;
    for (int t = 0; t < cnt; t += 2) {
      const c10::BFloat16* row = vp + static_cast<int64_t>(t / 2) * 32;
      const F8 lo0 = f8_pair_lo(row), hi0 = f8_pair_hi(row), lo1 = f8_pair_lo(row + 16), hi1 = f8_pair_hi(row + 16);
      if (t + 1 < cnt) {
#pragma GCC unroll 4
        for (int m = 0; m < M; ++m) {
          const F8 a = f8_bcast(pp + m * ldp + t), b = f8_bcast(pp + m * ldp + t + 1);
          acc[m][0] = f8_fma(b, hi0, f8_fma(a, lo0, acc[m][0]));
          acc[m][1] = f8_fma(b, hi1, f8_fma(a, lo1, acc[m][1]));
        }
      } else {  // an odd tail: the pair's second token is past the window (its slot may hold anything)
#pragma GCC unroll 4
        for (int m = 0; m < M; ++m) {
          const F8 a = f8_bcast(pp + m * ldp + t);
          acc[m][0] = f8_fma(a, lo0, acc[m][0]);
          acc[m][1] = f8_fma(a, lo1, acc[m][1]);
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m) {
    f8_store(o + m * ldo + dg * 16, acc[m][0]);
    f8_store(o + m * ldo + dg * 16 + 8, acc[m][1]);
  }
}

static void pv_amx(const float* p, int64_t ldp, int M, const c10::BFloat16* const* vpages, int bs, int D, int n,
                   float* o, int64_t ldo) {
  for (int dg = 0; dg < D / 16; ++dg) {
    int m = 0;
    for (; m + 4 <= M; m += 4) pv_group_amx<4>(p + m * ldp, ldp, vpages, bs, n, dg, o + m * ldo, ldo);
    switch (M - m) {
      case 3: pv_group_amx<3>(p + m * ldp, ldp, vpages, bs, n, dg, o + m * ldo, ldo); break;
      case 2: pv_group_amx<2>(p + m * ldp, ldp, vpages, bs, n, dg, o + m * ldo, ldo); break;
      case 1: pv_group_amx<1>(p + m * ldp, ldp, vpages, bs, n, dg, o + m * ldo, ldo); break;
      default: break;
    }
  }
}

// the page functions of one layout, for the templated kernels
template <typename T>
struct PageOps {
  bool amx;
  void qk(const float* q, int64_t ldq, int M, const T* kp, int bs, int D, float* c, int64_t ldc) const {
    qk_page(q, ldq, M, kp, bs, D, c, ldc);
  }
  void pvp(const float* p, int64_t ldp, int M, const T* const* vp, int bs, int D, int n, float* o,
           int64_t ldo) const {
    pv(p, ldp, M, vp, bs, D, n, o, ldo);
  }
};
template <>
struct PageOps<c10::BFloat16> {
  bool amx;
  void qk(const float* q, int64_t ldq, int M, const c10::BFloat16* kp, int bs, int D, float* c, int64_t ldc) const {
    if (amx)
      qk_page_amx(q, ldq, M, kp, bs, D, c, ldc);
    else
      qk_page(q, ldq, M, kp, bs, D, c, ldc);
  }
  void pvp(const float* p, int64_t ldp, int M, const c10::BFloat16* const* vp, int bs, int D, int n, float* o,
           int64_t ldo) const {
    if (amx)
      pv_amx(p, ldp, M, vp, bs, D, n, o, ldo);
    else
      pv(p, ldp, M, vp, bs, D, n, o, ldo);
  }
};

// ---------------------------------------------------------------- checks

struct PagedArgs {
  int64_t nb, H, D, bs;
  int64_t sk0, sk1, sv0, sv1, sa0 = 0, sa1 = 0;
  bool amx = false;
};

static PagedArgs check_paged(const at::Tensor& k_t, const at::Tensor* v, const c10::optional<at::Tensor>& acc,
                             bool amx = false) {
  TORCH_CHECK(k_t.dim() == 4, "k_t must be [nb, H, D, bs]");
  TORCH_CHECK(k_t.device().is_cpu(), "kvcompress CPU kernels need CPU tensors");
  PagedArgs a;
  a.amx = amx;
  if (amx)
    TORCH_CHECK(k_t.scalar_type() == at::kBFloat16 && k_t.size(3) % 32 == 0 && k_t.size(2) % 32 == 0,
                "amx pages need a bf16 cache, block_size % 32 == 0 and head_size % 32 == 0");
  a.nb = k_t.size(0);
  a.H = k_t.size(1);
  a.D = k_t.size(2);
  a.bs = k_t.size(3);
  TORCH_CHECK(k_t.stride(3) == 1 && k_t.stride(2) == a.bs, "key pages must be contiguous [D, bs]");
  a.sk0 = k_t.stride(0);
  a.sk1 = k_t.stride(1);
  a.sv0 = a.sv1 = 0;
  if (v != nullptr) {
    TORCH_CHECK(v->dim() == 4 && v->device().is_cpu(), "v must be a 4-d CPU tensor");
    TORCH_CHECK(v->scalar_type() == k_t.scalar_type(), "k_t and v dtypes differ");
    TORCH_CHECK(v->size(0) == a.nb && v->size(1) == a.H && v->size(2) == a.bs && v->size(3) == a.D,
                "v must be [nb, H, bs, D] matching k_t [nb, H, D, bs]");
    TORCH_CHECK(v->stride(3) == 1 && v->stride(2) == a.D, "value pages must be contiguous [bs, D]");
    a.sv0 = v->stride(0);
    a.sv1 = v->stride(1);
  }
  if (acc.has_value() && acc->defined()) {
    TORCH_CHECK(acc->scalar_type() == at::kFloat && acc->device().is_cpu(), "acc must be a float32 CPU tensor");
    TORCH_CHECK(acc->dim() == 3 && acc->size(0) == a.nb && acc->size(1) == a.H && acc->size(2) == a.bs,
                "acc must be [nb, H, bs]");
    TORCH_CHECK(acc->stride(2) == 1, "acc pages must be contiguous");
    a.sa0 = acc->stride(0);
    a.sa1 = acc->stride(1);
  }
  return a;
}

static void check_int_vec(const at::Tensor& t, int64_t n, const char* name, at::ScalarType st) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must be 1-d of length ", n);
  TORCH_CHECK(t.scalar_type() == st && t.is_contiguous() && t.device().is_cpu(), name,
              " must be a contiguous CPU tensor of type ", st);
}

// every block id a window of `len` slots touches must be a valid block
static void check_rows(const int32_t* bt, int64_t sbt0, int64_t cols, int64_t R, const int32_t* lens,
                       const int64_t* starts, int64_t bs, int64_t nb) {
  for (int64_t i = 0; i < R; ++i) {
    const int64_t len = lens ? lens[i] : 0;
    if (len <= 0) continue;
    const int64_t s = starts ? starts[i] : 0;
    const int64_t npg = (len + bs - 1) / bs;
    TORCH_CHECK(s >= 0 && s + npg <= cols, "request ", i, ": window of ", len, " slots at entry ", s,
                " exceeds the block table (", cols, " columns)");
    for (int64_t pg = 0; pg < npg; ++pg) {
      const int64_t b = bt[i * sbt0 + s + pg];
      TORCH_CHECK(b >= 0 && b < nb, "request ", i, ": block id ", b, " out of range [0, ", nb, ")");
    }
  }
}

// ---------------------------------------------------------------- (a) decode

// ---------------------------------------------------------------- bf16 dot products (AVX512-BF16)
// On bf16 pages, where the CPU has AVX512-BF16 (checked at run time; the rest of the
// file keeps its AVX2 build), chunk_impl computes QK and PV with vdpbf16ps: two bf16
// products per float32 lane, accumulated in float32. Each work item first packs its
// window into the two pair layouts vdpbf16ps needs (zero past the window; "amx" pages
// already hold 16-token / 16-dim halves of them, so they are copied):
//   keys   kp[(b*(D/2) + j)*64 + 2*t + e] = K[32*b + t][2*j + e]   (t < 32: one 32-token block)
//   values vp[(p*D + d)*2 + e]            = V[2*p + e][d]
// Logits, softmax and scores stay float32 (as on the AVX2 path); only the probabilities
// fed to PV are rounded to bf16 (as vLLM's own AMX path does). Needs D % 16 == 0.
// VLLM_KVCOMPRESS_CPU_BF16DOT=0 turns it off (the AVX2 path then runs).
#if defined(KVC_AVX2) && defined(__x86_64__) && \
    ((defined(__clang__) && __clang_major__ >= 11) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10))
#define KVC_BF16DOT 1
#define KVC_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

static bool bf16dot_cpu() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512bf16");
  return ok;
}
static bool bf16dot_on() {
  const char* e = std::getenv("VLLM_KVCOMPRESS_CPU_BF16DOT");
  return bf16dot_cpu() && !(e != nullptr && std::strcmp(e, "0") == 0);
}
// the chunk kernels' condition for a bf16 cache (decode also needs page size % 16 == 0, G <= 8)
static bool bf16dot_for(int64_t head_size) { return head_size % 16 == 0 && bf16dot_on(); }

static inline uint32_t word_at(const uint16_t* p) {
  uint32_t w;
  std::memcpy(&w, p, sizeof(w));
  return w;
}

// vpermt2w index interleaving 16 words of a with 16 of b: word 2i <- a[i0 + i], 2i + 1 <- b[i0 + i]
KVC_BF16_TARGET static inline __m512i pair_index(int i0) {
  alignas(64) uint16_t ix[32];
  for (int i = 0; i < 16; ++i) ix[2 * i] = static_cast<uint16_t>(i0 + i), ix[2 * i + 1] = static_cast<uint16_t>(32 + i0 + i);
  return _mm512_load_si512(ix);
}

// the 16 dot pairs (a[i], b[i]) of two 16-word rows (b == nullptr: zeros); idx = pair_index(0)
KVC_BF16_TARGET static inline __m512i pairs16(const uint16_t* a, const uint16_t* b, __m512i idx) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
  const __m256i y = b != nullptr ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)) : _mm256_setzero_si256();
  return _mm512_permutex2var_epi16(_mm512_castsi256_si512(x), idx, _mm512_castsi256_si512(y));
}

// pack window slots [0, n) of KV head h (pages bt row btr) into kp / vp (layouts above)
KVC_BF16_TARGET static void pack_window_bf16(const uint16_t* kbase, const uint16_t* vbase, const int32_t* btr,
                                             const PagedArgs& pa, int h, int n, uint16_t* kp, uint16_t* vp) {
  const int D = static_cast<int>(pa.D), bs = static_cast<int>(pa.bs), D2 = D / 2;
  const int nkb = (n + 31) / 32;
  auto kpage = [&](int t) { return kbase + static_cast<int64_t>(btr[t / bs]) * pa.sk0 + h * pa.sk1; };
  if (pa.amx) {  // "amx" pages already hold dot pairs (16-token key groups, 16-dim value groups): copy
    for (int b = 0; b < nkb; ++b)
      for (int half = 0; half < 2; ++half) {
        const int t0 = 32 * b + 16 * half, cnt = std::max(0, std::min(16, n - t0));
        const __mmask32 mask = cnt == 16 ? ~__mmask32(0) : static_cast<__mmask32>((1u << (2 * cnt)) - 1u);
        const uint16_t* grp = cnt > 0 ? kpage(t0) + static_cast<int64_t>(t0 % bs) * D : nullptr;
        for (int j = 0; j < D2; ++j) {
          uint16_t* dst = kp + (static_cast<int64_t>(b) * D2 + j) * 64 + 32 * half;
          _mm512_storeu_si512(dst, cnt > 0 ? _mm512_maskz_loadu_epi16(mask, grp + j * 32) : _mm512_setzero_si512());
        }
      }
    if (vp == nullptr) return;
    for (int p = 0; 2 * p < n; ++p) {
      const int t = 2 * p;
      const __mmask32 mask = t + 1 < n ? ~__mmask32(0) : static_cast<__mmask32>(0x55555555u);  // odd tail: no 2nd
      const uint16_t* pg = vbase + static_cast<int64_t>(btr[t / bs]) * pa.sv0 + h * pa.sv1 + (t % bs) / 2 * 32;
      for (int c = 0; c < D; c += 16)
        _mm512_storeu_si512(vp + static_cast<int64_t>(p) * 2 * D + 2 * c,
                            _mm512_maskz_loadu_epi16(mask, pg + static_cast<int64_t>(c) * bs));
    }
    return;
  }
  if (bs % 16 == 0) {  // each 16-token half of a block lies in one page
    const __m512i ilo = pair_index(0), ihi = pair_index(16);
    for (int b = 0; b < nkb; ++b) {
      const uint16_t* src[2];
      __mmask16 mask[2];
      for (int half = 0; half < 2; ++half) {
        const int t0 = 32 * b + 16 * half, cnt = std::max(0, std::min(16, n - t0));
        mask[half] = cnt == 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << cnt) - 1u);
        src[half] = cnt > 0 ? kpage(t0) + t0 % bs : nullptr;
      }
      auto row = [&](int d) KVC_BF16_TARGET {  // tokens 32b .. 32b + 31 of key dim d, zero past n
        const __m256i a = src[0] != nullptr ? _mm256_maskz_loadu_epi16(mask[0], src[0] + static_cast<int64_t>(d) * bs)
                                            : _mm256_setzero_si256();
        const __m256i c = src[1] != nullptr ? _mm256_maskz_loadu_epi16(mask[1], src[1] + static_cast<int64_t>(d) * bs)
                                            : _mm256_setzero_si256();
        return _mm512_inserti64x4(_mm512_castsi256_si512(a), c, 1);
      };
      uint16_t* dst = kp + static_cast<int64_t>(b) * D2 * 64;
      for (int j = 0; j < D2; ++j) {
        const __m512i ra = row(2 * j), rb = row(2 * j + 1);
        _mm512_storeu_si512(dst + j * 64, _mm512_permutex2var_epi16(ra, ilo, rb));
        _mm512_storeu_si512(dst + j * 64 + 32, _mm512_permutex2var_epi16(ra, ihi, rb));
      }
    }
  } else {
    for (int b = 0; b < nkb; ++b)
      for (int j = 0; j < D2; ++j)
        for (int t = 0; t < 32; ++t) {
          const int s = 32 * b + t;
          uint16_t* dst = kp + (static_cast<int64_t>(b) * D2 + j) * 64 + 2 * t;
          for (int e = 0; e < 2; ++e)
            dst[e] = s < n ? kpage(s)[static_cast<int64_t>(2 * j + e) * bs + s % bs] : uint16_t(0);
        }
  }
  if (vp == nullptr) return;
  const __m512i idx = pair_index(0);
  auto vrow = [&](int t) {
    return vbase + static_cast<int64_t>(btr[t / bs]) * pa.sv0 + h * pa.sv1 + static_cast<int64_t>(t % bs) * D;
  };
  for (int p = 0; 2 * p < n; ++p) {
    const uint16_t* ra = vrow(2 * p);
    const uint16_t* rb = 2 * p + 1 < n ? vrow(2 * p + 1) : nullptr;
    uint16_t* dst = vp + static_cast<int64_t>(p) * 2 * D;
    for (int c = 0; c < D; c += 16)
      _mm512_storeu_si512(dst + 2 * c, pairs16(ra + c, rb != nullptr ? rb + c : nullptr, idx));
  }
}

// logits c[m][0..32) = scale * q_m . K[t] for the 32 tokens of one packed key block
template <int MR>
KVC_BF16_TARGET static inline void qk_dot_tile(const uint16_t* const* qr, const uint16_t* kb, int D2, float scale,
                                               float* c, int64_t ldc) {
  __m512 acc[MR][2];
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int j = 0; j < D2; ++j) {
    const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kb + j * 64);
    const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kb + j * 64 + 32);
#pragma GCC unroll 6
    for (int m = 0; m < MR; ++m) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(word_at(qr[m] + 2 * j)));
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], a, k0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], a, k1);
    }
  }
  const __m512 sv = _mm512_set1_ps(scale);
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m) {
    _mm512_storeu_ps(c + m * ldc, _mm512_mul_ps(acc[m][0], sv));
    _mm512_storeu_ps(c + m * ldc + 16, _mm512_mul_ps(acc[m][1], sv));
  }
}

// out_m[d0 .. d0 + 16*NV) = bf16(inv_m * sum_p P_m[2p, 2p+1] . V[2p, 2p+1][d]) over npair token pairs;
// vpairs(p, c): token pair p's 16 dot pairs (v[2p][d], v[2p+1][d]) for d = c .. c + 15
template <int MR, int NV, typename VPairs>
KVC_BF16_TARGET static inline void pv_dot_tile(const uint16_t* const* pr, int npair, int d0, const float* inv,
                                               uint16_t* const* orow, const VPairs& vpairs) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
  for (int p = 0; p < npair; ++p) {
    __m512bh vv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) vv[v] = (__m512bh)vpairs(p, d0 + 16 * v);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(word_at(pr[m] + 2 * p)));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], a, vv[v]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    const __m512 s = _mm512_set1_ps(inv[m]);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(orow[m] + d0 + 16 * v),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[m][v], s)));
  }
}

// pv_dot_tile over all D (% 16 == 0) dims, 64 at a time
template <int MR, typename VPairs>
KVC_BF16_TARGET static void pv_dot_rows(const uint16_t* const* pr, int D, int npair, const float* inv,
                                        uint16_t* const* orow, const VPairs& vpairs) {
  int d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) pv_dot_tile<MR, 4>(pr, npair, d0, inv, orow, vpairs);
  switch ((D - d0) / 16) {
    case 3: pv_dot_tile<MR, 3>(pr, npair, d0, inv, orow, vpairs); break;
    case 2: pv_dot_tile<MR, 2>(pr, npair, d0, inv, orow, vpairs); break;
    case 1: pv_dot_tile<MR, 1>(pr, npair, d0, inv, orow, vpairs); break;
    default: break;
  }
}

// x[0..n) (float, n % 16 == 0) -> bf16 (round to nearest even)
KVC_BF16_TARGET static void to_bf16(const float* x, int n, uint16_t* y) {
  int j = 0;
  for (; j + 32 <= n; j += 32)
    _mm512_storeu_si512(y + j, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + j + 16), _mm512_loadu_ps(x + j)));
  if (j < n) _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + j)));
}

// f(tile rows, first row) over M rows in tiles of up to 6
template <typename F>
static inline void by_tiles(int M, F&& f) {
  int m = 0;
  for (; m + 6 <= M; m += 6) f(std::integral_constant<int, 6>{}, m);
  switch (M - m) {
    case 5: f(std::integral_constant<int, 5>{}, m); break;
    case 4: f(std::integral_constant<int, 4>{}, m); break;
    case 3: f(std::integral_constant<int, 3>{}, m); break;
    case 2: f(std::integral_constant<int, 2>{}, m); break;
    case 1: f(std::integral_constant<int, 1>{}, m); break;
    default: break;
  }
}

// ---- decode on the dot path: G query rows of one (request, KV head) against its window,
// read straight from the pages (no packing: 16-token key chunks / token-pair value rows are
// interleaved in registers on "vec" pages and are already dot pairs on "amx" pages).
// Needs bs % 16 == 0, D % 16 == 0, G <= 8.

// the 16 (k[t][2j], k[t][2j+1]) pairs of tokens t0 .. t0 + 15 of page kp, as one vector
template <bool AMX>
KVC_BF16_TARGET static inline __m512i key_pairs16(const uint16_t* kp, int bs, int D, int t0, int j, __m512i idx) {
  if (AMX) return _mm512_loadu_si512(kp + static_cast<int64_t>(t0) * D + j * 32);
  return pairs16(kp + static_cast<int64_t>(2 * j) * bs + t0, kp + static_cast<int64_t>(2 * j + 1) * bs + t0, idx);
}

// logits lg[g*ldl + t0 + 0..16*NC) = scale * q_g . k[t] for G rows, NC 16-token chunks of one page
template <int G, int NC, bool AMX>
KVC_BF16_TARGET static inline void qk_decode_dot(const uint16_t* const* qr, const uint16_t* kp, int bs, int D, int t0,
                                                 float scale, float* lg, int64_t ldl, __m512i idx) {
  __m512 acc[G][NC];
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 2
    for (int c = 0; c < NC; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int j = 0; j < D / 2; ++j) {
    __m512bh kv[NC];
#pragma GCC unroll 2
    for (int c = 0; c < NC; ++c) kv[c] = (__m512bh)key_pairs16<AMX>(kp, bs, D, t0 + 16 * c, j, idx);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(word_at(qr[g] + 2 * j)));
#pragma GCC unroll 2
      for (int c = 0; c < NC; ++c) acc[g][c] = _mm512_dpbf16_ps(acc[g][c], a, kv[c]);
    }
  }
  const __m512 sv = _mm512_set1_ps(scale);
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 2
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(lg + g * ldl + t0 + 16 * c, _mm512_mul_ps(acc[g][c], sv));
}

// one decode item: lg[g*ldl + 0..L) <- exp(logit - max) (zero up to ldl), inv[g] <- 1 / sum, out rows written
template <int G, bool AMX>
KVC_BF16_TARGET static void decode_item_dot(const uint16_t* const* qr, const uint16_t* const* kpages,
                                            const uint16_t* const* vpages, int bs, int D, int L, float scale,
                                            float* lg, int64_t ldl, float* inv, uint16_t* pb, uint16_t* const* orow) {
  const __m512i idx = pair_index(0);
  const int npg = (L + bs - 1) / bs;
  for (int pg = 0; pg < npg; ++pg) {
    const int n16 = std::min(bs, L - pg * bs + 15) / 16;  // 16-token chunks of this page holding window slots
    float* dst = lg + static_cast<int64_t>(pg) * bs;
    int c = 0;
    for (; c + 2 <= n16; c += 2) qk_decode_dot<G, 2, AMX>(qr, kpages[pg], bs, D, 16 * c, scale, dst, ldl, idx);
    if (c < n16) qk_decode_dot<G, 1, AMX>(qr, kpages[pg], bs, D, 16 * c, scale, dst, ldl, idx);
  }
  const int lpad = (L + 15) / 16 * 16;
  const uint16_t* pr[8];
  for (int g = 0; g < G; ++g) {
    float* row = lg + g * ldl;
    inv[g] = softmax_unnormalized(row, L);
    std::fill(row + L, row + lpad, 0.f);  // slots past the window (their logits may be garbage) weigh 0
    uint16_t* pbg = pb + static_cast<int64_t>(g) * lpad;
    to_bf16(row, lpad, pbg);
    pr[g] = pbg;
  }
  // value pairs straight from the pages; an odd window's last pair has no second token
  auto vpairs = [&](int p, int c) KVC_BF16_TARGET {
    const int t = 2 * p, off = t % bs;
    const uint16_t* vp = vpages[t / bs];
    const bool pair = t + 1 < L;
    if constexpr (AMX)
      return _mm512_maskz_loadu_epi16(pair ? ~__mmask32(0) : static_cast<__mmask32>(0x55555555u),
                                      vp + static_cast<int64_t>(c) * bs + off / 2 * 32);
    else
      return pairs16(vp + static_cast<int64_t>(off) * D + c, pair ? vp + static_cast<int64_t>(off + 1) * D + c : nullptr,
                     idx);
  };
  pv_dot_rows<G>(pr, D, (L + 1) / 2, inv, orow, vpairs);
}

template <bool AMX>
static void decode_item_dot_g(int G, const uint16_t* const* qr, const uint16_t* const* kpages,
                              const uint16_t* const* vpages, int bs, int D, int L, float scale, float* lg,
                              int64_t ldl, float* inv, uint16_t* pb, uint16_t* const* orow) {
  switch (G) {
#define KVC_G(n) \
  case n: decode_item_dot<n, AMX>(qr, kpages, vpages, bs, D, L, scale, lg, ldl, inv, pb, orow); break;
    KVC_G(1) KVC_G(2) KVC_G(3) KVC_G(4) KVC_G(5) KVC_G(6) KVC_G(7) KVC_G(8)
#undef KVC_G
    default: break;
  }
}
#endif  // KVC_BF16DOT

template <typename T>
static void decode_impl(const at::Tensor& query, const PagedArgs& pa, const T* kbase, const T* vbase,
                        const int32_t* bt, int64_t sbt0, const int32_t* sl, double scale_d, float* acc,
                        const float* w, at::Tensor& out) {
  const int64_t R = query.size(0), Hq = query.size(1);
  const int H = static_cast<int>(pa.H), D = static_cast<int>(pa.D), bs = static_cast<int>(pa.bs);
  const int G = static_cast<int>(Hq / H);
  const T* q = query.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const int64_t sq0 = query.stride(0), sq1 = query.stride(1), so0 = out.stride(0), so1 = out.stride(1);
  const float scale = static_cast<float>(scale_d);
  const int64_t items = R * H;
  const int nt = num_threads_for(items);
  const PageOps<T> po{pa.amx};
#ifdef KVC_BF16DOT
  const bool dot = std::is_same<T, c10::BFloat16>::value && bs % 16 == 0 && G <= 8 && bf16dot_for(D);
#endif

#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t i = it / H;
    const int h = static_cast<int>(it % H);
    const int L = sl[i];
    T* orow = o + i * so0 + static_cast<int64_t>(h) * G * so1;
    if (L <= 0) {
      for (int g = 0; g < G; ++g)
        for (int d = 0; d < D; ++d) orow[g * so1 + d] = static_cast<T>(0.f);
      continue;
    }
    const int npg = (L + bs - 1) / bs;
    const int64_t ldl = static_cast<int64_t>(npg) * bs;
    Scratch& s = scratch();
    float* qf = grow(s.f0, static_cast<size_t>(G) * D);
    float* lg = grow(s.f1, static_cast<size_t>(G) * ldl);
    float* of = grow(s.f2, static_cast<size_t>(G) * D + G);
    float* inv = of + static_cast<size_t>(G) * D;
    const T** kp = reinterpret_cast<const T**>(grow(s.p0, npg));
    const T** vp = reinterpret_cast<const T**>(grow(s.p1, npg));
    const T* qrow = q + i * sq0 + static_cast<int64_t>(h) * G * sq1;
    const int32_t* btr = bt + i * sbt0;
    for (int pg = 0; pg < npg; ++pg) {
      const int64_t b = btr[pg];
      kp[pg] = kbase + b * pa.sk0 + h * pa.sk1;
      vp[pg] = vbase + b * pa.sv0 + h * pa.sv1;
    }
#ifdef KVC_BF16DOT
    if (dot) {  // AVX512-BF16: QK / PV on vdpbf16ps straight from the pages (probabilities as bf16 for PV)
      const uint16_t* qr[8];
      uint16_t* orr[8];
      for (int g = 0; g < G; ++g) {
        qr[g] = reinterpret_cast<const uint16_t*>(qrow + g * sq1);
        orr[g] = reinterpret_cast<uint16_t*>(orow + g * so1);
      }
      uint16_t* pb = grow(s.h2, static_cast<size_t>(G) * ((L + 15) / 16 * 16));
      auto pages = [](const T** p) { return reinterpret_cast<const uint16_t* const*>(p); };
      if (pa.amx)
        decode_item_dot_g<true>(G, qr, pages(kp), pages(vp), bs, D, L, scale, lg, ldl, inv, pb, orr);
      else
        decode_item_dot_g<false>(G, qr, pages(kp), pages(vp), bs, D, L, scale, lg, ldl, inv, pb, orr);
    } else
#endif
    {
      for (int g = 0; g < G; ++g)
        for (int d = 0; d < D; ++d) qf[g * D + d] = to_f(qrow[g * sq1 + d]) * scale;
      for (int pg = 0; pg < npg; ++pg) po.qk(qf, D, G, kp[pg], bs, D, lg + static_cast<int64_t>(pg) * bs, ldl);
      for (int g = 0; g < G; ++g) inv[g] = softmax_unnormalized(lg + g * ldl, L);
      po.pvp(lg, ldl, G, vp, bs, D, L, of, D);
      for (int g = 0; g < G; ++g)
        for (int d = 0; d < D; ++d) orow[g * so1 + d] = static_cast<T>(of[g * D + d] * inv[g]);
    }
    if (acc != nullptr) {
      // acc[p] += (w / G) * sum_g probs[g, p]; the new (last) slot starts from 0
      const float wg = w[i] / static_cast<float>(G);
      for (int g = 0; g < G; ++g) inv[g] *= wg;
      float last = 0.f;
      for (int g = 0; g < G; ++g) last += lg[g * ldl + L - 1] * inv[g];
      for (int pg = 0; pg < npg; ++pg) {
        float* ap = acc + static_cast<int64_t>(btr[pg]) * pa.sa0 + h * pa.sa1;
        const float* lp = lg + static_cast<int64_t>(pg) * bs;
        const int cnt = std::min(bs, L - pg * bs);
        int off = 0;
        for (; off + 8 <= cnt; off += 8) {
          F8 a = f8_load(ap + off);
          for (int g = 0; g < G; ++g) a = f8_fma(f8_set(inv[g]), f8_load(lp + g * ldl + off), a);
          f8_store(ap + off, a);
        }
        for (; off < cnt; ++off) {
          float a = ap[off];
          for (int g = 0; g < G; ++g) a += lp[g * ldl + off] * inv[g];
          ap[off] = a;
        }
      }
      const int64_t lb = btr[(L - 1) / bs];
      acc[lb * pa.sa0 + h * pa.sa1 + (L - 1) % bs] = last;
    }
  }
}

void decode_attention_scores(const at::Tensor& query, const at::Tensor& k_t, const at::Tensor& v,
                             const at::Tensor& block_table, const at::Tensor& seq_lens, double scale,
                             const c10::optional<at::Tensor>& acc, const c10::optional<at::Tensor>& weights,
                             at::Tensor out, bool amx) {
  const PagedArgs pa = check_paged(k_t, &v, acc, amx);
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1 && query.device().is_cpu(),
              "query must be a CPU [R, Hq, D] tensor with contiguous rows");
  TORCH_CHECK(query.scalar_type() == k_t.scalar_type(), "query dtype must match the cache dtype");
  const int64_t R = query.size(0), Hq = query.size(1);
  TORCH_CHECK(query.size(2) == pa.D, "query head size ", query.size(2), " != cache head size ", pa.D);
  TORCH_CHECK(Hq % pa.H == 0, Hq, " query heads are not a multiple of ", pa.H, " KV heads");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) >= R && block_table.scalar_type() == at::kInt &&
                  block_table.stride(1) == 1,
              "block_table must be int32 [R, cols] with contiguous rows");
  check_int_vec(seq_lens, R, "seq_lens", at::kInt);
  const bool has_acc = acc.has_value() && acc->defined();
  if (has_acc) {
    TORCH_CHECK(weights.has_value() && weights->defined(), "weights are required with acc");
    TORCH_CHECK(weights->dim() == 1 && weights->size(0) == R && weights->scalar_type() == at::kFloat &&
                    weights->is_contiguous(),
                "weights must be float32 [R]");
  }
  TORCH_CHECK(out.device().is_cpu() && out.sizes() == query.sizes() && out.scalar_type() == query.scalar_type() && out.stride(2) == 1,
              "out must be like query with contiguous rows");
  check_rows(block_table.data_ptr<int32_t>(), block_table.stride(0), block_table.size(1), R,
             seq_lens.data_ptr<int32_t>(), nullptr, pa.bs, pa.nb);
  float* accp = has_acc ? acc->data_ptr<float>() : nullptr;
  const float* wp = has_acc ? weights->data_ptr<float>() : nullptr;
  const int32_t* bt = block_table.data_ptr<int32_t>();
  const int32_t* sl = seq_lens.data_ptr<int32_t>();
  switch (query.scalar_type()) {
    case at::kFloat:
      decode_impl<float>(query, pa, k_t.data_ptr<float>(), v.data_ptr<float>(), bt, block_table.stride(0), sl, scale,
                         accp, wp, out);
      break;
    case at::kBFloat16:
      decode_impl<c10::BFloat16>(query, pa, k_t.data_ptr<c10::BFloat16>(), v.data_ptr<c10::BFloat16>(), bt,
                                 block_table.stride(0), sl, scale, accp, wp, out);
      break;
    case at::kHalf:
      decode_impl<c10::Half>(query, pa, k_t.data_ptr<c10::Half>(), v.data_ptr<c10::Half>(), bt,
                             block_table.stride(0), sl, scale, accp, wp, out);
      break;
    default:
      TORCH_CHECK(false, "unsupported dtype ", query.scalar_type());
  }
}

// ---------------------------------------------------------------- (b) window scores / prefill attention

struct WItem {
  int64_t i;       // request
  int h;           // KV head
  int q0, q1;      // range in the request's active-query list
  int64_t part;    // offset in the partial-sum buffer
  int plen;        // keys this item touches (max query slot + 1, <= L)
};


#ifdef KVC_BF16DOT
// One work item of chunk_impl on the bf16 dot-product path (same contract as its loop body).
KVC_BF16_TARGET static void chunk_item_bf16(const WItem& item, const uint16_t* q, int64_t sq0, int64_t sq1,
                                            uint16_t* o, int64_t so0, int64_t so1, const int32_t* qs,
                                            const int32_t* ks, const int32_t* nr, const int32_t* sl, const float* w,
                                            int G, float scale, float* pout, const int32_t* btr, const PagedArgs& pa,
                                            const uint16_t* kbase, const uint16_t* vbase) {
  const int64_t i = item.i;
  const int h = item.h, L = sl[i], D = static_cast<int>(pa.D), D2 = D / 2;
  const int QC = std::max(1, 24 / G);  // queries per row block (QC * G query-head rows)
  Scratch& s = scratch();
  uint16_t* kp = grow(s.h0, static_cast<size_t>((item.plen + 31) / 32) * D2 * 64);
  uint16_t* vp = o != nullptr ? grow(s.h1, static_cast<size_t>((item.plen + 1) / 2) * 2 * D) : nullptr;
  pack_window_bf16(kbase, vbase, btr, pa, h, item.plen, kp, vp);
  const uint16_t** qr = grow(s.r0, static_cast<size_t>(QC) * G);
  uint16_t** orow = grow(s.r1, static_cast<size_t>(QC) * G);
  const uint16_t** pr = grow(s.r2, static_cast<size_t>(QC) * G);
  for (int qa = item.q0; qa < item.q1; qa += QC) {
    const int qb = std::min(item.q1, qa + QC);
    const int M = (qb - qa) * G;
    const int kmax = static_cast<int>(std::min<int64_t>(static_cast<int64_t>(nr[i]) + ks[qb - 1] + 1, L));
    const int nkb = (kmax + 31) / 32;
    const int64_t ldl = static_cast<int64_t>(nkb) * 32;
    float* lg = grow(s.f1, static_cast<size_t>(M) * ldl);
    for (int r = 0; r < M; ++r) {
      const int64_t tok = qs[i] + ks[qa + r / G], hq = static_cast<int64_t>(h) * G + r % G;
      qr[r] = q + tok * sq0 + hq * sq1;
      if (o != nullptr) orow[r] = o + tok * so0 + hq * so1;
    }
    by_tiles(M, [&](auto mr, int m0) KVC_BF16_TARGET {
      for (int b = 0; b < nkb; ++b)
        qk_dot_tile<decltype(mr)::value>(qr + m0, kp + static_cast<int64_t>(b) * D2 * 64, D2, scale,
                                         lg + m0 * ldl + 32 * b, ldl);
    });
    float* inv = grow(s.f2, static_cast<size_t>(M));
    for (int r = 0; r < M; ++r) {
      const int qq = qa + r / G;
      const int n = static_cast<int>(std::min<int64_t>(static_cast<int64_t>(nr[i]) + ks[qq] + 1, L));
      float* row = lg + r * ldl;
      const float rinv = softmax_unnormalized(row, n);
      const float wq_ = w != nullptr ? w[qs[i] + ks[qq]] : 0.f;
      if (pout != nullptr && wq_ > 0.f) axpy(pout, row, wq_ * rinv / static_cast<float>(G), n);
      if (o == nullptr) continue;
      inv[r] = rinv;
      std::fill(row + n, row + ldl, 0.f);  // causal: later keys of the block weigh 0 in PV
    }
    if (o == nullptr) continue;
    uint16_t* pb = grow(s.h2, static_cast<size_t>(M) * ldl);
    for (int r = 0; r < M; ++r) {
      to_bf16(lg + r * ldl, static_cast<int>(ldl), pb + r * ldl);
      pr[r] = pb + r * ldl;
    }
    const int npair = (kmax + 1) / 2;
    auto vpairs = [vp, D](int p, int c) KVC_BF16_TARGET {  // the packed window
      return _mm512_loadu_si512(vp + static_cast<int64_t>(p) * 2 * D + 2 * c);
    };
    by_tiles(M, [&](auto mr, int m0) KVC_BF16_TARGET {
      pv_dot_rows<decltype(mr)::value>(pr + m0, D, npair, inv + m0, orow + m0, vpairs);
    });
  }
}
#endif

// One chunk of queries per request against its window (query k of request i at window
// slot nr[i] + k, causal). out == nullptr: window_scores (only the queries with w > 0 are
// computed, for the scores). out given: prefill attention of EVERY query into out, and
// (acc given) the scores of the weighted ones from the same logits.
template <typename T>
static void chunk_impl(const at::Tensor& query, int64_t R, const int32_t* qs, const PagedArgs& pa,
                       const T* kbase, const T* vbase, const int32_t* bt, int64_t sbt0, const int32_t* sl,
                       const int32_t* nr, const float* w, double scale_d, float* acc, at::Tensor* out) {
  const int H = static_cast<int>(pa.H), D = static_cast<int>(pa.D), bs = static_cast<int>(pa.bs);
  const int G = static_cast<int>(query.size(1) / H);
  const T* q = query.data_ptr<T>();
  const int64_t sq0 = query.stride(0), sq1 = query.stride(1);
  T* o = out != nullptr ? out->data_ptr<T>() : nullptr;
  const int64_t so0 = out != nullptr ? out->stride(0) : 0, so1 = out != nullptr ? out->stride(1) : 0;
  const float scale = static_cast<float>(scale_d);
  const bool scoring = acc != nullptr && w != nullptr;

  // active queries of each request (local index k: token qs[i] + k, window slot nr[i] + k)
  std::vector<int32_t> wq;
  std::vector<int64_t> wstart(R + 1, 0);
  std::vector<double> cost(R, 0.0);
  double total = 0.0;
  for (int64_t i = 0; i < R; ++i) {
    wstart[i] = static_cast<int64_t>(wq.size());
    const int L = sl[i];
    if (L <= 0) {  // an empty window: its queries' outputs are 0
      if (o != nullptr)
        for (int64_t t = qs[i]; t < qs[i + 1]; ++t)
          for (int hq = 0; hq < H * G; ++hq)
            for (int d = 0; d < D; ++d) o[t * so0 + hq * so1 + d] = static_cast<T>(0.f);
      continue;
    }
    for (int k = 0, n = qs[i + 1] - qs[i]; k < n; ++k) {
      if (o == nullptr && !(w[qs[i] + k] > 0.f)) continue;
      wq.push_back(k);
      cost[i] += std::min<int64_t>(static_cast<int64_t>(nr[i]) + k + 1, L);
    }
    total += cost[i];
  }
  wstart[R] = static_cast<int64_t>(wq.size());

  // work items: (request, head, contiguous share of its active queries), split by cost
  const int nthreads = at::get_num_threads();
  const double target = total > 0 ? total / (4.0 * nthreads) : 1.0;
  std::vector<WItem> items;
  std::vector<int64_t> ih_start(R * H + 1, 0);
  int64_t part_total = 0;
  std::vector<std::pair<int, int>> ranges;
  for (int64_t i = 0; i < R; ++i) {
    const int nq = static_cast<int>(wstart[i + 1] - wstart[i]);
    ranges.clear();
    if (nq > 0) {
      const int S = static_cast<int>(std::min<double>(nq, std::max(1.0, std::ceil(cost[i] / target))));
      const int32_t* ks = wq.data() + wstart[i];
      double cum = 0.0;
      int lo = 0;
      for (int a = 0; a < nq; ++a) {
        cum += std::min<int64_t>(static_cast<int64_t>(nr[i]) + ks[a] + 1, sl[i]);
        const int s = static_cast<int>(ranges.size());
        if (a == nq - 1 || (s < S - 1 && cum >= cost[i] * (s + 1) / S)) {
          ranges.emplace_back(lo, a + 1);
          lo = a + 1;
        }
      }
    }
    for (int h = 0; h < H; ++h) {
      ih_start[i * H + h] = static_cast<int64_t>(items.size());
      for (auto& r : ranges) {
        const int last = wq[wstart[i] + r.second - 1];
        const int plen = static_cast<int>(std::min<int64_t>(static_cast<int64_t>(nr[i]) + last + 1, sl[i]));
        items.push_back(WItem{i, h, r.first, r.second, part_total, plen});
        if (scoring) part_total += plen;
      }
    }
  }
  ih_start[R * H] = static_cast<int64_t>(items.size());
  std::vector<float> part(static_cast<size_t>(part_total), 0.f);

  const int64_t nitems = static_cast<int64_t>(items.size());
  const int QC = std::max(1, 16 / G);  // queries per row block (QC * G query-head rows)
  const PageOps<T> po{pa.amx};
#ifdef KVC_BF16DOT
  const bool dot = std::is_same<T, c10::BFloat16>::value && bf16dot_for(D);
#endif
  int nt = num_threads_for(nitems);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
  for (int64_t it = 0; it < nitems; ++it) {
    const WItem& item = items[it];
    const int64_t i = item.i;
    const int h = item.h;
    const int L = sl[i];
    const int32_t* ks = wq.data() + wstart[i];
    const int32_t* btr = bt + i * sbt0;
    float* pout = scoring ? part.data() + item.part : nullptr;
#ifdef KVC_BF16DOT
    if (dot) {
      auto u16 = [](auto* p) { return reinterpret_cast<uint16_t*>(const_cast<std::remove_const_t<T>*>(p)); };
      chunk_item_bf16(item, u16(q), sq0, sq1, o != nullptr ? u16(o) : nullptr, so0, so1, qs, ks, nr, sl, w, G, scale,
                      pout, btr, pa, u16(kbase), vbase != nullptr ? u16(vbase) : nullptr);
      continue;
    }
#endif
    Scratch& s = scratch();
    for (int qa = item.q0; qa < item.q1; qa += QC) {
      const int qb = std::min(item.q1, qa + QC);
      const int M = (qb - qa) * G;
      const int kmax = static_cast<int>(std::min<int64_t>(static_cast<int64_t>(nr[i]) + ks[qb - 1] + 1, L));
      const int npg = (kmax + bs - 1) / bs;
      const int64_t ldl = static_cast<int64_t>(npg) * bs;
      float* qf = grow(s.f0, static_cast<size_t>(M) * D);
      float* lg = grow(s.f1, static_cast<size_t>(M) * ldl);
      for (int qq = qa; qq < qb; ++qq) {
        const T* qrow = q + static_cast<int64_t>(qs[i] + ks[qq]) * sq0 + static_cast<int64_t>(h) * G * sq1;
        float* dst = qf + static_cast<int64_t>(qq - qa) * G * D;
        for (int g = 0; g < G; ++g)
          for (int d = 0; d < D; ++d) dst[g * D + d] = to_f(qrow[g * sq1 + d]) * scale;
      }
      for (int pg = 0; pg < npg; ++pg) {
        const T* kp = kbase + static_cast<int64_t>(btr[pg]) * pa.sk0 + h * pa.sk1;
        po.qk(qf, D, M, kp, bs, D, lg + static_cast<int64_t>(pg) * bs, ldl);
      }
      float* inv = o != nullptr ? grow(s.f2, static_cast<size_t>(M) * (D + 1)) : nullptr;
      for (int r = 0; r < M; ++r) {
        const int qq = qa + r / G;
        const int n = static_cast<int>(std::min<int64_t>(static_cast<int64_t>(nr[i]) + ks[qq] + 1, L));
        float* row = lg + r * ldl;
        const float rinv = softmax_unnormalized(row, n);
        const float wq_ = w != nullptr ? w[qs[i] + ks[qq]] : 0.f;
        if (scoring && wq_ > 0.f) axpy(pout, row, wq_ * rinv / static_cast<float>(G), n);
        if (o != nullptr) {
          inv[r] = rinv;
          std::fill(row + n, row + kmax, 0.f);  // causal: later keys of the block weigh 0 in PV
        }
      }
      if (o != nullptr) {
        float* of = inv + M;
        const T** vp = reinterpret_cast<const T**>(grow(s.p1, npg));
        for (int pg = 0; pg < npg; ++pg) vp[pg] = vbase + static_cast<int64_t>(btr[pg]) * pa.sv0 + h * pa.sv1;
        po.pvp(lg, ldl, M, vp, bs, D, kmax, of, D);
        for (int r = 0; r < M; ++r) {
          const int qq = qa + r / G, g = r % G;
          T* orow = o + static_cast<int64_t>(qs[i] + ks[qq]) * so0 + static_cast<int64_t>(h * G + g) * so1;
          const float* src = of + static_cast<int64_t>(r) * D;
          for (int d = 0; d < D; ++d) orow[d] = static_cast<T>(src[d] * inv[r]);
        }
      }
    }
  }
  if (!scoring) return;

  const int64_t nih = R * H;
  nt = num_threads_for(nih);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
  for (int64_t ih = 0; ih < nih; ++ih) {
    const int64_t i = ih / H;
    const int h = static_cast<int>(ih % H);
    const int L = sl[i];
    if (L <= 0) continue;
    const int32_t* btr = bt + i * sbt0;
    for (int pg = 0, base = 0; base < L; ++pg, base += bs) {
      float* ap = acc + static_cast<int64_t>(btr[pg]) * pa.sa0 + h * pa.sa1;
      const int cnt = std::min(bs, L - base);
      for (int off = 0; off < cnt; ++off) {
        const int j = base + off;
        float val = j >= nr[i] ? 0.f : ap[off];
        for (int64_t x = ih_start[ih]; x < ih_start[ih + 1]; ++x)
          if (j < items[x].plen) val += part[items[x].part + j];
        ap[off] = val;
      }
    }
  }
}

// shared argument checks of window_scores / prefill_attention_scores
static PagedArgs check_chunk(const at::Tensor& query, const at::Tensor& query_start, const at::Tensor& k_t,
                             const at::Tensor* v, const at::Tensor& block_table, const at::Tensor& seq_lens,
                             const at::Tensor& num_retained, const c10::optional<at::Tensor>& weights,
                             const c10::optional<at::Tensor>& acc, bool amx) {
  const PagedArgs pa = check_paged(k_t, v, acc, amx);
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1 && query.device().is_cpu(),
              "query must be a CPU [T, Hq, D] tensor with contiguous rows");
  TORCH_CHECK(query.scalar_type() == k_t.scalar_type(), "query dtype must match the cache dtype");
  TORCH_CHECK(query.size(2) == pa.D && query.size(1) % pa.H == 0, "query must be [T, G*H, D]");
  const int64_t R = seq_lens.size(0);
  check_int_vec(query_start, R + 1, "query_start", at::kInt);
  check_int_vec(seq_lens, R, "seq_lens", at::kInt);
  check_int_vec(num_retained, R, "num_retained", at::kInt);
  if (weights.has_value() && weights->defined())
    TORCH_CHECK(weights->dim() == 1 && weights->size(0) >= query.size(0) && weights->scalar_type() == at::kFloat &&
                    weights->is_contiguous(),
                "weights must be float32 [T]");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) >= R && block_table.scalar_type() == at::kInt &&
                  block_table.stride(1) == 1,
              "block_table must be int32 [R, cols] with contiguous rows");
  const int32_t* qs = query_start.data_ptr<int32_t>();
  for (int64_t i = 0; i < R; ++i)
    TORCH_CHECK(qs[i] >= 0 && qs[i] <= qs[i + 1] && qs[i + 1] <= query.size(0), "bad query_start");
  const int32_t* nr = num_retained.data_ptr<int32_t>();
  const int32_t* sl = seq_lens.data_ptr<int32_t>();
  for (int64_t i = 0; i < R; ++i) TORCH_CHECK(nr[i] >= 0, "num_retained must be >= 0");
  check_rows(block_table.data_ptr<int32_t>(), block_table.stride(0), block_table.size(1), R, sl, nullptr, pa.bs,
             pa.nb);
  return pa;
}

template <typename T>
static void chunk_dispatch(const at::Tensor& query, const at::Tensor& query_start, const PagedArgs& pa,
                           const at::Tensor& k_t, const at::Tensor* v, const at::Tensor& block_table,
                           const at::Tensor& seq_lens, const at::Tensor& num_retained, const float* w, double scale,
                           float* acc, at::Tensor* out) {
  chunk_impl<T>(query, seq_lens.size(0), query_start.data_ptr<int32_t>(), pa, k_t.data_ptr<T>(),
                v != nullptr ? v->data_ptr<T>() : nullptr, block_table.data_ptr<int32_t>(), block_table.stride(0),
                seq_lens.data_ptr<int32_t>(), num_retained.data_ptr<int32_t>(), w, scale, acc, out);
}

static void chunk_op(const at::Tensor& query, const at::Tensor& query_start, const at::Tensor& k_t,
                     const at::Tensor* v, const at::Tensor& block_table, const at::Tensor& seq_lens,
                     const at::Tensor& num_retained, const c10::optional<at::Tensor>& weights, double scale,
                     const c10::optional<at::Tensor>& acc, at::Tensor* out, bool amx) {
  const PagedArgs pa = check_chunk(query, query_start, k_t, v, block_table, seq_lens, num_retained, weights, acc, amx);
  const float* w = weights.has_value() && weights->defined() ? weights->data_ptr<float>() : nullptr;
  float* accp = acc.has_value() && acc->defined() ? acc->data_ptr<float>() : nullptr;
  switch (query.scalar_type()) {
    case at::kFloat:
      chunk_dispatch<float>(query, query_start, pa, k_t, v, block_table, seq_lens, num_retained, w, scale, accp, out);
      break;
    case at::kBFloat16:
      chunk_dispatch<c10::BFloat16>(query, query_start, pa, k_t, v, block_table, seq_lens, num_retained, w, scale,
                                    accp, out);
      break;
    case at::kHalf:
      chunk_dispatch<c10::Half>(query, query_start, pa, k_t, v, block_table, seq_lens, num_retained, w, scale, accp,
                                out);
      break;
    default:
      TORCH_CHECK(false, "unsupported dtype ", query.scalar_type());
  }
}

void window_scores(const at::Tensor& query, const at::Tensor& query_start, const at::Tensor& k_t,
                   const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& num_retained,
                   const at::Tensor& weights, double scale, const at::Tensor& acc, bool amx) {
  chunk_op(query, query_start, k_t, nullptr, block_table, seq_lens, num_retained, c10::optional<at::Tensor>(weights),
           scale, c10::optional<at::Tensor>(acc), nullptr, amx);
}

void prefill_attention_scores(const at::Tensor& query, const at::Tensor& query_start, const at::Tensor& k_t,
                              const at::Tensor& v, const at::Tensor& block_table, const at::Tensor& seq_lens,
                              const at::Tensor& num_retained, const c10::optional<at::Tensor>& weights, double scale,
                              const c10::optional<at::Tensor>& acc, at::Tensor out, bool amx) {
  TORCH_CHECK(out.dim() == 3 && out.size(0) >= query.size(0) && out.size(1) == query.size(1) &&
                  out.size(2) == query.size(2) && out.stride(2) == 1 && out.scalar_type() == query.scalar_type() &&
                  out.device().is_cpu(),
              "out must be a CPU [T, Hq, D] tensor like query, with contiguous rows");
  TORCH_CHECK(!(acc.has_value() && acc->defined()) || (weights.has_value() && weights->defined()),
              "acc needs weights");
  chunk_op(query, query_start, k_t, &v, block_table, seq_lens, num_retained, weights, scale, acc, &out, amx);
}

// ---------------------------------------------------------------- (c) compaction

template <typename T>
static void compact_impl(const PagedArgs& pa, T* kbase, T* vbase, float* acc, const int32_t* bt, int64_t sbt0,
                         int64_t R, const int64_t* os, const int64_t* ns, const int64_t* kept, int64_t skr,
                         int64_t skh, int64_t Kmax, const int64_t* keep, const float* nacc, int64_t snr,
                         int64_t snh) {
  const int H = static_cast<int>(pa.H), D = static_cast<int>(pa.D), bs = static_cast<int>(pa.bs);
  const int64_t items = R * H;
  const int nt = num_threads_for(items);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t i = it / H;
    const int h = static_cast<int>(it % H);
    const int64_t* kr = kept + i * skr + h * skh;
    int n = static_cast<int>(std::min<int64_t>(keep[i], Kmax));
    for (int k = 0; k < n; ++k)
      if (kr[k] < 0) {  // padding ends the row
        n = k;
        break;
      }
    if (n <= 0) continue;
    const int32_t* btr = bt + i * sbt0;
    Scratch& s = scratch();
    T* kb = reinterpret_cast<T*>(grow(s.b0, static_cast<size_t>(n) * D * sizeof(T)));  // [D][n]
    T* vb = reinterpret_cast<T*>(grow(s.b1, static_cast<size_t>(n) * D * sizeof(T)));  // [n][D]
    float* ab = grow(s.f0, static_cast<size_t>(n));
    int32_t* offs = grow(s.i0, static_cast<size_t>(n));  // in-page offsets
    for (int k = 0; k < n; ++k) offs[k] = static_cast<int32_t>(kr[k] % bs);
    if (pa.amx) {  // "amx" pages through the packing (kb, vb: [n][D]); a key's dim pair is one
                   // 32-bit word (D/2 word moves per token), a value is half a word
      for (int k = 0; k < n; ++k) {
        const int64_t blk = btr[os[i] + kr[k] / bs];
        const T* kp = kbase + blk * pa.sk0 + h * pa.sk1 + amx_k_off(offs[k], 0, D);
        const T* vp = vbase + blk * pa.sv0 + h * pa.sv1;
        T* kd = kb + static_cast<int64_t>(k) * D;
        for (int j = 0; j < D / 2; ++j) std::memcpy(kd + 2 * j, kp + static_cast<int64_t>(j) * 32, 2 * sizeof(T));
        T* vd = vb + static_cast<int64_t>(k) * D;
        for (int d0 = 0; d0 < D; d0 += 16) {  // one 16-dim group: every other element of a 64-byte row
          const T* src = vp + amx_v_off(offs[k], d0, bs);
          for (int e = 0; e < 16; ++e) vd[d0 + e] = src[2 * e];
        }
        if (acc != nullptr && nacc == nullptr) ab[k] = acc[blk * pa.sa0 + h * pa.sa1 + offs[k]];
      }
      for (int k = 0; k < n; ++k) {
        const int64_t blk = btr[ns[i] + k / bs];
        const int off = k % bs;
        T* kp = kbase + blk * pa.sk0 + h * pa.sk1 + amx_k_off(off, 0, D);
        T* vp = vbase + blk * pa.sv0 + h * pa.sv1;
        const T* kd = kb + static_cast<int64_t>(k) * D;
        for (int j = 0; j < D / 2; ++j) std::memcpy(kp + static_cast<int64_t>(j) * 32, kd + 2 * j, 2 * sizeof(T));
        const T* vd = vb + static_cast<int64_t>(k) * D;
        for (int d0 = 0; d0 < D; d0 += 16) {
          T* dst = vp + amx_v_off(off, d0, bs);
          for (int e = 0; e < 16; ++e) dst[2 * e] = vd[d0 + e];
        }
        if (acc != nullptr) acc[blk * pa.sa0 + h * pa.sa1 + off] = nacc ? nacc[i * snr + h * snh + k] : ab[k];
      }
      continue;
    }
    // gather every kept slot first (the destination window overlaps the source one),
    // one source page at a time
    for (int k0 = 0; k0 < n;) {
      const int64_t e = kr[k0] / bs;
      int k1 = k0 + 1;
      while (k1 < n && kr[k1] / bs == e) ++k1;
      const int64_t blk = btr[os[i] + e];
      const T* kp = kbase + blk * pa.sk0 + h * pa.sk1;
      const T* vp = vbase + blk * pa.sv0 + h * pa.sv1;
      const int32_t* of = offs + k0;
      const int c = k1 - k0;
      if (c == bs) {  // the whole page is kept: plain row copies
        for (int d = 0; d < D; ++d)
          std::memcpy(kb + static_cast<int64_t>(d) * n + k0, kp + static_cast<int64_t>(d) * bs, sizeof(T) * bs);
        std::memcpy(vb + static_cast<int64_t>(k0) * D, vp, sizeof(T) * bs * D);
      } else {
        for (int d = 0; d < D; ++d) {
          const T* __restrict row = kp + static_cast<int64_t>(d) * bs;
          T* __restrict dst = kb + static_cast<int64_t>(d) * n + k0;
          for (int k = 0; k < c; ++k) dst[k] = row[of[k]];
        }
        for (int k = 0; k < c; ++k)
          std::memcpy(vb + static_cast<int64_t>(k0 + k) * D, vp + static_cast<int64_t>(of[k]) * D, sizeof(T) * D);
      }
      if (acc != nullptr && nacc == nullptr) {
        const float* ap = acc + blk * pa.sa0 + h * pa.sa1;
        for (int k = 0; k < c; ++k) ab[k0 + k] = ap[of[k]];
      }
      k0 = k1;
    }
    // scatter: destination slots k0.. of one page are contiguous
    for (int k0 = 0; k0 < n; k0 += bs) {
      const int cnt = std::min(bs, n - k0);
      const int64_t blk = btr[ns[i] + k0 / bs];
      T* kp = kbase + blk * pa.sk0 + h * pa.sk1;
      for (int d = 0; d < D; ++d)
        std::memcpy(kp + static_cast<int64_t>(d) * bs, kb + static_cast<int64_t>(d) * n + k0, sizeof(T) * cnt);
      std::memcpy(vbase + blk * pa.sv0 + h * pa.sv1, vb + static_cast<int64_t>(k0) * D, sizeof(T) * cnt * D);
      if (acc != nullptr)
        std::memcpy(acc + blk * pa.sa0 + h * pa.sa1, nacc ? nacc + i * snr + h * snh + k0 : ab + k0,
                    sizeof(float) * cnt);
    }
  }
}

void compact_windows(const at::Tensor& k_t, const at::Tensor& v, const c10::optional<at::Tensor>& acc,
                     const at::Tensor& block_table, const at::Tensor& old_start, const at::Tensor& new_start,
                     const at::Tensor& kept, const at::Tensor& keep, const c10::optional<at::Tensor>& new_acc,
                     bool amx) {
  const PagedArgs pa = check_paged(k_t, &v, acc, amx);
  const int64_t R = keep.size(0);
  check_int_vec(keep, R, "keep", at::kLong);
  check_int_vec(old_start, R, "old_start", at::kLong);
  check_int_vec(new_start, R, "new_start", at::kLong);
  TORCH_CHECK(kept.dim() == 3 && kept.size(0) == R && kept.size(1) == pa.H && kept.scalar_type() == at::kLong &&
                  kept.stride(2) == 1,
              "kept must be int64 [R, H, Kmax] with contiguous rows");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) >= R && block_table.scalar_type() == at::kInt &&
                  block_table.stride(1) == 1,
              "block_table must be int32 [R, cols] with contiguous rows");
  const bool has_acc = acc.has_value() && acc->defined();
  const bool has_new = new_acc.has_value() && new_acc->defined();
  if (has_new) {
    TORCH_CHECK(new_acc->dim() == 3 && new_acc->size(0) == R && new_acc->size(1) == pa.H &&
                    new_acc->size(2) == kept.size(2) && new_acc->scalar_type() == at::kFloat &&
                    new_acc->stride(2) == 1 && new_acc->device().is_cpu(),
                "new_acc must be float32 [R, H, Kmax] like kept");
  }
  const int64_t Kmax = kept.size(2), cols = block_table.size(1);
  const int32_t* bt = block_table.data_ptr<int32_t>();
  const int64_t sbt0 = block_table.stride(0);
  const int64_t* os = old_start.data_ptr<int64_t>();
  const int64_t* ns = new_start.data_ptr<int64_t>();
  const int64_t* kp = keep.data_ptr<int64_t>();
  const int64_t* kr = kept.data_ptr<int64_t>();
  // validate every source and destination slot before touching the cache
  auto check_entry = [&](int64_t i, int64_t e) {
    TORCH_CHECK(e >= 0 && e < cols, "request ", i, ": block-table entry ", e, " out of range");
    const int64_t b = bt[i * sbt0 + e];
    TORCH_CHECK(b >= 0 && b < pa.nb, "request ", i, ": block id ", b, " out of range");
  };
  for (int64_t i = 0; i < R; ++i) {
    const int64_t n = std::min(kp[i], Kmax);
    if (n <= 0) continue;
    for (int64_t pg = 0; pg * pa.bs < n; ++pg) check_entry(i, ns[i] + pg);
    for (int64_t h = 0; h < pa.H; ++h)
      for (int64_t k = 0; k < n; ++k) {
        const int64_t src = kr[i * kept.stride(0) + h * kept.stride(1) + k];
        if (src < 0) break;
        check_entry(i, os[i] + src / pa.bs);
      }
  }
  float* accp = has_acc ? acc->data_ptr<float>() : nullptr;
  const float* np = has_new ? new_acc->data_ptr<float>() : nullptr;
  const int64_t snr = has_new ? new_acc->stride(0) : 0, snh = has_new ? new_acc->stride(1) : 0;
  switch (k_t.scalar_type()) {
    case at::kFloat:
      compact_impl<float>(pa, k_t.data_ptr<float>(), v.data_ptr<float>(), accp, bt, sbt0, R, os, ns, kr,
                          kept.stride(0), kept.stride(1), Kmax, kp, np, snr, snh);
      break;
    case at::kBFloat16:
      compact_impl<c10::BFloat16>(pa, k_t.data_ptr<c10::BFloat16>(), v.data_ptr<c10::BFloat16>(), accp, bt, sbt0, R,
                                  os, ns, kr, kept.stride(0), kept.stride(1), Kmax, kp, np, snr, snh);
      break;
    case at::kHalf:
      compact_impl<c10::Half>(pa, k_t.data_ptr<c10::Half>(), v.data_ptr<c10::Half>(), accp, bt, sbt0, R, os, ns, kr,
                              kept.stride(0), kept.stride(1), Kmax, kp, np, snr, snh);
      break;
    default:
      TORCH_CHECK(false, "unsupported dtype ", k_t.scalar_type());
  }
}

bool bf16_dot(int64_t head_size) {
#ifdef KVC_BF16DOT
  return bf16dot_for(head_size);
#else
  (void)head_size;
  return false;
#endif
}

int64_t simd_width() {
#ifdef KVC_AVX2
  return 8;
#else
  return 1;
#endif
}

}  // namespace kvc

TORCH_LIBRARY(kvcompress, m) {
  m.def(
      "decode_attention_scores(Tensor query, Tensor k_t, Tensor v, Tensor block_table, Tensor seq_lens, "
      "float scale, Tensor(a!)? acc, Tensor? weights, Tensor(b!) out, bool amx=False) -> ()");
  m.def(
      "window_scores(Tensor query, Tensor query_start, Tensor k_t, Tensor block_table, Tensor seq_lens, "
      "Tensor num_retained, Tensor weights, float scale, Tensor(a!) acc, bool amx=False) -> ()");
  m.def(
      "prefill_attention_scores(Tensor query, Tensor query_start, Tensor k_t, Tensor v, Tensor block_table, "
      "Tensor seq_lens, Tensor num_retained, Tensor? weights, float scale, Tensor(a!)? acc, Tensor(b!) out, "
      "bool amx=False) -> ()");
  m.def(
      "compact_windows(Tensor(a!) k_t, Tensor(b!) v, Tensor(c!)? acc, Tensor block_table, Tensor old_start, "
      "Tensor new_start, Tensor kept, Tensor keep, Tensor? new_acc, bool amx=False) -> ()");
  m.def("simd_width() -> int", &kvc::simd_width);
  m.def("bf16_dot(int head_size) -> bool", &kvc::bf16_dot);
}

TORCH_LIBRARY_IMPL(kvcompress, CPU, m) {
  m.impl("decode_attention_scores", &kvc::decode_attention_scores);
  m.impl("window_scores", &kvc::window_scores);
  m.impl("prefill_attention_scores", &kvc::prefill_attention_scores);
  m.impl("compact_windows", &kvc::compact_windows);
}
