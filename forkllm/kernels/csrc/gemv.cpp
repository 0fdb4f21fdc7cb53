// y[M, N] = x[M, K] @ w[N, K]^T (+ bias) for small M (1..8): the decode-time matmul.
// Each weight row is streamed once from memory for all M rows of x, and rows are split across
// threads. MKL's fp32 GEMV at M=1 runs on one thread at ~16 GB/s here; this reaches the
// machine's two-thread bandwidth. Accumulation is in float32 whatever the weight dtype.
#include "common.h"
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

template <int M, typename T>
void gemv_rows(const float* __restrict xf, const T* __restrict w, const T* __restrict bias, int64_t K,
               int64_t n0, int64_t n1, int64_t N, T* __restrict y) {
  int64_t n = n0;
#if defined(__AVX512F__)
  const int64_t K16 = K - K % 16;
  for (; n + 1 < n1; n += 2) {  // two rows at a time: two independent FMA chains per x row
    const T* w0 = w + n * K;
    const T* w1 = w0 + K;
    __m512 a0[M], a1[M];
    for (int m = 0; m < M; ++m) { a0[m] = _mm512_setzero_ps(); a1[m] = _mm512_setzero_ps(); }
    for (int64_t k = 0; k < K16; k += 16) {
      const __m512 v0 = load16(w0 + k), v1 = load16(w1 + k);
      for (int m = 0; m < M; ++m) {
        const __m512 xv = _mm512_loadu_ps(xf + m * K + k);
        a0[m] = _mm512_fmadd_ps(xv, v0, a0[m]);
        a1[m] = _mm512_fmadd_ps(xv, v1, a1[m]);
      }
    }
    for (int m = 0; m < M; ++m) {
      float s0 = _mm512_reduce_add_ps(a0[m]), s1 = _mm512_reduce_add_ps(a1[m]);
      for (int64_t k = K16; k < K; ++k) {
        s0 += xf[m * K + k] * to_f(w0[k]);
        s1 += xf[m * K + k] * to_f(w1[k]);
      }
      if (bias) { s0 += to_f(bias[n]); s1 += to_f(bias[n + 1]); }
      y[m * N + n] = static_cast<T>(s0);
      y[m * N + n + 1] = static_cast<T>(s1);
    }
  }
#endif
  for (; n < n1; ++n) {
    const T* wr = w + n * K;
    for (int m = 0; m < M; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += xf[m * K + k] * to_f(wr[k]);
      if (bias) s += to_f(bias[n]);
      y[m * N + n] = static_cast<T>(s);
    }
  }
}

#if defined(__AVX512BF16__)
// bf16 x bf16 with vdpbf16ps: 32 weights per instruction, no widening; accumulates in float32.
template <int M>
void gemv_rows_bf16(const c10::BFloat16* __restrict x, const c10::BFloat16* __restrict w,
                    const c10::BFloat16* __restrict bias, int64_t K, int64_t n0, int64_t n1, int64_t N,
                    c10::BFloat16* __restrict y) {
  const int64_t K32 = K - K % 32;
  constexpr int R = M <= 2 ? 4 : (M <= 4 ? 2 : 1);  // rows per pass: enough independent chains
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    __m512 acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K32; k += 32) {
      __m512bh wv[R];
      for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(w + (n + r) * K + k);
      for (int m = 0; m < M; ++m) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
        for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], xv, wv[r]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) {
        float s = _mm512_reduce_add_ps(acc[r][m]);
        for (int64_t k = K32; k < K; ++k) s += to_f(x[m * K + k]) * to_f(w[(n + r) * K + k]);
        if (bias) s += to_f(bias[n + r]);
        y[m * N + n + r] = static_cast<c10::BFloat16>(s);
      }
  }
  for (; n < n1; ++n)
    for (int m = 0; m < M; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += to_f(x[m * K + k]) * to_f(w[n * K + k]);
      if (bias) s += to_f(bias[n]);
      y[m * N + n] = static_cast<c10::BFloat16>(s);
    }
}
#endif

template <int M, typename T>
void gemv(const torch::Tensor& x, const torch::Tensor& w, const T* bias, torch::Tensor& y) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const int64_t K = w.size(1), N = w.size(0);
    const T* xp = x.data_ptr<T>();
    const T* wp = w.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    at::parallel_for(0, N, 64, [&](int64_t b, int64_t e) { gemv_rows_bf16<M>(xp, wp, bias, K, b, e, N, yp); });
    return;
  }
#endif
  const int64_t K = w.size(1), N = w.size(0);
  std::vector<float> xf(M * K);
  const T* xp = x.data_ptr<T>();
  for (int64_t i = 0; i < M * K; ++i) xf[i] = to_f(xp[i]);
  const T* wp = w.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, N / 2, 16, [&](int64_t b, int64_t e) {
    const int64_t n1 = (e == N / 2) ? N : 2 * e;  // the last chunk takes an odd final row
    gemv_rows<M, T>(xf.data(), wp, bias, K, 2 * b, n1, N, yp);
  });
}

template <typename T>
void dispatch(const torch::Tensor& x, const torch::Tensor& w, const T* bias, torch::Tensor& y) {
  switch (x.size(0)) {
    case 1: return gemv<1, T>(x, w, bias, y);
    case 2: return gemv<2, T>(x, w, bias, y);
    case 3: return gemv<3, T>(x, w, bias, y);
    case 4: return gemv<4, T>(x, w, bias, y);
    case 5: return gemv<5, T>(x, w, bias, y);
    case 6: return gemv<6, T>(x, w, bias, y);
    case 7: return gemv<7, T>(x, w, bias, y);
    case 8: return gemv<8, T>(x, w, bias, y);
  }
  TORCH_CHECK(false, "small_linear: M must be 1..8");
}

}  // namespace

// x [M, K] contiguous, w [N, K] contiguous, same dtype; bias [N] or empty.
torch::Tensor small_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "small_linear: expected contiguous x [M, K] and w [N, K]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "small_linear: x and w dtypes differ");
  auto y = torch::empty({x.size(0), w.size(0)}, x.options());
  const bool has_bias = bias.has_value() && bias->defined();
  if (x.scalar_type() == torch::kFloat)
    dispatch<float>(x, w, has_bias ? bias->data_ptr<float>() : nullptr, y);
  else if (x.scalar_type() == torch::kBFloat16)
    dispatch<c10::BFloat16>(x, w, has_bias ? bias->data_ptr<c10::BFloat16>() : nullptr, y);
  else if (x.scalar_type() == torch::kHalf)
    dispatch<c10::Half>(x, w, has_bias ? bias->data_ptr<c10::Half>() : nullptr, y);
  else
    TORCH_CHECK(false, "small_linear: unsupported dtype");
  return y;
}
