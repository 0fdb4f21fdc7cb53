#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cmath>
#include <cstdint>

template <typename T> static inline float to_f(T x) { return static_cast<float>(x); }

#if defined(__AVX512F__)
#include <immintrin.h>

// exp(x) for x <= 0 via 2^(x log2 e): a degree-6 polynomial for the fraction, scalef for the
// integer part. Relative error ~1e-7, plenty for softmax weights.
static inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.540353039e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.333355815e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129108e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265070e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471806e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
// Masked loads/stores of 16 elements as float32 (bf16 stores round to nearest even, as
// c10::BFloat16 does); tail(rem) masks the last partial vector of a row.
static inline __m512 ld(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
static inline void st(float* p, __m512 v, __mmask16 k) { _mm512_mask_storeu_ps(p, k, v); }
static inline __m512 ld(const c10::BFloat16* p, __mmask16 k) {
  const __m256i v = _mm256_maskz_loadu_epi16(k, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
static inline void st(c10::BFloat16* p, __m512 v, __mmask16 k) {
  __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  b = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16)));
}
static inline __m512 ld(const c10::Half* p, __mmask16 k) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p)); }
static inline void st(c10::Half* p, __m512 v, __mmask16 k) {
  _mm256_mask_storeu_epi16(p, k, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// r[i] = sum of the 16 lanes of v[i]: a transpose-and-add tree (45 shuffles/adds for 16 sums
// instead of 16 horizontal reductions).
static inline __m512 hsum16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int k = 0; k < 8; ++k)
    a[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; ++k) {
    const __m512d x = _mm512_castps_pd(a[2 * k]), y = _mm512_castps_pd(a[2 * k + 1]);
    b[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int k = 0; k < 2; ++k)
    c[k] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xdd));
}
static inline __mmask16 tail(int64_t rem) { return rem >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << rem) - 1u); }
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// CPUs with AVX2 but no AVX-512 (Zen 2/3, most client CPUs): 8-wide float32 helpers.
#define FORKLLM_AVX2 1
#include <immintrin.h>
static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const c10::BFloat16* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
static inline __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
// exp(x) for x <= 0, as exp512: the exponent goes in by integer add (AVX2 has no scalef).
static inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(1.540353039e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.333355815e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618129108e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550410866e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402265070e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931471806e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
static inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

#if defined(__AVX512BF16__)
// bf16 pair helpers for vdpbf16ps (two bf16 products per fp32 lane).
static inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }

// Rows a and b (32 bf16 each) as (a[d], b[d]) pairs: lo holds dims 0..15, hi dims 16..31. Only
// the low 16 of each row are read for lo, so a half-width row may be passed for lo alone.
static inline __m512i pair_lo(__m512i a, __m512i b) {
  alignas(64) static const uint16_t idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                               8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  return _mm512_permutex2var_epi16(a, _mm512_load_si512(idx), b);
}
static inline __m512i pair_hi(__m512i a, __m512i b) {
  alignas(64) static const uint16_t idx[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                               24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  return _mm512_permutex2var_epi16(a, _mm512_load_si512(idx), b);
}
#endif
