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
#endif
