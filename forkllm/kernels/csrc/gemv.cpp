// y[M, N] = x[M, K] @ w[N, K]^T (+ bias) for small M (1..8): the decode-time matmul on weights
// in their row-major layout. Each weight row is streamed once from memory for all M rows of x,
// and rows are split across threads. MKL's fp32 GEMV at M=1 runs on one thread at ~16 GB/s here;
// this reaches the machine's two-thread bandwidth. Accumulation is in float32 whatever the weight
// dtype. (bf16 weights on AVX512-BF16 CPUs without AMX are repacked and go to packed_gemm.cpp.)
#include "common.h"
#include <cstring>
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
#elif defined(FORKLLM_AVX2)
// AVX2: one weight row x up to two input rows at a time, four accumulators each (k blocks of 8
// taken round-robin): 4-8 independent FMA chains, where one chain per row (what the compiler
// makes of the scalar loop) leaves FMA latency exposed once several input rows share a weight
// row. Input rows are taken in pairs over the same weight row (still in L1), so every
// (row, input) sum runs in one order whatever M is.
template <int MB, typename T>
inline void row_dot(const float* __restrict xf, const T* __restrict w, int64_t K, float* s) {
  const int64_t K32 = K - K % 32;
  __m256 a[MB][4];
  for (int m = 0; m < MB; ++m) a[m][0] = a[m][1] = a[m][2] = a[m][3] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K32; k += 32) {
    __m256 v[4];
    for (int j = 0; j < 4; ++j) v[j] = load8(w + k + 8 * j);
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < 4; ++j) a[m][j] = _mm256_fmadd_ps(_mm256_loadu_ps(xf + m * K + k + 8 * j), v[j], a[m][j]);
  }
  for (int m = 0; m < MB; ++m) {
    float t = hsum8(_mm256_add_ps(_mm256_add_ps(a[m][0], a[m][1]), _mm256_add_ps(a[m][2], a[m][3])));
    for (int64_t k = K32; k < K; ++k) t += xf[m * K + k] * to_f(w[k]);
    s[m] = t;
  }
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
#elif defined(FORKLLM_AVX2)
  for (; n < n1; ++n) {
    const T* wr = w + n * K;
    float sm[M];
    int m = 0;
    for (; m + 2 <= M; m += 2) row_dot<2, T>(xf + m * K, wr, K, sm + m);
    if (m < M) row_dot<1, T>(xf + m * K, wr, K, sm + m);
    for (m = 0; m < M; ++m) y[m * N + n] = static_cast<T>(bias ? sm[m] + to_f(bias[n]) : sm[m]);
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

template <int M, typename T>
void gemv(const torch::Tensor& x, const torch::Tensor& w, const T* bias, torch::Tensor& y) {
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

#if defined(__AVX512BF16__)
// bf16 x bf16 with vdpbf16ps: tiles of 4 weight rows x up to 4 input rows give 16 float32
// dot-product accumulators, reduced together by one transpose-add tree. A task keeps its 4 weight
// rows in L1 across every input row and prefetches the next 4, so the weights stream from memory
// once per call at full bandwidth (oneDNN's bf16 GEMM reads them at ~15 GB/s below 16 rows here).
template <int R, int MB>
static inline __m512 tile_dot(const c10::BFloat16* __restrict x, const c10::BFloat16* __restrict w, int64_t K) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) wv[r] = as_bh(_mm512_loadu_si512(w + r * K + k));
    for (int m = 0; m < MB; ++m) {
      const __m512bh xv = as_bh(_mm512_loadu_si512(x + m * K + k));
      for (int r = 0; r < R; ++r) acc[m * R + r] = _mm512_dpbf16_ps(acc[m * R + r], xv, wv[r]);
    }
  }
  // Masked tail, zeros add nothing. Kept out of the main loop: masked loads there made 4-8 rows
  // 1.4x slower on Zen 4 (measured).
  if (k < K) {
    const __mmask32 km = (__mmask32)((1ull << (K - k)) - 1ull);
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) wv[r] = as_bh(_mm512_maskz_loadu_epi16(km, w + r * K + k));
    for (int m = 0; m < MB; ++m) {
      const __m512bh xv = as_bh(_mm512_maskz_loadu_epi16(km, x + m * K + k));
      for (int r = 0; r < R; ++r) acc[m * R + r] = _mm512_dpbf16_ps(acc[m * R + r], xv, wv[r]);
    }
  }
  return hsum16(acc);  // lane m * R + r
}

template <int R, int MB>
static inline void tile_store(const c10::BFloat16* __restrict x, const c10::BFloat16* __restrict w,
                              const c10::BFloat16* __restrict bias, int64_t K, int64_t N, int64_t n,
                              c10::BFloat16* __restrict y) {
  __m512 v = tile_dot<R, MB>(x, w + n * K, K);
  if (bias) {  // lane m * R + r gets bias[n + r]
    alignas(64) float b[16] = {};
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < R; ++r) b[m * R + r] = to_f(bias[n + r]);
    v = _mm512_add_ps(v, _mm512_load_ps(b));
  }
  alignas(32) c10::BFloat16 o[16];
  st(o, v, (__mmask16)0xffff);  // round to nearest even, as c10::BFloat16 does
  for (int m = 0; m < MB; ++m) std::memcpy(y + m * N + n, o + m * R, R * sizeof(c10::BFloat16));
}

template <int R>
static inline void row_block(const c10::BFloat16* x, const c10::BFloat16* w, const c10::BFloat16* bias, int64_t M,
                             int64_t K, int64_t N, int64_t n, c10::BFloat16* y, const c10::BFloat16* next) {
  // Pull the next block's weights toward L1 while this block computes from it: the hardware
  // prefetcher alone leaves the first input tile of each block waiting on memory.
  if (next)
    for (int64_t off = 0; off < R * K * 2; off += 64) _mm_prefetch(reinterpret_cast<const char*>(next) + off, _MM_HINT_T0);
  int64_t m0 = 0;
  for (; m0 + 4 <= M; m0 += 4) tile_store<R, 4>(x + m0 * K, w, bias, K, N, n, y + m0 * N);
  switch (M - m0) {
    case 1: tile_store<R, 1>(x + m0 * K, w, bias, K, N, n, y + m0 * N); break;
    case 2: tile_store<R, 2>(x + m0 * K, w, bias, K, N, n, y + m0 * N); break;
    case 3: tile_store<R, 3>(x + m0 * K, w, bias, K, N, n, y + m0 * N); break;
  }
}

static void gemm_bf16(const torch::Tensor& x, const torch::Tensor& w, const c10::BFloat16* bias, torch::Tensor& y) {
  const int64_t M = x.size(0), K = w.size(1), N = w.size(0);
  const c10::BFloat16* xp = x.data_ptr<c10::BFloat16>();
  const c10::BFloat16* wp = w.data_ptr<c10::BFloat16>();
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t n = 4 * blk;
      if (n + 4 <= N)
        row_block<4>(xp, wp, bias, M, K, N, n, yp, n + 8 <= N ? wp + (n + 4) * K : nullptr);
      else
        for (int64_t r = n; r < N; ++r) row_block<1>(xp, wp, bias, M, K, N, r, yp, nullptr);
    }
  });
}
#endif

template <typename T>
void dispatch(const torch::Tensor& x, const torch::Tensor& w, const T* bias, torch::Tensor& y) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (x.size(0) <= 8) return gemm_bf16(x, w, bias, y);
  }
#endif
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
